"""SPG: TopK SAE, AuxK, guide sparsity, zero-shot transfer to an unseen 'category', save/load, explanations."""
import numpy as np
import pytest
import torch

from uadlab.features import PatchFeatures
from uadlab.methods import FitContext, create_method, get_method_class
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
    return create_method("spg", **SMALL).fit(feats, context=FitContext(labels=labels, masks=masks))


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
    assert fitted.fit_record.details["alive_atoms"] > 0 and fitted.fit_record.details["sae_fvu"] < 1


def test_l1_default_and_topk_ablation(fitted, aux):
    assert fitted.sparsity == "l1" and get_method_class("spg").presets["paper"]["sparsity"] == "l1"
    c, _ = fitted.coefficients(fitted.theta_ema)
    assert (c[:, ~fitted.alive] == 0).all() and (c >= 0).all()
    assert (c > 0).sum(1).max() > SMALL["guide_k"]  # L1 only: no hard cap on the number of atoms
    top = fitted.top_atoms(4)
    assert list(top) == list(GUIDES) and all(len(v) <= 4 for v in top.values())
    vals = [v for _, v in top["local_anomaly"]]
    assert vals == sorted(vals, reverse=True) and vals[0] > 0
    feats, labels, masks = aux
    topk = create_method("spg", **{**SMALL, **CHEAP, "sparsity": "topk"}).fit(feats, context=FitContext(labels=labels, masks=masks))
    l1 = create_method("spg", **{**SMALL, **CHEAP}).fit(feats, context=FitContext(labels=labels, masks=masks))
    assert ((topk.coefficients(topk.theta_ema)[0] > 0).sum(1) <= SMALL["guide_k"]).all()
    assert not torch.allclose(l1.score(feats[:4]).patch_map, topk.score(feats[:4]).patch_map)


def test_official_post_processing(fitted):
    feats, _, _ = synthetic(2, 4, 5)
    res = fitted.score(feats)
    maps, scores = fitted.heatmap(res, (S, S))  # the method's own: sigma 4 at the input size, max of the map
    assert fitted.sigma == 4.0 and fitted.score_mode == "max"
    torch.testing.assert_close(scores, maps.flatten(1).max(1).values)
    raw, _ = fitted.heatmap(res, (S, S), sigma=0)
    assert maps.flatten(1).std(1).mean() < raw.flatten(1).std(1).mean()  # smoothed


def test_image_labels_only(aux):
    """An auxiliary set without masks trains through the MIL image loss and still transfers."""
    feats, labels, _ = aux
    head = create_method("spg", **SMALL).fit(feats, context=FitContext(labels=labels))
    assert head.fit_record.details["supervision"] == "image labels only"
    test, tl, tm = synthetic(2, 8, 3)
    m = head.score(test).patch_map
    gt = torch.nn.functional.avg_pool2d(tm[:, None], 4)[:, 0] > 0.5
    assert m[gt].mean() > m[~gt].mean() + 0.2
    img = m.flatten(1).max(1).values
    assert img[tl == 1].min() > img[tl == 0].max()


def test_seeded_and_round_trip(fitted, aux, tmp_path):
    feats, labels, masks = aux
    one, two, other = (create_method("spg", **{**SMALL, **CHEAP, "seed": s}).fit(feats, context=FitContext(labels=labels, masks=masks))
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


def test_needs_labels_and_matching_masks(aux):
    feats, labels, _ = aux
    with pytest.raises(ValueError, match="zero-shot"):
        create_method("spg", **SMALL).fit(feats)
    with pytest.raises(ValueError, match="masks"):
        create_method("spg", **SMALL).fit(feats, context=FitContext(labels=labels, masks=torch.zeros(3, S, S)))
    with pytest.raises(ValueError, match="sparsity"):
        create_method("spg", sparsity="l0")


# ---- the auxiliary set: other categories only (no leakage of the target's test images) ----------------------
def test_auxiliary_set_never_holds_the_target(tiny_demo):
    from uadlab.data import load_mvtec
    from uadlab.pipeline import auxiliary_set

    ds = load_mvtec(tiny_demo)
    aux = auxiliary_set(ds, ["brick"])
    assert aux and {s.category for s in aux} == {"grass", "gravel"}
    assert {s.label for s in aux} == {0, 1} and all(s.label == 0 or s.mask_path for s in aux)
    assert {s.category for s in auxiliary_set(ds, ["brick", "grass"])} == {"gravel"}
    with pytest.raises(ValueError, match="categories other than the target"):
        auxiliary_set(ds.category("brick"), ["brick"])
    # anomalies without masks: image labels only, when none of them has a mask
    for s in ds.test:
        s.mask_path = None
    unmasked = auxiliary_set(ds, ["brick"])
    assert any(s.label == 1 for s in unmasked) and "brick" not in {s.category for s in unmasked}


def test_cli_fit_learns_from_other_categories_only(tiny_demo, tmp_path, monkeypatch, capsys):
    from uadlab.cli import main
    from uadlab.pipeline import Run

    seen, fit = [], Run.fit
    monkeypatch.setattr(Run, "fit", lambda self, train, progress=None, aux=None: (seen.append(aux),
                                                                                  fit(self, train, progress, aux))[1])
    assert main(["fit", "--data", str(tiny_demo), "--categories", "brick", "--methods", "spg", "--preset", "tiny",
                 "--image-size", "64", "--out", str(tmp_path / "runs")]) == 0
    assert seen[0] and "brick" not in {s.category for s in seen[0]}
    assert {s.category for s in seen[0]} == {"grass", "gravel"}
    # a single-category dataset: refused with a clear message instead of training on the target's test images
    assert main(["fit", "--data", str(tiny_demo / "brick"), "--methods", "spg", "--preset", "tiny",
                 "--image-size", "64", "--out", str(tmp_path / "runs")]) == 2
    assert "categories other than the target" in capsys.readouterr().err
