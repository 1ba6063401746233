"""From a per-patch map to a heatmap and an image score, on one calibrated scale.

Calibration maps every method's raw values through the distribution of its maps on held-out NORMAL
images: 0 = the median normal pixel, 1 = the 99.9th percentile of normal pixels. A normal image then
stays below about 1 and an anomaly rises above it, for every image and every method alike (no
per-image min-max, which would make a normal image light up).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_SIGMA = 4.0  # Gaussian sigma in px of the network input: PatchCore's, AnomalyDINO's, SPG's and Dinomaly's
SCORE_MODES = "top1, topN% (0 < N <= 100), topK (K >= 1), max or mean"


def upsample(patch_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W), bilinear (align_corners=False)."""
    return F.interpolate(patch_map[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def gaussian_smooth(maps: torch.Tensor, sigma: float = DEFAULT_SIGMA, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps per image, reflect padding.

    ``radius`` truncates the kernel (``2 * radius + 1`` taps; default 4 sigma, like scipy's
    ``gaussian_filter``); Dinomaly's official 5x5 kernel with sigma 4 is ``radius=2``.
    """
    if sigma <= 0:
        return maps
    r = max(1, int(math.ceil(4 * sigma))) if radius is None else max(1, int(radius))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(maps.dtype)
    m = maps[:, None]
    pad_h, pad_w = min(r, m.shape[-2] - 1), min(r, m.shape[-1] - 1)
    m = F.pad(m, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else m
    m = F.conv2d(m, k[r - pad_w: r + pad_w + 1].view(1, 1, 1, -1))
    m = F.pad(m, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else m
    m = F.conv2d(m, k[r - pad_h: r + pad_h + 1].view(1, 1, -1, 1))
    return m[:, 0]


def check_score_mode(mode: object) -> str:
    """``mode`` when ``image_score`` knows it; ValueError naming it otherwise."""
    ok = mode in ("top1", "max", "mean")
    if not ok and isinstance(mode, str) and mode.startswith("top"):
        try:
            ok = 0 < float(mode[3:-1]) <= 100 if mode.endswith("%") else int(mode[3:]) >= 1
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(f"score_mode {mode!r}: use {SCORE_MODES}")
    return mode


def image_score(maps: torch.Tensor, mode: str = "top1") -> torch.Tensor:
    """(B, H, W) -> (B,). ``top1`` = mean of the top 1% of pixels (default), ``max``, or ``topK`` = mean of the top K."""
    flat = maps.flatten(1)
    if mode == "max":
        return flat.max(1).values
    if mode == "mean":
        return flat.mean(1)
    if mode.startswith("top") and mode.endswith("%"):
        k = max(1, int(flat.shape[1] * float(mode[3:-1]) / 100))
    elif mode == "top1":
        k = max(1, int(flat.shape[1] * 0.01))
    elif mode.startswith("top"):
        k = min(flat.shape[1], int(mode[3:]))
    else:
        raise ValueError(f"score_mode {mode!r}: use {SCORE_MODES}")
    return flat.topk(k, dim=1).values.mean(1)


def to_heatmap(patch_map: torch.Tensor, size: tuple[int, int], sigma: float = DEFAULT_SIGMA,
               radius: int | None = None) -> torch.Tensor:
    """Upsample then smooth: (B, h, w) raw patch map -> (B, H, W) raw heatmap."""
    return gaussian_smooth(upsample(patch_map, size), sigma, radius)


@dataclass
class Calibration:
    """Affine map of raw heatmap values so that held-out normal images share one scale across methods.

    ``calibrated = (raw - lo) / (hi - lo)`` with lo = median and hi = the ``q`` quantile of normal pixels;
    image scores get the same treatment from the normal image scores. A few held-out images (20% of a
    small training set) cannot show their 99.9th percentile (their maximum would stand in for it, and the
    spread of a handful of near-equal scores blows every test score up to hundreds): below
    ``1 / (1 - q)`` images the quantile is the normal approximation median + z_q * std.
    """

    lo: float = 0.0
    hi: float = 1.0
    score_lo: float = 0.0
    score_hi: float = 1.0
    q: float = 0.999

    @classmethod
    def fit(cls, normal_maps: torch.Tensor, normal_scores: torch.Tensor, q: float = 0.999) -> "Calibration":
        """Fit on heatmaps (B, H, W) and image scores (B,) of held-out NORMAL images."""
        if normal_maps.numel() == 0:
            raise ValueError("calibration needs at least one held-out normal image")
        px = normal_maps.flatten().float()
        if px.numel() > 2_000_000:  # quantile of a random subset: same answer, bounded memory
            px = px[torch.randperm(px.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]
        lo, hi = torch.quantile(px, torch.tensor([0.5, q])).tolist()
        s = normal_scores.double()
        slo = float(s.median())
        if len(s) * (1 - q) >= 1:  # enough images to see the quantile itself
            shi = float(torch.quantile(s, q))
        elif len(s) > 1:
            shi = slo + NormalDist().inv_cdf(q) * float(s.std())
        else:
            shi = slo + (hi - lo)
        return cls(lo, hi if hi > lo else lo + 1e-6, slo, shi if shi > slo else slo + 1e-6, q)

    def maps(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.lo) / (self.hi - self.lo)

    def scores(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.score_lo) / (self.score_hi - self.score_lo)

    def to_dict(self) -> dict:
        return dict(lo=self.lo, hi=self.hi, score_lo=self.score_lo, score_hi=self.score_hi, q=self.q)


def threshold_from_normals(normal_scores: np.ndarray | torch.Tensor, quantile: float = 0.99) -> float:
    """A threshold that lets ``1 - quantile`` of held-out normal scores through as false alarms."""
    s = np.asarray(normal_scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("need held-out normal scores to set a threshold")
    return float(np.quantile(s, quantile))


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The F1-optimal threshold on a labelled VALIDATION split (never call this with test labels)."""
    from sklearn.metrics import precision_recall_curve

    labels = np.asarray(labels).ravel().astype(int)
    if labels.min() == labels.max():
        raise ValueError("the validation split needs both normal and anomalous examples for an F1 threshold")
    p, r, t = precision_recall_curve(labels, np.asarray(scores, dtype=np.float64).ravel())
    f1 = 2 * p * r / np.clip(p + r, 1e-12, None)
    return float(t[int(np.argmax(f1[:-1]))])
