"""VarAD: multi-directional visual autoregressive token prediction with a selective state-space model (Mamba).

Cao, Yao, Luo, Shen, "VarAD: Lightweight High-Resolution Image Anomaly Detection via Visual Autoregressive
Modeling", IEEE TII 2025 (arXiv 2412.17263).

No usable official code exists (github caoyunkang/VarAD ships an unreadable zip), so everything below the
abstract level is a reimplementation with OUR defaults; see the class docstring. The Mamba block follows the
original Mamba design (Gu & Dao 2023); the selective scan is written in plain PyTorch (chunked parallel scan,
memory linear in the sequence length) with a sequential reference, and uses ``mamba_ssm``'s fused CUDA kernel
only when it is installed and the tensors are on a GPU.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..settings import OFFLINE_DEFAULT
from .. import distributed
from ..features import PatchFeatures
from ..trainer import TrainConfig, fingerprint, train
from .base import AnomalyResult, FitContext, Method, register_method

DIRECTIONS = ("row", "col", "row_rev", "col_rev")  # scan orders of the token grid

try:  # the fused kernel (CUDA only); absent on CPU machines
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _fused_scan_fn
except Exception:  # ImportError, or a broken CUDA build
    _fused_scan_fn = None


# ---- selective scan -------------------------------------------------------------------------------------
def selective_scan_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       C: torch.Tensor) -> torch.Tensor:
    """The recurrence one step at a time (reference for tests; slow).

    h_t = exp(dt_t A) * h_{t-1} + (dt_t B_t) x_t,   y_t = C_t . h_t      (Mamba eq. 2a/2b, ZOH-style)

    Args:
        x, dt: (Bt, L, E) inputs and positive step sizes; A: (E, N) negative; B, C: (Bt, L, N).
    Returns:
        y: (Bt, L, E) (without the D skip).
    """
    h = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])  # (Bt, E, N)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1)


def _scan_chunk(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of T tokens in parallel: a Hillis-Steele prefix scan of the affine maps h -> a h + b.

    Only decays a in (0, 1] are multiplied, never divided, so it is stable for any step size.
    Returns y (Bt, T, E) and the last state (Bt, E, N).
    """
    a = torch.exp(dt.unsqueeze(-1) * A)  # (Bt, T, E, N) decays
    b = (dt * x).unsqueeze(-1) * B.unsqueeze(2)  # (Bt, T, E, N) inputs
    T, k = x.shape[1], 1
    while k < T:  # after the step for k, (a_t, b_t) composes the maps of tokens t-2k+1 .. t
        b = torch.cat([b[:, :k], torch.addcmul(b[:, k:], a[:, k:], b[:, :-k])], 1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], 1)
        k *= 2
    h = torch.addcmul(b, a, h0.unsqueeze(1))  # (Bt, T, E, N): carry the state of the previous chunk in
    y = torch.einsum("bten,btn->bte", h, C)
    return y, h[:, -1]


class _RecomputedChunk(torch.autograd.Function):
    """Activation checkpointing of one chunk: the forward keeps no graph, the backward recomputes the chunk.

    (A few lines instead of torch.utils.checkpoint, whose first call imports torch._dynamo: seconds on a CPU.)
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0):
        ctx.save_for_backward(x, dt, A, B, C, h0)
        with torch.no_grad():
            return _scan_chunk(x, dt, A, B, C, h0)

    @staticmethod
    def backward(ctx, grad_y, grad_h):
        inputs = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        with torch.enable_grad():
            y, h = _scan_chunk(*inputs)
        return torch.autograd.grad((y, h), inputs, (grad_y, grad_h))


def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   chunk: int = 32) -> torch.Tensor:
    """The selective scan of ``selective_scan_ref``, fast: chunks of ``chunk`` tokens, state carried across.

    Memory is O(Bt * chunk * E * N) for the (E, N)-sized states plus O(Bt * L * E) for inputs and outputs,
    i.e. linear in L; with autograd, each chunk is recomputed in the backward pass (activation
    checkpointing) so training memory stays linear too. On a GPU with ``mamba_ssm`` installed the fused
    kernel is used instead.
    """
    if _fused_scan_fn is not None and x.is_cuda:
        y = _fused_scan_fn(x.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(), A.contiguous(),
                           B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous())  # (Bt, E, L)
        return y.transpose(1, 2)
    h = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])  # (Bt, E, N)
    ys = []
    for s in range(0, x.shape[1], chunk):
        args = (x[:, s:s + chunk], dt[:, s:s + chunk], A, B[:, s:s + chunk], C[:, s:s + chunk], h)
        if torch.is_grad_enabled():
            y, h = _RecomputedChunk.apply(*args)
        else:
            y, h = _scan_chunk(*args)
        ys.append(y)
    return torch.cat(ys, 1)


# ---- Mamba block -------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Mamba(nn.Module):
    """The Mamba mixer (Gu & Dao 2023): gated, causal-conv, input-dependent (selective) SSM.

    Args:
        d_model: token width D; the inner width is E = expand * D.
        d_state: state size N per channel; d_conv: causal depthwise conv kernel; chunk: scan chunk length.
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, d_conv: int = 4, chunk: int = 32,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        super().__init__()
        E, R = expand * d_model, math.ceil(d_model / 16)
        self.d_state, self.dt_rank, self.chunk = d_state, R, chunk
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1)
        self.x_proj = nn.Linear(E, R + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(R, E)
        nn.init.uniform_(self.dt_proj.weight, -R ** -0.5, R ** -0.5)
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        with torch.no_grad():  # softplus(bias) = dt ~ logU[dt_min, dt_max]: bias = inverse softplus of dt
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(E, 1))  # S4D-real
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d_model, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """(Bt, L, D) -> (Bt, L, D), causal: output t depends on inputs <= t only."""
        L = u.shape[1]
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (Bt, L, E) each
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :L].transpose(1, 2))  # causal: crop the right padding
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # (Bt, L, E) step sizes
        A = -torch.exp(self.A_log)  # (E, N)
        y = selective_scan(x, dt, A, B, C, self.chunk) + self.D * x
        return self.out_proj(y * F.silu(z))


class MambaStack(nn.Module):
    """Pre-norm residual Mamba blocks, x + Mamba(RMSNorm(x)), and a final RMSNorm."""

    def __init__(self, d_model: int, n_layers: int, **kw: Any) -> None:
        super().__init__()
        self.norms = nn.ModuleList(RMSNorm(d_model) for _ in range(n_layers))
        self.mixers = nn.ModuleList(Mamba(d_model, **kw) for _ in range(n_layers))
        self.norm_f = RMSNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x))
        return self.norm_f(x)


class Hierarchy(nn.Module):
    """Per-hierarchy parts: feature statistics, the light adapter into the model width, the output head."""

    def __init__(self, in_dim: int, d_model: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.register_buffer("err_var", torch.ones(in_dim))  # mean squared error per channel on normal tokens
        self.adapter = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, d_model))
        self.head = nn.Linear(d_model, in_dim)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def scan_orders(h: int, w: int) -> torch.Tensor:
    """(4, h*w): for each of DIRECTIONS, the row-major token index at each sequence position."""
    grid = torch.arange(h * w).view(h, w)
    row, col = grid.flatten(), grid.t().flatten()
    return torch.stack([row, col, row.flip(0), col.flip(0)])


# ---- the method ------------------------------------------------------------------------------------------
@register_method
class VarAD(Method):
    """VarAD (Cao et al., IEEE TII 2025), reimplemented; only the abstract-level design is the paper's.

    Tokens of three backbone layers (multi-hierarchy) are standardised per channel and each passes its own
    light adapter (LayerNorm + Linear to ``d_model``). Each hierarchy's token grid is read in four scan
    orders (row-major, column-major and their reverses: multi-directional). In every order a causal Mamba
    stack predicts token t from tokens < t (a learned start token is prepended, so output t sees inputs
    < t). A per-hierarchy linear head maps the prediction back to the layer's channels, and the
    discrepancy to the true token is the anomaly score of that token. Discrepancies are put back into
    grid order, fused over directions (``direction_fusion``, below), then averaged over hierarchies. Training: the same discrepancy,
    averaged, on normal images only (one random direction per sequence and step), AdamW; the epoch with
    the lowest discrepancy on the held-out normal images is kept.

    Budget (``epochs``, ``patience``, ``min_delta``; ``uadlab.trainer``): training stops when the held-out
    discrepancy has not fallen below ``best * (1 - min_delta)`` for ``patience`` epochs, at most ``epochs``
    epochs. A refit on all normal images (the run's ``calibration="refit"``) trains the epoch count the first
    fit selected (``refit_budget``). Without held-out images the fit trains ``epochs`` epochs.

    Scoring (``normalize="channel"``, ours, as Spatial AR's): each channel's squared error is divided by its
    mean on the normal training tokens (a diagonal Mahalanobis of the prediction error), so channels that
    are easy to predict on normal images weigh more when they miss. ``"none"``: the plain mean.

    What a prediction error cannot see (the cause of the gap measured below, by principle): where
    neighbouring tokens are strongly correlated (CNN / ViT tokens share most of their receptive field), a
    model trained on normal images predicts token t mostly from its predecessors; inside an EXTENDED
    anomaly (a dark, smooth or faint region) the predecessors deviate the same way, so the error keeps only
    the part of the deviation its context does not share, roughly (1 - a) of it for a neighbour correlation
    a. A memory bank (PatchCore) or even the distance to the mean normal token sees the whole deviation.
    So VarAD is strong on small or sharp defects in a regular context and weak on large smooth ones; more
    training lowers the held-out loss but does not change this. Hard set (tests/hardbench.py: brick, grass,
    gravel; Lite0 at 128, quick, refit), image / pixel AUROC: 6 fixed epochs 0.734 / 0.743; the patience
    budget (23-49 epochs selected) 0.794 / 0.755 with the mean over directions, 0.817 / 0.787 with the min
    (brick 0.889 / 0.793, grass 0.792 / 0.759, gravel 0.771 / 0.808); the token-mean baseline 0.750 / 0.820;
    PatchCore 0.958 / 0.953. What is left is the low-contrast blob (texture at 25% of its contrast, same local
    mean): image AUROC against all normal images 0.78 (brick) and 0.58 (grass) with the min, while the dark
    smooth blob scores 1.0 on both. Its tokens are neither badly predicted nor unusually well predicted (a
    two-sided "too typical" score, |log error|, fell to 0.54 on brick). The goal of 0.05 image AUROC of
    PatchCore is NOT reached.

    Reimplementation defaults (OURS, not verified against the paper, whose details are unavailable):
    layers (ViT: blocks at depth/3, 2 depth/3 and the last, i.e. 4/8/12 of 12 as third-party summaries
    say; CNN: stages 1-3 resampled to the middle layer's grid); the adapter design; one Mamba stack shared
    by all hierarchies and directions, told apart by a learned start token and a learned embedding per
    (hierarchy, direction) added to every input token; the model width, depth and state size; the
    distance; the optimiser and schedule; the direction sampling during training.

    Deviation from a literal reading ("discrepancy between predicted and ADAPTED token"): the target is
    the standardised backbone token, not the adapter's output. A trainable adapter as its own target can
    collapse to a constant (zero loss, no signal); a fixed target cannot.

    Distance (``distance``): "l2" (default) = mean squared error over the standardised channels; "cosine" =
    1 - cos(predicted, standardised true token). Chosen by measurement (demo, efficientnet_lite0, quick):
    cosine reached 0.56 pixel AUROC on two textures where l2 reached 0.99. Cosine ignores the token's
    magnitude, and after per-channel standardisation many defects (darker, brighter, smoother regions) change
    mostly the magnitude of the token, not its direction.

    The model has to beat a no-model baseline to be worth its cost: the standardised distance of each token
    to the mean normal token (tests/test_varad.py keeps it). That baseline sees tokens that are rare; only a
    model of spatial context sees common tokens in the wrong place (e.g. a rotated piece of the same texture).

    Direction fusion (``direction_fusion``; the paper says only "aggregated across hierarchies and
    directions"): "min" (default, ours) keeps, per token, the smallest discrepancy over the scan orders;
    "mean" is the plain average (the previous default), "max" the largest. By principle: a token is normal if
    SOME normal context explains it. A normal token can be badly predicted in one order simply because that
    order's context is poor there (the first row of a row-major scan, a texture that varies along one axis, an
    unusual but normal neighbour just before it); the mean mixes that context noise into every token and the
    max picks it out. The minimum keeps only what no order's context explains, and every token, corners
    included, is last-ish in at least one order (it has the whole image as context there), so the border
    artefact of short contexts is gone too. Measured on the hard set (tests/hardbench.py, below): the max fell
    well below the mean (0.757 vs 0.875 image AUROC on brick), the min rose above it. The price: a defect
    visible only against the context of one side (the entry edge of a blob) counts only if the other orders
    also miss it.

    Post-processing (``sigma``, ``score_mode``; the paper's choice is unknown): Gaussian sigma 4 px at the
    network input size and image score = mean of the top 1% of the map, the uadlab defaults.

    Args (besides the usual training ones):
        layers: backbone layers = hierarchies (None: see ``layers_for``).
        in_dims: channels per hierarchy; None until the first fit, then saved in config.json.
        grid_layer: index of the hierarchy whose token grid all are resampled to (None: the middle one).
        directions: subset of ``DIRECTIONS`` used for training and scoring.
        d_model, n_layers, d_state, expand, d_conv: the Mamba stack; chunk: tokens per scan chunk.
        distance: "cosine" or "l2" (above).
        direction_fusion: "min", "mean" or "max" over the scan orders (above).

    Known artefact (per direction): the first tokens of each order are predicted from little context (the first
    row in row-major order, the first column in column-major order ...), so each border is hotter in one of the
    four ``direction_*`` maps; the "min" fusion removes it (the opposite order sees that border last), the
    "mean" dilutes it to a quarter.
    """

    name = "varad"
    saved_defaults = {"direction_fusion": "mean"}  # heads saved before the fusion was a setting averaged the orders
    paper = ("Cao, Yao, Luo, Shen, VarAD: Lightweight High-Resolution Image Anomaly Detection via Visual "
             "Autoregressive Modeling, IEEE TII 2025 (arXiv 2412.17263)")
    summary = ("Reads the patch tokens of three backbone layers as sequences in four scan orders (left-to-right "
               "rows, top-to-bottom columns, and both reversed). A small Mamba (selective state-space) model, "
               "trained on normal images only, predicts every token from all the tokens before it. Where the "
               "prediction misses the real token, the image deviates from what normal context implies: the "
               "per-token miss, averaged over orders and layers, is the anomaly map. Cost grows linearly "
               "with the number of tokens, so it suits high-resolution images.")
    # the official README's setting: DINOv2 ViT-S/14 at 512 px (36 x 36 patches: the patch grid covers 504 px,
    # the last 8 px on the right and at the bottom fall outside it)
    paper_inputs = dict(backbone="dinov2_vits14", resize=512, image_size=512)
    presets = {
        "tiny": dict(d_model=16, n_layers=1, d_state=4, epochs=3, batch_size=4, lr=3e-3),
        # expand 1, state 4: a quarter of the cost of expand 2, state 8 at the same AUROC on the demo. The budget is
        # what the model needs: until the held-out loss stops falling by 1% for 5 epochs, at most 100 epochs
        # (issue 25: a fixed 6 epochs, ~20 steps, left a copy-the-previous-token predictor)
        "quick": dict(d_model=32, n_layers=2, d_state=4, expand=1, epochs=100, patience=5, min_delta=0.01,
                      batch_size=4, lr=2e-3),
        # the paper's hyperparameters are unknown: these are our larger defaults, with the same stopping rule
        "paper": dict(d_model=128, n_layers=4, d_state=16, epochs=200, patience=10, min_delta=0.005, batch_size=8,
                      lr=1e-3),
    }
    # sigma: not stated by the paper, the uadlab default (postprocess.DEFAULT_SIGMA)
    score_mode = "top1"  # not stated by the paper: mean of the top 1% of the map

    def __init__(self, backbone: str = OFFLINE_DEFAULT, layers: list[str] | None = None,
                 in_dims: list[int] | None = None, grid_layer: int | None = None,
                 directions: list[str] | None = None, d_model: int = 32, n_layers: int = 2, d_state: int = 8,
                 expand: int = 2, d_conv: int = 4, chunk: int = 32, distance: str = "l2", epochs: int = 10,
                 batch_size: int = 4, lr: float = 2e-3, weight_decay: float = 0.01, patience: int | None = None,
                 min_delta: float = 0.0, normalize: str = "channel", direction_fusion: str = "min",
                 seed: int = 0) -> None:
        super().__init__(backbone)
        directions = list(directions or DIRECTIONS)
        bad = [d for d in directions if d not in DIRECTIONS]
        if bad or not directions:
            raise ValueError(f"directions must be a non-empty subset of {DIRECTIONS}, got {directions}")
        if normalize not in ("none", "channel"):
            raise ValueError(f"normalize must be 'none' or 'channel', got {normalize!r}")
        if direction_fusion not in ("min", "mean", "max"):
            raise ValueError(f"direction_fusion must be 'min', 'mean' or 'max', got {direction_fusion!r}")
        if distance not in ("cosine", "l2"):
            raise ValueError(f"distance must be 'cosine' or 'l2', got {distance!r}")
        self.layers, self.in_dims, self.grid_layer, self.directions = layers, in_dims, grid_layer, directions
        self.d_model, self.n_layers, self.d_state, self.expand = d_model, n_layers, d_state, expand
        self.d_conv, self.chunk, self.distance = d_conv, chunk, distance
        self.epochs, self.batch_size, self.lr, self.weight_decay, self.seed = epochs, batch_size, lr, weight_decay, seed
        self.patience, self.min_delta, self.normalize = patience, min_delta, normalize
        self.direction_fusion = direction_fusion
        self.hier: nn.ModuleList | None = None
        if in_dims is not None:
            self._build(in_dims)

    def _build(self, in_dims: list[int]) -> None:
        """All modules, seeded (their shapes depend on the layers' channel counts)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            nh, d = len(in_dims), self.d_model
            self.hier = nn.ModuleList(Hierarchy(c, d) for c in in_dims)
            self.start = nn.Parameter(torch.randn(nh, len(DIRECTIONS), d) * 0.02)  # learned start tokens
            self.seq_embed = nn.Parameter(torch.randn(nh, len(DIRECTIONS), d) * 0.02)  # which hierarchy/order
            self.model = MambaStack(d, self.n_layers, d_state=self.d_state, expand=self.expand,
                                    d_conv=self.d_conv, chunk=self.chunk)
        self.in_dims = list(in_dims)

    def layers_for(self, spec) -> list[str]:
        if self.layers:
            return list(self.layers)
        if spec.kind == "cnn":
            return ["stage1", "stage2", "stage3"]
        D = spec.depth
        return [f"block{max(0, D // 3 - 1)}", f"block{max(0, 2 * D // 3 - 1)}", f"block{D - 1}"]

    # ---- tokens and predictions ------------------------------------------------------------------------
    def _tokens(self, features: PatchFeatures) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Per hierarchy (B, L, C_h) raw tokens on one (h, w) grid, row-major."""
        layers = list(self.layers or features.layers)
        gi = len(layers) // 2 if self.grid_layer is None else min(self.grid_layer, len(layers) - 1)
        grid = tuple(features.maps[layers[gi]].shape[-2:])
        out = []
        for l in layers:
            m = features.maps[l].float()
            if tuple(m.shape[-2:]) != grid:
                m = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            out.append(m.flatten(2).transpose(1, 2))  # (B, L, C)
        return out, grid

    def _discrepancy(self, pred: torch.Tensor, target: torch.Tensor, err_var: torch.Tensor | None = None) -> torch.Tensor:
        """(..., C) x2 -> (...) per-token distance; with ``err_var`` (C,) each channel's squared error is divided
        by its mean on the normal training tokens."""
        if self.distance == "cosine":
            return 1 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6)
        if err_var is not None:
            return ((pred - target).pow(2) / err_var).mean(-1)
        return (pred - target).pow(2).mean(-1)

    def _predict(self, tokens: list[torch.Tensor], grid: tuple[int, int], rows: torch.Tensor,
                 dirs: torch.Tensor, normalised: bool = False, per_channel: bool = False) -> torch.Tensor:
        """Discrepancy maps of sequences: sequence i reads image rows[i] in order dirs[h, i] (index into DIRECTIONS).

        Args:
            tokens: per hierarchy (B, L, C_h) raw tokens; rows: (S,) image index per sequence; dirs: (nh, S).
            normalised: divide each channel's squared error by ``err_var`` (``normalize="channel"``, scoring).
            per_channel: instead return, per hierarchy, the (C_h,) mean squared error of each channel.
        Returns:
            (nh, S, L) per-token discrepancy in row-major grid order.
        """
        orders = scan_orders(*grid)  # (4, L)
        inputs, targets, perms = [], [], []
        for h, (x, hier) in enumerate(zip(tokens, self.hier)):
            x = hier.standardise(x[rows])  # (S, L, C) the targets, grid order
            perm = orders[dirs[h]]  # (S, L)
            x = torch.gather(x, 1, perm.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (S, L, C) scan order
            z = hier.adapter(x)  # (S, L, d)
            start = self.start[h, dirs[h]].unsqueeze(1)  # (S, 1, d)
            inputs.append(torch.cat([start, z[:, :-1]], 1) + self.seq_embed[h, dirs[h]].unsqueeze(1))  # shift
            targets.append(x)
            perms.append(perm)
        out = self.model(torch.cat(inputs))  # (nh*S, L, d): every hierarchy and order in one batch
        dist = []
        for h, o in enumerate(out.split(len(rows))):
            if per_channel:
                dist.append((self.hier[h].head(o) - targets[h]).pow(2).mean((0, 1)))
                continue
            err_var = self.hier[h].err_var if normalised and self.normalize == "channel" else None
            d_seq = self._discrepancy(self.hier[h].head(o), targets[h], err_var)  # (S, L) in scan order
            dist.append(torch.empty_like(d_seq).scatter_(1, perms[h], d_seq))  # back to grid order
        return dist if per_channel else torch.stack(dist)

    # ---- fit / score ----------------------------------------------------------------------------------
    def _fit(self, features: PatchFeatures, progress, context: FitContext) -> None:
        """Train on normal tokens until the discrepancy on ``val_features`` (held-out normals) stops falling for
        ``patience`` epochs (at most ``epochs``), keeping the best epoch; with ``budget`` (a refit), train
        exactly that many epochs."""
        val_features, budget, checkpoint_dir = context.val_features, context.budget, context.checkpoint_dir
        tokens, grid = self._tokens(features)
        dims = [t.shape[-1] for t in tokens]
        if self.hier is None:
            self._build(dims)
            self.record_config(in_dims=dims)  # so config.json rebuilds the modules
        elif dims != self.in_dims:
            raise ValueError(f"varad: layer widths {dims} differ from in_dims {self.in_dims}")
        for t, hier in zip(tokens, self.hier):  # per-channel statistics of the normal tokens
            flat = t.reshape(-1, t.shape[-1])
            hier.mean.copy_(flat.mean(0))
            hier.std.copy_(flat.std(0).clamp_min(1e-6))

        decay = [p for n, p in self.named_parameters() if p.ndim >= 2 and not n.endswith("A_log")]
        rest = [p for n, p in self.named_parameters() if not (p.ndim >= 2 and not n.endswith("A_log"))]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=self.lr)
        n, nh = len(features), len(tokens)
        allowed = torch.tensor([DIRECTIONS.index(d) for d in self.directions])
        cfg = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, patience=self.patience,
                          min_delta=self.min_delta, grad_clip=1.0, seed=self.seed)
        # cosine from lr to lr/10 over the CAP (not over where patience stops): a refit of ``budget`` epochs on
        # more images then sees the same learning rate at the same epoch as the fit that selected it
        total = self.epochs * math.ceil(n / self.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(s, total) / max(total, 1))))
        val = self._tokens(val_features) if val_features is not None and len(val_features) else None

        def batch_loss(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            dirs = allowed[torch.randint(len(allowed), (nh, len(idx)), generator=g)]  # a random order each
            mine = distributed.local_part(len(idx))  # under torchrun: this rank's part of the batch
            return self._predict(tokens, grid, idx[mine], dirs[:, mine]).mean()

        def val_loss() -> float:  # held-out NORMAL images only, in slices: memory stays flat at any resolution
            return torch.cat([self._maps([t[i:i + self.batch_size] for t in val[0]], val[1]).flatten()
                              for i in range(0, len(val_features), self.batch_size)]).mean().item()

        # a resumable checkpoint next to the cache, per training (data and settings): an interrupted fit resumes
        key = fingerprint(tokens + (val[0] if val is not None else []), self.config())
        ckpt = Path(checkpoint_dir) / f"{self.name}_{key}.safetensors" if checkpoint_dir else None
        record = train(self, opt, batch_loss, n, cfg, val_loss=val_loss if val is not None else None,
                       budget=budget, scheduler=sched, progress=progress, checkpoint=ckpt, key=key)
        with torch.no_grad():  # the normal error per channel (all scan orders), for normalize="channel"
            dirs = torch.tensor([DIRECTIONS.index(d) for d in self.directions])
            sums = [torch.zeros_like(h.err_var) for h in self.hier]
            for part in torch.arange(n).split(self.batch_size):
                rows, d = part.repeat(len(dirs)), dirs.repeat_interleave(len(part))
                for acc, e in zip(sums, self._predict(tokens, grid, rows, d.expand(nh, -1), per_channel=True)):
                    acc += e * len(part)
            for acc, hier in zip(sums, self.hier):
                hier.err_var.copy_((acc / n).clamp_min(1e-8))
        self.fit_record.train = record  # its held-out loss is the scan-order discrepancy

    def refit_budget(self) -> int | None:
        """A refit on all normal images trains the epoch count this fit selected on its held-out images."""
        train = self.fit_record.train
        return train.best_epoch if train is not None and train.best_epoch else None

    def _maps(self, tokens: list[torch.Tensor], grid: tuple[int, int], normalised: bool = False) -> torch.Tensor:
        """(nh, nd, B, h, w) discrepancy maps for every hierarchy and selected direction."""
        B, nd, nh = tokens[0].shape[0], len(self.directions), len(tokens)
        rows = torch.arange(B).repeat(nd)  # (nd*B,) sequence -> image
        dirs = torch.tensor([DIRECTIONS.index(d) for d in self.directions]).repeat_interleave(B)
        d = self._predict(tokens, grid, rows, dirs.expand(nh, -1), normalised=normalised)  # (nh, nd*B, L)
        return d.view(nh, nd, B, *grid)

    def _score(self, features: PatchFeatures) -> AnomalyResult:
        tokens, grid = self._tokens(features)
        maps = self._maps(tokens, grid, normalised=True)  # (nh, nd, B, h, w)
        per_hier = {"min": lambda m: m.amin(1), "mean": lambda m: m.mean(1),
                    "max": lambda m: m.amax(1)}[self.direction_fusion](maps)  # fuse the directions ...
        layers = list(self.layers or features.layers)
        extras = {f"hierarchy_{l}": m for l, m in zip(layers, per_hier)}
        extras.update({f"direction_{d}": m for d, m in zip(self.directions, maps.mean(0))})
        return AnomalyResult(per_hier.mean(0).float(), extras=extras)  # ... then average the hierarchies: (B, h, w)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Heads saved before ``err_var`` existed load with ones there: their scores stay unnormalised."""
        state = dict(state_dict)
        for i, hier in enumerate(self.hier or []):
            state.setdefault(f"hier.{i}.err_var", torch.ones_like(hier.err_var))
        return super().load_state_dict(state, strict=strict, assign=assign)

    def explain(self, features: PatchFeatures) -> dict[str, Any]:
        """Per-hierarchy and per-direction discrepancy maps of one image (token grid, float)."""
        res = self.score(features[0])
        return {k: v[0].numpy() for k, v in res.extras.items()}
