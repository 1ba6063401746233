"""The uadlab app, one module per screen.

    header.py       workspace id of the session, the run every screen works on
    data_tab.py     1 · Data: demo, upload, server folder, Hugging Face dataset
    train_tab.py    2 · Train: the data it uses, backbone, preset, methods, progress
    compare_tab.py  3 · Compare: heatmaps side by side, curves, metrics
    annotate_tab.py 4 · Annotate & review: labels, masks, verdicts, export
    hub_tab.py      Hub: push a head, load one and score images
    explain_tab.py  Explain: one method's explanation of one image
    viewer.py       the heatmap viewer (viewer.js, viewer.css): linked zoom, overlays, threshold, keyboard
    common.py       errors (kept in their panel), the session's workspace, progress (a live status line)
    jobs.py         per-session limits of long jobs, checked when submitted (one training queued or running)
    api.py          the scripting API: /train, /score, /compare, /evaluate (every other event is private)

Callbacks are plain functions of a few typed inputs (the tests call them); they reach the package through
``uadlab.workspace``. Per-session state holds ids, never models; the browser keeps a random workspace id so
a reload finds the same uploads, runs and annotations. Nothing of the workspace is served: callbacks return
images as arrays and exports as temp copies; messages carry no token and no server path.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import gradio as gr

from .. import safety as S
from ..workspace import browser_secret, default_selection, examples, start_sweeper
from . import annotate_tab, api, compare_tab, data_tab, explain_tab, header, hub_tab, jobs, train_tab
from .common import open_workspace, ui_errors

HEAD = f"<script>{(Path(__file__).with_name('curves.js')).read_text()}</script>"  # the curves on a phone

CSS = """
.ui-error {border-left: 4px solid #d55e00; background: #fff3eb; padding: 6px 10px; color: #5a2500;}
/* a long job's status line (common.LiveStatus): a bar whose stripes move while the job runs, then the text */
.uad-progress {display: flex; flex-wrap: wrap; align-items: center; gap: 4px 8px; min-height: 2em;}
.uad-progress progress {width: min(260px, 100%); height: 14px; accent-color: #0072b2;}
.uad-progress progress::-webkit-progress-bar {background: #d8dde3; border-radius: 7px;}
.uad-progress progress::-webkit-progress-value {border-radius: 7px; background-color: #0072b2;
  background-image: linear-gradient(45deg, rgba(255,255,255,.3) 25%, transparent 25%, transparent 50%,
  rgba(255,255,255,.3) 50%, rgba(255,255,255,.3) 75%, transparent 75%); background-size: 16px 16px;
  animation: uad-stripes 1s linear infinite;}
@keyframes uad-stripes {from {background-position: 0 0;} to {background-position: 16px 0;}}
/* status lines that gradio's own progress covers must have a height to show it */
#train-status, #hub-load-status {min-height: 2em;}
/* tables: headers break between words, never inside one; a wide table scrolls inside its own box */
.prose table {display: block; max-width: 100%; overflow-x: auto;}
.prose th, .prose td, table th, table th * {word-break: normal !important; overflow-wrap: normal !important;
  hyphens: none;}
/* the curves fit their box (plotly resizes with it): nothing is cut at 400 px */
#curves, #curves .js-plotly-plot {max-width: 100%;}
/* an empty file box (before an export) takes no room */
#export-file:not(:has(a)), #ann-export-file:not(:has(a)) {display: none;}
/* the image editor's toolbar sits under its label, not over it */
#ann-editor > label {position: static;}
#ann-editor > .image-container {position: relative; height: calc(100% - 30px);}
/* the review gallery shows all its rows (gradio caps an "auto" gallery at its first height) */
#review {height: auto !important;}
#review .grid-wrap.fixed-height {max-height: none !important; height: auto !important; overflow: visible;}
/* Compare's status (an error first, then what 1.0 promises per head) scrolls in a few lines: the heatmaps
   stay above the fold */
#compare-status {max-height: 4.6em; overflow-y: auto;}
/* an empty status line takes no room (not even the gap between blocks) */
#example-status:not(:has(p)) {display: none;}
/* the run picker keeps its room on a phone, and a long run name shows more of itself there */
#run-select {min-width: min(100%, 280px);}
@media (max-width: 600px) {#run-select input, .multiselect .token span {font-size: 0.82em;}}
"""


@ui_errors
def on_run_change(user: str, run_id: str | None):
    """A run was selected: fill the pickers of Compare, Hub and Explain, and describe the run."""
    if not run_id:
        empty = gr.update(choices=[], value=None)
        return empty, empty, empty, empty, "No run yet: train one in the Train tab."
    ws = open_workspace(user)
    heads = list(ws.runs.get(run_id).heads)
    test = ws.runs.dataset(run_id).test
    names = [s.name for s in test]
    pick = lambda options: gr.update(choices=options, value=options[0] if options else None)  # noqa: E731
    return (gr.update(choices=names, value=default_selection(test)), pick(heads), pick(names), pick(heads),
            header.run_summary(ws, run_id))


def build_app() -> gr.Blocks:
    # files handed to the browser (heatmaps, exports, uploads) expire from gradio's cache after an hour
    with gr.Blocks(title="uadlab", delete_cache=(S.SERVED_FILES_TTL // 2, S.SERVED_FILES_TTL)) as demo:
        browser_id = gr.BrowserState(None, storage_key="uadlab_workspace_id", secret=browser_secret())
        user = gr.State(None)
        gr.Markdown(header.INTRO)
        with gr.Row():
            run = gr.Dropdown(label="Run (used by Compare, Annotate, Hub, Explain)", choices=[], scale=5,
                              min_width=280, elem_id="run-select")
            refresh = gr.Button("↻ Runs", scale=1, min_width=90)
        run_info = gr.Markdown(elem_id="run-info")
        example_md = gr.Markdown(elem_id="example-status")
        example_stage = gr.State("none")
        ticker = gr.Timer(2.0, active=True)
        with gr.Tabs(overflow_behavior="wrap"):  # every screen stays one tap away on a phone
            with gr.Tab("1 · Data", id="data"):
                data = data_tab.build(user)
            with gr.Tab("2 · Train", id="train"):
                train = train_tab.build(user)
            with gr.Tab("3 · Compare", id="compare"):
                compare = compare_tab.build(user, run)
            with gr.Tab("4 · Annotate & review", id="annotate"):
                annotate = annotate_tab.build(user, run)
            with gr.Tab("Hub", id="hub"):
                hub = hub_tab.build(user, run)
            with gr.Tab("Explain", id="explain"):
                explain = explain_tab.build(user, run)
        with gr.Accordion("Your workspace", open=False):
            ws_id = gr.Textbox(label="Your workspace id (keep it private; paste another id to open a workspace "
                                     "shared with you)", elem_id="ws-id")
            switch = gr.Button("Open this workspace")
        api.build()  # /train, /score, /compare, /evaluate for gradio_client (README); nothing on screen

        # -- across screens
        runs = (header.on_refresh_runs, [user, run], run)
        train_data = (train_tab.on_train_data, user, train.data_outputs)
        images = (annotate_tab.on_images, user, annotate.idx)

        def data_changed(event):
            return annotate.show_after(event.then(*train_data).then(*images))

        data_changed(demo.load(header.on_start, browser_id, [browser_id, user, ws_id]).then(
            data_tab.on_restore_data, user, data.outputs).then(*runs))
        data_changed(switch.click(header.on_switch_workspace, ws_id, [browser_id, user]).then(
            data_tab.on_restore_data, user, data.outputs).then(*runs))
        for loaded in data.loaded:
            data_changed(loaded)
        train.trained.then(header.on_refresh_runs, [user, train.new_run], run)  # select the new run
        ticker.tick(header.on_example_tick, [user, run], [example_md, run, example_stage, ticker], show_progress="hidden")
        example_stage.change(*compare.show)  # the example's curves and metrics arrive after its heatmaps
        refresh.click(*runs)
        annotate.show_after(run.change(on_run_change, [user, run], [compare.names, hub.method, explain.name,
                                                                     explain.method, run_info]).then(*compare.show)
                            ).then(*annotate.summary)
    api.hide_internal(demo)  # the screens' events are theirs: a client sees the four named endpoints only
    jobs.bind(demo)  # per-session job tickets look into this app's queue
    return demo


def serve(host: str = "127.0.0.1", port: int = 7860, share: bool = False, prevent_thread_lock: bool = False
          ) -> gr.Blocks:
    """Launch the app: nothing under the workspace served (no allowed_paths; it is in blocked_paths), uploads
    capped, the expiry sweep running (at start, then hourly)."""
    guard = S.launch_guard()
    examples.start()  # first, so that the example run is ready as early as possible
    start_sweeper()
    demo = build_app()
    demo.queue(default_concurrency_limit=2, max_size=32)
    demo.launch(server_name=host, server_port=port, share=share, show_error=True, theme=gr.themes.Soft(), css=CSS,
                head=HEAD,
                prevent_thread_lock=prevent_thread_lock, **guard)
    return demo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="uadlab Gradio app")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--share", action="store_true", help="create a public gradio.live link")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(a.host, a.port, a.share)
