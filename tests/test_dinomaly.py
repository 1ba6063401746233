"""Dinomaly: components, switches, loss, optimiser, reproducibility, save/load and resumable training."""
from pathlib import Path

import pytest
import torch

from uadlab.backbones import BackboneSpec
from uadlab.features import PatchFeatures
from uadlab.methods import FitContext, get_method_class
from uadlab.methods.dinomaly import (Attention, Dinomaly, StableAdamW, hard_mining_cosine, split_groups,
                                     warm_cosine_lr)

FAST = dict(steps=60, batch_size=8, warmup=5, p_ramp_steps=20, lr=2e-3, final_lr=2e-4)


def synth(n: int, seed: int, anomaly: bool = False, layers: int = 4, c: int = 32, h: int = 8) -> PatchFeatures:
    """ViT-like features: every layer is a fixed linear map of a smooth 3-d latent field, plus a little noise.

    With ``anomaly`` the tokens of rows/cols 2..4 are random directions off the normal 3-d subspaces.
    """
    w = torch.randn(layers, c, 3, generator=torch.Generator().manual_seed(123))  # fixed "encoder"
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.interpolate(torch.randn(n, 3, 3, 3, generator=g), size=(h, h), mode="bilinear")
    maps = {}
    for i in range(layers):
        m = torch.einsum("ck,bkhw->bchw", w[i], z) + 0.05 * torch.randn(n, c, h, h, generator=g)
        if anomaly:
            m[:, :, 2:5, 2:5] = 2 * torch.randn(n, c, 3, 3, generator=g)
        maps[f"block{i + 2}"] = m
    return PatchFeatures(maps, (h * 14, h * 14))


@pytest.fixture(scope="module")
def trained():
    return Dinomaly(**FAST).fit(synth(16, 0))


def test_layers_scale_with_depth():
    m = Dinomaly()
    assert m.layers_for(BackboneSpec("b", "vit", 12, (768,) * 12)) == [f"block{i}" for i in range(2, 10)]
    assert m.layers_for(BackboneSpec("l", "vit", 24, (1024,) * 24)) == [f"block{i}" for i in range(4, 19, 2)]
    assert m.layers_for(BackboneSpec("e", "cnn", 5, (16, 24, 40, 112, 320))) == ["stage1", "stage2", "stage3", "stage4"]
    assert split_groups(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]] and split_groups(4, "dense") == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="dense"):
        Dinomaly(groups="dense", decoder_depth=2).fit(synth(4, 0))


def test_anomaly_scores_higher(trained):
    amap = trained.score(synth(4, 9, anomaly=True)).patch_map  # (B, h, w)
    inside = amap[:, 2:5, 2:5].mean()
    outside = torch.cat([amap[:, 6:].flatten(), amap[:, :, 6:].flatten()]).mean()
    normal = trained.score(synth(4, 9)).patch_map
    assert torch.isfinite(amap).all()
    assert inside > 3 * outside and inside > 3 * normal.mean()
    assert trained.fit_record.details["dim"] == 32 and not trained.project  # ViT path: no projection


def test_seed_reproducible_and_roundtrip(trained, tmp_path):
    x = synth(3, 5, anomaly=True)
    again = Dinomaly(**FAST).fit(synth(16, 0))
    torch.testing.assert_close(again.score(x).patch_map, trained.score(x).patch_map, rtol=0, atol=0)
    other = Dinomaly(**FAST, seed=1).fit(synth(16, 0))
    assert not torch.allclose(other.score(x).patch_map, trained.score(x).patch_map)
    trained.save_pretrained(tmp_path / "head")
    loaded = get_method_class("dinomaly").from_pretrained(str(tmp_path / "head"))
    torch.testing.assert_close(loaded.score(x).patch_map, trained.score(x).patch_map, rtol=0, atol=0)
    assert set(loaded.explain(x)) == {"group block2..block3", "group block4..block5"}


@pytest.mark.parametrize("switch", [dict(dropout=0.0), dict(attention="softmax"), dict(groups=1),
                                    dict(groups="dense"), dict(loss="global_cosine")])
def test_each_switch_changes_the_output(trained, switch):
    x = synth(2, 5, anomaly=True)
    off = Dinomaly(**{**FAST, "steps": 30}, **switch).fit(synth(16, 0))
    on = Dinomaly(**{**FAST, "steps": 30}).fit(synth(16, 0))
    diff = (off.score(x).patch_map - on.score(x).patch_map).abs().max()
    assert diff > 1e-3 and torch.isfinite(off.score(x).patch_map).all()


def test_cnn_projection_path():
    maps = {f"stage{i}": torch.randn(4, c, s, s) for i, (c, s) in zip(range(1, 5), [(24, 16), (40, 8), (112, 4), (320, 2)])}
    m = Dinomaly(steps=3, batch_size=4).fit(PatchFeatures(maps, (64, 64)))
    assert m.project and m.fit_record.details["dim"] == 320 and m.fit_record.details["grid"] == [4, 4]
    p = m.proj0  # (24, 320): orthonormal rows, an isometry of stage1 into the common width
    torch.testing.assert_close(p @ p.T, torch.eye(24), atol=1e-5, rtol=0)
    assert m.score(PatchFeatures(maps, (64, 64))).patch_map.shape == (4, 4, 4)


def test_linear_attention_formula_and_eps():
    torch.manual_seed(0)
    att = Attention(8, 2, "linear")
    x = torch.randn(2, 5, 8)
    q, k, v = att.qkv(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    ref = torch.zeros(2, 2, 5, 4)
    for s in range(5):  # out_s = phi(q_s)^T sum_t phi(k_t) v_t^T / (phi(q_s) . sum_t phi(k_t) + eps)
        num = sum(torch.einsum("bhd,bhe->bhe", q[:, :, s] * k[:, :, t], v[:, :, t]) for t in range(5))
        den = (q[:, :, s] * k.sum(2)).sum(-1, keepdim=True) + 1e-6
        ref[:, :, s] = num / den
    torch.testing.assert_close(att(x), att.proj(ref.transpose(1, 2).reshape(2, 5, 8)), atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # phi(q) underflows to 0: without eps this is 0/0
        att.qkv.weight.zero_()
        att.qkv.bias.fill_(-200.0)
    assert torch.isfinite(att(x)).all()
    assert not torch.allclose(Attention(8, 2, "softmax").eval()(x), att(x))


def test_hard_mining_gradient_factor():
    torch.manual_seed(0)
    e = torch.randn(2, 10, 6)
    d0 = e + torch.randn(2, 10, 6) * torch.linspace(0.01, 1, 10)[None, :, None]  # later points are worse
    grads = []
    for p in (0.0, 0.5):
        d = d0.clone().requires_grad_(True)
        dd = d * 1.0  # the hook sits on a non-leaf, like the decoder output
        hard_mining_cosine([e], [dd], p, factor=0.1).backward()
        grads.append(d.grad)
    delta = 1 - torch.nn.functional.cosine_similarity(e, d0, dim=-1)
    tau = delta.flatten().topk(10).values[-1]  # k = int(20 * 0.5)
    ratio = (grads[1] / grads[0])[..., 0]
    torch.testing.assert_close(ratio[delta < tau], torch.full_like(ratio[delta < tau], 0.1))
    torch.testing.assert_close(ratio[delta >= tau], torch.ones_like(ratio[delta >= tau]))


def test_stable_adamw_and_schedule():
    w1, w2 = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5))
    ours = StableAdamW([w1], lr=1e-2, eps=1e-8, weight_decay=1e-2)
    ref = torch.optim.AdamW([w2], lr=1e-2, eps=1e-8, weight_decay=1e-2, amsgrad=True)
    for s in range(6):  # shrinking gradients: RMS(g / denom) <= 1, so no update clipping -> plain AMSGrad AdamW
        g = torch.linspace(-1, 1, 5) * 0.5 ** s
        w1.grad, w2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(w1, w2)
    before = w1.detach().clone()
    w1.grad = w2.grad = torch.linspace(-1, 1, 5) * 100.0  # a gradient spike: the update is scaled down
    ours.step()
    ref.step()
    assert (w1 - before).abs().sum() < (w2 - before).abs().sum()
    assert warm_cosine_lr(0, 1000, 2e-3, 2e-4, 100) == 0.0
    assert warm_cosine_lr(99, 1000, 2e-3, 2e-4, 100) == pytest.approx(2e-3)
    assert warm_cosine_lr(999, 1000, 2e-3, 2e-4, 100) == pytest.approx(2e-4, rel=1e-3)


def test_resume_after_interruption(tmp_path):
    x, cfg = synth(8, 0), dict(FAST, steps=12, checkpoint_every=4)
    straight = Dinomaly(**cfg).fit(x)

    def crash(p):
        if p.done == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Dinomaly(**cfg).fit(x, progress=crash, context=FitContext(checkpoint_dir=str(tmp_path)))
    assert len(list(tmp_path.glob("dinomaly_*.safetensors"))) == 1
    resumed = Dinomaly(**cfg).fit(x, context=FitContext(checkpoint_dir=str(tmp_path)))
    assert resumed.fit_record.details["resumed_from"] == 8
    assert not list(tmp_path.glob("dinomaly_*.safetensors"))  # completed: the resume file is gone
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)
    other = Dinomaly(**cfg).fit(synth(8, 1), context=FitContext(checkpoint_dir=str(tmp_path)))  # other data: starts afresh
    assert other.fit_record.details["resumed_from"] == 0


def test_pipeline_resumes_an_interrupted_training(tiny_demo, tmp_path):
    """A crash in the middle of a run (app or CLI): fitting the same run again continues where it stopped."""
    from uadlab.data import load_mvtec
    from uadlab.features import FeatureCache
    from uadlab.pipeline import Run, RunConfig

    train = load_mvtec(tiny_demo).category("grass").train
    cfg = RunConfig(methods=["dinomaly"], preset="tiny", image_size=64, calibration="holdout",  # one fit: no refit
                    method_kwargs={"dinomaly": {"steps": 12, "checkpoint_every": 4}})
    cache = FeatureCache(tmp_path / "features")

    def crash(p):
        if p.stage.startswith("fitting dinomaly") and p.done == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Run(cfg, cache=cache).fit(train, crash)
    assert list((tmp_path / "checkpoints").glob("dinomaly_*.safetensors"))
    again = Run(cfg, workdir=tmp_path / "runs", cache=cache).fit(train)
    assert again.heads["dinomaly"].fit_record.details["resumed_from"] == 8
    assert not list((tmp_path / "checkpoints").glob("dinomaly_*.safetensors"))
    saved = again.save()  # the checkpoint folder is a machine path: it must not land in the saved config
    configs = list(Path(saved).rglob("config.json"))
    assert configs and all(str(tmp_path) not in c.read_text() and "checkpoint_dir" not in c.read_text()
                          for c in configs)


def test_official_post_processing_at_256(trained):
    """Official: bilinear to the input size, then to 256 px; 5 x 5 Gaussian, sigma 4, zero padding 2;
    image score = mean of the top 1% (655 pixels) of the 256 px map; the map is resized back to the input."""
    from uadlab.methods.base import AnomalyResult

    pm = torch.zeros(2, 8, 8)
    pm[0, 3, 4], pm[1, 0, 0] = 1.0, 2.0  # a hot token inside and one in the corner (zero padding shows there)
    maps, score = trained.heatmap(AnomalyResult(pm), (112, 112))
    up = torch.nn.functional.interpolate(pm[:, None], (112, 112), mode="bilinear")
    up = torch.nn.functional.interpolate(up, (256, 256), mode="bilinear")
    k = torch.exp(-0.5 * (torch.arange(-2.0, 3.0) / 4) ** 2)
    ref = torch.nn.functional.conv2d(up, (torch.outer(k, k) / torch.outer(k, k).sum())[None, None], padding=2)
    torch.testing.assert_close(score, ref.flatten(1).topk(655, dim=1).values.mean(1))
    torch.testing.assert_close(maps, torch.nn.functional.interpolate(ref, (112, 112), mode="bilinear")[:, 0])
    assert ref[1, 0, 0, 0] < up[1, 0, 0, 0]  # zero padding: the corner loses weight, as in the official code
    wide, _ = trained.heatmap(AnomalyResult(pm), (112, 112), sigma=4.0)  # a caller's sigma: shared path at 112
    assert (wide[0] > 0.5 * wide[0].max()).sum() > (maps[0] > 0.5 * maps[0].max()).sum()
