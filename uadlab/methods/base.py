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
from dataclasses import MISSING, dataclass, field, fields
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
from ..postprocess import DEFAULT_SIGMA, Calibration, image_score, to_heatmap
from ..trainer import TrainRecord

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


@dataclass
class FitRecord:
    """What a head's fit did and how the head scores: ``uadlab_info.json`` next to its weights, and the model card.

    One type for every head; the file stays the flat JSON object of earlier versions (``to_dict`` /
    ``from_dict``), so heads saved before this record existed still load.

    Attributes:
        train: the training loop's record for heads trained with ``uadlab.trainer`` (None for the rest).
        details: facts only the method knows (a memory bank's size, SAE statistics ...), under names its own
            module chooses; shown as they are.
        category: the category the head was fitted on (None: not given).
        calibration: the label-free calibration of the run that fitted the head (None: not calibrated yet).
        window: the intensity window the head was fitted through (``Window.to_dict()``; None: 8-bit images).
        metrics: test metrics recorded by ``Run.evaluate`` (scalars only, never curves).
        method, image_size, resize, weights, sigma, score_mode: the geometry and post-processing recorded
            when the head is exported (``uadlab.hub.prepare_head``), so a loaded head scores like its run.
    """

    train: TrainRecord | None = None
    details: dict[str, Any] = field(default_factory=dict)
    category: str | None = None
    calibration: Calibration | None = None
    window: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    method: str | None = None
    image_size: int | None = None
    resize: int | None = None
    weights: str | None = None
    sigma: float | None = None
    score_mode: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object of ``uadlab_info.json`` (details, then the training record, then the rest)."""
        d = {**self.details, **(self.train.to_dict() if self.train is not None else {})}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("train", "details") or v is None or (f.name == "metrics" and not v):
                continue
            d[f.name] = v.to_dict() if isinstance(v, Calibration) else v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "FitRecord":
        """The record of a ``uadlab_info.json`` object, of this version or an earlier one (keys it does not
        know are kept as ``details``)."""
        d = dict(d or {})
        own = {f.name for f in fields(cls)} - {"train", "details"}
        kw = {k: d.pop(k) for k in list(d) if k in own}
        if kw.get("calibration") is not None:
            kw["calibration"] = Calibration.from_dict(kw["calibration"])
        kw["metrics"] = kw.get("metrics") or {}
        names = [f.name for f in fields(TrainRecord)]
        required = [f.name for f in fields(TrainRecord) if f.default is MISSING and f.default_factory is MISSING]
        train = {k: d.pop(k) for k in names if k in d} if all(k in d for k in required) else None
        return cls(train=TrainRecord(**train) if train is not None else None, details=d, **kw)


@dataclass
class FitContext:
    """What a fit may use besides the training features; every field is optional and each method reads
    the ones it needs (the run fills them, a caller of ``Method.fit`` may too).

    Attributes:
        category: the one category of the normal training images (None: several, i.e. multi-class training).
        val_features: features of held-out NORMAL training images, for selection and reports (never test data).
        checkpoint_dir: a folder for resumable training checkpoints (a place on this machine, not a setting).
        budget: train exactly this many epochs, without selection (a refit with ``Method.refit_budget()``).
        references_augmented: the features are of ``reference_augment(samples)``, not of the samples.
        labels: zero-shot heads: the image labels (B,) of the auxiliary labelled set the features are of.
        masks: zero-shot heads: that set's pixel masks (B, H, W) in the network input, None if it has none.
    """

    category: str | None = None
    val_features: PatchFeatures | None = None
    checkpoint_dir: str | None = None
    budget: int | None = None
    references_augmented: bool = False
    labels: torch.Tensor | None = None
    masks: torch.Tensor | None = None


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
        fit_in_one_pass: True for heads whose fit is one pass over the features (memory banks, statistics):
            the run's refit protocol cross-fits them in K = round(1 / val_fraction) folds; heads trained for
            many steps in 2 (``pipeline.n_folds``).
        presets: named hyperparameter sets, e.g. {"quick": {...}, "paper": {...}}.
        saved_defaults: hyperparameters a head saved before they existed takes on loading (the behaviour it was
            saved with), where the constructor's default has since changed.
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
    fit_in_one_pass: ClassVar[bool] = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    paper_inputs: ClassVar[dict[str, Any]] = {}
    saved_defaults: ClassVar[dict[str, Any]] = {}
    sigma: ClassVar[float] = DEFAULT_SIGMA
    smooth_radius: ClassVar[int | None] = None
    score_mode: ClassVar[str] = "top1"

    def __init__(self, backbone: str = OFFLINE_DEFAULT) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("_fitted", torch.zeros((), dtype=torch.bool))
        self.fit_record = FitRecord()  # filled by fit and the run; saved with the head, shown in the model card
        # the hyperparameters config.json holds: the constructor's arguments (captured by the Hub mixin before
        # __init__ runs), plus what a fit learns about the data's shape (``record_config``)
        self._config: dict[str, Any] = dict(getattr(self, "_hub_mixin_config", None) or {})

    # ---- contract ---------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return bool(self._fitted)

    def fit(self, features: PatchFeatures, progress: ProgressFn | None = None,
            context: FitContext | None = None) -> "Method":
        """Learn from the features of normal images (zero-shot methods: of a labelled auxiliary set, whose
        labels and masks are in ``context``)."""
        if len(features) == 0:
            raise ValueError(f"{self.name}: cannot fit on zero images")
        self._fit(features, progress, context if context is not None else FitContext())
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

    def refit_budget(self) -> int | None:
        """The ``FitContext.budget`` of a refit of this method on all normal images: trained heads give the
        epoch count they selected on held-out normals, so the shipped head is the selected one; None for the rest."""
        return None

    def explain(self, features: PatchFeatures) -> dict[str, Any]:
        """Optional: named explanation images (numpy arrays) for ONE image; methods without any return {}."""
        return {}

    def _fit(self, features: PatchFeatures, progress: ProgressFn | None, context: FitContext) -> None:
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
        model = cls(**{**cls.saved_defaults, **model_kwargs})
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
            model.fit_record = FitRecord.from_dict(json.loads(info.read_text()) if info.exists() else None)
        except (ValueError, TypeError) as e:
            raise DataError(f"{where}/uadlab_info.json: damaged ({e})") from None
        return model.eval()

    def _save_pretrained(self, save_directory: Path) -> None:
        super()._save_pretrained(save_directory)
        # config.json from our own record (the mixin writes its private copy only when this file is absent)
        (Path(save_directory) / "config.json").write_text(json.dumps(self.config(), sort_keys=True, indent=2))
        (Path(save_directory) / "uadlab_info.json").write_text(json.dumps(self.fit_record.to_dict(), indent=2, default=str))

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """A model card with backbone, method, hyperparameters, metrics and how to load the head."""
        metrics = kwargs.get("metrics") or self.fit_record.metrics
        example = kwargs.get("example_image")
        window = self.fit_record.window
        cal = kwargs.get("calibration") or self.fit_record.calibration
        calibration = cal.statement if cal is not None else None
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
 f"{window.get('description', window.get('spec'))}{chr(10)}" if window else ""}

## Hyperparameters

```json
{cfg}
```

## Calibration

{calibration or "Not recorded: this head's scores are uncalibrated raw values."}

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
