"""DICOM and NIfTI reading, intensity windows, empty slices, the patient split guard, PHI, NIfTI export.

Real files: pydicom's CT_small.dcm (CT, rescale -1024), MR_small.dcm (MR, window 600/1600), MR_small_RLE.dcm
(RLE), JPEG2000.dcm (JPEG 2000), rtdose.dcm (15 frames), MR_small_jpeg_ls_lossless.dcm (JPEG-LS: no handler
installed here); nibabel's anatomical.nii (T1 brain, LAS) and example4d.nii.gz (4-D).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from meddata import anatomical_path, make_brain_set, pydicom_file, write_dicom, write_seg
from uadlab import medical
from uadlab.data import DataError, load_data, load_files, load_folder, load_mvtec
from uadlab.features import FeatureCache
from uadlab.pipeline import Run, RunConfig


# ---- DICOM: real files ------------------------------------------------------------------------------------
def test_ct_rescale_to_hounsfield_units():
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    (s,) = load_files([pydicom_file("CT_small.dcm")])
    want = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)  # pydicom's reference
    np.testing.assert_allclose(s.pixels().values, want)
    assert float(ds.RescaleIntercept) == -1024 and s.pixels().values.min() < 0  # air is negative HU
    assert s.name == "series1/instance0001" and s.load().size == (128, 128)


def test_mr_file_window_and_compressed_syntaxes():
    (mr,) = load_files([pydicom_file("MR_small.dcm")])
    (rle,) = load_files([pydicom_file("MR_small_RLE.dcm")])
    np.testing.assert_array_equal(mr.pixels().values, rle.pixels().values)  # RLE decodes losslessly
    x = mr.pixels().values
    # the file's own window (centre 600, width 1600, LINEAR) is the default display
    want = np.clip((x - 599.5) / 1599 + 0.5, 0, 1)
    np.testing.assert_allclose(np.asarray(mr.load())[..., 0], (want * 255).round(), atol=1)
    (j2k,) = load_files([pydicom_file("JPEG2000.dcm")])
    assert j2k.load().size == (256, 1024)
    with pytest.raises(DataError, match=r"JPEG-LS Lossless Image Compression: no pixel handler installed \(install"):
        load_files([pydicom_file("MR_small_jpeg_ls_lossless.dcm")])


def test_multiframe_file_is_one_sample_per_frame():
    ds = pydicom.dcmread(pydicom_file("rtdose.dcm"))
    samples = load_files([pydicom_file("rtdose.dcm")])
    assert len(samples) == 15 and samples[3].name.endswith("/frame003")
    np.testing.assert_array_equal(samples[3].pixels().values, ds.pixel_array[3].astype(np.float32))


def test_enhanced_multiframe_rescales_per_frame(tmp_path):
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    a = ds.pixel_array
    ds.PixelData = np.stack([a, a]).tobytes()
    ds.NumberOfFrames = 2
    for k in ("WindowCenter", "WindowWidth"):
        delattr(ds, k)

    def group(slope, centre=None):
        g = Dataset()
        t = Dataset()
        t.RescaleSlope, t.RescaleIntercept, t.RescaleType = slope, -100, "US"
        g.PixelValueTransformationSequence = [t]
        if centre is not None:
            v = Dataset()
            v.WindowCenter, v.WindowWidth = centre, 200
            g.FrameVOILUTSequence = [v]
        return g

    ds.PerFrameFunctionalGroupsSequence = [group(1), group(2, centre=1000)]
    shared = Dataset()
    v = Dataset()
    v.WindowCenter, v.WindowWidth = 500, 1000
    shared.FrameVOILUTSequence = [v]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    f0, f1 = load_files([tmp_path / "enhanced.dcm"])
    np.testing.assert_allclose(f0.pixels().values, a * 1.0 - 100)
    np.testing.assert_allclose(f1.pixels().values, a * 2.0 - 100)
    # frame 1 has its own window (1000/200), frame 0 the shared one (500/1000)
    x0, x1 = f0.pixels().values, f1.pixels().values
    np.testing.assert_allclose(np.asarray(f0.load())[..., 0], (np.clip((x0 - 499.5) / 999 + .5, 0, 1) * 255).round(), atol=1)
    np.testing.assert_allclose(np.asarray(f1.load())[..., 0], (np.clip((x1 - 999.5) / 199 + .5, 0, 1) * 255).round(), atol=1)


def test_monochrome1_is_inverted_after_the_window(tmp_path):
    p2 = write_dicom(tmp_path / "m2", "A^B", "1", 1, 0.0, WindowCenter=800, WindowWidth=400)
    p1 = write_dicom(tmp_path / "m1", "A^B", "1", 1, 0.0, WindowCenter=800, WindowWidth=400,
                     PhotometricInterpretation="MONOCHROME1")
    (m2,), (m1,) = load_files([p2]), load_files([p1])
    x = m2.pixels().values
    g2, g1 = np.asarray(m2.load())[..., 0].astype(int), np.asarray(m1.load())[..., 0].astype(int)
    np.testing.assert_array_equal(g1, 255 - g2)
    assert (g1[x < 600] == 255).all() and (g1[x > 1000] == 0).all()  # below the window: white in MONOCHROME1
    # a fixed window replaces the file's, and the inversion still comes last
    w = medical.Window.parse("800/400")
    assert (np.asarray(w.render(m1.pixels()))[..., 0][x < 600] == 255).all()


def test_series_sorted_along_the_normal_and_named_without_file_names(tmp_path):
    uid = pydicom.uid.generate_uid()
    # instance numbers disagree with positions: the position along the normal wins
    paths = [write_dicom(tmp_path / "good", "A^B", "P1", inst, z, series_uid=uid, seed=inst)
             for inst, z in ((1, 20.0), (2, 0.0), (3, 10.0))]
    ds = load_folder(tmp_path / "good")
    assert [s.name for s in ds.train] == ["series3/instance0002", "series3/instance0003", "series3/instance0001"]
    assert not any(p.stem in s.name for p in paths for s in ds.train)  # the UID file names never show


def test_bad_dicom_files_are_named_by_position(tmp_path):
    shutil.copy(pydicom_file("MR_truncated.dcm"), tmp_path / "1.2.840.99.1.dcm")  # real truncated file
    (tmp_path / "1.2.840.99.2.dcm").write_text("not dicom")
    shutil.copy(pydicom_file("rtplan.dcm"), tmp_path / "1.2.840.99.3.dcm")  # a DICOM without an image
    write_dicom(tmp_path, "A^B", "1", 1, 0.0)
    with pytest.warns(UserWarning):
        ds = load_folder(tmp_path, skip_bad=True)
    assert len(ds.train) == 1 and ds.summary()["skipped"] == 3
    text = " ".join(ds.warnings)
    assert "DICOM file 3 of 4 (in file-name order): not a readable DICOM file" in text  # 1.2.826... sorts first
    assert "holds no image (a RTPLAN object)" in text and "cannot decode the pixel data" in text
    assert "1.2.840.99" not in text  # UID file names never show


# ---- NIfTI -------------------------------------------------------------------------------------------------
def test_nifti_slices_canonical_orientation(tmp_path):
    img = nib.load(anatomical_path())  # real T1, LAS
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    flipped = nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine @ np.diag([-1, 1, 1, 1]) @
                              np.array([[1, 0, 0, img.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    assert nib.aff2axcodes(flipped.affine) == ("R", "A", "S")
    nib.save(flipped, tmp_path / "flipped.nii.gz")
    a = load_data(str(anatomical_path())).train
    b = load_data(str(tmp_path / "flipped.nii.gz")).train
    assert [s.name for s in a][:2] == ["anatomical.nii#z000", "anatomical.nii#z001"] and len(a) == len(b) == 25
    for sa, sb in zip(a[::6], b[::6]):
        np.testing.assert_array_equal(sa.pixels().values, sb.pixels().values)
    # axial slices: rows = y (anterior at the top), columns = x (the RAS x axis)
    canon = np.asarray(nib.as_closest_canonical(img).dataobj, np.float32)
    np.testing.assert_array_equal(a[7].pixels().values, np.rot90(canon[:, :, 7]))
    sag = load_data(str(anatomical_path()), axis="x").train
    assert sag[0].name.startswith("anatomical.nii#x") and sag[0].pixels().values.shape == (25, 41)
    with pytest.raises(DataError, match="4-D file of 2 volumes"):
        load_data(str(Path(nib.testing.data_path) / "example4d.nii.gz"))
    (tmp_path / "bad.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(DataError, match=r"^bad.nii.gz: not a readable NIfTI file") as e:
        load_data(str(tmp_path / "bad.nii.gz"))
    assert str(tmp_path) not in str(e.value)  # never a server path


def test_mvtec_volumes_masks_and_labels(tmp_path):
    ds = load_mvtec(make_brain_set(tmp_path, n_train=1, n_good=1, n_lesion=1))
    assert ds.has_masks and len(ds.train) == 25
    lesion = [s for s in ds.test if s.defect == "lesion"]
    assert {s.label for s in lesion} == {0, 1}  # slices without lesion are normal
    assert all(s.label == 0 for s in ds.test if s.defect == "good")
    for s in lesion:
        m = s.load_mask()
        assert (m.sum() > 0) == (s.label == 1)
        if s.label == 1:  # the mask lies on the hyperintense voxels of the slice
            x = s.pixels().values
            assert x[m > 0].min() > np.percentile(x, 99) * 0.99
    assert any("patient ids unknown" in w for w in ds.warnings) and ds.summary()["skipped"] == 0


def test_zip_of_volumes(tmp_path):
    import zipfile

    root = make_brain_set(tmp_path / "set", n_train=1, n_good=1, n_lesion=1)
    with zipfile.ZipFile(tmp_path / "vols.zip", "w") as z:
        for p in sorted(root.rglob("*.nii.gz")):
            z.write(p, p.relative_to(root))
    ds = load_data(str(tmp_path / "vols.zip"))  # .nii.gz members are volumes, not nested archives
    assert ds.has_masks and len(ds.train) == 25 and ds.train[0].name == "brain/train/good/subject00.nii.gz#z000"


def test_empty_slices_are_skipped_and_counted(tmp_path):
    img = nib.load(anatomical_path())
    v = np.zeros(img.shape[:2] + (31,), np.float32)
    v[:, :, 3:28] = np.asarray(img.dataobj)
    v[10:12, 10:12, 1] = 500  # a speck of 4 voxels: under 1 % of the slice, still empty
    m = np.zeros(v.shape, np.uint8)
    m[5:9, 5:9, 30] = 1  # an annotated but otherwise empty slice is kept
    for d in ("train/good", "test/bad", "ground_truth/bad"):
        (tmp_path / "c" / d).mkdir(parents=True)
    nib.save(nib.Nifti1Image(v, img.affine), tmp_path / "c/train/good/a.nii.gz")
    nib.save(nib.Nifti1Image(v, img.affine), tmp_path / "c/test/bad/b.nii.gz")
    nib.save(nib.Nifti1Image(m, img.affine), tmp_path / "c/ground_truth/bad/b_mask.nii.gz")
    ds = load_mvtec(tmp_path / "c")
    assert len(ds.train) == 25 and [s.name for s in ds.train][0] == "c/train/good/a.nii.gz#z003"
    assert len(ds.test) == 26 and ds.test[-1].name.endswith("#z030") and ds.test[-1].label == 1
    assert ds.summary()["empty_slices"] == 6 + 5


# ---- windows ------------------------------------------------------------------------------------------------
def test_window_parsing_and_presets():
    w = medical.Window.parse("lung")
    assert (w.lo, w.hi) == (-1350.0, 150.0)
    assert medical.Window.parse("40/400").lo == -160.0
    assert medical.Window.parse("percentile").percentiles == (0.5, 99.5)
    for bad in ("nope", "percentile:90,10", "40/-1"):
        with pytest.raises(ValueError, match="window"):
            medical.Window.parse(bad)


def test_percentile_window_fitted_on_train_only_and_keys_the_cache(tmp_path):
    ds = load_mvtec(make_brain_set(tmp_path / "d", n_train=1, n_good=1, n_lesion=1))
    run = Run(RunConfig(methods=["intensity"], preset="tiny", image_size=64, window="percentile:1,99"),
              workdir=tmp_path / "runs", cache=FeatureCache(tmp_path / "cache"))
    run.fit(ds.train)
    allv = np.concatenate([s.pixels().values.ravel() for s in ds.train])  # 33*41 px a slice: all sampled
    np.testing.assert_allclose([run.window.lo, run.window.hi], np.percentile(allv, [1, 99]), rtol=1e-5)
    assert run.heads["intensity"].fit_record.window["lo"] == run.window.lo
    # the same test image under another window is another cache entry with other pixels
    s = ds.test[5]
    a, b = run.window.bind([s])[0], medical.Window.parse("minmax").bind([s])[0]
    assert a.content_key() != b.content_key() != s.content_key()
    fa, fb = run.features([s]).maps["pixels"], run.cache.extract(run.backbone, [b]).maps["pixels"]
    assert not np.allclose(fa.numpy(), fb.numpy())
    assert Run.load(run.save(), cache=run.cache).window == run.window  # the fitted window comes back with the run


def test_sixteen_bit_png_window(tmp_path):
    a = np.tile(np.linspace(1000, 3000, 64), (64, 1)).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "x.png")
    (s,) = load_files([tmp_path / "x.png"])
    assert np.asarray(s.load()).max() <= 12  # auto: the full 16-bit range, as before
    w = medical.Window.parse("minmax").bind([s])[0]
    g = np.asarray(w.load())[..., 0]
    assert g.min() == 0 and g.max() == 255


def test_auto_window_is_fitted_on_the_training_intensities(tmp_path):
    """A 16-bit MRI stored in 1000..3000 of 0..65535: the default window (auto) of a run is the 0.5..99.5 %
    percentile window of the TRAINING images, so the image fills the grey range instead of lying near black;
    8-bit images do not count; a DICOM file keeps its own VOI under auto; an old run's unfitted auto stays."""
    rng = np.random.default_rng(0)
    for k in range(3):
        a = (1000 + rng.random((48, 48)) * 2000).astype(np.uint16)
        Image.fromarray(a).save(tmp_path / f"mri{k}.png")
    Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8)).save(tmp_path / "grey8.png")
    train = load_files([tmp_path / f"mri{k}.png" for k in range(2)] + [tmp_path / "grey8.png"])
    (test,) = load_files([tmp_path / "mri2.png"])
    assert [s.has_intensities() for s in train] == [True, True, False]
    w = medical.Window.parse("auto").fit(train)
    allv = np.concatenate([np.asarray(Image.open(tmp_path / f"mri{k}.png"), np.float64).ravel() for k in range(2)])
    np.testing.assert_allclose([w.lo, w.hi], np.percentile(allv, [0.5, 99.5]), rtol=1e-6)
    assert np.asarray(test.load()).max() <= 12  # unbound: the full 16-bit range (what the issue saw)
    g = np.asarray(w.bind([test])[0].load())[..., 0]
    assert g.max() == 255 and g.min() <= 3 and g.mean() > 90  # through the fitted window: the whole grey range
    assert medical.Window.from_dict(w.to_dict()) == w and "percentile 0.5-99.5" in w.describe()
    assert medical.Window.from_dict({"spec": "auto", "lo": None, "hi": None}).bind([test]) == [test]  # old runs
    # the run's default: the same window, saved with the run
    run = Run(RunConfig(methods=["intensity"], preset="tiny", image_size=64), workdir=tmp_path / "runs",
              cache=FeatureCache(tmp_path / "cache"))
    run.fit(train)
    assert (run.window.lo, run.window.hi) == (w.lo, w.hi)
    # a DICOM file with its own VOI: auto keeps the file's window, and the viewer starts there (in MR units)
    (mr,) = load_files([pydicom_file("MR_small.dcm")])
    assert medical.Window.parse("auto").fit([mr]).lo is None
    assert w.view_window(mr.pixels()) == (600.0, 1600.0)
    assert medical.Window.parse("lung").view_window(mr.pixels()) == (-600.0, 1500.0)
    (ct,) = load_files([pydicom_file("CT_small.dcm")])
    assert ct.pixels().unit == "HU" and mr.pixels().unit == ""


# ---- DICOM masks --------------------------------------------------------------------------------------------
def _dicom_lesion_set(root: Path, masks: str) -> tuple[Path, list[Path]]:
    """An MVTec-layout DICOM set: 3 train slices, 2 good test slices, a 3-slice lesion series whose middle slice
    holds the lesion; its masks as PNGs named after the .dcm files, or one DICOM SEG in ground_truth/bad."""
    c = root / "c"
    uids = [pydicom.uid.generate_uid() for _ in range(3)]
    for i in range(3):
        write_dicom(c / "train/good", "Doe^Jane", "PID-1111", i + 1, 5.0 * i, uids[0], 3, seed=i)
    for i in range(2):
        write_dicom(c / "test/good", "Roe^Rich", "PID-2222", i + 1, 5.0 * i, uids[1], 4, seed=10 + i)
    bad = [write_dicom(c / "test/bad", "Poe^Edgar", "PID-3333", i + 1, 5.0 * i, uids[2], 5, seed=20 + i,
                       lesion=i == 1) for i in range(3)]
    lesion = np.zeros((64, 64), np.uint8)
    lesion[24:34, 28:38] = 1
    gt = c / "ground_truth/bad"
    gt.mkdir(parents=True)
    if masks == "png":
        for i, f in enumerate(bad):
            Image.fromarray(lesion * 255 * (i == 1)).save(gt / f"{f.stem}_mask.png")
    else:
        frac = masks == "fractional"  # a probability of 200 / 255 (and 100 / 255 at a few pixels: below one half)
        marked = lesion * 200 if frac else lesion
        if frac:
            marked[10:12, 10:12] = 100
        write_seg(gt, bad[1:], [marked, np.zeros_like(lesion)], fractional=frac)
    return c, bad


@pytest.mark.parametrize("masks", ["png", "seg", "fractional"])
def test_dicom_masks_pair_by_file_name_or_seg_and_give_pixel_metrics(tmp_path, masks):
    c, bad = _dicom_lesion_set(tmp_path, masks)
    ds = load_mvtec(c)
    test_bad = [s for s in ds.test if s.defect == "bad"]
    assert len(test_bad) == 3 and not ds.warnings
    got = [s.load_mask() for s in test_bad]
    assert got[1] is not None and got[1].sum() == 100 and got[1][24:34, 28:38].all()
    if masks == "png":  # as for images: every slice of a defect folder is anomalous, its mask says where
        assert [s.label for s in test_bad] == [1, 1, 1] and ds.has_masks
    else:  # a SEG: the slices it marks are anomalous, the others of the series normal (empty masks)
        assert [s.label for s in test_bad] == [0, 1, 0] and got[0].sum() == got[2].sum() == 0 and ds.has_masks
    run = Run(RunConfig(methods=["intensity"], preset="tiny", image_size=64), workdir=tmp_path / "runs",
              cache=FeatureCache(tmp_path / "cache"))
    run.fit(ds.train)
    ev = run.evaluate([s for s in ds.test if s.label in (0, 1)])
    assert np.isfinite(ev["intensity"]["pixel_auroc"]) and ev["intensity"]["pixel_auroc"] > 0.8, ev["intensity"]
    # no file name (a UID) and no patient value in what the samples say
    uids = {f.stem for f in bad}
    assert not any(u in s.name for s in ds.test for u in uids)


def test_dicom_mask_errors_name_no_uid_and_seg_without_its_images(tmp_path):
    c, bad = _dicom_lesion_set(tmp_path, "png")
    gt = c / "ground_truth/bad"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(gt / f"{bad[0].stem}_mask.png")  # the wrong size
    with pytest.raises(DataError, match=r"c/test/bad/series5/instance0001: its mask is 32x32 px but the image is "
                                        r"64x64 px") as e:
        load_mvtec(c)
    assert bad[0].stem not in str(e.value)
    ds = load_mvtec(c, skip_bad=True)
    assert len([s for s in ds.test if s.defect == "bad"]) == 2 and "skipped" in ds.warnings[0]
    # a SEG whose images are not given: named by position, never by a UID
    other = write_dicom(tmp_path / "elsewhere", "Poe^Edgar", "PID-3333", 1, 0.0, seed=3)
    seg = write_seg(tmp_path / "lone", [other], [np.ones((64, 64), np.uint8)])
    with pytest.raises(DataError, match=r"DICOM SEG 1 of 1: none of the 1 images it segments is among the DICOM "
                                        r"files given with it") as e:
        load_files([bad[0], seg])
    assert pydicom.dcmread(other).SOPInstanceUID not in str(e.value)


# ---- patients -----------------------------------------------------------------------------------------------
def _dicom_set(root: Path, train_id: str, test_id: str) -> Path:
    """Three series (one per folder) of two patients."""
    uids = [pydicom.uid.generate_uid() for _ in range(3)]
    for i in range(4):
        write_dicom(root / "c/train/good", "Doe^Jane", train_id, i + 1, 5.0 * i, uids[0], 3, seed=i)
    for i in range(2):
        write_dicom(root / "c/test/good", "Roe^Rich", test_id, i + 1, 5.0 * i, uids[1], 4, seed=10 + i)
        write_dicom(root / "c/test/bad", "Roe^Rich", test_id, i + 1, 5.0 * i, uids[2], 5, seed=20 + i, lesion=True,
                    StudyInstanceUID="1.2.826.0.1.3680043.8.498.4242.x")  # invalid: pydicom's validation quotes it
    return root


def test_split_guard(tmp_path):
    with pytest.raises(DataError, match="1 patient appear in both train and test") as e:
        load_mvtec(_dicom_set(tmp_path / "a", "PID-8675309", "PID-8675309") / "c")
    assert "8675309" not in str(e.value) and "Doe" not in str(e.value)
    ds = load_mvtec(_dicom_set(tmp_path / "b", "PID-8675309", "PID-5551234") / "c")
    assert not ds.warnings and len(ds.train) == 4
    assert ds.test[0].name == "c/test/bad/series5/instance0001"


def test_phi_never_leaves_the_reader(tmp_path, capsys, caplog):
    """A DICOM set with names, ids, dates, an institution and UIDs through the CLI's fit, score and eval, a
    model card, a NIfTI and a PNG export: none of the identifying values appears in any written file, in the
    printed output or in the log."""
    from uadlab.cli import main
    from uadlab.hub import prepare_head

    data = _dicom_set(tmp_path / "data", "PID-8675309", "PID-5551234") / "c"
    phi = set()
    for p in data.rglob("*.dcm"):
        phi |= {v for v in medical.phi_values(pydicom.dcmread(p)) if len(v) >= 4}
    assert {"Doe^Jane", "PID-8675309", "19700101", "1.2.826.0.1.3680043.8.498.4242.x", "St Example Hospital"} <= phi
    out = tmp_path / "out"
    capsys.readouterr()  # what writing the files printed is not the reader's
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    assert main(["fit", "--data", str(data), "--methods", "intensity,patchcore", "--preset", "tiny",
                 "--image-size", "64", "--window", "percentile", "--out", str(out)]) == 0
    run_dir = next(out.iterdir())
    assert main(["eval", "--run", str(run_dir), "--data", str(data)]) == 0
    assert main(["score", "--run", str(run_dir), str(data / "test/bad")]) == 0
    run = Run.load(run_dir)
    card = prepare_head(run, "intensity", tmp_path / "card")
    assert "percentile 0.5-99.5" in (card / "README.md").read_text()
    sample = load_mvtec(data).test[0]
    medical.export_png(run.score([sample])["intensity"].maps[0], 2.0, tmp_path / "card" / "slice.png")
    medical.export_nifti({3: np.ones((41, 33))}, anatomical_path(), path=tmp_path / "card" / "map.nii.gz")
    text = capsys.readouterr()
    written = [p for p in (out, tmp_path / "card") for p in p.rglob("*") if p.is_file()]
    assert len(written) >= 8
    blobs = [p.read_bytes() for p in written] + [text.out.encode(), text.err.encode(), caplog.text.encode()]
    for value in phi:
        for blob in blobs:
            assert value.encode() not in blob, f"{value!r} leaked"
    assert b"series5/instance0001" in text.out.encode()  # samples are named by series / instance


# ---- export -------------------------------------------------------------------------------------------------
def test_export_nifti_aligned_with_the_input(tmp_path):
    ref = nib.load(anatomical_path())  # LAS: the export must undo the reorientation
    slices = {int(s.name[-3:]): s.pixels().values for s in load_data(str(anatomical_path())).train}
    back = nib.load(medical.export_nifti(slices, anatomical_path(), path=tmp_path / "x.nii.gz"))
    np.testing.assert_array_equal(back.affine, ref.affine)
    np.testing.assert_allclose(np.asarray(back.dataobj), np.asarray(ref.dataobj, np.float32))
    assert back.header["descrip"].tobytes().strip(b"\0") == b""  # "spm - 3D normalized" is not copied
    raw = medical.export_nifti({0: np.ones((41, 33))}, anatomical_path())
    assert nib.Nifti1Image.from_bytes(__import__("gzip").decompress(raw)).shape == ref.shape
    with pytest.raises(ValueError, match="display shape"):
        medical.export_nifti({0: np.ones((33, 41))}, anatomical_path())
    # a (crop x crop) map of the network goes back onto the slice: resize 80 then crop 64 of a 41 x 33 slice
    m = medical.to_input_geometry(np.ones((64, 64), np.float32), (41, 33), 80, 64)
    assert m.shape == (41, 33) and m[20, 16] == 1 and m[0, 16] < 0.5


def test_export_nifti_of_a_dicom_series(tmp_path):
    uid = pydicom.uid.generate_uid()
    for inst, z in ((1, 0.0), (2, 5.0), (3, 10.0), (4, 15.0)):
        write_dicom(tmp_path / "s", "A^B", "1", inst, z, uid, seed=inst, lesion=inst == 3, PixelSpacing=[0.5, 0.8])
    samples = load_folder(tmp_path / "s").train
    kept = [s for s in samples if s.name != "series3/instance0002"]  # as if the reader had skipped it as empty
    vol = nib.load(medical.export_nifti({k: s.pixels().values for k, s in enumerate(kept)}, [s.source for s in kept],
                                        path=tmp_path / "series.nii.gz"))
    assert vol.shape == (64, 64, 4) and nib.aff2axcodes(vol.affine) == ("L", "P", "S")  # DICOM LPS axes
    data = np.asarray(vol.dataobj)
    np.testing.assert_array_equal(data[:, :, 2].T, kept[1].pixels().values)  # the lesion slice, row-major back
    assert not data[:, :, 1].any()  # the skipped slice lies where it was, empty
    # voxel (i, j, k) -> RAS: DICOM's LPS position of the slice, row and column steps by Pixel Spacing
    d_row, d_col = 0.5, 0.8  # anisotropic: rows and columns cannot be swapped unnoticed
    lps = np.array([-83.9063 + 2 * d_col, -91.2 + 3 * d_row, 10.0])  # write_dicom's x, y; slice 2 at z = 10
    np.testing.assert_allclose(vol.affine @ [2, 3, 2, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-4)


def test_medical_bench_cli(tmp_path, capsys):
    """``uadlab bench`` on NIfTI volumes with a synthetic hyperintense lesion: the intensity baseline finds it."""
    from uadlab.cli import main

    make_brain_set(tmp_path, n_train=2, n_good=1, n_lesion=2)
    assert main(["bench", "--data", str(tmp_path), "--methods", "intensity", "--preset", "tiny",
                 "--image-size", "64", "--window", "percentile:0.5,99.9"]) == 0
    row = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| intensity | brain")][0]
    pixel_auroc = float(row.split("|")[6].split("[")[0])  # the cell is "value [lo, hi]" (bootstrap interval)
    assert pixel_auroc > 0.8
