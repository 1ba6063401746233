"""Extract once, fit many: the pipeline that the CLI, the benchmark and the app share.

    dataset --Backbone (through the FeatureCache)--> PatchFeatures
            --> Method.fit on normal train images --> calibrate on held-out normal images
            --> score test images --> calibrated heatmaps + image scores --> metrics

A ``Run`` is saved as a folder: ``run.json`` (settings, calibration, metrics) and one sub-folder per
method written by ``save_pretrained`` (config.json + model.safetensors + model card).
"""
from __future__ import annotations

import inspect
import json
import os
import random
import resource
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics as M
from .backbones import Backbone, backbone_spec, shared_backbone
from .data import Dataset, Sample
from .errors import DataError
from .features import FeatureCache, PatchFeatures
from .fsio import write_atomic
from .medical import Window
from .methods import Method, get_method_class, list_methods
from .postprocess import Calibration, check_score_mode, upsample
from .progress import Progress, ProgressFn, Stages
from .settings import DEFAULT_IMAGE_SIZE, OFFLINE_DEFAULT, check_side, feature_cache_dir

default_cache_dir = feature_cache_dir  # the feature cache's default folder (``UADLAB_CACHE``)


@dataclass(frozen=True)
class Inputs:
    """What a head's features come from: a backbone and the input geometry it sees (the shorter image side
    resized to ``resize``, then a centre crop of ``image_size``; ``resize=None``: no crop). Checked when built."""

    backbone: str
    image_size: int
    resize: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone.strip():
            raise ValueError(f"backbone {self.backbone!r}: give a backbone name such as {OFFLINE_DEFAULT}")
        object.__setattr__(self, "image_size", check_side("image_size", self.image_size))
        if self.resize is not None:
            object.__setattr__(self, "resize", check_side("resize", self.resize))
            if self.resize < self.image_size:
                raise ValueError(f"resize {self.resize} px is smaller than image_size {self.image_size} px: the "
                                 "centre crop must fit inside the resized image")

    @property
    def view_fraction(self) -> float:
        """The share of the image's shorter side that the network sees: whatever the aspect ratio, the view is
        the centred square of this side (``Backbone.view_box``)."""
        return self.image_size / (self.resize or self.image_size)

    def describe(self) -> str:
        return f"{self.backbone} at {self.image_size} px" + (f" (resize {self.resize})" if self.resize else "")


CALIBRATION_MODES = ("refit", "holdout")
PRESETS = ("quick", "paper", "tiny")  # what the CLI and the app offer; a method may know more ("default")
WEIGHT_SOURCES = ("default", "hub", "packaged", "random")  # else a weights file (of one backbone)


def _check_methods(methods: Any) -> list[str]:
    """The method names as a list; ValueError naming the unknown or repeated ones."""
    if isinstance(methods, str) or not isinstance(methods, (list, tuple)) or not methods:
        raise ValueError(f"methods {methods!r}: give a non-empty list of method names ({', '.join(list_methods())})")
    unknown = [m for m in methods if m not in list_methods()]
    if unknown:
        raise ValueError(f"methods: unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(list_methods())}")
    if len(set(methods)) < len(methods):
        raise ValueError(f"methods {list(methods)}: each method once")
    return list(methods)


@dataclass
class RunConfig:
    """Settings of one training run (JSON-serialisable; a token is never part of it), checked when built:
    the CLI, the app and the Python API all go through this one validation, and an error names the setting
    and its bad value.

    ``backbone``, ``image_size`` and ``resize`` are the run's main inputs: every method's, unless
    ``method_inputs`` gives a method its own (``--preset paper``: each method its paper's backbone and
    geometry). Heatmaps are shown in the main geometry.

    ``calibration`` says how the label-free calibration is estimated without costing the heads data:

    - ``"refit"`` (default): fit each head on ``1 - val_fraction`` of the normal images, calibrate it on the
      held-out rest, then fit it again on ALL normal images and keep that calibration. The numbers come
      from a head fit on every normal image (as in the papers and anomalib); the cost is one extra fit on
      ``1 - val_fraction`` of the data per head (memory banks: seconds; trained heads: twice the steps).
    - ``"holdout"``: fit on ``1 - val_fraction`` only and calibrate on the rest (cheaper; the heads then
      see fewer images than a paper's protocol).

    Zero-shot heads never see the target's normal images, so they calibrate on all of them. ``sigma`` and
    ``score_mode`` override every method's own post-processing (None: each method's paper choice).
    ``window`` is the intensity window of DICOM, NIfTI and 16-bit images (a ``medical.Window``; a string is
    parsed by ``Window.parse``), fitted on the normal training images and applied alike to every image.
    """

    backbone: str = OFFLINE_DEFAULT
    methods: list[str] = field(default_factory=lambda: ["patchcore", "anomalydino"])
    preset: str = "quick"
    image_size: int = DEFAULT_IMAGE_SIZE
    resize: int | None = None
    weights: str = "default"
    val_fraction: float = 0.2
    calibration: str = "refit"
    seed: int = 0
    sigma: float | None = None
    score_mode: str | None = None
    method_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    window: Window = field(default_factory=Window)
    method_inputs: dict[str, Inputs] = field(default_factory=dict)

    def __post_init__(self) -> None:
        main = Inputs(self.backbone, self.image_size, self.resize)
        self.image_size, self.resize = main.image_size, main.resize
        self.methods = _check_methods(self.methods)
        if not isinstance(self.preset, str):
            raise ValueError(f"preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        for m in self.methods:
            known = get_method_class(m).presets
            if known and self.preset not in known and self.preset != "default":
                raise ValueError(f"preset {self.preset!r}: {m} knows {', '.join(known)}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction {self.val_fraction!r}: give the share of normal images held out for "
                             "calibration, between 0 and 1 (e.g. 0.2)")
        if self.calibration not in CALIBRATION_MODES:
            raise ValueError(f"calibration must be one of {CALIBRATION_MODES}, got {self.calibration!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed {self.seed!r}: give a whole number >= 0")
        if self.sigma is not None and (isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float))
                                       or not 0 < self.sigma < float("inf")):
            raise ValueError(f"sigma {self.sigma!r}: give the Gaussian sigma in px (> 0), or None for each "
                             "method's own smoothing")
        if self.score_mode is not None:
            check_score_mode(self.score_mode)
        if not isinstance(self.weights, str) or not self.weights.strip():
            raise ValueError(f"weights {self.weights!r}: use default, hub, packaged, random or a file path")
        if self.window is None or isinstance(self.window, str):
            self.window = Window.parse(self.window)
        elif isinstance(self.window, dict):
            self.window = Window.from_dict(self.window)
        elif not isinstance(self.window, Window):
            raise ValueError(f"window {self.window!r}: give a medical.Window or its setting such as 'auto'")
        self._check_method_kwargs()
        self._check_method_inputs()

    def _check_method_kwargs(self) -> None:
        if not isinstance(self.method_kwargs, dict) or not all(isinstance(v, dict) for v in self.method_kwargs.values()):
            raise ValueError(f"method_kwargs {self.method_kwargs!r}: give {{method: {{hyperparameter: value}}}}")
        stray = set(self.method_kwargs) - set(self.methods)
        if stray:
            raise ValueError(f"hyperparameters given for {sorted(stray)}, which are not among the methods "
                             f"{self.methods}")
        for name, kw in self.method_kwargs.items():
            accepted = set(inspect.signature(get_method_class(name).__init__).parameters) - {"self", "backbone"}
            unknown = set(kw) - accepted
            if unknown:
                raise ValueError(f"{name}: unknown hyperparameters {sorted(unknown)}; known: "
                                 f"{', '.join(sorted(accepted))}")

    def _check_method_inputs(self) -> None:
        if not isinstance(self.method_inputs, dict):
            raise ValueError(f"method_inputs {self.method_inputs!r}: give {{method: Inputs}}")
        stray = set(self.method_inputs) - set(self.methods)
        if stray:
            raise ValueError(f"inputs given for {sorted(stray)}, which are not among the methods {self.methods}")
        out = {}
        for name, inp in self.method_inputs.items():
            if isinstance(inp, dict):
                try:
                    inp = Inputs(**inp)
                except TypeError:
                    raise ValueError(f"{name}: inputs {inp!r}: give backbone, image_size and resize") from None
            if not isinstance(inp, Inputs):
                raise ValueError(f"{name}: inputs {inp!r}: give an Inputs(backbone, image_size, resize)")
            out[name] = inp
        self.method_inputs = out
        backbones = {i.backbone for i in self.inputs_list()}
        if self.weights not in WEIGHT_SOURCES and len(backbones) > 1:
            raise ValueError(f"weights {self.weights!r}: a weights file fits one backbone and this run has "
                             f"{len(backbones)} ({', '.join(sorted(backbones))})")

    # ---- what each method sees ----------------------------------------------------------------------------
    @property
    def main_inputs(self) -> Inputs:
        """The run's own backbone and geometry (the heatmaps of every method are shown in it)."""
        return Inputs(self.backbone, self.image_size, self.resize)

    def inputs_of(self, method: str) -> Inputs:
        """The backbone and geometry of ``method``'s features."""
        return self.method_inputs.get(method) or self.main_inputs

    def inputs_list(self) -> list[Inputs]:
        """The distinct inputs of the run's methods, in method order."""
        return list(dict.fromkeys(self.inputs_of(m) for m in self.methods))

    def subset(self, methods: Sequence[str]) -> "RunConfig":
        """These settings for some of the methods (their hyperparameters and inputs; the main inputs become the
        first method's, so that no other backbone is loaded for them)."""
        main = self.inputs_of(methods[0])
        return replace(self, methods=list(methods), backbone=main.backbone, image_size=main.image_size,
                       resize=main.resize, method_kwargs={m: v for m, v in self.method_kwargs.items() if m in methods},
                       method_inputs={m: self.inputs_of(m) for m in methods if self.inputs_of(m) != main})

    def describe_inputs(self) -> str:
        """One line per method: its backbone and geometry."""
        return "\n".join(f"{m}: {self.inputs_of(m).describe()}" for m in self.methods)

    # ---- JSON ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (``window`` as its setting: the fitted window is kept by the run)."""
        d = asdict(self)
        d["window"] = self.window.spec
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """The settings of a saved run.json (settings that a newer or older uadlab does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def resolve(cls, methods: Sequence[str], preset: str = "quick", backbone: str | None = None,
                image_size: int | None = None, resize: int | None = None, **settings: Any) -> "RunConfig":
        """The settings of a run from what a user chose (None = not chosen): the ONE place where a preset
        brings its backbones and input geometries, for the CLI, the app and the Python API alike.

        With ``preset="paper"`` every method gets its paper's backbone and geometry (``paper_inputs``, e.g.
        Dinomaly: DINOv2-reg ViT-B/14, resize 448, crop 392; AnomalyDINO: DINOv2 ViT-S/14 at 448), so a run
        may hold several backbones; a backbone the user chose serves every method (with the paper's geometry
        where it is that paper's backbone), a size the user chose serves every method. Methods whose paper
        names no inputs (ensemble, intensity) get the run's main inputs: those of the first method that has
        paper inputs, else the offline default backbone at ``DEFAULT_IMAGE_SIZE``. Nothing falls back
        silently: a backbone that cannot be loaded here fails with its reason when the run loads it.
        """
        methods = _check_methods(list(methods) if isinstance(methods, (list, tuple)) else methods)
        given = {k: v for k, v in dict(backbone=backbone, image_size=image_size, resize=resize).items() if v is not None}
        chosen = cls(methods=methods, preset=preset, **given).main_inputs  # what was not chosen: the defaults
        per: dict[str, Inputs] = {}
        for m in methods:
            paper = get_method_class(m).paper_inputs if preset == "paper" else {}
            if not paper:
                continue
            name = backbone or paper["backbone"]
            if image_size is not None:  # the user's size wins over the paper's geometry
                per[m] = Inputs(name, image_size, resize)
            elif name == paper["backbone"]:
                per[m] = Inputs(name, paper["image_size"], resize or paper.get("resize"))
            else:
                per[m] = chosen
        main = next(iter(per.values()), chosen)
        return cls(backbone=main.backbone, methods=methods, preset=preset, image_size=main.image_size,
                   resize=main.resize, method_inputs={m: i for m, i in per.items() if i != main}, **settings)


def to_geometry(maps: torch.Tensor, src: Inputs, dst: Inputs) -> torch.Tensor:
    """(B, S, S) heatmaps in ``src``'s view -> (B, S', S') in ``dst``'s view of the same images.

    Both views are centred squares of the image (``Inputs.view_fraction`` of its shorter side), so the map is
    scaled about the centre and resampled bilinearly; where ``dst`` sees more than ``src`` did, the border
    values of ``src`` extend outwards (nothing was seen there).
    """
    n = dst.image_size
    if src.view_fraction == dst.view_fraction:
        return maps if maps.shape[-1] == n else upsample(maps, (n, n))
    t = ((torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1) * (dst.view_fraction / src.view_fraction)
    gy, gx = torch.meshgrid(t, t, indexing="ij")
    grid = torch.stack([gx, gy], -1).expand(len(maps), n, n, 2)  # (B, n, n, (x, y)) in src's [-1, 1]
    return F.grid_sample(maps[:, None].float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=False)[:, 0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


CURVES = ("curves", "pixel_curves")  # curve points in Run.evaluate's results: plotted, never recorded as metrics


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit, held-out) indices: ``val_fraction`` of ``n`` normal images (at least one) held out for calibration.

    With one image nothing can be held out: both lists are [0] (calibrated on the training image itself).
    """
    if n < 2:
        return list(range(n)), list(range(n))
    idx = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    return sorted(int(i) for i in idx[n_val:]), sorted(int(i) for i in idx[:n_val])


def split_normals(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``val_fraction`` of the normal training images (at least one) for calibration."""
    fit_i, val_i = split_indices(len(samples), val_fraction, seed)
    return [samples[i] for i in fit_i], [samples[i] for i in val_i]


def masks_at(backbone: Backbone, samples: Sequence[Sample]) -> np.ndarray | None:
    """Ground-truth masks in the network's geometry, (N, S, S) uint8; normal images without a mask are 0.

    None when any anomalous image lacks a mask (pixel metrics are then missing, not zero).
    """
    out = []
    for s in samples:
        m = s.load_mask()
        if m is None:
            if s.label == 1:
                return None
            out.append(np.zeros((backbone.image_size, backbone.image_size), np.uint8))
        else:
            out.append(backbone.mask_transform(m))
    return np.stack(out) if out else None


def head_megabytes(method: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in method.state_dict().values()) / 1e6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Scored:
    """Calibrated output of one method on a list of images."""

    scores: np.ndarray  # (N,) calibrated image scores
    maps: np.ndarray  # (N, S, S) float32 calibrated heatmaps
    head_ms: list[float]  # per-image scoring time of the head (an ensemble's: combining its members' maps)


class Run:
    """Trained heads on one dataset, with their calibrations; each head reads the features of its own
    backbone and geometry (``RunConfig.inputs_of``), extracted once per backbone through the feature cache.

    Args:
        config: the run settings.
        workdir: where the run is saved (``None``: not saved).
        cache: the feature cache (default: ``settings.feature_cache_dir()``, under ``UADLAB_CACHE``).
    """

    def __init__(self, config: RunConfig, workdir: str | os.PathLike | None = None,
                 cache: FeatureCache | None = None, token: str | None = None,
                 heads: dict[str, Method] | None = None) -> None:
        self.config = config
        self.run_id = uuid.uuid4().hex[:12]
        self.dir = Path(workdir) / self.run_id if workdir is not None else None
        self.cache = cache or FeatureCache(default_cache_dir())
        self.heads: dict[str, Method] = {}
        self.calibration: dict[str, Calibration] = {}
        self.info: dict[str, Any] = {"fit_s": {}, "metrics": {}}
        self.meta: dict[str, Any] = {}  # what the caller records with the run (data source, evaluation, ...)
        self._token = token  # used for this process only; never saved
        self._backbones: dict[Inputs, Backbone] = {}
        self.window = config.window  # fitted by fit; restored by load / from_head
        if heads is None:
            self.build_heads()
        else:  # trained heads (a saved run, a head from the Hub)
            for name, head in heads.items():
                if not head.combines_heads and head.backbone != config.inputs_of(name).backbone:
                    raise ValueError(f"{name}: the head was trained on {head.backbone}, the run's settings say "
                                     f"{config.inputs_of(name).backbone}")
            self.heads = dict(heads)

    # ---- construction ------------------------------------------------------------------------------
    def build_heads(self) -> None:
        for name in self.config.methods:
            self.heads[name] = self._new_head(name)
        for head in self.heads.values():
            if head.combines_heads:
                head.check_members(self.heads)

    def _new_head(self, name: str) -> Method:
        """A fresh head of ``name`` with the run's preset, hyperparameters and backbone (checked by RunConfig)."""
        cls = get_method_class(name)
        kw = {**self.config.method_kwargs.get(name, {}), "backbone": self.config.inputs_of(name).backbone}
        return cls.from_preset(self.config.preset, **kw) if cls.presets else cls(**kw)

    @property
    def backbone(self) -> Backbone:
        """The backbone of the run's main inputs: the geometry every heatmap is shown in (views, masks)."""
        return self._backbone_at(self.config.main_inputs)

    def backbone_of(self, name: str) -> Backbone:
        """The backbone whose features head ``name`` reads."""
        return self._backbone_at(self.config.inputs_of(name))

    def _backbone_at(self, inputs: Inputs) -> Backbone:
        """One shared backbone per inputs, with the union of the layers its heads read."""
        if inputs not in self._backbones:
            spec = backbone_spec(inputs.backbone, inputs.image_size)
            layers: list[str] = []
            for n, h in self.heads.items():
                if self.config.inputs_of(n) == inputs:
                    layers += [l for l in h.layers_for(spec) if l not in layers]
            self._backbones[inputs] = shared_backbone(inputs.backbone, layers, inputs.image_size, inputs.resize,
                                                      self.config.weights, self._token)
        return self._backbones[inputs]

    def features(self, samples: Sequence[Sample], progress: ProgressFn | None = None,
                 inputs: Inputs | None = None) -> PatchFeatures:
        """Features of ``samples`` through ``inputs``' backbone (default: the run's main inputs)."""
        bb = self._backbone_at(inputs or self.config.main_inputs)
        return self.cache.extract(bb, self.window.bind(samples), progress=progress)

    def head_features(self, name: str, samples: Sequence[Sample]) -> PatchFeatures:
        """The features head ``name`` reads of ``samples`` (its backbone, its layers)."""
        head = self.heads[name]
        return self.features(samples, inputs=self.config.inputs_of(name)).select(
            head.layers_for(self.backbone_of(name).spec))

    def _select(self, name: str, feats: "dict[Inputs, PatchFeatures]") -> PatchFeatures:
        return feats[self.config.inputs_of(name)].select(self.heads[name].layers_for(self.backbone_of(name).spec))

    def _feature_inputs(self) -> list[Inputs]:
        """The inputs whose features the heads read (an ensemble reads its members' outputs, no features)."""
        return list(dict.fromkeys(self.config.inputs_of(n) for n, h in self.heads.items() if not h.combines_heads))

    def _groups(self, feats: "PatchFeatures | dict[Inputs, PatchFeatures]") -> "dict[Inputs, PatchFeatures]":
        """Features by inputs; PatchFeatures alone are those of a run with one backbone."""
        if not isinstance(feats, PatchFeatures):
            return feats
        groups = self._feature_inputs()
        if len(groups) > 1:
            raise ValueError(f"this run reads {len(groups)} backbones ({', '.join(i.describe() for i in groups)}): "
                             "score images, not the features of one backbone")
        return {groups[0] if groups else self.config.main_inputs: feats}

    # ---- training ---------------------------------------------------------------------------------------
    def fit(self, train: Sequence[Sample], progress: ProgressFn | None = None,
            aux: Sequence[Sample] | None = None) -> "Run":
        """Fit every head on the normal ``train`` images (zero-shot heads on the labelled ``aux`` set) and
        calibrate it label-free on held-out normal images (see ``RunConfig``: refit or holdout)."""
        learned = [n for n, h in self.heads.items() if not h.zero_shot and not h.combines_heads]
        if not train and learned:
            raise ValueError("no normal training images")
        seed_everything(self.config.seed)
        refit = self.config.calibration == "refit"
        fit_i, val_i = split_indices(len(train), self.config.val_fraction, self.config.seed)
        cats = {s.category for s in train}
        category = cats.pop() if len(cats) == 1 else None  # one category: class-separated; several: multi-class
        self.window = self.config.window.fit(train)  # on the normal training images only
        self.info["window"] = self.window.to_dict()
        order = sorted(self.heads, key=lambda n: self.heads[n].combines_heads)  # ensembles after their members
        held_out = val_i != fit_i
        refits = learned if refit and held_out else []
        groups = self._feature_inputs()
        for inputs in groups:  # every backbone loads before any work: one that cannot fails now, with its reason
            self._backbone_at(inputs)
        # stages: extraction (weighed as all fits together: a cold cache costs that much, shared among the
        # backbones), one fit per head, one refit per learned head (a refit costs about a fit)
        n_groups = max(1, len(groups))
        stages = Stages(progress, [(len(order) or 1) / n_groups] * n_groups + [1] * (len(order) + len(refits)))
        if held_out:  # the fit images first: the two parts are views of one feature tensor, not copies
            train, fit_i, val_i = [train[i] for i in fit_i + val_i], list(range(len(fit_i))), \
                list(range(len(fit_i), len(train)))
        f_all: dict[Inputs, PatchFeatures] = {}
        for inputs in groups if train else []:
            label = "extracting features of the normal images" + (f" ({inputs.describe()})" if len(groups) > 1 else "")
            f_all[inputs] = self.features(train, stages.stage(label), inputs)
        f_fit = {k: f[: len(fit_i)] for k, f in f_all.items()} if train else None
        f_val = {k: f[len(fit_i):] for k, f in f_all.items()} if train and held_out else None
        self.info.update(n_train=len(train), n_fit=len(fit_i), n_calibration=len(val_i),
                         calibration_mode=self.config.calibration)
        for name in order:
            head = self.heads[name]
            step = stages.stage(f"fitting {name} on {len(fit_i) if not head.zero_shot else len(aux or [])} images")
            t0 = time.perf_counter()
            if head.combines_heads:
                head.fit_members(self.heads)
            elif head.zero_shot:
                self._fit_zero_shot(name, head, aux, step)
            else:
                self._fit_learned(name, head, [train[i] for i in fit_i], f_fit, step, category=category,
                                  val_features=None if f_val is None else self._select(name, f_val))
            self.info["fit_s"][name] = time.perf_counter() - t0
            # zero-shot heads never saw the target's normals: calibrate on all of them
            self._calibrate(name, f_all if head.zero_shot else (f_val if f_val is not None else f_fit))
        for name in refits:  # the final heads see every normal image; the calibration carries over
            step = stages.stage(f"refitting {name} on all {len(train)} normal images")
            head = self._new_head(name)
            t0 = time.perf_counter()
            self._fit_learned(name, head, train, f_all, step, category=category, **self.heads[name].refit_kwargs())
            self.info.setdefault("calibration_fit_s", {})[name] = self.info["fit_s"][name]
            self.info["fit_s"][name] = time.perf_counter() - t0
            head.fit_info["calibration"] = self.heads[name].fit_info.get("calibration")
            self.heads[name] = head
        for head in self.heads.values():  # a head scores right only through the window it was fitted with
            head.fit_info["window"] = self.info["window"]
        stages.finish("trained")
        return self

    def _fit_learned(self, name: str, head: Method, samples: Sequence[Sample], feats: "dict[Inputs, PatchFeatures]",
                     step: ProgressFn, **kw: Any) -> None:
        """Fit a head on normal images; heads that train for long keep resumable checkpoints next to the cache."""
        inputs = self.config.inputs_of(name)
        f = feats[inputs]
        refs = head.reference_augment(samples)
        if len(refs) != len(samples):  # image-space augmentation of the references (AnomalyDINO's rotations)
            f = self.features(refs, lambda p: step(replace(p, stage="features of the augmented references")), inputs)
            kw = {**kw, "references_augmented": True}
        head.fit(f.select(head.layers_for(self.backbone_of(name).spec)), progress=step,
                 checkpoint_dir=str(self.cache.root.parent / "checkpoints"), **kw)

    def _fit_zero_shot(self, name: str, head: Method, aux: Sequence[Sample] | None, step: ProgressFn) -> None:
        if not aux:
            raise ValueError(f"{name} is zero-shot: it needs an auxiliary labelled set (other categories "
                             "with masks, or annotations)")
        inputs = self.config.inputs_of(name)
        f_aux = self.features(aux, lambda p: step(replace(p, stage="features of the auxiliary set")), inputs)
        labels = torch.tensor([max(s.label, 0) for s in aux], dtype=torch.float32)
        masks = masks_at(self.backbone_of(name), aux)
        head.fit(f_aux.select(head.layers_for(self.backbone_of(name).spec)), progress=step, labels=labels,
                 masks=None if masks is None else torch.from_numpy(masks).float())

    def _raw(self, name: str, feats: "PatchFeatures | dict[Inputs, PatchFeatures]",
             done: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Heatmaps (B, S, S) and image scores (B,) of one head before calibration, by the method's own
        post-processing, in the head's own geometry; an ensemble combines its members' CALIBRATED outputs
        (taken from ``done``, the calibrated outputs already computed for these features, when there),
        resampled to its geometry."""
        head, feats = self.heads[name], self._groups(feats)
        if head.combines_heads:
            mine = self.config.inputs_of(name)
            outs = [self._calibrated(m, feats, done) for m in head.members_in(self.heads)]
            maps = [to_geometry(o[0], self.config.inputs_of(m), mine) for m, o in zip(head.members_in(self.heads), outs)]
            return head.combine(maps, [o[1] for o in outs])
        f = self._select(name, feats)
        res = head.score(f)
        return head.heatmap(res, f.image_size, self.config.sigma, self.config.score_mode)

    def _calibrated(self, name: str, feats: "PatchFeatures | dict[Inputs, PatchFeatures]",
                    done: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if done is not None and name in done:
            return done[name]
        maps, scores = self._raw(name, feats, done)
        cal = self.calibration.get(name, Calibration())
        out = cal.maps(maps), cal.scores(scores)
        if done is not None:
            done[name] = out
        return out

    def _calibrate(self, name: str, f_val: "PatchFeatures | dict[Inputs, PatchFeatures] | None") -> None:
        if not f_val:  # zero-shot heads with no target normals: identity calibration
            self.calibration[name] = Calibration()
            return
        f_val = self._groups(f_val)
        # in chunks of images: a method's post-processing of all held-out images at once (a 33-tap Gaussian
        # over 600 maps of 224 px) took 4 GB of temporaries
        n = len(next(iter(f_val.values())))
        parts = [self._raw(name, {k: f[s:s + 32] for k, f in f_val.items()}) for s in range(0, n, 32)]
        cal = Calibration.fit(torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts]))
        self.calibration[name] = cal
        self.heads[name].fit_info["calibration"] = cal.to_dict()

    # ---- scoring --------------------------------------------------------------------------------------------
    def score(self, samples: Sequence[Sample] | PatchFeatures, methods: Sequence[str] | None = None,
              progress: ProgressFn | None = None, native: bool = False) -> dict[str, Scored]:
        """Calibrated maps and scores of ``samples`` for each head; heads are timed one image at a time.

        Maps are in the run's main geometry (``native=True``: each head's own), so that every method's map
        lies over the same view of the image. ``samples`` may be PatchFeatures when the run has one backbone.
        """
        groups = self._feature_inputs()
        if isinstance(samples, PatchFeatures):
            stages = Stages(progress, [1])
            feats = self._groups(samples)
        else:
            stages = Stages(progress, [1] * len(groups) + [len(groups) or 1])  # extraction per backbone, scoring
            feats = {i: self.features(samples, stages.stage("extracting features" + (
                f" ({i.describe()})" if len(groups) > 1 else "")), i) for i in groups}
        n = len(next(iter(feats.values()))) if feats else len(samples)
        names = sorted(methods or list(self.heads), key=lambda n: self.heads[n].combines_heads)  # members first
        step = stages.stage("scoring") if progress is not None else None
        main = self.config.main_inputs
        maps: dict[str, list] = {n: [] for n in names}
        scores: dict[str, list] = {n: [] for n in names}
        times: dict[str, list] = {n: [] for n in names}
        for i in range(n):
            one, done = {k: f[i] for k, f in feats.items()}, {}  # an ensemble reuses its members' outputs
            for name in names:
                t0 = time.perf_counter()
                m, s = self._calibrated(name, one, done)
                times[name].append((time.perf_counter() - t0) * 1000)
                if not native:
                    m = to_geometry(m, self.config.inputs_of(name), main)
                maps[name].append(m[0].numpy().astype(np.float32))
                scores[name].append(float(s[0]))
            if step is not None:
                step(Progress(i + 1, n, "images"))
        return {n: Scored(np.array(scores[n]), np.stack(maps[n]), times[n]) for n in methods or list(self.heads)}

    def evaluate(self, test: Sequence[Sample], progress: ProgressFn | None = None,
                 record: bool = True) -> dict[str, dict[str, Any]]:
        """Metrics and curves of every head on labelled test images (unlabelled ones are ignored), each in its
        own geometry (a paper preset's pixel metrics at that paper's input size); with ``record`` they are kept
        in the run's info and the heads' model cards."""
        test = [s for s in test if s.label in (0, 1)]
        if not test:
            raise ValueError("no labelled test images to evaluate on")
        labels = np.array([s.label for s in test])
        masks = {i: masks_at(self._backbone_at(i), test) for i in self.config.inputs_list()}
        scored = self.score(test, progress=progress, native=True)
        results = {}
        for name, sc in scored.items():
            normal = labels == 0
            mask = masks[self.config.inputs_of(name)]
            r = {**M.image_metrics(labels, sc.scores), **M.pixel_metrics(mask, sc.maps),
                 **M.intervals(labels, sc.scores, mask, sc.maps),  # 95% intervals, n normal / anomalous, note
                 "curves": M.curves(labels, sc.scores), "pixel_curves": M.pixel_curves(mask, sc.maps),
                 "head_ms": float(np.median(sc.head_ms)),
                 "head_mb": head_megabytes(self.heads[name]), "fit_s": self.info["fit_s"].get(name),
                 # how the label-free calibration holds on unseen normal images: the share above 1.0
                 # should be near 1 - q (pixels; q = 0.999 by default)
                 "normal_px_over_1": float((sc.maps[normal] > 1.0).mean()) if normal.any() else None,
                 "normal_img_over_1": float((sc.scores[normal] > 1.0).mean()) if normal.any() else None}
            results[name] = r
        if record:
            for name, r in results.items():
                self.heads[name].fit_info["metrics"] = {k: v for k, v in r.items() if k not in CURVES and v is not None}
            self.info["metrics"] = {k: {kk: vv for kk, vv in v.items() if kk not in CURVES} for k, v in results.items()}
        return results

    # ---- persistence -----------------------------------------------------------------------------------------------
    def save(self, extra: dict[str, Any] | None = None) -> Path:
        if self.dir is None:
            raise ValueError("this run has no workdir")
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, head in self.heads.items():
            head.save_pretrained(self.dir / name)
        self.meta.update(extra or {})
        meta = {**self.meta, "run_id": self.run_id, "config": self.config.to_dict(), "info": self.info,
                "calibration": {k: v.to_dict() for k, v in self.calibration.items()}, "created": time.time()}
        write_atomic(self.dir / "run.json", json.dumps(meta, indent=2, default=_jsonable))  # never half a run.json
        return self.dir

    @classmethod
    def load(cls, run_dir: str | os.PathLike, cache: FeatureCache | None = None, token: str | None = None) -> "Run":
        """A saved run: its settings, calibrations, records and every head; a damaged or incomplete one raises
        DataError naming the run and the file."""
        run_dir = Path(run_dir)
        meta = read_run_meta(run_dir)
        config = _config_from(meta)
        heads = {}
        for name in config.methods:
            if not (run_dir / name / "model.safetensors").is_file():
                raise DataError(f"run {run_dir.name}: {name}/model.safetensors is missing (uadlab loads "
                                "safetensors only, never pickle files)")
            try:
                heads[name] = get_method_class(name).from_pretrained(str(run_dir / name))
            except DataError as e:
                raise DataError(f"run {run_dir.name}: {e}") from None
            except (OSError, ValueError, TypeError, KeyError) as e:  # config.json damaged, unknown method ...
                raise DataError(f"run {run_dir.name}: {name} cannot be loaded ({type(e).__name__}: "
                                f"{e.strerror if isinstance(e, OSError) else e})") from None
        run = cls(config, cache=cache, token=token, heads=heads)
        run.run_id, run.dir = meta["run_id"], run_dir
        run.info = meta.get("info", run.info)
        run.calibration = {k: Calibration(**v) for k, v in meta.get("calibration", {}).items()}
        run.meta = {k: v for k, v in meta.items() if k not in ("run_id", "config", "info", "calibration")}
        run.window = Window.from_dict(run.info.get("window"))
        return run

    @classmethod
    def from_head(cls, head: Method, cache: FeatureCache | None = None, token: str | None = None) -> "Run":
        """A run of one loaded head (e.g. pulled from the Hub): its backbone, geometry and calibration come
        from what the head recorded when it was saved, so it scores exactly like the run that trained it."""
        info = head.fit_info
        recorded = dict(image_size=info.get("image_size"), resize=info.get("resize"), weights=info.get("weights"),
                        sigma=info.get("sigma"), score_mode=info.get("score_mode"),
                        window=(info.get("window") or {}).get("spec"))
        config = RunConfig(backbone=head.backbone, methods=[head.name],  # what it did not record: the defaults
                           **{k: v for k, v in recorded.items() if v is not None})
        run = cls(config, cache=cache, token=token, heads={head.name: head})
        run.window = Window.from_dict(info.get("window"))
        if info.get("calibration"):
            run.calibration[head.name] = Calibration(**info["calibration"])
        return run


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _config_from(meta: dict[str, Any]) -> RunConfig:
    """The RunConfig of a saved run.json (settings that a newer or older uadlab does not know are ignored)."""
    return RunConfig.from_dict(meta["config"])


def read_run_meta(run_dir: Path) -> dict[str, Any]:
    """The ``run.json`` of a saved run, checked; DataError naming the run when it is missing or damaged."""
    path = run_dir / "run.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{run_dir.name}: not a saved run (no run.json)") from None
    except OSError as e:
        raise DataError(f"run {run_dir.name}: run.json cannot be read ({e.strerror})") from None
    except ValueError as e:
        raise DataError(f"run {run_dir.name}: run.json is damaged ({e})") from None
    try:
        _config_from(meta)
        if isinstance(meta["run_id"], str) and isinstance(meta.get("created", 0), (int, float)):
            return meta
    except ValueError as e:  # settings out of their limits
        raise DataError(f"run {run_dir.name}: run.json holds bad settings ({e})") from None
    except (KeyError, TypeError, AttributeError):
        pass
    raise DataError(f"run {run_dir.name}: run.json does not describe a run (run_id, config or created wrong)")


def list_runs(workdir: str | os.PathLike, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Saved runs under ``workdir``, newest first; damaged ones are skipped, warned about and listed in
    ``skipped`` (one message each)."""
    out = []
    for p in sorted(Path(workdir).glob("*/run.json")):
        try:
            meta = read_run_meta(p.parent)
        except DataError as e:
            warnings.warn(f"skipped {e}")
            if skipped is not None:
                skipped.append(str(e))
            continue
        meta["dir"] = str(p.parent)
        out.append(meta)
    return sorted(out, key=lambda m: m.get("created", 0), reverse=True)


def auxiliary_set(dataset: Dataset, targets: Sequence[str]) -> list[Sample]:
    """The auxiliary labelled set of zero-shot heads: the labelled test images of every OTHER category.

    Never an image of a ``targets`` category (the heads are evaluated on those: training on them leaks).
    Anomalous images come with their masks; when some anomalous images have a mask and others do not, only
    the masked ones are kept (pixel supervision is worth more than a few more images); when none has a mask,
    all are kept and zero-shot heads train on the image labels alone.

    Raises:
        DataError: no other category, or no normal or no anomalous image among them.
    """
    targets = set(targets)
    others = sorted(set(dataset.categories) - targets)
    if not others:
        raise DataError(f"{dataset.name}: zero-shot methods learn from categories other than the target "
                         f"({', '.join(sorted(targets))}) and there is none: choose target categories (e.g. "
                         "--categories) or a dataset with more categories (training on the target's own test images "
                         "would leak into the evaluation)")
    aux = [s for s in dataset.test if s.category in others and s.label in (0, 1)]
    masked = [s for s in aux if s.label == 1 and (s.mask is not None or s.mask_path is not None)]
    if masked:
        aux = [s for s in aux if s.label == 0 or s.mask is not None or s.mask_path is not None]
    if not any(s.label == 1 for s in aux) or not any(s.label == 0 for s in aux):
        raise DataError(f"{dataset.name}: zero-shot methods need normal and anomalous labelled test images of other "
                         f"categories than {sorted(targets)}; {', '.join(others)} gave {len(aux)}")
    return aux
