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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import metrics as M
from .backbones import Backbone
from .data import Dataset, Sample
from .errors import DataError
from .features import FeatureCache, PatchFeatures
from .methods import Method, get_method_class
from .postprocess import Calibration, image_score, threshold_from_normals, to_heatmap

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], message)


def default_cache_dir() -> Path:
    return Path(os.environ.get("UADLAB_CACHE", Path.home() / ".cache" / "uadlab")) / "features"


@dataclass
class RunConfig:
    """Settings of one training run (JSON-serialisable; a token is never part of it)."""

    backbone: str = "efficientnet_lite0"
    methods: list[str] = field(default_factory=lambda: ["patchcore", "anomalydino"])
    preset: str = "quick"
    image_size: int = 224
    resize: int | None = None
    weights: str = "default"
    val_fraction: float = 0.2
    seed: int = 0
    sigma: float = 4.0
    score_mode: str = "top1"
    method_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_normals(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``val_fraction`` of the normal training images (at least one) for calibration."""
    samples = list(samples)
    if len(samples) < 2:
        return samples, samples  # nothing to hold out: calibrate on the training image itself
    idx = np.random.default_rng(seed).permutation(len(samples))
    n_val = min(len(samples) - 1, max(1, int(round(len(samples) * val_fraction))))
    return [samples[i] for i in sorted(idx[n_val:])], [samples[i] for i in sorted(idx[:n_val])]


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
    head_ms: list[float]  # per-image scoring time of the head
    raw_scores: np.ndarray | None = None


class Run:
    """Trained heads of one backbone on one dataset, with their calibrations.

    Args:
        config: the run settings.
        workdir: where the run is saved (``None``: not saved).
        cache: the feature cache (default: ``~/.cache/uadlab/features``).
    """

    def __init__(self, config: RunConfig, workdir: str | os.PathLike | None = None,
                 cache: FeatureCache | None = None, token: str | None = None) -> None:
        self.config = config
        self.run_id = uuid.uuid4().hex[:12]
        self.dir = Path(workdir) / self.run_id if workdir is not None else None
        self.cache = cache or FeatureCache(default_cache_dir())
        self.heads: dict[str, Method] = {}
        self.calibration: dict[str, Calibration] = {}
        self.info: dict[str, Any] = {"fit_s": {}, "metrics": {}}
        self._token = token  # used for this process only; never saved
        self._backbone: Backbone | None = None
        self.build_heads()

    # ---- construction ------------------------------------------------------------------------------
    def build_heads(self) -> None:
        stray = set(self.config.method_kwargs) - set(self.config.methods)
        if stray:
            raise ValueError(f"hyperparameters given for {sorted(stray)}, which are not among the methods "
                             f"{self.config.methods}")
        for name in self.config.methods:
            cls = get_method_class(name)
            accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "backbone"}
            unknown = set(self.config.method_kwargs.get(name, {})) - accepted
            if unknown:
                raise ValueError(f"{name}: unknown hyperparameters {sorted(unknown)}; known: {', '.join(sorted(accepted))}")
            kw = {**self.config.method_kwargs.get(name, {}), "backbone": self.config.backbone}
            self.heads[name] = cls.from_preset(self.config.preset, **kw) if cls.presets else cls(**kw)

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            from .backbones import backbone_spec

            spec = backbone_spec(self.config.backbone, self.config.image_size)
            layers: list[str] = []
            for h in self.heads.values():
                layers += [l for l in h.layers_for(spec) if l not in layers]
            self._backbone = Backbone(self.config.backbone, layers=layers, image_size=self.config.image_size,
                                      resize=self.config.resize, weights=self.config.weights, token=self._token)
        return self._backbone

    def features(self, samples: Sequence[Sample], progress: Progress | None = None, what: str = "images") -> PatchFeatures:
        cb = None if progress is None else (lambda d, t, m: progress(d / max(t, 1), f"{m}: {what} {d}/{t}"))
        return self.cache.extract(self.backbone, samples, progress=cb)

    # ---- training ---------------------------------------------------------------------------------------
    def fit(self, train: Sequence[Sample], progress: Progress | None = None,
            aux: Sequence[Sample] | None = None) -> "Run":
        """Fit every head on normal ``train`` images; zero-shot heads on the labelled ``aux`` set."""
        if not train and not all(h.zero_shot for h in self.heads.values()):
            raise ValueError("no normal training images")
        seed_everything(self.config.seed)
        report = progress or (lambda f, m: None)
        fit_s, val_s = split_normals(train, self.config.val_fraction, self.config.seed)
        report(0.0, "extracting features")
        f_train = self.features(fit_s, lambda f, m: report(0.3 * f, m), "train") if fit_s else None
        f_val = self.features(val_s, lambda f, m: report(0.3 + 0.1 * f, m), "held-out normal") if val_s else None
        spec = self.backbone.spec
        n = len(self.heads)
        for i, (name, head) in enumerate(self.heads.items()):
            lo, span = 0.4 + 0.6 * i / n, 0.6 / n
            report(lo, f"fitting {name}")

            def step(s: int, total: int, loss: float, _n=name, _lo=lo, _span=span) -> None:
                report(_lo + _span * s / max(total, 1), f"{_n}: step {s}/{total}, loss {loss:.4g}")

            layers = head.layers_for(spec)
            t0 = time.perf_counter()
            if head.zero_shot:
                if not aux:
                    raise ValueError(f"{name} is zero-shot: it needs an auxiliary labelled set (other categories "
                                     "with masks, or annotations)")
                f_aux = self.features(aux, lambda f, m: report(lo, m), "auxiliary")
                labels = torch.tensor([max(s.label, 0) for s in aux], dtype=torch.float32)
                masks = masks_at(self.backbone, aux)
                if masks is None:
                    raise ValueError(f"{name}: every anomalous auxiliary image needs a mask")
                head.fit(f_aux.select(layers), progress=step, labels=labels, masks=torch.from_numpy(masks).float())
            else:  # heads that train for long keep resumable checkpoints next to the feature cache
                head.fit(f_train.select(layers), progress=step,
                         val_features=None if val_s is fit_s else f_val.select(layers),
                         checkpoint_dir=str(self.cache.root.parent / "checkpoints"))
            self.info["fit_s"][name] = time.perf_counter() - t0
            self._calibrate(name, f_val)
        report(1.0, "done")
        return self

    def _raw(self, name: str, feats: PatchFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw heatmaps (B, S, S) and image scores (B,) of one head."""
        head = self.heads[name]
        res = head.score(feats.select(head.layers_for(self.backbone.spec)))
        maps = to_heatmap(res.patch_map, feats.image_size, self.config.sigma)
        scores = res.image_score if res.image_score is not None else image_score(maps, self.config.score_mode)
        return maps, scores

    def _calibrate(self, name: str, f_val: PatchFeatures | None) -> None:
        if f_val is None:  # zero-shot heads with no target normals: identity calibration
            self.calibration[name] = Calibration()
            return
        maps, scores = self._raw(name, f_val)
        cal = Calibration.fit(maps, scores)
        cal_scores = cal.scores(scores).numpy()
        self.calibration[name] = cal
        head = self.heads[name]
        head.fit_info["calibration"] = cal.to_dict()
        head.fit_info["threshold"] = threshold_from_normals(cal_scores, 0.99) if len(cal_scores) > 1 else 1.0

    # ---- scoring --------------------------------------------------------------------------------------------
    def score(self, samples: Sequence[Sample] | PatchFeatures, methods: Sequence[str] | None = None,
              progress: Progress | None = None) -> dict[str, Scored]:
        """Calibrated maps and scores of ``samples`` for each head; heads are timed one image at a time."""
        feats = samples if isinstance(samples, PatchFeatures) else self.features(samples, progress, "test")
        out = {}
        for name in methods or list(self.heads):
            cal = self.calibration.get(name, Calibration())
            maps, raw, times = [], [], []
            for i in range(len(feats)):
                one = feats[i]
                t0 = time.perf_counter()
                m, s = self._raw(name, one)
                times.append((time.perf_counter() - t0) * 1000)
                maps.append(cal.maps(m)[0].numpy().astype(np.float32))
                raw.append(float(s[0]))
            raw_a = np.array(raw)
            out[name] = Scored(cal.scores(torch.from_numpy(raw_a)).numpy(), np.stack(maps), times, raw_a)
        return out

    def evaluate(self, test: Sequence[Sample], progress: Progress | None = None) -> dict[str, dict[str, Any]]:
        """Metrics and curves of every head on labelled test images (unlabelled ones are ignored)."""
        test = [s for s in test if s.label in (0, 1)]
        if not test:
            raise ValueError("no labelled test images to evaluate on")
        labels = np.array([s.label for s in test])
        masks = masks_at(self.backbone, test)
        scored = self.score(test, progress=progress)
        results = {}
        for name, sc in scored.items():
            r = {**M.image_metrics(labels, sc.scores), **M.pixel_metrics(masks, sc.maps),
                 "curves": M.curves(labels, sc.scores), "head_ms": float(np.median(sc.head_ms)),
                 "head_mb": head_megabytes(self.heads[name]), "fit_s": self.info["fit_s"].get(name)}
            results[name] = r
            self.heads[name].fit_info["metrics"] = {k: v for k, v in r.items() if k != "curves" and v is not None}
        self.info["metrics"] = {k: {kk: vv for kk, vv in v.items() if kk != "curves"} for k, v in results.items()}
        return results

    # ---- persistence -----------------------------------------------------------------------------------------------
    def save(self, extra: dict[str, Any] | None = None) -> Path:
        if self.dir is None:
            raise ValueError("this run has no workdir")
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, head in self.heads.items():
            head.save_pretrained(self.dir / name)
        meta = {"run_id": self.run_id, "config": asdict(self.config), "info": self.info,
                "calibration": {k: v.to_dict() for k, v in self.calibration.items()},
                "created": time.time(), **(extra or {})}
        tmp = self.dir / "run.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2, default=_jsonable))
        os.replace(tmp, self.dir / "run.json")  # atomic: a crash never leaves half a run.json
        return self.dir

    @classmethod
    def load(cls, run_dir: str | os.PathLike, cache: FeatureCache | None = None, token: str | None = None) -> "Run":
        """A saved run; a damaged or incomplete one raises DataError naming the run and the file."""
        run_dir = Path(run_dir)
        meta = read_run_meta(run_dir)
        run = cls.__new__(cls)
        run.config = RunConfig(**meta["config"])
        run.run_id = meta["run_id"]
        run.dir = run_dir
        run.cache = cache or FeatureCache(default_cache_dir())
        run.info = meta.get("info", {"fit_s": {}, "metrics": {}})
        run.calibration = {k: Calibration(**v) for k, v in meta.get("calibration", {}).items()}
        run._token = token
        run._backbone = None
        run.heads = {}
        for name in run.config.methods:
            if not (run_dir / name / "model.safetensors").is_file():
                raise DataError(f"run {run_dir.name}: {name}/model.safetensors is missing (uadlab loads "
                                "safetensors only, never pickle files)")
            try:
                run.heads[name] = get_method_class(name).from_pretrained(str(run_dir / name))
            except DataError as e:
                raise DataError(f"run {run_dir.name}: {e}") from None
            except (OSError, ValueError, TypeError, KeyError) as e:  # config.json damaged, unknown method ...
                raise DataError(f"run {run_dir.name}: {name} cannot be loaded ({type(e).__name__}: "
                                f"{e.strerror if isinstance(e, OSError) else e})") from None
        run.meta = meta
        return run


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


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
        RunConfig(**meta["config"])
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
