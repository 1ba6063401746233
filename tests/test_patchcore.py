import numpy as np
import pytest
import torch

from uadlab.features import PatchFeatures
from uadlab.methods import create_method
from uadlab.methods.patchcore import greedy_coreset, locally_aware


def _naive_greedy(x, n, starts):
    """Textbook farthest-point selection, one point at a time with full distance recomputation."""
    d = torch.stack([(x - x[s]).norm(dim=1) for s in starts]).mean(0)
    chosen = []
    for _ in range(n):
        j = int(d.argmax())
        chosen.append(j)
        d = torch.minimum(d, (x - x[j]).norm(dim=1))
    return chosen


def test_greedy_coreset_equals_naive():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 16, generator=g)
    starts = torch.randperm(500, generator=torch.Generator().manual_seed(0))[:10]
    ours = greedy_coreset(x, 40, proj_dim=128, seed=0, precision="float32").tolist()  # D <= proj_dim: no projection
    assert ours == _naive_greedy(x, 40, starts)
    assert len(set(ours)) == 40


def test_half_precision_coreset_covers_as_well():
    from uadlab.layers import FlatIndex

    x = torch.randn(3000, 200, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 200)
    radius = {}
    for p in ("float16", "float32"):
        idx = greedy_coreset(x, 150, precision=p)
        radius[p] = FlatIndex(x[idx]).search(x, 1)[0].sqrt().max().item()
    assert radius["float16"] <= 1.05 * radius["float32"]


def test_coreset_covers_outliers():
    x = torch.cat([torch.randn(1000, 8) * 0.1, torch.full((1, 8), 10.0)])
    assert 1000 in greedy_coreset(x, 5).tolist()  # the isolated point is picked early


def test_locally_aware_is_neighbourhood_mean():
    m = torch.zeros(1, 1, 5, 5)
    m[0, 0, 2, 2] = 9.0
    f = PatchFeatures({"a": m}, (20, 20))
    out = locally_aware(f, ["a"], patch_size=3)
    assert out[0, 0, 1:4, 1:4].allclose(torch.ones(3, 3)) and out[0, 0, 0, 0] == 0
    # zero padding counts, as in the official unfold + adaptive pooling: a corner of a constant map is 4/9
    const = locally_aware(PatchFeatures({"a": torch.ones(1, 1, 5, 5)}, (20, 20)), ["a"], patch_size=3)[0, 0]
    assert const[2, 2] == 1 and torch.isclose(const[0, 0], torch.tensor(4 / 9)) and torch.isclose(const[0, 2], torch.tensor(6 / 9))


def test_reweighting_keeps_scores_ordered():
    torch.manual_seed(0)
    train = PatchFeatures({"stage2": torch.randn(4, 8, 6, 6), "stage3": torch.randn(4, 8, 3, 3)}, (48, 48))
    pc = create_method("patchcore", coreset_ratio=0.5).fit(train)
    test = train[0]
    test.maps["stage2"] = test.maps["stage2"].clone()
    test.maps["stage2"][0, :, 2, 2] += 20
    normal, anomalous = pc.score(train[1]), pc.score(test)
    assert anomalous.image_score.item() > normal.image_score.item() >= 0
    assert anomalous.patch_map[0].argmax() // 6 in (1, 2, 3)
    assert pc.memory_bank.shape == (int(4 * 36 * 0.5), 16)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_flat_index_matches_brute_force_across_chunks(metric):
    from uadlab.layers import FlatIndex

    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(1000, 12, generator=g), torch.randn(300, 12, generator=g)
    d, i = FlatIndex(bank, metric, q_chunk=64, bank_chunk=128).search(q, k=3)  # several chunks both ways
    full = torch.cdist(q, bank).square() if metric == "l2" else q @ bank.T
    ref_d, ref_i = full.topk(3, dim=1, largest=metric == "ip")
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(d, ref_d, rtol=1e-4, atol=1e-4)
