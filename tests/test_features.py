import time

import pytest
import torch

from uadlab.data import load_mvtec
from uadlab.features import FeatureCache, PatchFeatures


def test_cache_reuses_features(tmp_path, tiny_demo, effnet):
    samples = load_mvtec(tiny_demo, categories=["brick"]).train[:4]
    cache = FeatureCache(tmp_path / "c")
    calls = []
    f1 = cache.extract(effnet, samples, batch_size=3, progress=lambda p: calls.append((p.done, p.total)))
    assert cache.misses == 4 and cache.hits == 0 and calls[-1] == (4, 4)
    f2 = cache.extract(effnet, samples)
    assert cache.hits == 4 and f2.meta["extracted"] == 0
    for l in f1.layers:
        assert torch.equal(f1.maps[l], f2.maps[l])
    # a different backbone setting is a different key
    from uadlab.backbones import Backbone

    other = Backbone("efficientnet_lite0", layers=["stage2"], image_size=64)
    cache.extract(other, samples[:1])
    assert cache.misses == 5


def test_cache_eviction_and_damaged_entries(tmp_path, tiny_demo, effnet):
    samples = load_mvtec(tiny_demo, categories=["grass"]).train[:3]
    cache = FeatureCache(tmp_path / "c", max_bytes=None)
    cache.extract(effnet, samples)
    one = cache.size_bytes() / 3
    files = sorted((tmp_path / "c").rglob("*.safetensors"))
    files[0].write_bytes(b"garbage")  # a damaged entry is a miss, not a crash
    cache.extract(effnet, samples)
    assert cache.misses == 4
    cache.max_bytes = int(one * 1.5)
    assert cache.evict() >= 1 and cache.size_bytes() <= one * 1.5


def test_patchfeatures_ops():
    f = PatchFeatures({"a": torch.rand(3, 4, 8, 8), "b": torch.rand(3, 6, 4, 4)}, (32, 32))
    assert len(f) == 3 and f.grid == (8, 8) and f[1].maps["a"].shape == (1, 4, 8, 8)
    assert f.stacked().shape == (3, 10, 8, 8)
    assert len(PatchFeatures.cat([f, f[0]])) == 4
    with pytest.raises(KeyError, match="'c'"):
        f.select(["c"])
