"""uadlab app: load images, train heads, compare heatmaps side by side, annotate and review, use the Hub.

UI only: every callback is a short call into ``uadlab`` (workspace, viz, hub, safety). Per-session state
holds ids, never models; the browser keeps a random workspace id so a reload finds the same uploads, runs and
annotations. Nothing of the workspace is served: callbacks return images as arrays and exports as temp
copies; messages carry no token and no server path. Run ``python app.py`` (``--port``, ``--share``);
offline, the demo data, EfficientNet-Lite0 and the quick preset give a heatmap in a few clicks.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import traceback

import gradio as gr
import pandas as pd

from uadlab import hub, viz
from uadlab import safety as S
from uadlab import workspace as W
from uadlab.backbones import DEFAULT_IMAGE_SIZE, OFFLINE_DEFAULT, SHORT_NAMES
from uadlab.data import DataError
from uadlab.errors import UadlabError
from uadlab.demo import CATEGORIES
from uadlab.methods import get_method_class, list_methods
from uadlab.store import LABELS

log = logging.getLogger("uadlab.app")
CSS = """
#compare-grid img, #mask-grid img {max-height: none !important; height: auto !important; object-fit: contain;}
#compare-grid, #mask-grid {height: auto !important;}
"""
SOURCES = ["Demo (offline)", "Upload", "Local folder", "Hugging Face dataset"]
DEFAULT_METHODS = [m for m in ("patchcore", "anomalydino") if m in list_methods()]
INTRO = """# uadlab: unsupervised anomaly detection lab
Train on **normal** images only, then see where each method finds anomalies.
**1 Data** (the demo is ready) → **2 Train** → **3 Compare** heatmaps, curves and metrics →
**4 Annotate & review** → **Hub** / **Explain**. Heatmaps of all methods share one calibrated colour scale:
1 = the 99.9th percentile of held-out normal pixels, so normal images stay dark."""


def ui_errors(fn):
    """Show any failure as a red message in the UI (the app goes on), without tokens or server paths.

    The values of the callback's arguments named ``*token*`` are scrubbed from messages and logs.
    """
    names = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        given = {**dict(zip(names, args)), **kwargs}
        secrets = S.secret_variants(v for k, v in given.items() if "token" in k)
        clean = lambda text: S.public_text(S.scrub(str(text), secrets))  # noqa: E731
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:
            raise gr.Error(clean(e.message), print_exception=False) from None
        except (UadlabError, ValueError, KeyError, FileNotFoundError) as e:
            raise gr.Error(clean(str(e).strip("'\"")), print_exception=False) from None
        except Exception as e:  # noqa: BLE001
            log.error("callback %s failed: %s", fn.__name__, clean("".join(traceback.format_exception(e))))
            raise gr.Error(clean(f"{type(e).__name__}: {e}"), print_exception=False) from None

    return wrapper


def _ws(user: str | None) -> W.Workspace:
    if not W.valid_user_id(user):
        raise gr.Error("the session is not ready yet: reload the page")
    return W.Workspace(user)


def _table(results: dict) -> pd.DataFrame:
    headers, rows = viz.metrics_table(results)
    return pd.DataFrame(rows, columns=headers)


# ---- session -----------------------------------------------------------------------------------------------
@ui_errors
def on_start(stored: str | None) -> tuple[str, str, str]:
    """Reuse the workspace id kept in this browser, or create one."""
    user = stored if W.valid_user_id(stored) else W.new_user_id()
    W.Workspace(user)
    return user, user, user


@ui_errors
def on_switch_workspace(new_id: str) -> tuple[str, str]:
    """Open another workspace id (to share a workspace on purpose, paste its id)."""
    new_id = (new_id or "").strip().lower()
    if not W.valid_user_id(new_id):
        raise gr.Error("a workspace id is 8 to 64 hex characters")
    W.Workspace(new_id)
    gr.Info("switched workspace")
    return new_id, new_id


# ---- data -----------------------------------------------------------------------------------------------------
def _data_outputs(ws: W.Workspace, ds, choice: dict):
    s = ds.summary()
    cats = ws.full_dataset(choice).categories if choice.get("kind") != "hf" else ds.categories
    md = (f"**{S.public_text(ds.name)}** · categories: {', '.join(s['categories'])}\n\n"
          f"| train (normal) | test normal | test anomalous | test unlabelled | masks | skipped files |\n"
          f"|---|---|---|---|---|---|\n| {s['train']} | {s['test_normal']} | {s['test_anomalous']} | "
          f"{s['test_unlabelled']} | {'yes' if s['masks'] else 'no'} | {s['skipped']} |")
    preview = [(W.thumbnail(x), f"train · {x.name}") for x in ds.train[:8]]
    preview += [(W.thumbnail(x), f"test · {W.describe(x)} · {x.name}")
                for x in ds.test[:: max(1, len(ds.test) // 16)][:16]]
    bad = S.public_text("\n".join(f"- {w}" for w in ds.warnings[:50])) or "No bad files."
    cat_value = choice.get("category") if choice.get("category") in cats else "all"
    n = max(len(ds.test or ds.train), 1)
    return (md, preview, bad, gr.update(choices=["all"] + cats, value=cat_value),
            gr.update(maximum=n - 1, value=min(ws.prefs().get("annotate_index", 0), n - 1)))


@ui_errors
def on_load_data(user, source, category, zip_file, train_files, test_files, mask_files, unmasked_normal, folder,
                 hf_repo, hf_config, hf_split, hf_test_split, hf_image, hf_label, hf_mask, hf_category, hf_limit,
                 hf_token, progress=gr.Progress()):
    ws = _ws(user)
    hf_token = S.clean_token(hf_token)
    progress(0.1, desc="reading images")
    received = [zip_file, *(train_files or []), *(test_files or []), *(mask_files or [])]
    try:
        if source == "Upload":
            if zip_file:
                choice = ws.add_zip(zip_file)
            else:
                choice = ws.add_files(train_files or [], test_files or [], mask_files or [], bool(unmasked_normal))
        elif source == "Local folder":
            choice = {"kind": "folder", "path": folder}
        elif source == "Hugging Face dataset":
            choice = {"kind": "hf", "repo": hf_repo, "config": hf_config, "split": hf_split,
                      "test_split": hf_test_split, "image_column": hf_image, "label_column": hf_label,
                      "mask_column": hf_mask, "category_column": hf_category, "limit": hf_limit}
        else:
            choice = {"kind": "demo"}
        choice["category"] = category or "all"
        if choice["kind"] != "demo" and category in CATEGORIES:
            choice["category"] = "all"  # the demo's default category means nothing for other data
        ds = ws.set_data(choice, token=hf_token, new_upload=source == "Upload")
    except Exception:
        if source == "Upload":
            S.discard_uploaded_files(received)  # a refused upload leaves nothing on disk
        raise
    return _data_outputs(ws, ds, choice)


@ui_errors
def on_restore_data(user):
    """Show the data source of this workspace; a first visit starts on the demo data (brick)."""
    ws = _ws(user)
    choice = ws.data_choice() or {"kind": "demo", "category": CATEGORIES[0]}
    try:
        ds = ws.set_data(choice)
    except DataError as e:
        gr.Warning(f"could not reopen the last data source: {S.public_text(str(e))}")
        choice = {"kind": "demo", "category": CATEGORIES[0]}
        ds = ws.set_data(choice)
    return _data_outputs(ws, ds, choice)


def on_source_change(source: str):
    return [gr.update(visible=source == s) for s in SOURCES[1:]]


# ---- train and runs ------------------------------------------------------------------------------------------
@ui_errors
def on_train(user, backbone, methods, preset, image_size, aux_source, token, progress=gr.Progress()):
    ws = _ws(user)
    run_id, evaluation = ws.train(methods, backbone or None, preset, None if image_size in (None, "") else int(image_size),
                                  aux_source, S.clean_token(token), progress=lambda p: progress(p.overall or 0.0, desc=p.text))
    msg = f"Run **{run_id}** trained and saved. Open **Compare** to see the heatmaps."
    if not evaluation:
        msg += " (No labelled test images: no metrics.)"
    return msg, _table(evaluation), gr.update(choices=ws.run_choices(), value=run_id)


@ui_errors
def on_refresh_runs(user, current):
    ws = _ws(user)
    choices = ws.run_choices()
    ids = [c[1] for c in choices]
    return gr.update(choices=choices, value=current if current in ids else (ids[0] if ids else None))


@ui_errors
def on_run_change(user, run_id):
    """A run was selected: fill the pickers of Compare, Hub and Explain."""
    if not run_id:
        empty = gr.update(choices=[], value=None)
        return empty, empty, empty, empty, "No run yet: train one in the Train tab."
    ws = _ws(user)
    run = ws.run(run_id)
    ds = ws.run_dataset(run_id)
    names = [s.name for s in ds.test]
    heads = list(run.heads)
    meta = getattr(run, "meta", {})
    info = (f"Run **{run_id}** · data `{S.public_text(meta.get('dataset_key', '?'))}` · "
            f"backbone `{run.config.backbone}` · preset {run.config.preset} · image {run.config.image_size} px · "
            f"methods {', '.join(heads)}")
    return (gr.update(choices=names, value=W.default_selection(ds.test)),
            gr.update(choices=heads, value=heads[0] if heads else None),
            gr.update(choices=names, value=names[0] if names else None),
            gr.update(choices=heads, value=heads[0] if heads else None), info)


# ---- compare -----------------------------------------------------------------------------------------------------
@ui_errors
def on_compare(user, run_id, names, threshold, labels):
    ws = _ws(user)
    if not run_id:
        return None, None, None, None
    grid, masks = ws.compare(run_id, names or [], float(threshold))
    results = ws.evaluation(run_id, "annotations" if labels == "my annotations" else "dataset")
    fig = viz.curves_figure(results) if results else None
    return grid, masks, fig, _table(results)


@ui_errors
def on_threshold(user, run_id, names, threshold):
    ws = _ws(user)
    rows, methods = ws.grid_rows(run_id, names or [])
    return viz.compare_grid(rows, methods, "mask", float(threshold))


# ---- annotate & review ------------------------------------------------------------------------------------------
def _status(ann, s, idx: int, n: int, counts: dict) -> str:
    done = sum(counts.values())
    state = "not annotated yet" if ann is None else (
        f"saved: **{ann.label or 'no label'}**, mask {ann.mask_pixels} px" + (f", note: {ann.note}" if ann.note else ""))
    return (f"Image {idx + 1} of {n}: `{s.name}` · dataset label: {W.describe(s)} · {state}\n\n"
            f"Annotated in this dataset: {done} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'none'})")


@ui_errors
def on_annotate_show(user, idx, run_id, threshold):
    ws = _ws(user)
    s, ann, key, n = ws.annotation_at(idx)
    idx = min(max(int(idx or 0), 0), n - 1)
    heads, review, verdicts = [], [], {}
    if run_id:
        heads = list(ws.run(run_id).heads)
        review = ws.review_panel(run_id, s, float(threshold))
        verdicts = ws.store.reviews(user, key, s.name, run_id)
    agree = [m for m, v in verdicts.items() if v == "agree"]
    disagree = [m for m, v in verdicts.items() if v == "disagree"]
    return (W.editor_value(s.load(), None if ann is None else ann.mask), None if ann is None else ann.label,
            "" if ann is None else ann.note, gr.update(choices=heads, value=agree),
            gr.update(choices=heads, value=disagree), review,
            _status(ann, s, idx, n, ws.store.counts(user, key)))


@ui_errors
def on_annotate_save(user, idx, editor, label, note, agree, disagree, run_id):
    ws = _ws(user)
    s, _, key, n = ws.annotation_at(idx)
    painted = W.mask_from_editor(editor, s.load().size)
    ann = ws.save_annotation(idx, label, painted, note, run_id, agree or [], disagree or [])
    return _status(ann, s, min(max(int(idx or 0), 0), n - 1), n, ws.store.counts(user, key))


@ui_errors
def on_clear_mask(user, idx, label, note, agree, disagree, run_id):
    ws = _ws(user)
    s, _, key, n = ws.annotation_at(idx)
    ann = ws.save_annotation(idx, label, None, note, run_id, agree or [], disagree or [], clear_mask=True)
    return W.editor_value(s.load(), None), _status(ann, s, min(max(int(idx or 0), 0), n - 1), n,
                                                   ws.store.counts(user, key))


@ui_errors
def on_export(user):
    return str(_ws(user).export_annotations())


@ui_errors
def on_review_summary(user, run_id):
    if not run_id:
        return ""
    summ = _ws(user).store.review_summary(user, run_id)
    if not summ:
        return "No verdicts for this run yet."
    return "\n".join(f"- **{m}**: agree {c['agree']}, disagree {c['disagree']}" for m, c in sorted(summ.items()))


# ---- hub ---------------------------------------------------------------------------------------------------------
@ui_errors
def on_push(user, run_id, method, repo_id, token, private, progress=gr.Progress()):
    ws = _ws(user)
    token = S.clean_token(token)
    if not run_id or not method:
        raise gr.Error("choose a run and one of its heads")
    progress(0.2, desc="rendering the example heatmap")
    example = ws.example_heatmap(run_id, method)
    progress(0.5, desc="uploading")
    url = hub.push_head(ws.run(run_id), method, repo_id, token=token, private=bool(private), example_image=example)
    return f"Pushed **{method}** to [{url}]({url})"


@ui_errors
def on_hub_score(repo_id, token, method, files, progress=gr.Progress()):
    from uadlab.data import open_image

    token = S.clean_token(token)
    progress(0.1, desc="loading the head")
    head = hub.load_head(S.head_source(repo_id), token=token, method=None if method == "auto" else method)
    if not files:
        return [], f"Loaded **{head.name}** on `{head.backbone}`; upload images to score them."
    images = [open_image(f) for f in files]
    progress(0.4, desc="scoring")
    scores, maps, views = hub.score_images(head, images, token=token)
    gallery = [(viz.overlay(v, m), f"{os.path.basename(f)}: score {s:.2f}") for f, s, m, v in
               zip(files, scores, maps, views)]
    return gallery, f"**{head.name}** on `{head.backbone}`: {len(images)} images scored (1 = the normal limit)."


# ---- explain -----------------------------------------------------------------------------------------------------
@ui_errors
def on_explain(user, run_id, name, method):
    ws = _ws(user)
    if not run_id:
        raise gr.Error("no run selected")
    images = ws.explain(run_id, name, method)
    cls = get_method_class(method)
    note = "" if len(images) > 1 else "\n\n*This method has no explanation hook: only its heatmap is shown.*"
    return images, f"### {method}\n{cls.summary}\n\n*Paper:* {cls.paper}{note}"


def methods_markdown() -> str:
    parts = []
    for m in list_methods():
        cls = get_method_class(m)
        tag = " (zero-shot: trains on an auxiliary labelled set)" if cls.zero_shot else ""
        parts.append(f"**{m}**{tag}: {cls.summary}  \n*{cls.paper}*")
    return "\n\n".join(parts)


# ---- layout ---------------------------------------------------------------------------------------------------------
def build_app() -> gr.Blocks:
    roots = S.local_roots()
    sources = [s for s in SOURCES if s != "Local folder" or roots]  # folders only where the operator allows them
    # files handed to the browser (heatmaps, exports, uploads) expire from gradio's cache after an hour
    with gr.Blocks(title="uadlab", delete_cache=(S.SERVED_FILES_TTL // 2, S.SERVED_FILES_TTL)) as demo:
        browser_id = gr.BrowserState(None, storage_key="uadlab_workspace_id", secret=W.browser_secret())
        user = gr.State(None)
        gr.Markdown(INTRO)
        with gr.Row():
            run_dd = gr.Dropdown(label="Run (used by Compare, Annotate, Hub, Explain)", choices=[], scale=5,
                                 elem_id="run-select")
            refresh_btn = gr.Button("↻ Runs", scale=1)
        run_info = gr.Markdown(elem_id="run-info")

        with gr.Tabs():
            # -- Data
            with gr.Tab("1 · Data", id="data"):
                source = gr.Radio(sources, value=SOURCES[0], label="Source")
                with gr.Group(visible=False) as g_upload:
                    zip_file = gr.File(label="A zip (MVTec layout: <category>/train/good, test/<defect>, "
                                             "ground_truth/<defect>/*_mask.png; or plain normal images)",
                                       file_types=[".zip"], type="filepath")
                    with gr.Row():
                        train_files = gr.File(label="or: normal training images", file_count="multiple",
                                              file_types=["image"], type="filepath")
                        test_files = gr.File(label="test images (optional)", file_count="multiple",
                                             file_types=["image"], type="filepath")
                        mask_files = gr.File(label="test masks (optional, name.png or name_mask.png)",
                                             file_count="multiple", file_types=["image"], type="filepath")
                    unmasked_normal = gr.Checkbox(label="test images without a mask are normal", value=False)
                with gr.Group(visible=False) as g_folder:
                    folder = gr.Textbox(label="Folder on the server (MVTec layout or a folder of normal images)",
                                        info=f"inside the allowed folders ({', '.join(r.name for r in roots)}); "
                                             f"a relative path starts in {roots[0].name if roots else '-'}")
                with gr.Group(visible=False) as g_hf:
                    with gr.Row():
                        hf_repo = gr.Textbox(label="Dataset id", placeholder="owner/name")
                        hf_config = gr.Textbox(label="Config (optional)")
                        hf_token = gr.Textbox(label="Token for gated data (never stored)", type="password")
                    with gr.Row():
                        hf_split = gr.Textbox(label="Train split", value="train")
                        hf_test_split = gr.Textbox(label="Test split", value="test")
                        hf_limit = gr.Number(label="Max images per split", value=200, precision=0)
                    with gr.Row():
                        hf_image = gr.Textbox(label="Image column", value="image")
                        hf_label = gr.Textbox(label="Label column", value="label")
                        hf_mask = gr.Textbox(label="Mask column (optional)")
                        hf_category = gr.Textbox(label="Category column (optional)")
                with gr.Row():
                    category = gr.Dropdown(["all", *CATEGORIES], value=CATEGORIES[0], label="Category",
                                           allow_custom_value=True, scale=2)
                    load_btn = gr.Button("Load data", variant="primary", scale=1, elem_id="load-data")
                data_md = gr.Markdown(elem_id="data-summary")
                preview = gr.Gallery(label="Preview", columns=8, height=260, elem_id="data-preview")
                with gr.Accordion("Bad files", open=False):
                    bad_md = gr.Markdown()

            # -- Train
            with gr.Tab("2 · Train", id="train"):
                with gr.Row():
                    backbone = gr.Dropdown(list(SHORT_NAMES), value=None, label="Backbone",
                                           allow_custom_value=True, info=f"empty: {OFFLINE_DEFAULT} (works offline), "
                                           "or the paper's with the paper preset; DINO backbones download their "
                                           "weights from the Hub (DINOv3 is gated: token)")
                    preset = gr.Radio(["quick", "paper"], value="quick", label="Preset")
                    image_size = gr.Number(label="Image size (px)", value=None, precision=0,
                                           info=f"empty: the preset's ({DEFAULT_IMAGE_SIZE}, or the paper's geometry)")
                methods = gr.CheckboxGroup(
                    [(m + (" (zero-shot)" if get_method_class(m).zero_shot else ""), m) for m in list_methods()],
                    value=DEFAULT_METHODS, label="Methods", elem_id="methods")
                with gr.Row():
                    aux_source = gr.Radio(["other categories", "annotations"], value="other categories",
                                          label="Auxiliary labelled set for zero-shot methods")
                    token = gr.Textbox(label="Hugging Face token (gated backbones; used once, never stored)",
                                       type="password")
                train_btn = gr.Button("Train", variant="primary", elem_id="train")
                train_md = gr.Markdown(elem_id="train-status")
                train_table = gr.Dataframe(label="Metrics on the labelled test images", interactive=False)

            # -- Compare
            with gr.Tab("3 · Compare", id="compare"):
                with gr.Row():
                    names = gr.Dropdown([], multiselect=True, label="Test images", scale=4)
                    labels = gr.Radio(["dataset labels", "my annotations"], value="dataset labels",
                                      label="Labels for metrics", scale=2)
                compare_btn = gr.Button("Show", variant="primary")
                gr.Markdown(f"**Heatmaps** on one shared scale [{viz.VMIN:g}, {viz.VMAX:g}] for every method and "
                            f"image ({viz.SCALE_NOTE}).")
                grid = gr.Image(show_label=False, type="pil", elem_id="compare-grid", buttons=["download", "fullscreen"])
                with gr.Row():
                    gr.Markdown("**Predicted masks**: pixels at or above the threshold (calibrated units).")
                    threshold = gr.Slider(0, 3, value=1.0, step=0.05, elem_id="threshold",
                                          label="Threshold (1 = the normal limit)")
                mask_grid = gr.Image(show_label=False, type="pil", elem_id="mask-grid", buttons=["download", "fullscreen"])
                curves = gr.Plot(label="ROC and precision-recall", elem_id="curves")
                table = gr.Dataframe(label="Metrics", interactive=False, elem_id="metrics")

            # -- Annotate & review
            with gr.Tab("4 · Annotate & review", id="annotate"):
                with gr.Row():
                    prev_btn = gr.Button("◀ Previous", scale=1)
                    idx = gr.Slider(0, 1, value=0, step=1, label="Image", scale=4, elem_id="ann-index")
                    next_btn = gr.Button("Next ▶", scale=1)
                ann_md = gr.Markdown(elem_id="ann-status")
                with gr.Row():
                    with gr.Column(scale=3):
                        editor = gr.ImageEditor(label="Brush: paint the defect", type="numpy",
                                                format="png", brush=gr.Brush(colors=["#ff0000"], default_size=6,
                                                                             color_mode="fixed"),
                                                transforms=(), sources=(), layers=False, height=420,
                                                elem_id="ann-editor")
                        gr.Markdown("The saved mask shows in red; new strokes are added to it when you save.")
                    with gr.Column(scale=3):
                        review = gr.Gallery(label="Each method: heatmap and predicted mask", columns=2,
                                            height=420, elem_id="review")
                with gr.Row():
                    label = gr.Radio(list(LABELS), label="Label", elem_id="ann-label")
                    note = gr.Textbox(label="Note", scale=2)
                with gr.Row():
                    agree = gr.CheckboxGroup([], label="I agree with the map of")
                    disagree = gr.CheckboxGroup([], label="I disagree with the map of")
                    ann_threshold = gr.Slider(0, 3, value=1.0, step=0.05, label="Mask threshold")
                with gr.Row():
                    save_btn = gr.Button("Save annotation", variant="primary", elem_id="ann-save")
                    clear_btn = gr.Button("Clear the saved mask")
                    export_btn = gr.Button("Export annotations (MVTec zip)")
                export_file = gr.File(label="Export", interactive=False)
                review_md = gr.Markdown()

            # -- Hub
            with gr.Tab("Hub", id="hub"):
                gr.Markdown("Push a trained head (weights, config, calibration, model card with metrics and an "
                            "example heatmap) or load one by repository id and score images. Tokens are used for "
                            "one call and never stored; an empty token uses the server's `hf auth login`.")
                with gr.Row():
                    with gr.Column():
                        push_method = gr.Dropdown([], label="Head of the selected run")
                        repo_id = gr.Textbox(label="Repository id", placeholder="your-name/uadlab-patchcore-brick")
                        push_token = gr.Textbox(label="Write token", type="password")
                        private = gr.Checkbox(label="Private repository", value=True)
                        push_btn = gr.Button("Push to the Hub", variant="primary")
                        push_md = gr.Markdown()
                    with gr.Column():
                        load_repo = gr.Textbox(label="Load a head: repository id", placeholder="owner/name")
                        load_token = gr.Textbox(label="Token (private repositories)", type="password")
                        load_method = gr.Dropdown(["auto", *list_methods()], value="auto", label="Method")
                        load_files = gr.File(label="Images to score", file_count="multiple", file_types=["image"],
                                             type="filepath")
                        load_btn_hub = gr.Button("Load and score")
                        load_md = gr.Markdown()
                        load_gallery = gr.Gallery(label="Heatmaps (shared calibrated scale)", columns=3)

            # -- Explain
            with gr.Tab("Explain", id="explain"):
                with gr.Row():
                    ex_name = gr.Dropdown([], label="Test image", scale=3)
                    ex_method = gr.Dropdown([], label="Method", scale=2)
                    ex_btn = gr.Button("Explain", variant="primary", scale=1)
                with gr.Row():
                    ex_gallery = gr.Gallery(label="Explanations", columns=3, height=360, scale=3)
                    ex_md = gr.Markdown()
                with gr.Accordion("How each method works", open=False):
                    gr.Markdown(methods_markdown())
                ws_id = gr.Textbox(label="Your workspace id (keep it private; paste another id to open a workspace "
                                         "shared with you)", elem_id="ws-id")
                switch_btn = gr.Button("Open this workspace")

        # -- events
        data_inputs = [user, source, category, zip_file, train_files, test_files, mask_files, unmasked_normal, folder,
                       hf_repo, hf_config, hf_split, hf_test_split, hf_image, hf_label, hf_mask, hf_category, hf_limit,
                       hf_token]
        data_outputs = [data_md, preview, bad_md, category, idx]
        run_outputs = [names, push_method, ex_name, ex_method, run_info]
        compare_io = ([user, run_dd, names, threshold, labels], [grid, mask_grid, curves, table])
        ann_show = ([user, idx, run_dd, ann_threshold], [editor, label, note, agree, disagree, review, ann_md])

        start = demo.load(on_start, browser_id, [browser_id, user, ws_id])
        start = start.then(on_restore_data, user, data_outputs).then(on_refresh_runs, [user, run_dd], run_dd)
        start.then(on_annotate_show, *ann_show)
        switch_btn.click(on_switch_workspace, ws_id, [browser_id, user]).then(
            on_restore_data, user, data_outputs).then(on_refresh_runs, [user, run_dd], run_dd)

        source.change(on_source_change, source, [g_upload, g_folder, g_hf])
        load_btn.click(on_load_data, data_inputs, data_outputs).then(on_annotate_show, *ann_show)
        train_btn.click(on_train, [user, backbone, methods, preset, image_size, aux_source, token],
                        [train_md, train_table, run_dd], concurrency_limit=S.limits().trainings)
        refresh_btn.click(on_refresh_runs, [user, run_dd], run_dd)
        run_dd.change(on_run_change, [user, run_dd], run_outputs).then(on_compare, *compare_io).then(
            on_annotate_show, *ann_show).then(on_review_summary, [user, run_dd], review_md)

        compare_btn.click(on_compare, *compare_io)
        labels.change(on_compare, *compare_io)
        threshold.release(on_threshold, [user, run_dd, names, threshold], mask_grid)

        idx.release(on_annotate_show, *ann_show)
        prev_btn.click(lambda i: max(int(i or 0) - 1, 0), idx, idx).then(on_annotate_show, *ann_show)
        next_btn.click(lambda i: int(i or 0) + 1, idx, idx).then(on_annotate_show, *ann_show)
        ann_threshold.release(on_annotate_show, *ann_show)
        save_inputs = [user, idx, editor, label, note, agree, disagree, run_dd]
        save_btn.click(on_annotate_save, save_inputs, ann_md).then(on_annotate_show, *ann_show).then(
            on_review_summary, [user, run_dd], review_md)
        clear_btn.click(on_clear_mask, [user, idx, label, note, agree, disagree, run_dd], [editor, ann_md])
        label.input(on_annotate_save, save_inputs, ann_md)
        note.blur(on_annotate_save, save_inputs, ann_md)
        export_btn.click(on_export, user, export_file)

        push_btn.click(on_push, [user, run_dd, push_method, repo_id, push_token, private], push_md)
        load_btn_hub.click(on_hub_score, [load_repo, load_token, load_method, load_files], [load_gallery, load_md])
        ex_btn.click(on_explain, [user, run_dd, ex_name, ex_method], [ex_gallery, ex_md])
    return demo


def serve(host: str = "127.0.0.1", port: int = 7860, share: bool = False, prevent_thread_lock: bool = False
          ) -> gr.Blocks:
    """Launch the app: nothing under the workspace served (no allowed_paths; it is in blocked_paths), uploads
    capped, the expiry sweep running (at start, then hourly)."""
    guard = S.launch_guard()
    W.start_sweeper()
    demo = build_app()
    demo.queue(default_concurrency_limit=2, max_size=32)
    demo.launch(server_name=host, server_port=port, share=share, show_error=True, theme=gr.themes.Soft(), css=CSS,
                prevent_thread_lock=prevent_thread_lock, **guard)
    return demo


def main() -> None:
    ap = argparse.ArgumentParser(description="uadlab Gradio app")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--share", action="store_true", help="create a public gradio.live link")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(a.host, a.port, a.share)


if __name__ == "__main__":
    main()
