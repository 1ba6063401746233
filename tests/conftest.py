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


# browser helpers live in tests/helpers.py (re-exported here for the tests that import them from conftest)
from helpers import CHROMIUM, chromium_path, free_port, in_ci, viewer_shares, viewer_transforms, wheel_zoom  # noqa: E402,F401

_BROWSER_SKIPPED: list[str] = []


def _no_browser_reason() -> str | None:
    if not chromium_path():
        return (f"Chromium is not installed ({CHROMIUM} missing; `apt-get install -y chromium`, as .ci/run does)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (`pip install -r requirements-dev.txt`)"
    return None


@pytest.fixture(scope="session")
def browser():
    """A real headless Chromium (Debian's, driven by playwright). Without one the browser tests SKIP with a
    loud notice (a fresh machine passes the README's test command); under CI=true (.ci/run) they FAIL."""
    reason = _no_browser_reason()
    if reason:
        if in_ci():
            pytest.fail(f"{reason}: CI=true requires the browser tests")
        _BROWSER_SKIPPED.append(reason)
        pytest.skip(f"browser test skipped: {reason}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def pytest_report_header(config):
    reason = _no_browser_reason()
    return (f"browser tests: NOT RUN -- {reason}" + (" (CI=true: they will fail)" if in_ci() else "")) if reason \
        else f"browser tests: Chromium at {chromium_path()}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _BROWSER_SKIPPED:
        skipped = [r for r in terminalreporter.stats.get("skipped", []) if "browser test skipped" in str(r.longrepr)]
        bar = "!" * 100
        terminalreporter.write_line(bar, yellow=True, bold=True)
        terminalreporter.write_line(f"{len(skipped)} BROWSER TESTS WERE SKIPPED: {_BROWSER_SKIPPED[0]}.", yellow=True,
                                    bold=True)
        terminalreporter.write_line("The app was NOT tested in a browser. Install Chromium to run them; CI (CI=true, "
                                    ".ci/run) requires them.", yellow=True, bold=True)
        terminalreporter.write_line(bar, yellow=True, bold=True)
