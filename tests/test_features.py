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


def test_pack_is_memory_mapped_and_equals_the_in_memory_assembly(tmp_path, tiny_demo, effnet):
    samples = load_mvtec(tiny_demo, categories=["brick"]).train[:5]
    small = FeatureCache(tmp_path / "c", pack_min=100).extract(effnet, samples)  # in memory
    cache = FeatureCache(tmp_path / "c", pack_min=2)
    packed = cache.extract(effnet, samples)  # the entries exist: assembled into a pack
    assert cache.hits == 5 and packed.meta["extracted"] == 0
    packs = list((tmp_path / "c").rglob("packs/*.safetensors"))
    assert len(packs) == 1 and not list((tmp_path / "c").rglob("*.tmp"))
    for l in small.layers:
        assert packed.maps[l].dtype == torch.float16 and torch.equal(packed.maps[l], small.maps[l])
    # the tensors live in the file's pages (a map), and a write stays private to the process (copy-on-write)
    before = packs[0].read_bytes()
    packed.maps["stage2"][0] += 1
    assert packs[0].read_bytes() == before
    again = cache.extract(effnet, samples)
    assert torch.equal(again.maps["stage3"], small.maps["stage3"]) and cache.hits == 10
    # a damaged pack is rebuilt from the entries, not a crash
    packs[0].write_bytes(before[:100])
    assert torch.equal(cache.extract(effnet, samples).maps["stage4"], small.maps["stage4"])


def test_float16_cache_is_lossless_enough(tmp_path, tiny_demo):
    """The measurement behind the float16 default: per-value error and the AUROC of the memory-bank methods
    against a float32 cache, on real Lite0 features."""
    from uadlab.pipeline import Run, RunConfig

    ds = load_mvtec(tiny_demo, categories=["grass"])
    res = {}
    for dtype in (torch.float32, torch.float16):
        cache = FeatureCache(tmp_path / str(dtype), dtype=dtype)
        run = Run(RunConfig(methods=["patchcore", "anomalydino"], image_size=96), cache=cache).fit(ds.train)
        res[dtype] = run.features(ds.test), run.evaluate(ds.test)
    f32, f16 = res[torch.float32][0], res[torch.float16][0]
    for l in f32.layers:
        err = (f16.maps[l].float() - f32.maps[l]).abs().max() / f32.maps[l].abs().max()
        assert err < 1e-3, (l, float(err))
    for m in ("patchcore", "anomalydino"):
        a, b = res[torch.float32][1][m], res[torch.float16][1][m]
        assert abs(a["image_auroc"] - b["image_auroc"]) <= 0.005 and abs(a["pixel_auroc"] - b["pixel_auroc"]) <= 0.005
