"""Spatial AR: a 2D autoregressive CNN over the patch-embedding grid; the prediction error is the anomaly map.

Erdil, Schulthess, Tombak, Konukoglu, "Spatial Autoregressive Modeling of DINOv3 Embeddings for Unsupervised
Anomaly Detection", 2026 (arXiv 2603.02974; code github eerdil/spatial-ar-dinov3-uad).

Instead of a memory bank, a small stack of masked, dilated convolutions learns how each patch embedding
follows from its neighbours (PixelCNN-style raster order). Scoring is one forward pass whose cost does not
depend on the number of training images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..settings import OFFLINE_DEFAULT
from .. import distributed
from ..features import PatchFeatures
from ..trainer import TrainConfig, fingerprint, train
from .base import AnomalyResult, Method, register_method

MODES = ("four_way", "causal", "bidirectional", "standard")
NORMALIZE = ("none", "channel")
# mask of the first layer / of the later layers, per single-stack mode (PixelCNN: "A" hides the centre, "B" shows it)
MODE_MASKS = {"causal": ("A", "B"), "bidirectional": ("centre", "none"), "standard": ("none", "none")}
SIDES = ("up", "down", "left", "right")  # the four half-plane stacks of mode "four_way"


def conv_mask(kind: str, k: int) -> torch.Tensor:
    """(k, k) 0/1 mask of a kernel; tap (r, c) sits at offset dilation * (r - k//2, c - k//2).

    "A": taps strictly before the centre in raster order (rows above, then left in the centre row);
    "B": as "A" plus the centre; "centre": everything but the centre; "none": all taps;
    "up" / "down" / "left" / "right": the rows above / rows below / columns left / columns right of the centre
    (a strict half-plane); "up+" etc.: the same half-plane plus the centre row (column), centre included.
    For k = 3: A = [1 1 1; 1 0 0; 0 0 0], B = [1 1 1; 1 1 0; 0 0 0], centre = [1 1 1; 1 0 1; 1 1 1],
    up = [1 1 1; 0 0 0; 0 0 0], up+ = [1 1 1; 1 1 1; 0 0 0].
    """
    c = k // 2
    m = torch.ones(k, k)
    side, plus = kind.rstrip("+"), kind.endswith("+")
    if kind in ("A", "B"):
        m[c, c + (kind == "B"):] = 0
        m[c + 1:] = 0
    elif kind == "centre":
        m[c, c] = 0
    elif side in SIDES:
        m.zero_()
        keep = slice(0, c + plus) if side in ("up", "left") else slice(c + 1 - plus, k)
        if side in ("up", "down"):
            m[keep] = 1
        else:
            m[:, keep] = 1
    elif kind != "none":
        raise ValueError(f"mask kind must be 'A', 'B', 'centre', 'none' or a side {SIDES} (with '+'), got {kind!r}")
    return m


def layer_plan(mode: str, n_layers: int, dilations: list[int]) -> list[list[tuple[str, int]]]:
    """(mask kind, dilation) of each spatial layer, per stack: layer i uses ``dilations[min(i, len - 1)]``.

    Single-stack modes: one stack of ``n_layers``. "four_way": four stacks (``SIDES``) of ``n_layers - 1``
    layers, a strict half-plane first and the half-plane with the centre line after; their 1 x 1 merge is the
    last layer and adds no spatial offset.
    """
    d = lambda i: dilations[min(i, len(dilations) - 1)]  # noqa: E731
    if mode == "four_way":
        return [[(side if i == 0 else side + "+", d(i)) for i in range(n_layers - 1)] for side in SIDES]
    first, rest = MODE_MASKS[mode]
    return [[(first if i == 0 else rest, d(i)) for i in range(n_layers)]]


class MaskedConv2d(nn.Conv2d):
    """A dilated "same" convolution whose kernel is multiplied by a fixed 0/1 mask: conv2d(x, W * M).

    The same mask is used for every (out, in) channel pair (no PixelCNN colour groups: the channels of an
    embedding are one token). The mask is rebuilt from ``kind`` and not saved with the weights.
    """

    def __init__(self, c_in: int, c_out: int, k: int, dilation: int, kind: str) -> None:
        super().__init__(c_in, c_out, k, padding=dilation * (k // 2), dilation=dilation, bias=True)
        self.kind = kind
        self.register_buffer("mask", conv_mask(kind, k), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.kind == "none" else self.weight * self.mask
        return F.conv2d(x, w, self.bias, padding=self.padding, dilation=self.dilation)


class AR2D(nn.Module):
    """The paper's AR2DModelDilated: L0 C->hidden (mask A / centre / none), ReLU, L1..L(n-2) hidden->hidden
    (mask B / none), ReLU, L(n-1) hidden->C linear (x ``out_mult`` for a predicted log-variance).

    Layer i uses ``dilations[min(i, len - 1)]``; with the default [4, 4, 4, 4] the last layer reuses the last
    entry, as the official code does. All convolutions have a bias; no norm, no residual.
    """

    def __init__(self, c: int, hidden: int, n_layers: int, k: int, dilations: list[int], mode: str,
                 out_mult: int = 1) -> None:
        super().__init__()
        dims = [c] + [hidden] * (n_layers - 1) + [c * out_mult]
        self.convs = nn.ModuleList(MaskedConv2d(dims[i], dims[i + 1], k, d, kind)
                                   for i, (kind, d) in enumerate(layer_plan(mode, n_layers, dilations)[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, C * out_mult, h, w)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.relu(x)
        return x


class FourWayAR2D(nn.Module):
    """Both-sided AND centre-blind context (ours): four half-plane stacks, merged by a 1 x 1 convolution.

    Stack "up" sees only rows strictly above the token: its first layer is a strict half-plane (mask "up"),
    its later layers add the centre row (mask "up+"), so every path keeps a net upward offset and the token
    itself is never reached; "down", "left" and "right" likewise. Each stack: ``n_layers - 1`` masked
    convolutions C->w->...->w with ReLU (w = ``hidden // 2``: four stacks of half the width cost about as
    much as one stack of ``hidden``); then a 1 x 1 convolution 4w -> C (x ``out_mult``), linear. The union of
    the four fields is every offset of the square but the centre (``SpatialAR.receptive_field``); unlike
    PixelCNN's raster stack there is no blind wedge.
    """

    def __init__(self, c: int, hidden: int, n_layers: int, k: int, dilations: list[int], out_mult: int = 1) -> None:
        super().__init__()
        w = max(1, hidden // 2)
        self.stacks = nn.ModuleList(
            nn.ModuleList(MaskedConv2d(c if i == 0 else w, w, k, d, kind) for i, (kind, d) in enumerate(plan))
            for plan in layer_plan("four_way", n_layers, dilations))
        self.merge = nn.Conv2d(len(SIDES) * w, c * out_mult, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, C * out_mult, h, w)
        outs = []
        for stack in self.stacks:
            y = x
            for conv in stack:
                y = F.relu(conv(y))
            outs.append(y)
        return self.merge(torch.cat(outs, 1))


def build_net(c: int, hidden: int, n_layers: int, k: int, dilations: list[int], mode: str,
              out_mult: int = 1) -> nn.Module:
    """The prediction network of ``mode``."""
    if mode == "four_way":
        return FourWayAR2D(c, hidden, n_layers, k, dilations, out_mult)
    return AR2D(c, hidden, n_layers, k, dilations, mode, out_mult)


@register_method
class SpatialAR(Method):
    """Spatial AR (Erdil et al., 2026): predict each patch embedding from its (masked) neighbourhood.

    Model (``AR2D``): 5 convolutions, kernel 3, hidden 256, ReLU; ``mode`` = "causal" (PixelCNN type-A first
    layer then type B: a token is predicted from raster-earlier tokens only), "bidirectional" (only the centre
    tap of the first layer is masked: the official ``center_masked_first``, which is NOT centre-blind, below)
    or "standard" (plain convolutions, the non-autoregressive baseline); ours, the default: "four_way"
    (``FourWayAR2D``: four half-plane stacks, up / down / left / right, each blind to the centre, merged by a
    1 x 1 convolution: context on every side and never the token itself).
    Training on normal images: loss = MSE(f(x~), x) averaged over B*C*h*w, with the clean embedding x as
    target and x~ = x + 0.03 * sigma_bc * eps applied to a whole batch with probability 0.2 (sigma_bc =
    unbiased std of x[b, c] over the grid, at least 1e-6); AdamW, lr 1e-3, torch's default weight decay 0.01.
    Map: a(i, j) = mean_c (f(x) - x)^2 (one forward pass), no smoothing (official: sigma 0).

    Paper (``preset="paper"``, official ``train.py`` defaults): mode "causal", dilations [4, 4, 4, 4],
    DINOv3 ViT-S/16 at 448 px (28 x 28 tokens, ``paper_inputs``), batch 64, 40 epochs, seed 42.

    Ours (issue 13: on real defects the paper's settings on the 14 x 14 Lite0 grid ranked defective images
    BELOW normal ones; image AUROC 0.27):
    - ``dilations=None`` (default) follows the token grid: every layer gets max(1, round(4 g / 28)) for a
      g x g grid, the paper's 4 at 28 x 28, 2 at 14 x 14, 1 below 11 x 11. Dilation 4 was chosen for 28 x 28;
      on 14 x 14 it splits the grid into 16 lattices of 3-4 tokens a side, so a token has a handful of
      context tokens, mostly zero padding. The resolved dilations are saved in config.json.
    - ``mode`` default "four_way" (paper: "causal"). Issue 13 measured a both-sided context far better than
      the raster one (real data: 0.75 causal vs 0.905 "bidirectional" with dilation 1): a raster-only context
      predicts a smooth dark region easily (low error) and a textured normal region badly (high error). But
      "bidirectional" reaches its own target in two hops, so it can learn the identity; "four_way" keeps the
      both-sided context and provably never sees the token it predicts (issue 25; ``receptive_field()``).
      Hard set (tests/hardbench.py: brick, grass, gravel; Lite0 at 224, 14 x 14 grid, quick, refit),
      image / pixel AUROC: "bidirectional" 0.749 / 0.849, "four_way" 0.777 / 0.874; at 128 (8 x 8 grid):
      0.787 / 0.826 and 0.817 / 0.867.
    - ``normalize="channel"`` divides each channel's squared error by its mean on the normal training tokens
      (a diagonal Mahalanobis of the error: "how unusual is this error", not "how large"); ``token_term``
      adds mean_c (x - mu_c)^2 / var_c of the token itself (its distance from the normal tokens), which a
      prediction error cannot see where context and token are abnormal in the same smooth way.
      Default: ``normalize="channel"``, no token term. Measured on the hard set (three textures, image AUROC
      with darkened normals among the negatives), channel normalisation raised the mean in every setting
      (14 x 14 grid, quick: bidirectional 0.745 -> 0.763, causal 0.686 -> 0.706, bidirectional dilation 1
      0.740 -> 0.745; 8 x 8 grid: 0.793 -> 0.807); the token term did not (-0.01 to +0.01). Bidirectional
      vs causal at the grid dilation: 0.745 vs 0.686 (14 x 14), 0.79 vs 0.74 (8 x 8).
    - No image score in the official code: ours is the mean of the top 1% of the (unsmoothed) map.

    Options: ``loss="gaussian_nll"`` doubles the output channels to a mean and a log-variance (clamped to
    [-10, 10]), trains on 0.5 * (log s^2 + (x - mu)^2 / s^2) and scores with the same per-token NLL. MSE stays
    the DEFAULT: it is what the paper trains and reports, and with few normal images a learned variance can
    shrink where the training tokens were easy, so the map then also measures the model's confidence
    rather than only the prediction error. ``flip=True`` adds a second pass on the 180-degree rotated grid
    (both spatial flips) and averages the two maps, so a causal model also sees the "future" context.

    Things to know (they follow from the architecture, not from the data): with every dilation 4, token
    (i, j) only ever sees tokens with the same (i mod 4, j mod 4), i.e. 16 interleaved lattices, and never
    its immediate neighbours; in causal mode the first token of each lattice sees only zero padding; the
    "bidirectional" mode is NOT centre-blind: layer 0 at p + d e sees p and layer 1 at p sees p + d e, so the
    target reaches the output in two hops (with the older schedule [1, 2, 4, 8] it cannot: later offsets are
    even and never cancel layer 0's odd one); the causal stack has PixelCNN's blind spot (a wedge of
    raster-earlier tokens up and to the right is never seen). ``receptive_field()`` computes all this exactly.

    Other deviations: features come from the cache (frozen backbone, any layer) instead of being recomputed
    each step; checkpoint selection uses the loss on held-out NORMAL images (``select="val_loss"``) or the
    last epoch (``select="last"``), never the test set as the official code allows; a refit on all normal
    images (the run's ``calibration="refit"``) trains the epoch count the first fit selected
    (``refit_kwargs``), so the shipped head is the selected one; the "quick" preset uses
    batch 8 (the demo has ~24 training images; the paper trains batch 64 on thousands of slices) and
    ``max_steps=120``, which lowers the number of epochs (never below 1) so that a fit costs at most ~120
    steps on any dataset size; "tiny" (contract tests only) shrinks the model; with a CNN backbone the
    default layer is stage 3 (stride 16, the grid of DINOv3 ViT-S/16).
    """

    name = "spatial_ar"
    paper = ("Erdil, Schulthess, Tombak, Konukoglu, Spatial Autoregressive Modeling of DINOv3 Embeddings for "
             "Unsupervised Anomaly Detection, 2026 (arXiv 2603.02974)")
    summary = ("A small convolutional network learns, from normal images only, to predict each patch embedding "
               "from its neighbours, which it sees through masked, dilated convolutions (in raster order, like "
               "PixelCNN). Where the real embedding differs from the prediction, the patch does not follow from "
               "its context: the squared prediction error is the anomaly map. Scoring is a single forward pass "
               "of a few MB of weights, so its cost does not grow with the number of training images.")
    paper_inputs = dict(backbone="dinov3_vits16", resize=448, image_size=448)  # 28 x 28 patches
    sigma, score_mode = 0.0, "top1"  # official: no smoothing; no image score (top 1% of the map is ours)
    presets = {
        "tiny": dict(hidden=32, epochs=15, batch_size=4),
        "quick": dict(epochs=40, batch_size=8, max_steps=120),
        "paper": dict(mode="causal", dilations=[4, 4, 4, 4], normalize="none", token_term=False, epochs=40,
                      batch_size=64, seed=42),
    }

    def __init__(self, backbone: str = OFFLINE_DEFAULT, layers: list[str] | None = None,
                 in_dim: int | None = None, mode: str = "four_way", hidden: int = 256, n_layers: int = 5,
                 kernel: int = 3, dilations: list[int] | None = None, loss: str = "mse", noise_p: float = 0.2,
                 noise_scale: float = 0.03, lr: float = 1e-3, weight_decay: float = 0.01, epochs: int = 40,
                 batch_size: int = 64, max_steps: int | None = None, select: str = "val_loss", flip: bool = False,
                 normalize: str = "channel", token_term: bool = False, seed: int = 0) -> None:
        super().__init__(backbone)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if loss not in ("mse", "gaussian_nll"):
            raise ValueError(f"loss must be 'mse' or 'gaussian_nll', got {loss!r}")
        if select not in ("val_loss", "last"):
            raise ValueError(f"select must be 'val_loss' or 'last', got {select!r}")
        if n_layers < 2 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"need n_layers >= 2 and an odd kernel, got n_layers={n_layers}, kernel={kernel}")
        self.layers, self.in_dim, self.mode, self.hidden, self.n_layers = layers, in_dim, mode, hidden, n_layers
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        self.kernel, self.dilations = kernel, list(dilations) if dilations else None
        self.normalize, self.token_term = normalize, token_term
        self.loss, self.noise_p, self.noise_scale = loss, noise_p, noise_scale
        self.lr, self.weight_decay, self.epochs, self.batch_size = lr, weight_decay, epochs, batch_size
        self.max_steps = max_steps
        self.select, self.flip, self.seed = select, flip, seed
        self.net: AR2D | None = None
        if in_dim is not None and self.dilations is not None:  # a saved head: its config has both
            self._build(in_dim, self.dilations)

    def _build(self, in_dim: int, dilations: list[int]) -> None:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(self.seed)
            self.net = build_net(in_dim, self.hidden, self.n_layers, self.kernel, dilations, self.mode,
                                 out_mult=2 if self.loss == "gaussian_nll" else 1)
        # normal statistics for the score, fit after training: per-channel variance of the prediction error,
        # per-channel mean / variance of the tokens (ones / zeros = no normalisation)
        self.register_buffer("err_var", torch.ones(in_dim))
        self.register_buffer("tok_mean", torch.zeros(in_dim))
        self.register_buffer("tok_var", torch.ones(in_dim))
        self.in_dim, self.dilations = in_dim, list(dilations)

    @staticmethod
    def grid_dilation(grid: tuple[int, int]) -> int:
        """The paper's dilation 4 on DINOv3's 28 x 28 grid, scaled to this grid: max(1, round(4 g / 28))."""
        return max(1, round(4 * min(grid) / 28))

    def layers_for(self, spec) -> list[str]:
        if self.layers:
            return list(self.layers)
        return ["stage3"] if spec.kind == "cnn" else ["norm"]  # CNN: stride 16, the ViT-S/16 grid

    # ---- model ------------------------------------------------------------------------------------------
    def _tokens(self, features: PatchFeatures) -> torch.Tensor:
        return features.stacked(self.layers or features.layers).float()  # (B, C, h, w)

    def _error(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-token, per-channel error (B, C, h, w): (f(x) - target)^2, or the Gaussian NLL per channel."""
        out = self.net(x)
        if self.loss == "mse":
            return (out - target).pow(2)
        mu, log_var = out.chunk(2, dim=1)
        log_var = log_var.clamp(-10, 10)
        return 0.5 * (log_var + (target - mu).pow(2) * torch.exp(-log_var))

    def _token_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h, w): the per-channel error, normalised by ``normalize``, plus ``token_term``."""
        e = self._error(x, x)
        if self.normalize == "channel":
            e = e / self.err_var[:, None, None]
        a = e.mean(1)
        if self.token_term:
            a = a + ((x - self.tok_mean[:, None, None]).pow(2) / self.tok_var[:, None, None]).mean(1)
        return a

    def _maps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h, w) anomaly map; with ``flip`` averaged with the pass on the rotated grid."""
        a = self._token_map(x)
        if self.flip:
            a = 0.5 * (a + self._token_map(x.flip(-2, -1)).flip(-2, -1))  # 180-degree rotation = both flips
        return a

    def _fit_normal_stats(self, x_all: torch.Tensor) -> None:
        """Per-channel statistics of the NORMAL training tokens and of the model's error on them."""
        err = torch.cat([self._error(b, b) for b in x_all.split(64)])  # (N, C, h, w)
        self.err_var.copy_(err.mean((0, 2, 3)).clamp_min(1e-8))
        self.tok_mean.copy_(x_all.mean((0, 2, 3)))
        self.tok_var.copy_(x_all.var((0, 2, 3)).clamp_min(1e-8))

    # ---- fit / score ------------------------------------------------------------------------------------
    def _fit(self, features: PatchFeatures, progress=None, val_features: PatchFeatures | None = None,
             budget: int | None = None, checkpoint_dir: str | None = None, **kw: Any) -> None:
        """Train on normal tokens; select the epoch on ``val_features`` (held-out normals), or, with ``budget``
        (a refit), train exactly that many epochs."""
        x_all = self._tokens(features)  # (N, C, h, w)
        if self.net is None:
            self._build(x_all.shape[1], self.dilations or [self.grid_dilation(x_all.shape[-2:])] * 4)
            self.record_config(in_dim=self.in_dim, dilations=self.dilations)  # config.json rebuilds it
        elif x_all.shape[1] != self.in_dim:
            raise ValueError(f"spatial_ar: features have {x_all.shape[1]} channels, the model expects {self.in_dim}")
        x_val = self._tokens(val_features) if val_features is not None and len(val_features) else None

        def batch_loss(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            x = x_all[idx]  # (b, C, h, w) clean targets
            inp = x
            if torch.rand((), generator=g) < self.noise_p:  # feature-noise augmentation, one draw per batch
                sigma = x.flatten(2).std(-1).clamp_min(1e-6)[..., None, None]  # (b, C, 1, 1)
                inp = x + self.noise_scale * sigma * torch.randn(x.shape, generator=g)
            mine = distributed.local_part(len(idx))  # under torchrun: this rank's part of the batch
            return self._error(inp[mine], x[mine]).mean()  # = MSELoss(f(x~), x) over B*C*h*w for loss="mse"

        def val_loss() -> float:  # held-out NORMAL images only
            return float(torch.cat([self._error(b, b).mean(1) for b in x_val.split(64)]).mean())

        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        cfg = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, max_steps=self.max_steps,
                          select=self.select, seed=self.seed)
        # a resumable checkpoint next to the cache, per training (data and settings): an interrupted fit resumes
        key = fingerprint([x_all] + ([x_val] if x_val is not None else []), self.config())
        ckpt = Path(checkpoint_dir) / f"{self.name}_{key}.safetensors" if checkpoint_dir else None
        record = train(self.net, opt, batch_loss, len(x_all), cfg, budget=budget, progress=progress,
                       val_loss=val_loss if x_val is not None else None, checkpoint=ckpt, key=key)
        with torch.no_grad():
            self._fit_normal_stats(x_all)
        self.fit_info.update(record.to_dict())

    def refit_kwargs(self) -> dict[str, Any]:
        """A refit on all normal images trains the epoch count this fit selected on its held-out images."""
        return {"budget": self.fit_info["best_epoch"]} if self.fit_info.get("best_epoch") else {}

    def _score(self, features: PatchFeatures) -> AnomalyResult:
        return AnomalyResult(self._maps(self._tokens(features)))  # (B, h, w)

    # ---- teaching -----------------------------------------------------------------------------------
    def receptive_field(self) -> np.ndarray:
        """Which grid offsets one output token depends on, exactly, through the masked dilated stack.

        Propagates the set of positions backwards, layer by layer: output p reads input p + o for every
        unmasked tap offset o, so the input set is the union of the output set shifted by each offset.
        Returns:
            (2E+1, 2E+1) float32, 1 where the token at the centre (offset (0, 0), row E, column E) can see,
            E = sum of dilation * (kernel // 2) over the layers.
        """
        if self.dilations is None:
            raise ValueError("spatial_ar: the dilations follow the token grid; fit the head or pass dilations")
        plans = layer_plan(self.mode, self.n_layers, self.dilations)  # per stack: [(mask kind, dilation)]
        c = self.kernel // 2
        E = max(sum(d * c for _, d in plan) for plan in plans)
        field = np.zeros((2 * E + 1, 2 * E + 1), bool)
        for plan in plans:  # "four_way": the union of its four stacks (the 1 x 1 merge adds no offset)
            seen = np.zeros_like(field)
            seen[E, E] = True  # the output token
            for kind, d in reversed(plan):
                new = np.zeros_like(seen)
                ys, xs = np.nonzero(seen)
                for r, s in zip(*np.nonzero(conv_mask(kind, self.kernel).numpy())):
                    new[ys + d * (r - c), xs + d * (s - c)] = True
                seen = new
            field |= seen
        return field.astype(np.float32)

    def explain(self, features: PatchFeatures) -> dict[str, Any]:
        """For ONE image: the per-token error map and a picture of the receptive field of one token."""
        out = {"prediction error": self.score(features[0]).patch_map[0].numpy()}
        rf = self.receptive_field()
        img = np.full(rf.shape + (3,), 40, np.uint8)  # dark: not visible
        img[rf > 0] = (250, 250, 250)  # white: the token's prediction depends on this offset
        E = rf.shape[0] // 2
        img[E, E] = (220, 40, 40) if rf[E, E] == 0 else (255, 160, 0)  # red: the target; orange: it leaks in
        out["receptive field"] = np.kron(img, np.ones((8, 8, 1), np.uint8))  # 8 px per grid cell
        return out
