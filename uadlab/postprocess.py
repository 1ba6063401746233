"""From a per-patch map to a heatmap and an image score, on one calibrated scale.

Calibration maps every method's raw values through the distribution of its maps on held-out NORMAL
images: 0 = the median normal value, 1 = the normal limit. For image scores the limit is a split-conformal
order statistic with a finite-sample false-alarm guarantee (``Calibration``); for heatmaps the 99.9th
percentile of normal pixels. A normal image then stays below about 1 and an anomaly rises above it, for
every image and every method alike (no per-image min-max, which would make a normal image light up).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

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


PROTOCOLS = ("split", "monotone", "cross-fit", "none")
DEFAULT_ALPHA = 0.01  # the image false-alarm rate "1.0" promises by default: needs >= 99 held-out normal images
DEFAULT_PIXEL_Q = 0.999  # the pixel scale: 1.0 = the 99.9th percentile of held-out normal pixels


def conformal_rank(n: int, alpha: float) -> int:
    """The rank k = ceil((n + 1)(1 - alpha)) of the split-conformal threshold among ``n`` held-out scores.

    A new exchangeable score exceeds the k-th smallest of the ``n`` with probability at most
    ``1 - k / (n + 1) <= alpha``; k > n means ``n`` images cannot promise ``alpha`` (the smallest rate they
    can promise is ``1 / (n + 1)``, with the largest score as the threshold).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"the false-alarm rate alpha must lie in (0, 1), got {alpha!r}")
    return math.ceil((n + 1) * (1 - alpha) - 1e-9)  # the tolerance keeps (n + 1) * (1 - alpha) = 95.0 at 95


def images_needed(alpha: float) -> int:
    """The fewest held-out normal images that can promise a false-alarm rate of ``alpha``: ceil(1/alpha) - 1."""
    return max(1, math.ceil(1 / alpha - 1e-9) - 1)


_PROTOCOL_TEXT = {
    "split": "scored by the shipped head itself, never trained on them (split conformal: exact)",
    "monotone": ("cross-fitted: each scored by a head fitted without it; the shipped head holds every image, and "
                 "a memory bank that holds more normal images scores no image higher, so the promise holds"),
    "cross-fit": ("cross-fitted: each scored by a head fitted on the other folds; the shipped head, fitted on all, "
                  "is assumed to score normal images no higher (not a theorem for trained heads or coresets)"),
    "none": "none",
}


@dataclass
class Calibration:
    """How raw heatmaps and image scores become one scale, and what its 1.0 promises.

    Image scores: ``calibrated = (raw - score_lo) / (score_hi - score_lo)`` with score_lo = the median and
    score_hi = the SPLIT-CONFORMAL threshold: the k-th smallest of the ``n`` held-out normal scores,
    k = ceil((n + 1)(1 - alpha)). For a new normal image exchangeable with them, P(calibrated score > 1) <=
    alpha (finite-sample, no distribution assumed; ``protocol`` says how the held-out scores were made for the
    head that is shipped). ``n`` images can promise no rate below 1 / (n + 1): with fewer than
    ``images_needed(alpha)`` the threshold is NOT calibrated (``calibrated`` False, ``threshold`` None) and 1.0
    is only the largest held-out score, a unit for display; ``statement`` says so in words.

    Heatmaps: 0 = the median normal pixel, 1 = the ``q`` quantile of held-out normal pixels (rank
    ceil((n + 1) P q) among the n P pooled pixels). Pixels of one image are not independent, so a
    finite-sample promise (the EXPECTED share of a new normal image's pixels above 1 is at most 1 - q) holds
    only when that rank exists, i.e. n >= 1 / (1 - q) - 1 images (``pixel_calibrated``); otherwise the pixel
    scale is the empirical quantile, an estimate. ``n == 0``: nothing held out, both scales are the raw values.
    """

    lo: float = 0.0
    hi: float = 1.0
    score_lo: float = 0.0
    score_hi: float = 1.0
    q: float = DEFAULT_PIXEL_Q
    alpha: float = DEFAULT_ALPHA
    n: int = 0
    calibrated: bool = False
    pixel_calibrated: bool = False
    protocol: str = "none"

    @classmethod
    def fit(cls, normal_maps: torch.Tensor, normal_scores: torch.Tensor, alpha: float = DEFAULT_ALPHA,
            q: float = DEFAULT_PIXEL_Q, protocol: str = "split") -> "Calibration":
        """Fit on heatmaps (n, H, W) and image scores (n,) of held-out NORMAL images.

        Args:
            alpha: the image false-alarm rate 1.0 should promise.
            q: the pixel quantile 1.0 stands for on heatmaps.
            protocol: how the held-out scores relate to the shipped head (``PROTOCOLS``).
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"calibration protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if not 0 < q < 1:
            raise ValueError(f"the pixel quantile q must lie in (0, 1), got {q!r}")
        n = int(normal_scores.numel())
        k = conformal_rank(n, alpha)
        if n == 0:
            return cls(q=q, alpha=alpha, n=0, protocol="none")
        s = normal_scores.double().flatten().sort().values
        slo = float(s[(n - 1) // 2])
        shi = float(s[min(k, n) - 1])  # k > n: the largest, a display unit (not calibrated)
        px = normal_maps.flatten().float()
        sub = px.numel() > 20_000_000
        if sub:  # order statistics of a random subset: bounded memory, the rank guarantee becomes approximate
            px = px[torch.randperm(px.numel(), generator=torch.Generator().manual_seed(0))[:20_000_000]]
        P = px.numel() / n  # pixels per image
        rank = math.ceil((n + 1) * P * q - 1e-6)
        pixel_ok = rank <= px.numel() and not sub
        lo = float(px.kthvalue(max(1, (px.numel() + 1) // 2)).values)
        # too few images for the rank: the empirical q quantile (an estimate)
        hi = float(px.kthvalue(rank if pixel_ok else max(1, math.ceil(q * px.numel()))).values)
        eps = 1e-6 * max(1.0, abs(shi), abs(hi))  # all held-out values equal: a unit, not a blow-up
        return cls(lo, hi if hi > lo else lo + eps, slo, shi if shi > slo else slo + eps, q, alpha, n,
                   k <= n, pixel_ok, protocol)

    def maps(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.lo) / (self.hi - self.lo)

    def scores(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.score_lo) / (self.score_hi - self.score_lo)

    @property
    def smallest_alpha(self) -> float | None:
        """The smallest image false-alarm rate ``n`` held-out images can promise: 1 / (n + 1)."""
        return 1 / (self.n + 1) if self.n else None

    @property
    def promised(self) -> float | None:
        """The bound on P(a new normal image scores above 1.0): 1 - k / (n + 1) <= alpha; None if not calibrated."""
        return 1 - conformal_rank(self.n, self.alpha) / (self.n + 1) if self.calibrated else None

    @property
    def threshold(self) -> float | None:
        """The raw image-score threshold that keeps the promise (None: too few held-out images for ``alpha``)."""
        return self.score_hi if self.calibrated else None

    @property
    def statement(self) -> str:
        """What 1.0 means and promises, in words (shown by the app, the CLI, run.json and the model card)."""
        a = f"{self.alpha:.3g}"
        if self.n == 0:
            return ("Not calibrated: no held-out normal image (one normal image, or none, for this head). Maps "
                    "and scores are the method's raw values; no false-alarm rate can be promised.")
        held = f"{self.n} held-out normal image{'s' if self.n != 1 else ''}"
        how = _PROTOCOL_TEXT[self.protocol]
        if self.calibrated:
            img = (f"Image threshold 1.0 = the {conformal_rank(self.n, self.alpha)}-th smallest score of {held} "
                   f"({how}): a new normal image scores above 1.0 with probability at most {self.promised:.3g} "
                   f"(requested {a}; the smallest rate {self.n} images allow is 1/{self.n + 1} = "
                   f"{self.smallest_alpha:.3g}).")
        else:
            img = (f"Image threshold: cannot be calibrated to a false-alarm rate of {a} with {held}: that needs "
                   f"at least {images_needed(self.alpha)}; {self.n} images promise no rate below 1/{self.n + 1} = "
                   f"{self.smallest_alpha:.3g}. Image scores are in units of the largest held-out normal score "
                   f"(1.0), which is not a calibrated limit.")
        px = f"{100 * self.q:.4g}th percentile of the held-out normal pixels"
        if self.pixel_calibrated:
            pix = (f" Heatmap 1.0 = the {px}: the expected share of a new normal image's pixels above 1.0 is at "
                   f"most {1 - self.q:.3g}.")
        else:
            pix = (f" Heatmap 1.0 = the {px}, an estimate: pixels of one image are not independent, and "
                   f"promising {1 - self.q:.3g} of a new image's pixels needs {images_needed(1 - self.q)} held-out "
                   "images.")
        return img + pix

    def to_dict(self) -> dict:
        """Fields plus the derived promise and statement (for run.json and model cards; ``from_dict`` reads it)."""
        return dict(lo=self.lo, hi=self.hi, score_lo=self.score_lo, score_hi=self.score_hi, q=self.q,
                    alpha=self.alpha, n=self.n, calibrated=self.calibrated, pixel_calibrated=self.pixel_calibrated,
                    protocol=self.protocol, threshold=self.threshold, promised=self.promised,
                    smallest_alpha=self.smallest_alpha, statement=self.statement)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Calibration":
        """A saved calibration (derived entries ignored). One saved before the conformal threshold existed
        promises nothing: it loads as not calibrated (its scale unchanged)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})


def threshold_from_normals(normal_scores: np.ndarray | torch.Tensor, alpha: float = DEFAULT_ALPHA) -> float:
    """The split-conformal threshold of held-out normal scores: a new normal score exceeds it with
    probability at most ``alpha``. Raises when too few scores exist to promise ``alpha``."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("need held-out normal scores to set a threshold")
    k = conformal_rank(s.size, alpha)
    if k > s.size:
        raise ValueError(f"{s.size} held-out normal scores cannot promise a false-alarm rate of {alpha:g}: that "
                         f"needs at least {images_needed(alpha)}")
    return float(s[k - 1])


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The F1-optimal threshold on a labelled VALIDATION split (never call this with test labels)."""
    from sklearn.metrics import precision_recall_curve

    labels = np.asarray(labels).ravel().astype(int)
    if labels.min() == labels.max():
        raise ValueError("the validation split needs both normal and anomalous examples for an F1 threshold")
    p, r, t = precision_recall_curve(labels, np.asarray(scores, dtype=np.float64).ravel())
    f1 = 2 * p * r / np.clip(p + r, 1e-12, None)
    return float(t[int(np.argmax(f1[:-1]))])
