"""SPG: TopK SAE, AuxK, guide sparsity, zero-shot transfer to an unseen 'category', save/load, explanations."""
import numpy as np
import pytest
import torch

from uadlab.features import PatchFeatures
from uadlab.methods import create_method, get_method_class
from uadlab.methods.spg import GUIDES, TopKSAE, auxk_loss

C, H, S = 16, 8, 32  # token width, grid side, image side (4 px per patch)
SMALL = dict(layers=["stage2"], n_atoms=64, k=8, aux_k=16, guide_k=8, sae_epochs=15, guide_epochs=25,
             sae_batch=8, guide_batch=8, dead_tokens=2_000, ema_decay=0.9, seed=0)
CHEAP = dict(sae_epochs=2, guide_epochs=3)  # for tests that only compare runs


def synthetic(category: int, n: int, seed: int) -> tuple[PatchFeatures, torch.Tensor, torch.Tensor]:
    """Tokens of one 'category' (its own mean), odd images get a square defect = a shared anomaly direction."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(C, generator=torch.Generator().manual_seed(100 + category)) * 2
    x = base.view(1, C, 1, 1) + 0.5 * torch.randn(n, C, H, H, generator=g)  # (n, C, h, w)
    anomaly = torch.zeros(C)
    anomaly[:4] = 3.0  # the defect direction shared by all categories
    labels, masks = torch.zeros(n), torch.zeros(n, S, S)
    for i in range(1, n, 2):
        r, c = torch.randint(0, H - 3, (2,), generator=g).tolist()
        x[i, :, r:r + 3, c:c + 3] += anomaly.view(C, 1, 1)
        labels[i] = 1
        masks[i, 4 * r:4 * (r + 3), 4 * c:4 * (c + 3)] = 1
    return PatchFeatures({"stage2": x}, (S, S)), labels, masks


@pytest.fixture(scope="module")
def aux():
    a, b = synthetic(0, 16, 1), synthetic(1, 16, 2)
    return PatchFeatures.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), torch.cat([a[2], b[2]])


@pytest.fixture(scope="module")
def fitted(aux):
    feats, labels, masks = aux
    return create_method("spg", **SMALL).fit(feats, labels=labels, masks=masks)


def test_sae_topk_codes_and_unit_dictionary():
    torch.manual_seed(0)
    sae = TopKSAE(C, 32, 4)
    assert torch.equal(sae.W_enc, sae.D)  # tied initialisation
    z = sae.encode(torch.randn(50, C))
    assert ((z != 0).sum(1) <= 4).all() and (z >= 0).all()
    with torch.no_grad():
        sae.D.mul_(3.0)
    sae.renormalise()
    assert torch.allclose(sae.D.norm(dim=1), torch.ones(32), atol=1e-5)


def test_auxk_revives_only_dead_atoms():
    torch.manual_seed(0)
    sae = TopKSAE(C, 32, 4)
    x = torch.randn(40, C)
    z, x_hat, pre = sae(x)
    none = torch.zeros(32, dtype=torch.bool)
    assert auxk_loss(sae, x, x_hat, pre, none, 8).item() == 0.0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:10] = True
    loss = auxk_loss(sae, x, x_hat, pre, dead, 8)
    loss.backward()
    assert loss.item() > 0
    grad_rows = sae.W_enc.grad.abs().sum(1) > 0
    assert grad_rows[:10].any() and not grad_rows[10:].any()  # only dead atoms' encoder rows get a gradient


def test_zero_shot_transfer_to_unseen_category(fitted):
    feats, labels, masks = synthetic(2, 8, 3)  # a category never seen in training
    m = fitted.score(feats).patch_map  # (B, h, w)
    assert m.shape == (8, H, H) and torch.isfinite(m).all() and ((m >= 0) & (m <= 1)).all()
    gt = torch.nn.functional.avg_pool2d(masks[:, None], 4)[:, 0] > 0.5  # masks on the patch grid
    assert m[gt].mean() > m[~gt].mean() + 0.2
    img = m.flatten(1).max(1).values
    assert img[labels == 1].min() > img[labels == 0].max()
    assert fitted.fit_info["alive_atoms"] > 0 and fitted.fit_info["sae_fvu"] < 1


def test_topk_guides_are_sparse_and_l1_switch_differs(fitted, aux):
    c, _ = fitted.coefficients(fitted.theta_ema)
    assert ((c > 0).sum(1) <= SMALL["guide_k"]).all()
    assert (c[:, ~fitted.alive] == 0).all()
    top = fitted.top_atoms(4)
    assert list(top) == list(GUIDES) and all(len(v) <= 4 for v in top.values())
    vals = [v for _, v in top["local_anomaly"]]
    assert vals == sorted(vals, reverse=True) and vals[0] > 0
    feats, labels, masks = aux
    topk, l1 = (create_method("spg", **{**SMALL, **CHEAP, "sparsity": s}).fit(feats, labels=labels, masks=masks)
                for s in ("topk", "l1"))
    assert (l1.coefficients(l1.theta_ema)[0] > 0).sum(1).max() > SMALL["guide_k"]
    assert not torch.allclose(l1.score(feats[:4]).patch_map, topk.score(feats[:4]).patch_map)


def test_seeded_and_round_trip(fitted, aux, tmp_path):
    feats, labels, masks = aux
    one, two, other = (create_method("spg", **{**SMALL, **CHEAP, "seed": s}).fit(feats, labels=labels, masks=masks)
                       for s in (0, 0, 1))
    torch.testing.assert_close(one.score(feats).patch_map, two.score(feats).patch_map)  # same seed, same maps
    assert not torch.allclose(other.score(feats).patch_map, one.score(feats).patch_map)

    fitted.save_pretrained(tmp_path / "spg")
    loaded = get_method_class("spg").from_pretrained(str(tmp_path / "spg"))
    assert loaded.in_dim == C and loaded.is_fitted
    torch.testing.assert_close(loaded.score(feats).patch_map, fitted.score(feats).patch_map)
    assert loaded.top_atoms() == fitted.top_atoms()


def test_explain_and_global_token(fitted, aux):
    feats, labels, masks = aux
    ex = fitted.explain(feats[1])
    atoms = [k for k in ex if k.startswith("anomaly atom")]
    assert atoms and all(v.shape == (H, H) and np.isfinite(v).all() for v in ex.values())
    assert "P(anomaly)" in ex
    # without CLS the global guides read mean-pooled tokens; a CLS of the token width replaces them
    with_cls = PatchFeatures(dict(feats.maps), feats.image_size, cls=torch.randn(len(feats), C))
    g0 = fitted.score(feats).extras["global_anomaly_prob"]
    g1 = fitted.score(with_cls).extras["global_anomaly_prob"]
    assert not torch.allclose(g0, g1)
    torch.testing.assert_close(fitted.score(with_cls).patch_map, fitted.score(feats).patch_map)  # map unaffected


def test_needs_labels_and_masks(aux):
    feats, labels, _ = aux
    with pytest.raises(ValueError, match="zero-shot"):
        create_method("spg", **SMALL).fit(feats)
    with pytest.raises(ValueError, match="masks"):
        create_method("spg", **SMALL).fit(feats, labels=labels, masks=torch.zeros(3, S, S))
    with pytest.raises(ValueError, match="sparsity"):
        create_method("spg", sparsity="l0")
