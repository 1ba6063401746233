"""Spatial AR: masks, exact receptive fields, learning, switches, reproducibility, save/load."""
import numpy as np
import pytest
import torch

from uadlab.features import PatchFeatures
from uadlab.methods import FitContext, create_method, get_method_class
from uadlab.methods.spatial_ar import build_net, conv_mask

TINY = dict(hidden=16, epochs=30, batch_size=4, dilations=[1, 1, 1, 1], mode="causal", seed=0)


def textures(n: int, c: int = 6, size: int = 12, seed: int = 0) -> torch.Tensor:
    """(n, c, size, size) smooth periodic 'embeddings' with random phases: predictable from context."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    freq = torch.linspace(0.4, 1.2, c)[:, None, None]
    ph = torch.rand(n, c, 1, 1, generator=g) * 6.28
    x = torch.sin(freq * xx + ph) + torch.cos(0.7 * freq * yy + ph)
    return x + 0.05 * torch.randn(x.shape, generator=g)


def feats(x: torch.Tensor) -> PatchFeatures:
    return PatchFeatures({"norm": x}, (x.shape[-2] * 16, x.shape[-1] * 16))


@pytest.fixture(scope="module")
def fitted():
    head = create_method("spatial_ar", **TINY)
    head.fit(feats(textures(16)), context=FitContext(val_features=feats(textures(4, seed=1))))
    return head


def test_masks_match_the_paper():
    assert conv_mask("A", 3).tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert conv_mask("B", 3).tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 0]]
    assert conv_mask("centre", 3).tolist() == [[1, 1, 1], [1, 0, 1], [1, 1, 1]]
    assert conv_mask("up", 3).tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert conv_mask("up+", 3).tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert conv_mask("right", 5).tolist() == [[0, 0, 0, 1, 1]] * 5
    assert conv_mask("left+", 3).tolist() == [[1, 1, 0]] * 3
    assert torch.equal(conv_mask("down+", 3), conv_mask("up+", 3).flip(0))
    with pytest.raises(ValueError, match="mask kind"):
        conv_mask("C", 3)


@pytest.mark.parametrize("mode", ["four_way", "causal", "bidirectional", "standard"])
@pytest.mark.parametrize("dilations", [[4, 4, 4, 4], [1, 2, 4, 8]])
def test_receptive_field_is_exact(mode, dilations):
    """The propagated mask equals the non-zero gradient of the centre output on a random positive network."""
    head = create_method("spatial_ar", mode=mode, dilations=dilations)
    rf = head.receptive_field()
    E = rf.shape[0] // 2
    torch.manual_seed(0)
    net = build_net(2, 4, 5, 3, dilations, mode).double()
    with torch.no_grad():  # positive weights and biases: no ReLU is dead, no cancellation
        for p in net.parameters():
            p.copy_(p.abs() + 0.01)
    x = torch.rand(1, 2, 2 * E + 1, 2 * E + 1, dtype=torch.float64, requires_grad=True)
    net(x)[0, :, E, E].sum().backward()
    grad = (x.grad[0].abs().sum(0) > 0).numpy()
    np.testing.assert_array_equal(grad, rf > 0)
    # causal: only raster-earlier tokens, never the target. "Bidirectional" leaks the target in two hops when
    # layer 1 can undo layer 0's offset (equal dilations), not with [1, 2, 4, 8] (odd + even offsets != 0)
    assert rf[E, E] == (mode == "standard" or (mode == "bidirectional" and dilations == [4, 4, 4, 4]))
    if mode == "causal":
        assert rf[E + 1:].sum() == 0 and rf[E, E:].sum() == 0
    if mode == "four_way":  # context on all four sides, the centre never
        assert rf[:E].any() and rf[E + 1:].any() and rf[:, :E].any() and rf[:, E + 1:].any()
    if dilations == [4, 4, 4, 4]:  # 16 interleaved lattices: only offsets that are multiples of 4
        ys, xs = np.nonzero(rf)
        assert ((ys - E) % 4 == 0).all() and ((xs - E) % 4 == 0).all()


@pytest.mark.parametrize("d", [1, 2, 4])
def test_default_is_centre_blind_and_both_sided(d):
    """Issue 25: the default context never holds the token it predicts, yet surrounds it: with dilation d
    the field is every offset of the d-lattice within reach except the centre, on all four sides."""
    head = create_method("spatial_ar", dilations=[d] * 4)
    assert head.mode == "four_way"
    rf = head.receptive_field()
    E = rf.shape[0] // 2
    assert E == 4 * d and rf[E, E] == 0  # four spatial layers per stack (the fifth is the 1 x 1 merge)
    assert rf[E - d, E] == rf[E + d, E] == rf[E, E - d] == rf[E, E + d] == 1  # the four neighbours on the lattice
    lattice = np.zeros_like(rf)
    lattice[::d, ::d] = 1
    lattice[E, E] = 0
    np.testing.assert_array_equal(rf, lattice)
    # the same on a network: the centre output does not move when the centre input does
    torch.manual_seed(0)
    net = build_net(3, 8, 5, 3, [d] * 4, "four_way").eval()
    with torch.no_grad():  # positive weights: no ReLU is dead, so every path that exists carries a change
        for p in net.parameters():
            p.copy_(p.abs() + 0.01)
    x = torch.rand(1, 3, 2 * E + 1, 2 * E + 1)
    x2 = x.clone()
    x2[0, :, E, E] += 5.0
    with torch.no_grad():
        assert torch.equal(net(x)[0, :, E, E], net(x2)[0, :, E, E])
        assert not torch.equal(net(x)[0, :, E + d, E], net(x2)[0, :, E + d, E])


def test_learns_normality(fitted):
    x = textures(4, seed=2)
    bad = x.clone()
    bad[:, :, 4:7, 4:7] = 3.0  # a 3x3 patch off the normal pattern
    normal, anomalous = fitted.score(feats(x)).patch_map, fitted.score(feats(bad)).patch_map
    assert torch.isfinite(anomalous).all() and anomalous.shape == (4, 12, 12)
    assert anomalous[:, 4:7, 4:7].mean() > 5 * normal[:, 4:7, 4:7].mean()
    assert anomalous[:, 4:7, 4:7].mean() > 5 * anomalous[:, 9:, 9:].mean()  # far from the defect: still normal
    info = fitted.fit_record.train
    assert info.selection == "val_loss" and len(info.val_loss) == TINY["epochs"]
    assert info.val_loss[info.best_epoch - 1] == min(info.val_loss)


def test_seeded_and_reproducible():
    x, v = feats(textures(8)), feats(textures(2, seed=1))
    small = {**TINY, "epochs": 3}
    a = create_method("spatial_ar", **small).fit(x, context=FitContext(val_features=v)).score(v).patch_map
    b = create_method("spatial_ar", **small).fit(x, context=FitContext(val_features=v)).score(v).patch_map
    c = create_method("spatial_ar", **{**small, "seed": 1}).fit(x, context=FitContext(val_features=v)).score(v).patch_map
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_switches_change_outputs(fitted):
    x, v = feats(textures(8)), feats(textures(2, seed=1))
    base = fitted.score(v).patch_map
    fitted.flip = True
    flipped = fitted.score(v).patch_map
    fitted.flip = False
    assert not torch.allclose(base, flipped) and torch.isfinite(flipped).all()
    small = {**TINY, "epochs": 2}
    for kw in [dict(mode="four_way"), dict(mode="bidirectional"), dict(mode="standard"), dict(loss="gaussian_nll"), dict(select="last")]:
        head = create_method("spatial_ar", **{**small, **kw}).fit(x, context=FitContext(val_features=v))
        m = head.score(v).patch_map
        assert torch.isfinite(m).all() and not torch.allclose(m, base), kw
    assert head.fit_record.train.selection == "last" and head.fit_record.train.best_epoch == 2
    capped = create_method("spatial_ar", **{**small, "epochs": 10, "max_steps": 4}).fit(x)  # 2 steps per epoch
    assert capped.fit_record.train.epochs == 2 and capped.fit_record.train.steps == 4
    nll = create_method("spatial_ar", **small, loss="gaussian_nll")
    nll.fit(x)
    assert nll.net.convs[-1].out_channels == 12  # mean and log-variance per channel


def test_save_load_round_trip(fitted, tmp_path):
    fitted.save_pretrained(tmp_path)
    again = get_method_class("spatial_ar").from_pretrained(str(tmp_path))
    assert again.in_dim == 6 and set(again.state_dict()) == set(fitted.state_dict())
    v = feats(textures(2, seed=3))
    assert torch.equal(again.score(v).patch_map, fitted.score(v).patch_map)
    assert "mask" not in " ".join(fitted.state_dict())  # masks are rebuilt from the mode, not saved


def test_explain_and_errors(fitted):
    ex = fitted.explain(feats(textures(1)))
    assert ex["prediction error"].shape == (12, 12)
    rf = ex["receptive field"]
    assert rf.dtype == np.uint8 and rf.ndim == 3 and rf.shape[2] == 3
    with pytest.raises(ValueError, match="mode"):
        create_method("spatial_ar", mode="sideways")
    with pytest.raises(ValueError, match="channels"):
        fitted.fit(feats(torch.zeros(2, 5, 12, 12)))


def test_dilation_follows_the_grid_and_is_saved(tmp_path):
    grid_dilation = get_method_class("spatial_ar").grid_dilation
    assert [grid_dilation((g, g)) for g in (28, 14, 8, 4)] == [4, 2, 1, 1]  # the paper's 4 at 28 x 28
    assert get_method_class("spatial_ar").presets["paper"]["dilations"] == [4, 4, 4, 4]
    head = create_method("spatial_ar", hidden=8, epochs=1, batch_size=4).fit(feats(textures(4, size=14)))
    assert head.dilations == [2, 2, 2, 2] and head.config()["dilations"] == [2, 2, 2, 2]
    head.save_pretrained(tmp_path)
    again = get_method_class("spatial_ar").from_pretrained(str(tmp_path))
    v = feats(textures(2, size=14, seed=3))
    assert again.dilations == [2, 2, 2, 2] and torch.equal(again.score(v).patch_map, head.score(v).patch_map)
    with pytest.raises(ValueError, match="grid"):
        create_method("spatial_ar").receptive_field()  # unfitted, no dilations given: unknown until the grid


def test_error_is_normalised_by_normal_statistics(fitted):
    """err_var is the mean squared error per channel on the normal training tokens: normalised, each is 1."""
    x = textures(16)
    with torch.no_grad():
        e = fitted._error(x, x).mean((0, 2, 3))
    torch.testing.assert_close(e / fitted.err_var, torch.ones(6), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def hard_features():
    """Real Lite0 features of the hard set (brick): darker / smoother / low-contrast anomalies, darkened normals."""
    from harddata import hard_set
    from uadlab.backbones import Backbone

    bb = Backbone("efficientnet_lite0", layers=["stage3"], image_size=128)  # 8 x 8 grid
    train, test, labels, kinds, _ = hard_set("brick", size=128, n_train=16, n_per_kind=6)
    return bb.extract(train), bb.extract(test), labels, np.array(kinds)


def test_darker_smoother_anomalies_rank_above_normals(hard_features):
    """Issue 13: the old default ranked smooth dark defects BELOW normal images. The defaults must rank them
    above normals, and whole normal images darkened by 20% must not be ranked above the other normals."""
    from sklearn.metrics import roc_auc_score

    ftr, fte, labels, kinds = hard_features
    head = create_method("spatial_ar", hidden=32, epochs=20, batch_size=4).fit(ftr)  # default mode and score
    assert head.dilations == [1, 1, 1, 1]  # the 8 x 8 grid
    _, s = head.heatmap(head.score(fte), (128, 128))
    s = s.numpy()
    assert roc_auc_score(labels, s) > 0.8  # measured 0.82; the paper's causal, dilation 4: 0.78
    normal = labels == 0
    assert roc_auc_score(kinds[normal] == "darkened", s[normal]) < 0.6  # measured 0.28


def test_refit_trains_the_selected_epoch_count():
    """A budget (a refit) trains exactly that many epochs and keeps them; refit_budget hands on the selection."""
    x, v = feats(textures(8)), feats(textures(2, seed=1))
    first = create_method("spatial_ar", **{**TINY, "epochs": 6}).fit(x, context=FitContext(val_features=v))
    best = first.fit_record.train.best_epoch
    assert first.refit_budget() == best and first.fit_record.train.selection == "val_loss"
    again = create_method("spatial_ar", **{**TINY, "epochs": 6}).fit(x, context=FitContext(budget=first.refit_budget()))
    assert again.fit_record.train.epochs == best and again.fit_record.train.selection == "budget"
    assert again.fit_record.train.steps == best * 2 and again.fit_record.train.val_loss == []
    assert create_method("spatial_ar").refit_budget() is None  # nothing selected yet


def test_pipeline_refit_ships_the_selected_head(tiny_demo, tmp_path, monkeypatch):
    """calibration="refit": the head fit on all normals trains the epoch count its fold heads selected on their
    held-out normals (issue 25: it used to keep the last epoch of the full budget)."""
    from uadlab.data import load_mvtec
    from uadlab.features import FeatureCache
    from uadlab.methods.spatial_ar import SpatialAR
    from uadlab.pipeline import Run, RunConfig

    seen, real_fit = [], SpatialAR.fit

    def recording_fit(self, features, progress=None, **kw):  # the real fit; keeps each fit's record
        out = real_fit(self, features, progress=progress, **kw)
        seen.append(self.fit_record.train)
        return out

    monkeypatch.setattr(SpatialAR, "fit", recording_fit)
    train = load_mvtec(tiny_demo, categories=["brick"]).train[:6]
    run = Run(RunConfig(methods=["spatial_ar"], preset="tiny", image_size=64, calibration="refit",
                        method_kwargs={"spatial_ar": {"epochs": 8}}), cache=FeatureCache(tmp_path))
    run.fit(train)
    *folds, final = seen  # cross-fitting: a trained head is fitted on 2 folds, then on all (pipeline.n_folds)
    assert len(folds) == 2 and all(f.selection == "val_loss" and len(f.val_loss) == 8 for f in folds)
    chosen = int(round(float(np.median([f.best_epoch for f in folds]))))  # what the fold heads selected
    assert final.selection == "budget" and final.epochs == chosen
    assert run.heads["spatial_ar"].fit_record.train.epochs == chosen
