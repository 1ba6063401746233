"""Shared fixtures: everything offline, tiny and real (real textures, real pretrained EfficientNet-Lite0)."""
from __future__ import annotations

import os

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
