"""Image sets: a folder, the MVTec AD layout, uploaded files, a zip, a Hugging Face dataset.

Everything becomes a list of ``Sample`` (lazy: pixels are read when needed) inside a ``Dataset`` with a
``train`` split (normal images) and a ``test`` split (labelled when labels exist).

Rules:

- Images of any mode become 8-bit RGB: palette and grey as their colours, transparent pixels black,
  16-bit images by the full 16-bit range (value / 257, so two images keep their brightness relation),
  32-bit integer and float images by their own range. Files over ``MAX_IMAGE_BYTES``, images over
  ``MAX_IMAGE_PIXELS`` (decompression bombs included) and images under ``MIN_IMAGE_SIDE`` px are refused.
- Masks: a pixel is anomalous when its value is above half of white (> 127 for 8-bit masks such as
  MVTec's 0/255, > 32767 for 16-bit ones); masks that only hold 0 and 1 use > 0. Colour masks use their
  brightest channel; a mask must have its image's size.
- Labels come from class NAMES, never class indices: ``good``, ``normal``, ``ok`` (and ``0``, ``false``,
  ``negative``) are normal (0), any other name is anomalous (1). A dataset with no normal class is refused.
- Only files with an image extension are read from folders; hidden files, ``__MACOSX`` and links that lead
  out of the dataset are not. An MVTec-layout folder (``train``, ``test`` or ``ground_truth`` inside) needs
  ``train/good``.
- DICOM (``.dcm``, or no suffix with the DICM marker) and NIfTI (``.nii``, ``.nii.gz``) files become one
  sample per slice or frame, read by ``uadlab.medical`` (intensities, windows, empty slices, patient safety).
  A NIfTI test volume's mask is ``ground_truth/<defect>/<name>_mask.nii.gz``; its slices are anomalous where
  the mask marks something and normal elsewhere (without a mask, every slice of a defect folder is anomalous).

Bad files raise a ``DataError`` that names the file (relative to the dataset) and the problem, or with
``skip_bad`` are skipped and listed in ``Dataset.warnings`` with the reason.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import medical, tokens
from .errors import DataError, short_reason as _reason
from .progress import Progress, ProgressFn, Stages
from .tokens import scrub

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
NORMAL_NAMES = {"good", "normal", "ok", "0", "false", "negative"}
MVTEC_DIRS = ("train", "test", "ground_truth")
MAX_IMAGE_BYTES = 50_000_000  # one image file
MAX_IMAGE_PIXELS = 40_000_000  # width x height of one image (PIL's own bomb limit is 89 M)
MIN_IMAGE_SIDE = 8

__all__ = ["DataError", "Dataset", "Sample", "load_data", "load_files", "load_folder", "load_hf", "load_mvtec",
           "load_zip", "open_image", "open_mask", "safe_extract_zip", "validate"]


def is_normal_name(name: Any) -> bool:
    """True for a class name that means normal (``good``, ``normal``, ``ok`` ..., any case)."""
    return str(name).strip().lower() in NORMAL_NAMES


def display_name(path: str | os.PathLike) -> str:
    """A (relative) path as printable text: bytes that are not UTF-8 become ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _read(src: str | os.PathLike | bytes | Image.Image, name: str) -> Image.Image:
    """Open and decode an image within the size limits; any problem is a DataError naming ``name``."""
    try:
        if isinstance(src, Image.Image):
            img = src
        else:
            if isinstance(src, bytes):
                size, fp = len(src), io.BytesIO(src)
            else:
                if os.path.isdir(src):
                    raise DataError(f"{name}: is a folder, not an image file")
                size, fp = os.path.getsize(src), src
            if size == 0:
                raise DataError(f"{name}: file is empty")
            if size > MAX_IMAGE_BYTES:
                raise DataError(f"{name}: file is {size / 1e6:.0f} MB, more than the limit of "
                                f"{MAX_IMAGE_BYTES / 1e6:.0f} MB")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
                img = Image.open(fp)
        if img.width * img.height > MAX_IMAGE_PIXELS:
            img.close()
            raise DataError(f"{name}: image is {img.width}x{img.height} px, more than the limit of "
                            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels")
        img.load()
        return img
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except Image.DecompressionBombError:
        raise DataError(f"{name}: image declares more than {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels "
                        "(a decompression bomb)") from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image (unrecognised format)") from None
    except Exception as e:  # noqa: BLE001 - decoders of damaged files raise all kinds of errors
        raise DataError(f"{name}: corrupt or truncated image ({_reason(e)})") from None


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Any PIL mode -> 8-bit RGB (see the module docstring for the rules)."""
    if img.mode.startswith("I;16"):  # full 16-bit range: 65535 -> 255
        a = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(a.round().clip(0, 255).astype(np.uint8))
    elif img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)
        img = Image.fromarray((a * 255).round().astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))  # transparent pixels become black
        img = Image.alpha_composite(bg, img.convert("RGBA"))
    img = img.convert("RGB")
    if min(img.width, img.height) < MIN_IMAGE_SIDE:
        raise DataError(f"{name}: image is too small ({img.width}x{img.height} px, at least {MIN_IMAGE_SIDE} px "
                        "per side)")
    return img


def _name_of(src: Any, default: str) -> str:
    return display_name(Path(src).name) if isinstance(src, (str, os.PathLike)) else default


def open_image(src: str | os.PathLike | bytes | Image.Image, name: str | None = None) -> Image.Image:
    """Open a path, bytes or PIL image as RGB; raise DataError naming the file (its base name by default)."""
    name = name or _name_of(src, "image")
    return to_rgb(_read(src, name), name)


def binarize_mask(a: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) mask values -> (H, W) uint8 in {0, 1} by the rule of the module docstring."""
    a = np.asarray(a)
    if a.ndim == 3:
        a = a[..., :3].max(axis=-1)
    if a.dtype == bool or a.size == 0 or a.max() <= 1:
        return (a > 0).astype(np.uint8)
    return (a > (32767 if a.dtype == np.uint16 or a.max() > 255 else 127)).astype(np.uint8)


def open_mask(src: str | os.PathLike | np.ndarray | Image.Image, name: str | None = None) -> np.ndarray:
    """A mask file, image or array -> (H, W) uint8 in {0, 1} (see ``binarize_mask``)."""
    name = name or _name_of(src, "mask")
    if isinstance(src, np.ndarray):
        a = src
    else:
        img = _read(src, name)
        if img.mode in ("P", "RGBA", "PA"):
            img = img.convert("RGB")  # palette indices are not intensities; alpha is not a defect
        elif img.mode == "LA":
            img = img.convert("L")
        a = np.asarray(img)
    if a.ndim not in (2, 3) or min(a.shape[:2], default=0) == 0:
        raise DataError(f"{name}: not a mask (array of shape {tuple(a.shape)})")
    return binarize_mask(a)


def _intensities(img: Image.Image) -> "medical.Pixels | None":
    """The grey values of a 16-bit, 32-bit or float image as float32; None for 8-bit and colour modes."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return medical.Pixels(np.asarray(img, dtype=np.float32))
    return None


@dataclass
class Sample:
    """One image, loaded lazily.

    Attributes:
        name: display name (path relative to the dataset, or upload name).
        path: file path, or None for in-memory images.
        image: in-memory image (Hugging Face datasets, uploads), or None.
        label: 0 normal, 1 anomalous, -1 unknown.
        mask_path / mask: ground-truth mask (see ``binarize_mask``), if any.
        category, defect: MVTec-style category and defect type.
        source: the reader of a DICOM frame or NIfTI slice (``uadlab.medical``), None for image files.
        window: the intensity window a run applies (``medical.Window``); None renders as ``auto``.
        patient: a salted hash of the DICOM Patient ID (for the split guard), or None.
    """

    name: str
    path: str | None = None
    image: Image.Image | None = None
    label: int = -1
    mask_path: str | None = None
    mask: np.ndarray | None = None
    category: str = "default"
    defect: str = ""
    source: Any = field(default=None, repr=False)
    window: Any = field(default=None, repr=False)
    patient: str | None = field(default=None, repr=False)

    def pixels(self) -> "medical.Pixels | None":
        """Intensities before display: DICOM/NIfTI in modality units, 16-bit and float grey images as stored;
        None for 8-bit and colour images (their values already are display values)."""
        if self.source is not None:
            return self.source.pixels()
        return _intensities(_read(self.image if self.image is not None else self.path, self.name))

    def load(self) -> Image.Image:
        """8-bit RGB: a DICOM/NIfTI slice or a 16-bit/float grey image through the window (``auto`` without
        one), any other image by the rules of the module docstring."""
        if self.source is not None:
            return to_rgb((self.window or medical.Window()).render(self.source.pixels()), self.name)
        img = _read(self.image if self.image is not None else self.path, self.name)
        px = _intensities(img) if self.window is not None else None
        return to_rgb(img if px is None else self.window.render(px), self.name)

    def load_mask(self) -> np.ndarray | None:
        """(H, W) uint8 mask, or None. An anomalous image without a mask file is None."""
        if self.source is not None:
            return self.source.load_mask()
        if self.mask is not None:
            return open_mask(self.mask, f"{self.name}: mask")
        if self.mask_path is not None:
            return open_mask(self.mask_path, f"{self.name}: mask {display_name(Path(self.mask_path).name)}")
        return None

    def content_key(self) -> str:
        """Hash of the pixels' source and of the window that renders them (another window: other features)."""
        h = hashlib.sha256()
        if self.window is not None:
            h.update(self.window.key().encode())
        if self.source is not None:
            h.update(self.source.key().encode())
        elif self.image is not None:
            img = self.image
            h.update(f"{img.mode}{img.size}".encode())
            h.update(img.tobytes())
        else:
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()[:32]


@dataclass
class Dataset:
    """Train (normal) and test samples, possibly of several categories.

    Attributes:
        warnings: one line per skipped file: the file and the reason.
        owner: what keeps the files alive (the temporary folder of an unpacked zip): they are removed
            when the last dataset holding it is garbage collected, or at exit.
    """

    name: str
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    owner: Any = field(default=None, repr=False, compare=False)
    empty_slices: dict[str, int] = field(default_factory=dict)  # per category: slices skipped as background

    @property
    def categories(self) -> list[str]:
        return sorted({s.category for s in self.train + self.test})

    def category(self, cat: str) -> "Dataset":
        if cat not in self.categories:
            raise KeyError(f"{self.name}: no category {cat!r} (have {self.categories})")
        return Dataset(f"{self.name}/{cat}", [s for s in self.train if s.category == cat],
                       [s for s in self.test if s.category == cat], list(self.warnings), self.owner,
                       {cat: self.empty_slices.get(cat, 0)})

    @property
    def has_masks(self) -> bool:
        anomalous = [s for s in self.test if s.label == 1]
        return bool(anomalous) and all(s.mask is not None or s.mask_path is not None for s in anomalous)

    def summary(self) -> dict:
        return {"name": self.name, "categories": self.categories, "train": len(self.train),
                "test_normal": sum(s.label == 0 for s in self.test),
                "test_anomalous": sum(s.label == 1 for s in self.test),
                "test_unlabelled": sum(s.label == -1 for s in self.test),
                "masks": self.has_masks, "skipped": sum(w.startswith("skipped ") for w in self.warnings),
                "empty_slices": sum(self.empty_slices.values())}


def _bad(e: DataError, skip_bad: bool, warn: list[str] | None) -> None:
    """Raise ``e``, or with ``skip_bad`` record it as a skipped file."""
    if not skip_bad:
        raise e
    msg = f"skipped {e}"
    warnings.warn(msg, stacklevel=3)
    if warn is not None:
        warn.append(msg)


def validate(samples: Iterable[Sample], skip_bad: bool = False, warn: list[str] | None = None) -> list[Sample]:
    """Open every image (and mask) once; raise DataError on the first bad one, or skip it with a warning."""
    good = []
    for s in samples:
        try:
            img = s.load()
            m = s.load_mask()
            if m is not None and m.shape != (img.height, img.width):
                mask = display_name(Path(s.mask_path).name) if s.mask_path else "mask"
                raise DataError(f"{s.name}: mask {mask} is {m.shape[1]}x{m.shape[0]} px but the image is "
                                f"{img.width}x{img.height} px")
            good.append(s)
        except DataError as e:
            _bad(e, skip_bad, warn)
    return good


def _image_files(folder: Path, base: Path, skip_bad: bool, warn: list[str]) -> list[Path]:
    """Image, DICOM and NIfTI files under ``folder``, recursively; hidden files and ``__MACOSX`` are ignored.

    A link to a file outside ``base`` is bad input: following it would read other files of the machine.
    """
    real = base.resolve()
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if any(x.startswith(".") or x == "__MACOSX" for x in rel) or not p.is_file() \
                or (p.suffix.lower() not in IMAGE_EXTS and medical.medical_kind(p) is None):
            continue
        if p.is_symlink() and not p.resolve().is_relative_to(real):
            _bad(DataError(f"{display_name(p.relative_to(base))}: a link to a file outside the dataset "
                           "(links are not followed out of a dataset)"), skip_bad, warn)
            continue
        out.append(p)
    return out


def _samples(files: Sequence[Path], rel: Any, where: str, category: str, label: int, skip_bad: bool,
             warn: list[str], empty: dict[str, int], defect: str = "", mask_for: Any = None,
             axis: str = "z") -> list[Sample]:
    """The samples of one folder's files: one per image file (validated here), one per non-empty slice of a
    NIfTI volume, one per non-empty frame of its DICOM files (grouped into series; see ``uadlab.medical``).

    Args:
        rel: file path -> display name; where: the folder's display name with a trailing ``/`` (or "").
        empty: per category, the count of empty slices skipped (updated).
        mask_for: file path -> its mask file or None.
    """
    on_error = lambda e: _bad(e, skip_bad, warn)  # noqa: E731
    out: list[Sample] = []
    dicoms: list[str] = []
    for p in files:
        kind = medical.medical_kind(p)
        mask = mask_for(p) if mask_for else None
        if kind == "dicom":
            dicoms.append(str(p))
        elif kind == "nifti":
            try:
                slices, n_empty = medical.nifti_slices(str(p), rel(p), mask, axis)
            except DataError as e:
                on_error(e)
                continue
            empty[category] = empty.get(category, 0) + n_empty
            out += [Sample(name, str(p), label=label if lesion is None else label * int(lesion), mask_path=mask,
                           category=category, defect=defect, source=src) for name, src, lesion in slices]
        else:
            out += validate([Sample(rel(p), str(p), label=label, mask_path=mask, category=category, defect=defect)],
                            skip_bad, warn)
    if dicoms:
        frames, n_empty = medical.dicom_slices(dicoms, where, on_error)
        empty[category] = empty.get(category, 0) + n_empty
        out += [Sample(name, src.path, label=label, category=category, defect=defect, source=src, patient=pk)
                for name, src, pk in frames]
    return out


def load_folder(path: str | os.PathLike, label: int = 0, category: str | None = None,
                skip_bad: bool = False, axis: str = "z") -> Dataset:
    """A plain folder of images (recursively) as the train split of normal images (``label`` 0); DICOM and
    NIfTI files in it give one sample per slice (``axis`` of NIfTI volumes: x, y or z)."""
    root = Path(path)
    name = display_name(root.name or str(path))
    if not root.is_dir():
        raise DataError(f"{name}: not a folder")
    warn: list[str] = []
    files = _image_files(root, root, skip_bad, warn)
    if not files and not warn:
        empty = not any(root.iterdir())
        raise DataError(f"{name}: the folder is empty" if empty else
                        f"{name}: no image files ({' '.join(sorted(IMAGE_EXTS))}, DICOM, NIfTI) in the folder")
    cat = category or name
    empty: dict[str, int] = {}
    samples = _samples(files, lambda p: display_name(p.relative_to(root)), "", cat, label, skip_bad, warn, empty,
                       axis=axis)
    if not samples:
        raise DataError(f"{name}: no usable images ({len(warn)} bad files skipped)")
    return Dataset(name, train=samples if label == 0 else [], test=[] if label == 0 else samples, warnings=warn,
                   empty_slices=empty)


def _is_mvtec_dir(d: Path) -> bool:
    return any((d / s).is_dir() for s in MVTEC_DIRS)


def _mvtec_category(cat_dir: Path, skip_bad: bool, warn: list[str], empty: dict[str, int],
                    axis: str = "z") -> tuple[list[Sample], list[Sample]]:
    cat = display_name(cat_dir.name)
    good = cat_dir / "train" / "good"
    if not good.is_dir():
        raise DataError(f"train/good missing in {cat}: an MVTec-layout folder needs normal training images in "
                        "train/good")
    base = cat_dir.parent
    rel = lambda p: display_name(p.relative_to(base))  # noqa: E731
    train = _samples(_image_files(good, base, skip_bad, warn), rel, rel(good) + "/", cat, 0, skip_bad, warn, empty,
                     axis=axis)
    test: list[Sample] = []
    test_dir = cat_dir / "test"
    if test_dir.is_dir():
        for d in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            normal = is_normal_name(d.name)

            def mask_for(p: Path, d: Path = d) -> str | None:
                if normal:
                    return None
                nifti = medical.medical_kind(p) == "nifti"
                stem, sufs = (medical.nifti_stem(p), medical.NIFTI_SUFFIXES[::-1]) if nifti else (p.stem, (".png",))
                found = [m for m in (cat_dir / "ground_truth" / d.name / f"{stem}_mask{s}" for s in sufs) if m.is_file()]
                return str(found[0]) if found else None

            test += _samples(_image_files(d, base, skip_bad, warn), rel, rel(d) + "/", cat, 0 if normal else 1,
                             skip_bad, warn, empty, display_name(d.name), mask_for, axis)
    if not train:
        raise DataError(f"{cat}/train/good: no usable images")
    return train, test


def is_mvtec(root: str | os.PathLike) -> bool:
    """True when ``root`` or one of its sub-folders has ``train``, ``test`` or ``ground_truth`` inside."""
    root = Path(root)
    return _is_mvtec_dir(root) or any(_is_mvtec_dir(c) for c in _subdirs(root))


def _subdirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != "__MACOSX") if root.is_dir() else []


def load_mvtec(root: str | os.PathLike, categories: Sequence[str] | None = None, skip_bad: bool = False,
               axis: str = "z") -> Dataset:
    """The MVTec AD layout: ``<cat>/train/good``, ``<cat>/test/<defect>``, ``<cat>/ground_truth/<defect>/*_mask.png``
    (``*_mask.nii.gz`` for NIfTI volumes).

    ``root`` is one category folder or a folder of categories. Test masks are optional; ``train/good`` is not.
    No patient (DICOM Patient ID) may be in both train and test (``medical.check_patients``).
    """
    root = Path(root)
    name = display_name(root.name or str(root))
    if not root.is_dir():
        raise DataError(f"{name}: not a folder")
    cats = [root] if _is_mvtec_dir(root) else [c for c in _subdirs(root) if _is_mvtec_dir(c)]
    if categories:
        known = {display_name(c.name) for c in cats}
        missing = [c for c in categories if c not in known]
        if missing:
            raise DataError(f"{name}: categories {missing} not found (have {sorted(known)})")
        cats = [c for c in cats if display_name(c.name) in categories]
    if not cats:
        raise DataError(f"{name}: no MVTec-style category (expected <category>/train/good/)")
    ds = Dataset(name)
    for c in cats:
        tr, te = _mvtec_category(c, skip_bad, ds.warnings, ds.empty_slices, axis)
        ds.train += tr
        ds.test += te
    medical.check_patients(ds.train, ds.test, name, ds.warnings)
    return ds


def file_stem(path: str | os.PathLike) -> str:
    """A file's name without its suffix (``.nii.gz`` counts as one)."""
    p = Path(path)
    return medical.nifti_stem(p) if medical.medical_kind(p) == "nifti" else p.stem


def load_files(files: Sequence[str | os.PathLike], label: int = 0, category: str = "upload",
               skip_bad: bool = False, masks: dict[str, str] | None = None, axis: str = "z",
               warn: list[str] | None = None) -> list[Sample]:
    """Uploaded files -> validated samples (DICOM files of one upload grouped into series, NIfTI volumes as
    slices). ``masks`` maps an image's file stem (a NIfTI file's name without ``.nii.gz``) to its mask path;
    skipped files are listed with their reason in ``warn``."""
    masks = masks or {}
    return _samples([Path(f) for f in files], lambda p: display_name(p.name), "", category, label, skip_bad,
                    warn if warn is not None else [], {}, mask_for=lambda p: masks.get(file_stem(p)), axis=axis)


MAX_ZIP_BYTES = 2 * 1024**3
MAX_ZIP_FILES = 50_000
MAX_ZIP_RATIO = 200  # uncompressed / compressed of one large member: images hardly compress, bombs do


def safe_extract_zip(zip_path: str | os.PathLike, dest: str | os.PathLike, max_bytes: int = MAX_ZIP_BYTES,
                     max_files: int = MAX_ZIP_FILES, max_ratio: float = MAX_ZIP_RATIO) -> Path:
    """Unpack a zip without path traversal, links, nested archives or zip bombs; return ``dest``.

    Raises:
        DataError: naming the zip (base name) and the offending member.
    """
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    name = display_name(Path(zip_path).name)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{name}: not a valid zip file ({_reason(e)})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_files:
            raise DataError(f"{name}: {len(infos)} members, more than the limit of {max_files}")
        total = sum(i.file_size for i in infos)
        if total > max_bytes:
            raise DataError(f"{name}: unpacks to {total / 1e6:.0f} MB, more than the limit of {max_bytes / 1e6:.0f} MB")
        for info in infos:
            member = info.filename
            target = (dest / member).resolve()
            if member.startswith(("/", "\\")) or (len(member) > 1 and member[1] == ":") \
                    or ".." in Path(member.replace("\\", "/")).parts or not target.is_relative_to(dest):
                raise DataError(f"{name}: unsafe path {member!r} (outside the target folder)")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise DataError(f"{name}: {member!r} is a symbolic link; links are not unpacked")
            if info.file_size > 8 * 1024**2 and info.file_size > max_ratio * max(info.compress_size, 1):
                raise DataError(f"{name}: {member!r} expands {info.file_size / max(info.compress_size, 1):.0f} "
                                f"times (a zip bomb?); the limit is {max_ratio:.0f}")
            if not info.is_dir() and member.lower().endswith((".zip", ".tar", ".gz", ".tgz", ".7z", ".rar")) \
                    and not member.lower().endswith(".nii.gz"):  # a compressed NIfTI volume is an image
                raise DataError(f"{name}: {member!r} is an archive inside the archive; nested archives are not "
                                "unpacked: zip the images themselves")
        written = 0
        for info in infos:
            if info.is_dir() or "__MACOSX" in info.filename:
                continue
            target = dest / info.filename
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        written += len(chunk)
                        if written > max_bytes:  # the header sizes can lie
                            raise DataError(f"{name}: unpacks to more than {max_bytes / 1e6:.0f} MB")
                        out.write(chunk)
            except DataError:
                raise
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError,
                    zlib.error) as e:
                raise DataError(f"{name}: cannot unpack {info.filename!r} ({_reason(e)})") from None
    return dest


def load_unpacked(root: str | os.PathLike, skip_bad: bool = False,
                  categories: Sequence[str] | None = None, unwrap: bool = False, axis: str = "z") -> Dataset:
    """An MVTec-layout dataset or a folder of normal images.

    Args:
        unwrap: an unpacked upload: when ``root`` holds nothing but one folder, that folder is the dataset.
        axis: the slice axis of NIfTI volumes (x, y or z).
    """
    root = Path(root)
    inner = _subdirs(root)
    if unwrap and len(inner) == 1 and not any(p.is_file() for p in root.iterdir() if not p.name.startswith(".")):
        root = inner[0]  # zips usually wrap everything in one folder
    if is_mvtec(root):
        return load_mvtec(root, categories, skip_bad, axis)
    return load_folder(root, skip_bad=skip_bad, axis=axis)


def load_zip(zip_path: str | os.PathLike, dest: str | os.PathLike, skip_bad: bool = False,
             categories: Sequence[str] | None = None) -> Dataset:
    """A zip of an MVTec-layout dataset or of plain normal images, unpacked into ``dest``."""
    name = display_name(Path(zip_path).name)
    root = safe_extract_zip(zip_path, dest)
    try:
        ds = load_unpacked(root, skip_bad, categories, unwrap=True)
    except DataError as e:  # name the zip, not the folder it was unpacked into
        msg = str(e).removeprefix(f"{root.name}: ")
        raise DataError(msg if msg.startswith(name) else f"{name}: {msg}") from None
    ds.name = display_name(Path(zip_path).stem)
    return ds


# ---- Hugging Face datasets ---------------------------------------------------------------------------------
def label_mapping(feature: Any, values: Iterable[Any], where: str, check_normal: bool = True) -> dict[Any, int]:
    """Each label value of a Hugging Face column -> 0 (normal), 1 (anomalous) or -1 (no label).

    Class NAMES decide, never class indices: a ``ClassLabel`` index becomes its name first (``imagefolder``
    sorts classes, so ``crack`` = 0 and ``good`` = 1). Strings are names; booleans and plain integers must be
    0/1 (0 = normal). A dataset with no class recognised as normal is refused, listing its classes.

    Args:
        feature: the column's feature (``datasets.ClassLabel``, ``datasets.Value``, ...).
        values: the distinct values found in the column.
        where: dataset name for messages.
        check_normal: refuse a set of classes without a normal one (off while a stream is still being read).
    """
    import datasets

    values = list(values)
    if isinstance(feature, datasets.ClassLabel):
        classes = list(feature.names)
        out = {}
        for v in values:
            if v is None or v == -1:  # datasets' "no label"
                out[v] = -1
            elif not (isinstance(v, (int, np.integer)) and 0 <= v < len(classes)):
                raise DataError(f"{where}: label {v!r} is not one of the {len(classes)} classes {classes}")
            else:
                out[v] = 0 if is_normal_name(classes[v]) else 1
    elif all(v is None or isinstance(v, str) for v in values):
        classes = sorted(str(v) for v in values if v is not None)
        out = {v: -1 if v is None else 0 if is_normal_name(v) else 1 for v in values}
    elif all(v is None or isinstance(v, (bool, int, np.integer, np.bool_)) for v in values):
        bad = sorted(v for v in values if v is not None and v not in (0, 1))
        if bad:
            raise DataError(f"{where}: labels {bad[:5]} are not 0 (normal) or 1 (anomalous); use 0/1 or class "
                            "names such as good / crack")
        return {v: -1 if v is None else int(v) for v in values}
    else:
        raise DataError(f"{where}: label values such as {values[:3]!r} are neither class names nor 0/1")
    if check_normal and classes and not any(is_normal_name(c) for c in classes):
        raise DataError(f"{where}: no class is recognised as normal (classes: {', '.join(classes)}); the normal "
                        f"class must be named one of {', '.join(sorted(NORMAL_NAMES))}")
    return out


def _open_hf(repo_id: str, config: str | None, token: str | bool, local: bool, streaming: bool = False):
    """A ``datasets.DatasetDict`` (``IterableDatasetDict`` with ``streaming``) from the Hub, or with ``local``
    from a folder (saved with ``save_to_disk``, or files that ``load_dataset`` reads: parquet, image folders)."""
    import datasets

    path = Path(repo_id)
    if path.exists():
        if not local:
            raise DataError(f"hf:{repo_id}: not a Hub dataset id (owner/name); local paths are not allowed here")
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            dd = datasets.load_from_disk(str(path))
            dd = dd if isinstance(dd, datasets.DatasetDict) else datasets.DatasetDict(train=dd)
            if streaming:  # a saved dataset streams from its arrow files
                return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in dd.items()})
            return dd
    return datasets.load_dataset(repo_id, config, token=token, streaming=streaming)


_FORMAT_EXT = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp", "WEBP": ".webp"}


def _cell_image(cell: Any, name: str, token: str | bool, local: bool) -> tuple[bytes, Image.Image]:
    """The bytes and the (lazily decoded) image of one undecoded image cell (``{"bytes", "path"}``).

    A cell with only a path (image folders) is read from it: a URL of the dataset's host, a file that
    ``datasets`` downloaded into its caches, or with ``local`` any file of this machine. A Hub dataset whose
    cell names another file of this machine is refused: on a shared server it would read other files (other
    users' images) into this user's data.
    """
    data = cell.get("bytes") if isinstance(cell, dict) else None
    path = cell.get("path") if isinstance(cell, dict) else None
    if data is None and path:
        if not local and ("://" not in path or path.startswith("file:")) and not _in_hf_cache(path):
            raise DataError(f"{name}: the row names a file of this machine instead of holding an image")
        from datasets import DownloadConfig
        from datasets.utils.file_utils import xopen

        try:
            with xopen(path, "rb", download_config=DownloadConfig(token=token)) as f:
                data = f.read()
        except Exception as e:  # noqa: BLE001 - gone, unreachable or refused
            raise DataError(scrub(f"{name}: cannot read the image ({type(e).__name__}: {_reason(e)})",
                                  token)) from None
    if not data:
        raise DataError(f"{name}: the row holds no image")
    try:
        Image.open(io.BytesIO(data)).verify()  # the header and (PNG) the checksums; ``validate`` decodes it all
        return data, Image.open(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged bytes
        raise DataError(f"{name}: cannot decode the row ({_reason(e)})") from None


def _in_hf_cache(path: str) -> bool:
    """Whether ``path`` lies in the caches where ``datasets`` and ``huggingface_hub`` put downloaded files."""
    import datasets
    from huggingface_hub import constants

    real = Path(path.removeprefix("file://")).resolve()
    return any(real.is_relative_to(Path(d).resolve())
               for d in (datasets.config.HF_DATASETS_CACHE, constants.HF_HUB_CACHE))


def _spool(data: bytes, img: Image.Image, dest: Path) -> str:
    """Writes an image's bytes to ``dest`` + the extension of its format, as they are (no re-encoding: a
    16-bit PNG stays 16-bit); formats that folders do not read become PNG. Returns the file's path."""
    ext = _FORMAT_EXT.get(img.format)
    out = dest.with_suffix(ext or ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.urandom(4).hex()}.tmp")  # another load of the same rows may read ``out``
    if ext:
        tmp.write_bytes(data)
    else:
        img.save(tmp, format="PNG")
    os.replace(tmp, out)
    return str(out)


def load_hf(repo_id: str, split: str = "train", test_split: str | None = "test", image_column: str = "image",
            label_column: str | None = "label", mask_column: str | None = None, category_column: str | None = None,
            config: str | None = None, token: tokens.Token = None, limit: int | None = None,
            skip_bad: bool = False, local: bool = False, streaming: bool = False,
            spool: str | os.PathLike | None = None, progress: ProgressFn | None = None) -> Dataset:
    """A Hugging Face dataset through ``datasets`` (Hub id; with ``local`` also a folder on this machine).

    The train split keeps only normal images (label 0, or all when there is no label column); labels follow
    ``label_mapping`` (class names, never indices). ``token``: the one to send (``True``: this machine's login;
    None: none, whatever ``HF_TOKEN`` holds, see ``tokens``); used for this call only, never in a message. Images are read from the cells' bytes (see ``_cell_image``: a Hub dataset cannot make
    this machine read its own files).

    Args:
        limit: read at most this many rows of each split.
        streaming: read the rows one at a time (``datasets``' streaming mode: nothing is downloaded up front,
            memory stays flat whatever the size): each image (and mask) is written as it comes to ``spool``,
            and the samples read those files, as a folder's do. Without it, ``datasets`` downloads and caches
            the whole dataset and the samples hold their images in memory.
        spool: the folder for streamed images; None: a temporary folder owned by the dataset (removed with it).
        progress: reports the rows read per split, out of the total where the dataset tells it.
    """
    import datasets

    token = tokens.for_request(token)
    where = f"hf:{Path(repo_id).name if local and os.path.exists(repo_id) else repo_id}"  # no server paths
    try:
        dd = _open_hf(repo_id, config, token, local, streaming)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - every loading failure becomes one clear message
        raise DataError(tokens.hub_message(e, "load the dataset", where, token)) from None
    if split not in dd:
        raise DataError(f"{where}: no split {split!r} (have {list(dd)})")
    if test_split is not None and test_split not in dd and test_split != "test":
        raise DataError(f"{where}: no split {test_split!r} (have {list(dd)})")
    parts = [p for p in (split, test_split) if p is not None and p in dd]
    for part in parts:
        if dd[part].features is None:  # a stream whose files carry no schema: read it from the first rows
            dd[part] = dd[part]._resolve_features()
        cols = list(dd[part].features)
        for col in (image_column, label_column, mask_column, category_column):
            if col is not None and col not in cols and not (col == label_column == "label"):
                raise DataError(f"{where}/{part}: no column {col!r} (have {cols})")
        feat = dd[part].features[image_column]
        if not isinstance(feat, datasets.Image):
            raise DataError(f"{where}/{part}: column {image_column!r} does not hold images (it holds {feat})")
    has_label = label_column is not None and all(label_column in dd[p].features for p in parts)
    feature = dd[split].features[label_column] if has_label else None
    labels: dict[Any, int] = {}
    if has_label and not streaming:
        try:
            values = {v for p in parts for v in dd[p].unique(label_column)}
        except TypeError:
            raise DataError(f"{where}: column {label_column!r} holds no labels (lists?)") from None
        labels = label_mapping(feature, values, where)
    owner = None
    if streaming and spool is None:
        owner = tempfile.TemporaryDirectory(prefix="uadlab-hf-")
        spool = owner.name
    ds = Dataset(where, owner=owner)
    stages = Stages(progress, [1] * len(parts))
    try:
        for part, target in ((split, ds.train), (test_split, ds.test)):
            if part in parts:
                report = stages.stage(f"reading {part} of {where}", "rows")
                rows = _hf_rows(dd[part], part, limit, streaming, where, token, report)
                for name, row in rows:
                    try:  # a stream meets its label values as it goes
                        if has_label and row[label_column] not in labels:
                            labels.update(label_mapping(feature, [row[label_column]], where, check_normal=False))
                    except TypeError:
                        raise DataError(f"{where}: column {label_column!r} holds no labels (lists?)") from None
                    label = labels[row[label_column]] if has_label else (0 if part == split else -1)
                    if part == split and label == 1:
                        continue  # train on normal images only
                    try:
                        s = _hf_sample(row, name, label, (image_column, mask_column, category_column),
                                       None if spool is None else Path(spool, *name.split("/")), token, local)
                    except DataError as e:
                        _bad(e, skip_bad, ds.warnings)
                        continue
                    # a stream is checked row by row, so that no image stays in memory
                    target.extend(validate([s], skip_bad, ds.warnings) if streaming else [s])
                if not streaming:
                    target[:] = validate(target, skip_bad, ds.warnings)
        if streaming and has_label:  # the whole check, now that the stream's label values are known
            label_mapping(feature, list(labels), where)
        if not ds.train:
            raise DataError(f"{where}: no normal training images in split {split!r}")
    except BaseException:
        if owner is not None:
            owner.cleanup()
        raise
    return ds


def _hf_rows(table: Any, part: str, limit: int | None, streaming: bool, where: str, token: str | bool,
             report: ProgressFn) -> Iterable[tuple[str, dict]]:
    """(name, row) of the first ``limit`` rows of one split, image cells undecoded (``{"bytes", "path"}``)."""
    import datasets

    for col, feat in table.features.items():
        if isinstance(feat, datasets.Image):
            table = table.cast_column(col, datasets.Image(decode=False))
    if not streaming:
        n = len(table) if limit is None else min(limit, len(table))
        for i in range(n):
            yield f"{part}/{i:05d}", table[i]
            report(Progress(i + 1, n))
        return
    info = table.info.splits.get(part) if table.info and table.info.splits else None
    known = [n for n in (limit, getattr(info, "num_examples", None)) if n]
    total = min(known) if known else 0  # 0: a stream of unknown length
    it = iter(table)
    i = 0
    while limit is None or i < limit:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - the network or a damaged file: the stream cannot go on
            raise DataError(scrub(f"{where}/{part}: cannot read row {i} ({type(e).__name__}: {_reason(e)})",
                                  token)) from None
        yield f"{part}/{i:05d}", row
        i += 1
        report(Progress(i, total))


def _hf_sample(row: dict, name: str, label: int, columns: tuple[str, str | None, str | None],
               spool: Path | None, token: str | bool, local: bool) -> Sample:
    """A Sample of one row: its image in memory, or with ``spool`` written to ``spool`` + extension (the mask
    too, when it is an image column)."""
    image_column, mask_column, category_column = columns
    data, img = _cell_image(row[image_column], name, token, local)
    s = Sample(name, label=label, category=str(row[category_column]) if category_column else "default")
    if spool is None:
        s.image = img
    else:
        s.path = _spool(data, img, spool)
    mask = row[mask_column] if mask_column else None
    if isinstance(mask, dict):  # an image column, undecoded
        mdata, mimg = _cell_image(mask, f"{name} (mask)", token, local)
        if spool is None:
            s.mask = np.asarray(mimg)
        else:
            s.mask_path = _spool(mdata, mimg, spool.with_name(spool.name + "_mask"))
    elif mask is not None:
        s.mask = np.asarray(mask)
    return s


def load_data(spec: str, categories: Sequence[str] | None = None, skip_bad: bool = False, axis: str = "z",
              **hf_kwargs) -> Dataset:
    """``demo``, ``hf:REPO_ID`` (or ``hf:FOLDER``), a zip, an MVTec-layout folder, a folder of normal images, or
    one DICOM / NIfTI file (its slices as normal images; ``axis``: the slice axis of NIfTI volumes).

    A zip is unpacked into a temporary folder that lives as long as the returned dataset (and is removed on
    any error).
    """
    if spec == "demo":
        from .demo import make_demo

        return load_mvtec(make_demo(), categories=categories, skip_bad=skip_bad)
    if spec.startswith("hf:"):
        # the caller owns this machine (CLI, notebook): its own login, if any, reads private datasets
        return load_hf(spec[3:], skip_bad=skip_bad, **{"local": True, "token": True, **hf_kwargs})
    p = Path(spec)
    if not p.exists():
        raise DataError(f"{display_name(p.name or spec)}: no such file or folder (use 'demo', 'hf:REPO_ID', a folder "
                        "or a zip)")
    if p.suffix.lower() == ".zip" and p.is_file():
        tmp = tempfile.TemporaryDirectory(prefix="uadlab-zip-")
        try:
            ds = load_zip(p, tmp.name, skip_bad=skip_bad, categories=categories)
        except BaseException:
            tmp.cleanup()
            raise
        ds.owner = tmp
        return ds
    if p.is_file() and medical.medical_kind(p):
        ds = Dataset(display_name(p.name))
        ds.train = _samples([p], lambda q: display_name(q.name), "", ds.name, 0, skip_bad, ds.warnings,
                            ds.empty_slices, axis=axis)
        return ds
    return load_unpacked(p, skip_bad, categories, axis=axis) if p.is_dir() else load_folder(p)

