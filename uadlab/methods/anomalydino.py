"""AnomalyDINO: nearest-neighbour search over DINO patch tokens with cosine distance.

Damm et al., "AnomalyDINO: Boosting Patch-based Few-shot Anomaly Detection with DINOv2", WACV 2025.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import affine_transform

from ..backbones import resolve_name
from ..features import PatchFeatures
from ..layers import KNN_MODES, cached_index
from ..settings import OFFLINE_DEFAULT
from .base import AnomalyResult, Method, register_method

# The paper's masking table ("agnostic" preprocessing, official src/utils.py): mask the test image's
# background for these MVTec-AD categories and for every VisA category; never for the other MVTec ones.
MASKED_CATEGORIES = frozenset({
    "capsule", "hazelnut", "pill", "screw", "toothbrush",  # MVTec-AD
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",  # VisA
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
})
ROTATION_ANGLES = tuple(range(0, 360, 45))  # the paper's 8 reference rotations (degrees, counter-clockwise)


def first_component(x: torch.Tensor) -> torch.Tensor:
    """Scores on the first principal component of the rows of ``x`` (N, C), deterministic.

    Eigen-decomposition of the C x C covariance in float64 (no random state, unlike ``torch.pca_lowrank``
    or the official randomized sklearn PCA); sign fixed as scikit-learn >= 1.5 does: the component's entry of
    largest magnitude is positive.
    """
    xc = x.double() - x.double().mean(0)
    _, vecs = torch.linalg.eigh(xc.T @ xc)
    v = vecs[:, -1]  # eigh sorts ascending: the last is the largest eigenvalue's vector
    v = v * torch.sign(v[v.abs().argmax()])
    return (xc @ v).float()


def foreground_mask(tokens: torch.Tensor, threshold: float = 10.0) -> torch.Tensor:
    """The paper's zero-shot masking of one test image: PCA on its own tokens (h, w, C) -> bool (h, w).

    Foreground = first principal component > threshold; if the central crop (20-80% on both axes) is at
    most 35% foreground, -PC1 > threshold is used instead. Then a 3x3 dilation and a 3x3 closing, as the
    official ``cv2.dilate`` / ``cv2.morphologyEx(MORPH_CLOSE)`` with OpenCV's default borders: the image edge
    neither grows the mask (dilation) nor shrinks it (the closing's erosion).
    """
    h, w, c = tokens.shape
    pc = first_component(tokens.reshape(-1, c)).view(h, w)
    fg = pc > threshold
    ch, cw = slice(int(0.2 * h), int(0.8 * h)), slice(int(0.2 * w), int(0.8 * w))
    if fg[ch, cw].float().mean() <= 0.35:
        fg = -pc > threshold
    m = fg[None, None].float()
    m = F.max_pool2d(m, 3, 1, 1)  # dilation (max_pool pads with -inf: the border never grows the mask)
    m = -F.max_pool2d(-F.max_pool2d(m, 3, 1, 1), 3, 1, 1)  # closing = dilation then erosion
    return m[0, 0] > 0.5


def is_dinov2(backbone: str) -> bool:
    """Whether ``backbone`` (a short or timm name) is a DINOv2 ViT: the only ones the official code masks."""
    return "dinov2" in resolve_name(backbone).lower()


def rotate_reflect(image: Image.Image, angle: float) -> Image.Image:
    """Rotate by ``angle`` degrees counter-clockwise about (W/2, H/2) on the same canvas, bilinear, with a
    reflect-101 border: the official OpenCV ``warpAffine(..., INTER_LINEAR, BORDER_DEFAULT)``."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = a.shape[:2]
    t = math.radians(angle)
    c, s = math.cos(t), math.sin(t)
    # output (row, col) -> input (row, col): the inverse rotation about the centre (H/2, W/2)
    mat = np.array([[c, s], [-s, c]])
    centre = np.array([h / 2, w / 2])
    offset = centre - mat @ centre
    out = np.stack([affine_transform(a[..., k], mat, offset, order=1, mode="mirror") for k in range(3)], -1)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


@register_method
class AnomalyDINO(Method):
    """AnomalyDINO (Damm et al., WACV 2025), following the official code (dammsi/AnomalyDINO).

    L2-normalised patch tokens of the normal (reference) images form the memory bank (no coreset); a test
    patch's distance is 1 - cosine similarity to its nearest bank patch (k = 1); the image score is the
    mean of the top 1% patch distances (zeros of masked patches included). The map is upsampled
    bilinearly and smoothed with a Gaussian of sigma 4 (scipy's 4-sigma truncation).

    ``masking``: the paper's zero-shot foreground masking of TEST images (PCA on the image's own tokens;
    masked patches get distance 0; morphology as the official code, see ``foreground_mask``). ``True`` /
    ``False`` force it; ``"auto"`` follows the paper's table (``MASKED_CATEGORIES``: MVTec capsule, hazelnut,
    pill, screw, toothbrush and all of VisA) for the ``category`` the pipeline passes to ``fit``, on DINOv2
    backbones only: the official code turns masking off for every other backbone (its threshold 10 is on
    DINOv2 features; other backbones have other scales). An unknown or missing category means no masking.
    On a custom dataset, ``--param anomalydino.masking=true`` is what the table says for centred objects on
    a plain background.

    ``rotation``: the paper's few-shot augmentation. ``reference_augment(samples)`` returns each reference
    image and its rotations by 45..315 degrees (bilinear, reflect border, before resizing); the run
    extracts their features and fits with ``references_augmented=True``. It is image-space augmentation,
    so it lives with the samples, not the cached features. The paper's "agnostic" protocol rotates the
    references of every category, and so does the ``paper`` preset (8x the bank and its search time).

    ``knn``: the nearest-neighbour search (``layers.knn_index``): ``"exact"`` as the paper (faiss flat),
    ``"hnsw"`` approximate, ``"auto"`` HNSW from ``layers.HNSW_MIN_BANK`` bank patches (the bank grows
    with every reference: 64 Lite0 references at 224 px), exact below; the paper preset searches exactly.

    Deviations: the input is a square center crop (the backbone's geometry); the paper resizes the
    smaller edge to 448 and crops the bottom/right to a multiple of 14, which differs only for non-square
    images (VisA), where the paper sees the whole image. The map is smoothed at the network input
    resolution, not the original image's. With a CNN backbone the tokens are stages 2 and 3 resampled to
    one grid and concatenated (the paper uses DINOv2 only).
    """

    name = "anomalydino"
    paper = "Damm et al., AnomalyDINO: Boosting Patch-based Few-shot Anomaly Detection with DINOv2, WACV 2025"
    summary = ("Keeps every patch token of the normal images as a memory bank. A test patch is as anomalous as "
               "its cosine distance to the most similar normal patch; the image score averages the 1% most "
               "anomalous patches. No training, so it works from a handful of normal images.")
    paper_inputs = dict(backbone="dinov2_vits14", resize=448, image_size=448)  # 32 x 32 patches
    smooth_radius = None  # sigma 4 (the shared default), scipy's gaussian_filter default truncate=4
    presets = {"tiny": {}, "quick": {}, "paper": dict(masking="auto", top_percent=1.0, rotation=True, knn="exact")}

    def __init__(self, backbone: str = OFFLINE_DEFAULT, layers: list[str] | None = None,
                 masking: bool | str = "auto", mask_threshold: float = 10.0, top_percent: float = 1.0,
                 rotation: bool = False, knn: str = "auto") -> None:
        super().__init__(backbone)
        if masking not in (True, False, "auto"):
            raise ValueError(f"masking must be true, false or \"auto\" (the paper's category table), got {masking!r}")
        self.layers = layers
        self.masking = masking
        self.mask_threshold = mask_threshold
        self.top_percent = top_percent
        self.rotation = rotation
        if knn not in KNN_MODES:
            raise ValueError(f"knn must be one of {KNN_MODES}, got {knn!r}")
        self.knn = knn
        self.register_buffer("memory_bank", torch.zeros(0, 0))
        self.register_buffer("mask_test", torch.tensor(masking is True))  # decided at fit for "auto"

    def layers_for(self, spec) -> list[str]:
        if self.layers:
            return list(self.layers)
        return ["stage2", "stage3"] if spec.kind == "cnn" else ["norm"]

    def reference_augment(self, samples: Sequence) -> list:
        """The reference images to fit on: ``samples`` (``data.Sample``: methods see images only through the
        pipeline's samples) and, with ``rotation``, their 7 further rotations."""
        if not self.rotation:
            return list(samples)
        out = []
        for s in samples:
            image = s.load()
            out.append(s)
            out += [replace(s, name=f"{s.name}@rot{a}", path=None, image=rotate_reflect(image, a), mask=None,
                            mask_path=None) for a in ROTATION_ANGLES[1:]]
        return out

    def _tokens(self, features: PatchFeatures) -> torch.Tensor:
        x = features.stacked(self.layers or features.layers)  # (B, C, h, w)
        return F.normalize(x.permute(0, 2, 3, 1), dim=-1)  # (B, h, w, C), unit vectors

    def _fit(self, features: PatchFeatures, progress=None, category: str | None = None,
             references_augmented: bool = False, **kw: Any) -> None:
        if self.rotation and not references_augmented:
            raise ValueError("anomalydino: rotation=True needs the features of reference_augment(samples); fit them "
                             "with references_augmented=True (or set rotation=false)")
        mask = self.masking if self.masking != "auto" else \
            (category or "").lower() in MASKED_CATEGORIES and is_dinov2(self.backbone)
        self.mask_test.fill_(bool(mask))
        t = self._tokens(features)
        self.memory_bank = t.reshape(-1, t.shape[-1]).contiguous()
        cached_index(self, self.memory_bank, "ip", self.knn, progress)  # built now: the fit, not the first score, pays for it
        self.fit_info.update(bank_size=int(len(self.memory_bank)), masking=bool(mask), category=category)

    def _score(self, features: PatchFeatures) -> AnomalyResult:
        t = self._tokens(features)
        B, h, w, C = t.shape
        sim = cached_index(self, self.memory_bank, "ip", self.knn).search(t.reshape(-1, C), k=1)[0][:, 0]
        dist = (1 - sim).clamp_min(0).view(B, h, w)  # ||a - b||^2 / 2 = 1 - cos for unit vectors
        if bool(self.mask_test):
            raw = features.stacked(self.layers or features.layers).permute(0, 2, 3, 1)
            fg = torch.stack([foreground_mask(r, self.mask_threshold) for r in raw])
            dist = dist * fg
        flat = dist.flatten(1)
        k = max(1, int(flat.shape[1] * self.top_percent / 100))  # int(0.01 n) patches, at least one
        return AnomalyResult(dist, image_score=flat.topk(k, dim=1).values.mean(1))
