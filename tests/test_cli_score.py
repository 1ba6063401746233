"""`uadlab score --out` writes heatmaps (PNG per image, NIfTI per volume) and scores; score and eval show progress."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from meddata import make_brain_set
from uadlab.cli import main


@pytest.fixture(scope="module")
def run_dir(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["fit", "--data", str(tiny_demo / "grass"), "--methods", "anomalydino", "--image-size", "64",
                 "--out", str(out)]) == 0
    return next(out.iterdir())


def test_score_writes_heatmaps_in_the_viewers_colours(run_dir, tiny_demo, tmp_path, capsys):
    folder = tiny_demo / "grass" / "test" / "hole"
    capsys.readouterr()
    assert main(["score", "--run", str(run_dir), str(folder), "--out", str(tmp_path / "maps")]) == 0
    cap = capsys.readouterr()
    assert "scoring" in cap.err and "100.0%" in cap.err  # the progress bar
    names = sorted(p.name for p in folder.glob("*.png"))
    pngs = sorted((tmp_path / "maps").glob("*_anomalydino_heatmap.png"))
    assert [p.name for p in pngs] == [n[:-4] + "_anomalydino_heatmap.png" for n in names]
    src = Image.open(folder / names[0])
    heat = Image.open(pngs[0])
    assert heat.size == src.size and heat.mode == "RGB"
    assert len(np.unique(np.asarray(heat).reshape(-1, 3), axis=0)) > 10  # a colour map, not a flat image
    rows = list(csv.DictReader(open(tmp_path / "maps" / "scores.csv")))
    assert [r["image"] for r in rows] == names and all(float(r["anomalydino"]) >= 0 for r in rows)


def test_eval_shows_progress(run_dir, tiny_demo, capsys):
    assert main(["eval", "--run", str(run_dir), "--data", str(tiny_demo / "grass")]) == 0
    cap = capsys.readouterr()
    assert "extracting features" in cap.err and "scoring" in cap.err and "100.0%" in cap.err
    assert "| anomalydino |" in cap.out


def test_score_writes_a_nifti_volume_per_scan(tmp_path, capsys):
    import nibabel as nib

    data = make_brain_set(tmp_path / "brain", n_train=2, n_good=1, n_lesion=1)
    assert main(["fit", "--data", str(data / "brain"), "--methods", "anomalydino", "--image-size", "64",
                 "--out", str(tmp_path / "runs")]) == 0
    run = next((tmp_path / "runs").iterdir())
    vol = data / "brain" / "test" / "lesion" / "patient00.nii.gz"
    assert main(["score", "--run", str(run), str(vol), "--out", str(tmp_path / "maps")]) == 0
    out = nib.load(tmp_path / "maps" / "patient00_anomalydino_heatmap.nii.gz")
    ref = nib.load(vol)
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
    assert float(np.asarray(out.dataobj).max()) > 0
