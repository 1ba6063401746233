"""2 · Train: the data it will use, the backbone, preset and methods; progress per stage with counts."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .. import safety as S, tokens
from ..backbones import SHORT_NAMES, public_backbone
from ..medical import WINDOW_PRESETS, Window
from ..settings import DEFAULT_IMAGE_SIZE, MAX_SIDE, MIN_SIDE, OFFLINE_DEFAULT
from ..methods import get_method_class, list_methods
from ..workspace import source_label, thumbnail
from ..viz import metrics_frame
from . import jobs
from .common import in_panel, open_workspace, reporter, ui_errors

DEFAULT_METHODS = [m for m in ("patchcore", "anomalydino") if m in list_methods()]


@ui_errors
def on_train_data(user: str):
    """What a training would use now: (markdown with source and counts, a few training thumbnails)."""
    ws = open_workspace(user)
    choice = ws.data.choice()
    if choice is None:
        return "No data yet: choose it in the **Data** tab.", []
    ds = ws.data.dataset(choice)
    s = ds.summary()
    md = (f"**Trains on** {S.public_text(source_label(choice))}: **{s['train']} normal images** "
          f"(80% fit, 20% calibrate the scale, then a refit on all); evaluates on {s['test_normal']} normal and "
          f"{s['test_anomalous']} anomalous test images"
          + (f"; {s['test_unlabelled']} unlabelled test images are only shown" if s['test_unlabelled'] else "") + ".")
    return md, [(thumbnail(x, 96), x.name) for x in ds.train[:6]]


@ui_errors
def on_train(user: str, backbone: str | None, methods: list[str], preset: str, image_size: float | None,
             aux_source: str, token: str | None, window: str | None = None, progress=gr.Progress()):
    """Train, evaluate and save a run: (status, metrics table, the new run's id). The form's values are only
    parsed here (empty = not chosen); ``RunConfig`` checks them, before any work, as for the CLI."""
    ws = open_workspace(user)
    run_id, evaluation = ws.runs.train(methods, public_backbone(backbone), preset,
                                       None if image_size in (None, "") else image_size, aux_source,
                                       tokens.clean(token), progress=reporter(progress), window=window or None)
    msg = f"Run **{ws.runs.label(run_id)}** trained and saved. Open **Compare** to see the heatmaps."
    if not evaluation:
        msg += " (No labelled test images: no metrics.)"
    return msg, metrics_frame(evaluation), run_id


def build(user: gr.State) -> SimpleNamespace:
    data_md = gr.Markdown(elem_id="train-data")
    data_preview = gr.Gallery(label="Training images (first 6)", columns=6, height=120, elem_id="train-preview")
    with gr.Row():
        backbone = gr.Dropdown(list(SHORT_NAMES), value=None, label="Backbone", allow_custom_value=True,
                               info=f"empty: {OFFLINE_DEFAULT} (works offline), or the paper's with the paper preset; "
                                    "DINO backbones download their weights from the Hub (DINOv3 is gated: token)")
        preset = gr.Radio(["quick", "paper"], value="quick", label="Preset")
        image_size = gr.Number(label="Image size (px)", value=None,
                               info=f"{MIN_SIDE} to {MAX_SIDE} px; empty: the preset's ({DEFAULT_IMAGE_SIZE}, or "
                                    "each method's paper geometry)")
    methods = gr.CheckboxGroup([(m + (" (zero-shot)" if get_method_class(m).zero_shot else ""), m)
                                for m in list_methods()], value=DEFAULT_METHODS, label="Methods", elem_id="methods")
    window = gr.Dropdown(["auto", "minmax", "percentile:0.5,99.5", *WINDOW_PRESETS], value=Window().spec,
                         allow_custom_value=True, label="Intensity window (DICOM, NIfTI, 16-bit images)",
                         info="auto: a DICOM file's own window, else a 0.5-99.5 % percentile window fitted on the "
                              "training images; percentile: that for DICOM too; a CT preset (HU) or CENTRE/WIDTH such as "
                              "40/400. Fitted on the training images, applied to every image, saved with the run.")
    with gr.Row():
        aux_source = gr.Radio(["other categories", "annotations"], value="other categories",
                              label="Auxiliary labelled set for zero-shot methods")
        token = gr.Textbox(label="Hugging Face token (gated backbones; used once, never stored)", type="password")
    train_btn = gr.Button("Train", variant="primary", elem_id="train")
    status = gr.Markdown(elem_id="train-status")
    table = gr.Dataframe(label="Metrics on the labelled test images", interactive=False)
    new_run = gr.State(None)
    # progress shows on the status line only: it never covers the run picker or the form
    # one training queued or running per session, checked when it is submitted (ui/jobs.py)
    trained = train_btn.click(jobs.holding("training", in_panel(on_train, status=0, n_outputs=3)),
                              [user, backbone, methods, preset, image_size, aux_source, token, window],
                              [status, table, new_run], show_progress_on=[status],
                              validator=jobs.validator("training", on_train, show_on="methods"),
                              concurrency_limit=S.limits().trainings)
    return SimpleNamespace(trained=trained, new_run=new_run, data_outputs=[data_md, data_preview])
