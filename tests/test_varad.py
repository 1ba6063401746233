import math

import pytest
import torch

from uadlab.backbones import BackboneSpec
from uadlab.features import PatchFeatures
from uadlab.methods import FitContext, create_method, get_method_class
from uadlab.methods.varad import Mamba, scan_orders, selective_scan, selective_scan_ref

TINY = dict(d_model=16, n_layers=1, d_state=4, epochs=4, batch_size=4, lr=3e-3)
TRAIN = dict(TINY, epochs=10, batch_size=8, lr=1e-2)


def _scan_inputs(L=75, Bt=2, E=6, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, B, C = torch.randn(Bt, L, E, generator=g), torch.randn(Bt, L, N, generator=g), torch.randn(Bt, L, N, generator=g)
    dt = torch.nn.functional.softplus(2 * torch.randn(Bt, L, E, generator=g))  # up to ~e^4: strong decays too
    A = -torch.exp(torch.randn(E, N, generator=g))
    return x, dt, A, B, C


@pytest.mark.parametrize("chunk", [1, 8, 32, 128])
def test_fast_scan_equals_sequential_loop(chunk):
    args = [t.requires_grad_() for t in _scan_inputs()]
    fast, ref = selective_scan(*args, chunk=chunk), selective_scan_ref(*args)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(ref)  # gradients through the checkpointed chunks equal those of the loop
    g_fast = torch.autograd.grad((fast * w).sum(), args)
    g_ref = torch.autograd.grad((ref * w).sum(), args)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _has_fused() -> bool:
    try:
        import mamba_ssm  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _has_fused(), reason="needs mamba_ssm and a CUDA GPU (absent here)")
def test_fused_kernel_matches_plain_scan():
    args = [t.cuda() for t in _scan_inputs(L=300)]
    fused = selective_scan(*args)  # on CUDA with mamba_ssm: the fused kernel
    plain = selective_scan_ref(*[t.cpu() for t in args])
    torch.testing.assert_close(fused.cpu(), plain, rtol=1e-3, atol=1e-3)


def test_mamba_block_is_causal():
    torch.manual_seed(0)
    m = Mamba(16, d_state=4, chunk=8).eval()
    x = torch.randn(2, 40, 16)
    y = m(x)
    x2 = x.clone()
    x2[:, 25:] += 3.0
    y2 = m(x2)
    torch.testing.assert_close(y[:, :25], y2[:, :25])
    assert (y[:, 25:] - y2[:, 25:]).abs().max() > 1e-3
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6  # inverse-softplus init: dt in [dt_min, dt_max]


def test_scan_orders_are_the_four_raster_scans():
    o = scan_orders(2, 3)
    assert o.tolist() == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]


def test_layers_for():
    vit = BackboneSpec("vit", "vit", 12, (384,) * 12)
    cnn = BackboneSpec("cnn", "cnn", 5, (16, 24, 40, 112, 320))
    assert create_method("varad").layers_for(vit) == ["block3", "block7", "block11"]
    assert create_method("varad").layers_for(cnn) == ["stage1", "stage2", "stage3"]
    assert create_method("varad", layers=["block0"]).layers_for(vit) == ["block0"]


def _texture(n: int, seed: int, rotated: bool = False) -> PatchFeatures:
    """Three 'layers' of a stripe texture with a random phase per image (and a little noise).

    ``rotated``: odd images hold a square of the SAME stripes turned by 90 degrees (i and j swapped) in the
    middle half of the grid: every token there is a common normal token, only its place is wrong.
    """
    g = torch.Generator().manual_seed(seed)
    maps = {}
    for name, c, s in [("stage1", 6, 16), ("stage2", 10, 8), ("stage3", 12, 4)]:
        i = torch.arange(s).float().view(1, 1, s, 1) * (8 / s)
        j = torch.arange(s).float().view(1, 1, 1, s) * (8 / s)
        u = (i + 0.5 * j).expand(n, 1, s, s).clone()
        if rotated:
            q = slice(s // 4, 3 * s // 4)
            u[1::2, :, q, q] = (j + 0.5 * i).expand(n, 1, s, s)[1::2, :, q, q]
        freq = torch.linspace(0.5, 1.5, c).view(1, c, 1, 1)
        phase = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
        maps[name] = torch.sin(freq * u + phase) + 0.05 * torch.randn(n, c, s, s, generator=g)
    return PatchFeatures(maps, (64, 64))


def token_mean_baseline(head, train: PatchFeatures, test: PatchFeatures) -> torch.Tensor:
    """The no-model baseline VarAD must beat: standardised squared distance of each token to the mean normal
    token, averaged over the hierarchies, on VarAD's grid: (B, h, w)."""
    normal, grid = head._tokens(train)
    tokens, _ = head._tokens(test)
    d = [((t - a.mean((0, 1))) / a.std((0, 1))).pow(2).mean(-1) for a, t in zip(normal, tokens)]
    return torch.stack(d).mean(0).view(-1, *grid)


def _pixel_auroc(maps: torch.Tensor, gt: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(gt.flatten().numpy(), maps.flatten().numpy())


def test_beats_the_token_mean_baseline_on_misplaced_texture():
    """A rotated piece of the normal texture: invisible to the token-mean baseline, visible to a context model."""
    train, test = _texture(16, 0), _texture(8, 1, rotated=True)
    gt = torch.zeros(8, 8, 8, dtype=torch.bool)
    gt[1::2, 2:6, 2:6] = True
    # 160 steps: with TRAIN's 20 steps the model is still a copy-the-previous-token predictor and LOSES to the
    # baseline here (pixel AUROC 0.29 vs 0.37); at 160 steps 0.61, at 400 steps 0.64 (measured, issue 13)
    head = create_method("varad", seed=1, **{**TRAIN, "d_model": 32, "n_layers": 2, "epochs": 40, "batch_size": 4,
                                             "lr": 1e-2}).fit(train, context=FitContext(val_features=_texture(4, 2)))
    ours, base = _pixel_auroc(head.score(test).patch_map, gt), _pixel_auroc(token_mean_baseline(head, train, test), gt)
    assert base < 0.5  # the baseline cannot see it ...
    assert ours > base + 0.15  # ... the autoregressive model does, though far from perfectly


def test_synthetic_anomaly_scores_higher():
    train, test = _texture(16, 0), _texture(2, 1)
    for m in test.maps.values():  # a blob that breaks the stripes in the middle of image 0
        s = m.shape[-1]
        m[0, :, s // 2 - s // 8: s // 2 + s // 8 + 1, s // 2 - s // 8: s // 2 + s // 8 + 1] = -2.0
    head = create_method("varad", seed=1, **TRAIN).fit(train, context=FitContext(val_features=_texture(4, 2)))
    res = head.score(test)
    pm = res.patch_map  # (2, 8, 8): the middle layer's grid
    assert pm.shape == (2, 8, 8) and torch.isfinite(pm).all()
    assert pm[0, 3:6, 3:6].mean() > 1.4 * pm[1].mean()  # the blob is well above a normal image
    assert pm[0, 3:6, 3:6].mean() > 1.2 * pm[0, :2].mean()  # ... and above the normal part of the same image
    assert set(res.extras) >= {"hierarchy_stage2", "direction_row", "direction_col_rev"}
    assert head.fit_record.train.best_epoch >= 1 and len(head.fit_record.train.val_loss) == TRAIN["epochs"]
    ex = head.explain(test[0])
    assert ex["direction_row"].shape == (8, 8)


def test_same_seed_same_output():
    train, test = _texture(8, 0), _texture(1, 1)
    one, two, other = (create_method("varad", seed=s, **{**TINY, "epochs": 1}).fit(train).score(test).patch_map
                       for s in (1, 1, 2))
    torch.testing.assert_close(one, two, rtol=0, atol=0)
    assert not torch.allclose(one, other)


def test_save_load_round_trip(tmp_path):
    train, test = _texture(8, 0), _texture(2, 1)
    head = create_method("varad", **{**TINY, "epochs": 1}).fit(train)
    head.save_pretrained(tmp_path)
    loaded = get_method_class("varad").from_pretrained(str(tmp_path))
    assert loaded.in_dims == [6, 10, 12] and set(loaded.state_dict()) == set(head.state_dict())
    torch.testing.assert_close(loaded.score(test).patch_map, head.score(test).patch_map, rtol=0, atol=0)


def test_switches_change_the_output():
    train, test = _texture(8, 0), _texture(1, 1)
    base = dict(TINY, epochs=1)
    ref = create_method("varad", **base).fit(train).score(test).patch_map
    cos = create_method("varad", distance="cosine", **base).fit(train).score(test).patch_map
    rows = create_method("varad", directions=["row"], **base).fit(train).score(test).patch_map
    fine = create_method("varad", grid_layer=0, **base).fit(train).score(test).patch_map
    assert not torch.allclose(ref, cos) and not torch.allclose(ref, rows) and fine.shape == (1, 16, 16)
    with pytest.raises(ValueError, match="directions"):
        create_method("varad", directions=["diagonal"])


def test_direction_fusion_min_mean_max():
    """The default keeps, per token, the smallest discrepancy over the scan orders (the fusion only changes the
    scoring, so one trained head gives all three): min <= mean <= max everywhere, and not all equal."""
    train, test = _texture(8, 0), _texture(2, 1)
    head = create_method("varad", **{**TINY, "epochs": 1}).fit(train)
    assert head.direction_fusion == "min"
    fused = {}
    for mode in ("min", "mean", "max"):
        head.direction_fusion = mode
        fused[mode] = head.score(test).patch_map
    assert (fused["min"] <= fused["mean"] + 1e-6).all() and (fused["mean"] <= fused["max"] + 1e-6).all()
    assert (fused["mean"] - fused["min"]).max() > 1e-3
    head.direction_fusion = "min"
    tokens, grid = head._tokens(test)
    with torch.no_grad():
        per_dir = head._maps(tokens, grid, normalised=True)  # (nh, nd, B, h, w)
    torch.testing.assert_close(fused["min"], per_dir.amin(1).mean(0))
    with pytest.raises(ValueError, match="direction_fusion"):
        create_method("varad", direction_fusion="median")


def test_trains_until_the_held_out_loss_stops_falling_and_refits_to_that_budget():
    """Issue 25: the budget is what the model needs (patience on held-out normals, with a cap), and a refit on
    all normals trains the selected epoch count."""
    train, val = _texture(8, 0), _texture(4, 2)
    # only a 90% drop counts as better: the first epoch stays best, two stale epochs stop training
    head = create_method("varad", **{**TINY, "epochs": 30, "patience": 2, "min_delta": 0.9}).fit(train, context=FitContext(val_features=val))
    info = head.fit_record.train
    assert info.epochs == 3 and info.stopped_early and info.best_epoch == 1
    assert len(info.val_loss) == 3 and info.selection == "val_loss"
    assert head.refit_budget() == 1
    again = create_method("varad", **{**TINY, "epochs": 30, "patience": 2}).fit(train, context=FitContext(budget=head.refit_budget()))
    assert again.fit_record.train.epochs == 1 and again.fit_record.train.selection == "budget" and again.fit_record.train.steps == 2
    quick = get_method_class("varad").presets["quick"]
    assert quick["patience"] and quick["epochs"] >= 50  # a cap, not a fixed count


def test_channel_normalised_error_is_one_on_normal_tokens(tmp_path):
    """normalize="channel": each channel's squared error over its mean on the normal training tokens, so the
    normalised map averages 1 on the training images; heads saved before err_var existed still load."""
    train, test = _texture(8, 0), _texture(2, 1)
    head = create_method("varad", **{**TINY, "epochs": 2}).fit(train)
    tokens, grid = head._tokens(train)
    with torch.no_grad():
        m = head._maps(tokens, grid, normalised=True)  # (nh, nd, B, h, w)
    torch.testing.assert_close(m.mean((1, 2, 3, 4)), torch.ones(3), rtol=1e-4, atol=1e-4)
    plain = create_method("varad", normalize="none", **{**TINY, "epochs": 2}).fit(train).score(test).patch_map
    assert not torch.allclose(plain, head.score(test).patch_map)
    from safetensors.torch import load_file, save_file

    head.save_pretrained(tmp_path)
    state = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if not k.endswith("err_var")}
    save_file(state, tmp_path / "model.safetensors")  # as written before issue 25
    old = get_method_class("varad").from_pretrained(str(tmp_path))
    assert torch.equal(old.hier[0].err_var, torch.ones(6))
    with pytest.raises(ValueError, match="normalize"):
        create_method("varad", normalize="z")


def test_head_saved_before_direction_fusion_keeps_its_mean(tmp_path):
    """A head whose config.json predates ``direction_fusion`` loads with the fusion it was saved with (the mean
    over scan orders), not today's default, so its scores do not change on loading."""
    import json

    train, test = _texture(8, 0), _texture(2, 1)
    head = create_method("varad", direction_fusion="mean", **{**TINY, "epochs": 1}).fit(train)
    head.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["direction_fusion"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old = get_method_class("varad").from_pretrained(str(tmp_path))
    assert old.direction_fusion == "mean"
    torch.testing.assert_close(old.score(test).patch_map, head.score(test).patch_map)
    assert create_method("varad").direction_fusion == "min"  # a new head takes today's default
