"""Export: maps and masks back onto a scan's own geometry, as a NIfTI volume aligned with the input or as a PNG
slice without metadata.
"""
from __future__ import annotations

import gzip
import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import DataError
from .dicom import DicomFrame, _dcmread, _functional_item
from .nifti import _canonical, _load_nifti, put_slice, take_slice
from .scans import AXES


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
