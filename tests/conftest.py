"""Shared fixtures: everything offline, tiny and real (real textures, real pretrained EfficientNet-Lite0)."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is unreachable here: fail fast instead of retrying

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Feature and demo caches of the test session live in a temp folder."""
    root = tmp_path_factory.mktemp("uadlab-cache")
    old = os.environ.get("UADLAB_CACHE")
    os.environ["UADLAB_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("UADLAB_CACHE", None)
    else:
        os.environ["UADLAB_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A small demo dataset (3 textures, 96 px) in the MVTec layout."""
    from uadlab.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo"), n_train=10, n_test_good=4, n_test_per_defect=2, size=96)


@pytest.fixture(scope="session")
def effnet():
    from uadlab.backbones import Backbone

    return Backbone("efficientnet_lite0", layers=["stage1", "stage2", "stage3", "stage4"], image_size=96)


SMALL_DEMO = {"n_train": 8, "n_test_good": 2, "n_test_per_defect": 1, "size": 96}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app's screens on a fresh workspace and a small demo: their callbacks are called as plain functions
    (``app.data.on_load_demo``, ``app.train.on_train``, ...; ``app.W`` is uadlab.workspace, ``app.S`` safety)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("UADLAB_WORKSPACE", str(tmp_path_factory.mktemp("workspace")))
    mp.setenv("UADLAB_DEMO", json.dumps(SMALL_DEMO))
    mp.delenv("UADLAB_LOCAL_FOLDERS", raising=False)
    from uadlab import safety, ui, workspace
    from uadlab.ui import annotate_tab, compare_tab, data_tab, explain_tab, header, hub_tab, train_tab

    yield SimpleNamespace(header=header, data=data_tab, train=train_tab, compare=compare_tab, annotate=annotate_tab,
                          hub=hub_tab, explain=explain_tab, on_run_change=ui.on_run_change, build_app=ui.build_app,
                          serve=ui.serve, W=workspace, S=safety)
    mp.undo()


def no_progress(*a, **k):
    return None


def load_data(app, user, source, category="all", **kw):
    """Load data like the Data tab's buttons do: ``source`` names the form, ``kw`` its fields (others empty)."""
    d = app.data
    if source == "Demo (offline)":
        return d.on_load_demo(user, category)
    if source == "Upload":
        return d.on_load_upload(user, category, d.Upload(kw.get("zip_file"), kw.get("train_files") or [],
                                                         kw.get("test_files") or [], kw.get("mask_files") or [],
                                                         bool(kw.get("unmasked_normal"))))
    if source == "Local folder":
        return d.on_load_folder(user, category, kw.get("folder"))
    fields = {k[3:]: v for k, v in kw.items() if k.startswith("hf_") and k != "hf_token"}
    fields = {{"image": "image_column", "label": "label_column", "mask": "mask_column",
               "category": "category_column"}.get(k, k): v for k, v in fields.items()}
    return d.on_load_hf(user, category, d.HfSource(**fields), kw.get("hf_token"))


CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    """A real headless Chromium (Debian's, driven by playwright); FAILS when it is missing (.ci/run installs it)."""
    import shutil

    exe = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if not exe:
        pytest.fail(f"Chromium is not installed ({CHROMIUM} missing): run `apt-get install -y chromium` "
                    "(.ci/run does this) -- the browser tests need a real Chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


# ---- the heatmap viewer in a browser page (its root has the id "viewer") ----------------------------------
def viewer_transforms(page) -> list[str]:
    return page.eval_on_selector_all("#viewer .uadv-panel", "els => els.map(e => e.dataset.transform)")


def viewer_shares(page) -> list[float]:
    return page.eval_on_selector_all("#viewer .uadv-share", "els => els.map(e => parseFloat(e.dataset.share))")


def wheel_zoom(page, stage, at: tuple[float, float] = (0.5, 0.5)) -> list[str]:
    """Wheel up over a panel's stage until the viewer zooms past 1.5x; return every panel's transform."""
    stage.scroll_into_view_if_needed()
    box = stage.bounding_box()
    page.mouse.move(box["x"] + box["width"] * at[0], box["y"] + box["height"] * at[1])
    page.mouse.wheel(0, -400)
    page.wait_for_function("parseFloat(document.querySelector('#viewer').dataset.zoom) > 1.5")
    page.wait_for_timeout(100)
    return viewer_transforms(page)
