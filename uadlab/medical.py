"""Medical images: DICOM and NIfTI volumes as named slices, intensity windows, patient safety, NIfTI export.

Reading (``uadlab.data`` dispatches files here by suffix):

- DICOM (pydicom): the modality LUT first (Rescale Slope/Intercept, per frame from the functional groups of
  enhanced multi-frame files, or a Modality LUT Sequence) gives modality units (HU for CT); then the display
  window: the run's ``Window`` or, by default (``auto``), the file's own VOI (Window Center/Width with its
  VOI LUT Function, per frame when given, else a VOI LUT Sequence); MONOCHROME1 is inverted LAST (inverting
  before the window would invert twice). Multi-frame files give one sample per frame. Compressed transfer
  syntaxes decode through pydicom's pixel handlers where one is installed, else a DataError names the syntax
  and the packages that would decode it. NaN / infinite values of float pixel data take the frame's lowest
  finite value; a frame without any finite value is refused. A folder holding a series is sorted along the slice
  normal by Image Position (Patient), else by Instance Number. DICOM SEG objects among the files are masks, not
  images: each SEG frame pairs with the image frame its Derivation Image Sequence references by SOP Instance
  UID; the slices of a series a SEG covers are anomalous where it marks something and normal elsewhere
  (``DicomFrame.seg`` / ``finding``). PNG masks named after ``.dcm`` files pair in ``uadlab.data``.
- NIfTI (nibabel, ``.nii`` / ``.nii.gz``): reoriented to the closest canonical orientation (RAS+); each
  slice of the chosen axis (``z`` = axial by default) is one sample named ``<file>#z042``, displayed with
  anterior (axial, x/y slices: superior) at the top. A label volume of the same shape is the mask volume:
  any non-zero label is anomalous. A 4-D file with more than one volume is refused, and so is a header that
  declares more than ``MAX_VOLUME_VOXELS`` (checked before any data is decompressed). The volume is read once
  (linear in its size) and sliced as views. NaN or infinite voxels (many pipelines mark the outside of a
  masked brain with NaN) take the volume's lowest finite value; a volume with no finite voxel, or whose every
  slice is empty (below), is refused naming the file.

Empty slices: in a volume or series of two or more slices, a slice is skipped when its FOREGROUND (pixels
above ``p1 + 5 % (p99 - p1)`` of the whole volume's 1st and 99th intensity percentiles) covers less than
1 % of it, unless its mask marks an anomaly. Skipped slices are counted (``Dataset.summary()["empty_slices"]``).

Windows (``Window.parse``; a run setting fitted on the training images and applied identically to train
and test): ``auto`` (the default: a DICOM file's own VOI; every other scan, volume and 16-bit image through a
percentile window of 0.5-99.5 % fitted on the training images' intensities, so a 16-bit MRI is not read by
the full 16-bit range, near black; before fitting, each image's min/max and the full 16-bit range of
PNG/TIFF), ``minmax`` (each image's own range), ``percentile[:LO,HI]`` (default 0.5-99.5 % of the training
images' intensities, for DICOM files too), a named preset (``WINDOW_PRESETS``, CT Hounsfield units) or
``C/W`` (centre/width). ``Window.view_window`` gives the (centre, width) a window applies to one image in
its modality units, where the viewer starts its own window / level.

Patient safety: identifying DICOM attributes (``PHI_KEYWORDS`` and every PN, DA, DT, TM and UI value, the
DICOM PS3.15 basic profile's people, dates, times and UIDs) are never copied out of the reader: samples are
named ``series<N>/instance<NNNN>`` (never by the file name, often a UID), errors name a file by its position
in its folder, pydicom's own warnings and log lines (which may quote values) are silenced, files kept in
memory for decoding are stripped of those attributes (``strip_phi``), and the Patient ID is kept only as a
salted hash (the salt lives in this process's memory) for the split guard ``check_patients``.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import logging
import os
import secrets
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from .errors import DataError, short_reason as _reason
from .safety import scrub

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
AXES = {"x": 0, "y": 1, "z": 2}  # canonical RAS+: x sagittal, y coronal, z axial slices
MAX_VOLUME_BYTES = 2 * 1024**3  # one volume file
VOLUME_CACHE_BYTES = 1024**3  # volumes kept in memory after reading (float32), shared by every user
MAX_VOLUME_VOXELS = 512**3  # 134 million (512 MB as float32): read in about 15 s here; a .nii.gz of zeros
# declaring far more is a decompression bomb (a 2 MB file of 1024x1024x256 voxels would take 1 GB and half a minute)
FOREGROUND_TOLERANCE = 0.05  # of the p1..p99 intensity range above p1
MIN_FOREGROUND = 0.01  # share of a slice's pixels; below it the slice is empty
PERCENTILES = (0.5, 99.5)
PIXELS_PER_IMAGE = 20_000  # intensities sampled from each training image to fit a percentile window

# Fixed windows in modality units (CT: Hounsfield units), (centre, width) as radiology uses them.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}

# DICOM PS3.15 Annex E basic profile: attributes that identify a patient, besides every value of VR PN
# (names), DA/DT/TM (dates and times) and UI (UIDs), which the reader treats as identifying by their VR.
PHI_KEYWORDS = frozenset({
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate",
    "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "PatientAge", "PatientSex", "PatientSize", "PatientWeight", "MedicalRecordLocator", "EthnicGroup",
    "Occupation", "AdditionalPatientHistory", "PatientComments", "AccessionNumber", "StudyID",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
    "ReferringPhysicianAddress", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "StationName", "DeviceSerialNumber",
    "StudyDescription", "SeriesDescription", "ImageComments", "ProtocolName", "RequestAttributesSequence",
})
PHI_VRS = frozenset({"PN", "DA", "DT", "TM", "UI"})

_SALT = secrets.token_bytes(16)  # per process, never written anywhere


def patient_key(patient_id: str) -> str:
    """A salted hash of a Patient ID: equal ids give equal keys within this process, and nothing else."""
    return hashlib.sha256(_SALT + patient_id.strip().encode("utf-8", "replace")).hexdigest()[:16]


def medical_kind(path: str | os.PathLike) -> str | None:
    """``"nifti"``, ``"dicom"`` or None. Files without a suffix are DICOM when they carry the ``DICM`` marker."""
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if not Path(name).suffix:
        try:
            with open(path, "rb") as f:
                return "dicom" if f.read(132)[128:] == b"DICM" else None
        except OSError:
            return None
    return None


def nifti_stem(path: str | os.PathLike) -> str:
    """``brain.nii.gz`` -> ``brain``."""
    name = Path(path).name
    for suf in NIFTI_SUFFIXES[::-1]:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(path).stem


# ---- pixels and windows ---------------------------------------------------------------------------------
@dataclass
class Pixels:
    """What a reader gives for one image before display.

    Attributes:
        values: (H, W) float32 in modality units, or (H, W, 3) uint8 for colour images (no window applies).
        voi: the file's own VOI transform (modality units -> [0, 1]), used by the ``auto`` window; a
            Window Center/Width VOI carries them as ``voi.center`` and ``voi.width``.
        invert: MONOCHROME1: high values are dark; applied after the window.
        unit: the modality unit of ``values`` ("HU" for CT, "" for raw values such as MR's).
    """

    values: np.ndarray
    voi: Callable[[np.ndarray], np.ndarray] | None = None
    invert: bool = False
    unit: str = ""

    @property
    def colour(self) -> bool:
        return self.values.ndim == 3


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)


def voi_window(center: float, width: float, function: str = "LINEAR") -> Callable[[np.ndarray], np.ndarray]:
    """The DICOM VOI window (PS3.3 C.11.2.1.2-3) as a map to [0, 1]: LINEAR, LINEAR_EXACT or SIGMOID."""
    c, w, fn = float(center), float(width), (function or "LINEAR").upper()

    def apply(x: np.ndarray) -> np.ndarray:
        if fn == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / max(w, 1e-6)))
        if fn == "LINEAR_EXACT":
            return np.clip((x - c) / max(w, 1e-6) + 0.5, 0, 1)
        # LINEAR: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped; w >= 1 by the standard
        return np.clip((x - (c - 0.5)) / max(w - 1.0, 1e-6) + 0.5, 0, 1)

    apply.center, apply.width = c, w  # type: ignore[attr-defined]  # where a viewer starts its window
    return apply


@dataclass(frozen=True)
class Window:
    """An intensity window: how modality units become display values (see the module docstring).

    Attributes:
        spec: the setting as given (``auto``, ``minmax``, ``percentile:0.5,99.5``, ``brain``, ``40/400``).
        lo, hi: the fixed range in modality units (presets, ``C/W``, and percentile windows once fitted).
        percentiles: (low, high) in % for a percentile window.
    """

    spec: str = "auto"
    lo: float | None = None
    hi: float | None = None
    percentiles: tuple[float, float] | None = None

    @classmethod
    def parse(cls, spec: str | None) -> "Window":
        """A window from its setting; ValueError naming the setting and what is accepted."""
        s = (spec or "auto").strip().lower()
        if s in ("auto", "minmax"):
            return cls(s)
        if s in WINDOW_PRESETS:
            c, w = WINDOW_PRESETS[s]
            return cls(s, c - w / 2, c + w / 2)
        if s.startswith("percentile"):
            rest = s[len("percentile"):].lstrip(":")
            try:
                p = tuple(float(v) for v in rest.split(",")) if rest else PERCENTILES
            except ValueError:
                p = ()
            if len(p) != 2 or not 0 <= p[0] < p[1] <= 100:
                raise ValueError(f"window {spec!r}: give percentile:LOW,HIGH with 0 <= LOW < HIGH <= 100")
            return cls(f"percentile:{p[0]:g},{p[1]:g}", percentiles=p)
        c, slash, w = s.partition("/")
        try:
            c_, w_ = float(c), float(w)
            if slash and w_ > 0:
                return cls(s, c_ - w_ / 2, c_ + w_ / 2)
        except ValueError:
            pass
        raise ValueError(f"window {spec!r}: use auto, minmax, percentile[:LOW,HIGH], one of "
                         f"{', '.join(WINDOW_PRESETS)}, or CENTRE/WIDTH such as 40/400")

    def fit(self, samples: Sequence[Any]) -> "Window":
        """This window fitted on the training ``samples`` (objects with ``pixels()``): a percentile window
        takes the percentiles of up to ``PIXELS_PER_IMAGE`` intensities of each; ``auto`` does the same with
        ``PERCENTILES`` over the images WITHOUT a file window (a DICOM file's VOI keeps serving its own file);
        other windows are fixed. Images without intensities (8-bit, colour) do not count (samples with
        ``has_intensities()`` are asked that first, which reads no pixels); with none at all the window stays
        unfitted (``auto`` then renders as before: each image's min/max, PNG/TIFF by their full range)."""
        if self.percentiles is None and self.spec != "auto":
            return self
        percentiles = self.percentiles or PERCENTILES
        rng = np.random.default_rng(0)
        parts = []
        for s in samples:
            if not getattr(s, "has_intensities", lambda: True)():
                continue
            px = s.pixels()
            if px is None or px.colour or (self.spec == "auto" and px.voi is not None):
                continue
            v = px.values.ravel()
            parts.append(v if v.size <= PIXELS_PER_IMAGE else v[rng.choice(v.size, PIXELS_PER_IMAGE, replace=False)])
        if not parts:
            return self
        lo, hi = np.percentile(np.concatenate(parts), percentiles)
        return Window(self.spec, float(lo), float(max(hi, lo + 1e-6)), percentiles)

    def display(self, px: Pixels) -> np.ndarray:
        """(H, W) float32 in [0, 1]: the window, then MONOCHROME1's inversion."""
        x = px.values.astype(np.float32, copy=False)
        if self.spec == "auto" and px.voi is not None:  # the file's own window comes first under auto
            y = px.voi(x)
        elif self.lo is not None:
            y = np.clip((x - self.lo) / (self.hi - self.lo), 0, 1)
        else:  # minmax, auto without a VOI and not fitted, an unfitted percentile window
            y = _minmax(x)
        return (1.0 - y if px.invert else y).astype(np.float32)

    def view_window(self, px: Pixels) -> tuple[float, float]:
        """The (centre, width) in modality units through which this window shows ``px`` (the start of a
        viewer's window / level): a fixed or fitted range, the file's Window Center/Width under ``auto``, else
        the image's own min/max. Not for colour images."""
        voi = px.voi if self.spec == "auto" else None
        if voi is not None and hasattr(voi, "center"):
            return float(voi.center), float(voi.width)
        if self.lo is not None and voi is None:
            return (self.lo + self.hi) / 2, self.hi - self.lo
        v = px.values[np.isfinite(px.values)]
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
        return (lo + hi) / 2, max(hi - lo, 1e-6)

    def render(self, px: Pixels) -> Image.Image:
        """8-bit RGB of one image (grey replicated; colour images unchanged)."""
        if px.colour:
            return Image.fromarray(px.values.astype(np.uint8))
        return Image.fromarray((self.display(px) * 255).round().astype(np.uint8)).convert("RGB")

    def key(self) -> str:
        """Part of the feature-cache key: features of another window are other features."""
        return f"window={self.spec}|{self.lo!r}|{self.hi!r}"

    def to_dict(self) -> dict[str, Any]:
        d = {"spec": self.spec, "lo": self.lo, "hi": self.hi, "description": self.describe()}
        if self.percentiles is not None:
            d["percentiles"] = list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Window":
        if not d:
            return cls()
        w = cls.parse(d.get("spec"))
        p = d.get("percentiles")
        return cls(w.spec, d.get("lo", w.lo), d.get("hi", w.hi), tuple(float(v) for v in p) if p else w.percentiles)

    def describe(self) -> str:
        if self.spec == "auto":
            if self.lo is not None:
                p = self.percentiles or PERCENTILES
                return (f"auto: each DICOM file's own window (VOI); other scans and 16-bit images: percentile "
                        f"{p[0]:g}-{p[1]:g} % of the training images' intensities: [{self.lo:.6g}, {self.hi:.6g}] "
                        "modality units")
            return ("auto: each DICOM file's own window (VOI), else each image's min/max (16-bit PNG/TIFF: "
                    "the full 16-bit range)")
        if self.spec == "minmax":
            return "minmax: each image's own min/max"
        rng = f"[{self.lo:.6g}, {self.hi:.6g}] modality units" if self.lo is not None else "not fitted"
        if self.percentiles:
            return (f"percentile {self.percentiles[0]:g}-{self.percentiles[1]:g} % of the training images' "
                    f"intensities: {rng}")
        c, w = (self.lo + self.hi) / 2, self.hi - self.lo
        return f"{self.spec}: centre {c:g}, width {w:g} ({rng})"

    def bind(self, samples: Sequence[Any]) -> list[Any]:
        """Copies of ``samples`` that render through this window (an unfitted ``auto`` leaves them as they are)."""
        if self.spec == "auto" and self.lo is None:
            return list(samples)
        return [replace(s, window=self) for s in samples]


# ---- volume and file caches -----------------------------------------------------------------------------
def _stat_key(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return path, st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4096)
def _digest_cached(path: str, mtime: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


def file_digest(path: str) -> str:
    """The file's content hash (cached while the file is unchanged)."""
    return _digest_cached(*_stat_key(path))


# ---- NIfTI ------------------------------------------------------------------------------------------------
def _check_size(path: str, name: str) -> None:
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"{name}: file is empty")
    if size > MAX_VOLUME_BYTES:
        raise DataError(f"{name}: file is {size / 1e6:.0f} MB, more than the limit of {MAX_VOLUME_BYTES / 1e6:.0f} MB")


def _load_nifti(path: str, name: str):
    import nibabel as nib

    _check_size(path, name)
    try:
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise DataError(f"{name}: not a NIfTI image ({type(img).__name__})")
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except Exception as e:  # noqa: BLE001 - nibabel raises many kinds of errors for damaged files
        reason = _reason(e).replace(str(Path(path).parent) + os.sep, "")  # nibabel quotes the path: no server paths
        raise DataError(f"{name}: not a readable NIfTI file ({reason})") from None
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = nib.funcs.squeeze_image(img)
    if len(img.shape) == 4:
        raise DataError(f"{name}: a 4-D file of {img.shape[3]} volumes; give one 3-D volume per file")
    if len(img.shape) not in (2, 3):
        raise DataError(f"{name}: a {len(img.shape)}-D image; a NIfTI volume must be 3-D (or 2-D)")
    if int(np.prod(img.shape)) > MAX_VOLUME_VOXELS:  # from the header: nothing decompressed yet
        raise DataError(f"{name}: {'x'.join(map(str, img.shape))} voxels ({np.prod(img.shape) / 1e6:.0f} million), "
                        f"more than the limit of {MAX_VOLUME_VOXELS / 1e6:.0f} million per volume")
    return img


def declared_voxels(path: str | os.PathLike) -> int:
    """The voxels (pixels x frames) a NIfTI or DICOM file declares in its header, without decoding its data
    (the check of an upload's size before anything is read); 0 for other files and unreadable headers (the
    reader reports those)."""
    kind = medical_kind(path)
    try:
        if kind == "nifti":
            import nibabel as nib

            return int(np.prod(nib.load(str(path)).shape, dtype=np.int64))
        if kind == "dicom":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = _pydicom().dcmread(str(path), stop_before_pixels=True)
            return (_int(ds.get("Rows"), 0) * _int(ds.get("Columns"), 0) * max(1, _int(ds.get("NumberOfFrames"), 1))
                    * max(1, _int(ds.get("SamplesPerPixel"), 1)))
    except Exception:  # noqa: BLE001 - a damaged header: the reader names the problem later
        return 0
    return 0


def _canonical(img):
    """The image in the closest canonical orientation (RAS+), 3-D."""
    import nibabel as nib

    if len(img.shape) == 2:
        img = nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine)
    return nib.as_closest_canonical(img)


_VOLUMES: "OrderedDict[tuple[str, int, int], np.ndarray]" = OrderedDict()
_VOLUMES_LOCK = threading.Lock()


def _volume_cached(path: str, mtime: int, size: int) -> np.ndarray:
    """The volume of one file version, kept while the volumes read last hold at most ``VOLUME_CACHE_BYTES``
    (the last two always: an image and its mask). Messages start with ": " (the caller names the file)."""
    key = (path, mtime, size)
    with _VOLUMES_LOCK:
        if key in _VOLUMES:
            _VOLUMES.move_to_end(key)
            return _VOLUMES[key]
    vol = _read_volume(path)  # outside the lock: another volume may be read meanwhile
    with _VOLUMES_LOCK:
        _VOLUMES[key] = vol
        while len(_VOLUMES) > 2 and sum(v.nbytes for v in _VOLUMES.values()) > VOLUME_CACHE_BYTES:
            _VOLUMES.popitem(last=False)
    return vol


def _read_volume(path: str) -> np.ndarray:
    """One read of the whole file into one float32 array (nibabel applies scl_slope / scl_inter: modality
    units), never a copy per slice: ``take_slice`` hands out views. Non-finite voxels (NaN marks the outside
    of a masked brain in many pipelines) become the volume's lowest finite value; a volume with no finite
    voxel is refused."""
    img = _canonical(_load_nifti(path, ""))
    try:
        vol = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - truncated data
        raise DataError(f": corrupt or truncated NIfTI data ({_reason(e)})") from None
    finite = np.isfinite(vol)
    if not finite.all():  # in place: a copy would double the memory of a large volume
        if not finite.any():
            raise DataError(f": no finite intensity (all {vol.size} voxels are NaN or infinite)")
        vol[~finite] = vol[finite].min()
    del finite
    vol.setflags(write=False)
    return vol


def _cached(read: Callable[[str, int, int], Any], path: str, name: str) -> Any:
    """``read(path, mtime, size)`` (an lru_cache of one file version), its errors (": reason") named ``name``."""
    try:
        return read(*_stat_key(path))
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except DataError as e:
        raise DataError(f"{name}{e}") from None


def nifti_volume(path: str | os.PathLike, name: str | None = None) -> np.ndarray:
    """The canonical (RAS+) float32 volume of a NIfTI file, read-only (the last few files stay cached)."""
    return _cached(_volume_cached, str(path), name or Path(path).name)


def take_slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` of ``axis`` of a canonical volume in display orientation (rows top to bottom =
    anterior to posterior for axial slices, superior to inferior otherwise; columns = the first free axis)."""
    idx: list[Any] = [slice(None)] * vol.ndim
    idx[axis] = index
    return np.rot90(vol[tuple(idx)])  # a view: np.take would copy the whole (non C-ordered) volume per call


def put_slice(vol: np.ndarray, axis: int, index: int, image: np.ndarray) -> None:
    """The inverse of ``take_slice``: write a display-oriented slice back into ``vol``."""
    idx = [slice(None)] * 3
    idx[axis] = index
    vol[tuple(idx)] = np.rot90(image, -1)


def foreground_threshold(values: np.ndarray) -> float | None:
    """``p1 + FOREGROUND_TOLERANCE (p99 - p1)`` of ``values``; None for constant values (nothing stands out)."""
    p1, p99 = np.percentile(values, [1, 99])
    return None if p99 <= p1 else float(p1 + FOREGROUND_TOLERANCE * (p99 - p1))


def foreground_fractions(slices: Sequence[np.ndarray]) -> np.ndarray:
    """Per slice, the share of pixels above ``p1 + FOREGROUND_TOLERANCE (p99 - p1)`` of all slices together."""
    thr = foreground_threshold(np.concatenate([s.ravel() for s in slices]))
    if thr is None:
        return np.zeros(len(slices))
    return np.array([float((s > thr).mean()) for s in slices])


@dataclass(frozen=True)
class NiftiSlice:
    """One slice of a NIfTI volume (and of its label volume)."""

    path: str
    axis: int
    index: int
    mask_path: str | None = None
    name: str = ""

    def pixels(self) -> Pixels:
        return Pixels(np.ascontiguousarray(take_slice(nifti_volume(self.path, self.name), self.axis, self.index)))

    def load_mask(self) -> np.ndarray | None:
        if self.mask_path is None:
            return None
        m = take_slice(nifti_volume(self.mask_path, f"{self.name}: mask"), self.axis, self.index)
        return (m > 0).astype(np.uint8)

    def key(self) -> str:
        return f"nifti|{file_digest(self.path)}|{self.axis}|{self.index}"


def nifti_slices(path: str, name: str, mask_path: str | None = None, axis: str = "z"
                 ) -> tuple[list[tuple[str, NiftiSlice, bool | None]], int]:
    """The non-empty slices of a NIfTI volume: ``[(sample name, source, has anomaly or None), ...]`` and the
    number of empty slices skipped. ``has anomaly`` is None without a mask volume.

    Raises:
        DataError: naming ``name``: unreadable, 4-D, too large, or a mask volume of another shape.
    """
    if axis not in AXES:
        raise ValueError(f"slice axis {axis!r}: use one of {', '.join(AXES)}")
    ax = AXES[axis]
    vol = nifti_volume(path, name)
    mask = None
    if mask_path is not None:
        mask = nifti_volume(mask_path, f"{name}: mask {Path(mask_path).name}")
        if mask.shape != vol.shape:
            raise DataError(f"{name}: mask volume {Path(mask_path).name} is {'x'.join(map(str, mask.shape))} "
                            f"voxels but the image is {'x'.join(map(str, vol.shape))} (after reorientation to RAS)")
    n = vol.shape[ax]
    others = tuple(a for a in range(vol.ndim) if a != ax)
    lesion = [bool(v) for v in (mask > 0).any(axis=others)] if mask is not None else [None] * n
    if n > 1:  # one pass over the volume (the percentiles copy it once), never a copy per slice
        thr = foreground_threshold(vol)
        frac = np.zeros(n) if thr is None else (vol > thr).mean(axis=others)
    else:
        frac = np.ones(1)
    keep = [k for k in range(n) if frac[k] >= MIN_FOREGROUND or lesion[k]]
    if not keep:
        raise DataError(f"{name}: all {n} slices along {axis} are empty (constant intensity, or no slice with "
                        f"{MIN_FOREGROUND:.0%} of its pixels above the background)")
    width = max(3, len(str(n - 1)))
    names = {k: f"{name}#{axis}{k:0{width}d}" for k in keep}
    return [(names[k], NiftiSlice(path, ax, k, mask_path, names[k]), lesion[k]) for k in keep], n - len(keep)


# ---- DICOM ------------------------------------------------------------------------------------------------
def phi_values(ds) -> list[str]:
    """Every identifying value in a pydicom dataset (``PHI_KEYWORDS`` and the PN/DA/DT/TM/UI values), for
    scrubbing messages. Sequences are searched too."""
    out: list[str] = []
    for elem in ds.iterall():
        if elem.keyword in PHI_KEYWORDS or elem.VR in PHI_VRS:
            vals = elem.value if elem.VM > 1 else [elem.value]
            out += [str(v) for v in vals if v not in (None, "") and elem.VR != "SQ"]
            if elem.VR == "PN":  # names also appear with their components split
                out += [p for v in vals for p in str(v).replace("^", " ").split() if len(p) > 2]
    return out


@functools.lru_cache(maxsize=1)
def _pydicom():
    """pydicom, set once so that it never quotes an attribute value (which may identify a patient): its
    logger is silenced, reading does not validate values (a validation warning quotes the value), and its
    warnings are ignored. Process-wide on purpose: the reader must not depend on a caller's log setup."""
    import pydicom

    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    return pydicom


def _dcmread(path: str, name: str, header_only: bool):
    _check_size(path, name)
    try:
        with warnings.catch_warnings():  # warnings raised from outside pydicom's modules, too
            warnings.simplefilter("ignore")
            ds = _pydicom().dcmread(path, stop_before_pixels=header_only)
            for _ in ds.iterall():  # convert every value now, quietly
                pass
            return ds
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except Exception as e:  # noqa: BLE001 - InvalidDicomError and decoder errors of damaged files
        raise DataError(f"{name}: not a readable DICOM file ({type(e).__name__})") from None


def strip_phi(ds) -> None:
    """Delete every identifying element of a pydicom dataset in place (``PHI_KEYWORDS`` and every PN, DA, DT,
    TM and UI value, in sequences too; the file meta keeps only what decoding needs)."""
    def drop(d, elem) -> None:
        if elem.keyword in PHI_KEYWORDS or elem.VR in PHI_VRS:
            del d[elem.tag]

    ds.walk(drop)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        del meta.MediaStorageSOPInstanceUID


@functools.lru_cache(maxsize=2)
def _dataset_cached(path: str, mtime: int, size: int):
    """A whole DICOM file without its identifying elements (frames of one file decode from one read)."""
    ds = _dcmread(path, "", header_only=False)
    strip_phi(ds)
    return ds


def _functional_item(ds, frame: int, sequence: str):
    """The item of ``sequence`` for ``frame`` in an enhanced multi-frame file: per-frame first, then shared."""
    groups = []
    if "PerFrameFunctionalGroupsSequence" in ds and frame < len(ds.PerFrameFunctionalGroupsSequence):
        groups.append(ds.PerFrameFunctionalGroupsSequence[frame])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for g in groups:
        items = g.get(sequence)
        if items:
            return items[0]
    return None


def _first(v) -> float:
    return float(v[0]) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else float(v)


def modality_units(arr: np.ndarray, ds, frame: int) -> np.ndarray:
    """Stored values -> modality units (float32): the frame's Pixel Value Transformation, the file's Rescale
    Slope/Intercept, or its Modality LUT Sequence; stored values when there is none."""
    item = _functional_item(ds, frame, "PixelValueTransformationSequence")
    src = item if item is not None and "RescaleSlope" in item else ds
    if "RescaleSlope" in src or "RescaleIntercept" in src:
        slope = float(src.get("RescaleSlope", 1) or 1)
        return (arr.astype(np.float64) * slope + float(src.get("RescaleIntercept", 0) or 0)).astype(np.float32)
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return apply_modality_lut(arr, ds).astype(np.float32)
    return arr.astype(np.float32)


def file_voi(ds, frame: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """The file's VOI for ``frame`` as a map from modality units to [0, 1]: Window Center/Width (per frame in
    the Frame VOI LUT functional group, else the file's first window), else a VOI LUT Sequence; None if none."""
    item = _functional_item(ds, frame, "FrameVOILUTSequence")
    src = item if item is not None and "WindowCenter" in item else ds
    if src.get("WindowCenter") is not None and src.get("WindowWidth") is not None:
        return voi_window(_first(src.WindowCenter), _first(src.WindowWidth), src.get("VOILUTFunction", "LINEAR"))
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        from pydicom.pixels import apply_voi

        lut = ds.VOILUTSequence[0]
        top = float(2 ** int(lut.LUTDescriptor[2]) - 1)
        return lambda x: np.clip(apply_voi(x.astype(np.float64), ds, 0) / top, 0, 1)
    return None


def _decoder_check(ds, name: str) -> None:
    """A DataError naming the transfer syntax when no installed pixel handler decodes it."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    ts = UID(ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else "")
    if not ts or not ts.is_compressed:
        return
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DataError(f"{name}: {ts.name}: pydicom cannot decode this transfer syntax") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a pixel data plugin"
        raise DataError(f"{name}: {ts.name}: no pixel handler installed (install one of: {needs})")


def _frame_array(ds, frame: int, name: str) -> np.ndarray:
    from pydicom.pixels import pixel_array

    _decoder_check(ds, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pixel_array(ds, index=frame if int(ds.get("NumberOfFrames", 1) or 1) > 1 else None)
    except Exception as e:  # noqa: BLE001 - decoder errors
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        what = f"{ts.name}: " if ts is not None else ""
        raise DataError(scrub(f"{name}: {what}cannot decode the pixel data ({_reason(e)})", phi_values(ds))) from None


def dicom_pixels(ds, frame: int, name: str) -> Pixels:
    """One frame of a pydicom dataset as ``Pixels`` (modality units, the file's VOI, MONOCHROME1)."""
    arr = _frame_array(ds, frame, name)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour: pydicom converted YBR to RGB; scale to 8 bits by the stored bit depth
        top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
        return Pixels((arr.astype(np.float64) / top * 255).round().clip(0, 255).astype(np.uint8))
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds).astype(np.float64)
        return Pixels((rgb / (65535.0 if rgb.max() > 255 else 255.0) * 255).round().astype(np.uint8))
    unit = "HU" if str(ds.get("Modality", "")).upper() == "CT" else ""  # CT's modality LUT gives Hounsfield units
    return Pixels(finite_or_background(modality_units(arr, ds, frame), name), file_voi(ds, frame),
                  photometric == "MONOCHROME1", unit)


def finite_or_background(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` with NaN / infinite values set to its lowest finite value (float pixel data may mark the background
    so); DataError naming ``name`` when no value is finite."""
    finite = np.isfinite(a)
    if finite.all():
        return a
    if not finite.any():
        raise DataError(f"{name}: no finite intensity (all {a.size} values are NaN or infinite)")
    a = a.copy()
    a[~finite] = a[finite].min()
    return a


@dataclass(frozen=True)
class DicomFrame:
    """One frame of a DICOM file. ``name`` is the sample name (series/instance), never the file name.

    ``seg`` lists the DICOM SEG frames that segment this frame, as (SEG file, SEG frame index); ``finding`` is
    None when no SEG covers the frame's series, else whether any of its segments marks a pixel (a frame of a
    covered series that no SEG frame references is normal: its mask is empty)."""

    path: str
    frame: int = 0
    name: str = ""
    seg: tuple[tuple[str, int], ...] = ()
    finding: bool | None = None

    def pixels(self) -> Pixels:
        return dicom_pixels(_cached(_dataset_cached, self.path, self.name), self.frame, self.name)

    def load_mask(self) -> np.ndarray | None:
        """(H, W) uint8 in {0, 1}: the union of the frame's SEG segments; None without a SEG."""
        if self.finding is None:
            return None
        shape = self.pixels().values.shape[:2]
        m = np.zeros(shape, np.uint8)
        for path, f in self.seg:
            a = seg_frame(path, f, f"{self.name}: segmentation")
            if a.shape != shape:
                raise DataError(f"{self.name}: its segmentation frame is {a.shape[1]}x{a.shape[0]} px but the image "
                                f"is {shape[1]}x{shape[0]} px")
            m |= a
        return m

    def key(self) -> str:
        return f"dicom|{file_digest(self.path)}|{self.frame}"


SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage


def is_seg(ds) -> bool:
    """A DICOM Segmentation object (a mask, not an image)."""
    return str(ds.get("Modality", "")).upper() == "SEG" or str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS


def seg_frame(path: str, frame: int, name: str) -> np.ndarray:
    """Frame ``frame`` of a DICOM SEG as (H, W) uint8 in {0, 1}: BINARY segments as they are, FRACTIONAL ones
    where the probability or occupancy is at least one half."""
    ds = _cached(_dataset_cached, path, name)
    a = _frame_array(ds, frame, name)
    if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        return (a >= float(ds.get("MaximumFractionalValue", 255) or 255) / 2).astype(np.uint8)
    return (a > 0).astype(np.uint8)


def _seg_sources(ds, label: str) -> list[tuple[str, int | None]]:
    """Per frame of a SEG: (SOP Instance UID of the source image, its frame number or None), from each
    frame's Derivation Image Sequence. The UIDs identify patients: they stay in the reader's memory."""
    out = []
    for f, item in enumerate(ds.get("PerFrameFunctionalGroupsSequence") or []):
        ref = None
        for d in item.get("DerivationImageSequence") or []:
            for src in d.get("SourceImageSequence") or []:
                if src.get("ReferencedSOPInstanceUID"):
                    fr = src.get("ReferencedFrameNumber")
                    ref = (str(src.ReferencedSOPInstanceUID), _int(_first(fr), 1) if fr is not None else None)
        if ref is None:
            raise DataError(f"{label}: DICOM SEG frame {f + 1} names no source image (Derivation Image Sequence "
                            "with a Referenced SOP Instance UID): its images cannot be paired with it")
        out.append(ref)
    if not out:
        raise DataError(f"{label}: a DICOM SEG without per-frame functional groups: its frames cannot be paired "
                        "with their images")
    return out


def _slice_position(ds) -> float | None:
    """Position along the slice normal (Image Orientation/Position (Patient)), or None."""
    try:
        o = np.array([float(v) for v in ds.ImageOrientationPatient])
        p = np.array([float(v) for v in ds.ImagePositionPatient])
    except (AttributeError, TypeError, ValueError):
        return None
    return float(np.dot(np.cross(o[:3], o[3:]), p)) if o.size == 6 and p.size == 3 else None


def _int(v, default: int) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def dicom_slices(paths: Sequence[str], where: str, on_error: Callable[[DataError], None]
                 ) -> tuple[list[tuple[str, DicomFrame, str | None]], int]:
    """The DICOM files of one folder (or upload) as samples: ``[(name, source, patient key), ...]`` and the
    number of empty slices skipped.

    Files are grouped by series, each series sorted along its slice normal (else by Instance Number), and
    every frame becomes a sample named ``<where>series<N>/instance<NNNN>[/frame<NNN>]``. A bad file is
    reported to ``on_error`` (which raises or records it) as ``<where>DICOM file <k> of <n>``.

    DICOM SEG files among ``paths`` are masks, not images: each SEG frame is paired with the image frame its
    Derivation Image Sequence references by SOP Instance UID (and frame number), and the frames of every
    series a SEG covers get ``seg`` and ``finding`` (see ``DicomFrame``). The UIDs never leave this function.
    """
    heads, segs = [], []
    for k, p in enumerate(paths):
        label = f"{where}DICOM file {k + 1} of {len(paths)} (in file-name order)"
        try:
            ds = _dcmread(p, label, header_only=True)
            if is_seg(ds):
                segs.append((p, _seg_sources(ds, label)))
                continue
            if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds \
                    and not ds.get("Rows"):
                raise DataError(f"{label}: holds no image (a {ds.get('Modality', 'non-image')} object)")
            heads.append((p, ds, label))
        except DataError as e:
            on_error(e)
    seg_of: dict[tuple[str, int], list[tuple[str, int]]] = {}  # (source UID, frame index) -> SEG frames
    for seg_path, refs in segs:
        for f, (uid, fr) in enumerate(refs):
            seg_of.setdefault((uid, (fr or 1) - 1), []).append((seg_path, f))
    matched = {(str(ds.get("SOPInstanceUID", "")), f) for _, ds, _ in heads
               for f in range(max(1, _int(ds.get("NumberOfFrames"), 1)))} & set(seg_of)
    for k, (seg_path, refs) in enumerate(segs):
        if not any((uid, (fr or 1) - 1) in matched for uid, fr in refs):
            on_error(DataError(f"{where}DICOM SEG {k + 1} of {len(segs)}: none of the {len(refs)} images it segments "
                               "is among the DICOM files given with it"))
    series: dict[str, list] = {}
    for h in heads:
        series.setdefault(str(h[1].get("SeriesInstanceUID", "")), []).append(h)
    out: list[tuple[str, DicomFrame, str | None]] = []
    empty = 0
    used: set[str] = set()
    for uid in sorted(series, key=lambda u: (_int(series[u][0][1].get("SeriesNumber"), 0), hashlib.sha256(u.encode()).hexdigest())):
        items = series[uid]
        pos = [_slice_position(ds) for _, ds, _ in items]
        if all(v is not None for v in pos) and len(set(pos)) == len(pos):
            items = [h for _, h in sorted(zip(pos, items), key=lambda t: t[0])]
        else:
            items = sorted(items, key=lambda h: _int(h[1].get("InstanceNumber"), 0))
        number = _int(items[0][1].get("SeriesNumber"), len(used) + 1)
        sname, k = f"series{number}", 2
        while sname in used:
            sname, k = f"series{number}-{k}", k + 1
        used.add(sname)
        frames: list[tuple[str, DicomFrame, str | None]] = []
        covered = any((str(ds.get("SOPInstanceUID", "")), f) in matched for _, ds, _ in items
                      for f in range(max(1, _int(ds.get("NumberOfFrames"), 1))))
        for i, (p, ds, label) in enumerate(items):
            n_frames = max(1, _int(ds.get("NumberOfFrames"), 1))
            inst = f"{sname}/instance{_int(ds.get('InstanceNumber'), i + 1):04d}"
            pid = str(ds.get("PatientID", "") or "").strip()
            uid = str(ds.get("SOPInstanceUID", ""))
            for f in range(n_frames):
                name = f"{where}{inst}" + (f"/frame{f:03d}" if n_frames > 1 else "")
                seg = tuple(seg_of.get((uid, f), ()))
                finding = None
                if covered:
                    try:
                        finding = any(seg_frame(sp, sf, f"{label}: its DICOM SEG").any() for sp, sf in seg)
                    except DataError as e:
                        on_error(e)
                        continue
                frames.append((name, DicomFrame(p, f, name, seg, finding), patient_key(pid) if pid else None))
        kept, skipped = _drop_empty_frames(frames, on_error)
        out += kept
        empty += skipped
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):  # two files with one instance number: number them in order
        seen: dict[str, int] = {}
        renamed = []
        for n, src, pk in out:
            seen[n] = seen.get(n, 0) + 1
            n2 = n if seen[n] == 1 else f"{n}-{seen[n]}"
            renamed.append((n2, replace(src, name=n2), pk))
        out = renamed
    return out, empty


def _drop_empty_frames(frames, on_error):
    """Decode every frame once (this is the validation), then drop the empty ones by the slice rule."""
    ok, subs = [], []
    for item in frames:
        try:
            px = item[1].pixels()
        except DataError as e:
            on_error(e)
            continue
        ok.append(item)
        subs.append(None if px.colour else px.values[::4, ::4])
    grey = [s for s in subs if s is not None]
    if len(grey) < 2:
        return ok, 0
    frac = iter(foreground_fractions(grey))
    # (next(frac) first: every grey frame consumes its fraction, findings too)
    keep = [item for item, s in zip(ok, subs) if s is None or next(frac) >= MIN_FOREGROUND or item[1].finding]
    return keep, len(ok) - len(keep)


# ---- the split guard ---------------------------------------------------------------------------------------
def check_patients(train: Iterable[Any], test: Iterable[Any], where: str, warn: list[str]) -> None:
    """No patient in both train and test.

    Samples carry ``patient`` (a salted hash of the DICOM Patient ID) or None. When some train AND test
    samples share a patient: DataError with the count (never the ids). When volumes or DICOM files come
    without patient ids, a warning is added to ``warn``.

    Raises:
        DataError: patients found in both splits.
    """
    train, test = list(train), list(test)
    both = {s.patient for s in train if s.patient} & {s.patient for s in test if s.patient}
    if both:
        raise DataError(f"{where}: {len(both)} patient{'s' if len(both) > 1 else ''} appear in both train and "
                        "test (by DICOM Patient ID); put each patient's images in one split only, or the test "
                        "measures memory instead of detection")
    unknown = sum(1 for s in train + test if s.source is not None and not s.patient)
    if unknown and test:
        warn.append(f"{where}: patient ids unknown for {unknown} slices (NIfTI files and DICOM files without "
                    "Patient ID): make sure no patient is in both train and test")


# ---- geometry and export --------------------------------------------------------------------------------
def to_input_geometry(a: np.ndarray, shape: tuple[int, int], resize: int, crop: int) -> np.ndarray:
    """A (crop, crop) map in the network's geometry back onto an (H, W) input image: undo the center crop
    (outside the crop is 0) and the resize of the shorter side to ``resize`` (bilinear)."""
    h, w = shape
    s = resize / min(w, h)
    rw, rh = max(crop, round(w * s)), max(crop, round(h * s))
    full = np.zeros((rh, rw), np.float32)
    top, left = (rh - crop) // 2, (rw - crop) // 2
    full[top:top + crop, left:left + crop] = a
    return np.asarray(Image.fromarray(full).resize((w, h), Image.BILINEAR), dtype=np.float32)


def _shape_check(k: Any, a: np.ndarray, want: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(a, np.float32)
    if a.shape != want:
        raise ValueError(f"slice {k}: shape {a.shape}, expected {want} (the slice's display shape)")
    return a


def _nifti_of_reference(slices: dict[int, np.ndarray], reference: str | os.PathLike, axis: str):
    """(data, affine, (qform code, sform code), units) for slices of a NIfTI reference, in its axis order."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    ref = _load_nifti(str(reference), Path(reference).name)
    canon = np.zeros(_canonical(ref).shape, np.float32)
    ax = AXES[axis]
    for k, a in slices.items():
        put_slice(canon, ax, k, _shape_check(k, a, take_slice(canon, ax, k).shape))
    # canonical RAS -> the reference's own axis order and directions
    data = apply_orientation(canon, ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(ref.affine)))
    data = data.reshape(ref.shape[:3]) if len(ref.shape) >= 3 else data[..., 0]
    codes = (int(ref.header["qform_code"]) or 1, int(ref.header["sform_code"]) or 1)
    return data, ref.affine, codes, ref.header.get_xyzt_units()


def _plane(ds, frame: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(position, row direction, column direction, (row, column) spacing) of a frame, LPS millimetres, from
    the frame's functional groups or the file's Image Position/Orientation (Patient) and Pixel Spacing."""
    got = []
    for seq, key in (("PlanePositionSequence", "ImagePositionPatient"),
                     ("PlaneOrientationSequence", "ImageOrientationPatient"), ("PixelMeasuresSequence", "PixelSpacing")):
        item = _functional_item(ds, frame, seq)
        v = (item if item is not None and key in item else ds).get(key)
        if v is None:
            raise DataError(f"{name}: no {key}: the slice geometry is unknown, so no aligned volume can be written")
        got.append(np.array([float(x) for x in v]))
    pos, ori, spacing = got
    return pos, ori[:3], ori[3:], spacing


def _nifti_of_series(slices: dict[int, np.ndarray], frames: Sequence[DicomFrame]):
    """(data, affine, codes, units) for slices of a DICOM series: voxel (i, j, k) = column i, row j, slice k; slices
    the reader skipped (empty) come back as zeros where they lie, at the series' smallest slice step."""
    geo = [_plane(_dcmread(f.path, f.name, header_only=True), f.frame, f.name) for f in frames]
    pos0, row_dir, col_dir, (d_row, d_col) = geo[0]
    normal = np.cross(row_dir, col_dir)
    z = np.array([float(np.dot(normal, g[0])) for g in geo])
    steps = np.diff(z)[np.diff(z) > 1e-6]  # the reader sorted the series by z
    step = float(steps.min()) if steps.size else 1.0
    index = np.round((z - z[0]) / step).astype(int)
    if len(set(index.tolist())) != len(index) or index.min() < 0:
        raise DataError(f"{frames[0].name}: slices are not ordered along one axis: export the series as sorted by "
                        "the reader")
    first = frames[0].pixels().values.shape
    data = np.zeros((first[1], first[0], int(index.max()) + 1), np.float32)  # (columns, rows, slices)
    for k, a in slices.items():
        data[:, :, index[k]] = _shape_check(k, a, first).T
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * d_col, col_dir * d_row, normal * step, pos0
    return data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, (1, 1), ("mm", "sec")  # DICOM's LPS -> NIfTI's RAS


def export_nifti(slices: dict[int, np.ndarray], reference: str | os.PathLike | Sequence[DicomFrame],
                 axis: str = "z", path: str | os.PathLike | None = None) -> bytes | Path:
    """Per-slice maps or masks as a NIfTI volume aligned with the input.

    Args:
        slices: slice index -> (H, W) array in the display orientation of the samples and the slice's own
            size (see ``to_input_geometry`` for maps in the network's geometry); missing slices are 0.
        reference: the NIfTI file the slices came from (same shape and affine as it; ``slices`` are indexed
            by slice number along ``axis``), or the ``source`` of each sample of one DICOM series in the
            reader's order (``slices`` indexed by position in that list; the affine comes from the series'
            Image Position/Orientation (Patient) and Pixel Spacing).
        axis: the slicing axis used when reading a NIfTI file.
        path: where to write (``.nii`` or ``.nii.gz``); None returns the bytes of a ``.nii.gz``.

    Only geometry is written (affine, qform/sform codes, units); none of the reference's text fields
    (description, auxiliary file, intent name), which tools fill with scan details.
    """
    import nibabel as nib

    if isinstance(reference, (str, os.PathLike)):
        data, affine, codes, units = _nifti_of_reference(slices, reference, axis)
    else:
        data, affine, codes, units = _nifti_of_series(slices, list(reference))
    out = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    out.set_qform(affine, code=codes[0])
    out.set_sform(affine, code=codes[1])
    out.header.set_xyzt_units(*units)
    if path is not None:
        nib.save(out, str(path))
        return Path(path)
    return gzip.compress(out.to_bytes(), mtime=0)


def export_png(a: np.ndarray, vmax: float | None = None, path: str | os.PathLike | None = None) -> bytes | Path:
    """One slice as an 8-bit grey PNG without metadata: masks (bool / 0-1) as 0/255, maps scaled from 0 to
    ``vmax`` (default: the map's maximum; for calibrated maps 1.0 is the normal bound, so 2.0 is a good
    choice)."""
    a = np.asarray(a)
    if a.dtype == bool or (a.size and a.min() >= 0 and a.max() <= 1 and vmax is None and np.isin(a, (0, 1)).all()):
        g = (a > 0).astype(np.uint8) * 255
    else:
        top = float(vmax if vmax is not None else max(float(a.max()), 1e-12))
        g = (np.clip(a.astype(np.float64) / top, 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, format="PNG")
    if path is not None:
        Path(path).write_bytes(buf.getvalue())
        return Path(path)
    return buf.getvalue()
