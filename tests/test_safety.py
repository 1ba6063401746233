"""Isolation, server folders, Hub ids, limits, expiry and path-free messages, through the app's callbacks."""
from __future__ import annotations

import json
import os
import tempfile
import time
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from conftest import load_data, no_progress
from uadlab.data import DataError
from uadlab.safety import TRAININGS, QuotaError, public_text


def _images(folder, n, prefix="n", size=40):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"{prefix}{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        out.append(str(p))
    return out


def _upload(app, user, files):
    return load_data(app, user, "Upload", train_files=files, test_files=[], mask_files=[], unmasked_normal=False)


def test_sessions_see_only_their_own_uploads_runs_and_annotations(app, tmp_path):
    a, b = app.header.on_start(None)[0], app.header.on_start(None)[0]
    _upload(app, a, _images(tmp_path / "a", 3))
    wa, wb = app.W.Workspace(a), app.W.Workspace(b)
    uid = wa.data.choice().id
    run_id = "20250101-000000-abcdef"
    (wa.runs.dir / run_id).mkdir()
    (wa.runs.dir / run_id / "run.json").write_text(json.dumps({"run_id": run_id, "created": 0, "config": {}}))
    for forged in (uid, f"../../{a}/uploads/{uid}"):
        with pytest.raises(DataError, match="no longer in this workspace"):
            wb.data.set(app.W.DataChoice("upload", id=forged))
    with pytest.raises(gr.Error, match="not in this workspace"):
        app.on_run_change(b, run_id)
    assert app.header.on_refresh_runs(b, None)["choices"] == []
    for w in (wa, wb):
        w.data.set(app.W.DataChoice("demo", category="brick"))
    wa.annotations.save(0, "anomalous", np.ones((96, 96), np.uint8), "mine")
    *_, status = app.annotate.on_annotate_show(b, 0, None, 1.0)
    assert "not annotated yet" in status and "Annotated in this dataset: 0" in status
    assert wb.store.list(b) == [] and len(wa.store.list(a)) == 1
    # sharing on purpose: whoever opens A's id sees A's runs and annotations
    assert app.header.on_switch_workspace(a) == (a, a)
    assert app.header.on_refresh_runs(a, None)["value"] == run_id
    *_, status = app.annotate.on_annotate_show(a, 0, None, 1.0)
    assert "saved: **anomalous**" in status


def test_server_folders_only_inside_allowed_roots(app, tmp_path, monkeypatch):
    user = app.header.on_start(None)[0]
    data, outside = tmp_path / "data", tmp_path / "outside"
    _images(data / "good", 3)
    _images(outside, 2, "o")
    with pytest.raises(gr.Error, match="off here"):  # UADLAB_LOCAL_FOLDERS unset: no server folder at all
        load_data(app, user, "Local folder", folder=str(data / "good"))
    assert "Local folder" not in _source_choices(app)

    monkeypatch.setenv("UADLAB_LOCAL_FOLDERS", str(data))
    assert "Local folder" in _source_choices(app)
    md, *_ = load_data(app, user, "Local folder", folder="good")  # relative: starts in the first root
    assert "| 3 | 0 | 0 | 0 | no | 0 |" in md
    (data / "escape").symlink_to(outside)
    for bad in (str(outside), "../outside", "good/../../outside", "escape", str(data / "escape")):
        with pytest.raises(gr.Error, match="outside the folders this server allows") as e:
            load_data(app, user, "Local folder", folder=bad)
        assert str(tmp_path) not in str(e.value)
    (data / "good" / "linked.png").symlink_to(outside / "o0.png")  # a file link leading out is skipped
    md, _, bad, *_ = load_data(app, user, "Local folder", folder="good")
    assert "| 3 | 0 | 0 | 0 | no | 1 |" in md and "linked.png: a link to a file outside" in bad

    root = app.W.workspace_root()
    monkeypatch.setenv("UADLAB_LOCAL_FOLDERS", str(root.parent))  # a root that holds the workspace
    for bad in (str(root / "users"), str(root), str(root.parent)):
        with pytest.raises(gr.Error, match="holds the app's own data") as e:
            load_data(app, user, "Local folder", folder=bad)
        assert str(root.parent) not in str(e.value)
    monkeypatch.setenv("UADLAB_LOCAL_FOLDERS", str(root / "users"))  # a root inside the workspace is ignored
    with pytest.raises(gr.Error, match="off here"):
        load_data(app, user, "Local folder", folder=".")


def _source_choices(app) -> list[str]:
    demo = app.build_app()
    radio = next(b for b in demo.blocks.values() if isinstance(b, gr.Radio) and b.label == "Source")
    return [c[1] for c in radio.choices]


def test_hub_sources_take_hub_ids_only(app, tmp_path, monkeypatch):
    user = app.header.on_start(None)[0]
    for bad in ("/etc", str(tmp_path), "../x/y", "owner/../name", "./owner/name", "a/b/c", "~/x", "owner/"):
        with pytest.raises(gr.Error, match="not a Hugging Face dataset id") as e:
            load_data(app, user, "Hugging Face dataset", hf_repo=bad)
        assert str(tmp_path) not in str(e.value)
        with pytest.raises(gr.Error, match="not a Hugging Face model id"):
            app.hub.on_hub_score(bad, "", "auto", [], progress=no_progress)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)  # the libraries would read this folder, not the Hub
    with pytest.raises(gr.Error, match="cannot be used as a Hub id"):
        load_data(app, user, "Hugging Face dataset", hf_repo="owner/name")


def test_limits_trip_with_clear_messages_and_leave_nothing(app, tmp_path, monkeypatch):
    from gradio.utils import get_upload_folder

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    user = app.header.on_start(None)[0]
    ws = app.W.Workspace(user)

    def received(n, prefix):  # files as gradio hands them over: inside its upload folder
        return _images(tmp_path / "gradio" / f"{prefix}hash", n, prefix)

    def refused(match, **kw):
        with pytest.raises(gr.Error, match=match):
            load_data(app, user, "Upload", **{"test_files": [], "mask_files": [], "unmasked_normal": False, **kw})
        assert list(ws.data.uploads.iterdir()) == []  # nothing kept in the workspace
        for f in [kw.get("zip_file"), *(kw.get("train_files") or [])]:
            if f:
                assert not os.path.exists(f) and f.startswith(get_upload_folder())  # gradio's copy removed too

    monkeypatch.setenv("UADLAB_MAX_UPLOAD_BYTES", "1000")
    refused(r"the upload is .* MB; the limit per upload is 0.0 MB", train_files=received(3, "a"))
    monkeypatch.setenv("UADLAB_MAX_UPLOAD_BYTES", "10_000_000")
    monkeypatch.setenv("UADLAB_MAX_UPLOAD_IMAGES", "2")
    refused("the upload holds 3 images; the limit per upload is 2", train_files=received(3, "b"))
    z = tmp_path / "gradio" / "zhash" / "three.zip"
    z.parent.mkdir()
    with zipfile.ZipFile(z, "w") as zf:
        for f in _images(tmp_path / "z", 3):
            zf.write(f, f"good/{os.path.basename(f)}")
    refused("the upload holds 3 images; the limit per upload is 2", zip_file=str(z))
    monkeypatch.setenv("UADLAB_MAX_UPLOAD_IMAGES", "100")
    monkeypatch.setenv("UADLAB_MAX_WORKSPACE_BYTES", "2000")
    refused(r"this workspace is full: it holds .* of 0.0 MB and this needs .* more", train_files=received(2, "c"))
    not_images = tmp_path / "gradio" / "dhash" / "notes.zip"  # accepted by the limits, but no images inside
    monkeypatch.delenv("UADLAB_MAX_WORKSPACE_BYTES")
    not_images.parent.mkdir()
    with zipfile.ZipFile(not_images, "w") as zf:
        zf.writestr("readme.txt", "hello")
    refused("no usable images|empty|no MVTec|no image files", zip_file=str(not_images))

    # trainings: one per workspace, and a process-wide cap
    app.data.on_restore_data(user)
    with TRAININGS.hold(user, 1, 5):
        with pytest.raises(gr.Error, match="a training is already running in this workspace"):
            app.train.on_train(user, "efficientnet_lite0", ["patchcore"], "quick", 96, "other categories", "",
                         progress=no_progress)
    monkeypatch.setenv("UADLAB_MAX_TRAININGS", "1")
    with TRAININGS.hold("someone-else", 1, 1):
        with pytest.raises(QuotaError, match="the server is busy"):
            ws.runs.train(["patchcore"], image_size=96)
    assert TRAININGS.busy() == set()
    monkeypatch.setenv("UADLAB_MAX_UPLOAD_IMAGES", "many")
    with pytest.raises(ValueError, match="UADLAB_MAX_UPLOAD_IMAGES='many' is not a number"):
        app.S.limits()


def test_expiry_sweep_deletes_old_workspaces_and_their_annotations(app, monkeypatch):
    old, fresh, training = (app.header.on_start(None)[0] for _ in range(3))
    for u in (old, fresh, training):
        app.data.on_restore_data(u)
        app.W.Workspace(u).annotations.save(0, "normal", None)
    week_ago = time.time() - 8 * 86400
    root = app.W.workspace_root()
    for u in (old, training):
        os.utime(root / "users" / u, (week_ago, week_ago))
    with TRAININGS.hold(training, 1, 5):  # a workspace that is training is never swept
        gone = app.W.expire_workspaces(7)
    assert gone == [old]
    store = app.W.Workspace(fresh).store
    assert not (root / "users" / old).exists() and store.list(old) == []
    assert len(store.list(fresh)) == 1 and len(store.list(training)) == 1
    monkeypatch.setenv("UADLAB_EXPIRE_DAYS", "0")  # 0: never
    os.utime(root / "users" / fresh, (week_ago, week_ago))
    assert app.W.expire_workspaces() == []

    stale, recent = app.S.export_path("a.zip"), app.S.export_path("b.zip")
    os.utime(stale.parent, (week_ago, week_ago))
    assert app.S.remove_stale_exports() >= 1 and not stale.parent.exists() and recent.parent.exists()


def test_messages_show_no_server_path(app, tmp_path, monkeypatch):
    from gradio.utils import get_upload_folder

    root = app.W.workspace_root()
    upload = root / "users" / ("a" * 32) / "uploads" / "20250101-000000-abcdef"
    monkeypatch.setenv("UADLAB_LOCAL_FOLDERS", str(tmp_path))
    text = (f"{upload}/brick/train/good/0.png: not an image; {root}/uadlab.sqlite locked; "
            f"{tmp_path}/mvtec/x.png; folder:/srv/secret/data/all; {get_upload_folder()}/3f2a/my.zip: bad; "
            "see https://huggingface.co/owner/name and owner/name")
    assert public_text(text) == ("upload/brick/train/good/0.png: not an image; workspace/uadlab.sqlite locked; "
                                 f"{tmp_path.name}/mvtec/x.png; folder:all; my.zip: bad; "
                                 "see https://huggingface.co/owner/name and owner/name")


def test_launch_refuses_a_workspace_gradio_would_serve(app, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    for root in (tmp_path / "gradio" / "workspace", tmp_path):  # inside gradio's served folder, or holding it
        monkeypatch.setenv("UADLAB_WORKSPACE", str(root))
        with pytest.raises(RuntimeError, match="overlap"):
            app.S.launch_guard()
    monkeypatch.setenv("UADLAB_WORKSPACE", tempfile.gettempdir())  # where exports go before gradio copies them
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(Path.home() / "elsewhere" / "gradio"))
    # gradio's cached examples default to ./.gradio: the checkout itself may lie in the temp folder
    monkeypatch.setenv("GRADIO_EXAMPLES_CACHE", str(Path.home() / "elsewhere" / "examples"))
    with pytest.raises(RuntimeError, match="holds the temp folder"):
        app.S.launch_guard()
    monkeypatch.setenv("UADLAB_WORKSPACE", str(tmp_path / "ws"))
    guard = app.S.launch_guard()
    assert str(tmp_path / "ws") in guard["blocked_paths"] and guard["max_file_size"] == app.S.limits().upload_bytes
