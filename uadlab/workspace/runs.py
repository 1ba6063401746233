"""Runs of a workspace: train on the current data, load saved runs (a process-wide LRU), score test images
once per (run, images) and hand out what the screens show (view rows, explanations, evaluations)."""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from ..data import DataError, Dataset, Sample
from ..methods import get_method_class, list_methods
from ..progress import Progress, ProgressFn, Stages, quiet, within
from ..safety import TRAININGS, QuotaError, disk_usage, export_path, limits, megabytes
from ..viz import GridRow, compare_grid
from .examples import examples_dir
from .session import ID_RE, LRU
from .sources import DataChoice, dataset_key, describe, source_label

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
        choice = run_data(self.get(run_id).meta)
        if choice is None:
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
            estimate = estimate_run_bytes(run, ds.train)
            try:  # refused before any work: a run must not end past the quota
                self.ws.check_disk(estimate)
            except QuotaError as e:
                raise QuotaError(f"{e} (an estimate of this run's saved heads; train on fewer images, or delete "
                                 "runs or uploads)") from None
            run.fit(ds.train, within(progress, 0.0, 0.85), aux=aux)
            evaluation: dict[str, Evaluation] = {}
            labelled = [s for s in ds.test if s.label in (0, 1) and s.name not in set(excluded)]
            if labelled:
                step = Stages(within(progress, 0.85, 0.99), [1]).stage(f"evaluating on {len(labelled)} labelled test images")
                evaluation = run.evaluate(labelled, progress=step)
            run.save({"data": choice.to_dict(), "dataset_key": dataset_key(choice), "dataset": ds.summary(),
                      "evaluation": evaluation, "estimated_bytes": estimate, "aux_source": aux_source if aux else None,
                      "excluded_from_evaluation": excluded, "n_evaluated": len(labelled)})
            size = disk_usage(run.dir)
            try:  # the estimate bounds the data-sized heads; a network larger than foreseen must not stay either
                self.ws.check_disk()
            except QuotaError as e:
                shutil.rmtree(run.dir, ignore_errors=True)
                raise QuotaError(f"{e}: the trained run took {megabytes(size)} and was not kept") from None
        run._token = None  # the token served this call only; the cached run must not keep it
        _RUNS.put((self.ws.user, run.run_id), run)
        (progress or quiet)(Progress(1, 1, stage="saved", overall=1.0))
        return run.run_id, evaluation

    def evaluation(self, run_id: str, labels: str = "dataset") -> dict[str, "Evaluation"]:
        """The run's metrics with the dataset's test labels (saved at training) or with the user's annotations
        (never the images its zero-shot heads trained on)."""
        run = self.get(run_id)
        if labels == "annotations":
            key = run.meta.get("dataset_key") or dataset_key(run_data(run.meta) or DataChoice("?"))
            excluded = set(run.meta.get("excluded_from_evaluation") or [])
            ds = self.dataset(run_id)
            samples = [s for s in self.ws.annotations.samples(key, images=list(ds.train) + list(ds.test))
                       if s.name not in excluded]
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
            weights = head.fit_record.details.get("member_weights") if head.combines_heads else None
            if weights:
                used = ", ".join(f"{m} ({w:.2f})" for m, w in weights.items() if w > 0)
                out.append(f"{name} combines {used} (weights from held-out normal images; no test label used).")
        out += [f"{name}: {cal.statement}" for name, cal in run.calibration.items()]
        return out

    # ---- scoring and pictures --------------------------------------------------------------------------------
    def scored(self, run_id: str, samples: Sequence[Sample], progress: ProgressFn | None = None, keep: bool = True
               ) -> tuple[dict[str, "Scored"], list[np.ndarray]]:
        """({method: Scored}, views) of ``samples`` under a run; cached per (user, run, images) unless ``keep`` is
        False (one slice of a browsed volume: it must not push the shown images out of the cache)."""
        run = self.get(run_id)
        key = (self.ws.user, run_id, id(run), tuple(s.name for s in samples), tuple(s.content_key()[:8] for s in samples))

        def make():
            views = [run.backbone.view(s.load()) for s in samples]
            return run.score(list(samples), progress=progress), views

        return _SCORED.get(key, make) if keep else _SCORED.peek(key) or make()

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

    def export_maps(self, run_id: str, names: Sequence[str] | None = None, threshold: float = 1.0, vmax: float = 3.0,
                    progress: ProgressFn | None = None, opacity: float = 0.5,
                    display: tuple[str, float, float] | None = None) -> Path:
        """A zip of what the viewer shows, for the named test images (None: every test image of the run).

        ``display`` = (kind, level, width) is the viewer's window / level: for scans of that kind (their unit,
        "HU" or "values") their values through it, for ordinary images ("grey") their grey values through
        DICOM's LINEAR window; the other images through the run's window, as the viewer starts them.

        Per image and method, at the image's own resolution (the part the network sees, as in the viewer):
        ``<method>/<image>_heatmap.png`` (the viewer's colours: viridis on [0, ``vmax``] calibrated units),
        ``<method>/<image>_overlay.png`` (the image, the heatmap at ``opacity``, the region >= ``threshold`` in
        white, the ground truth in magenta, the colour bar), ``<method>/<image>_region.png`` (map >=
        ``threshold``); ``colourbar.png``; ``scores.csv`` (per image: label, and per method the calibrated
        image score, the decision score >= ``threshold`` and the share of pixels >= it); per NIfTI volume or
        DICOM series among the images, every slice's calibrated map and region as NIfTI volumes aligned with
        the input (same shape and affine). Names are the samples' (path, slice; series/instance for DICOM):
        no patient data."""
        import csv
        import io
        import zipfile

        from .. import medical, viz

        run = self.get(run_id)
        test = self.dataset(run_id).test
        chosen = self.test_samples(run_id, names) if names else list(test)
        if not chosen:
            raise ValueError("the run's dataset has no test images to export")
        volumes: dict[tuple, list[Sample]] = {}  # every test slice of each volume a chosen image belongs to
        for s in chosen:
            key = _volume_of(s)
            if key is not None and key not in volumes:
                volumes[key] = [t for t in test if _volume_of(t) == key]
        stages = Stages(progress, [len(chosen), len(chosen)] + [len(v) for v in volumes.values()])
        out = export_path(f"heatmaps-{time.strftime('%Y%m%d-%H%M%S')}.zip")
        png = lambda a: _png_bytes(a)  # noqa: E731
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            scored, _ = self.scored(run_id, chosen, stages.stage(f"scoring {len(chosen)} test images", "images"))
            step = stages.stage(f"heatmaps of {len(chosen)} images", "images")
            rows = []
            for i, s in enumerate(chosen):
                bound = run.window.bind([s])[0]  # what the network and the viewer see
                image = bound.load()
                left, top, right, bottom = run.backbone.view_box(image.size)
                view = np.asarray(image.crop((left, top, right, bottom)).convert("RGB"))
                if display is not None:
                    view = _displayed(bound, view, image.size, (left, top, right, bottom), display)
                size = viz.fit_size(view.shape[1], view.shape[0], 2048)  # the viewer's enlarged view (FULL_MAX)
                if size != (view.shape[1], view.shape[0]):
                    view = np.asarray(Image.fromarray(view).resize(size, Image.LANCZOS))
                m = s.load_mask()
                gt = None if m is None else np.asarray(Image.fromarray((m[top:bottom, left:right] > 0).astype(np.uint8) * 255)
                                                       .resize(size, Image.NEAREST)) > 0
                base = export_name(s.name)
                row = {"image": s.name, "label": {0: "normal", 1: "anomalous"}.get(s.label, "unlabelled")}
                for method, sc in scored.items():
                    heat = sc.maps[i]
                    region = viz.heat_at(heat, size) >= threshold
                    zf.writestr(f"{method}/{base}_heatmap.png", png(viz.heat_layer(heat, size, vmax)))
                    zf.writestr(f"{method}/{base}_overlay.png", png(viz.viewer_overlay(view, heat, threshold, vmax,
                                                                                         opacity, gt)))
                    zf.writestr(f"{method}/{base}_region.png", png(region.astype(np.uint8) * 255))
                    score = float(sc.scores[i])
                    row.update({f"{method} score": f"{score:.4f}",
                                f"{method} decision": "anomalous" if score >= threshold else "normal",
                                f"{method} share >= threshold": f"{float(region.mean()):.5f}"})
                rows.append(row)
                step(Progress(i + 1, len(chosen), "images"))
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            zf.writestr("scores.csv", buf.getvalue())
            zf.writestr("colourbar.png", png(viz.viewer_colorbar(400, vmax, threshold)))
            by_name = {s.name: i for i, s in enumerate(chosen)}
            for key, slices in volumes.items():
                if all(s.name in by_name for s in slices):  # scored above: no second pass
                    maps = {m: [sc.maps[by_name[s.name]] for s in slices] for m, sc in scored.items()}
                else:
                    vol = run.score(slices, progress=stages.stage(f"scoring the {len(slices)} slices of a volume"))
                    maps = {m: list(sc.maps) for m, sc in vol.items()}
                shapes = [s.load().size[::-1] for s in slices]  # (H, W) of each slice, read once
                ref = key[1] if key[0] == "nifti" else [s.source for s in slices]
                axis = "xyz"[key[2]] if key[0] == "nifti" else "z"
                name = export_name(slices[0].name.split("#")[0] if key[0] == "nifti" else key[1])  # file / series
                for m, ms in maps.items():
                    heat = {_slice_index(s, j): medical.to_input_geometry(ms[j], shapes[j], run.backbone.resize,
                                                                          run.backbone.image_size)
                            for j, s in enumerate(slices)}
                    zf.writestr(f"volumes/{name}_{m}_heatmap.nii.gz", medical.export_nifti(heat, ref, axis))
                    zf.writestr(f"volumes/{name}_{m}_region.nii.gz", medical.export_nifti(
                        {k: (v >= threshold).astype(np.float32) for k, v in heat.items()}, ref, axis))
            zf.writestr("README.txt", (
                f"Heatmaps of run {run_id} as the viewer shows them, {len(chosen)} test images.\n"
                "Calibrated units: 0 = the median normal pixel, 1 = the normal limit. Colours: viridis on "
                f"[0, {vmax:g}] (colourbar.png); regions and decisions at the threshold {threshold:g}; overlays at "
                f"opacity {opacity:g}. Images at their own resolution (the part the network sees)"
                + (f", windowed as in the viewer: level {display[1]:g}, width {display[2]:g} "
                   f"({'grey values' if display[0] == 'grey' else display[0]})" if display else "") + ".\n"
                "scores.csv: per image its label and, per method, the calibrated image score, the decision "
                "(score >= threshold) and the share of pixels >= threshold.\n"
                + ("volumes/: per NIfTI volume or DICOM series the calibrated maps and regions of every slice, "
                   "aligned with the input (same shape and affine).\n" if volumes else "")))
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


FILE_OVERHEAD = 64 * 1024  # bytes of a saved run's small files, per head and for the run


def estimate_run_bytes(run: "Run", train: Sequence[Sample]) -> int:
    """An upper bound of the disk a run's data-sized heads will take: a memory bank (AnomalyDINO, PatchCore)
    holds at most every training patch (times the references a head adds per image, times its coreset
    ratio) in float32, at the widths the backbone gives (one image is extracted to measure them; PatchCore's
    width is capped at its ``target_dim``), plus ``FILE_OVERHEAD`` per file set. Networks (whose size does not
    grow with the data, and is known only once built) are not foreseen here: the run is checked again once
    saved, and removed when it passed the quota."""
    total = FILE_OVERHEAD * (1 + len(run.heads))  # run.json; per head its config, card and safetensors header
    if not train:
        return total
    f = run.features(list(train[:1]))  # (1, C, h, w) per layer; cached, so training reuses it
    for head in run.heads.values():
        if "memory_bank" not in dict(head.named_buffers()):
            continue
        maps = [f.maps[l] for l in head.layers_for(run.backbone.spec) if l in f.maps] or list(f.maps.values())
        h, w = maps[0].shape[-2:]
        width = sum(m.shape[1] for m in maps) * getattr(head, "patch_size", 1) ** 2
        if getattr(head, "target_dim", None):
            width = min(width, int(head.target_dim))
        per_image = len(head.reference_augment(list(train[:1])))
        ratio = float(getattr(head, "coreset_ratio", 1.0) or 1.0)
        total += int(len(train) * per_image * h * w * width * 4 * ratio)
    return total


def run_data(meta: dict[str, Any]) -> DataChoice | None:
    """The data choice a saved run was trained on (None when its run.json does not record a valid one)."""
    data = meta.get("data")
    try:
        return DataChoice.from_dict(data) if isinstance(data, dict) else None
    except TypeError:  # no kind: written by hand or damaged
        return None


def run_label(meta: dict[str, Any]) -> str:
    """A run named after its data, methods, backbone and time (``demo/brick · patchcore · ... · 12-01 07:10``)."""
    cfg = meta.get("config", {})
    when = "example" if meta.get("example") else time.strftime("%m-%d %H:%M", time.localtime(meta.get("created", 0)))
    choice = run_data(meta)
    data = source_label(choice) if choice is not None else meta.get("dataset_key", "?")
    return f"{data} · {'+'.join(cfg.get('methods', []))} · {cfg.get('backbone')} · {when}"


def _volume_of(s: Sample) -> tuple | None:
    """("nifti", file, axis) or ("dicom", series) of a slice sample; None for an ordinary image."""
    src = s.source
    if src is None:
        return None
    if hasattr(src, "axis"):
        return ("nifti", src.path, src.axis)
    return ("dicom", s.name.rsplit("/", 1)[0])  # "<series>/<instance>": one volume per series


def export_name(name: str) -> str:
    """A clean file name for an exported image: ``brain/test/lesion/p00.nii.gz#z012`` -> ``brain_test_lesion_p00_z012``
    (no scan suffixes, no characters a file system or a shell minds)."""
    name = re.sub(r"\.(nii\.gz|nii|dcm|dicom|png|jpe?g|bmp|tiff?|webp)(?=#|/|$)", "", name, flags=re.I)
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_.") or "image"


def _displayed(s: Sample, view: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int],
               display: tuple[str, float, float]) -> np.ndarray:
    """``view`` (RGB of the crop ``box``) through the viewer's window ``display`` = (kind, level, width) when
    the image is of that kind (as viewer.js: a scan's values by clip((v - (L - W / 2)) / W), MONOCHROME1
    inverted after; grey values by DICOM's LINEAR window)."""
    from ..medical import voi_window

    kind, level, width = display
    px = s.pixels() if s.has_intensities() else None
    scan = px is not None and not px.colour and px.values.shape[:2] == size[::-1]
    if scan and kind == (px.unit or "values"):
        left, top, right, bottom = box
        v = voi_window(level, width, "LINEAR_EXACT")(np.asarray(px.values, np.float64)[top:bottom, left:right])
        g = np.floor(v * 255 + 0.5)
        g = 255 - g if px.invert else g
        return np.repeat(g.astype(np.uint8)[..., None], 3, 2)
    if not scan and kind == "grey" and (level, width) != (128, 256):
        return np.floor(voi_window(level, width, "LINEAR")(view.astype(np.float64)) * 255 + 0.5).astype(np.uint8)
    return view


def _png_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.asarray(a, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _slice_index(s: Sample, position: int) -> int:
    """Where a slice goes in its exported volume: its index along the axis (NIfTI), its position (DICOM)."""
    return s.source.index if hasattr(s.source, "index") else position
