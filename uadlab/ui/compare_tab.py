"""3 · Compare: heatmaps of every method side by side on one calibrated scale, curves and metrics."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .. import viz
from .common import in_panel, metrics_frame, open_workspace, ui_errors


@ui_errors
def on_compare(user: str, run_id: str | None, names: list[str], threshold: float, labels: str):
    """(heatmap grid, predicted-mask grid, curves, metrics) of the chosen test images."""
    if not run_id:
        return None, None, None, None
    ws = open_workspace(user)
    rows, methods = ws.runs.grid_rows(run_id, names or [])
    results = ws.runs.evaluation(run_id, "annotations" if labels == "my annotations" else "dataset")
    return (viz.compare_grid(rows, methods, "heatmap"), viz.compare_grid(rows, methods, "mask", float(threshold)),
            viz.curves_figure(results) if results else None, metrics_frame(results))


@ui_errors
def on_threshold(user: str, run_id: str, names: list[str], threshold: float):
    rows, methods = open_workspace(user).runs.grid_rows(run_id, names or [])
    return viz.compare_grid(rows, methods, "mask", float(threshold))


def build(user: gr.State, run: gr.Dropdown) -> SimpleNamespace:
    with gr.Row():
        names = gr.Dropdown([], multiselect=True, label="Test images", scale=4)
        labels = gr.Radio(["dataset labels", "my annotations"], value="dataset labels", label="Labels for metrics",
                          scale=2)
    show_btn = gr.Button("Show", variant="primary")
    status = gr.Markdown(elem_id="compare-status")
    gr.Markdown(f"**Heatmaps** on one shared scale [{viz.VMIN:g}, {viz.VMAX:g}] for every method and image "
                f"({viz.SCALE_NOTE}).")
    grid = gr.Image(show_label=False, type="pil", elem_id="compare-grid", buttons=["download", "fullscreen"])
    with gr.Row():
        gr.Markdown("**Predicted masks**: pixels at or above the threshold (calibrated units).")
        threshold = gr.Slider(0, 3, value=1.0, step=0.05, elem_id="threshold", label="Threshold (1 = the normal limit)")
    mask_grid = gr.Image(show_label=False, type="pil", elem_id="mask-grid", buttons=["download", "fullscreen"])
    curves = gr.Plot(label="ROC and precision-recall", elem_id="curves")
    table = gr.Dataframe(label="Metrics", interactive=False, elem_id="metrics")

    def compare(user, run_id, names, threshold, labels):
        return (*on_compare(user, run_id, names, threshold, labels), "")

    io = ([user, run, names, threshold, labels], [grid, mask_grid, curves, table, status])
    shown = in_panel(compare, status=4, n_outputs=5)
    show_btn.click(shown, *io)
    labels.change(shown, *io)
    threshold.release(in_panel(on_threshold, status=0, n_outputs=1), [user, run, names, threshold], mask_grid)
    return SimpleNamespace(names=names, show=(shown, *io))
