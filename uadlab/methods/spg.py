"""SPG: Sparse-Projected Guides for prompt-free zero-shot anomaly detection.

"Sparse-Projected Guides" (arXiv 2604.02871, April 2026; official code github riips/SPG). Zero-shot: the head
is trained on an AUXILIARY labelled set (other categories, with pixel masks) and applied to categories it has
never seen. Stage 1 learns a TopK sparse autoencoder (SAE) on frozen patch tokens; stage 2 learns sparse
coefficients over the SAE's dictionary that decode into "normal" and "anomaly" guide vectors; a test patch is
anomalous when it is closer (cosine) to the anomaly guide than to the normal one.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..settings import OFFLINE_DEFAULT
from ..features import PatchFeatures
from ..progress import Progress
from .base import AnomalyResult, Method, register_method

GUIDES = ("global_normal", "global_anomaly", "local_normal", "local_anomaly")  # rows of theta / the guides


# ---- stage 1: TopK sparse autoencoder ------------------------------------------------------------------
class TopKSAE(nn.Module):
    """TopK SAE without biases: z = TopK_k(W_e x) clamped >= 0,  x_hat = z D_hat  (D_hat = unit-norm rows of D).

    Args:
        in_dim: token width d; n_atoms: dictionary size; k: active atoms per token.
    """

    def __init__(self, in_dim: int, n_atoms: int, k: int) -> None:
        super().__init__()
        self.k = min(k, n_atoms)
        d = torch.randn(n_atoms, in_dim) / math.sqrt(n_atoms)
        d = d / (d.norm(dim=1, keepdim=True) + 1e-8)
        self.D = nn.Parameter(d)  # (n_atoms, d) decoder rows = dictionary atoms
        self.W_enc = nn.Parameter(d.clone())  # (n_atoms, d), tied initialisation: W_e = D

    def dictionary(self) -> torch.Tensor:
        """D_hat: (n_atoms, d), every atom of unit norm."""
        return self.D / (self.D.norm(dim=1, keepdim=True) + 1e-8)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc.T  # (N, n_atoms), no encoder bias

    def encode(self, x: torch.Tensor, pre: torch.Tensor | None = None) -> torch.Tensor:
        """(N, d) -> sparse codes (N, n_atoms): the top-k pre-activations, clamped >= 0, the rest 0."""
        pre = self.pre_acts(x) if pre is None else pre
        val, idx = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre).scatter(1, idx, val.clamp_min(0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, d) -> codes z (N, n_atoms), reconstruction x_hat (N, d), pre-activations (N, n_atoms)."""
        pre = self.pre_acts(x)
        z = self.encode(x, pre)
        return z, z @ self.dictionary(), pre

    @torch.no_grad()
    def renormalise(self) -> None:
        """After each optimiser step: decoder rows back to unit norm (in place)."""
        self.D.div_(self.D.norm(dim=1, keepdim=True) + 1e-8)


def auxk_loss(sae: TopKSAE, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor,
              aux_k: int) -> torch.Tensor:
    """AuxK: the top-``aux_k`` DEAD atoms reconstruct the residual e = x - stopgrad(x_hat); MSE (not normalised).

    Gives dead atoms a gradient so that they revive. Zero when no atom is dead.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    masked = pre.masked_fill(~dead, -math.inf)  # (N, n_atoms): only dead atoms compete
    val, idx = masked.topk(min(aux_k, n_dead), dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, idx, val.clamp_min(0))
    e = x - x_hat.detach()
    return (e - z_aux @ sae.dictionary()).pow(2).mean()


# ---- stage 2 losses ----------------------------------------------------------------------------------------
def focal_loss(p: torch.Tensor, gt: torch.Tensor, gamma: float = 2.0, eps: float = 1e-5) -> torch.Tensor:
    """Binary focal loss on probabilities (no alpha): p (B, 2, H, W) = [P_normal, P_anomaly], gt (B, H, W) bool."""
    pt = torch.where(gt, p[:, 1], p[:, 0])  # probability of the true class
    return -((1 - pt).pow(gamma) * torch.log(pt.clamp_min(eps))).mean()


def dice_loss(p: torch.Tensor, gt: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - Dice per image, averaged: p, gt (B, H, W) in [0, 1]."""
    inter = (p * gt).flatten(1).sum(1)
    return (1 - (2 * inter + smooth) / (p.flatten(1).sum(1) + gt.flatten(1).sum(1) + smooth)).mean()


# ---- the method ------------------------------------------------------------------------------------------
@register_method
class SPG(Method):
    """SPG, Sparse-Projected Guides (arXiv 2604.02871): zero-shot, trained on an auxiliary labelled set.

    Stage 1 (SAE): a TopK sparse autoencoder on the patch tokens of the auxiliary images (no encoder bias,
    no decoder bias, unit-norm decoder rows renormalised after each step, tied init W_e = D; loss = MSE +
    AuxK / 32 with AuxK over the top-512 dead atoms; an atom is dead after ``dead_tokens`` tokens without
    firing; Adam lr 1e-3, betas (0.5, 0.999)). Atoms that never fire on the whole training set are masked.

    Stage 2 (guides): backbone and SAE frozen. theta (4, n_atoms), c = ReLU(theta) with dead atoms zeroed,
    guides g = c D_hat = [global-normal, global-anomaly, local-normal, local-anomaly]. Local: s = cos(x_t, g),
    P = softmax(s / T) over (normal, anomaly), T = 0.07, upsampled to the mask size. Loss = CE(global
    cosines, image label) + focal(P, gt) + dice(P_anomaly, gt) + dice(P_normal, 1 - gt) + 0.001 mean ||c||_1;
    Adam lr 0.01, betas (0.5, 0.999); an EMA of theta (every step) is what scoring uses after a fixed number
    of epochs (no checkpoint selection). Sparsity ``sparsity="l1"`` (the official default): no top-k, only the
    L1 term. Map = (P_anomaly + 1 - P_normal) / 2 on the patch grid. Post-processing as the official
    evaluator: Gaussian smoothing sigma = 4 px at the network input size (``sigma``), image score = max of the
    smoothed map (``score_mode = "max"``); the global guides do not affect either.

    Options, deviations and choices (named):
    - ``sparsity="topk"`` is the paper's ablation: top-``guide_k`` coefficients per guide with a
      straight-through estimator, c + stopgrad(hard - c).
    - Image labels only (``masks=None``, e.g. an auxiliary set whose defects are not outlined): OUR extension,
      the official code needs masks. Focal and dice are replaced by a multiple-instance loss on the local
      guides, BCE(max over patches of P_anomaly, image label); the global CE stays. (The global CE alone would
      train only the global guides, which neither the map nor the image score uses.) Expect coarser maps.
    - Global guides use the CLS token when the features have one of the token width (ViT ``norm``), otherwise
      the MEAN-POOLED patch tokens (CNNs have no CLS). As in the paper they do not affect the map.
    - The local maps P are upsampled bilinearly to the mask size (the backbone input), as in the paper, and
      the masks are binarised at 0.5; the paper resizes both to 448 px. ``loss_size`` = N instead computes
      the segmentation losses at N x N (masks area-resized, then binarised): "quick" uses 112 because the
      backward pass of a 224 px bilinear upsampling dominates the CPU time of stage 2.
    - CNN backbones (offline default): tokens are stages 2 and 3, resampled to the stage-2 grid (stride 8:
      28 x 28 at 224 px, the paper's ViT-L/16 grid at 448 px) and concatenated; the paper uses DINOv3
      ViT-L/16 ``norm`` tokens, which is the ViT default here.
    - Dead-atom threshold ``dead_tokens`` counts tokens (as the official code does): 1e7 in "paper", smaller in
      "tiny"/"quick" to match their small data. "quick" uses fewer atoms (512, AuxK 256), 30 SAE epochs, 40
      guide epochs and an EMA decay of 0.99: the demo's auxiliary set has ~50 images, so the paper's 15
      epochs give ~100 steps, in which an EMA at 0.999 would barely leave its initial value.
    """

    name = "spg"
    paper = ("Sparse-Projected Guides for prompt-free zero-shot anomaly detection (SPG), arXiv 2604.02871, 2026; "
             "code: github.com/riips/SPG")
    summary = ("Zero-shot: trained on OTHER categories with labelled defects, never on the target. A sparse "
               "autoencoder first learns a dictionary of 'atoms' (recurring visual patterns) from patch features. "
               "Then two guide vectors, 'normal' and 'anomaly', are learned as sparse mixtures of these atoms so "
               "that patches inside the defect masks point to the anomaly guide. A test patch is as anomalous as "
               "it is closer to the anomaly guide than to the normal one. The few atoms a guide uses can be "
               "shown and located in the image, which explains what the model looks for.")
    zero_shot = True
    paper_inputs = dict(backbone="dinov3_vitl16", resize=448, image_size=448)  # 28 x 28 patches
    # sigma: the shared default 4, scipy gaussian_filter sigma 4 at the input size (official evaluator)
    score_mode = "max"  # image score = max of the smoothed map (official image_score.mode=map)
    presets = {
        "tiny": dict(n_atoms=128, k=16, aux_k=64, sae_epochs=3, guide_epochs=3, dead_tokens=2_000, ema_decay=0.9),
        "quick": dict(n_atoms=512, k=32, aux_k=256, sae_epochs=30, guide_epochs=40, dead_tokens=200_000,
                      ema_decay=0.99, loss_size=112),
        # the official script's values (riips/SPG scripts/run.sh + configs), every one spelled out
        "paper": dict(n_atoms=4096, k=32, aux_k=512, aux_coef=1 / 32, dead_tokens=10_000_000, sae_epochs=50,
                      sae_batch=16, sae_lr=1e-3, sparsity="l1", l1_coef=1e-3, temperature=0.07, focal_gamma=2.0,
                      guide_epochs=15, guide_batch=8, guide_lr=1e-2, ema_decay=0.999, loss_size=None),
    }

    def __init__(self, backbone: str = OFFLINE_DEFAULT, layers: list[str] | None = None,
                 in_dim: int | None = None, n_atoms: int = 4096, k: int = 32, aux_k: int = 512,
                 aux_coef: float = 1 / 32, dead_tokens: int = 10_000_000, sae_epochs: int = 50,
                 sae_batch: int = 16, sae_lr: float = 1e-3, sparsity: str = "l1", guide_k: int = 32,
                 l1_coef: float = 1e-3, temperature: float = 0.07, focal_gamma: float = 2.0,
                 guide_epochs: int = 15, guide_batch: int = 8, guide_lr: float = 1e-2, ema_decay: float = 0.999,
                 loss_size: int | None = None, global_token: str = "auto", seed: int = 0) -> None:
        super().__init__(backbone)
        if sparsity not in ("topk", "l1"):
            raise ValueError(f"sparsity must be 'topk' or 'l1', got {sparsity!r}")
        if global_token not in ("auto", "cls", "mean"):
            raise ValueError(f"global_token must be 'auto', 'cls' or 'mean', got {global_token!r}")
        self.layers, self.in_dim, self.n_atoms, self.k, self.aux_k = layers, in_dim, n_atoms, k, aux_k
        self.aux_coef, self.dead_tokens = aux_coef, dead_tokens
        self.sae_epochs, self.sae_batch, self.sae_lr = sae_epochs, sae_batch, sae_lr
        self.sparsity, self.guide_k, self.l1_coef, self.temperature = sparsity, guide_k, l1_coef, temperature
        self.focal_gamma, self.guide_epochs, self.guide_batch, self.guide_lr = focal_gamma, guide_epochs, guide_batch, guide_lr
        self.ema_decay, self.loss_size, self.global_token, self.seed = ema_decay, loss_size, global_token, seed
        self.sae: TopKSAE | None = None
        if in_dim is not None:
            self._build(in_dim)

    def _build(self, in_dim: int) -> None:
        """SAE, guide coefficients and their EMA, seeded (their width depends on the token width)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.sae = TopKSAE(in_dim, self.n_atoms, self.k)
            self.theta = nn.Parameter(0.1 + 0.01 * torch.randn(len(GUIDES), self.n_atoms))  # (4, n_atoms)
        self.register_buffer("theta_ema", self.theta.detach().clone())  # what scoring uses
        self.register_buffer("alive", torch.ones(self.n_atoms, dtype=torch.bool))  # atoms that ever fired
        self.in_dim = in_dim

    def layers_for(self, spec) -> list[str]:
        if self.layers:
            return list(self.layers)
        return ["stage2", "stage3"] if spec.kind == "cnn" else ["norm"]

    # ---- tokens, coefficients, guides ----------------------------------------------------------------------
    def _tokens(self, features: PatchFeatures) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Patch tokens (B, L, d), the global token (B, d) and the grid (h, w)."""
        x = features.stacked(self.layers or features.layers).float()  # (B, d, h, w)
        grid = tuple(x.shape[-2:])
        tok = x.flatten(2).transpose(1, 2)  # (B, L, d)
        cls = features.cls
        use_cls = cls is not None and cls.shape[-1] == tok.shape[-1] and self.global_token != "mean"
        if self.global_token == "cls" and not use_cls:
            raise ValueError("spg: global_token='cls' but the features have no CLS token of the token width")
        return tok, (cls.float() if use_cls else tok.mean(1)), grid

    def coefficients(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """theta (4, n) -> (c used by the guides, c before top-k); c = ReLU(theta) with dead atoms zeroed."""
        c = F.relu(theta) * self.alive  # (4, n)
        if self.sparsity == "l1":
            return c, c
        val, idx = c.topk(min(self.guide_k, c.shape[1]), dim=1)
        hard = torch.zeros_like(c).scatter(1, idx, val)
        return c + (hard - c).detach(), c  # straight-through: forward = hard top-k, gradient to all of c

    def guides(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """g = c D_hat: (4, d) unit-norm guide vectors, rows in GUIDES order."""
        c, _ = self.coefficients(self.theta_ema if theta is None else theta)
        return F.normalize(c @ self.sae.dictionary().detach(), dim=-1)

    def _probs(self, tok_n: torch.Tensor, g: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Unit tokens (B, L, d), guides (4, d) -> P (B, 2, h, w) = softmax(cos / T) over (normal, anomaly)."""
        s = tok_n @ g[2:].T  # (B, L, 2) cosines to the local guides
        p = torch.softmax(s / self.temperature, dim=-1)
        return p.transpose(1, 2).reshape(p.shape[0], 2, *grid)

    # ---- training ---------------------------------------------------------------------------------------------
    def _fit(self, features: PatchFeatures, progress=None, labels: torch.Tensor | None = None,
             masks: torch.Tensor | None = None, **kw: Any) -> None:
        if labels is None:
            raise ValueError("spg is zero-shot: fit needs labels (B,) (and masks (B, H, W) if any) of an auxiliary "
                             "labelled set")
        tok, glob, grid = self._tokens(features)
        B, L, d = tok.shape
        if labels.shape != (B,) or (masks is not None and (masks.ndim != 3 or masks.shape[0] != B)):
            raise ValueError(f"spg: expected labels ({B},) and masks ({B}, H, W) or None, got {tuple(labels.shape)} "
                             f"and {None if masks is None else tuple(masks.shape)}")
        if self.sae is None:
            self._build(d)
            self.record_config(in_dim=d)  # so config.json rebuilds the modules
        elif d != self.in_dim:
            raise ValueError(f"spg: token width {d} differs from in_dim {self.in_dim}")
        g = torch.Generator().manual_seed(self.seed)
        n_sae = self.sae_epochs * math.ceil(B / self.sae_batch)
        total = n_sae + self.guide_epochs * math.ceil(B / self.guide_batch)
        self.train()
        t0 = time.perf_counter()
        sae_info = self._fit_sae(tok, g, progress, total)
        t1 = time.perf_counter()
        self._fit_guides(tok, glob, grid, labels.float(), None if masks is None else masks.float(), g, progress,
                         n_sae, total)
        self.fit_info.update(aux_images=B, aux_anomalous=int((labels > 0).sum()), tokens=B * L, **sae_info,
                             supervision="image labels only" if masks is None else "pixel masks",
                             sae_s=round(t1 - t0, 2), guide_s=round(time.perf_counter() - t1, 2),
                             top_atoms={k: [[i, round(v, 4)] for i, v in a] for k, a in self.top_atoms(8).items()})

    def _fit_sae(self, tok: torch.Tensor, g: torch.Generator, progress, total: int) -> dict[str, Any]:
        """Stage 1: MSE + aux_coef * AuxK; dead atoms counted in tokens since they last fired."""
        sae = self.sae.requires_grad_(True)
        opt = torch.optim.Adam(sae.parameters(), lr=self.sae_lr, betas=(0.5, 0.999))
        since_fired = torch.zeros(self.n_atoms, dtype=torch.long)  # tokens since each atom last fired
        step, mse = 0, float("nan")
        for _ in range(self.sae_epochs):
            for idx in torch.randperm(len(tok), generator=g).split(self.sae_batch):
                x = tok[idx].reshape(-1, tok.shape[-1])  # (N, d) tokens of a batch of images
                z, x_hat, pre = sae(x)
                loss_mse = (x_hat - x).pow(2).mean()
                dead = since_fired > self.dead_tokens
                loss = loss_mse + self.aux_coef * auxk_loss(sae, x, x_hat, pre, dead, self.aux_k)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sae.renormalise()
                fired = (z.detach() > 1e-3).any(0)
                since_fired += len(x)
                since_fired[fired] = 0
                step, mse = step + 1, loss_mse.item()
                if progress is not None:
                    progress(Progress(step, total, "steps", loss=loss.item()))
        with torch.no_grad():  # atoms that never fire on the whole training set are dead for good
            alive = torch.zeros(self.n_atoms, dtype=torch.bool)
            for x in tok.split(16):
                alive |= (sae.encode(x.reshape(-1, x.shape[-1])) > 0).any(0)
            self.alive.copy_(alive)
            x = tok.reshape(-1, tok.shape[-1])
            fvu = float((sae(x)[1] - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        sae.requires_grad_(False)
        return dict(sae_steps=step, sae_mse=mse, sae_fvu=fvu, alive_atoms=int(alive.sum()))

    def _fit_guides(self, tok: torch.Tensor, glob: torch.Tensor, grid: tuple[int, int], labels: torch.Tensor,
                    masks: torch.Tensor | None, g: torch.Generator, progress, step: int, total: int) -> None:
        """Stage 2: CE on the global guides + focal + dice on the local maps + L1 on c; EMA of theta.

        Without masks (image labels only) the segmentation losses are replaced by the MIL loss
        BCE(max_t P_anomaly(t), image label) on the patch grid.
        """
        tok_n, glob_n = F.normalize(tok, dim=-1), F.normalize(glob, dim=-1)  # frozen: normalise once
        if masks is not None and self.loss_size:  # cheaper: masks area-resized to loss_size x loss_size
            masks = F.interpolate(masks[:, None], size=(self.loss_size,) * 2, mode="area")[:, 0]
        gt_all = None if masks is None else masks > 0.5  # (B, H, W)
        opt = torch.optim.Adam([self.theta], lr=self.guide_lr, betas=(0.5, 0.999))
        first = True
        for _ in range(self.guide_epochs):
            for idx in torch.randperm(len(tok), generator=g).split(self.guide_batch):
                gd = self.guides(self.theta)  # (4, d)
                ce = F.cross_entropy(glob_n[idx] @ gd[:2].T, labels[idx].long())  # global: no temperature
                p = self._probs(tok_n[idx], gd, grid)  # (b, 2, h, w)
                if gt_all is None:  # MIL: an image is as anomalous as its most anomalous patch
                    p_img = p[:, 1].flatten(1).max(1).values.clamp(1e-5, 1 - 1e-5)
                    seg = F.binary_cross_entropy(p_img, labels[idx])
                else:
                    gt = gt_all[idx]
                    p = F.interpolate(p, size=gt.shape[-2:], mode="bilinear", align_corners=False)
                    seg = (focal_loss(p, gt, self.focal_gamma) + dice_loss(p[:, 1], gt.float())
                           + dice_loss(p[:, 0], 1 - gt.float()))
                l1 = self.coefficients(self.theta)[1].abs().sum(1).mean()
                loss = ce + seg + self.l1_coef * l1
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():  # EMA every step; the first step copies (as torch's AveragedModel)
                    if first:
                        self.theta_ema.copy_(self.theta)
                        first = False
                    else:
                        self.theta_ema.lerp_(self.theta, 1 - self.ema_decay)
                step += 1
                if progress is not None:
                    progress(Progress(step, total, "steps", loss=loss.item()))

    # ---- scoring and interpretation --------------------------------------------------------------------------
    def _score(self, features: PatchFeatures) -> AnomalyResult:
        tok, glob, grid = self._tokens(features)
        gd = self.guides()
        p = self._probs(F.normalize(tok, dim=-1), gd, grid)  # (B, 2, h, w)
        amap = (p[:, 1] + 1 - p[:, 0]) / 2  # (B, h, w); equals P_anomaly since P_normal + P_anomaly = 1
        g_prob = torch.softmax(F.normalize(glob, dim=-1) @ gd[:2].T / self.temperature, dim=-1)[:, 1]
        return AnomalyResult(amap.float(), extras={"p_normal": p[:, 0], "p_anomaly": p[:, 1],
                                                   "global_anomaly_prob": g_prob})

    def top_atoms(self, k: int = 8) -> dict[str, list[tuple[int, float]]]:
        """The ``k`` largest coefficients of each (EMA) guide: guide name -> [(atom index, coefficient)]."""
        if self.sae is None:
            raise ValueError("spg: not fitted, no guides yet")
        c, _ = self.coefficients(self.theta_ema)
        out = {}
        for name, row in zip(GUIDES, c.detach()):
            val, idx = row.topk(min(k, len(row)))
            out[name] = [(int(i), float(v)) for i, v in zip(idx, val) if v > 0]
        return out

    @torch.no_grad()
    def explain(self, features: PatchFeatures, n_atoms: int = 4) -> dict[str, Any]:
        """For one image: P_anomaly, P_normal, and where each top local-anomaly atom fires (its SAE code per patch)."""
        features = features[0]
        tok, _, grid = self._tokens(features)
        res = self.score(features)
        z = self.sae.encode(tok[0])  # (L, n_atoms) sparse codes, post-TopK
        out: dict[str, Any] = {"P(anomaly)": res.extras["p_anomaly"][0].numpy(),
                               "P(normal)": res.extras["p_normal"][0].numpy()}
        for atom, coef in self.top_atoms(n_atoms)["local_anomaly"]:
            out[f"anomaly atom {atom} (c={coef:.3f})"] = z[:, atom].view(*grid).numpy()
        return out
