import json
import subprocess
import sys

import pytest

from uadlab.cli import main


def test_bench_writes_all_columns(tiny_demo, tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "--data", str(tiny_demo), "--methods", "patchcore,anomalydino", "--categories", "brick,grass",
               "--image-size", "96", "--preset", "tiny", "--train-limit", "6", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| patchcore | brick |" in table and "| anomalydino | mean |" in table
    rows = json.loads(out.read_text())["rows"]
    keys = {"method", "category", "image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max",
            "aupro", "fit_s", "backbone_ms", "head_ms", "head_mb", "peak_rss_mb"}
    assert all(keys <= set(r) for r in rows) and len(rows) == 2 * 2 + 2
    assert all(0 <= r["image_auroc"] <= 1 and r["backbone_ms"] > 0 and r["head_ms"] > 0 for r in rows)
    # every AUROC / AP with its bootstrap 95% interval and the test images behind it; 4 normal images per
    # category are too few: the table marks the values and says why
    for r in rows[:4]:
        lo, hi = r["image_auroc_ci"]
        assert lo <= r["image_auroc"] <= hi and r["pixel_auroc_ci"][0] <= r["pixel_auroc"] <= r["pixel_auroc_ci"][1]
        assert (r["n_normal"], r["n_anomalous"]) == (4, 8) and "not meaningful" in r["note"]
    assert rows[-1]["category"] == "mean" and rows[-1]["n_normal"] == 8
    assert "†" in table and "not meaningful: fewer than 10" in table and "[bootstrap 95% interval" in table


def test_bench_multi_class_limit_per_category_and_seeds(tiny_demo, tmp_path, capsys):
    """``--multi-class --train-limit N`` trains one model on N images of EACH category; ``--seeds K`` repeats
    with K seeds: mean, standard deviation and the values per seed."""
    out = tmp_path / "s.json"
    assert main(["bench", "--data", str(tiny_demo), "--methods", "patchcore", "--categories", "brick,grass",
                 "--multi-class", "--train-limit", "3", "--seeds", "2", "--image-size", "64", "--preset", "tiny",
                 "--param", "patchcore.coreset_ratio=0.05", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("fitting patchcore on 6 normal images") == 2  # 3 brick + 3 grass, once per seed
    rows = json.loads(out.read_text())["rows"]
    assert [r["category"] for r in rows] == ["brick", "grass", "mean"]
    for r in rows:
        assert r["seeds"] == 2 and len(r["image_auroc_seeds"]) == 2
        assert r["image_auroc"] == pytest.approx(sum(r["image_auroc_seeds"]) / 2)
        assert r["image_auroc_std"] >= 0
    # the seeds reach the heads: a 5% coreset of another start and another split of the normals
    assert any(len(set(r["pixel_auroc_seeds"])) == 2 for r in rows)


def test_bench_multi_class_and_missing_masks(tiny_demo, tmp_path, capsys):
    import shutil

    for c in ("brick", "gravel"):
        shutil.copytree(tiny_demo / c, tmp_path / "d" / c, ignore=shutil.ignore_patterns("ground_truth"))
    rc = main(["bench", "--data", str(tmp_path / "d"), "--methods", "anomalydino", "--multi-class",
               "--image-size", "64", "--json", str(tmp_path / "m.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [r["category"] for r in rows] == ["brick", "gravel", "mean"]
    assert all(r["pixel_auroc"] is None and r["aupro"] is None for r in rows)  # missing, not zero
    assert "n/a" in capsys.readouterr().out


def test_fit_score_eval_roundtrip(tiny_demo, tmp_path, capsys):
    assert main(["fit", "--data", str(tiny_demo / "grass"), "--methods", "anomalydino", "--image-size", "64",
                 "--out", str(tmp_path / "runs")]) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    capsys.readouterr()
    assert main(["score", "--run", str(run_dir), str(tiny_demo / "grass" / "test" / "hole" / "000.png")]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored[0]["image"] == "000.png" and scored[0]["anomalydino"] > 0
    assert main(["eval", "--run", str(run_dir), "--data", str(tiny_demo / "grass")]) == 0
    assert "| anomalydino |" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["bench", "--data", str(tmp_path / "missing"), "--methods", "patchcore"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["bench", "--data", "demo", "--methods", "nope", "--categories", "brick"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_console_script_installed():
    r = subprocess.run([sys.executable, "-m", "uadlab.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "bench" in r.stdout


def test_param_overrides_reach_the_head(tiny_demo, tmp_path, capsys):
    from uadlab.cli import parse_params

    assert parse_params(["dinomaly.dropout=0", 'dinomaly.groups="dense"', "spatial_ar.mode=causal"]) == {
        "dinomaly": {"dropout": 0, "groups": "dense"}, "spatial_ar": {"mode": "causal"}}
    assert main(["fit", "--data", str(tiny_demo / "grass"), "--methods", "patchcore", "--image-size", "64",
                 "--param", "patchcore.coreset_ratio=0.5", "--out", str(tmp_path / "runs")]) == 0
    cfg = json.loads(next((tmp_path / "runs").iterdir()).joinpath("patchcore", "config.json").read_text())
    assert cfg["coreset_ratio"] == 0.5
    for bad, msg in [("patchcore.nope=1", "unknown hyperparameters"), ("dinomaly.dropout=0", "not among the methods"),
                     ("patchcore", "METHOD.KEY=VALUE")]:
        assert main(["fit", "--data", str(tiny_demo / "grass"), "--methods", "patchcore", "--param", bad]) == 2
        assert msg in capsys.readouterr().err


def test_paper_preset_brings_the_papers_inputs(capsys):
    from uadlab.pipeline import RunConfig

    def resolved(methods, preset="paper", method=None, **kw):  # what fit, bench and the app resolve alike
        c = RunConfig.resolve(methods, preset, kw.get("backbone"), kw.get("image_size"))
        i = c.inputs_of(method or methods[0])
        return i.backbone, i.resize, i.image_size

    assert resolved(["dinomaly"]) == ("dinov2_vitb14_reg", 448, 392)
    assert resolved(["dinomaly"], image_size=224) == ("dinov2_vitb14_reg", None, 224)  # the user's size wins
    assert resolved(["dinomaly"], backbone="efficientnet_lite0") == ("efficientnet_lite0", None, 224)
    # papers disagree: each method its own paper's inputs (no silent fallback to Lite0 at 224)
    assert resolved(["dinomaly", "patchcore"]) == ("dinov2_vitb14_reg", 448, 392)
    assert resolved(["dinomaly", "patchcore"], method="patchcore") == ("wide_resnet50_2", 256, 224)
    assert resolved(["varad"]) == ("dinov2_vits14", 512, 512)
    assert resolved(["dinomaly"], preset="quick") == ("efficientnet_lite0", None, 224)
    # offline, the paper's DINOv2 weights cannot be fetched: a clear error naming them, not a traceback
    assert main(["bench", "--data", "demo", "--categories", "brick", "--methods", "dinomaly", "--preset", "paper"]) == 2
    err = capsys.readouterr().err
    assert "paper inputs: dinomaly: dinov2_vitb14_reg at 392 px (resize 448)" in err
    assert "dinov2" in err.split("error:")[1]


@pytest.mark.parametrize("args, message", [
    (["--image-size", "16384"], "argument --image-size: 16384 px is out of range: use 32 to 4096 px"),
    (["--image-size", "100000"], "argument --image-size: 100000 px is out of range"),
    (["--resize", "8"], "argument --resize: 8 px is out of range"),
    (["--image-size", "128", "--resize", "64"], "resize 64 px is smaller than image_size 128 px"),
    (["--preset", "fast"], "preset 'fast'"),
    (["--window", "sideways"], "window 'sideways'"),
    (["--methods", "patchcore,nope"], "unknown method 'nope'"),
    (["--seed", "-3"], "seed -3"),
])
def test_cli_refuses_bad_settings_before_any_work(tmp_path, capsys, args, message):
    """The CLI parses; RunConfig's one validation (or its side rule) refuses: exit 2, one line, nothing done."""
    argv = ["fit", "--data", str(tmp_path / "no-such-data"), "--out", str(tmp_path / "runs"), *args]
    if "--methods" not in args:
        argv += ["--methods", "patchcore"]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusal (a side out of range): the same exit code
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "no-such-data" not in err
    assert not (tmp_path / "runs").exists()


def test_the_app_refuses_bad_settings_before_any_work(app):
    """The app's train form goes through the same RunConfig: a size out of range is refused with the CLI's
    message before the data is read; 1024 px is within the limits."""
    import gradio as gr

    from uadlab.pipeline import RunConfig

    user, _, _ = app.header.on_start(None)  # no data chosen yet: a valid form would fail on the data, later
    for size, message in ((16384, "image_size 16384 px is out of range: use 32 to 4096 px"),
                          (100000, "image_size 100000 px is out of range"), (0, "image_size 0 px is out of range"),
                          (256.5, "image_size 256.5: give a whole number")):
        with pytest.raises(gr.Error, match=message):
            app.train.on_train(user, "", ["patchcore"], "quick", size, "other categories", "", None,
                               progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="window 'sideways'"):
        app.train.on_train(user, "", ["patchcore"], "quick", None, "other categories", "", "sideways",
                           progress=lambda *a, **k: None)
    assert RunConfig.resolve(["patchcore"], image_size=1024.0).image_size == 1024  # the form's float, in range


def test_bench_on_a_streamed_hf_dataset_equals_the_downloaded_one(tiny_demo, tmp_path, capsys):
    """``--hf-streaming``: the same images, hence the same metrics, as the whole dataset loaded at once."""
    import shutil

    folder = tmp_path / "imagefolder"  # the `imagefolder` layout of datasets: <split>/<class>/<image>
    for split, src in (("train", "train/good"), ("test", "test/good"), ("test", "test/hole")):
        shutil.copytree(tiny_demo / "grass" / src, folder / split / src.split("/")[-1], dirs_exist_ok=True)
    aurocs = []
    for extra in ([], ["--hf-streaming"]):
        out = tmp_path / f"bench{len(extra)}.json"
        assert main(["bench", "--data", f"hf:{folder}", "--methods", "patchcore", "--preset", "tiny",
                     "--image-size", "64", "--json", str(out), *extra]) == 0
        row = json.loads(out.read_text())["rows"][0]
        aurocs.append(row["image_auroc"])
    assert 0.5 < aurocs[0] == aurocs[1]
