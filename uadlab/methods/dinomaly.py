"""Dinomaly: reconstruct frozen encoder features with a noisy bottleneck and a linear-attention decoder.

Guo et al., "Dinomaly: The Less Is More Philosophy in Multi-Class Unsupervised Anomaly Detection", CVPR 2025
(github guojiajeremy/Dinomaly). Written from the method card in METHODS.md; no code is reproduced.

    encoder layers e_1..e_L (cached) --mean--> x0 --noisy MLP bottleneck--> decoder blocks d_1..d_L
    groups:  E_g = mean(e in group g),  D_g = mean(reversed d in group g)
    train:   loose loss = global cosine distance per group, gradient of well-reconstructed points x 0.1
    score:   map = mean_g (1 - cos_C(E_g, D_g))
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..settings import OFFLINE_DEFAULT
from .. import distributed
from ..features import PatchFeatures
from ..fsio import replacing
from ..progress import Progress
from ..trainer import fingerprint
from ..postprocess import image_score, upsample
from .base import AnomalyResult, FitContext, Method, register_method

ATTENTIONS = ("linear", "softmax")
LOSSES = ("hard_mining", "global_cosine")
# the official training budgets (uni / sep scripts): one model for all classes, or one model per class
MULTI_CLASS_STEPS, SEPARATE_STEPS = 10_000, 5_000
EVAL_SIZE = 256  # the official evaluation resolution: maps are smoothed and scored at 256 x 256


# ---- optimiser and schedule ------------------------------------------------------------------------------
class StableAdamW(torch.optim.Optimizer):
    """AdamW with AMSGrad and the StableAdamW update clipping (Wortsman et al. 2023), as Dinomaly uses it.

    Per tensor, step t:
        p <- p (1 - lr wd)                                  decoupled weight decay
        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2 ;  v_hat <- max(v_hat, v)   (AMSGrad)
        denom = sqrt(v_hat) / sqrt(1 - b2^t) + eps
        r = RMS(g / denom)                                  on the raw gradient g
        p <- p - lr / (1 - b1^t) / max(1, r) * m / denom
    """

    def __init__(self, params, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-10,
                 weight_decay: float = 1e-4, amsgrad: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros(())
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                    st["max_exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = float(st["step"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                v = st["exp_avg_sq"]
                if group["amsgrad"]:
                    torch.maximum(st["max_exp_avg_sq"], v, out=st["max_exp_avg_sq"])
                    v = st["max_exp_avg_sq"]
                denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"])
                r = float((g / denom).pow(2).mean().sqrt())
                p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / (1 - b1 ** t) / max(1.0, r))
        return loss


def warm_cosine_lr(step: int, total: int, lr: float, final_lr: float, warmup: int) -> float:
    """Linear warm-up from 0 (the first step has lr 0), then cosine decay from ``lr`` to ``final_lr``."""
    warmup = min(warmup, total)
    if step < warmup:
        return lr * step / max(warmup - 1, 1)
    n = max(total - warmup, 1)
    return final_lr + 0.5 * (lr - final_lr) * (1 + math.cos(math.pi * (step - warmup) / n))


# ---- modules --------------------------------------------------------------------------------------------
class NoisyBottleneck(nn.Sequential):
    """Dropout -> Linear(D, 4D) -> GELU -> Dropout -> Linear(4D, D) -> Dropout; no residual.

    The dropouts are the "noisy bottleneck": the decoder must restore normal features from a corrupted
    code, so it cannot learn the identity and fails to restore anomalous ones.
    """

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__(nn.Dropout(dropout), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(4 * dim, dim), nn.Dropout(dropout))


class Attention(nn.Module):
    """Multi-head attention over the tokens, linear (phi = elu + 1) or softmax.

    Linear: out_s = phi(q_s)^T (sum_t phi(k_t) v_t^T) / (phi(q_s) . sum_t phi(k_t) + eps); no scale, no
    softmax, cost linear in the number of tokens. It cannot focus on one token the way softmax can, so it
    spreads attention and does not copy its input ("unfocused attention" of the paper).
    """

    def __init__(self, dim: int, heads: int, kind: str = "linear", eps: float = 1e-6) -> None:
        super().__init__()
        self.heads, self.kind, self.eps = heads, kind, eps
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, d) each
        if self.kind == "softmax":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            q, k = F.elu(q) + 1, F.elu(k) + 1
            kv = torch.einsum("bhnd,bhne->bhde", k, v)  # (B, h, d, d)
            z = 1.0 / (torch.einsum("bhnd,bhd->bhn", q, k.sum(2)) + self.eps)  # (B, h, N)
            out = torch.einsum("bhnd,bhde->bhne", q, kv) * z.unsqueeze(-1)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-norm ViT block (LayerNorm eps 1e-8, MLP ratio 4, no LayerScale, no drop-path)."""

    def __init__(self, dim: int, heads: int, attention: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = Attention(dim, heads, attention)
        self.norm2 = nn.LayerNorm(dim, eps=1e-8)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def split_groups(n: int, groups: int | str) -> list[list[int]]:
    """Indices 0..n-1 in ``groups`` contiguous, near-equal groups; ``"dense"`` = one group per index."""
    g = n if groups == "dense" else int(groups)
    if not 1 <= g <= n:
        raise ValueError(f"groups must be 'dense' or an int in [1, {n}], got {groups!r}")
    bounds = [round(i * n / g) for i in range(g + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(g)]


def hard_mining_cosine(enc: list[torch.Tensor], dec: list[torch.Tensor], p: float, factor: float = 0.1,
                       split: bool = False) -> torch.Tensor:
    """The loose loss: global cosine distance per group with hard mining (the official global_cosine_hm_percent).

    For each group, e = stop-grad(encoder) and d = decoder tokens (B, N, D):
        delta = 1 - cos_D(e, d) per point; tau = the k-th largest delta, k = int(B N (1 - p))
        L_g = mean_b [1 - cos(flat(e_b), flat(d_b))]  (one cosine over all of an image's N x D values)
    and a gradient hook multiplies the gradient of every point with delta < tau by ``factor``: the
    best-reconstructed share p of points barely trains, the hard ones do. L = mean_g L_g.
    ``p = 0`` is the plain global cosine loss. ``split``: under torchrun, this rank holds its part of the
    batch; tau is then taken over every rank's points (gathered), as one process takes it over the batch.
    """
    loss = enc[0].new_zeros(())
    for e, d in zip(enc, dec):
        e = e.detach()
        loss = loss + (1 - F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1)).mean()
        if p > 0 and d.requires_grad:
            with torch.no_grad():
                delta = 1 - F.cosine_similarity(e, d, dim=-1)  # (B, N)
                every = distributed.all_gather_cat(delta) if split else delta  # the whole batch's points
                k = max(1, int(every.numel() * (1 - p)))
                tau = every.flatten().topk(k).values[-1]
                scale = torch.where(delta < tau, factor, 1.0).unsqueeze(-1)  # (B, N, 1)
            d.register_hook(lambda grad, s=scale: grad * s)
    return loss / len(enc)


# ---- the method ------------------------------------------------------------------------------------------
@register_method
class Dinomaly(Method):
    """Dinomaly (Guo et al., CVPR 2025): loose reconstruction of frozen features, one model for many classes.

    The mean of the selected encoder layers passes a noisy MLP bottleneck (three dropouts) and a decoder of
    ViT blocks with linear attention. Encoder layers and the REVERSED decoder outputs are fused by mean in
    ``groups`` contiguous groups (2: shallow and deep; 1; or "dense" layer-to-layer); the loss is the
    global cosine distance per group with hard mining (gradient x ``hm_factor`` on the best-reconstructed
    share p of points, p ramping 0 -> ``p_final`` over ``p_ramp_steps``). Trained from cached features
    with StableAdamW (AMSGrad), warm-up + cosine schedule and gradient clipping. The anomaly map is the
    mean over groups of 1 - cos(encoder group, decoder group). ``steps=None`` (the paper preset) trains the
    official budget: 10,000 steps multi-class (several categories), 5,000 class-separated (one category).
    Each of the four components has a switch:
    ``dropout=0`` (no noise), ``attention="softmax"``, ``groups=1`` / ``"dense"``, ``loss="global_cosine"``.

    Input: ViT: the raw outputs of blocks 2..9 for 12 blocks, scaled with depth (4, 6, ..., 18 for 24
    blocks); the decoder width is the embedding width and heads = width / 64. The paper's input size is
    ``--resize 448 --image-size 392`` (28 x 28 patches for a /14 ViT): the pipeline's image settings, not a
    head hyperparameter; ``--preset paper`` applies them (``paper_inputs``). Ours, for the quick preset on
    the offline Lite0: 224 px, no crop (the pipeline default): the whole image is seen, so a defect near the
    border is not cut away by the paper's 448 -> 392 center crop (which drops 6% of each side).

    Deviations from the paper:
    - Patch tokens only: uadlab's PatchFeatures hold no CLS / register tokens per layer, so the decoder
      sees the h x w patch tokens (the paper keeps CLS + 4 registers through bottleneck and decoder and
      drops them only for the loss and the map).
    - CNN backbones (the offline EfficientNet-Lite0; default stages 1..4): each map is resampled
      (bilinear) to one grid (``grid``; default the grid of the middle layer, 1/16 of the image), scaled by
      one per-layer scalar so its mean token norm on the training images is 1 (stage widths differ in
      scale, and the group mean would be dominated by one stage), and embedded into the common width
      ``dim`` (default: the widest layer, rounded up to a multiple of 64) by a FIXED random
      orthonormal projection per layer (an isometry: cosines within a layer are preserved). Fixed, not
      learned: a learned projection of the reconstruction target could collapse to a constant.
    - ``decoder_depth`` may differ from the number of encoder layers (the reversed decoder outputs are
      split into the same number of contiguous groups); the paper uses one block per layer.
    - Post-processing (``heatmap``) is the official one at 256 px (5 x 5 Gaussian, sigma 4, zero padding,
      top-1% image score), then resized to the input size: our pixel metrics are measured at the input
      size, the paper's at 256 px. The first upsampling is bilinear with align_corners=False (official: True).
    """

    name = "dinomaly"
    paper = ("Guo et al., Dinomaly: The Less Is More Philosophy in Multi-Class Unsupervised Anomaly Detection, "
             "CVPR 2025")
    summary = ("Learns to reconstruct the frozen backbone's features of normal images: the features of several "
               "layers (eight for a ViT) are averaged, corrupted by dropout in a small MLP (the noisy bottleneck) and rebuilt "
               "by a decoder of transformer blocks with linear attention, which cannot simply copy its input. "
               "Shallow and deep layers are compared as two groups, and the loss lets well-reconstructed "
               "points go to focus on hard ones. Where the decoder fails to restore the features (1 - cosine "
               "similarity), the image is anomalous; one model serves many categories at once.")
    paper_inputs = dict(backbone="dinov2_vitb14_reg", resize=448, image_size=392)  # 28 x 28 patches
    smooth_radius, score_mode = 2, "top1"  # official: 5 x 5 kernel, sigma 4 (the shared default), at 256 px
    presets = {
        "tiny": dict(dim=64, steps=40, batch_size=8, lr=2e-3, final_lr=2e-4, warmup=5, p_ramp_steps=10),
        "quick": dict(decoder_depth=4, steps=150, batch_size=8, lr=2e-3, final_lr=2e-4, warmup=10, p_ramp_steps=15),
        "paper": dict(dropout=0.2, attention="linear", groups=2, loss="hard_mining", steps=None, batch_size=16,
                      lr=2e-3, final_lr=2e-4, warmup=100, weight_decay=1e-4, eps=1e-10, grad_clip=0.1,
                      p_final=0.9, p_ramp_steps=1000, hm_factor=0.1),
    }

    def __init__(self, backbone: str = OFFLINE_DEFAULT, layers: list[str] | None = None,
                 in_dims: list[int] | None = None, dim: int | None = None, heads: int | None = None,
                 grid: list[int] | None = None, decoder_depth: int | None = None, dropout: float = 0.2,
                 attention: str = "linear", groups: int | str = 2, loss: str = "hard_mining", steps: int | None = None,
                 batch_size: int = 16, lr: float = 2e-3, final_lr: float = 2e-4, warmup: int = 100,
                 weight_decay: float = 1e-4, eps: float = 1e-10, grad_clip: float = 0.1, p_final: float = 0.9,
                 p_ramp_steps: int = 1000, hm_factor: float = 0.1, checkpoint_every: int = 500,
                 seed: int = 0) -> None:
        super().__init__(backbone)
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if not (groups == "dense" or (isinstance(groups, int) and groups >= 1)):
            raise ValueError(f"groups must be a positive int or 'dense', got {groups!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be a positive whole number or None (the official budget), got {steps!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.layers, self.in_dims, self.dim, self.heads, self.grid = layers, in_dims, dim, heads, grid
        self.decoder_depth, self.dropout, self.attention, self.groups, self.loss = decoder_depth, dropout, attention, groups, loss
        self.steps, self.batch_size, self.lr, self.final_lr, self.warmup = steps, batch_size, lr, final_lr, warmup
        self.weight_decay, self.eps, self.grad_clip = weight_decay, eps, grad_clip
        self.p_final, self.p_ramp_steps, self.hm_factor = p_final, p_ramp_steps, hm_factor
        self.checkpoint_every, self.seed = checkpoint_every, seed
        self.bottleneck: nn.Module | None = None
        self.project = False  # whether layers are embedded into the common width (set by _build)
        if in_dims is not None:
            self._build(list(in_dims))

    # ---- construction ------------------------------------------------------------------------------------
    def _build(self, in_dims: list[int]) -> None:
        """All modules, seeded; their widths depend on the encoder layers' channel counts."""
        n = len(in_dims)
        dim = self.dim or (in_dims[0] if len(set(in_dims)) == 1 else 64 * math.ceil(max(in_dims) / 64))
        heads = self.heads or max(1, dim // 64)
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        depth = self.decoder_depth or n
        ng = n if self.groups == "dense" else int(self.groups)
        if self.groups == "dense" and depth != n:
            raise ValueError(f"groups='dense' needs one decoder block per encoder layer ({n}), got decoder_depth={depth}")
        split_groups(n, ng), split_groups(depth, ng)  # validate now, not at the first step
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.project = any(c != dim for c in in_dims)
            if self.project:  # fixed orthonormal embedding of each layer into the common width (see deviations)
                for i, c in enumerate(in_dims):  # (c, dim): orthonormal rows if c <= dim, else columns
                    q, _ = torch.linalg.qr(torch.randn(max(c, dim), min(c, dim)))
                    self.register_buffer(f"proj{i}", (q.T if c <= dim else q).contiguous())
            self.register_buffer("layer_scale", torch.ones(n))
            self.bottleneck = NoisyBottleneck(dim, self.dropout)
            self.decoder = nn.ModuleList(Block(dim, heads, self.attention) for _ in range(depth))
            for m in self.modules():  # trunc-normal init, std 0.01, bounds +-0.03 (uni script)
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
                    nn.init.zeros_(m.bias)
        self.in_dims, self._dim = list(in_dims), dim

    def layers_for(self, spec) -> list[str]:
        if self.layers:
            return list(self.layers)
        if spec.kind == "cnn":
            return [f"stage{i}" for i in range(1, min(5, spec.depth))]
        D = spec.depth  # blocks 2..9 of 12, scaled with depth (ViT-L, 24 blocks: 4, 6, ..., 18)
        return [f"block{b}" for b in sorted({min(D - 1, round(i * D / 12)) for i in range(2, 10)})]

    # ---- forward -------------------------------------------------------------------------------------------
    def _grid(self, features: PatchFeatures) -> tuple[int, int]:
        """The token grid: ``grid`` if set, else the middle layer's (all the same for a ViT)."""
        if self.grid:
            return tuple(self.grid)
        layers = list(self.layers or features.layers)
        sizes = sorted({tuple(features.maps[l].shape[-2:]) for l in layers}, key=lambda s: -s[0] * s[1])
        return sizes[len(sizes) // 2]

    def _tokens(self, features: PatchFeatures, embed: bool = True) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Per encoder layer (B, N, D) tokens on one grid, embedded into the common width if needed."""
        layers, grid = list(self.layers or features.layers), self._grid(features)
        out = []
        for i, l in enumerate(layers):
            m = features.maps[l].float()
            if tuple(m.shape[-2:]) != grid:
                m = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            t = m.flatten(2).transpose(1, 2)  # (B, N, C)
            if embed and self.project:
                t = (t / self.layer_scale[i]) @ getattr(self, f"proj{i}")  # (B, N, D)
            out.append(t)
        return out, grid

    def _reconstruct(self, tokens: list[torch.Tensor], part: slice | None = None
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encoder groups and decoder groups, each a list of (B, N, D); with ``part``, of those images only
        (the bottleneck's dropout still runs on the whole batch: the same noise as one process draws)."""
        x = torch.stack(tokens).mean(0)  # x0: mean of all encoder layers
        x = self.bottleneck(x)
        if part is not None:
            x, tokens = x[part], [t[part] for t in tokens]
        outs = []
        for blk in self.decoder:
            x = blk(x)
            outs.append(x)
        outs = outs[::-1]  # the last decoder blocks reconstruct the shallowest layers
        ng = len(tokens) if self.groups == "dense" else int(self.groups)
        enc = [torch.stack([tokens[i] for i in g]).mean(0) for g in split_groups(len(tokens), ng)]
        dec = [torch.stack([outs[i] for i in g]).mean(0) for g in split_groups(len(outs), ng)]
        return enc, dec

    def _p(self, step: int) -> float:
        """Share of well-reconstructed points whose gradient is shrunk: min(p_final * step / ramp, p_final)."""
        if self.loss == "global_cosine":
            return 0.0
        return min(self.p_final * step / max(self.p_ramp_steps, 1), self.p_final)

    def make_optimizer(self) -> StableAdamW:
        return StableAdamW(self._trainable(), lr=self.lr, betas=(0.9, 0.999), eps=self.eps,
                           weight_decay=self.weight_decay, amsgrad=True)

    def _trainable(self) -> list[nn.Parameter]:
        return [*self.bottleneck.parameters(), *self.decoder.parameters()]

    def train_step(self, tokens: list[torch.Tensor], opt: StableAdamW, step: int, total: int) -> float:
        """One optimisation step on a batch of per-layer tokens; returns the loss (this rank's). Under torchrun
        every rank gets the whole batch, runs the (cheap) noisy bottleneck on all of it with the same random
        state, so the dropout noise is one process's, and decodes only its part (``local_part``); hard mining's
        threshold is taken over all parts and the gradients are averaged over the ranks: the one-process step
        up to rounding."""
        for g in opt.param_groups:
            g["lr"] = warm_cosine_lr(step, total, self.lr, self.final_lr, self.warmup)
        n = len(tokens[0])
        split = distributed.is_distributed() and n >= distributed.world_size()
        enc, dec = self._reconstruct(tokens, distributed.local_part(n) if split else None)
        loss = hard_mining_cosine(enc, dec, self._p(step), self.hm_factor, split=split)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self._trainable(), n)
        nn.utils.clip_grad_norm_(self._trainable(), self.grad_clip)
        opt.step()
        return float(loss.detach())

    # ---- fit / score ---------------------------------------------------------------------------------------
    def _fit(self, features: PatchFeatures, progress, context: FitContext) -> None:
        """Train ``steps`` steps on batches of cached features (``steps=None``: the official budget, 5,000 steps
        for one ``category``, class-separated, and 10,000 for several, multi-class: the pipeline passes the
        category when the training images have one).

        With ``checkpoint_dir`` (a machine folder given by the caller, never a hyperparameter: it must not
        land in a saved head's config.json), a checkpoint of the same features and settings is
        written every ``checkpoint_every`` steps and resumed from if training was interrupted; it is deleted
        when the training completes.
        """
        val_features, checkpoint_dir, category = context.val_features, context.checkpoint_dir, context.category
        layers = list(self.layers or features.layers)
        dims = [features.maps[l].shape[1] for l in layers]
        if self.bottleneck is None:
            self._build(dims)
            self.record_config(in_dims=dims)  # so config.json rebuilds the modules
        elif dims != self.in_dims:
            raise ValueError(f"dinomaly: layer widths {dims} differ from in_dims {self.in_dims}")
        n, bs = len(features), min(self.batch_size, len(features))
        steps = self.steps or (SEPARATE_STEPS if category is not None else MULTI_CLASS_STEPS)
        if self.project:  # per-layer scale: mean token norm 1 on the training images (in chunks: memory)
            sums = torch.zeros(len(layers), dtype=torch.float64)
            for s in range(0, n, 64):
                raw, _ = self._tokens(features[s:s + 64], embed=False)
                sums += torch.stack([t.norm(dim=-1).sum(dtype=torch.float64) for t in raw])
            self.layer_scale.copy_((sums / (n * raw[0].shape[1])).float().clamp_min(1e-6))
        per_epoch = n // bs  # drop_last
        opt = self.make_optimizer()
        data_key = fingerprint([features.maps[l] for l in layers], self.config())
        # one file per (data, settings): trainings never mix
        ckpt = Path(checkpoint_dir) / f"dinomaly_{data_key}.safetensors" if checkpoint_dir else None
        history: list[float] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            start = self._resume(ckpt, opt, data_key) if ckpt else 0
            self.train()
            for step in range(start, steps):
                epoch, j = divmod(step, per_epoch)
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
                idx = order[j * bs:(j + 1) * bs]
                tokens, _ = self._tokens(features[idx])  # (B, N, D) per layer
                loss = self.train_step(tokens, opt, step, steps)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"dinomaly: loss became {loss} at step {step}")
                history.append(loss)
                if ckpt and (step + 1) % self.checkpoint_every == 0 and step + 1 < steps:
                    self._save_checkpoint(ckpt, opt, step + 1, data_key)
                if progress is not None:
                    progress(Progress(step + 1, steps, "steps", loss=loss))
        self.eval()
        if ckpt is not None:  # finished: the weights now live in the head; the resume file has done its job
            ckpt.unlink(missing_ok=True)
        grid = self._grid(features)
        info: dict[str, Any] = dict(steps=steps, multi_class=category is None, resumed_from=start, grid=list(grid), dim=self._dim,
                                    final_loss=history[-1] if history else None)
        if val_features is not None and len(val_features):  # reported only: the paper keeps the last weights
            with torch.no_grad():
                info["val_mean_map"] = float(self._maps(*self._tokens(val_features))[0].mean())
        self.fit_record.details.update(info)

    def _maps(self, tokens: list[torch.Tensor], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean map (B, h, w) and per-group maps (G, B, h, w): 1 - cos_C(encoder group, decoder group)."""
        enc, dec = self._reconstruct(tokens)
        per = torch.stack([1 - F.cosine_similarity(e, d, dim=-1) for e, d in zip(enc, dec)])  # (G, B, N)
        per = per.view(len(enc), -1, *grid)
        return per.mean(0), per

    def heatmap(self, result: AnomalyResult, size: tuple[int, int], sigma: float | None = None,
                score_mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The official post-processing, at the official evaluation size whatever the input size.

        Bilinear to the input size, then to ``EVAL_SIZE`` (256) px; a 5 x 5 Gaussian (sigma 4, zero padding 2,
        normalised to sum 1 over the 25 taps); image score = mean of the top 1% of that 256 px map; the map is
        then resized (bilinear) back to ``size`` for display and pixel metrics. Applying the kernel at 256 px
        (not scaling it by S / 256) is the faithful choice: the paper evaluates at 256 px for every input
        size, so its smoothing is 4 px of a 256 px image. A caller's ``sigma`` falls back to the shared
        post-processing at the input size.
        """
        if sigma is not None:
            return super().heatmap(result, size, sigma, score_mode)
        maps = upsample(upsample(result.patch_map, size), (EVAL_SIZE, EVAL_SIZE))
        x = torch.arange(-2, 3, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / self.sigma) ** 2)
        k2 = torch.outer(k, k) / torch.outer(k, k).sum()
        maps = F.conv2d(maps[:, None], k2.view(1, 1, 5, 5).to(maps.dtype), padding=2)[:, 0]
        score = image_score(maps, score_mode or self.score_mode)
        return upsample(maps, size), score

    def _score(self, features: PatchFeatures) -> AnomalyResult:
        tokens, grid = self._tokens(features)
        amap, per = self._maps(tokens, grid)
        return AnomalyResult(amap.float(), extras={f"group{g}": m for g, m in enumerate(per)})

    def explain(self, features: PatchFeatures) -> dict[str, Any]:
        """Per-group maps 1 - cos(encoder group, decoder group) of one image, shallow group first."""
        res = self.score(features[0])
        layers = list(self.layers or features.layers)
        groups = split_groups(len(layers), len(layers) if self.groups == "dense" else int(self.groups))
        return {f"group {layers[g[0]]}..{layers[g[-1]]}": res.extras[f"group{i}"][0].numpy()
                for i, g in enumerate(groups)}

    # ---- resumable training -----------------------------------------------------------------------------
    def _save_checkpoint(self, path: Path, opt: StableAdamW, step: int, data_key: str) -> None:
        """Model + optimiser state + RNG state + step, tensors only (safetensors), written atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        t = {f"model.{k}": v.detach().clone().contiguous() for k, v in self.state_dict().items()}
        for i, st in opt.state_dict()["state"].items():
            t.update({f"opt.{i}.{k}": v.clone().contiguous() for k, v in st.items()})
        t["rng"] = torch.get_rng_state()
        with replacing(path) as tmp:  # two processes training the same run never share a temporary file
            save_file(t, str(tmp), metadata={"step": str(step), "data_key": data_key})

    def _resume(self, path: Path, opt: StableAdamW, data_key: str) -> int:
        """Load a checkpoint of the same data and settings; returns the step to continue from (0 if none)."""
        if not path.exists():
            return 0
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("data_key") != data_key:
            return 0  # another data set or other settings: start afresh (the file is overwritten later)
        t = load_file(str(path))
        self.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        torch.set_rng_state(t["rng"])
        return int(meta["step"])
