"""The shared kNN block: exact and HNSW search agree on real backbone features; "auto" picks by bank size."""
import pytest
import torch

from uadlab import layers
from uadlab.layers import FlatIndex, HnswIndex, knn_index
from uadlab.methods import create_method


@pytest.fixture(scope="module")
def feats(effnet, tiny_demo):
    from uadlab.data import load_data
    from uadlab.features import FeatureCache

    ds = load_data(str(tiny_demo), categories=["brick", "grass"])
    cache = FeatureCache(tiny_demo.parent / "knn-cache")
    return cache.extract(effnet, ds.train), cache.extract(effnet, ds.test), ds


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_hnsw_recall_on_real_features(feats, metric):
    train, test, _ = feats
    bank = train.stacked(["stage2", "stage3"]).permute(0, 2, 3, 1).reshape(-1, 152)
    q = test.stacked(["stage2", "stage3"]).permute(0, 2, 3, 1).reshape(-1, 152)
    if metric == "ip":
        bank, q = torch.nn.functional.normalize(bank, dim=1), torch.nn.functional.normalize(q, dim=1)
    de, ie = FlatIndex(bank, metric).search(q, 3)
    da, ia = HnswIndex(bank, metric).search(q, 3)
    assert ia.shape == ie.shape == (len(q), 3)
    assert (ia[:, 0] == ie[:, 0]).float().mean() >= 0.97  # recall@1 against exact search
    assert torch.allclose(da[:, 0], de[:, 0], rtol=1e-3, atol=1e-4) or (ia[:, 0] != ie[:, 0]).any()
    found = ia[:, 0] == ie[:, 0]
    assert torch.allclose(da[found, 0], de[found, 0], rtol=1e-3, atol=1e-3)  # same neighbour: same distance


def test_auto_is_exact_below_the_threshold_and_hnsw_above(monkeypatch):
    bank = torch.randn(300, 8)
    assert isinstance(knn_index(bank, "l2", "auto"), FlatIndex)
    monkeypatch.setattr(layers, "HNSW_MIN_BANK", 100)
    assert isinstance(knn_index(bank, "l2", "auto"), HnswIndex)
    assert isinstance(knn_index(bank, "l2", "exact"), FlatIndex)
    with pytest.raises(ValueError, match="knn must be one of"):
        knn_index(bank, "l2", "annoy")
    with pytest.raises(ValueError, match="knn must be one of"):
        create_method("patchcore", knn="fast")


@pytest.mark.parametrize("name", ["patchcore", "anomalydino"])
def test_methods_score_alike_with_hnsw(feats, name):
    train, test, _ = feats
    heads = {}
    for knn in ("exact", "hnsw"):
        h = create_method(name, knn=knn, layers=["stage2", "stage3"], **({"pretrain_dim": None} if name == "patchcore" else {}))
        heads[knn] = h.fit(train.select(["stage2", "stage3"]))
    t = test.select(["stage2", "stage3"])
    a, b = heads["exact"].score(t), heads["hnsw"].score(t)
    assert torch.equal(heads["exact"].memory_bank, heads["hnsw"].memory_bank)
    same = (a.patch_map - b.patch_map).abs() <= 1e-4 * a.patch_map.max()
    assert same.float().mean() >= 0.99  # the rare miss only makes a patch look farther (a worse neighbour)
    assert (b.patch_map >= a.patch_map - 1e-4 * a.patch_map.max()).all()
    assert torch.corrcoef(torch.stack([a.image_score, b.image_score]))[0, 1] > 0.99
