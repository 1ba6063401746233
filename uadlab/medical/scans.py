"""What every scan reader shares: the file kinds and their limits, a file version's identity (the key of
the readers' caches), voxel counts from a header alone, pydicom set up once (so that it never quotes a value)
and the rule that finds empty slices.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DataError


NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
AXES = {"x": 0, "y": 1, "z": 2}  # canonical RAS+: x sagittal, y coronal, z axial slices
MAX_VOLUME_BYTES = 2 * 1024**3  # one volume file
VOLUME_CACHE_BYTES = 1024**3  # volumes kept in memory after reading (float32), shared by every user
MAX_VOLUME_VOXELS = 512**3  # 134 million (512 MB as float32): read in about 15 s here; a .nii.gz of zeros
# declaring far more is a decompression bomb (a 2 MB file of 1024x1024x256 voxels would take 1 GB and half a minute)
FOREGROUND_TOLERANCE = 0.05  # of the p1..p99 intensity range above p1
MIN_FOREGROUND = 0.01  # share of a slice's pixels; below it the slice is empty


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


# ---- file versions and headers ----------------------------------------------------------------------------
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


def _check_size(path: str, name: str) -> None:
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"{name}: file is empty")
    if size > MAX_VOLUME_BYTES:
        raise DataError(f"{name}: file is {size / 1e6:.0f} MB, more than the limit of {MAX_VOLUME_BYTES / 1e6:.0f} MB")


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


def _cached(read: Callable[[str, int, int], Any], path: str, name: str) -> Any:
    """``read(path, mtime, size)`` (an lru_cache of one file version), its errors (": reason") named ``name``."""
    try:
        return read(*_stat_key(path))
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except DataError as e:
        raise DataError(f"{name}{e}") from None


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


def _int(v, default: int) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default
