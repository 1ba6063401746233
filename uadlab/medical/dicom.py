"""DICOM: modality LUT, VOI window, MONOCHROME1, multi-frame and enhanced files, SEG objects as masks, a
series sorted along the slice normal; identifying attributes never leave the reader (``strip_phi``, the
salted Patient ID hash, the split guard ``check_patients``).
"""
from __future__ import annotations

import functools
import hashlib
import secrets
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import DataError, short_reason as _reason
from ..tokens import scrub
from .scans import MIN_FOREGROUND, _cached, _check_size, _int, _pydicom, file_digest, foreground_fractions
from .window import Pixels, voi_window


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
