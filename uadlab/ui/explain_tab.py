"""Explain: what one method looks at for one test image, next to its calibrated heatmap; how each method works."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .. import viz
from ..methods import get_method_class, list_methods
from .common import in_panel, open_workspace, ui_errors


def methods_markdown() -> str:
    parts = []
    for m in list_methods():
        cls = get_method_class(m)
        tag = " (zero-shot: trains on an auxiliary labelled set)" if cls.zero_shot else ""
        parts.append(f"**{m}**{tag}: {cls.summary}  \n*{cls.paper}*")
    return "\n\n".join(parts)


@ui_errors
def on_explain(user: str, run_id: str | None, name: str, method: str):
    """(gallery: the heatmap with its colour bar, then the method's own explanations, each uncropped, text)."""
    if not run_id:
        raise gr.Error("no run selected: train one in the Train tab")
    view, heat, parts = open_workspace(user).runs.explain(run_id, name, method)
    gallery = [(viz.with_colorbar(viz.overlay(view, heat)), f"{method}: heatmap (calibrated, 1 = normal limit)")]
    gallery += [(viz.explanation_image(v), str(k)) for k, v in parts.items()]
    cls = get_method_class(method)
    note = "" if parts else "\n\n*This method has no explanation hook: only its heatmap is shown.*"
    return gallery, f"### {method}\n{cls.summary}\n\n*Paper:* {cls.paper}{note}"


def build(user: gr.State, run: gr.Dropdown) -> SimpleNamespace:
    with gr.Row():
        name = gr.Dropdown([], label="Test image", scale=3)
        method = gr.Dropdown([], label="Method", scale=2)
        btn = gr.Button("Explain", variant="primary", scale=1)
    with gr.Row():
        gallery = gr.Gallery(label="Explanations", columns=2, height="auto", object_fit="contain", scale=3,
                             elem_id="explain-gallery")
        md = gr.Markdown(elem_id="explain-text")
    with gr.Accordion("How each method works", open=False):
        gr.Markdown(methods_markdown())
    btn.click(in_panel(on_explain, status=1, n_outputs=2), [user, run, name, method], [gallery, md])
    return SimpleNamespace(name=name, method=method)
