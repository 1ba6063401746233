"""3 · Compare: every method's heatmap of a test image side by side in the viewer (one calibrated scale,
linked zoom, overlays, a threshold applied at once), ROC and PR curves, the metrics table."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import numpy as np

from .. import viz
from ..viz import VMAX  # the colour scale: [0, VMAX] calibrated units (1 = the normal limit)
from ..workspace import Workspace
from .common import error_text, in_panel, open_workspace, reporter, ui_errors
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
    return viewer_html(view_items(open_workspace(user), run_id, names or []), vmax=VMAX, elem_id="viewer")


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
    viewer = gr.HTML(viewer_html([]), head=HEAD, js_on_load=None, elem_id="compare-viewer")
    curves = gr.Plot(label="ROC and precision-recall, image and pixel level", elem_id="curves")
    table = gr.Dataframe(label="Metrics (sort by a column from its ⋮ menu)", interactive=False, elem_id="metrics")
    with gr.Row():
        export_threshold = gr.Number(1.0, label="Export: region threshold", minimum=0, min_width=160)
        export_btn = gr.Button("Export heatmaps (PNG; NIfTI volumes for scans)", min_width=200)
        export_file = gr.File(label="Export", interactive=False, min_width=200, height=100)
    export_status = gr.Markdown()

    show = (in_panel(on_show, status=3, n_outputs=4), [user, run, names, labels], [viewer, curves, table, status])
    show_btn.click(*show)
    labels.change(*show)

    def export(user, run_id, names, threshold, progress=gr.Progress()):
        return on_export_maps(user, run_id, names, threshold, progress), ""

    export_btn.click(in_panel(export, status=1, n_outputs=2), [user, run, names, export_threshold],
                     [export_file, export_status], show_progress_on=[export_status])
    return SimpleNamespace(names=names, show=show)
