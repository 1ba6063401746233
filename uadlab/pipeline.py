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

from . import metrics as M
from .backbones import DEFAULT_IMAGE_SIZE, OFFLINE_DEFAULT, Backbone, shared_backbone
from .data import Dataset, Sample
from .errors import DataError
from .features import FeatureCache, PatchFeatures
from .medical import Window
from .methods import Method, get_method_class
from .postprocess import DEFAULT_ALPHA, Calibration
from .progress import Progress, ProgressFn, Stages

def default_cache_dir() -> Path:
    return Path(os.environ.get("UADLAB_CACHE", Path.home() / ".cache" / "uadlab")) / "features"


@dataclass
class RunConfig:
    """Settings of one training run (JSON-serialisable; a token is never part of it).

    ``calibration`` says how the label-free calibration (``postprocess.Calibration``: image threshold 1.0 =
    a split-conformal order statistic promising at most ``alpha`` false alarms on new normal images) gets
    held-out normal scores OF THE HEAD THAT IS SHIPPED without costing the heads data:

    - ``"refit"`` (default): cross-fitting. The normal images are split into K folds (``n_folds``: K =
      round(1 / val_fraction) for memory banks, 2 for trained heads); a head fitted on the other folds scores
      each fold, so every normal image gets a held-out score
      (n = all of them: 99 normal images can promise 1%); the shipped head is then fitted on ALL normal
      images (as in the papers and anomalib). For memory banks searched exactly (AnomalyDINO) the promise
      carries over to the shipped head exactly (a bank with more normal images scores no image higher); for
      trained heads and coresets it assumes the head fitted on all scores normal images no higher than its
      fold heads (measured: benchmarks/false_alarms.py). Cost: K fits on (K - 1) / K of the data per head
      before the final fit (trained heads: two half fits, about the old fit on 80% and refit).
    - ``"holdout"``: fit on ``1 - val_fraction`` only and calibrate on the rest with that same head (exact
      split conformal; cheaper, but the heads see fewer images and n is smaller).

    Zero-shot heads never see the target's normal images, so they calibrate on all of them. ``sigma`` and
    ``score_mode`` override every method's own post-processing (None: each method's paper choice).
    ``window`` is the intensity window of DICOM, NIfTI and 16-bit images (``medical.Window.parse``), fitted on
    the normal training images and applied alike to every image the run sees.
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
    window: str = "auto"
    alpha: float = DEFAULT_ALPHA


    @classmethod
    def resolve(cls, methods: Sequence[str], preset: str = "quick", backbone: str | None = None,
                image_size: int | None = None, resize: int | None = None, **settings: Any) -> "RunConfig":
        """The settings of a run from what a user chose (None = not chosen): the ONE place where a preset
        brings its backbone and input geometry, for the CLI, the app and the Python API alike.

        With ``preset="paper"`` and methods whose papers agree on a backbone, that backbone and its input
        geometry (e.g. Dinomaly: DINOv2-reg ViT-B/14, resize 448, crop 392) unless the user chose another
        backbone; otherwise the offline default backbone at ``DEFAULT_IMAGE_SIZE``.
        """
        from .methods import get_method_class

        inputs = [get_method_class(m).paper_inputs for m in methods] if preset == "paper" else []
        paper = inputs[0] if inputs and all(i == inputs[0] for i in inputs) else {}
        if paper and backbone in (None, paper["backbone"]):
            backbone = paper["backbone"]
            if image_size is None:  # the user's size wins over the paper's geometry
                image_size, resize = paper["image_size"], resize or paper.get("resize")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 32):
            raise ValueError(f"image size {image_size!r}: give a whole number of pixels, at least 32")
        return cls(backbone=backbone or OFFLINE_DEFAULT, methods=list(methods), preset=preset,
                   image_size=image_size or DEFAULT_IMAGE_SIZE, resize=resize, **settings)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


CALIBRATION_MODES = ("refit", "holdout")


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit, held-out) indices: ``val_fraction`` of ``n`` normal images (at least one) held out for calibration.

    With one image nothing can be held out: ([0], []) (the head cannot be calibrated).
    """
    if n < 2:
        return list(range(n)), []
    idx = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    return sorted(int(i) for i in idx[n_val:]), sorted(int(i) for i in idx[:n_val])


def split_normals(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``val_fraction`` of the normal training images (at least one) for calibration."""
    fit_i, val_i = split_indices(len(samples), val_fraction, seed)
    return [samples[i] for i in fit_i], [samples[i] for i in val_i]


def fold_order(n: int, val_fraction: float, seed: int, mode: str = "refit") -> tuple[list[int], int]:
    """(order, n_held): the ``n`` normal images in the order a run extracts them, and how many lead it as
    held-out images. ``holdout``: the ``val_fraction`` part first (at least one image), then the fitting part;
    ``refit``: a random permutation, every image held out once (``fold_slices`` cuts it into folds). Fewer
    than two images: nothing held out."""
    if n < 2:
        return list(range(n)), 0
    if mode == "holdout":
        fit_i, val_i = split_indices(n, val_fraction, seed)
        return val_i + fit_i, len(val_i)
    return [int(i) for i in np.random.default_rng(seed).permutation(n)], n


def fold_slices(n_held: int, k: int) -> list[slice]:
    """``k`` contiguous folds (at most ``n_held``) of the first ``n_held`` images of ``fold_order``."""
    if n_held == 0:
        return []
    bounds = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(n_held), min(k, n_held))]).tolist()
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def n_folds(head: Method, val_fraction: float, mode: str) -> int:
    """Cross-fitting folds of a head: K = round(1 / val_fraction) for heads fitted in one pass over the
    features (memory banks: seconds), 2 for heads trained for many steps (their cost stays near the old
    fit-then-refit: two half fits and the final one); ``holdout``: 1."""
    if mode == "holdout":
        return 1
    return max(2, round(1 / val_fraction)) if head.fit_in_one_pass else 2


def _rows(feats: PatchFeatures, rows: list[int]) -> PatchFeatures:
    """The features of ``rows`` (ascending): a view when they are contiguous, else one copy."""
    if rows and rows == list(range(rows[0], rows[-1] + 1)):
        return feats[rows[0]:rows[-1] + 1]
    return feats[torch.tensor(rows, dtype=torch.long)]


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
    """Trained heads of one backbone on one dataset, with their calibrations.

    Args:
        config: the run settings.
        workdir: where the run is saved (``None``: not saved).
        cache: the feature cache (default: ``~/.cache/uadlab/features``).
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
        self._backbone: Backbone | None = None
        self.window = Window.parse(config.window)  # fitted by fit; restored by load / from_head
        if heads is None:
            self.build_heads()
        else:  # trained heads (a saved run, a head from the Hub)
            self.heads = dict(heads)

    # ---- construction ------------------------------------------------------------------------------
    def build_heads(self) -> None:
        stray = set(self.config.method_kwargs) - set(self.config.methods)
        if stray:
            raise ValueError(f"hyperparameters given for {sorted(stray)}, which are not among the methods "
                             f"{self.config.methods}")
        if self.config.calibration not in CALIBRATION_MODES:
            raise ValueError(f"calibration must be one of {CALIBRATION_MODES}, got {self.config.calibration!r}")
        if not 0 < self.config.alpha < 1:
            raise ValueError(f"alpha (the false-alarm rate 1.0 promises) must lie in (0, 1), got {self.config.alpha!r}")
        for name in self.config.methods:
            self.heads[name] = self._new_head(name)
        for head in self.heads.values():
            if head.combines_heads:
                head.check_members(self.heads)

    def _new_head(self, name: str) -> Method:
        """A fresh head of ``name`` with the run's preset and hyperparameters."""
        cls = get_method_class(name)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "backbone"}
        unknown = set(self.config.method_kwargs.get(name, {})) - accepted
        if unknown:
            raise ValueError(f"{name}: unknown hyperparameters {sorted(unknown)}; known: {', '.join(sorted(accepted))}")
        kw = {**self.config.method_kwargs.get(name, {}), "backbone": self.config.backbone}
        return cls.from_preset(self.config.preset, **kw) if cls.presets else cls(**kw)

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            from .backbones import backbone_spec

            spec = backbone_spec(self.config.backbone, self.config.image_size)
            layers: list[str] = []
            for h in self.heads.values():
                layers += [l for l in h.layers_for(spec) if l not in layers]
            self._backbone = shared_backbone(self.config.backbone, layers, self.config.image_size,
                                             self.config.resize, self.config.weights, self._token)
        return self._backbone

    def features(self, samples: Sequence[Sample], progress: ProgressFn | None = None) -> PatchFeatures:
        return self.cache.extract(self.backbone, self.window.bind(samples), progress=progress)

    # ---- training ---------------------------------------------------------------------------------------
    def fit(self, train: Sequence[Sample], progress: ProgressFn | None = None,
            aux: Sequence[Sample] | None = None) -> "Run":
        """Fit every head on the normal ``train`` images (zero-shot heads on the labelled ``aux`` set) and
        calibrate it label-free on held-out normal scores of the head that is shipped (see ``RunConfig``)."""
        learned = [n for n, h in self.heads.items() if not h.zero_shot and not h.combines_heads]
        if not train and learned:
            raise ValueError("no normal training images")
        seed_everything(self.config.seed)
        order_i, n_held = fold_order(len(train), self.config.val_fraction, self.config.seed, self.config.calibration)
        cats = {s.category for s in train}
        category = cats.pop() if len(cats) == 1 else None  # for per-category choices (AnomalyDINO's masking table)
        self.window = Window.parse(self.config.window).fit(train)  # on the normal training images only
        self.info["window"] = self.window.to_dict()
        order = sorted(self.heads, key=lambda n: self.heads[n].combines_heads)  # ensembles after their members
        # the images in fold order: every held-out fold is one slice of one feature tensor (views, not copies)
        train = [train[i] for i in order_i]
        refit = self.config.calibration == "refit"
        parts = {n: fold_slices(n_held, n_folds(self.heads[n], self.config.val_fraction, self.config.calibration))
                 for n in learned}
        # stages: extraction (weighed as all fits together: a cold cache costs that much), then per learned
        # head one fit per fold and (refit) the final fit on all, one stage for every other head
        fits = {n: (len(parts[n]) + (refit or not parts[n])) if n in learned else 1 for n in order}
        stages = Stages(progress, [len(order) or 1] + [1] * sum(fits.values()))
        f_all = self.features(train, stages.stage("extracting features of the normal images")) if train else None
        self.info.update(n_train=len(train), n_fit=len(train) if refit else len(train) - n_held,
                         n_calibration=n_held, calibration_mode=self.config.calibration,
                         folds={n: len(p) for n, p in parts.items()}, alpha=self.config.alpha)
        held: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}  # raw held-out (maps, scores) per head
        protocols: dict[str, str] = {}
        for name in order:
            head = self.heads[name]
            t0 = time.perf_counter()
            if head.combines_heads:  # weighed and calibrated on its members' calibrated held-out outputs
                stages.stage(f"combining {name}")
                members = head.members_in(self.heads)
                outs = [held.get(m) for m in members]
                ok = all(o is not None for o in outs) and n_held > 0
                cal = [self.calibration[m] for m in members]
                head.fit_members(self.heads, {m: c.scores(o[1][:n_held]) for m, c, o in zip(members, cal, outs)}
                                 if ok else None)
                if ok:
                    held[name] = head.combine([c.maps(o[0][:n_held]) for c, o in zip(cal, outs)],
                                              [c.scores(o[1][:n_held]) for c, o in zip(cal, outs)])
                    ps = {protocols[m] for m in members}
                    protocols[name] = next(p for p in ("cross-fit", "monotone", "split") if p in ps)
            elif head.zero_shot:  # never saw the target's normals: every one of them is held out
                self._fit_zero_shot(name, head, aux, stages.stage(f"fitting {name} on {len(aux or [])} images"))
                held[name] = self._head_raw(head, f_all) if f_all is not None else None
                protocols[name] = "split"
            else:
                held[name], protocols[name] = self._fit_folds(name, train, f_all, parts[name], stages, category)
            self.info["fit_s"][name] = time.perf_counter() - t0
            self._calibrate(name, held[name], protocols.get(name, "none"))
        if not any(h.combines_heads for h in self.heads.values()):
            held.clear()
        for head in self.heads.values():  # a head scores right only through the window it was fitted with
            head.fit_info["window"] = self.info["window"]
        stages.finish("trained")
        return self

    def _fit_folds(self, name: str, train: list[Sample], f_all: PatchFeatures, parts: list[slice], stages: Stages,
                   category: str | None) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str]:
        """Fit a learned head and return its raw held-out (maps, scores) and how they relate to the shipped head.

        holdout: one fold; the head fitted without it is shipped and scored it (split conformal). refit: K
        folds, a head fitted on the others scores each (cross-fitting); then the shipped head is fitted on all.
        """
        refit = self.config.calibration == "refit"
        raws, fold_s = [], 0.0
        for k, part in enumerate(parts):
            keep = [i for i in range(len(train)) if not part.start <= i < part.stop]
            head = self._new_head(name) if refit or k else self.heads[name]
            step = stages.stage(f"fitting {name} on {len(keep)} images" +
                                (f" (fold {k + 1} of {len(parts)})" if refit else ""))
            t0 = time.perf_counter()
            self._fit_learned(head, [train[i] for i in keep], _rows(f_all, keep), step, category=category,
                              val_features=f_all[part].select(head.layers_for(self.backbone.spec)))
            fold_s += time.perf_counter() - t0
            raws.append(self._head_raw(head, f_all[part]))
            if not refit:
                self.heads[name] = head
        if refit or not parts:  # the shipped head sees every normal image
            head = self._new_head(name)
            self._fit_learned(head, train, f_all, stages.stage(f"fitting {name} on all {len(train)} normal images"),
                              category=category)
            self.heads[name] = head
            if parts:
                self.info.setdefault("calibration_fit_s", {})[name] = fold_s
        if not raws:
            return None, "none"
        held = torch.cat([m for m, _ in raws]), torch.cat([s for _, s in raws])
        monotone = getattr(self.heads[name], "monotone_bank", False)
        return held, ("monotone" if monotone else "cross-fit") if refit else "split"

    def _fit_learned(self, head: Method, samples: Sequence[Sample], feats: PatchFeatures, step: ProgressFn,
                     **kw: Any) -> None:
        """Fit a head on normal images; heads that train for long keep resumable checkpoints next to the cache."""
        refs = head.reference_augment(samples)
        if len(refs) != len(samples):  # image-space augmentation of the references (AnomalyDINO's rotations)
            feats = self.features(refs, lambda p: step(replace(p, stage="features of the augmented references")))
            kw = {**kw, "references_augmented": True}
        head.fit(feats.select(head.layers_for(self.backbone.spec)), progress=step,
                 checkpoint_dir=str(self.cache.root.parent / "checkpoints"), **kw)

    def _fit_zero_shot(self, name: str, head: Method, aux: Sequence[Sample] | None, step: ProgressFn) -> None:
        if not aux:
            raise ValueError(f"{name} is zero-shot: it needs an auxiliary labelled set (other categories "
                             "with masks, or annotations)")
        f_aux = self.features(aux, lambda p: step(replace(p, stage="features of the auxiliary set")))
        labels = torch.tensor([max(s.label, 0) for s in aux], dtype=torch.float32)
        masks = masks_at(self.backbone, aux)
        head.fit(f_aux.select(head.layers_for(self.backbone.spec)), progress=step, labels=labels,
                 masks=None if masks is None else torch.from_numpy(masks).float())

    def _head_raw(self, head: Method, feats: PatchFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """A (non-combining) head's uncalibrated heatmaps and scores, in chunks of images: a method's
        post-processing of 600 maps at once (a 33-tap Gaussian at 224 px) took 4 GB of temporaries."""
        parts = []
        for s in range(0, len(feats), 32):
            res = head.score(feats[s:s + 32].select(head.layers_for(self.backbone.spec)))
            parts.append(head.heatmap(res, feats.image_size, self.config.sigma, self.config.score_mode))
        return torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])

    def _raw(self, name: str, feats: PatchFeatures, done: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Heatmaps (B, S, S) and image scores (B,) of one head before calibration, by the method's own
        post-processing; an ensemble combines its members' CALIBRATED outputs (taken from ``done``, the
        calibrated outputs already computed for these features, when there)."""
        head = self.heads[name]
        if head.combines_heads:
            outs = [self._calibrated(m, feats, done) for m in head.members_in(self.heads)]
            return head.combine([o[0] for o in outs], [o[1] for o in outs])
        res = head.score(feats.select(head.layers_for(self.backbone.spec)))
        return head.heatmap(res, feats.image_size, self.config.sigma, self.config.score_mode)

    def _calibrated(self, name: str, feats: PatchFeatures, done: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if done is not None and name in done:
            return done[name]
        maps, scores = self._raw(name, feats, done)
        cal = self.calibration.get(name, Calibration())
        out = cal.maps(maps), cal.scores(scores)
        if done is not None:
            done[name] = out
        return out

    def _calibrate(self, name: str, held: tuple[torch.Tensor, torch.Tensor] | None, protocol: str) -> None:
        """The head's calibration from its raw held-out normal (maps, scores); none held out: not calibrated."""
        if held is None:
            cal = Calibration(alpha=self.config.alpha)
        else:
            cal = Calibration.fit(held[0], held[1], alpha=self.config.alpha, protocol=protocol)
        self.calibration[name] = cal
        self.heads[name].fit_info["calibration"] = cal.to_dict()

    # ---- scoring --------------------------------------------------------------------------------------------
    def score(self, samples: Sequence[Sample] | PatchFeatures, methods: Sequence[str] | None = None,
              progress: ProgressFn | None = None) -> dict[str, Scored]:
        """Calibrated maps and scores of ``samples`` for each head; heads are timed one image at a time."""
        stages = Stages(progress, [1] if isinstance(samples, PatchFeatures) else [1, 1])  # (extraction,) scoring
        feats = samples if isinstance(samples, PatchFeatures) else \
            self.features(samples, stages.stage("extracting features"))
        names = sorted(methods or list(self.heads), key=lambda n: self.heads[n].combines_heads)  # members first
        step = stages.stage("scoring") if progress is not None else None
        maps: dict[str, list] = {n: [] for n in names}
        scores: dict[str, list] = {n: [] for n in names}
        times: dict[str, list] = {n: [] for n in names}
        for i in range(len(feats)):
            one, done = feats[i], {}  # an ensemble reuses its members' outputs for this image
            for name in names:
                t0 = time.perf_counter()
                m, s = self._calibrated(name, one, done)
                times[name].append((time.perf_counter() - t0) * 1000)
                maps[name].append(m[0].numpy().astype(np.float32))
                scores[name].append(float(s[0]))
            if step is not None:
                step(Progress(i + 1, len(feats), "images"))
        return {n: Scored(np.array(scores[n]), np.stack(maps[n]), times[n]) for n in methods or list(self.heads)}

    def evaluate(self, test: Sequence[Sample], progress: ProgressFn | None = None,
                 record: bool = True) -> dict[str, M.Evaluation]:
        """Metrics and curves of every head on labelled test images (unlabelled ones are ignored); with
        ``record`` the metrics (never the curves) are kept in the run's info and the heads' model cards."""
        test = [s for s in test if s.label in (0, 1)]
        if not test:
            raise ValueError("no labelled test images to evaluate on")
        labels = np.array([s.label for s in test])
        masks = masks_at(self.backbone, test)
        scored = self.score(test, progress=progress)
        results = {}
        normal = labels == 0
        for name, sc in scored.items():
            metrics = {**M.image_metrics(labels, sc.scores), **M.pixel_metrics(masks, sc.maps),
                       M.HEAD_MS: float(np.median(sc.head_ms)), M.HEAD_MB: head_megabytes(self.heads[name]),
                       M.FIT_S: self.info["fit_s"].get(name),
                       # how the label-free calibration holds on unseen normal images: the share above 1.0
                       # (images: at most the calibration's promise; pixels: near 1 - q)
                       M.NORMAL_PX_OVER_1: float((sc.maps[normal] > 1.0).mean()) if normal.any() else None,
                       M.NORMAL_IMG_OVER_1: float((sc.scores[normal] > 1.0).mean()) if normal.any() else None}
            results[name] = M.Evaluation(metrics, M.Curves(**M.curves(labels, sc.scores)),
                                         M.Curves(**M.pixel_curves(masks, sc.maps)))
        if record:
            for name, r in results.items():
                self.heads[name].fit_info["metrics"] = {k: v for k, v in r.metrics.items() if v is not None}
            self.info["metrics"] = {k: dict(v.metrics) for k, v in results.items()}
        return results

    # ---- persistence -----------------------------------------------------------------------------------------------
    def save(self, extra: dict[str, Any] | None = None) -> Path:
        if self.dir is None:
            raise ValueError("this run has no workdir")
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, head in self.heads.items():
            head.save_pretrained(self.dir / name)
        self.meta.update(extra or {})
        meta = {**self.meta, "run_id": self.run_id, "config": asdict(self.config), "info": self.info,
                "calibration": {k: v.to_dict() for k, v in self.calibration.items()}, "created": time.time()}
        tmp = self.dir / "run.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2, default=_jsonable))
        os.replace(tmp, self.dir / "run.json")  # atomic: a crash never leaves half a run.json
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
        run.calibration = {k: Calibration.from_dict(v) for k, v in meta.get("calibration", {}).items()}
        run.meta = {k: v for k, v in meta.items() if k not in ("run_id", "config", "info", "calibration")}
        if isinstance(run.meta.get("evaluation"), dict):  # typed again (older runs saved flat dicts)
            run.meta["evaluation"] = {k: M.Evaluation.from_dict(v) for k, v in run.meta["evaluation"].items()}
        run.window = Window.from_dict(run.info.get("window"))
        return run

    @classmethod
    def from_head(cls, head: Method, cache: FeatureCache | None = None, token: str | None = None) -> "Run":
        """A run of one loaded head (e.g. pulled from the Hub): its backbone, geometry and calibration come
        from what the head recorded when it was saved, so it scores exactly like the run that trained it."""
        info = head.fit_info
        config = RunConfig(backbone=head.backbone, methods=[head.name],
                           image_size=int(info.get("image_size") or DEFAULT_IMAGE_SIZE), resize=info.get("resize"),
                           weights=info.get("weights") or "default", sigma=info.get("sigma"),
                           score_mode=info.get("score_mode"), window=(info.get("window") or {}).get("spec", "auto"))
        run = cls(config, cache=cache, token=token, heads={head.name: head})
        run.window = Window.from_dict(info.get("window"))
        if info.get("calibration"):
            run.calibration[head.name] = Calibration.from_dict(info["calibration"])
        return run


def _jsonable(o):
    if isinstance(o, M.Evaluation):
        return o.to_dict()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _config_from(meta: dict[str, Any]) -> RunConfig:
    """The RunConfig of a saved run.json (settings that a newer or older uadlab does not know are ignored)."""
    known = {f.name for f in fields(RunConfig)}
    return RunConfig(**{k: v for k, v in meta["config"].items() if k in known})


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
    except (KeyError, TypeError):
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
