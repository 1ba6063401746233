"""Intensity: the no-learning baseline, how far each pixel's windowed intensity lies from normal ones.

Saase, Wenz, Ganslandt, Groden, Maros, "Simple statistical methods for unsupervised brain anomaly detection
on MRI are competitive to deep learning methods", arXiv 2011.12735, 2020 (code: github vsaase/simpleBAD).
"""
from __future__ import annotations

from typing import Any

import torch

from ..features import PIXELS, PatchFeatures
from ..settings import OFFLINE_DEFAULT
from .base import AnomalyResult, Method, register_method


@register_method
class Intensity(Method):
    """The per-pixel intensity baseline of Saase et al. (2020): no features, no training, only statistics of
    the windowed intensities of the normal training images, so users see what a learned method adds.

    ``mode="zscore"`` (the paper's voxel-wise baseline model): the per-pixel mean mu and standard deviation
    sigma over the aligned training images (in the network's geometry); map = |x - mu| / (sigma + eps), with
    ``eps = min_std`` times the mean sigma so that pixels that never vary (background) do not explode.
    It assumes images are aligned (registered volumes sliced at the same depth, fixed-position scans).
    ``mode="histogram"``: map = -log p(x), p the histogram of all training intensities (``bins`` bins on
    [0, 1], add-one smoothed): rare intensities anywhere (a hyperintense FLAIR lesion) light up; needs no
    alignment. The image score is the mean of the top 1 % of the (smoothed) map, as for every method.

    The method reads the ``pixels`` pseudo-layer: the backbone's input, i.e. the image after the run's
    intensity window, resize and crop; the backbone's network is not run for it.
    """

    name = "intensity"
    paper = ("Saase et al., Simple statistical methods for unsupervised brain anomaly detection on MRI are "
             "competitive to deep learning methods, arXiv 2011.12735, 2020")
    summary = ("No learning: how unusual each pixel's (windowed) intensity is compared with the normal training "
               "images, as a z-score against the per-pixel mean and spread (zscore) or as the rarity of the "
               "intensity in their histogram (histogram). A baseline that tells what learned features add.")
    presets = {
        "tiny": dict(mode="zscore"),
        "quick": dict(mode="zscore"),
        "paper": dict(mode="zscore"),
    }

    def __init__(self, backbone: str = OFFLINE_DEFAULT, mode: str = "zscore", bins: int = 64,
                 min_std: float = 0.1) -> None:
        super().__init__(backbone)
        if mode not in ("zscore", "histogram"):
            raise ValueError(f"mode must be 'zscore' (per-pixel mean/std) or 'histogram', got {mode!r}")
        if bins < 2:
            raise ValueError(f"bins must be at least 2, got {bins}")
        self.mode = mode
        self.bins = bins
        self.min_std = min_std
        self.register_buffer("mean", torch.zeros(0, 0))  # (S, S) per-pixel mean (zscore)
        self.register_buffer("std", torch.zeros(0, 0))  # (S, S) per-pixel std + eps (zscore)
        self.register_buffer("rarity", torch.zeros(0))  # (bins,) -log p per intensity bin (histogram)

    def layers_for(self, spec) -> list[str]:
        return [PIXELS]

    def _fit(self, features: PatchFeatures, progress=None, **kw: Any) -> None:
        x = features.maps[PIXELS][:, 0].float()  # (B, S, S) in [0, 1]
        if self.mode == "zscore":
            self.mean = x.mean(0)
            std = x.std(0, unbiased=False)
            self.std = std + self.min_std * std.mean().clamp_min(1e-6)
        else:
            counts = torch.histc(x, bins=self.bins, min=0.0, max=1.0) + 1.0  # add-one smoothing
            self.rarity = -(counts / counts.sum()).log()
        self.fit_info.update(train_images=len(features))

    def _score(self, features: PatchFeatures) -> AnomalyResult:
        x = features.maps[PIXELS][:, 0].float()  # (B, S, S)
        if self.mode == "zscore":
            if x.shape[-2:] != self.mean.shape:
                raise ValueError(f"{self.name}: images of {tuple(x.shape[-2:])} px, fitted on "
                                 f"{tuple(self.mean.shape)} px; use the run's image size")
            return AnomalyResult((x - self.mean).abs() / self.std)
        idx = (x * self.bins).long().clamp_(0, self.bins - 1)
        return AnomalyResult(self.rarity[idx])
