"""Folders: normal images, the MVTec AD layout (several categories) and loose files; DICOM and NIfTI files
among them become their slices (``uadlab.medical``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .. import medical
from ..errors import DataError
from .samples import Dataset, IMAGE_EXTS, MVTEC_DIRS, Sample, _bad, display_name, is_normal_name, validate


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
        mask_for: file path -> its mask file or None. A DICOM file pairs with a mask named after it as an
            image does (``x.dcm`` <-> ``x_mask.png``); DICOM SEG files among ``files`` segment the frames they
            reference (their slices are anomalous where the SEG marks something, normal elsewhere).
    """
    on_error = lambda e: _bad(e, skip_bad, warn)  # noqa: E731
    out: list[Sample] = []
    dicoms: list[str] = []
    dicom_masks: dict[str, str] = {}
    for p in files:
        kind = medical.medical_kind(p)
        mask = mask_for(p) if mask_for else None
        if kind == "dicom":
            dicoms.append(str(p))
            if mask is not None:
                dicom_masks[str(p)] = mask
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
        per_file: dict[str, int] = {}
        for _, src, _ in frames:
            per_file[src.path] = per_file.get(src.path, 0) + 1
        for name, src, pk in frames:
            s = Sample(name, src.path, label=label if src.finding is None else label * int(src.finding),
                       mask_path=dicom_masks.get(src.path), category=category, defect=defect, source=src, patient=pk)
            if s.mask_path is not None:
                try:
                    _check_dicom_mask(s, per_file[src.path])
                except DataError as e:
                    on_error(e)
                    continue
            out.append(s)
    return out


def _check_dicom_mask(s: Sample, n_frames: int) -> None:
    """A PNG mask pairs with a single-frame DICOM file of the mask's size (a DataError naming the sample)."""
    if n_frames > 1:
        raise DataError(f"{s.name}: a PNG mask pairs with a single-frame DICOM file, this one has {n_frames} frames "
                        "(give a DICOM SEG instead)")
    m, shape = s.load_mask(), s.source.pixels().values.shape[:2]
    if m is not None and m.shape != shape:
        raise DataError(f"{s.name}: its mask is {m.shape[1]}x{m.shape[0]} px but the image is {shape[1]}x{shape[0]} px")


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
        first = f"; {warn[0].removeprefix('skipped ')}" if warn else ""  # the reason, not just a count
        raise DataError(f"{name}: no usable images ({len(warn)} bad files skipped{first})")
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

            gt = cat_dir / "ground_truth" / d.name  # DICOM SEG files there segment the folder's DICOM series
            segs = [p for p in _image_files(gt, base, skip_bad, warn) if medical.medical_kind(p) == "dicom"] \
                if gt.is_dir() and not normal else []
            test += _samples(_image_files(d, base, skip_bad, warn) + segs, rel, rel(d) + "/", cat, 0 if normal else 1,
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


