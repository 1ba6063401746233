import numpy as np
import pytest
import torch

from uadlab.features import PatchFeatures
from uadlab.methods import create_method
from uadlab.methods.patchcore import greedy_coreset, kcenter_greedy, locally_aware, random_projection


def _naive_greedy(x, n, starts):
    """Textbook farthest-point selection, one point at a time with full distance recomputation."""
    d = torch.stack([(x - x[s]).norm(dim=1) for s in starts]).mean(0)
    chosen = []
    for _ in range(n):
        j = int(d.argmax())
        chosen.append(j)
        d = torch.minimum(d, (x - x[j]).norm(dim=1))
    return chosen


@pytest.mark.parametrize("candidates", [8192, 7])
def test_greedy_coreset_equals_naive(candidates):
    """The lazy greedy (few candidates: refreshes all the time) chooses what the textbook loop chooses."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 16, generator=g)
    starts = torch.randperm(500, generator=torch.Generator().manual_seed(0))[:10]
    ours = kcenter_greedy(x.clone(), 40, seed=0, candidates=candidates).tolist()  # D <= proj_dim: no projection
    assert ours == _naive_greedy(x, 40, starts)
    assert len(set(ours)) == 40
    assert greedy_coreset(x, 40, proj_dim=128, seed=0).tolist() == ours


def test_lazy_coreset_covers_as_well_as_the_plain_loop():
    from uadlab.layers import FlatIndex

    x = torch.randn(3000, 200, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 200)
    z = x @ random_projection(200, 128, 0)
    radius = {}
    for c in (len(x), 64):  # every row a candidate (the plain loop) / 64 candidates (many refreshes)
        idx = kcenter_greedy(z.clone(), 150, candidates=c)
        radius[c] = FlatIndex(x[idx]).search(x, 1)[0].sqrt().max().item()
    assert radius[64] <= 1.02 * radius[len(x)]


def test_coreset_covers_outliers():
    x = torch.cat([torch.randn(1000, 8) * 0.1, torch.full((1, 8), 10.0)])
    assert 1000 in greedy_coreset(x, 5).tolist()  # the isolated point is picked early


def _adaptive_pool(v, n):
    """torch's adaptive average pooling of a list to n values, by its definition: bin i = [floor(iL/n), ceil((i+1)L/n))."""
    L = len(v)
    return [sum(v[(i * L) // n: -((-(i + 1) * L) // n)]) / (-((-(i + 1) * L) // n) - (i * L) // n) for i in range(n)]


def _bilinear_1d(n_in, n_out, pos):
    """align_corners=False source indices and weights of output position ``pos``."""
    src = max((pos + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = int(src)
    i1 = min(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def _hand_locally_aware(maps, pretrain_dim, target_dim):
    """The official recipe with explicit loops: unfold (zero pad 1), upsample the neighbourhood components
    bilinearly to the finest grid, pool each layer to pretrain_dim, stack, pool to target_dim."""
    h, w = maps[0].shape[-2:]
    out = np.zeros((h, w, target_dim))
    neigh = []
    for m in maps:  # (C, hl, wl) -> (hl, wl, C*9) neighbourhood vectors, channel-major
        C, hl, wl = m.shape
        nb = np.zeros((hl, wl, C * 9))
        for y in range(hl):
            for x in range(wl):
                for c in range(C):
                    for dy in range(3):
                        for dx in range(3):
                            yy, xx = y + dy - 1, x + dx - 1
                            inside = 0 <= yy < hl and 0 <= xx < wl
                            nb[y, x, c * 9 + dy * 3 + dx] = m[c, yy, xx] if inside else 0.0
        neigh.append(nb)
    for y in range(h):
        for x in range(w):
            vecs = []
            for nb in neigh:
                hl, wl = nb.shape[:2]
                y0, y1, ly = _bilinear_1d(hl, h, y)
                x0, x1, lx = _bilinear_1d(wl, w, x)
                v = ((1 - ly) * ((1 - lx) * nb[y0, x0] + lx * nb[y0, x1])
                     + ly * ((1 - lx) * nb[y1, x0] + lx * nb[y1, x1]))
                vecs += _adaptive_pool(list(v), pretrain_dim)
            out[y, x] = _adaptive_pool(vecs, target_dim)
    return out


@pytest.mark.parametrize("chunk_floats", [1 << 24, 1])
def test_locally_aware_matches_hand_computation(chunk_floats):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 2, 4, 4, generator=g)  # 2*9 = 18 < 20: the per-layer pooling upsamples
    b = torch.randn(2, 3, 2, 2, generator=g)  # 3*9 = 27 > 20, coarser grid: upsampled to 4 x 4
    f = PatchFeatures({"a": a, "b": b}, (32, 32))
    out = locally_aware(f, ["a", "b"], patch_size=3, pretrain_dim=20, target_dim=8, chunk_floats=chunk_floats)
    assert out.shape == (2, 4, 4, 8)
    for i in range(2):
        ref = _hand_locally_aware([a[i].numpy().astype(np.float64), b[i].numpy().astype(np.float64)], 20, 8)
        np.testing.assert_allclose(out[i].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_locally_aware_layer_of_9216_is_the_zero_padded_3x3_mean():
    """With C*9 = 9 * pretrain_dim (WideResNet layer3: 9216 -> 1024) the pooling is the 3x3 mean per channel."""
    m = torch.zeros(1, 4, 5, 5)
    m[0, 1, 2, 2] = 9.0
    out = locally_aware(PatchFeatures({"a": m}, (20, 20)), ["a"], patch_size=3, pretrain_dim=4, target_dim=4)
    assert out[0, 1:4, 1:4, 1].allclose(torch.ones(3, 3)) and out[0, 0, 0, 1] == 0 and out[0, ..., 0].abs().max() == 0
    const = locally_aware(PatchFeatures({"a": torch.ones(1, 1, 5, 5)}, (20, 20)), ["a"], 3, 1, 1)[0, ..., 0]
    assert const[2, 2] == 1 and torch.isclose(const[0, 0], torch.tensor(4 / 9))  # zero padding counts


def _toy_features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return PatchFeatures({"stage2": torch.randn(4, 8, 6, 6, generator=g), "stage3": torch.randn(4, 8, 3, 3, generator=g)},
                         (48, 48))


@pytest.mark.parametrize("image_score", ["max", "eq7"])
def test_scores_rank_a_planted_anomaly(image_score):
    train = _toy_features()
    pc = create_method("patchcore", coreset_ratio=0.5, pretrain_dim=64, target_dim=32, image_score=image_score).fit(train)
    test = train[0]
    test.maps["stage2"] = test.maps["stage2"].clone()
    test.maps["stage2"][0, :, 2, 2] += 20
    normal, anomalous = pc.score(_toy_features(1)[1]), pc.score(test)
    assert anomalous.image_score.item() > normal.image_score.item() >= 0
    assert anomalous.patch_map[0].argmax() // 6 in (1, 2, 3)
    assert pc.memory_bank.shape == (int(4 * 36 * 0.5), 32)


def test_distance_choice_and_official_max():
    train = _toy_features()
    test = _toy_features(1)[:2]
    sq = create_method("patchcore", coreset_ratio=0.5, pretrain_dim=64, target_dim=32).fit(train).score(test)
    eu = create_method("patchcore", coreset_ratio=0.5, pretrain_dim=64, target_dim=32, distance="euclidean").fit(train).score(test)
    torch.testing.assert_close(eu.patch_map.square(), sq.patch_map, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sq.image_score, sq.patch_map.flatten(1).max(1).values)  # official: max over patches
    with pytest.raises(ValueError, match="distance"):
        create_method("patchcore", distance="cosine")


def test_paper_preset_resolves_wide_resnet_layer2_layer3():
    from uadlab.backbones import _build, backbone_spec, resolve_name

    cls = type(create_method("patchcore"))
    inputs = cls.paper_inputs
    assert resolve_name(inputs["backbone"]) == "wide_resnet50_2.tv_in1k" and (inputs["resize"], inputs["image_size"]) == (256, 224)
    spec = backbone_spec(inputs["backbone"])
    pc = cls.from_preset("paper")
    assert pc.layers_for(spec) == ["stage2", "stage3"] and spec.dims[2:4] == (512, 1024)
    assert (pc.coreset_ratio, pc.pretrain_dim, pc.target_dim, pc.distance, pc.image_score) == (0.1, 1024, 1024, "squared", "max")
    with torch.device("meta"):  # the layers the Backbone builds, without allocating (or downloading) weights
        model, is_vit = _build(resolve_name(inputs["backbone"]), 224, None, [2, 3])
    assert not is_vit and model.feature_info.module_name() == ["layer2", "layer3"]


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


def test_distributed_coreset_choice_is_checked():
    assert create_method("patchcore", distributed_coreset="two_round").distributed_coreset == "two_round"
    with pytest.raises(ValueError, match="distributed_coreset"):
        create_method("patchcore", distributed_coreset="approx")
