"""Every kind of bad input of ``tests/badinput.py`` through the Python API, the CLI and the app.

The outcome per interface:

- API: a bad kind raises ``uadlab.errors.UadlabError`` (one type) whose message matches the kind's patterns
  (the file and the problem) and holds no absolute path of this machine; a valid kind loads correctly.
- CLI: a bad kind exits with code 2 and ONE line on stderr matching the patterns, no traceback; a valid
  kind exits 0.
- app: a bad kind shows the message (a ``gr.Error``, or the "bad files" panel where the app skips bad
  files), never a server path or a token, and the app goes on: loading the demo right after works.

Each interface test prints its count (``-s``), e.g. ``bad input, API: 61/61 kinds as expected (12 n/a)``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest

import badinput as B
from conftest import load_data as _load
from uadlab.cli import main
from uadlab.data import label_mapping, load_data, load_files, load_folder, load_hf
from uadlab.errors import UadlabError
from uadlab.pipeline import Run, list_runs

ROOT = Path(__file__).resolve().parents[1]
PROGRESS_LINE = re.compile(r"^\[[# ]+\] +\d+\.\d%")  # a line of the CLI's progress bar (uadlab.cli.ProgressBar)
HUB_IDS = "uadlab-test/"  # repository ids that the simulated Hub serves from local folders


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, tiny_demo) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["fit", "--data", str(tiny_demo / "grass"), "--methods", "patchcore", "--image-size", "64",
                 "--preset", "tiny", "--out", str(out)]) == 0
    return next(out.iterdir())


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """``datasets.load_dataset`` as the Hub would answer: ids under ``uadlab-test/`` open registered local
    folders (under ``tmp_path``, which stands for the download cache, where the Hub's files would be); any
    other id fails with the token in the error, as an HTTP header error does."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))

    served: dict[str, str] = {}
    real = datasets.load_dataset

    def load_dataset(repo_id, config=None, token=None, streaming=False, **kw):
        path = served.get(repo_id, repo_id)
        if not os.path.exists(path):
            raise ValueError(f"Invalid header value b'Bearer {token}' for {repo_id}")
        if not Path(path, "dataset_dict.json").exists():
            return real(path, streaming=streaming)
        dd = datasets.load_from_disk(path)  # the Hub streams a dataset's files; here its saved arrow files
        return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in dd.items()}) if streaming else dd

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return served


def _inputs(interface: str, tmp_path: Path, good_run: Path) -> tuple[list[tuple[B.Kind, Any]], int]:
    """(kind, its input) for every kind that makes sense in ``interface``, and how many do not."""
    out = []
    for k in B.KINDS:
        if interface not in k.not_in:
            d = tmp_path / k.name
            d.mkdir(parents=True)
            out.append((k, None if k.make is None else k.make(good_run, d) if k.kind == "run" else k.make(d)))
    return out, len(B.KINDS) - len(out)


def _judge(k: B.Kind, message: str | None, result, tmp_root: Path, check_paths: bool = True) -> str | None:
    """None when the outcome is right, else what is wrong."""
    if os.environ.get("BADINPUT_SHOW"):
        print(f"  {k.name}: {message}")
    if k.valid:
        if message is not None:
            return f"valid input refused: {message}"
        if result is not None:
            try:
                k.check(result)
            except AssertionError as e:
                return f"loaded wrongly: {e}"
        return None
    if message is None:
        return "no error"
    missing = [p for p in k.expect if not re.search(p, message, re.I)]
    if missing:
        return f"message {message!r} does not match {missing}"
    if check_paths and not k.typed_path and str(tmp_root) in message:
        return f"message shows a server path: {message!r}"
    if any(w in message for w in (B.TOKEN + " " + B.SPACED_TOKEN).split()):
        return f"message shows the token: {message!r}"
    return None


def _report(interface: str, outcomes: dict[str, str | None], n_a: int) -> None:
    ok = sum(v is None for v in outcomes.values())
    print(f"\nbad input, {interface}: {ok}/{len(outcomes)} kinds as expected ({n_a} n/a)")
    failed = {k: v for k, v in outcomes.items() if v is not None}
    assert not failed, "\n".join(f"{k}: {v}" for k, v in failed.items())


# ---- (a) Python API ----------------------------------------------------------------------------------------------
def _api(k: B.Kind, path, streaming: bool = False):
    if k.kind == "image":
        return load_files([str(path)])
    if k.kind in ("masked", "folder", "zip"):
        return load_data(str(path))
    if k.kind == "hf":
        if path is None:  # the token kind: a private repository on the (simulated) Hub
            return load_hf("someone/private", token=B.SPACED_TOKEN, streaming=streaming)
        return load_hf(str(path), local=True, streaming=streaming)
    if k.kind == "run":
        return Run.load(path)
    raise AssertionError(k.kind)


@pytest.mark.parametrize("streaming", [False, True], ids=["all", "hf-streaming"])
def test_api(tmp_path, good_run, fake_hub, streaming):
    """Every kind; with ``streaming`` the Hugging Face kinds read as a stream end as without it."""
    outcomes, (kinds, n_a) = {}, _inputs("api", tmp_path, good_run)
    if streaming:
        kinds, n_a = [(k, p) for k, p in kinds if k.kind == "hf"], n_a + sum(k.kind != "hf" for k, _ in kinds)
    for k, path in kinds:
        message = result = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = _api(k, path, streaming)
        except UadlabError as e:
            message = str(e)
        except Exception as e:  # noqa: BLE001 - counted as a failure of the kind
            outcomes[k.name] = f"raised {type(e).__name__} (not UadlabError): {e}"
            continue
        outcomes[k.name] = _judge(k, message, result, tmp_path)
        if streaming and result is not None and not all(s.image is None and s.path for s in result.train):
            outcomes[k.name] = "streamed samples hold their images in memory"
    _report("API, streaming" if streaming else "API", outcomes, n_a)


# ---- (b) CLI -------------------------------------------------------------------------------------------------------
def _argv(k: B.Kind, path, good_run: Path, good: Path, out: Path) -> list[str]:
    fit = ["fit", "--methods", "patchcore", "--image-size", "64", "--preset", "tiny", "--out", str(out)]
    return {
        "image": lambda: ["score", "--run", str(good_run), str(path)],
        "masked": lambda: ["eval", "--run", str(good_run), "--data", str(path)],
        "folder": lambda: fit + ["--data", str(path)],
        "zip": lambda: ["eval", "--run", str(good_run), "--data", str(path)],
        "hf": lambda: ["eval", "--run", str(good_run), "--data", f"hf:{path}"],
        "run": lambda: ["score", "--run", str(path), str(good / "good0.png")],
        "cli": lambda: fit + ["--data", str(good), *k.cli_args],
    }[k.kind]()


def test_cli(tmp_path, good_run, capsys):
    good = B.good_folder(tmp_path / "good")
    outcomes, (kinds, n_a) = {}, _inputs("cli", tmp_path, good_run)
    for k, path in kinds:
        capsys.readouterr()
        try:
            rc = main(_argv(k, path, good_run, good, tmp_path / "out"))
        except SystemExit as e:  # argparse
            rc = e.code
        except BaseException as e:  # noqa: BLE001 - would be a traceback
            outcomes[k.name] = f"traceback: {type(e).__name__}: {e}"
            continue
        # the progress bar of a long read (``[###   ]  33.3% ...``, redrawn with \r) may come before the error
        lines = [l for l in capsys.readouterr().err.strip().splitlines() if not PROGRESS_LINE.match(l)]
        err = "\n".join(lines).strip()
        if k.valid:
            outcomes[k.name] = None if rc == 0 else f"exit {rc}: {err[-300:]}"
        elif rc != 2 or len(err.splitlines()) != 1 or "error:" not in err:
            outcomes[k.name] = f"exit {rc}, stderr {err!r}"
        else:
            outcomes[k.name] = _judge(k, err, None, tmp_path, check_paths=False)  # the user typed the path
    _report("CLI", outcomes, n_a)


def test_cli_temp_files_removed_on_success_and_failure(tmp_path, good_run, tiny_demo, capsys, monkeypatch):
    """A zip is unpacked into a temporary folder; it is gone after the command, whether it worked or not."""
    import gc
    import tempfile

    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    good_zip = B.zip_of(tmp_path / "grass.zip", {str(p.relative_to(tiny_demo)): p.read_bytes()
                                                 for p in (tiny_demo / "grass").rglob("*.png")})
    assert main(["eval", "--run", str(good_run), "--data", str(good_zip)]) == 0
    assert "| patchcore |" in capsys.readouterr().out
    gc.collect()
    assert os.listdir(tmp) == []
    bad_zip = B.zip_of(tmp_path / "bad.zip", {**B._images(), "imgs/broken.png": b"garbage"})
    assert main(["eval", "--run", str(good_run), "--data", str(bad_zip)]) == 2
    assert capsys.readouterr().err == "uadlab eval: error: bad.zip: broken.png: not an image (unrecognised format)\n"
    assert os.listdir(tmp) == []


def test_cli_real_process(tmp_path, good_run):
    """``python -m uadlab`` in a real process: exit 2, one line, no traceback, no temporary folder left."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    bad_zip = B.zip_of(tmp_path / "bad.zip", {**B._images(), "imgs/broken.png": b"garbage"})
    r = subprocess.run([sys.executable, "-m", "uadlab", "eval", "--run", str(good_run), "--data", str(bad_zip)],
                       cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "uadlab eval: error: bad.zip: broken.png: not an image (unrecognised format)"], r.stderr
    assert os.listdir(tmp) == []


# ---- (c) app callbacks ----------------------------------------------------------------------------------------------
def _app_call(app, user, k: B.Kind, path, d: Path, fake_hub):  # noqa: F811
    if k.kind == "image":
        goods = [str(B.write(d / f"g{i}.png", B.rgb(i))) for i in range(3)]
        return _load(app, user, "Upload", train_files=goods + [str(path)])
    if k.kind in ("masked", "folder"):
        return _load(app, user, "Local folder", folder=str(path))
    if k.kind == "zip":
        return _load(app, user, "Upload", zip_file=str(path))
    if k.kind == "hf":
        repo = HUB_IDS + k.name
        if path is not None:
            fake_hub[repo] = str(path)
        return _load(app, user, "Hugging Face dataset", hf_repo=repo, hf_image="image", hf_label="label",
                     hf_split="train", hf_test_split="test",
                     hf_token=B.SPACED_TOKEN if k.name == "hf_token_with_spaces" else B.TOKEN)
    if k.kind == "run":
        import shutil

        runs_dir = app.W.Workspace(user).runs.dir
        shutil.copytree(path, runs_dir / path.name)
        listed = app.header.on_refresh_runs(user, None)["choices"]  # the list goes on with damaged runs in it
        if "run.json" in k.name and any(v == path.name for _, v in listed):
            raise AssertionError(f"the run list shows the damaged run {path.name}")
        return app.on_run_change(user, path.name)
    raise AssertionError(k.kind)


def test_app(app, tmp_path, good_run, fake_hub, monkeypatch):  # noqa: F811
    monkeypatch.setenv("UADLAB_LOCAL_FOLDERS", str(tmp_path))  # the corpus' folders lie under an allowed root
    user, _, _ = app.header.on_start(None)
    import shutil

    shutil.copytree(good_run, app.W.Workspace(user).runs.dir / good_run.name)
    outcomes, (kinds, n_a) = {}, _inputs("app", tmp_path, good_run)
    for k, path in kinds:
        message = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = _app_call(app, user, k, path, tmp_path / k.name, fake_hub)
            if k.kind in ("image", "masked", "folder", "zip", "hf"):
                md, _, bad, *_ = out
                if bad != "No bad files.":
                    message = bad  # the app skips bad files and lists them in the panel
                elif k.valid:
                    train = int(md.splitlines()[-1].split("|")[1])
                    assert train == (4 if k.kind == "image" else 3 if k.kind in ("masked", "hf") else train) > 0, md
        except gr.Error as e:
            message = getattr(e, "message", str(e))
        except Exception as e:  # noqa: BLE001 - the app would have shown a generic error
            outcomes[k.name] = f"raised {type(e).__name__}: {e}"
            continue
        outcome = _judge(k, message, None, tmp_path)
        md, *_ = _load(app, user, "Demo (offline)", "brick")  # the app goes on
        if outcome is None and "demo/brick" not in md:
            outcome = "the next call failed"
        outcomes[k.name] = outcome
    _report("app", outcomes, n_a)


# ---- skip-bad, runs list, labels ------------------------------------------------------------------------------------
def test_skip_bad_skips_exactly_the_bad_files(tmp_path):
    root = B.good_folder(tmp_path / "data")
    bad, valid = [], []
    for k in B.IMAGE_KINDS:
        if k.name in ("missing_file", "directory_named_png"):
            continue  # not files of a folder
        p = k.make(tmp_path / "made" / k.name)
        os.replace(p, root / p.name)
        (valid if k.valid else bad).append(p.name)
    os.symlink(B.write(tmp_path / "outside.png", B.rgb(9)), root / "link.png")
    bad.append("link.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_folder(root, skip_bad=True)
    assert sorted(s.name for s in ds.train) == sorted(["good0.png", "good1.png", "good2.png", *valid])
    assert len(ds.warnings) == len(bad) == len([w for w in caught if str(w.message).startswith("skipped ")])
    for name in bad:  # each bad file is named once, with its reason after the name
        (w,) = [w for w in ds.warnings if w.startswith(f"skipped {name}: ")]
        assert len(w) > len(f"skipped {name}: ") + 5
    assert str(tmp_path) not in "".join(ds.warnings)


def test_list_runs_skips_and_reports_damaged_runs(tmp_path, good_run):
    import shutil

    shutil.copytree(good_run, tmp_path / good_run.name)
    for k in B.RUN_KINDS:
        k.make(good_run, tmp_path)
    skipped: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = list_runs(tmp_path, skipped)
    # damaged run.json: skipped and reported; damaged weights are found when the run is opened
    assert sorted(r["run_id"] for r in runs) == sorted([good_run.name, "badweights", "noweights", "pickled",
                                                        "badconfig"])
    assert sorted(s.split(":")[0] for s in skipped) == ["run badjson", "run listjson"]
    assert len(caught) == 2


def test_label_mapping_uses_class_names():
    import datasets

    imagefolder = datasets.ClassLabel(names=["crack", "good"])  # alphabetical: the defect is index 0
    assert label_mapping(imagefolder, [0, 1, -1], "x") == {0: 1, 1: 0, -1: -1}
    assert label_mapping(datasets.ClassLabel(names=["OK", "scratch", "dent"]), [0, 1, 2], "x") == {0: 0, 1: 1, 2: 1}
    assert label_mapping(datasets.Value("string"), ["Normal", "hole", None], "x") == {"Normal": 0, "hole": 1, None: -1}
    assert label_mapping(datasets.Value("bool"), [False, True], "x") == {False: 0, True: 1}
    assert label_mapping(datasets.Value("int64"), [0, 1], "x") == {0: 0, 1: 1}
    with pytest.raises(UadlabError, match=r"x: no class is recognised as normal \(classes: crack, dent\)"):
        label_mapping(datasets.ClassLabel(names=["crack", "dent"]), [0], "x")
    with pytest.raises(UadlabError, match=r"classes: hole, scratch"):
        label_mapping(datasets.Value("string"), ["scratch", "hole"], "x")
    with pytest.raises(UadlabError, match="label 7 is not one of the 2 classes"):
        label_mapping(imagefolder, [7], "x")
    with pytest.raises(UadlabError, match="neither class names nor 0/1"):
        label_mapping(datasets.Value("float32"), [0.5], "x")


def test_load_hf_imagefolder_end_to_end(tmp_path):
    """The tester's case: an ``imagefolder`` dataset (crack=0, good=1) trains on the good images only."""
    ds = load_hf(str(B._imagefolder(tmp_path)), local=True)
    train_pixels = {np.asarray(s.load()).tobytes() for s in ds.train}
    good = {np.asarray(B.Image.open(p).convert("RGB")).tobytes()
            for p in (tmp_path / "imagefolder" / "train" / "good").glob("*.png")}
    assert train_pixels == good
    with pytest.raises(UadlabError, match="local paths are not allowed"):
        load_hf(str(tmp_path / "imagefolder"))  # a server folder is not a Hub id (public Space)


def test_json_of_run_kinds_is_real(good_run):
    """The run kinds start from a run that loads: the damage, not the fixture, makes them fail."""
    run = Run.load(good_run)
    assert list(run.heads) == ["patchcore"] and json.loads((good_run / "run.json").read_text())["run_id"]
