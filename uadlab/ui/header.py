"""The part above the tabs: the session's workspace id and the run every other screen works on."""
from __future__ import annotations

import gradio as gr

from .. import safety as S
from ..workspace import Workspace, examples, new_user_id, source_label, valid_user_id
from ..workspace.runs import run_data
from .common import open_workspace, ui_errors

INTRO = """## uadlab: unsupervised anomaly detection lab
Train on **normal** images only, then compare where each method finds anomalies; all methods share one calibrated
scale (1 = the normal limit)."""


@ui_errors
def on_start(stored: str | None) -> tuple[str, str, str]:
    """Reuse the workspace id kept in this browser, or create one: (browser value, session value, shown id)."""
    user = stored if valid_user_id(stored) else new_user_id()
    Workspace(user)
    return user, user, user


@ui_errors
def on_switch_workspace(new_id: str) -> tuple[str, str]:
    """Open another workspace id (to share a workspace on purpose, paste its id)."""
    new_id = (new_id or "").strip().lower()
    if not valid_user_id(new_id):
        raise gr.Error("a workspace id is 8 to 64 hex characters")
    Workspace(new_id)
    gr.Info("switched workspace")
    return new_id, new_id


@ui_errors
def on_refresh_runs(user: str, current: str | None):
    """The run choices of this workspace; keeps the current run when it still exists, else the newest."""
    choices = open_workspace(user).runs.choices()
    ids = [c[1] for c in choices]
    return gr.update(choices=choices, value=current if current in ids else (ids[0] if ids else None))


def run_summary(ws: Workspace, run_id: str) -> str:
    run = ws.runs.get(run_id)
    data = run_data(run.meta)
    backbones = "`, `".join(dict.fromkeys(i.backbone for i in run.config.inputs_list()))  # a paper run may hold several
    return (f"**{S.public_text(source_label(data)) if data else '?'}** · backbone `{backbones}` · "
            f"preset {run.config.preset} · image {run.config.image_size} px · methods {', '.join(run.heads)}")


@ui_errors
def on_example_tick(user: str | None, current: str | None):
    """(status line, run picker, example stage, timer) while the example run is prepared: the run is selected
    as soon as it is saved when no run is chosen yet; the stage says when its evaluation has landed."""
    saved = examples.saved_example()
    building = examples.building()
    status = (f"Preparing an example run ({', '.join(examples.METHODS)} on demo/{examples.CATEGORY}, quick preset) "
              f"while you look around: {examples.BUILDER.state}" if building else "")
    pick = on_refresh_runs(user, saved) if saved and not current and valid_user_id(user) else gr.skip()
    stage = "building" if building else ("ready" if saved else "none")
    return status, pick, stage, gr.Timer(active=building)
