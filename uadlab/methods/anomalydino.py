"""AnomalyDINO: nearest-neighbour search over DINO patch tokens with cosine distance.

Damm et al., "AnomalyDINO: Boosting Patch-based Few-shot Anomaly Detection with DINOv2", WACV 2025.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..features import PatchFeatures
from ..layers import cached_index
from .base import AnomalyResult, Method, register_method


def foreground_mask(tokens: torch.Tensor, threshold: float = 10.0) -> torch.Tensor:
    """The paper's zero-shot masking of one test image: PCA on its own tokens (h, w, C) -> bool (h, w).

    Foreground = first principal component > threshold; if the central crop (20-80% on both axes) is at
    most 35% foreground, the sign is flipped. Then a 3x3 dilation and a 3x3 closing.
    """
    h, w, c = tokens.shape
    x = tokens.reshape(-1, c)
    x = x - x.mean(0)
    _, _, v = torch.pca_lowrank(x, q=1, center=False)
    pc = (x @ v[:, 0]).view(h, w)
    fg = pc > threshold
    ch, cw = slice(int(0.2 * h), int(0.8 * h)), slice(int(0.2 * w), int(0.8 * w))
    if fg[ch, cw].float().mean() <= 0.35:
        fg = -pc > threshold
    m = fg[None, None].float()
    m = F.max_pool2d(m, 3, 1, 1)  # dilation
    m = -F.max_pool2d(-F.max_pool2d(m, 3, 1, 1), 3, 1, 1)  # closing = dilation then erosion
    return m[0, 0] > 0.5


@register_method
class AnomalyDINO(Method):
    """AnomalyDINO (Damm et al., WACV 2025).

    L2-normalised patch tokens of the normal images form the memory bank (no coreset); a test patch's
    distance is 1 - cosine similarity to its nearest bank patch (k = 1); the image score is the mean of
    the top 1% patch distances. Optional zero-shot foreground masking (PCA, as in the paper) zeroes the
    distances of background patches.

    Deviations: the paper's rotation augmentation of the reference images is image-space augmentation
    and is not applied (features come from the cache); with a CNN backbone the tokens are stages 2 and 3
    resampled to one grid and concatenated (the paper uses DINOv2 only).
    """

    name = "anomalydino"
    paper = "Damm et al., AnomalyDINO: Boosting Patch-based Few-shot Anomaly Detection with DINOv2, WACV 2025"
    summary = ("Keeps every patch token of the normal images as a memory bank. A test patch is as anomalous as "
               "its cosine distance to the most similar normal patch; the image score averages the 1% most "
               "anomalous patches. No training, so it works from a handful of normal images.")
    paper_inputs = dict(backbone="dinov2_vits14", resize=448, image_size=448)  # 32 x 32 patches
    presets = {"tiny": {}, "quick": {}, "paper": dict(masking=False, top_percent=1.0)}

    def __init__(self, backbone: str = "efficientnet_lite0", layers: list[str] | None = None,
                 masking: bool = False, mask_threshold: float = 10.0, top_percent: float = 1.0) -> None:
        super().__init__(backbone)
        self.layers = layers
        self.masking = masking
        self.mask_threshold = mask_threshold
        self.top_percent = top_percent
        self.register_buffer("memory_bank", torch.zeros(0, 0))

    def layers_for(self, spec) -> list[str]:
        if self.layers:
            return list(self.layers)
        return ["stage2", "stage3"] if spec.kind == "cnn" else ["norm"]

    def _tokens(self, features: PatchFeatures) -> torch.Tensor:
        x = features.stacked(self.layers or features.layers)  # (B, C, h, w)
        return F.normalize(x.permute(0, 2, 3, 1), dim=-1)  # (B, h, w, C), unit vectors

    def _fit(self, features: PatchFeatures, progress=None, **kw: Any) -> None:
        t = self._tokens(features)
        self.memory_bank = t.reshape(-1, t.shape[-1]).contiguous()
        self.fit_info.update(bank_size=int(len(self.memory_bank)))

    def _score(self, features: PatchFeatures) -> AnomalyResult:
        t = self._tokens(features)
        B, h, w, C = t.shape
        sim = cached_index(self, self.memory_bank, "ip").search(t.reshape(-1, C), k=1)[0][:, 0]
        dist = (1 - sim).clamp_min(0).view(B, h, w)  # ||a - b||^2 / 2 = 1 - cos for unit vectors
        if self.masking:
            raw = features.stacked(self.layers or features.layers).permute(0, 2, 3, 1)
            fg = torch.stack([foreground_mask(r, self.mask_threshold) for r in raw])
            dist = dist * fg
        flat = dist.flatten(1)
        k = max(1, int(flat.shape[1] * self.top_percent / 100))
        return AnomalyResult(dist, image_score=flat.topk(k, dim=1).values.mean(1))
