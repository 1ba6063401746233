"""PatchCore: a memory bank of locally aware patch features, greedy coreset, nearest-neighbour scoring.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from ..features import PatchFeatures
from ..layers import cached_index
from .base import AnomalyResult, Method, register_method


def locally_aware(features: PatchFeatures, layers: list[str], patch_size: int = 3, target_dim: int = 1024) -> torch.Tensor:
    """Sec. 3.1: aggregate each position's p x p neighbourhood per layer, align grids, concatenate -> (B, D, h, w).

    Per layer a p x p average over the ZERO-PADDED neighbourhood (the official code unfolds with zero padding
    and adaptive-pools the C*p*p values to C: exactly this mean, padding included, so border patches are
    shrunk towards 0 in training and test alike; averaging over the valid neighbours only cost up to 9 points
    of image AUROC on the demo textures), coarser layers upsampled bilinearly to the
    finest grid, then concatenated; if the concatenation is wider than ``target_dim`` it is average-pooled
    along channels to ``target_dim`` (the official "target_embed_dimension").
    """
    grid = features.select(layers).grid
    maps = []
    for l in layers:
        m = F.avg_pool2d(features.maps[l], patch_size, stride=1, padding=patch_size // 2, count_include_pad=True)
        if tuple(m.shape[-2:]) != tuple(grid):
            m = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
        maps.append(m)
    x = torch.cat(maps, dim=1)  # (B, D, h, w)
    if x.shape[1] > target_dim:
        b, d, h, w = x.shape
        x = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(-1, 1, d), target_dim)
        x = x.reshape(b, h, w, target_dim).permute(0, 3, 1, 2)
    return x.contiguous()


def greedy_coreset(x: torch.Tensor, n: int, proj_dim: int = 128, n_starts: int = 10, seed: int = 0,
                   precision: str = "float16", progress=None) -> torch.Tensor:
    """Approximate greedy coreset (Alg. 1 with the official start): indices of ``n`` rows of ``x`` (N, D).

    A bias-free random linear map to ``proj_dim`` (uniform +-1/sqrt(D), PyTorch's default init), computed in
    float32, is used for selection only. Start: the mean distance to ``n_starts`` random points; then
    repeatedly take the point farthest from the coreset and lower every point's distance to the minimum
    with the new point: one matrix-vector product per selected point, no loop over points.

    ``precision="float16"`` stores the (centred) projected points in half precision for that product, which
    is memory-bound: about 3x faster on a CPU. Its rounding (~5e-4 relative) is far below the projection's
    own distortion (~1/sqrt(proj_dim)); distances are accumulated and compared in float32.
    """
    if precision not in ("float16", "float32"):
        raise ValueError(f"precision must be 'float16' or 'float32', got {precision!r}")
    N, D = x.shape
    n = min(n, N)
    g = torch.Generator().manual_seed(seed)
    if D > proj_dim:
        bound = 1.0 / math.sqrt(D)
        W = torch.empty(D, proj_dim).uniform_(-bound, bound, generator=g)
        z = x @ W  # (N, proj_dim) float32
    else:
        z = x.clone()
    z -= z.mean(0)  # centring keeps ||z||^2 small, so the expansion below loses little precision
    sq = (z * z).sum(1)  # (N,)
    starts = torch.randperm(N, generator=g)[:n_starts]
    # ||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2
    d = torch.stack([(sq - 2 * z @ z[s] + sq[s]).clamp_min_(0).sqrt() for s in starts]).mean(0)
    d = d.square()  # squared distances from here on: the argmax is the same
    zs = z.half() if precision == "float16" else z
    out = torch.empty(n, dtype=torch.long)
    for i in range(n):
        j = int(torch.argmax(d))
        out[i] = j
        dot = (zs @ zs[j]).float()
        torch.minimum(d, dot.mul_(-2.0).add_(sq).add_(sq[j]), out=d)
        if progress is not None and (i % 1000 == 0 or i == n - 1):
            progress(i + 1, n, float(d[j]))
    return out


@register_method
class PatchCore(Method):
    """PatchCore (Roth et al., CVPR 2022).

    Locally aware patch features of mid-level layers (3x3 neighbourhood mean, coarser layer upsampled,
    concatenated), a greedy coreset of ``coreset_ratio`` of all training patches chosen on a random 128-d
    projection, and the Euclidean distance to the nearest memory-bank patch as the anomaly map. The
    image score is the paper's Eq. 7: the largest patch distance s* re-weighted by
    ``1 - softmax`` of the test patch's distances to the ``reweight_neighbours`` nearest bank neighbours of
    its nearest bank patch m* (the official code leaves Eq. 7 out; anomalib uses b = 9).

    Deviations: the coreset's matrix-vector products use the projected points in float16
    (``coreset_precision``; float32 available) for a ~3x faster selection of the same coverage; the patch map uses the Euclidean distance (the official code keeps FAISS's squared
    distance; the ranking is the same); the channel reduction to 1024 applies only when the
    concatenated features are wider (always the case for WideResNet-50, never for EfficientNet-Lite0).
    """

    name = "patchcore"
    paper = "Roth et al., Towards Total Recall in Industrial Anomaly Detection, CVPR 2022"
    summary = ("Stores the locally aware patch features of all normal training images in a memory bank, "
               "thinned to a small coreset that still covers the feature space (greedy farthest-point "
               "selection). A test patch is as anomalous as it is far from its nearest neighbour in the bank; "
               "the image score is the largest patch distance, re-weighted by how isolated that neighbour is.")
    paper_inputs = dict(backbone="wide_resnet50_2", resize=256, image_size=224)  # layer2 + layer3
    presets = {
        "tiny": dict(coreset_ratio=0.1),
        "quick": dict(coreset_ratio=0.1),
        "paper": dict(coreset_ratio=0.1, patch_size=3, target_dim=1024, reweight_neighbours=9),
    }

    def __init__(self, backbone: str = "efficientnet_lite0", layers: list[str] | None = None,
                 coreset_ratio: float = 0.1, patch_size: int = 3, target_dim: int = 1024,
                 proj_dim: int = 128, coreset_precision: str = "float16", reweight_neighbours: int = 9,
                 seed: int = 0) -> None:
        super().__init__(backbone)
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.layers = layers
        self.coreset_ratio = coreset_ratio
        self.patch_size = patch_size
        self.target_dim = target_dim
        self.proj_dim = proj_dim
        self.coreset_precision = coreset_precision
        self.reweight_neighbours = reweight_neighbours
        self.seed = seed
        self.register_buffer("memory_bank", torch.zeros(0, 0))

    def layers_for(self, spec) -> list[str]:
        if self.layers:
            return list(self.layers)
        if spec.kind == "cnn":
            return ["stage2", "stage3"]  # like WideResNet-50's layer2 + layer3: strides 8 and 16
        return [f"block{spec.depth // 2 - 1}", f"block{3 * spec.depth // 4 - 1}"]  # mid-level ViT blocks

    def _embed(self, features: PatchFeatures) -> torch.Tensor:
        return locally_aware(features, self.layers or features.layers, self.patch_size, self.target_dim)  # (B, D, h, w)

    def _fit(self, features: PatchFeatures, progress=None, **kw: Any) -> None:
        t0 = time.perf_counter()
        x = self._embed(features)
        x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # (N, D), N = B*h*w
        n = max(1, int(len(x) * self.coreset_ratio))
        idx = greedy_coreset(x, n, self.proj_dim, seed=self.seed,
                                                          precision=self.coreset_precision, progress=progress) if n < len(x) else torch.arange(len(x))
        self.memory_bank = x[idx].contiguous()
        self.fit_info.update(bank_size=int(n), train_patches=int(len(x)), coreset_s=time.perf_counter() - t0)

    def _score(self, features: PatchFeatures) -> AnomalyResult:
        x = self._embed(features)
        B, D, h, w = x.shape
        q = x.permute(0, 2, 3, 1).reshape(-1, D)
        index = cached_index(self, self.memory_bank, "l2")
        d2, nn = index.search(q, k=1)
        dist = d2[:, 0].sqrt().view(B, h * w)  # (B, hw) Euclidean distance to the nearest bank patch
        nn = nn[:, 0].view(B, h * w)
        # Eq. 7: s = (1 - exp(||m_test* - m*||) / sum_{m in N_b(m*)} exp(||m_test* - m||)) * s*
        star = dist.argmax(1)  # (B,)
        s_star = dist.gather(1, star[:, None])[:, 0]
        b = min(self.reweight_neighbours, len(self.memory_bank))
        if b > 1:
            m_star = self.memory_bank[nn.gather(1, star[:, None])[:, 0]]  # (B, D)
            _, nb = index.search(m_star, k=b)  # N_b(m*), m* itself first
            test_star = q.view(B, h * w, D)[torch.arange(B), star]  # (B, D)
            dn = (self.memory_bank[nb] - test_star[:, None]).norm(dim=-1)  # (B, b)
            weight = 1 - torch.softmax(dn, dim=1)[:, 0]
            score = weight * s_star
        else:
            score = s_star
        return AnomalyResult(dist.view(B, h, w), image_score=score)
