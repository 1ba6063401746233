"""Zip archives: safe unpacking (size, count and ratio limits; no member leaves the target folder), then the
unpacked folder loaded like any other.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

from .. import medical
from ..errors import DataError, short_reason as _reason
from .folders import _subdirs, is_mvtec, load_folder, load_mvtec
from .samples import Dataset, IMAGE_EXTS, display_name


MAX_ZIP_BYTES = 2 * 1024**3
MAX_ZIP_FILES = 50_000
MAX_ZIP_RATIO = 200  # uncompressed / compressed of one large member: images hardly compress, bombs do
SKIPPED_MEMBERS = ".skipped.json"  # in an unpacked upload: the members that were not unpacked (hidden: not data)


def is_image_name(name: str) -> bool:
    """True for a file name a dataset reads: an image extension, ``.dcm``/``.dicom``, ``.nii``/``.nii.gz``."""
    return Path(name).suffix.lower() in IMAGE_EXTS or name.lower().endswith(medical.NIFTI_SUFFIXES
                                                                            + medical.DICOM_SUFFIXES)


def _image_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    """A zip member a dataset reads: an image, scan or mask by its name, or a suffix-less DICOM file (the
    ``DICM`` marker at byte 128 of its first bytes)."""
    name = info.filename.replace("\\", "/")
    if is_image_name(name):
        return True
    if Path(name).suffix or info.file_size < 132:
        return False
    try:
        with zf.open(info) as f:
            return f.read(132)[128:] == b"DICM"
    except Exception:  # noqa: BLE001 - a damaged member: not unpacked, listed as skipped
        return False


def safe_extract_zip(zip_path: str | os.PathLike, dest: str | os.PathLike, max_bytes: int = MAX_ZIP_BYTES,
                     max_files: int = MAX_ZIP_FILES, max_ratio: float = MAX_ZIP_RATIO, images_only: bool = False,
                     skipped: list[str] | None = None) -> Path:
    """Unpack a zip without path traversal, links, nested archives or zip bombs; return ``dest``.

    Args:
        images_only: unpack only the members a dataset reads (images, masks, DICOM and NIfTI files; see
            ``is_image_name``): other files would only take disk. The size limit counts what is unpacked.
        skipped: filled with the names of the members left packed (``images_only``).

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
        for info in infos:
            member = info.filename
            target = (dest / member).resolve()
            if member.startswith(("/", "\\")) or (len(member) > 1 and member[1] == ":") \
                    or ".." in Path(member.replace("\\", "/")).parts or not target.is_relative_to(dest):
                raise DataError(f"{name}: unsafe path {member!r} (outside the target folder)")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise DataError(f"{name}: {member!r} is a symbolic link; links are not unpacked")
        files = [i for i in infos if not i.is_dir() and "__MACOSX" not in i.filename]
        for info in files:  # said even when only images are unpacked: the user meant the inner images
            if info.filename.lower().endswith((".zip", ".tar", ".gz", ".tgz", ".7z", ".rar")) \
                    and not info.filename.lower().endswith(".nii.gz"):  # a compressed NIfTI volume is an image
                raise DataError(f"{name}: {info.filename!r} is an archive inside the archive; nested archives are "
                                "not unpacked: zip the images themselves")
        if images_only:
            kept = [i for i in files if _image_member(zf, i)]
            if skipped is not None:
                skipped += [display_name(i.filename) for i in files if i not in kept]
            files = kept
        total = sum(i.file_size for i in files)
        if total > max_bytes:
            raise DataError(f"{name}: unpacks to {total / 1e6:.0f} MB, more than the limit of {max_bytes / 1e6:.0f} MB")
        for info in files:
            member = info.filename
            if info.file_size > 8 * 1024**2 and info.file_size > max_ratio * max(info.compress_size, 1):
                raise DataError(f"{name}: {member!r} expands {info.file_size / max(info.compress_size, 1):.0f} "
                                f"times (a zip bomb?); the limit is {max_ratio:.0f}")
        written = 0
        for info in files:
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


def skipped_warnings(names: Sequence[str], count: int | None = None, limit: int = 20) -> list[str]:
    """Dataset warnings for the ``count`` uploaded files or zip members that were not kept: the first ``limit``
    of ``names`` by name, then how many more."""
    count = len(names) if count is None else count
    out = [f"skipped {n}: not an image, mask or scan (not kept)" for n in names[:limit]]
    if count > len(out):
        out.append(f"skipped {count - len(out)} more files that are not images, masks or scans (not kept)")
    return out


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
    """A zip of an MVTec-layout dataset or of plain normal images, unpacked into ``dest`` (only the images,
    masks and scans: other members are listed in ``Dataset.warnings``)."""
    name = display_name(Path(zip_path).name)
    skipped: list[str] = []
    root = safe_extract_zip(zip_path, dest, images_only=True, skipped=skipped)
    try:
        ds = load_unpacked(root, skip_bad, categories, unwrap=True)
    except DataError as e:  # name the zip, not the folder it was unpacked into
        msg = str(e).removeprefix(f"{root.name}: ")
        raise DataError(msg if msg.startswith(name) else f"{name}: {msg}") from None
    ds.name = display_name(Path(zip_path).stem)
    ds.warnings += skipped_warnings(skipped)
    return ds


