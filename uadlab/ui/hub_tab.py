"""Hub: push a trained head (weights, calibration, model card) or load one by id and score images."""
from __future__ import annotations

import os
from types import SimpleNamespace

import gradio as gr

from .. import hub, tokens, viz
from .. import safety as S
from ..backbones import public_backbone
from ..data import open_image
from ..methods import list_methods
from .common import in_panel, open_workspace, ui_errors


@ui_errors
def on_push(user: str, run_id: str | None, method: str | None, repo_id: str, token: str | None, private: bool,
            progress=gr.Progress()):
    ws = open_workspace(user)
    token = tokens.visitor(token)  # the visitor's write token or none: never the server's
    if not run_id or not method:
        raise gr.Error("choose a run and one of its heads")
    progress(0.2, desc="rendering the example heatmap")
    example = ws.runs.example_heatmap(run_id, method)
    progress(0.5, desc="uploading")
    url = hub.push_head(ws.runs.get(run_id), method, repo_id, token=token, private=bool(private), example_image=example)
    return f"Pushed **{method}** to [{url}]({url})"


@ui_errors
def on_hub_score(repo_id: str, token: str | None, method: str, files: list[str] | None, progress=gr.Progress()):
    """Load a head from the Hub (safetensors only) and score the uploaded images through a one-head Run.

    The visitor's token (or none, never the server's) reads the head; the head's backbone must be one the app
    offers (``public_backbone``: a head cannot name a server folder), whose weights follow ``tokens.for_backbone``.
    """
    token = tokens.visitor(token)
    progress(0.1, desc="loading the head")
    head = hub.load_head(S.head_source(repo_id), token=token, method=None if method == "auto" else method)
    public_backbone(head.backbone)
    if not files:
        return [], f"Loaded **{head.name}** on `{head.backbone}`; upload images to score them."
    images = [open_image(f) for f in files]
    progress(0.4, desc="scoring")
    scores, maps, views = hub.score_images(head, images, token=token)
    gallery = [(viz.overlay(v, m), f"{os.path.basename(f)}: score {s:.2f}") for f, s, m, v in
               zip(files, scores, maps, views)]
    from ..postprocess import Calibration

    # what 1.0 promises for this head, or why it promises nothing (too few held-out images when it was trained)
    statement = (head.fit_record.calibration or Calibration.from_dict(None)).statement
    return gallery, f"**{head.name}** on `{head.backbone}`: {len(images)} images scored.\n\n{statement}"


def build(user: gr.State, run: gr.Dropdown) -> SimpleNamespace:
    gr.Markdown("Push a trained head (weights, config, calibration, model card with metrics and an example heatmap) "
                "or load one by repository id and score images. Tokens are used for one call and never stored; with "
                "an empty token none is sent.")
    with gr.Row():
        with gr.Column():
            method = gr.Dropdown([], label="Head of the selected run")
            repo_id = gr.Textbox(label="Repository id", placeholder="your-name/uadlab-patchcore-brick")
            push_token = gr.Textbox(label="Write token", type="password")
            private = gr.Checkbox(label="Private repository", value=True)
            push_btn = gr.Button("Push to the Hub", variant="primary")
            push_md = gr.Markdown()
        with gr.Column():
            load_repo = gr.Textbox(label="Load a head: repository id", placeholder="owner/name")
            load_token = gr.Textbox(label="Token (private repositories)", type="password")
            load_method = gr.Dropdown(["auto", *list_methods()], value="auto", label="Method")
            files = gr.File(label="Images to score", file_count="multiple", file_types=["image"], type="filepath")
            load_btn = gr.Button("Load and score")
            load_md = gr.Markdown(elem_id="hub-load-status")
            gallery = gr.Gallery(label="Heatmaps (shared calibrated scale)", columns=3)
    push_btn.click(in_panel(on_push, status=0, n_outputs=1), [user, run, method, repo_id, push_token, private], push_md)
    load_btn.click(in_panel(on_hub_score, status=1, n_outputs=2), [load_repo, load_token, load_method, files],
                   [gallery, load_md])
    return SimpleNamespace(method=method)
