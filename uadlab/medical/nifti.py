"""NIfTI: canonical (RAS+) volumes read once and cached, sliced as views; label volumes as masks; empty slices
skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, short_reason as _reason
from ..lru import LRU
from .scans import (AXES, MAX_VOLUME_VOXELS, MIN_FOREGROUND, NIFTI_SUFFIXES, VOLUME_CACHE_BYTES, _cached, _check_size,
                    file_digest, foreground_threshold)
from .window import Pixels


def nifti_stem(path: str | os.PathLike) -> str:
    """``brain.nii.gz`` -> ``brain``."""
    name = Path(path).name
    for suf in NIFTI_SUFFIXES[::-1]:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(path).stem


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


def _canonical(img):
    """The image in the closest canonical orientation (RAS+), 3-D."""
    import nibabel as nib

    if len(img.shape) == 2:
        img = nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine)
    return nib.as_closest_canonical(img)


_VOLUMES: "LRU[np.ndarray]" = LRU(None, weigh=lambda v: v.nbytes, budget=VOLUME_CACHE_BYTES, keep=2)


def _volume_cached(path: str, mtime: int, size: int) -> np.ndarray:
    """The volume of one file version, kept while the volumes read last hold at most ``VOLUME_CACHE_BYTES``
    (the last two always: an image and its mask). Messages start with ": " (the caller names the file)."""
    return _VOLUMES.get((path, mtime, size), lambda: _read_volume(path))


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
