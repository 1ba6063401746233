"""The app's callbacks as plain functions: data, train, compare, annotate, export, isolation, Hub, explain."""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from conftest import load_data as _load, no_progress as _progress


@pytest.fixture(scope="module")
def trained(app):
    """One user with the demo (brick) loaded and a quick PatchCore run."""
    user, _, _ = app.header.on_start(None)
    app.data.on_restore_data(user)
    msg, table, run_id = app.train.on_train(user, "efficientnet_lite0", ["patchcore"], "quick", 128, "other categories", "",
                                  progress=_progress)
    return user, run_id, msg, table


def test_session_ids(app):
    user, same, shown = app.header.on_start(None)
    assert len(user) == 32 and user == same == shown
    assert app.header.on_start(user)[0] == user  # a reload keeps the workspace
    assert app.header.on_start("../../etc")[0] != "../../etc"  # a forged id is replaced, never used as a path
    with pytest.raises(gr.Error):
        app.header.on_switch_workspace("not-hex!")


def test_browser_secret_survives_restarts(app, tmp_path, monkeypatch):
    monkeypatch.delenv("UADLAB_BROWSER_SECRET", raising=False)
    first = app.W.browser_secret(tmp_path)
    assert len(first) == 32 and app.W.browser_secret(tmp_path) == first
    assert oct((tmp_path / ".browser_secret").stat().st_mode)[-3:] == "600"


def test_every_registered_method_is_offered(app):
    from uadlab.methods import list_methods

    demo = app.build_app()
    boxes = [b for b in demo.blocks.values() if isinstance(b, gr.CheckboxGroup) and b.elem_id == "methods"]
    assert boxes and [c[1] for c in boxes[0].choices] == list_methods()


def test_data_demo_and_errors(app, tmp_path, monkeypatch):
    user, _, _ = app.header.on_start(None)
    md, preview, bad, cat = app.data.on_restore_data(user)
    assert "demo/brick" in md and len(preview) > 8 and cat["value"] == "brick"
    md, *_ = _load(app, user, "Demo (offline)", "grass")
    assert "demo/grass" in md
    with pytest.raises(gr.Error, match="off here"):  # no UADLAB_LOCAL_FOLDERS: no server folders
        _load(app, user, "Local folder", folder=str(tmp_path))
    monkeypatch.setenv("UADLAB_LOCAL_FOLDERS", str(tmp_path))
    with pytest.raises(gr.Error, match=f"^.{tmp_path.name}/nope: no such folder"):  # named in its root: no path
        _load(app, user, "Local folder", folder=str(tmp_path / "nope"))
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.png", b"x")
    with pytest.raises(gr.Error, match="unsafe path"):
        _load(app, user, "Upload", zip_file=str(evil))


def test_upload_loose_files_lists_bad_ones(app, tmp_path):
    user, _, _ = app.header.on_start(None)
    files = []
    for i in range(3):
        p = tmp_path / f"n{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(p)
        files.append(str(p))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    test = tmp_path / "t0.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(test)
    mask = tmp_path / "t0_mask.png"
    Image.fromarray(np.pad(np.ones((10, 10), np.uint8) * 255, 15)).save(mask)
    md, preview, bad, _ = _load(app, user, "Upload", train_files=files + [str(broken)], test_files=[str(test)],
                                   mask_files=[str(mask)], unmasked_normal=False)
    assert "| 3 | 0 | 1 | 0 | yes | 1 |" in md
    assert "broken.png" in bad


def test_train_compare_threshold(app, trained):
    user, run_id, msg, table = trained
    assert "demo/brick · patchcore" in msg and run_id not in msg and list(table["method"]) == ["patchcore"]
    names_u, heads_u, ex_name, ex_method, info = app.on_run_change(user, run_id)
    assert heads_u["choices"] == ["patchcore"] and "demo/brick" in info
    names = names_u["value"]
    assert len(names) >= 3
    viewer, fig, tab = app.compare.on_compare(user, run_id, names, "dataset labels")
    assert viewer.count("&quot;name&quot;") == len(names) and all(n in viewer for n in names)  # one item per image
    assert {t.name.split(" ")[0] for t in fig.data if t.name != "chance"} == {"patchcore"}
    assert tab.shape[0] == 1 and tab["image AUROC"][0] > 0.5
    empty, fig, tab = app.compare.on_compare(user, None, [], "dataset labels")
    assert "No images" in empty and fig is None and tab is None
    runs = app.header.on_refresh_runs(user, None)
    assert runs["value"] == run_id  # the saved run is listed (it survives a restart: it is on disk)


def test_compare_says_small_samples_and_drops_old_numbers(app, trained):
    """The demo's few test images: the metrics carry intervals and counts, and the status says they are not
    meaningful; switching to labels that give no metrics (no annotations yet) empties the table."""
    user, run_id, _, _ = trained
    names = app.on_run_change(user, run_id)[0]["value"]
    viewer, fig, tab, status = app.compare.on_show(user, run_id, names, "dataset labels")
    n_normal, n_anomalous = int(tab["n normal"][0]), int(tab["n anomalous"][0])
    assert 0 < n_normal < 10 and n_anomalous > 0 and "not meaningful" in tab["note"][0]
    assert "Small sample" in status and re.fullmatch(r"[01]\.\d{3}–[01]\.\d{3}", tab["image AUROC 95% CI"][0])
    viewer2, fig2, tab2, status2 = app.compare.on_show(user, run_id, names, "my annotations")
    assert tab2 is None and fig2 is None and "no annotations" in status2  # not the dataset's numbers
    assert viewer2 == viewer  # the viewer still shows the chosen images


def test_annotate_save_reload_export_and_labels(app, trained):
    user, run_id, _, _ = trained
    editor, label, note, agree, disagree, review, status = app.annotate.on_annotate_show(user, 1, run_id, 1.0)
    assert label is None and "not annotated yet" in status and len(review) == 2  # heatmap + mask
    h, w = editor["background"].shape[:2]
    layer = np.zeros((h, w, 4), np.uint8)
    layer[10:30, 10:30] = (255, 0, 0, 255)
    status = app.annotate.on_annotate_save(user, 1, {"background": editor["background"], "layers": [layer]},
                                  "anomalous", "a dent", ["patchcore"], [], run_id)
    assert "anomalous" in status and "mask 400 px" in status
    # more strokes are added to the saved mask
    layer2 = np.zeros((h, w, 4), np.uint8)
    layer2[50:60, 50:60] = (255, 0, 0, 255)
    status = app.annotate.on_annotate_save(user, 1, {"layers": [layer2]}, "anomalous", "a dent", ["patchcore"], [], run_id)
    assert "mask 500 px" in status
    # "reload": show again from the database
    editor, label, note, agree, *_ , status = app.annotate.on_annotate_show(user, 1, run_id, 1.0)
    assert label == "anomalous" and note == "a dent" and agree["value"] == ["patchcore"]
    bg = editor["background"].astype(int)
    assert (bg[..., 0] - bg[..., 1] > 90).sum() >= 500  # the saved mask is drawn in red
    app.annotate.on_annotate_save(user, 0, None, "normal", "", [], ["patchcore"], run_id)
    assert "agree 1, disagree 1" in app.annotate.on_review_summary(user, run_id)
    _, status = app.annotate.on_clear_mask(user, 1, "anomalous", "a dent", [], [], run_id)
    assert "mask 0 px" in status
    zpath = app.annotate.on_export(user)
    with zipfile.ZipFile(zpath) as zf:
        names = zf.namelist()
    assert any("/test/good/" in n for n in names) and any("/test/anomalous/" in n for n in names)
    assert any("/train/good/" in n for n in names)
    res = app.W.Workspace(user).runs.evaluation(run_id, "annotations")
    assert set(res) == {"patchcore"} and "image_auroc" in res["patchcore"]


def test_other_users_see_nothing(app, trained):
    user, run_id, _, _ = trained
    other, _, _ = app.header.on_start(None)
    assert app.header.on_refresh_runs(other, None)["choices"] == []
    with pytest.raises(gr.Error, match="not in this workspace"):
        app.compare.on_compare(other, run_id, ["x"], "dataset labels")
    app.data.on_restore_data(other)
    *_, status = app.annotate.on_annotate_show(other, 1, None, 1.0)
    assert "Annotated in this dataset: 0" in status


def test_aux_sets_for_zero_shot_methods(app, trained):
    from uadlab.data import DataError

    user, _, _, _ = trained
    ws = app.W.Workspace(user)
    choice = ws.data.choice()
    aux = ws.data.auxiliary(choice, "other categories")
    assert aux and {s.category for s in aux} == {"grass", "gravel"} and {s.label for s in aux} == {0, 1}
    fresh = app.W.Workspace(app.header.on_start(None)[0])
    fresh.data.set({"kind": "demo", "category": "brick"})
    with pytest.raises(DataError, match="auxiliary"):
        fresh.data.auxiliary(fresh.data.choice(), "annotations")


def test_explain_panel(app, trained):
    user, run_id, _, _ = trained
    names = app.on_run_change(user, run_id)[0]["value"]
    images, md = app.explain.on_explain(user, run_id, names[0], "patchcore")
    assert images and images[0][0].ndim == 3 and "patchcore" in md
    assert "patchcore" in app.explain.methods_markdown()


def test_hub_push_offline_is_a_clear_error(app, trained, monkeypatch):
    user, run_id, _, _ = trained
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(gr.Error, match="not reachable|offline"):
        app.hub.on_push(user, run_id, "patchcore", "someone/uadlab-test", "hf_secret_token_123", True, progress=_progress)
    with pytest.raises(gr.Error, match="valid repository id"):
        app.hub.on_push(user, run_id, "patchcore", "bad id with spaces", "hf_x", True, progress=_progress)


def test_hub_push_uploads_card_and_example(app, trained, monkeypatch, tmp_path):
    """push_head through huggingface_hub's HfApi (create_repo + upload_folder), recorded instead of sent."""
    from huggingface_hub import HfApi

    user, run_id, _, _ = trained
    calls = {}

    def fake_create(self, repo_id, **kw):
        calls["create"] = (repo_id, kw)
        return f"https://huggingface.co/{repo_id}"

    def fake_upload(self, **kw):
        calls["upload"] = kw
        dest = tmp_path / "pushed"
        import shutil

        shutil.copytree(kw["folder_path"], dest)

    monkeypatch.setattr(HfApi, "create_repo", fake_create)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload)
    md = app.hub.on_push(user, run_id, "patchcore", "me/uadlab-patchcore", "hf_secret_token_123", True,
                     progress=_progress)
    assert "huggingface.co/me/uadlab-patchcore" in md
    assert calls["create"][1]["private"] is True and calls["create"][1]["token"] == "hf_secret_token_123"
    pushed = tmp_path / "pushed"
    files = {p.name for p in pushed.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "uadlab_info.json", "example_heatmap.png"} <= files
    card = (pushed / "README.md").read_text()
    assert "example_heatmap.png" in card and "image_auroc" in card and "efficientnet_lite0" in card
    for p in pushed.iterdir():  # the token is never written anywhere
        assert b"hf_secret_token_123" not in p.read_bytes()
    info = json.loads((pushed / "uadlab_info.json").read_text())
    assert info["method"] == "patchcore" and "calibration" in info and info["image_size"] == 128

    # load it back (safetensors only; a folder needs UADLAB_LOCAL_FOLDERS) and score uploaded images with it
    monkeypatch.setenv("UADLAB_LOCAL_FOLDERS", str(tmp_path))
    img = tmp_path / "probe.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(img)
    gallery, md = app.hub.on_hub_score(str(pushed), "", "auto", [str(img)], progress=_progress)
    assert len(gallery) == 1 and "patchcore" in md and gallery[0][0].shape == (128, 128, 3)
    with pytest.raises(gr.Error, match="offline|not reachable"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        app.hub.on_hub_score("someone/not-here", "", "auto", [], progress=_progress)


def test_viz_shared_scale_and_helpers():
    import torch

    from uadlab import viz

    a = viz.colormap(np.array([[0.5, 0.1]]))
    b = viz.colormap(np.array([[0.5, 1.9]]))
    assert (a[0, 0] == b[0, 0]).all()  # one fixed scale: no per-image min-max
    assert viz.colorbar(200).size[1] == 200
    assert viz.explanation_image(np.random.rand(7, 7)).shape == (224, 224, 3)
    assert viz.explanation_image(np.zeros((40, 40, 3), np.uint8)).shape[2] == 3
    assert viz.explanation_image(torch.rand(14, 14)).dtype == np.uint8
    headers, rows = viz.metrics_table({"m": {"image_auroc": 0.9, "pixel_auroc": float("nan")}})
    assert rows[0][headers.index("pixel AUROC")] == "–" and rows[0][headers.index("image AUROC")] == "0.900"
    fig = viz.curves_figure({"m": {"curves": {"fpr": [0, 1], "tpr": [0, 1], "precision": [1, 0.5],
                                              "recall": [0, 1]}, "image_auroc": 0.5, "image_ap": 0.5}})
    assert len(fig.data) == 3 and fig.layout.xaxis2 is not None  # chance + ROC + PR in two subplots


def test_tokens_are_never_echoed_logged_or_stored(app, trained, caplog):
    """A session pastes tokens into every token field; they show up in no message, log, workspace or export file."""
    import logging

    caplog.set_level(logging.DEBUG)
    user, run_id, _, _ = trained
    spaced, plain = "hf_SECRETxyz with spaces ", "hf_SECRETplain0123456789"
    messages = []
    for token in (spaced, plain):
        calls = [lambda t: _load(app, user, "Hugging Face dataset", hf_repo="someone/gated-data", hf_token=t),
                 lambda t: app.hub.on_push(user, run_id, "patchcore", "someone/uadlab-head", t, True, progress=_progress),
                 lambda t: app.hub.on_hub_score("someone/uadlab-head", t, "auto", [], progress=_progress),
                 lambda t: app.train.on_train(user, "efficientnet_lite0", [], "quick", 96, "other categories", t,
                                        progress=_progress)]
        for call in calls:
            with pytest.raises(gr.Error) as e:
                call(token)
            messages.append(e.value.message)
    assert sum("spaces or line breaks inside" in m for m in messages) == 4  # refused before any use
    assert any("not reachable" in m for m in messages)  # the plain token went as far as the (offline) Hub
    app.data.on_restore_data(user)
    app.annotate.on_annotate_save(user, 0, None, "normal", "", [], [], run_id)
    export = Path(app.annotate.on_export(user))
    with zipfile.ZipFile(export) as zf:
        exported = b"".join(zf.read(n) for n in zf.namelist())
    stored = b"".join(p.read_bytes() for p in app.W.workspace_root().rglob("*") if p.is_file())
    for needle in ("SECRET", "with spaces"):
        assert not [m for m in messages if needle in m]
        assert needle not in caplog.text
        assert needle.encode() not in stored + export.read_bytes() + exported
    assert str(app.W.workspace_root()) not in "".join(messages)


def test_hf_dataset_streams_into_the_users_workspace(app, tmp_path, monkeypatch):
    """The app streams a Hub dataset (its default): only the rows up to the limit are read, into the user's own
    workspace (another user's data folder stays empty); stale streamed folders of other choices are pruned."""
    import io
    import os
    import time

    import datasets

    buf = []
    for i in range(30):
        b = io.BytesIO()
        Image.fromarray(np.full((32, 32, 3), 8 * i, np.uint8)).save(b, format="PNG")
        buf.append({"bytes": b.getvalue(), "path": None})
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["good", "crack"])})
    table = datasets.Dataset.from_dict({"image": buf, "label": [0] * 25 + [1] * 5}, features=feats)
    calls = []

    def load_dataset(repo_id, config=None, token=None, streaming=False, **kw):
        calls.append(streaming)
        split = table.to_iterable_dataset() if streaming else table
        return (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)(train=split, test=split)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    user, other = app.header.on_start(None)[0], app.header.on_start(None)[0]
    ws = app.W.Workspace(user)
    stale = ws.dir / "hf" / "0123456789abcdef"
    stale.mkdir(parents=True)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    md, *_ = _load(app, user, "Hugging Face dataset", hf_repo="someone/parts", hf_limit=12)
    assert calls and all(calls), "the app streams"
    assert md.splitlines()[-1].split("|")[1:4] == [" 12 ", " 12 ", " 0 "], md  # 12 rows read per split
    ds = ws.data.dataset()
    assert all(Path(s.path).is_relative_to(ws.dir / "hf") for s in ds.train + ds.test)
    assert not stale.exists()
    assert not (app.W.Workspace(other).dir / "hf").exists()
