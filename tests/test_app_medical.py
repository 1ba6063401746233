"""The app with scans: NIfTI volumes uploaded as loose files (training volumes, test volumes, a lesion mask
volume), trained with the intensity baseline, shown in the viewer slice by slice, and exported as NIfTI volumes
aligned with the input (same shape and affine) and as PNGs."""
from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import numpy as np

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

    out = Path(app.compare.on_export_maps(user, run_id, names, 1.0, progress=lambda *a, **k: None))
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
