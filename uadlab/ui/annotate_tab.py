"""4 · Annotate & review: label and paint test images, agree or disagree with each method's map, export."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from .. import viz
from ..workspace.store import LABELS, MAX_NOTE_CHARS, Annotation
from ..data import Sample
from ..workspace import describe
from .common import in_panel, open_workspace, ui_errors

SAVED_MASK = (255, 0, 0)  # the brush paints red; the saved mask is drawn in the same colour under new strokes


def editor_value(image: Image.Image, mask: np.ndarray | None) -> dict[str, Any]:
    """An ImageEditor value: the image with the saved mask (if any) tinted as the background.

    The saved mask is part of the background (the editor does not reliably show preset layers); new brush
    strokes arrive as layers and are ADDED to the saved mask on save (see ``Annotations.save``).
    """
    rgb = np.asarray(image.convert("RGB"))
    if mask is not None and mask.shape == rgb.shape[:2]:
        rgb = viz.mask_overlay(rgb, mask, colour=SAVED_MASK, alpha=0.5)
    bg = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    return {"background": bg, "layers": [], "composite": None}


def mask_from_editor(value: Any, size: tuple[int, int]) -> np.ndarray | None:
    """The painted mask (any layer pixel with alpha > 0) at ``size`` = (W, H); None when nothing is painted."""
    if not isinstance(value, dict):
        return None
    painted = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        a = np.asarray(layer)
        m = a[..., 3] > 0 if a.ndim == 3 and a.shape[-1] == 4 else (a.max(-1) if a.ndim == 3 else a) > 0
        painted = m if painted is None else painted | m
    if painted is None or not painted.any():
        return None
    if painted.shape != (size[1], size[0]):
        painted = np.asarray(Image.fromarray(painted.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    return painted.astype(np.uint8)


def _short(note: str, n: int = 80) -> str:
    """The start of a note for the status line (the note itself stays in its box)."""
    note = " ".join(note.split())
    return note if len(note) <= n else note[:n] + f"… ({len(note):,} characters)"


def _status(ann: Annotation | None, s: Sample, idx: int, n: int, counts: dict) -> str:
    done = sum(counts.values())
    state = "not annotated yet" if ann is None else (
        f"saved: **{ann.label or 'no label'}**, mask {ann.mask_pixels} px"
        + (f", note: {_short(ann.note)}" if ann.note else ""))
    return (f"Image {idx + 1} of {n}: `{s.name}` · dataset label: {describe(s)} · {state}\n\n"
            f"Annotated in this dataset: {done} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'none'})")


def review_panel(ws, run_id: str, sample: Sample, threshold: float) -> list[tuple[np.ndarray, str]]:
    """Each method's heatmap (shared scale, colour bar) and its predicted mask at ``threshold`` for one image."""
    scored, views = ws.runs.scored(run_id, [sample])
    out = []
    for m, sc in scored.items():
        heat = sc.maps[0]
        out.append((viz.with_colorbar(viz.overlay(views[0], heat)), f"{m}: heatmap, image score {sc.scores[0]:.2f}"))
        out.append((viz.mask_overlay(views[0], viz.predicted_mask(heat, threshold), colour=viz.CONTOUR),
                    f"{m}: region ≥ {threshold:g}"))
    return out


@ui_errors
def on_annotate_show(user: str, idx: int, run_id: str | None, threshold: float):
    """(editor, label, note, agree, disagree, review gallery, status) of the image at ``idx``."""
    ws = open_workspace(user)
    s, ann, key, n = ws.annotations.at(idx)
    idx = min(max(int(idx or 0), 0), n - 1)
    heads, review, verdicts = [], [], {}
    if run_id:
        heads = list(ws.runs.get(run_id).heads)
        review = review_panel(ws, run_id, s, float(threshold))
        verdicts = ws.annotations.verdicts(key, s.name, run_id)
    agree = [m for m, v in verdicts.items() if v == "agree"]
    disagree = [m for m, v in verdicts.items() if v == "disagree"]
    return (editor_value(s.load(), None if ann is None else ann.mask), None if ann is None else ann.label,
            "" if ann is None else ann.note, gr.update(choices=heads, value=agree),
            gr.update(choices=heads, value=disagree), review, _status(ann, s, idx, n, ws.annotations.counts(key)))


@ui_errors
def on_annotate_save(user: str, idx: int, editor: Any, label: str | None, note: str, agree: list[str],
                     disagree: list[str], run_id: str | None):
    ws = open_workspace(user)
    s, _, key, n = ws.annotations.at(idx)
    painted = mask_from_editor(editor, s.load().size)
    ann = ws.annotations.save(idx, label, painted, note, run_id, agree or [], disagree or [])
    return _status(ann, s, min(max(int(idx or 0), 0), n - 1), n, ws.annotations.counts(key))


@ui_errors
def on_clear_mask(user: str, idx: int, label: str | None, note: str, agree: list[str], disagree: list[str],
                  run_id: str | None):
    ws = open_workspace(user)
    s, _, key, n = ws.annotations.at(idx)
    ann = ws.annotations.save(idx, label, None, note, run_id, agree or [], disagree or [], clear_mask=True)
    return editor_value(s.load(), None), _status(ann, s, min(max(int(idx or 0), 0), n - 1), n,
                                                 ws.annotations.counts(key))


@ui_errors
def on_export(user: str) -> str:
    return str(open_workspace(user).annotations.export())


@ui_errors
def on_review_summary(user: str, run_id: str | None) -> str:
    if not run_id:
        return ""
    summary = open_workspace(user).annotations.review_summary(run_id)
    if not summary:
        return "No verdicts for this run yet."
    return "\n".join(f"- **{m}**: agree {c['agree']}, disagree {c['disagree']}" for m, c in sorted(summary.items()))


@ui_errors
def on_images(user: str):
    """The image slider for the current data (kept at the last annotated position)."""
    ws = open_workspace(user)
    n = max(len(ws.annotations.images()[0]), 1)
    return gr.update(maximum=n - 1, value=min(ws.prefs().get("annotate_index", 0), n - 1))


def build(user: gr.State, run: gr.Dropdown) -> SimpleNamespace:
    with gr.Row():
        prev_btn = gr.Button("◀ Previous", scale=1)
        idx = gr.Slider(0, 1, value=0, step=1, label="Image", scale=4, elem_id="ann-index")
        next_btn = gr.Button("Next ▶", scale=1)
    status = gr.Markdown(elem_id="ann-status")
    with gr.Row():
        with gr.Column(scale=3, min_width=300):
            editor = gr.ImageEditor(label="Brush: paint the defect", type="numpy", format="png",
                                    brush=gr.Brush(colors=["#ff0000"], default_size=6, color_mode="fixed"),
                                    transforms=(), sources=(), layers=False, height=420, elem_id="ann-editor")
            gr.Markdown("The saved mask shows in red; new strokes are added to it when you save.")
        with gr.Column(scale=3, min_width=300):
            review = gr.Gallery(label="Each method: heatmap and predicted region", columns=2, height="auto",
                                object_fit="contain", elem_id="review")
    with gr.Row():
        label = gr.Radio(list(LABELS), label="Label", elem_id="ann-label")
        note = gr.Textbox(label="Note", scale=2, max_length=MAX_NOTE_CHARS)
    with gr.Row():
        agree = gr.CheckboxGroup([], label="I agree with the map of")
        disagree = gr.CheckboxGroup([], label="I disagree with the map of")
        threshold = gr.Slider(0, 3, value=1.0, step=0.05, label="Region threshold (1 = the normal limit)")
    with gr.Row():
        save_btn = gr.Button("Save annotation", variant="primary", elem_id="ann-save")
        clear_btn = gr.Button("Clear the saved mask")
        export_btn = gr.Button("Export annotations (MVTec zip)")
    with gr.Row():
        export_file = gr.File(label="Export", interactive=False)
        export_status = gr.Markdown()
    summary = gr.Markdown()

    outputs = [editor, label, note, agree, disagree, review, status]
    show = (in_panel(on_annotate_show, status=6, n_outputs=7), [user, idx, run, threshold], outputs)
    save_inputs = [user, idx, editor, label, note, agree, disagree, run]
    saved = lambda fn: in_panel(fn, status=0, n_outputs=1)  # noqa: E731
    idx.release(*show)
    prev_btn.click(lambda i: max(int(i or 0) - 1, 0), idx, idx).then(*show)
    next_btn.click(lambda i: int(i or 0) + 1, idx, idx).then(*show)
    threshold.input(*show, trigger_mode="always_last")  # typed or dragged: applies at once
    save_btn.click(saved(on_annotate_save), save_inputs, status).then(*show).then(on_review_summary, [user, run], summary)
    clear_btn.click(in_panel(on_clear_mask, status=1, n_outputs=2), [user, idx, label, note, agree, disagree, run],
                    [editor, status])
    label.input(saved(on_annotate_save), save_inputs, status)
    note.blur(saved(on_annotate_save), save_inputs, status)
    def export(user):
        return on_export(user), "Exported: the zip holds your labels and masks in the MVTec layout."

    export_btn.click(in_panel(export, status=1, n_outputs=2), user, [export_file, export_status], api_name="on_export")
    return SimpleNamespace(idx=idx, show=show, summary=(on_review_summary, [user, run], summary))
