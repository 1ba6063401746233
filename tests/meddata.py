"""Small medical data sets built from the REAL files that pydicom and nibabel ship.

- ``make_brain_set``: NIfTI volumes in the MVTec layout from nibabel's ``anatomical.nii`` (an SPM-normalised
  T1 brain, 33 x 41 x 25 voxels, LAS orientation): "subjects" differ by an intensity scale, a one-voxel shift
  and noise; lesion volumes get hyperintense spheres with a label volume ``ground_truth/lesion/<name>_mask.nii.gz``.
- ``write_dicom``: a copy of pydicom's ``MR_small.dcm`` (64 x 64 MR) with chosen patient tags, series and
  position, named by its SOP Instance UID as DICOM exports are.
- ``write_seg``: a DICOM SEG (binary or fractional) whose frames reference their source images by SOP Instance UID.
- ``write_ct_series`` / ``make_ct_set``: CT series (HU) from ``CT_small.dcm``, a lesion series with its SEG.

Run as a script to build a set for ``uadlab bench``: ``python tests/meddata.py OUT [n_train n_good n_lesion]``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def anatomical_path() -> Path:
    from nibabel.testing import data_path

    return Path(data_path) / "anatomical.nii"


def pydicom_file(name: str) -> Path:
    """A file of pydicom's bundled test data (never the download list: there is no internet here)."""
    import pydicom

    p = Path(pydicom.__file__).parent / "data" / "test_files" / name
    assert p.is_file(), f"pydicom test file {name} not installed"
    return p


def _subject(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    shift = tuple(int(v) for v in rng.integers(-1, 2, 3))
    v = np.roll(base, shift, axis=(0, 1, 2)) * rng.uniform(0.92, 1.08)
    return v + rng.normal(0, 0.03 * float(base.max()), base.shape) * (base > 0)


def make_brain_set(root: str | Path, n_train: int = 4, n_good: int = 2, n_lesion: int = 3, seed: int = 0,
                   category: str = "brain") -> Path:
    """An MVTec-layout NIfTI set ``root/<category>/{train/good,test/good,test/lesion,ground_truth/lesion}``."""
    import nibabel as nib

    ref = nib.load(anatomical_path())
    base = np.asarray(ref.dataobj, dtype=np.float32)
    rng = np.random.default_rng(seed)
    cat = Path(root) / category
    for d in ("train/good", "test/good", "test/lesion", "ground_truth/lesion"):
        (cat / d).mkdir(parents=True, exist_ok=True)

    def save(a: np.ndarray, path: Path, dtype=np.float32) -> None:
        nib.save(nib.Nifti1Image(a.astype(dtype), ref.affine), str(path))

    for i in range(n_train):
        save(_subject(base, rng), cat / "train/good" / f"subject{i:02d}.nii.gz")
    for i in range(n_good):
        save(_subject(base, rng), cat / "test/good" / f"control{i:02d}.nii.gz")
    brain = np.argwhere(base > np.percentile(base[base > 0], 50))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in base.shape], indexing="ij"), -1)
    for i in range(n_lesion):
        v = _subject(base, rng)
        mask = np.zeros(base.shape, bool)
        for _ in range(2):
            c = brain[rng.integers(len(brain))]
            mask |= np.linalg.norm(grid - c, axis=-1) <= rng.uniform(2.0, 3.5)
        v[mask] = float(np.percentile(base, 99.5)) * 1.6  # hyperintense, like a FLAIR lesion
        save(v, cat / "test/lesion" / f"patient{i:02d}.nii.gz")
        save(mask, cat / "ground_truth/lesion" / f"patient{i:02d}_mask.nii.gz", np.uint8)
    return Path(root)


def write_dicom(folder: str | Path, patient_name: str, patient_id: str, instance: int, z: float,
                series_uid: str | None = None, series_number: int = 3, lesion: bool = False, seed: int = 0,
                **tags) -> Path:
    """A copy of MR_small.dcm with these patient tags, in one series, at slice position ``z``; the file is
    named by its SOP Instance UID. ``tags``: further attributes to set (e.g. PhotometricInterpretation)."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    rng = np.random.default_rng(seed)
    a = ds.pixel_array.astype(np.int32)
    a = a + rng.normal(0, 20, a.shape).astype(np.int32)
    if lesion:
        a[24:34, 28:38] = 4000
    ds.PixelData = np.clip(a, -32768, 32767).astype(np.int16).tobytes()
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.InstitutionName, ds.AccessionNumber = "19700101", "St Example Hospital", "ACC-424242"
    ds.ReferringPhysicianName = "Who^Doctor"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesNumber, ds.InstanceNumber = series_number, instance
    ds.ImagePositionPatient = [-83.9063, -91.2, float(z)]
    for k, v in tags.items():
        setattr(ds, k, v)
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_seg(folder: str | Path, sources: list[Path], masks: list[np.ndarray], name: str = "seg.dcm",
              fractional: bool = False) -> Path:
    """A DICOM Segmentation (one segment, BINARY 1-bit or FRACTIONAL 8-bit) with one frame per mask, frame k
    referencing ``sources[k]`` by its SOP Instance UID (Derivation Image Sequence), as SEG writers do; it
    carries the source's patient tags (a SEG belongs to its patient)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import pack_bits
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    refs = [pydicom.dcmread(p, stop_before_pixels=True) for p in sources]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SEG"
    for k in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID"):
        setattr(ds, k, refs[0].get(k, ""))
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), 99, 1
    ds.SegmentationType = "FRACTIONAL" if fractional else "BINARY"
    if fractional:
        ds.SegmentationFractionalType, ds.MaximumFractionalValue = "PROBABILITY", 255
    seg = Dataset()
    seg.SegmentNumber, seg.SegmentLabel, seg.SegmentAlgorithmType = 1, "lesion", "MANUAL"
    ds.SegmentSequence = Sequence([seg])
    ds.Rows, ds.Columns = masks[0].shape
    ds.NumberOfFrames = len(masks)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated = ds.BitsStored = 8 if fractional else 1
    ds.HighBit = ds.BitsStored - 1
    frames = []
    for r in refs:
        src = Dataset()
        src.ReferencedSOPClassUID, src.ReferencedSOPInstanceUID = r.SOPClassUID, r.SOPInstanceUID
        der = Dataset()
        der.SourceImageSequence = Sequence([src])
        item, ident = Dataset(), Dataset()
        ident.ReferencedSegmentNumber = 1
        item.DerivationImageSequence = Sequence([der])
        item.SegmentIdentificationSequence = Sequence([ident])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    stack = np.stack([np.asarray(m) for m in masks])
    ds.PixelData = (stack.astype(np.uint8).tobytes() if fractional else pack_bits(stack > 0))
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / name
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_series(folder: str | Path, patient_id: str, n: int = 8, seed: int = 0, lesion_slices: tuple = (),
                    series_number: int = 2) -> tuple[list[Path], list[np.ndarray]]:
    """A CT series of ``n`` slices made from pydicom's ``CT_small.dcm`` (128 x 128, Hounsfield units through its
    rescale -1024): each slice shifted by a pixel or two with noise, 5 mm apart; ``lesion_slices`` get a round
    hyperdense lesion (+300 HU, radius 5-8 px). Returns the files (in slice order) and the lesion masks."""
    import pydicom
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    base = pydicom.dcmread(pydicom_file("CT_small.dcm")).pixel_array.astype(np.int32)
    yy, xx = np.mgrid[:128, :128]
    series_uid, paths, masks = generate_uid(), [], []
    for k in range(n):
        ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
        a = np.roll(base, tuple(int(v) for v in rng.integers(-2, 3, 2)), (0, 1)) + rng.normal(0, 8, base.shape)
        m = np.zeros((128, 128), bool)
        if k in lesion_slices:
            r = 5 + 3 * np.sin(np.pi * (k - min(lesion_slices) + 0.5) / len(lesion_slices))
            m = (yy - 70) ** 2 + (xx - 60) ** 2 <= r * r
            a[m] += 300
        ds.PixelData = np.clip(a, -32768, 32767).astype(np.int16).tobytes()
        ds.PatientName, ds.PatientID = f"Test^{patient_id}", patient_id
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, series_number, k + 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [-158.135803, -179.035797, -75.7 + 5.0 * k]
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        masks.append(m.astype(np.uint8))
    return paths, masks


def make_ct_set(root: str | Path, category: str = "chest") -> Path:
    """An MVTec-layout CT set of DICOM series: two training series, a normal test series and a lesion series
    (lesion on slices 3-6 of 10) whose DICOM SEG lies in ``ground_truth/lesion``; one patient per series."""
    cat = Path(root) / category
    for i in range(2):
        write_ct_series(cat / "train/good", f"PID-10{i}", 8, seed=i, series_number=2 + i)
    write_ct_series(cat / "test/good", "PID-200", 8, seed=10, series_number=4)
    paths, masks = write_ct_series(cat / "test/lesion", "PID-300", 10, seed=20, lesion_slices=(3, 4, 5, 6),
                                   series_number=5)
    write_seg(cat / "ground_truth/lesion", paths[3:7], masks[3:7])
    return Path(root)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    counts = [int(v) for v in sys.argv[2:5]] or [4, 2, 3]
    make_brain_set(out, *counts)
    print(f"wrote {out} ({counts[0]} train, {counts[1]} good test, {counts[2]} lesion volumes)")
