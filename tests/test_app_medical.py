"""The app with scans: NIfTI volumes uploaded as loose files (training volumes, test volumes, a lesion mask
volume), trained with the intensity baseline, shown in the viewer slice by slice (the whole volume browsable,
slices computed on demand), and exported as the viewer shows them (PNGs in its colours at the source
resolution, a CSV of scores and decisions) and as NIfTI volumes aligned with the input (same shape and affine)."""
from __future__ import annotations

import base64
import csv
import gzip
import html
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from PIL import Image

from conftest import load_data
from meddata import make_brain_set


def test_nifti_upload_train_view_export(app, tmp_path):
    import nibabel as nib

    root = make_brain_set(tmp_path / "set", n_train=2, n_good=1, n_lesion=1) / "brain"
    train = sorted(str(p) for p in (root / "train/good").glob("*.nii.gz"))
    test = sorted(str(p) for p in (root / "test").rglob("*.nii.gz"))
    masks = sorted(str(p) for p in (root / "ground_truth").rglob("*.nii.gz"))
    user = app.header.on_start(None)[0]
    md, preview, bad, _ = load_data(app, user, "Upload", train_files=train, test_files=test, mask_files=masks,
                                    unmasked_normal=True)
    n_slices = nib.load(train[0]).shape[2]
    assert bad == "No bad files." and len(preview) > 8, bad
    counts = [int(c) for c in md.split("\n")[-1].strip("| ").split(" | ")[:3]]
    assert counts[0] > n_slices and counts[1] > 0 and counts[2] > 0, md  # slices, not files; lesion slices labelled 1

    _, table, run_id = app.train.on_train(user, "efficientnet_lite0", ["intensity"], "quick", 64, "other categories",
                                          "", "percentile:0.5,99.9", progress=lambda *a, **k: None)
    assert app.W.Workspace(user).runs.get(run_id).info["window"]["spec"] == "percentile:0.5,99.9"  # saved with it
    assert table["pixel AUROC"][0] > 0.8, table
    lesion = [n for n in app.on_run_change(user, run_id)[0]["choices"] if "patient00" in str(n)]
    names = [n if isinstance(n, str) else n[1] for n in lesion][:3]
    viewer, _, _ = app.compare.on_compare(user, run_id, names, "dataset labels")
    assert all(n.replace("#", "") in viewer.replace("#", "") for n in names)

    out = Path(app.compare.on_export_maps(user, run_id, names, 1.0, progress=lambda *a, **k: None,
                                          scope="the images shown"))
    with zipfile.ZipFile(out) as zf:
        files = zf.namelist()
        assert sum(f.endswith("_heatmap.png") for f in files) == len(names)
        volume = lambda end: nib.Nifti1Image.from_bytes(gzip.decompress(zf.read(  # noqa: E731
            next(f for f in files if f.endswith(end)))))
        heat, region = volume("intensity_heatmap.nii.gz"), volume("intensity_region.nii.gz")
    ref = nib.load(next(p for p in test if "patient00" in p))
    mask = np.asarray(nib.load(masks[0]).dataobj) > 0
    assert heat.shape == ref.shape and np.allclose(heat.affine, ref.affine)
    h = np.asarray(heat.dataobj)
    assert h[mask].mean() > 2 * h[~mask].mean()  # the exported heatmap lies on the lesion, in place
    assert h[mask].mean() > 1.5 * max(np.flip(h, a)[mask].mean() for a in (0, 1))  # (not mirrored in-plane)
    assert np.array_equal(np.asarray(region.dataobj) > 0, h >= 1.0)


def _payload(page: str) -> dict:
    return json.loads(html.unescape(re.search(r'data-payload="([^"]*)"', page).group(1)))


def test_a_volume_is_browsed_whole_and_exported_as_shown(app, tmp_path):
    """Compare picks one slice per volume (lesion and normal volumes alternating); each names its volume with
    ALL its test slices (own numbering, findings marked); a slice not sent is computed on demand and equals the
    run's own map of it; the highest-score jump scores every slice; the export covers every test image at the
    source resolution in the viewer's colours at the viewer's threshold, with a CSV of scores and decisions."""
    from uadlab.ui import compare_tab
    from uadlab.viz import heat_layer

    root = make_brain_set(tmp_path / "set", n_train=2, n_good=1, n_lesion=1) / "brain"
    user = app.header.on_start(None)[0]
    load_data(app, user, "Upload", train_files=sorted(str(p) for p in (root / "train/good").glob("*.nii.gz")),
              test_files=sorted(str(p) for p in (root / "test").rglob("*.nii.gz")),
              mask_files=sorted(str(p) for p in (root / "ground_truth").rglob("*.nii.gz")), unmasked_normal=True)
    _, _, run_id = app.train.on_train(user, "efficientnet_lite0", ["intensity"], "quick", 64, "other categories",
                                      "", "auto", progress=lambda *a, **k: None)
    ws = app.W.Workspace(user)
    run, test = ws.runs.get(run_id), ws.runs.dataset(run_id).test
    assert run.window.spec == "auto" and run.window.lo is not None  # fitted on the training volumes
    names = app.on_run_change(user, run_id)[0]["value"]
    assert [n.split("#")[0] for n in names] == ["control00.nii.gz", "patient00.nii.gz"], names  # one per volume
    assert next(s for s in test if s.name == names[1]).label == 1  # the lesion volume's pick shows the lesion

    p = _payload(compare_tab.on_compare(user, run_id, names, "dataset labels")[0])
    vols = {v["name"]: v for v in p["volumes"].values()}
    lesion = [s for s in test if s.name.startswith("patient00")]
    assert [sl["name"] for sl in vols["patient00.nii.gz"]["slices"]] == [s.name for s in lesion]
    assert [sl["finding"] for sl in vols["patient00.nii.gz"]["slices"]] == [s.label == 1 for s in lesion]
    assert vols["patient00.nii.gz"]["slices"][0]["label"] == f"z {lesion[0].source.index}"  # the volume's numbering
    it = p["items"][1]
    assert it["unit"] == "" and it["img"] is None and it["win"] == [pytest.approx((run.window.lo + run.window.hi) / 2),
                                                                   pytest.approx(run.window.hi - run.window.lo)]
    handle = p["volumes"][it["vol"]]["handle"]
    k = next(j for j, s in enumerate(lesion) if s.name not in names)
    got = compare_tab.viewer_slice([handle, k])
    assert got["name"] == lesion[k].name and got["zi"] == k
    scored, _ = ws.runs.scored(run_id, [lesion[k]])
    want = scored["intensity"].maps[0]
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(got["panels"][0]["heat"].split(",")[1]))))
    lo, hi = got["panels"][0]["lo"], got["panels"][0]["hi"]
    assert np.allclose(lo + (sent[..., 0] * 256.0 + sent[..., 1]) * (hi - lo) / 65535, want, atol=1e-3 * (hi - lo) + 1e-6)
    scores = compare_tab.viewer_volume_scores(handle)["intensity"]
    assert len(scores) == len(lesion) and np.isfinite(scores).all()
    # only a handle the server handed out opens a volume; a malformed request is an error, not a crash
    assert compare_tab.viewer_slice(["x" * 22, 0]) == {"error": "this volume is no longer open: press Show again"}
    assert "error" in compare_tab.viewer_slice(handle) and "error" in compare_tab.viewer_slice([handle, 10**6])

    out = Path(compare_tab.on_export_maps(user, run_id, names, 1.25, progress=lambda *a, **k: None))
    with zipfile.ZipFile(out) as zf:
        files = set(zf.namelist())
        rows = list(csv.DictReader(io.StringIO(zf.read("scores.csv").decode())))
        assert [r["image"] for r in rows] == [s.name for s in test]  # every test image, not only those shown
        for r in rows:
            assert r["intensity decision"] == ("anomalous" if float(r["intensity score"]) >= 1.25 else "normal")
        base = "patient00_z" + lesion[k].name.split("#z")[1]
        assert {f"intensity/{base}_heatmap.png", f"intensity/{base}_overlay.png", f"intensity/{base}_region.png",
                "volumes/patient00_intensity_heatmap.nii.gz", "colourbar.png", "README.txt"} <= files
        assert not any(".nii.gz_" in f or "#" in f for f in files)
        heat = np.asarray(Image.open(io.BytesIO(zf.read(f"intensity/{base}_heatmap.png"))))
        region = np.asarray(Image.open(io.BytesIO(zf.read(f"intensity/{base}_region.png"))))
    left, top, right, bottom = run.backbone.view_box(lesion[k].load().size)  # the part the network sees
    assert heat.shape == (bottom - top, right - left, 3)  # at the slice's own resolution, as the viewer shows it
    assert np.array_equal(heat, heat_layer(want, (right - left, bottom - top)))  # in the viewer's colours
    share = float(next(r for r in rows if r["image"] == lesion[k].name)["intensity share >= threshold"])
    assert abs(share - (region > 0).mean()) < 1e-4
    shown = Path(compare_tab.on_export_maps(user, run_id, names, 1.25, lambda *a, **k: None, "the images shown"))
    with zipfile.ZipFile(shown) as zf:
        assert len(list(csv.DictReader(io.StringIO(zf.read("scores.csv").decode())))) == len(names)


def test_dicom_upload_with_png_masks_and_a_seg(app, tmp_path):
    """Loose DICOM files uploaded with masks: PNGs named after the .dcm files pair by name, a DICOM SEG by the
    SOP Instance UIDs it references; either way the test slices get labels and masks (pixel metrics possible)."""
    from meddata import write_ct_series, write_seg

    train, _ = write_ct_series(tmp_path / "train", "PID-1", 4, seed=1)
    test, masks = write_ct_series(tmp_path / "test", "PID-2", 5, seed=2, lesion_slices=(1, 2), series_number=7)
    seg = write_seg(tmp_path / "seg", test[1:3], masks[1:3])
    user = app.header.on_start(None)[0]
    load_data(app, user, "Upload", train_files=[str(p) for p in train], test_files=[str(p) for p in test],
              mask_files=[str(seg)])
    ds = app.W.Workspace(user).data.dataset(app.W.Workspace(user).data.choice())
    assert [s.label for s in ds.test] == [0, 1, 1, 0, 0] and ds.has_masks
    assert int(ds.test[1].load_mask().sum()) == int(masks[1].sum()) > 0
    pngs = tmp_path / "png"
    pngs.mkdir()
    for f, m in zip(test[1:3], masks[1:3]):
        Image.fromarray(m * 255).save(pngs / f"{f.stem}_mask.png")
    load_data(app, user, "Upload", train_files=[str(p) for p in train], test_files=[str(p) for p in test],
              mask_files=[str(p) for p in pngs.iterdir()], unmasked_normal=True)
    ds = app.W.Workspace(user).data.dataset(app.W.Workspace(user).data.choice())
    labels = {s.name: s.label for s in ds.test}
    assert sorted(labels.values()) == [0, 0, 0, 1, 1] and ds.has_masks
    assert all(int(s.load_mask().sum()) > 0 for s in ds.test if s.label == 1)
