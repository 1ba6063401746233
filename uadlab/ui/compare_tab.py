"""3 · Compare: every method's heatmap of a test image side by side in the viewer (one calibrated scale,
linked zoom, overlays, a threshold applied at once), ROC and PR curves, the metrics table."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import numpy as np

from .. import viz
from ..safety import public_text
from ..viz import VMAX  # the colour scale: [0, VMAX] calibrated units (1 = the normal limit)
from ..workspace import Workspace
from .common import in_panel, open_workspace, reporter, ui_errors
from .viewer import HEAD, Panel, ViewItem, viewer_html

LABELS = {0: "normal", 1: "anomalous"}


def view_items(ws: Workspace, run_id: str, names: list[str]) -> list[ViewItem]:
    """The chosen test images at their own resolution (the part the network sees), every method's map and
    image score, and the ground truth."""
    run = ws.runs.get(run_id)
    samples = ws.runs.test_samples(run_id, names)
    scored, _ = ws.runs.scored(run_id, samples)
    items = []
    for i, s in enumerate(samples):
        image = s.load()
        left, top, right, bottom = run.backbone.view_box(image.size)
        mask = s.load_mask()
        items.append(ViewItem(s.name, np.asarray(image.crop((left, top, right, bottom))),
                              [Panel(m, sc.maps[i], float(sc.scores[i])) for m, sc in scored.items()],
                              None if mask is None else mask[top:bottom, left:right] > 0,
                              LABELS.get(s.label, "unlabelled")))
    return items


@ui_errors
def on_export_maps(user: str, run_id: str | None, names: list[str], threshold: float, progress=gr.Progress()) -> str:
    """A zip of the chosen images' heatmaps and regions as PNG, and of their volumes as NIfTI (same affine)."""
    if not run_id:
        raise gr.Error("no run selected: train one in the Train tab")
    return str(open_workspace(user).runs.export_maps(run_id, names or [], float(threshold), VMAX,
                                                      progress=reporter(progress)))


@ui_errors
def on_compare(user: str, run_id: str | None, names: list[str], labels: str):
    """(viewer, curves, metrics table) of the chosen test images."""
    if not run_id:
        return viewer_html([]), None, None
    ws = open_workspace(user)
    viewer = viewer_html(view_items(ws, run_id, names or []), vmax=VMAX, elem_id="viewer")
    results = ws.runs.evaluation(run_id, "annotations" if labels == "my annotations" else "dataset")
    return viewer, viz.curves_figure(results) if results else None, viz.metrics_frame(results)


@ui_errors
def on_notes(user: str, run_id: str | None) -> str:
    """What the run's numbers rest on: excluded images, and what each head's 1.0 promises (or cannot)."""
    if not run_id:
        return ""
    return "\n\n".join(public_text(n) for n in open_workspace(user).runs.notes(run_id))


def build(user: gr.State, run: gr.Dropdown) -> SimpleNamespace:
    with gr.Row():
        names = gr.Dropdown([], multiselect=True, label="Test images (step through them with ← →)", scale=4,
                            min_width=240)
        labels = gr.Radio(["dataset labels", "my annotations"], value="dataset labels", label="Labels for metrics",
                          scale=2, min_width=200, elem_id="compare-labels")
    show_btn = gr.Button("Show", variant="primary", elem_id="compare-show")
    status = gr.Markdown(elem_id="compare-status")
    gr.Markdown(f"Heatmaps and image scores of every method on one calibrated scale: 0 = the median normal "
                f"pixel, **1 = the normal limit**: for image scores a split-conformal threshold on held-out normal "
                f"images (a new normal image scores above 1 with at most the promised probability, shown below "
                f"per method, or why it cannot be promised); for heatmaps the 99.9th percentile of held-out normal "
                f"pixels. Colour scale [0, {VMAX:g}]; the threshold draws the region "
                f"at or above it. Wheel or +/− to zoom (all panels together), drag to pan, click a panel to "
                f"see it at the image's own resolution.")
    viewer = gr.HTML(viewer_html([]), head=HEAD, js_on_load=None, elem_id="compare-viewer")
    curves = gr.Plot(label="ROC and precision-recall, image and pixel level", elem_id="curves")
    table = gr.Dataframe(label="Metrics (sort by a column from its ⋮ menu)", interactive=False, elem_id="metrics")
    with gr.Row():
        export_threshold = gr.Number(1.0, label="Export: region threshold", minimum=0, min_width=160)
        export_btn = gr.Button("Export heatmaps (PNG; NIfTI volumes for scans)", min_width=200)
        export_file = gr.File(label="Export", interactive=False, min_width=200, height=100)
    export_status = gr.Markdown()

    def compare(user, run_id, names, labels):
        return (*on_compare(user, run_id, names, labels), on_notes(user, run_id))

    show = (in_panel(compare, status=3, n_outputs=4), [user, run, names, labels], [viewer, curves, table, status])
    show_btn.click(*show)
    labels.change(*show)

    def export(user, run_id, names, threshold, progress=gr.Progress()):
        return on_export_maps(user, run_id, names, threshold, progress), ""

    export_btn.click(in_panel(export, status=1, n_outputs=2), [user, run, names, export_threshold],
                     [export_file, export_status], show_progress_on=[export_status])
    return SimpleNamespace(names=names, show=show)
