"""The scripting API (``gradio_client``): four named endpoints that take and return data, not screens.

    /train     (workspace, data, methods, preset, zip)  -> workspace id, run id, metrics table
    /score     (workspace, run, images)                  -> scores table, heatmaps (images)
    /compare   (workspace, run, names)                   -> scores table of test images, heatmaps (images)
    /evaluate  (workspace, run, labels)                  -> metrics table

A workspace id is the key to a user's uploads, runs and annotations (as in the app's "Your workspace"): an
empty one starts a new workspace, whose id ``/train`` returns. Every other event of the app is private
(``hide_internal``): a client sees these four only. The README shows a five-line client.
"""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import numpy as np

from .. import viz
from ..data import load_files
from ..demo import CATEGORIES
from ..methods import list_methods
from ..workspace import Workspace, default_selection, new_user_id, valid_user_id
from . import data_tab, jobs, train_tab
from .. import safety as S
from .common import reporter, ui_errors

PUBLIC = ("train", "score", "compare", "evaluate")
LABELS = {0: "normal", 1: "anomalous"}


def _workspace(workspace: str | None, create: bool = False) -> Workspace:
    user = (workspace or "").strip().lower()
    if not user and create:
        user = new_user_id()
    if not valid_user_id(user):
        raise gr.Error("workspace: give the id /train returned (8 to 64 hex characters)")
    return Workspace(user)


def _heatmap(view: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The heatmap over the image in the viewer's colours with its colour bar (calibrated, 1 = normal limit)."""
    return viz.with_colorbar(viz.overlay(view, heat))


def _scores_frame(names: list[str], scored: dict, labels: list[str] | None = None):
    import pandas as pd

    rows = [[n] + ([labels[i]] if labels else []) + [round(float(sc.scores[i]), 4) for sc in scored.values()]
            for i, n in enumerate(names)]
    return pd.DataFrame(rows, columns=["image"] + (["label"] if labels else []) + list(scored))


@ui_errors
def api_train(workspace: str | None = None, data: str = "demo/brick", methods: list[str] | None = None,
              preset: str = "quick", zip_file: str | None = None, progress=gr.Progress()):
    """Load the data (``demo/<category>``, or ``zip`` with a zip file in the MVTec layout) into the workspace
    and train: (workspace id, run id, metrics table on the labelled test images)."""
    ws = _workspace(workspace, create=True)
    data = (data or "demo").strip()
    kind, _, category = data.partition("/")
    if zip_file:
        data_tab.on_load_upload(ws.user, category or "all", data_tab.Upload(zip_file=zip_file))
    elif kind == "demo":
        data_tab.on_load_demo(ws.user, category or CATEGORIES[0])
    else:
        raise gr.Error(f"data {data!r}: use demo/<category> ({', '.join(CATEGORIES)}) or send a zip")
    _, table, run_id = train_tab.on_train(ws.user, None, list(methods or ["patchcore"]), preset or "quick", None,
                                          "other categories", None, progress=reporter(progress))
    return ws.user, run_id, table


@ui_errors
def api_score(workspace: str, run: str, images: list[str] | None):
    """Score image files with a run: (table of image scores per method, heatmaps)."""
    ws = _workspace(workspace)
    if not images:
        raise gr.Error("images: send at least one image file")
    samples = load_files(list(images))
    scored, views = ws.runs.scored(run, samples)
    names = [s.name for s in samples]
    gallery = [(_heatmap(views[i], sc.maps[i]), f"{n} · {m} · score {sc.scores[i]:.2f}")
               for i, n in enumerate(names) for m, sc in scored.items()]
    return _scores_frame(names, scored), gallery


@ui_errors
def api_compare(workspace: str, run: str, names: list[str] | None = None):
    """Every method's heatmap of the run's test images ``names`` (empty: a few worth looking at):
    (table of image, label and every method's score, heatmaps)."""
    ws = _workspace(workspace)
    names = list(names or []) or default_selection(ws.runs.dataset(run).test)
    samples = ws.runs.test_samples(run, names)
    scored, views = ws.runs.scored(run, samples)
    names = [s.name for s in samples]
    gallery = [(_heatmap(views[i], sc.maps[i]), f"{n} · {m} · score {sc.scores[i]:.2f}")
               for i, n in enumerate(names) for m, sc in scored.items()]
    return _scores_frame(names, scored, [LABELS.get(s.label, "unlabelled") for s in samples]), gallery


@ui_errors
def api_evaluate(workspace: str, run: str, labels: str = "dataset"):
    """The run's metrics with the dataset's test labels (``dataset``) or the workspace's annotations."""
    ws = _workspace(workspace)
    return viz.metrics_frame(ws.runs.evaluation(run, "annotations" if labels == "annotations" else "dataset"))


def build() -> SimpleNamespace:
    """The four endpoints on components that are never shown (so a client gets files and tables)."""
    with gr.Column(visible=False, elem_id="api-endpoints"):
        workspace = gr.Textbox(None, label="workspace")
        run = gr.Textbox(label="run")
        data = gr.Textbox("demo/brick", label="data")
        methods = gr.Dropdown(list_methods(), value=["patchcore"], multiselect=True, label="methods")
        preset = gr.Radio(["quick", "paper", "tiny"], value="quick", label="preset")
        zip_file = gr.File(label="zip_file", file_types=[".zip"], type="filepath")
        images = gr.File(label="images", file_count="multiple", type="filepath")
        names = gr.Dropdown([], multiselect=True, allow_custom_value=True, label="names")
        labels = gr.Radio(["dataset", "annotations"], value="dataset", label="labels")
        out_ws, out_run = gr.Textbox(label="workspace"), gr.Textbox(label="run")
        table = gr.Dataframe(label="table")
        heatmaps = gr.Gallery(label="heatmaps", format="png")
        go = [gr.Button(f"api {n}") for n in PUBLIC]
    # the same limits as the Train button: one training per workspace queued or running (ui/jobs.py)
    go[0].click(jobs.holding("training", api_train), [workspace, data, methods, preset, zip_file],
                [out_ws, out_run, table], api_name="train", concurrency_limit=S.limits().trainings,
                validator=jobs.validator("training", api_train, show_on="methods"))
    go[1].click(api_score, [workspace, run, images], [table, heatmaps], api_name="score")
    go[2].click(api_compare, [workspace, run, names], [table, heatmaps], api_name="compare")
    go[3].click(api_evaluate, [workspace, run, labels], table, api_name="evaluate")
    return SimpleNamespace(buttons=go)


def hide_internal(demo: gr.Blocks) -> None:
    """The four endpoints keep their names and are public; every other event is private (not in the API page,
    not callable by name) and gives up a public name it took by chance (a screen's ``compare`` callback)."""
    public = {api_train: "train", api_score: "score", api_compare: "compare", api_evaluate: "evaluate"}
    for fn in demo.fns.values():
        own = fn.fn
        while own not in public and hasattr(own, "__wrapped__"):  # /train runs under a job ticket (jobs.holding)
            own = own.__wrapped__
        if own in public:
            fn.api_name, fn.api_visibility = public[own], "public"
        else:
            fn.api_visibility = "private"
            if fn.api_name in PUBLIC:
                fn.api_name = f"{fn.api_name}_screen"
