"""Medical images: DICOM and NIfTI volumes as named slices, intensity windows, patient safety, NIfTI export.

One module per concern: ``scans`` (file kinds, limits, file versions, empty slices), ``window``
(intensities and windows), ``dicom``, ``nifti`` and ``export``. Every public name is importable from
``uadlab.medical``.

Reading (``uadlab.data`` dispatches files here by suffix):

- DICOM (pydicom): the modality LUT first (Rescale Slope/Intercept, per frame from the functional groups of
  enhanced multi-frame files, or a Modality LUT Sequence) gives modality units (HU for CT); then the display
  window: the run's ``Window`` or, by default (``auto``), the file's own VOI (Window Center/Width with its
  VOI LUT Function, per frame when given, else a VOI LUT Sequence); MONOCHROME1 is inverted LAST (inverting
  before the window would invert twice). Multi-frame files give one sample per frame. Compressed transfer
  syntaxes decode through pydicom's pixel handlers where one is installed, else a DataError names the syntax
  and the packages that would decode it. NaN / infinite values of float pixel data take the frame's lowest
  finite value; a frame without any finite value is refused. A folder holding a series is sorted along the slice
  normal by Image Position (Patient), else by Instance Number. DICOM SEG objects among the files are masks, not
  images: each SEG frame pairs with the image frame its Derivation Image Sequence references by SOP Instance
  UID; the slices of a series a SEG covers are anomalous where it marks something and normal elsewhere
  (``DicomFrame.seg`` / ``finding``). PNG masks named after ``.dcm`` files pair in ``uadlab.data``.
- NIfTI (nibabel, ``.nii`` / ``.nii.gz``): reoriented to the closest canonical orientation (RAS+); each
  slice of the chosen axis (``z`` = axial by default) is one sample named ``<file>#z042``, displayed with
  anterior (axial, x/y slices: superior) at the top. A label volume of the same shape is the mask volume:
  any non-zero label is anomalous. A 4-D file with more than one volume is refused, and so is a header that
  declares more than ``MAX_VOLUME_VOXELS`` (checked before any data is decompressed). The volume is read once
  (linear in its size) and sliced as views. NaN or infinite voxels (many pipelines mark the outside of a
  masked brain with NaN) take the volume's lowest finite value; a volume with no finite voxel, or whose every
  slice is empty (below), is refused naming the file.

Empty slices: in a volume or series of two or more slices, a slice is skipped when its FOREGROUND (pixels
above ``p1 + 5 % (p99 - p1)`` of the whole volume's 1st and 99th intensity percentiles) covers less than
1 % of it, unless its mask marks an anomaly. Skipped slices are counted (``Dataset.summary()["empty_slices"]``).

Windows (``Window.parse``; a run setting fitted on the training images and applied identically to train
and test): ``auto`` (the default: a DICOM file's own VOI; every other scan, volume and 16-bit image through a
percentile window of 0.5-99.5 % fitted on the training images' intensities, so a 16-bit MRI is not read by
the full 16-bit range, near black; before fitting, each image's min/max and the full 16-bit range of
PNG/TIFF), ``minmax`` (each image's own range), ``percentile[:LO,HI]`` (default 0.5-99.5 % of the training
images' intensities, for DICOM files too), a named preset (``WINDOW_PRESETS``, CT Hounsfield units) or
``C/W`` (centre/width). ``Window.view_window`` gives the (centre, width) a window applies to one image in
its modality units, where the viewer starts its own window / level.

Patient safety: identifying DICOM attributes (``PHI_KEYWORDS`` and every PN, DA, DT, TM and UI value, the
DICOM PS3.15 basic profile's people, dates, times and UIDs) are never copied out of the reader: samples are
named ``series<N>/instance<NNNN>`` (never by the file name, often a UID), errors name a file by its position
in its folder, pydicom's own warnings and log lines (which may quote values) are silenced, files kept in
memory for decoding are stripped of those attributes (``strip_phi``), and the Patient ID is kept only as a
salted hash (the salt lives in this process's memory) for the split guard ``check_patients``.
"""
from __future__ import annotations

from .dicom import (DicomFrame, PHI_KEYWORDS, PHI_VRS, SEG_SOP_CLASS, check_patients, dicom_pixels, dicom_slices,
                    file_voi, finite_or_background, is_seg, modality_units, patient_key, phi_values, seg_frame,
                    strip_phi)
from .export import export_nifti, export_png, to_input_geometry
from .nifti import NiftiSlice, nifti_slices, nifti_stem, nifti_volume, put_slice, take_slice
from .scans import (AXES, DICOM_SUFFIXES, FOREGROUND_TOLERANCE, MAX_VOLUME_BYTES, MAX_VOLUME_VOXELS, MIN_FOREGROUND,
                    NIFTI_SUFFIXES, VOLUME_CACHE_BYTES, declared_voxels, file_digest, foreground_fractions,
                    foreground_threshold, medical_kind)
from .window import PERCENTILES, PIXELS_PER_IMAGE, Pixels, WINDOW_PRESETS, Window, voi_window
