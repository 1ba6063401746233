"""Runs of a workspace: train on the current data, load saved runs (a process-wide LRU), score test images
once per (run, images) and hand out what the screens show (view rows, explanations, evaluations)."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from ..data import DataError, Dataset, Sample
from ..methods import get_method_class, list_methods
from ..progress import Progress, ProgressFn, Stages, quiet, within
from ..safety import TRAININGS, export_path, limits
from ..viz import GridRow, compare_grid
from .examples import examples_dir
from .session import ID_RE, LRU
from .sources import dataset_key, describe, source_label

if TYPE_CHECKING:
    from ..metrics import Evaluation
    from ..pipeline import Run, Scored
    from . import Workspace

_RUNS = LRU(4)  # (user, run id) -> Run (holds heads and a backbone: the expensive part)
_SCORED = LRU(32)  # (user, run id, sample names) -> ({method: Scored}, views)


class Runs:
    """The saved runs of one workspace."""

    def __init__(self, ws: "Workspace") -> None:
        self.ws = ws
        self.dir = ws.dir / "runs"
        self.dir.mkdir(parents=True, exist_ok=True)

    def list(self) -> list[dict[str, Any]]:
        """This workspace's runs, newest first, then the shared example runs."""
        from ..pipeline import list_runs

        return list_runs(self.dir) + list_runs(examples_dir())

    def choices(self) -> list[tuple[str, str]]:
        """(label, run id) of every run: named after data, methods, backbone and time."""
        return [(run_label(m), m["run_id"]) for m in self.list()]

    def label(self, run_id: str) -> str:
        """The name ``choices`` gives one saved run of this workspace."""
        from ..pipeline import read_run_meta

        return run_label(read_run_meta(self.dir / run_id))

    def get(self, run_id: str) -> "Run":
        """A run of this workspace (or a shared example run), loaded once and kept in a process-wide LRU."""
        from ..pipeline import Run

        if not run_id or not ID_RE.match(str(run_id)):
            raise ValueError("choose a run (train one in the Train tab)")
        path = self.dir / run_id
        if (path / "run.json").exists():
            return _RUNS.get((self.ws.user, run_id), lambda: Run.load(path))
        shared = examples_dir() / run_id
        if (shared / "run.json").exists():  # saved again when its evaluation is ready: keyed by the file's time
            return _RUNS.get(("", run_id, (shared / "run.json").stat().st_mtime_ns), lambda: Run.load(shared))
        raise ValueError(f"run {run_id} is not in this workspace")

    def dataset(self, run_id: str) -> Dataset:
        """The data the run was trained on (its test split is what the screens show)."""
        choice = self.get(run_id).meta.get("data")
        if not choice:
            raise DataError(f"run {run_id} does not record its data source")
        return self.ws.data.dataset(choice)

    def train(self, methods: Sequence[str], backbone: str | None = None, preset: str = "quick",
              image_size: int | None = None, aux_source: str = "other categories", token: str | None = None,
              progress: ProgressFn | None = None, window: str | None = None) -> tuple[str, dict[str, "Evaluation"]]:
        """Fit the chosen heads on the current data, evaluate on its labelled test images, save; return
        (run id, evaluation). ``window``: the intensity window of scans and 16-bit images (``medical.Window``;
        None: the default). The settings are checked (``RunConfig``) before any data is read.

        With ``aux_source="annotations"`` zero-shot heads train on the user's annotated TEST images of this
        dataset: those images are excluded from every evaluation of the run (recorded in the run as
        ``excluded_from_evaluation``; ``notes`` says so), so no head is evaluated on its own training data."""
        from ..pipeline import Run, RunConfig

        if not methods:
            raise ValueError("select at least one method")
        unknown = [m for m in methods if m not in list_methods()]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {list_methods()}")
        config = RunConfig.resolve(methods, preset, backbone or None, image_size,
                                   **({} if window is None else {"window": window}))
        choice = self.ws.data.choice()
        ds = self.ws.data.dataset(choice, token)
        if not ds.train and not all(get_method_class(m).zero_shot for m in methods):
            raise DataError(f"{ds.name}: no normal training images")
        aux = self.ws.data.auxiliary(choice, aux_source) if any(get_method_class(m).zero_shot for m in methods) else None
        excluded = sorted({s.name for s in aux}) if aux and aux_source == "annotations" else []
        self.ws.check_disk()
        lim = limits()
        with TRAININGS.hold(self.ws.user, lim.trainings_per_workspace, lim.trainings):
            run = Run(config, workdir=self.dir, token=token or None)
            run.fit(ds.train, within(progress, 0.0, 0.85), aux=aux)
            evaluation: dict[str, Evaluation] = {}
            labelled = [s for s in ds.test if s.label in (0, 1) and s.name not in set(excluded)]
            if labelled:
                step = Stages(within(progress, 0.85, 0.99), [1]).stage(f"evaluating on {len(labelled)} labelled test images")
                evaluation = run.evaluate(labelled, progress=step)
            run.save({"data": choice, "dataset_key": dataset_key(choice), "dataset": ds.summary(),
                      "evaluation": evaluation, "aux_source": aux_source if aux else None,
                      "excluded_from_evaluation": excluded, "n_evaluated": len(labelled)})
        run._token = None  # the token served this call only; the cached run must not keep it
        _RUNS.put((self.ws.user, run.run_id), run)
        (progress or quiet)(Progress(1, 1, stage="saved", overall=1.0))
        return run.run_id, evaluation

    def evaluation(self, run_id: str, labels: str = "dataset") -> dict[str, "Evaluation"]:
        """The run's metrics with the dataset's test labels (saved at training) or with the user's annotations
        (never the images its zero-shot heads trained on)."""
        run = self.get(run_id)
        if labels == "annotations":
            key = run.meta.get("dataset_key") or dataset_key(run.meta.get("data", {}))
            excluded = set(run.meta.get("excluded_from_evaluation") or [])
            samples = [s for s in self.ws.annotations.samples(key) if s.name not in excluded]
            if not samples:
                raise ValueError("no annotations with a normal/anomalous label for this run's dataset yet: "
                                 "label some images in the Annotate tab, or use the dataset labels"
                                 + (f" ({len(excluded)} annotated images trained this run's zero-shot heads and "
                                    "are never evaluated on)" if excluded else ""))
            return run.evaluate(samples, record=False)
        return run.meta.get("evaluation") or {}

    def notes(self, run_id: str) -> list[str]:
        """What a reader of the run's numbers must know: images left out of its evaluation and why, and what
        each head's calibrated 1.0 promises (or that it cannot be calibrated)."""
        run = self.get(run_id)
        out = []
        excluded = run.meta.get("excluded_from_evaluation") or []
        if excluded:
            out.append(f"{len(excluded)} annotated test image{'s' if len(excluded) != 1 else ''} trained the zero-shot "
                       "heads (auxiliary set: annotations) and are excluded from every evaluation of this run.")
        for name, head in run.heads.items():
            if head.combines_heads and head.fit_info.get("weights"):
                used = ", ".join(f"{m} ({w:.2f})" for m, w in head.fit_info["weights"].items() if w > 0)
                out.append(f"{name} combines {used} (weights from held-out normal images; no test label used).")
        out += [f"{name}: {cal.statement}" for name, cal in run.calibration.items()]
        return out

    # ---- scoring and pictures --------------------------------------------------------------------------------
    def scored(self, run_id: str, samples: Sequence[Sample]) -> tuple[dict[str, "Scored"], list[np.ndarray]]:
        """({method: Scored}, views) of ``samples`` under a run; cached per (user, run, images)."""
        run = self.get(run_id)
        key = (self.ws.user, run_id, id(run), tuple(s.name for s in samples), tuple(s.content_key()[:8] for s in samples))

        def make():
            views = [run.backbone.view(s.load()) for s in samples]
            return run.score(list(samples)), views

        return _SCORED.get(key, make)

    def test_samples(self, run_id: str, names: Sequence[str]) -> list[Sample]:
        by_name = {s.name: s for s in self.dataset(run_id).test}
        samples = [by_name[n] for n in names if n in by_name]
        if not samples:
            raise ValueError("select at least one test image")
        return samples

    def grid_rows(self, run_id: str, names: Sequence[str]) -> tuple[list[GridRow], list[str]]:
        """Grid rows of the named test images of the run's dataset and the run's method names."""
        run = self.get(run_id)
        samples = self.test_samples(run_id, names)
        scored, views = self.scored(run_id, samples)
        rows = []
        for i, s in enumerate(samples):
            m = s.load_mask()
            rows.append(GridRow(s.name, views[i], None if m is None else run.backbone.mask_transform(m),
                                {k: v.maps[i] for k, v in scored.items()},
                                {k: float(v.scores[i]) for k, v in scored.items()}, describe(s)))
        return rows, list(scored)

    def example_heatmap(self, run_id: str, method: str) -> Image.Image:
        """One anomalous test image with its ground truth and ``method``'s heatmap (for model cards)."""
        test = self.dataset(run_id).test
        pick = next((s for s in test if s.label == 1), test[0] if test else None)
        if pick is None:
            raise ValueError("the run's dataset has no test images for an example")
        rows, _ = self.grid_rows(run_id, [pick.name])
        return compare_grid(rows, [method], "heatmap", cell=200)

    def export_maps(self, run_id: str, names: Sequence[str], threshold: float = 1.0, vmax: float = 3.0,
                    progress: ProgressFn | None = None) -> Path:
        """A zip of the chosen test images' heatmaps and regions (map >= ``threshold``): per image and method
        a PNG of each at the network's view (grey, 0..``vmax`` calibrated units); per NIfTI volume or DICOM
        series a chosen image belongs to, every slice's heatmap and region as NIfTI volumes aligned with the
        input (same shape and affine). No patient data: names are the samples' (series/instance, slice)."""
        import zipfile

        from .. import medical

        run = self.get(run_id)
        chosen = self.test_samples(run_id, names)
        test = self.dataset(run_id).test
        volumes: dict[tuple, list[Sample]] = {}  # every test slice of each volume a chosen image belongs to
        for s in chosen:
            key = _volume_of(s)
            if key is not None and key not in volumes:
                volumes[key] = [t for t in test if _volume_of(t) == key]
        stages = Stages(progress, [len(chosen)] + [len(v) for v in volumes.values()])
        out = export_path(f"heatmaps-{time.strftime('%Y%m%d-%H%M%S')}.zip")
        safe = lambda name: re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "image"  # noqa: E731
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            scored, _ = self.scored(run_id, chosen)
            step = stages.stage(f"heatmaps of {len(chosen)} images", "images")
            for i, s in enumerate(chosen):
                for m, sc in scored.items():
                    zf.writestr(f"png/{safe(s.name)}/{m}_heatmap.png", medical.export_png(sc.maps[i], vmax=vmax))
                    zf.writestr(f"png/{safe(s.name)}/{m}_region.png", medical.export_png(sc.maps[i] >= threshold))
                step(Progress(i + 1, len(chosen), "images"))
            for key, slices in volumes.items():
                maps = run.score(slices, progress=stages.stage(f"scoring the {len(slices)} slices of a volume"))
                shapes = [s.load().size[::-1] for s in slices]  # (H, W) of each slice, read once
                for m, sc in maps.items():
                    heat = {_slice_index(s, j): medical.to_input_geometry(sc.maps[j], shapes[j], run.backbone.resize,
                                                                          run.backbone.image_size)
                            for j, s in enumerate(slices)}
                    ref = key[1] if key[0] == "nifti" else [s.source for s in slices]
                    axis = "xyz"[key[2]] if key[0] == "nifti" else "z"
                    name = safe(slices[0].name.split("#")[0] if key[0] == "nifti" else key[1])  # file / series
                    zf.writestr(f"nifti/{name}_{m}_heatmap.nii.gz", medical.export_nifti(heat, ref, axis))
                    zf.writestr(f"nifti/{name}_{m}_region.nii.gz", medical.export_nifti(
                        {k: (v >= threshold).astype(np.float32) for k, v in heat.items()}, ref, axis))
            zf.writestr("README.txt", f"Heatmaps of run {run_id}: calibrated units (0 = median normal pixel, 1 = the "
                                      f"normal limit); PNGs scaled 0..{vmax:g}; regions = heatmap >= {threshold:g}.\n")
        return out

    def explain(self, run_id: str, name: str, method: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(view, calibrated heatmap, the method's named explanation arrays) of one test image."""
        run = self.get(run_id)
        if method not in run.heads:
            raise ValueError(f"this run has no {method} head")
        sample = self.test_samples(run_id, [name])[0]
        head = run.heads[method]
        out = head.explain(run.head_features(method, [sample]))
        scored, views = self.scored(run_id, [sample])
        return views[0], scored[method].maps[0], dict(out or {})


def run_label(meta: dict[str, Any]) -> str:
    """A run named after its data, methods, backbone and time (``demo/brick · patchcore · ... · 12-01 07:10``)."""
    cfg = meta.get("config", {})
    when = "example" if meta.get("example") else time.strftime("%m-%d %H:%M", time.localtime(meta.get("created", 0)))
    data = source_label(meta["data"]) if isinstance(meta.get("data"), dict) else meta.get("dataset_key", "?")
    return f"{data} · {'+'.join(cfg.get('methods', []))} · {cfg.get('backbone')} · {when}"


def _volume_of(s: Sample) -> tuple | None:
    """("nifti", file, axis) or ("dicom", series) of a slice sample; None for an ordinary image."""
    src = s.source
    if src is None:
        return None
    if hasattr(src, "axis"):
        return ("nifti", src.path, src.axis)
    return ("dicom", s.name.rsplit("/", 1)[0])  # "<series>/<instance>": one volume per series


def _slice_index(s: Sample, position: int) -> int:
    """Where a slice goes in its exported volume: its index along the axis (NIfTI), its position (DICOM)."""
    return s.source.index if hasattr(s.source, "index") else position
