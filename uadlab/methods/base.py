"""The method contract, the registry, and save / load / push through the Hugging Face Hub.

A method is a ``torch.nn.Module`` with scikit-learn manners: ``__init__`` takes JSON-serialisable
hyperparameters only (the backbone by NAME), ``fit(features) -> self`` learns from the patch features of
normal images, ``score(features) -> AnomalyResult`` returns a per-patch anomaly map. All learned state
lives in parameters or buffers, so one ``model.safetensors`` holds it; ``config.json`` holds the
hyperparameters. Backbone weights are never part of a head.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin, hf_hub_download
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import DataError
from ..settings import OFFLINE_DEFAULT
from ..features import PatchFeatures
from ..progress import ProgressFn
from ..postprocess import DEFAULT_SIGMA, image_score, to_heatmap

if TYPE_CHECKING:
    from ..backbones import BackboneSpec


_REGISTRY: dict[str, type["Method"]] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method available by its ``name`` to ``create_method`` and the app."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type["Method"]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}") from None


def create_method(name: str, **kwargs: Any) -> "Method":
    """Build a registered method, e.g. ``create_method("patchcore", coreset_ratio=0.1)``."""
    return get_method_class(name)(**kwargs)


@dataclass
class AnomalyResult:
    """What ``Method.score`` returns.

    Attributes:
        patch_map: (B, h, w) anomaly score per patch, higher is more anomalous (raw, uncalibrated).
        image_score: optional (B,) score from the method itself; if None, post-processing derives one.
        extras: method-specific tensors (e.g. per-group maps) for explanations.
    """

    patch_map: torch.Tensor
    image_score: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class NotFittedError(RuntimeError):
    pass


class Method(torch.nn.Module, PyTorchModelHubMixin, library_name="uadlab", tags=["anomaly-detection", "uadlab"]):
    """Base class of every method. Subclasses set ``name``, ``paper`` and ``summary`` and implement
    ``_fit`` and ``_score``.

    Attributes:
        name: registry name.
        paper: citation shown in model cards and the app.
        summary: a short "how it works" for the app.
        zero_shot: True when the method trains on an auxiliary labelled set instead of target normals.
        combines_heads: True for heads that combine the calibrated outputs of the run's other heads (the
            ensemble); the run fits and scores them through ``combine``, not through features.
        presets: named hyperparameter sets, e.g. {"quick": {...}, "paper": {...}}.
        paper_inputs: the paper's backbone and input geometry (``backbone``, ``resize``, ``image_size``),
            used by ``--preset paper`` where the user did not choose them; {} when the paper does not say.
        sigma, smooth_radius, score_mode: the method's own post-processing (its paper's choice), used by
            ``heatmap``: Gaussian sigma in pixels of the network input (0 = none), the kernel radius
            (None = 4 sigma) and how an image score is derived from the map when ``_score`` gives none.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    zero_shot: ClassVar[bool] = False
    combines_heads: ClassVar[bool] = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    paper_inputs: ClassVar[dict[str, Any]] = {}
    sigma: ClassVar[float] = DEFAULT_SIGMA
    smooth_radius: ClassVar[int | None] = None
    score_mode: ClassVar[str] = "top1"

    def __init__(self, backbone: str = OFFLINE_DEFAULT) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("_fitted", torch.zeros((), dtype=torch.bool))
        self.fit_info: dict[str, Any] = {}  # filled by fit; written into the model card
        # the hyperparameters config.json holds: the constructor's arguments (captured by the Hub mixin before
        # __init__ runs), plus what a fit learns about the data's shape (``record_config``)
        self._config: dict[str, Any] = dict(getattr(self, "_hub_mixin_config", None) or {})

    # ---- contract ---------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return bool(self._fitted)

    def fit(self, features: PatchFeatures, progress: ProgressFn | None = None, **kwargs: Any) -> "Method":
        """Learn from the features of normal images (or a labelled auxiliary set for zero-shot methods)."""
        if len(features) == 0:
            raise ValueError(f"{self.name}: cannot fit on zero images")
        self._fit(features, progress=progress, **kwargs)
        self._fitted.fill_(True)
        self.eval()
        return self

    @torch.no_grad()
    def score(self, features: PatchFeatures) -> AnomalyResult:
        if not self.is_fitted:
            raise NotFittedError(f"{self.name} is not fitted: call fit(...) or load a trained head first")
        self.eval()
        return self._score(features)

    def heatmap(self, result: AnomalyResult, size: tuple[int, int], sigma: float | None = None,
                score_mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The method's post-processing: raw (B, h, w) patch map -> (B, H, W) heatmap and (B,) image score.

        Bilinear upsampling to ``size``, then the method's smoothing; the image score is the method's own
        (``result.image_score``) or derived from the map by ``score_mode``. ``sigma`` / ``score_mode``
        override the method's choice (None: keep it). Uncalibrated: the run calibrates afterwards.
        """
        sigma = self.sigma if sigma is None else sigma
        maps = to_heatmap(result.patch_map, size, sigma, self.smooth_radius)
        if result.image_score is not None and score_mode is None:
            return maps, result.image_score
        return maps, image_score(maps, score_mode or self.score_mode)

    def layers_for(self, spec: "BackboneSpec") -> list[str]:
        """Backbone layers this method reads (names as in ``uadlab.backbones``); override per method.

        The pipeline asks every selected method, extracts the union once, and hands each method
        ``features.select(its layers)``.
        """
        layers = getattr(self, "layers", None)
        return list(layers) if layers else spec.default_layers()

    def reference_augment(self, samples: list) -> list:
        """The images to fit on, given the normal ``samples``: the samples themselves unless the method
        augments its references in image space (AnomalyDINO's rotations); the run then fits on their
        features with ``references_augmented=True``."""
        return list(samples)

    def refit_kwargs(self) -> dict[str, Any]:
        """What a refit of this method on all normal images takes from this fit (``fit`` keyword arguments):
        trained heads pass the epoch count they selected on held-out normals, so the shipped head is the
        selected one; {} for the rest."""
        return {}

    def explain(self, features: PatchFeatures) -> dict[str, Any]:
        """Optional: named explanation images (numpy arrays) for ONE image; methods without any return {}."""
        return {}

    def _fit(self, features: PatchFeatures, progress: ProgressFn | None = None, **kwargs: Any) -> None:
        raise NotImplementedError

    def _score(self, features: PatchFeatures) -> AnomalyResult:
        raise NotImplementedError

    @classmethod
    def from_preset(cls, preset: str = "quick", **overrides: Any) -> "Method":
        if preset not in cls.presets and preset != "default":
            raise KeyError(f"{cls.name}: unknown preset {preset!r}; known: {', '.join(cls.presets) or 'none'}")
        return cls(**{**cls.presets.get(preset, {}), **overrides})

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def record_config(self, **values: Any) -> None:
        """Constructor arguments a fit derives from the data (channel counts, a grid's dilations): saved in
        config.json, so that loading the head rebuilds its modules before the weights arrive."""
        self._config.update(values)

    # ---- state of variable size (memory banks) ---------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Like torch's, but buffers whose size depends on the data (memory banks) take the saved shape."""
        for key, value in state_dict.items():
            mod_name, _, attr = key.rpartition(".")
            mod = self.get_submodule(mod_name) if mod_name else self
            if attr in mod._buffers and mod._buffers[attr] is not None and mod._buffers[attr].shape != value.shape:
                mod._buffers[attr] = torch.empty_like(value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ---- Hub: safetensors only, never pickle -----------------------------------------------------
    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision=None, cache_dir=None, force_download=False,
                         local_files_only=False, token=None, map_location: str = "cpu", strict: bool = True,
                         **model_kwargs):
        model = cls(**model_kwargs)
        where = Path(model_id).name if os.path.isdir(model_id) else model_id
        if os.path.isdir(model_id):
            path = os.path.join(model_id, "model.safetensors")
            if not os.path.isfile(path):
                raise DataError(f"{where}: no model.safetensors (uadlab loads safetensors only, never pickle "
                                "files such as .bin or .pt)")
        else:
            path = hf_hub_download(repo_id=model_id, filename="model.safetensors", revision=revision,
                                   cache_dir=cache_dir, force_download=force_download, token=token,
                                   local_files_only=local_files_only)
        try:
            model.load_state_dict(load_file(path, device=map_location), strict=strict)
        except (SafetensorError, OSError) as e:
            raise DataError(f"{where}/model.safetensors: truncated or not a safetensors file "
                            f"({e.strerror if isinstance(e, OSError) else e})") from None
        except (RuntimeError, KeyError, ValueError) as e:
            raise DataError(f"{where}/model.safetensors: does not hold a {cls.name} head ({str(e)[:200]})") from None
        info = Path(path).with_name("uadlab_info.json")
        try:
            model.fit_info = json.loads(info.read_text()) if info.exists() else {}
        except ValueError as e:
            raise DataError(f"{where}/uadlab_info.json: damaged ({e})") from None
        return model.eval()

    def _save_pretrained(self, save_directory: Path) -> None:
        super()._save_pretrained(save_directory)
        # config.json from our own record (the mixin writes its private copy only when this file is absent)
        (Path(save_directory) / "config.json").write_text(json.dumps(self.config(), sort_keys=True, indent=2))
        (Path(save_directory) / "uadlab_info.json").write_text(json.dumps(self.fit_info, indent=2, default=str))

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """A model card with backbone, method, hyperparameters, metrics and how to load the head."""
        metrics = kwargs.get("metrics") or self.fit_info.get("metrics") or {}
        example = kwargs.get("example_image")
        cfg = json.dumps(self.config(), indent=2, sort_keys=True)
        rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
        text = f"""---
library_name: uadlab
tags:
- anomaly-detection
- uadlab
- {self.name}
---

# {self.name} anomaly-detection head ({self.backbone})

A trained **{self.name}** head from [uadlab](https://github.com/uadlab/uadlab) on frozen
**{self.backbone}** patch features. The backbone weights are not part of this repository; uadlab loads
them from their own source.

Method: {self.paper or self.name}

{self.summary}
{f"{chr(10)}Intensity window (DICOM, NIfTI, 16-bit images; fitted on the training images): "
 f"{self.fit_info['window'].get('description', self.fit_info['window'].get('spec'))}{chr(10)}" if self.fit_info.get("window") else ""}

## Hyperparameters

```json
{cfg}
```

## Metrics

| metric | value |
|---|---|
{rows or "| (none recorded) | |"}

{f"![example heatmap]({example})" if example else ""}

## How to load

```python
from uadlab.methods import get_method_class
from uadlab.backbones import create_backbone

head = get_method_class("{self.name}").from_pretrained("<repo-id or folder>")
backbone = create_backbone(head.backbone)
result = head.score(backbone.extract([image]))
```
"""
        return ModelCard(text)
