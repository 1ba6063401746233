"""Shared fixtures: everything offline, tiny and real (real textures, real pretrained EfficientNet-Lite0)."""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
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
    """app.py as a module on a fresh workspace and a small demo: its callbacks are called as plain functions."""
    mp = pytest.MonkeyPatch()
    mp.setenv("UADLAB_WORKSPACE", str(tmp_path_factory.mktemp("workspace")))
    mp.setenv("UADLAB_DEMO", json.dumps(SMALL_DEMO))
    mp.delenv("UADLAB_LOCAL_FOLDERS", raising=False)
    spec = importlib.util.spec_from_file_location("uadlab_app", Path(__file__).resolve().parents[1] / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    mp.undo()


def no_progress(*a, **k):
    return None


def load_data(app, user, source, category="all", **kw):
    """Call on_load_data with the named inputs (the others empty), like the Data tab does."""
    names = [n for n in inspect.signature(app.on_load_data).parameters if n != "progress"]
    args = {n: None for n in names}
    args.update(user=user, source=source, category=category, **kw)
    return app.on_load_data(**args, progress=no_progress)
