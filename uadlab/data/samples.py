"""One image and a set of them: an image or a mask read safely (size limits; 16-bit and float intensities
kept for windows), ``Sample`` (loaded lazily) and ``Dataset``.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import medical
from ..errors import DataError, short_reason as _reason


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
NORMAL_NAMES = {"good", "normal", "ok", "0", "false", "negative"}
MVTEC_DIRS = ("train", "test", "ground_truth")
MAX_IMAGE_BYTES = 50_000_000  # one image file
MAX_IMAGE_PIXELS = 40_000_000  # width x height of one image (PIL's own bomb limit is 89 M)
MIN_IMAGE_SIDE = 8

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
        a = _finite(np.asarray(img, dtype=np.float64), name)
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


def _finite(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` when every value is a number; a DataError naming the file when NaN or infinite values are in it
    (they would make the whole image black: its range is not a number)."""
    bad = ~np.isfinite(a)
    if bad.any():
        raise DataError(f"{name}: {int(bad.sum())} of {a.size} pixels are NaN or infinite (a float image must hold "
                        "numbers only: replace them, e.g. by the background value)")
    return a


def _intensities_mode(mode: str) -> bool:
    return mode.startswith("I;16") or mode in ("I", "F")


def _intensities(img: Image.Image, name: str = "image") -> "medical.Pixels | None":
    """The grey values of a 16-bit, 32-bit or float image as float32; None for 8-bit and colour modes."""
    if _intensities_mode(img.mode):
        return medical.Pixels(_finite(np.asarray(img, dtype=np.float32), name))
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
        return _intensities(_read(self.image if self.image is not None else self.path, self.name), self.name)

    def has_intensities(self) -> bool:
        """Whether ``pixels()`` gives intensities, read from the file's header only (no pixels decoded)."""
        if self.source is not None:
            return True
        if self.image is not None:
            return _intensities_mode(self.image.mode)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(self.path) as img:
                    return _intensities_mode(img.mode)
        except (OSError, ValueError, Image.DecompressionBombError):
            return False

    def load(self) -> Image.Image:
        """8-bit RGB: a DICOM/NIfTI slice or a 16-bit/float grey image through the window (``auto`` without
        one), any other image by the rules of the module docstring."""
        if self.source is not None:
            return to_rgb((self.window or medical.Window()).render(self.source.pixels()), self.name)
        img = _read(self.image if self.image is not None else self.path, self.name)
        px = _intensities(img, self.name) if self.window is not None else None
        return to_rgb(img if px is None else self.window.render(px), self.name)

    def load_mask(self) -> np.ndarray | None:
        """(H, W) uint8 mask, or None. An anomalous image without a mask file is None. A mask given as an
        array (an annotation's, a dataset row's) comes first, then a scan's label volume, then a mask file."""
        if self.mask is not None:
            return open_mask(self.mask, f"{self.name}: mask")
        if self.source is not None:
            m = self.source.load_mask()
            if m is not None or self.mask_path is None:
                return m
            # a DICOM file's PNG mask: named after the file, often a UID, so the message never names it
            return open_mask(self.mask_path, f"{self.name}: mask")
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
        return bool(anomalous) and all(s.mask is not None or s.mask_path is not None
                                       or getattr(s.source, "finding", None) is not None for s in anomalous)  # a SEG

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


