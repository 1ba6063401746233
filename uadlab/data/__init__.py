"""Image sets: a folder, the MVTec AD layout, uploaded files, a zip, a Hugging Face dataset.

One module per source: ``samples`` (one image or mask read safely; ``Sample``, ``Dataset``), ``folders``
(folders, the MVTec layout, loose files), ``archives`` (zips), ``huggingface`` (Hugging Face datasets);
``load_data`` (here) picks one from a spec. Every public name is importable from ``uadlab.data``.

Everything becomes a list of ``Sample`` (lazy: pixels are read when needed) inside a ``Dataset`` with a
``train`` split (normal images) and a ``test`` split (labelled when labels exist).

Rules:

- Images of any mode become 8-bit RGB: palette and grey as their colours, transparent pixels black,
  16-bit images by the full 16-bit range (value / 257, so two images keep their brightness relation),
  32-bit integer and float images by their own range (a float image holding NaN or infinite values is
  refused, naming the file). Files over ``MAX_IMAGE_BYTES``, images over
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
  A DICOM file's mask is a PNG named after it (``ground_truth/<defect>/<file>_mask.png``, as for images), or
  a DICOM SEG in ``ground_truth/<defect>/`` or beside the series (paired by SOP Instance UID; the slices it
  covers are anomalous where it marks something, normal elsewhere).

Bad files raise a ``DataError`` that names the file (relative to the dataset) and the problem, or with
``skip_bad`` are skipped and listed in ``Dataset.warnings`` with the reason.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from .. import medical
from ..errors import DataError
from .archives import (MAX_ZIP_BYTES, MAX_ZIP_FILES, MAX_ZIP_RATIO, SKIPPED_MEMBERS, is_image_name, load_unpacked,
                       load_zip, safe_extract_zip, skipped_warnings)
from .folders import _samples, file_stem, is_mvtec, load_files, load_folder, load_mvtec
from .huggingface import label_mapping, load_hf
from .samples import (Dataset, IMAGE_EXTS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, MVTEC_DIRS,
                      NORMAL_NAMES, Sample, binarize_mask, display_name, is_normal_name, open_image, open_mask,
                      to_rgb, validate)

__all__ = ["DataError", "Dataset", "Sample", "load_data", "load_files", "load_folder", "load_hf", "load_mvtec",
           "load_zip", "open_image", "open_mask", "safe_extract_zip", "validate"]


def load_data(spec: str, categories: Sequence[str] | None = None, skip_bad: bool = False, axis: str = "z",
              **hf_kwargs) -> Dataset:
    """``demo``, ``hf:REPO_ID`` (or ``hf:FOLDER``), a zip, an MVTec-layout folder, a folder of normal images, or
    one DICOM / NIfTI file (its slices as normal images; ``axis``: the slice axis of NIfTI volumes).

    A zip is unpacked into a temporary folder that lives as long as the returned dataset (and is removed on
    any error).
    """
    if spec == "demo":
        from ..demo import make_demo

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

