"""Image sets: a folder, the MVTec AD layout, uploaded files, a zip, a Hugging Face dataset.

Everything becomes a list of ``Sample`` (lazy: pixels are read when needed) inside a ``Dataset`` with a
``train`` split (normal images) and a ``test`` split (labelled when labels exist). Images of any mode
(grayscale, 16-bit, RGBA, palette) become 8-bit RGB; masks are binarised (> 0). Bad files raise a
``DataError`` that names the file and the problem, or are skipped with a warning when asked.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
NORMAL_NAMES = {"good", "normal", "ok", "0", "false", "negative"}


class DataError(ValueError):
    """A file or dataset entry that cannot be used; the message names it and the problem."""


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit and float images are rescaled by their own range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)
        img = Image.fromarray((a * 255).round().astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))  # transparent pixels become black
        img = Image.alpha_composite(bg, img.convert("RGBA"))
    img = img.convert("RGB")
    if img.width < 8 or img.height < 8:
        raise DataError(f"{name}: image is too small ({img.width}x{img.height} px)")
    return img


def open_image(src: str | os.PathLike | bytes | Image.Image, name: str | None = None) -> Image.Image:
    """Open a path, bytes or PIL image as RGB; raise DataError naming the file on any problem."""
    name = name or (str(src) if isinstance(src, (str, os.PathLike)) else "image")
    try:
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, bytes):
            if not src:
                raise DataError(f"{name}: file is empty")
            img = Image.open(io.BytesIO(src))
        else:
            if os.path.getsize(src) == 0:
                raise DataError(f"{name}: file is empty")
            img = Image.open(src)
        img.load()
        return to_rgb(img, name)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{name}: corrupt or truncated image ({e})") from None


def open_mask(src: str | os.PathLike | np.ndarray | Image.Image, name: str | None = None) -> np.ndarray:
    """A mask file or array -> (H, W) uint8 in {0, 1} (any non-zero pixel is anomalous)."""
    name = name or (str(src) if isinstance(src, (str, os.PathLike)) else "mask")
    if isinstance(src, np.ndarray):
        a = src
    else:
        try:
            img = src if isinstance(src, Image.Image) else Image.open(src)
            img.load()
        except FileNotFoundError:
            raise DataError(f"{name}: mask file not found") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{name}: unreadable mask ({e})") from None
        a = np.asarray(img)
    if a.ndim == 3:
        a = a[..., :3].max(axis=-1)
    return (a > 0).astype(np.uint8)


@dataclass
class Sample:
    """One image, loaded lazily.

    Attributes:
        name: display name (relative path or upload name).
        path: file path, or None for in-memory images.
        image: in-memory image (Hugging Face datasets, uploads), or None.
        label: 0 normal, 1 anomalous, -1 unknown.
        mask_path / mask: ground-truth mask (anomalous pixels > 0), if any.
        category, defect: MVTec-style category and defect type.
    """

    name: str
    path: str | None = None
    image: Image.Image | None = None
    label: int = -1
    mask_path: str | None = None
    mask: np.ndarray | None = None
    category: str = "default"
    defect: str = ""

    def load(self) -> Image.Image:
        return open_image(self.image if self.image is not None else self.path, self.name)

    def load_mask(self) -> np.ndarray | None:
        """(H, W) uint8 mask at the image's size, or None. An anomalous image without a mask file is None."""
        if self.mask is not None:
            return open_mask(self.mask, f"{self.name} (mask)")
        if self.mask_path is not None:
            return open_mask(self.mask_path, self.mask_path)
        return None

    def content_key(self) -> str:
        h = hashlib.sha256()
        if self.image is not None:
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
    """Train (normal) and test samples, possibly of several categories."""

    name: str
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def categories(self) -> list[str]:
        return sorted({s.category for s in self.train + self.test})

    def category(self, cat: str) -> "Dataset":
        if cat not in self.categories:
            raise KeyError(f"{self.name}: no category {cat!r} (have {self.categories})")
        return Dataset(f"{self.name}/{cat}", [s for s in self.train if s.category == cat],
                       [s for s in self.test if s.category == cat], list(self.warnings))

    @property
    def has_masks(self) -> bool:
        anomalous = [s for s in self.test if s.label == 1]
        return bool(anomalous) and all(s.mask is not None or s.mask_path is not None for s in anomalous)

    def summary(self) -> dict:
        return {"name": self.name, "categories": self.categories, "train": len(self.train),
                "test_normal": sum(s.label == 0 for s in self.test),
                "test_anomalous": sum(s.label == 1 for s in self.test),
                "test_unlabelled": sum(s.label == -1 for s in self.test),
                "masks": self.has_masks, "skipped": len(self.warnings)}


def validate(samples: Iterable[Sample], skip_bad: bool = False, warn: list[str] | None = None) -> list[Sample]:
    """Open every image (and mask) once; raise DataError on the first bad one, or skip it with a warning."""
    good = []
    for s in samples:
        try:
            img = s.load()
            m = s.load_mask()
            if m is not None and m.shape != (img.height, img.width):
                raise DataError(f"{s.mask_path or s.name}: mask is {m.shape[1]}x{m.shape[0]} px but the image "
                                f"{s.name} is {img.width}x{img.height} px")
            good.append(s)
        except DataError as e:
            if not skip_bad:
                raise
            msg = f"skipped {e}"
            warnings.warn(msg)
            if warn is not None:
                warn.append(msg)
    return good


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTS)


def load_folder(path: str | os.PathLike, label: int = 0, category: str | None = None,
                skip_bad: bool = False) -> Dataset:
    """A plain folder of images (recursively) as the train split of normal images."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    warn: list[str] = []
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise DataError(f"{root}: the folder is empty")
    cat = category or root.name
    samples = [Sample(str(p.relative_to(root)), str(p), label=label, category=cat) for p in files]
    samples = validate(samples, skip_bad, warn)
    if not samples:
        raise DataError(f"{root}: no usable images")
    return Dataset(root.name, train=samples if label == 0 else [], test=[] if label == 0 else samples, warnings=warn)


def _mvtec_category(cat_dir: Path, skip_bad: bool, warn: list[str]) -> tuple[list[Sample], list[Sample]]:
    cat = cat_dir.name
    train = [Sample(str(p.relative_to(cat_dir.parent)), str(p), label=0, category=cat)
             for p in _images_in(cat_dir / "train" / "good")]
    test: list[Sample] = []
    test_dir = cat_dir / "test"
    if test_dir.is_dir():
        for d in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            normal = d.name.lower() in NORMAL_NAMES
            for p in _images_in(d):
                mask = cat_dir / "ground_truth" / d.name / f"{p.stem}_mask.png"
                test.append(Sample(str(p.relative_to(cat_dir.parent)), str(p), label=0 if normal else 1,
                                   mask_path=str(mask) if (not normal and mask.exists()) else None,
                                   category=cat, defect=d.name))
    return validate(train, skip_bad, warn), validate(test, skip_bad, warn)


def is_mvtec(root: str | os.PathLike) -> bool:
    root = Path(root)
    return (root / "train" / "good").is_dir() or any((c / "train" / "good").is_dir() for c in _subdirs(root))


def _subdirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def load_mvtec(root: str | os.PathLike, categories: Sequence[str] | None = None, skip_bad: bool = False) -> Dataset:
    """The MVTec AD layout: ``<cat>/train/good``, ``<cat>/test/<defect>``, ``<cat>/ground_truth/<defect>/*_mask.png``.

    ``root`` is one category folder or a folder of categories. Test masks are optional.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    cats = [root] if (root / "train").is_dir() else [c for c in _subdirs(root) if (c / "train").is_dir()]
    if categories:
        known = {c.name for c in cats}
        missing = [c for c in categories if c not in known]
        if missing:
            raise DataError(f"{root}: categories {missing} not found (have {sorted(known)})")
        cats = [c for c in cats if c.name in categories]
    if not cats:
        raise DataError(f"{root}: no MVTec-style category (expected <category>/train/good/)")
    ds = Dataset(root.name)
    for c in cats:
        tr, te = _mvtec_category(c, skip_bad, ds.warnings)
        if not tr:
            raise DataError(f"{c}: no training images in train/good")
        ds.train += tr
        ds.test += te
    return ds


def load_files(files: Sequence[str | os.PathLike], label: int = 0, category: str = "upload",
               skip_bad: bool = False, masks: dict[str, str] | None = None) -> list[Sample]:
    """Uploaded files -> validated samples. ``masks`` maps an image's file stem to its mask path."""
    masks = masks or {}
    samples = [Sample(Path(f).name, str(f), label=label, category=category,
                      mask_path=masks.get(Path(f).stem)) for f in files]
    return validate(samples, skip_bad)


def safe_extract_zip(zip_path: str | os.PathLike, dest: str | os.PathLike, max_bytes: int = 2 * 1024**3,
                     max_files: int = 50_000) -> Path:
    """Unpack a zip without path traversal, links or zip bombs; return ``dest``.

    Raises:
        DataError: naming the zip and the offending member.
    """
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    name = Path(zip_path).name
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{name}: not a valid zip file ({e})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_files:
            raise DataError(f"{name}: {len(infos)} members, more than the limit of {max_files}")
        total = sum(i.file_size for i in infos)
        if total > max_bytes:
            raise DataError(f"{name}: unpacks to {total / 1e6:.0f} MB, more than the limit of {max_bytes / 1e6:.0f} MB")
        for info in infos:
            target = (dest / info.filename).resolve()
            if info.filename.startswith(("/", "\\")) or ".." in Path(info.filename).parts \
                    or not str(target).startswith(str(dest) + os.sep) and target != dest:
                raise DataError(f"{name}: unsafe path {info.filename!r} (outside the target folder)")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise DataError(f"{name}: {info.filename!r} is a symbolic link; links are not unpacked")
        written = 0
        for info in infos:
            if info.is_dir() or "__MACOSX" in info.filename:
                continue
            target = dest / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    written += len(chunk)
                    if written > max_bytes:  # the header sizes can lie
                        raise DataError(f"{name}: unpacks to more than {max_bytes / 1e6:.0f} MB")
                    out.write(chunk)
    return dest


def load_zip(zip_path: str | os.PathLike, dest: str | os.PathLike, skip_bad: bool = False) -> Dataset:
    """A zip of an MVTec-layout dataset or of plain normal images."""
    root = safe_extract_zip(zip_path, dest)
    inner = _subdirs(root)
    if len(inner) == 1 and not _images_in_top(root):
        root = inner[0]  # zips usually wrap everything in one folder
    return load_mvtec(root, skip_bad=skip_bad) if is_mvtec(root) else load_folder(root, skip_bad=skip_bad)


def _images_in_top(root: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_EXTS for p in root.iterdir())


def _label(value, name: str) -> int:
    if value is None:
        return -1
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        if value not in (0, 1):
            raise DataError(f"{name}: label {value} is not 0 (normal) or 1 (anomalous)")
        return int(value)
    s = str(value).strip().lower()
    return 0 if s in NORMAL_NAMES else 1


def load_hf(repo_id: str, split: str = "train", test_split: str | None = "test", image_column: str = "image",
            label_column: str | None = "label", mask_column: str | None = None, category_column: str | None = None,
            config: str | None = None, token: str | None = None, limit: int | None = None,
            skip_bad: bool = False) -> Dataset:
    """A Hugging Face dataset (Hub id or local path) through ``datasets.load_dataset``.

    The train split keeps only normal images (label 0, or all when there is no label column). Labels may be
    0/1, booleans or names ("good"/"normal" are normal). The token is passed through and never stored.
    """
    import datasets

    try:
        dd = datasets.load_dataset(repo_id, config, token=token)
    except Exception as e:
        raise DataError(f"hf:{repo_id}: cannot load the dataset ({type(e).__name__}: {e})") from None
    if split not in dd:
        raise DataError(f"hf:{repo_id}: no split {split!r} (have {list(dd)})")
    ds = Dataset(f"hf:{repo_id}")
    for part, target in ((split, ds.train), (test_split, ds.test)):
        if part is None or part not in dd:
            continue
        table = dd[part]
        cols = table.column_names
        for col in (image_column, label_column, mask_column, category_column):
            if col is not None and col not in cols and not (col == label_column and col == "label"):
                raise DataError(f"hf:{repo_id}/{part}: no column {col!r} (have {cols})")
        has_label = label_column in cols if label_column else False
        n = len(table) if limit is None else min(limit, len(table))
        samples = []
        for i in range(n):
            row = table[i]
            name = f"{part}/{i:05d}"
            label = _label(row[label_column], name) if has_label else (0 if part == split else -1)
            if part == split and label == 1:
                continue  # train on normal images only
            img = row[image_column]
            if not isinstance(img, Image.Image):
                raise DataError(f"hf:{repo_id}/{name}: column {image_column!r} does not hold images")
            mask = row[mask_column] if mask_column else None
            samples.append(Sample(name, image=img, label=label,
                                  mask=None if mask is None else np.asarray(mask),
                                  category=str(row[category_column]) if category_column else "default"))
        target.extend(validate(samples, skip_bad, ds.warnings))
    if not ds.train:
        raise DataError(f"hf:{repo_id}: no normal training images in split {split!r}")
    return ds


def load_data(spec: str, categories: Sequence[str] | None = None, skip_bad: bool = False, **hf_kwargs) -> Dataset:
    """``demo``, ``hf:REPO_ID``, a zip, an MVTec-layout folder, or a folder of normal images."""
    if spec == "demo":
        from .demo import make_demo

        return load_mvtec(make_demo(), categories=categories, skip_bad=skip_bad)
    if spec.startswith("hf:"):
        return load_hf(spec[3:], **hf_kwargs)
    p = Path(spec)
    if p.suffix.lower() == ".zip":
        import tempfile

        return load_zip(p, tempfile.mkdtemp(prefix="uadlab-zip-"), skip_bad=skip_bad)
    if not p.exists():
        raise DataError(f"{spec}: no such file or folder (use 'demo', 'hf:REPO_ID', a folder or a zip)")
    return load_mvtec(p, categories, skip_bad) if is_mvtec(p) else load_folder(p, skip_bad=skip_bad)
