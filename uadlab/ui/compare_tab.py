"""3 · Compare: every method's heatmap of a test image side by side in the viewer (one calibrated scale,
linked zoom, overlays, a threshold applied at once), ROC and PR curves, the metrics table."""
from __future__ import annotations

import functools
import re
import secrets
import threading
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import gradio as gr
import numpy as np

from .. import viz
from ..viz import VMAX  # the colour scale: [0, VMAX] calibrated units (1 = the normal limit)
from ..workspace import Workspace
from ..workspace.session import LRU
from ..workspace.runs import _volume_of
from .common import error_text, in_panel, open_workspace, reporter, ui_errors
from .viewer import HEAD, JS_ON_LOAD, Panel, ViewItem, Volume, item_payload, viewer_html

LABELS = {0: "normal", 1: "anomalous"}
EXPORT_SCOPES = ("all test images", "the images shown")


def _slice_label(s: Any) -> str:
    """A slice in its volume's own numbering: ``z 12`` (NIfTI index along the axis), ``instance 7`` (DICOM
    Instance Number, ``instance 7 frame 3`` in a multi-frame file)."""
    src = s.source
    if hasattr(src, "axis") and hasattr(src, "index"):
        return f"{'xyz'[src.axis]} {src.index}"
    m = re.search(r"instance(\d+)(?:-\d+)?(?:/frame(\d+))?$", s.name)
    if m:
        return f"instance {int(m[1])}" + (f" frame {int(m[2])}" if m[2] else "")
    return s.name.rsplit("/", 1)[-1]


class _Volumes:
    """Volumes the viewer browses: a random handle -> (user, run, slice names), so that a viewer can ask for
    slices it was not sent (``viewer_slice``). A handle is a capability of one session's viewer: random,
    tied to its user's workspace, kept for the last ``size`` volumes shown."""

    def __init__(self, size: int = 256) -> None:
        self._by_handle: OrderedDict[str, tuple[str, str, tuple[str, ...]]] = OrderedDict()
        self._by_key: dict[tuple, str] = {}
        self._lock = threading.Lock()
        self.size = size

    def handle(self, user: str, run_id: str, names: tuple[str, ...]) -> str:
        key = (user, run_id, names)
        with self._lock:
            h = self._by_key.get(key)
            if h is None or h not in self._by_handle:
                h = secrets.token_urlsafe(16)
                self._by_key[key] = h
            self._by_handle[h] = key
            self._by_handle.move_to_end(h)
            while len(self._by_handle) > self.size:
                old, k = self._by_handle.popitem(last=False)
                self._by_key.pop(k, None)
            return h

    def get(self, handle: str) -> tuple[str, str, tuple[str, ...]]:
        with self._lock:
            if not isinstance(handle, str) or handle not in self._by_handle:
                raise ValueError("this volume is no longer open: press Show again")
            return self._by_handle[handle]


VOLUMES = _Volumes()
# (user, handle, k) -> payload: moving back is instant; dropped with the user's workspace when it expires
_SLICES = LRU(256)


def _view_item(run: Any, s: Any, heat: dict[str, tuple[np.ndarray, float]]) -> ViewItem:
    """One test image at its own resolution (the part the network sees): through the run's window, with its
    values in modality units for scans, every method's map and score, and the ground truth."""
    bound = run.window.bind([s])[0]
    image = bound.load()
    left, top, right, bottom = run.backbone.view_box(image.size)
    mask = s.load_mask()
    px = bound.pixels() if bound.has_intensities() else None  # 8-bit images: no second read
    values = unit = window = None
    invert = False
    if px is not None and not px.colour and px.values.shape[:2] == (image.height, image.width):
        values = np.asarray(px.values, np.float32)[top:bottom, left:right]
        unit, window, invert = px.unit, run.window.view_window(px), px.invert
    return ViewItem(s.name, np.asarray(image.crop((left, top, right, bottom))),
                    [Panel(m, h, sc) for m, (h, sc) in heat.items()],
                    None if mask is None else mask[top:bottom, left:right] > 0, LABELS.get(s.label, "unlabelled"),
                    values=values, unit=unit or "", window=window, invert=invert)


def view_items(ws: Workspace, run_id: str, names: list[str], volumes: dict[str, Volume] | None = None,
               keep: bool = True) -> list[ViewItem]:
    """The chosen test images at their own resolution (the part the network sees), every method's map and
    image score, and the ground truth. With ``volumes`` (filled here), the slices of a volume or DICOM series
    name their volume: the viewer then browses all its slices (those not chosen computed when reached).
    ``keep``: keep the scores in the run's cache (not for single slices of a browsed volume)."""
    run = ws.runs.get(run_id)
    samples = ws.runs.test_samples(run_id, names)
    scored, _ = ws.runs.scored(run_id, samples, keep=keep)
    test = ws.runs.dataset(run_id).test if volumes is not None else []
    keys: dict[tuple, str] = {}
    items = []
    for i, s in enumerate(samples):
        it = _view_item(run, s, {m: (sc.maps[i], float(sc.scores[i])) for m, sc in scored.items()})
        vk = _volume_of(s) if volumes is not None else None
        if vk is not None:
            if vk not in keys:
                slices = [t for t in test if _volume_of(t) == vk]
                name = slices[0].name.split("#")[0] if vk[0] == "nifti" else vk[1]
                key = keys[vk] = f"v{len(keys)}"
                volumes[key] = Volume(name.rsplit("/", 1)[-1] if vk[0] == "nifti" else name,
                                      [{"name": t.name, "label": _slice_label(t), "finding": t.label == 1}
                                       for t in slices],
                                      VOLUMES.handle(ws.user, run_id, tuple(t.name for t in slices)))
            key = keys[vk]
            it.volume = key
            it.slice_pos = next(k for k, sl in enumerate(volumes[key].slices) if sl["name"] == s.name)
        items.append(it)
    return items


def _public(fn):
    """A server function's failure as ``{"error": message}`` (no server path, no trace: ``ui_errors``) for the
    viewer to show."""
    safe = ui_errors(fn)

    @functools.wraps(fn)
    def wrapper(request):
        try:
            return safe(request)
        except gr.Error as e:
            return {"error": e.message}

    return wrapper


@_public
def viewer_slice(request: list) -> dict:
    """The viewer's payload of slice k of an open volume, ``request`` = [handle, k] (gradio hands a server
    function the browser's arguments as one list); its heatmaps are computed now, then cached."""
    if not isinstance(request, (list, tuple)) or len(request) != 2:
        raise ValueError("viewer_slice takes [volume handle, slice index]")
    handle, k = request
    user, run_id, names = VOLUMES.get(handle)
    k = int(k)
    if not 0 <= k < len(names):
        raise ValueError(f"slice {k} is outside the volume (0..{len(names) - 1})")

    def make() -> dict:
        item = view_items(open_workspace(user), run_id, [names[k]], keep=False)[0]
        item.volume, item.slice_pos = "v", k  # the viewer files it under the volume it asked about
        return item_payload(item)

    return _SLICES.get((user, handle, k), make)


@_public
def viewer_volume_scores(handle: str) -> dict:
    """Every slice's image score of an open volume per method ({method: [score, ...]}, slices in order)."""
    user, run_id, names = VOLUMES.get(handle)
    ws = open_workspace(user)
    scored, _ = ws.runs.scored(run_id, ws.runs.test_samples(run_id, list(names)))
    return {m: [float(v) if np.isfinite(v) else None for v in sc.scores] for m, sc in scored.items()}


@ui_errors
def on_export_maps(user: str, run_id: str | None, names: list[str], threshold: float, progress=gr.Progress(),
                   scope: str = EXPORT_SCOPES[0], window: str = "") -> str:
    """A zip of what the viewer shows: every test image's (or the shown images') heatmaps in the viewer's
    colours at their own resolution, overlays with the colour bar, regions at the viewer's ``threshold``, a CSV
    of scores and decisions, and the volumes' maps as NIfTI (same affine). ``window`` is the viewer's window /
    level as ``KIND:LEVEL/WIDTH`` (KIND = HU, values or grey; empty: the run's window)."""
    if not run_id:
        raise gr.Error("no run selected: train one in the Train tab")
    if scope not in EXPORT_SCOPES:
        raise gr.Error(f"export scope {scope!r}: choose one of {', '.join(EXPORT_SCOPES)}")
    chosen = None if scope == EXPORT_SCOPES[0] else list(names or [])
    if chosen is not None and not chosen:
        raise gr.Error("no images shown: choose test images, or export all test images")
    t = float(threshold)
    if not np.isfinite(t):
        raise gr.Error(f"threshold {threshold}: a number is needed")
    display = None
    if window:
        kind, _, lw = str(window).partition(":")
        level, _, width = lw.partition("/")
        try:
            display = (kind, float(level), float(width))
        except ValueError:
            raise gr.Error(f"window {window!r}: expected KIND:LEVEL/WIDTH") from None
        if kind not in ("HU", "values", "grey") or not (np.isfinite(display[1]) and display[2] > 0):
            raise gr.Error(f"window {window!r}: expected HU, values or grey, a level and a positive width")
    return str(open_workspace(user).runs.export_maps(run_id, chosen, t, VMAX, progress=reporter(progress),
                                                     display=display))


@ui_errors
def on_metrics(user: str, run_id: str | None, labels: str):
    """(curves, metrics table, small-sample note) of a run with the chosen labels."""
    if not run_id:
        return None, None, ""
    results = open_workspace(user).runs.evaluation(run_id, "annotations" if labels == "my annotations" else "dataset")
    return viz.curves_figure(results) if results else None, viz.metrics_frame(results), viz.small_sample_note(results)


@ui_errors
def on_viewer(user: str, run_id: str | None, names: list[str]) -> str:
    """The viewer of the chosen test images."""
    if not run_id:
        return viewer_html([])
    volumes: dict[str, Volume] = {}
    items = view_items(open_workspace(user), run_id, names or [], volumes)
    return viewer_html(items, vmax=VMAX, elem_id="viewer", volumes=volumes)


def on_compare(user: str, run_id: str | None, names: list[str], labels: str):
    """(viewer, curves, metrics table) of the chosen test images."""
    viewer = on_viewer(user, run_id, names)
    fig, table, _ = on_metrics(user, run_id, labels)
    return viewer, fig, table


def on_show(user: str, run_id: str | None, names: list[str], labels: str):
    """(viewer, curves, metrics table, status) for the Show button and the labels choice. The metrics and the
    viewer fail apart: when the chosen labels give no metrics (no annotations yet), the table and curves
    empty and the status says why, so the previous choice's numbers never stay under the new one; a
    small sample is said in the status too."""
    try:
        fig, table, note = on_metrics(user, run_id, labels)
    except gr.Error as e:
        fig, table, note = None, None, error_text(e.message)
    try:
        viewer = on_viewer(user, run_id, names)
    except gr.Error as e:
        viewer, note = gr.skip(), error_text(e.message) + note
    return viewer, fig, table, note


# the export takes the viewer's threshold and window as they are on screen (the viewer is client-side)
READ_VIEWER_THRESHOLD = """(...args) => {
  const v = document.querySelector('#viewer');
  const t = v ? parseFloat(v.dataset.threshold) : NaN;
  if (isFinite(t)) args[3] = t;
  args[5] = v && v.dataset.unit && v.dataset.level ? `${v.dataset.unit}:${v.dataset.level}/${v.dataset.width}` : "";
  return args;
}"""


def build(user: gr.State, run: gr.Dropdown) -> SimpleNamespace:
    with gr.Row():
        names = gr.Dropdown([], multiselect=True, label="Test images (step through them with ← →)", scale=4,
                            min_width=240)
        labels = gr.Radio(["dataset labels", "my annotations"], value="dataset labels", label="Labels for metrics",
                          scale=2, min_width=200, elem_id="compare-labels")
    show_btn = gr.Button("Show", variant="primary", elem_id="compare-show")
    status = gr.Markdown(elem_id="compare-status")
    gr.Markdown(f"Heatmaps and image scores of every method on one calibrated scale: 0 = the median normal "
                f"pixel, **1 = the normal limit** (the 99.9th percentile of held-out normal pixels; for image "
                f"scores, of held-out normal images). Colour scale [0, {VMAX:g}]; the threshold draws the region "
                f"at or above it. Wheel or +/− to zoom (all panels together), drag to pan, click a panel to "
                f"see it at the image's own resolution.")
    viewer = gr.HTML(viewer_html([]), head=HEAD, js_on_load=JS_ON_LOAD, elem_id="compare-viewer",
                     server_functions=[viewer_slice, viewer_volume_scores])
    curves = gr.Plot(label="ROC and precision-recall, image and pixel level", elem_id="curves")
    table = gr.Dataframe(label="Metrics (sort by a column from its ⋮ menu)", interactive=False, elem_id="metrics")
    with gr.Row():
        export_scope = gr.Radio(list(EXPORT_SCOPES), value=EXPORT_SCOPES[0], label="Export", min_width=200,
                                elem_id="export-scope")
        export_btn = gr.Button("Export heatmaps as shown (viewer's colours and threshold; CSV of scores)",
                               min_width=200, elem_id="export-btn")
        export_threshold = gr.Number(1.0, visible=False)  # replaced by the viewer's threshold at the click
        export_window = gr.Textbox("", visible=False)  # and by its window / level
    export_file = gr.File(label="Export", interactive=False, height=100, elem_id="export-file")
    export_status = gr.Markdown()

    show = (in_panel(on_show, status=3, n_outputs=4), [user, run, names, labels], [viewer, curves, table, status])
    show_btn.click(*show)
    labels.change(*show)

    def export(user, run_id, names, threshold, scope, window, progress=gr.Progress()):
        return on_export_maps(user, run_id, names, threshold, progress, scope, window), ""

    export_btn.click(in_panel(export, status=1, n_outputs=2),
                     [user, run, names, export_threshold, export_scope, export_window],
                     [export_file, export_status], show_progress_on=[export_status], js=READ_VIEWER_THRESHOLD)
    return SimpleNamespace(names=names, show=show)
