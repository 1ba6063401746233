"""1 · Data: choose the images (the demo, an upload, an allowed server folder, a Hugging Face dataset)."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import gradio as gr

from .. import safety as S
from .. import tokens
from ..data import DataError, Dataset
from ..demo import CATEGORIES
from ..workspace import DataChoice, Workspace, describe, source_label, thumbnail
from .common import in_panel, open_workspace, reporter, ui_errors

SOURCES = ["Demo (offline)", "Upload", "Local folder", "Hugging Face dataset"]
UPLOAD_TYPES = ["image", ".dcm", ".nii", ".gz"]  # images, DICOM files, NIfTI volumes (.nii, .nii.gz)


@dataclass
class Upload:
    """The upload form: a zip, or loose normal/test/mask images."""

    zip_file: str | None = None
    train_files: list[str] = field(default_factory=list)
    test_files: list[str] = field(default_factory=list)
    mask_files: list[str] = field(default_factory=list)
    unmasked_normal: bool = False

    @property
    def files(self) -> list[str]:
        return [f for f in (self.zip_file, *(self.train_files or ()), *(self.test_files or ()),
                            *(self.mask_files or ())) if f]


@dataclass
class HfSource:
    """The Hugging Face dataset form (the token travels apart and is never stored)."""

    repo: str = ""
    config: str = ""
    split: str = "train"
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    mask_column: str = ""
    category_column: str = ""
    limit: int | None = 200
    streaming: bool = True  # read only the rows used (a Space must not download a whole dataset)

    def choice(self) -> DataChoice:
        return DataChoice("hf", **self.__dict__)


# ---- callbacks (plain functions: the tests call them) --------------------------------------------------------
def data_view(ws: Workspace, ds: Dataset, choice: DataChoice):
    """(summary, preview gallery, skipped files, category picker) of the current data."""
    s = ds.summary()
    cats = ws.data.categories(choice) if choice.kind != "hf" else ds.categories
    md = (f"**{S.public_text(source_label(choice))}** · dataset `{S.public_text(ds.name)}` · categories: "
          f"{', '.join(s['categories'])}\n\n"
          f"| train (normal) | test normal | test anomalous | test unlabelled | masks | skipped files |\n"
          f"|---|---|---|---|---|---|\n| {s['train']} | {s['test_normal']} | {s['test_anomalous']} | "
          f"{s['test_unlabelled']} | {'yes' if s['masks'] else 'no'} | {s['skipped']} |")
    preview = [(thumbnail(x), f"train · {x.name}") for x in ds.train[:8]]
    preview += [(thumbnail(x), f"test · {describe(x)} · {x.name}")
                for x in ds.test[:: max(1, len(ds.test) // 16)][:16]]
    category = choice.category if choice.category in cats else "all"
    return md, preview, bad_files(ds.warnings), gr.update(choices=["all"] + cats, value=category)


def bad_files(warnings: list[str]) -> str:
    """The skipped files with their reasons, then the notes that skipped nothing (a warning is not a skip)."""
    skipped = [w for w in warnings if w.startswith("skipped ")]
    notes = [w for w in warnings if not w.startswith("skipped ")]
    parts = [(f"**Skipped files ({len(skipped)})**: each with its reason; fix or remove them and load again.\n\n"
              + S.public_text("\n".join(f"- {w[len('skipped '):]}" for w in skipped[:50])))] if skipped else \
        ["No bad files."]
    if notes:
        parts.append(f"**Notes ({len(notes)})**: warnings, no file was skipped for them\n\n"
                     + S.public_text("\n".join(f"- {w}" for w in notes[:20])))
    return "\n\n".join(parts)


def _open(ws: Workspace, choice: DataChoice, category: str | None, token: str | None = None, new_upload: bool = False,
          progress=None):
    # the demo's default category means nothing for other data
    choice = choice.with_category("all" if choice.kind != "demo" and category in CATEGORIES else category or "all")
    return data_view(ws, ws.data.set(choice, token=token, new_upload=new_upload, progress=progress), choice)


@ui_errors
def on_load_demo(user: str, category: str):
    return _open(open_workspace(user), DataChoice("demo"), category)


@ui_errors
def on_load_upload(user: str, category: str, upload: Upload):
    ws = open_workspace(user)
    try:
        if upload.zip_file:
            choice = ws.data.add_zip(upload.zip_file)
        else:
            choice = ws.data.add_files(upload.train_files or [], upload.test_files or [], upload.mask_files or [],
                                       bool(upload.unmasked_normal))
        return _open(ws, choice, category, new_upload=True)
    except Exception:
        S.discard_uploaded_files(upload.files)  # a refused upload leaves nothing on disk
        raise


@ui_errors
def on_load_folder(user: str, category: str, folder: str):
    return _open(open_workspace(user), DataChoice("folder", path=folder), category)


@ui_errors
def on_load_hf(user: str, category: str, source: HfSource, hf_token: str | None, progress=gr.Progress()):
    # the visitor's token or none (``tokens.visitor``): a server's HF_TOKEN never reads data for a visitor
    return _open(open_workspace(user), source.choice(), category, token=tokens.visitor(hf_token) or None,
                 progress=reporter(progress))


@ui_errors
def on_restore_data(user: str):
    """Show the data source of this workspace; a first visit starts on the demo data (brick)."""
    ws = open_workspace(user)
    choice = ws.data.choice() or DataChoice("demo", category=CATEGORIES[0])
    try:
        ds = ws.data.set(choice)
    except DataError as e:
        gr.Warning(f"could not reopen the last data source: {S.public_text(str(e))}")
        choice = DataChoice("demo", category=CATEGORIES[0])
        ds = ws.data.set(choice)
    return data_view(ws, ds, choice)


def on_source_change(source: str):
    return [gr.update(visible=source == s) for s in SOURCES]


# ---- layout ----------------------------------------------------------------------------------------------------
def build(user: gr.State) -> SimpleNamespace:
    """The Data tab's components and its own events; returns what other screens listen to."""
    roots = S.local_roots()
    sources = [s for s in SOURCES if s != "Local folder" or roots]  # folders only where the operator allows them
    source = gr.Radio(sources, value=SOURCES[0], label="Source")
    category = gr.Dropdown(["all", *CATEGORIES], value=CATEGORIES[0], label="Category", allow_custom_value=True)
    with gr.Group(visible=True) as g_demo:
        gr.Markdown("Real scikit-image textures (brick, grass, gravel) with synthetic defects and exact masks.")
        demo_btn = gr.Button("Load the demo", variant="primary", elem_id="load-data")
    with gr.Group(visible=False) as g_upload:
        zip_file = gr.File(label="A zip (MVTec layout: <category>/train/good, test/<defect>, "
                                 "ground_truth/<defect>/*_mask.png; or plain normal images)",
                           file_types=[".zip"], type="filepath")
        with gr.Row():
            train_files = gr.File(label="or: normal training images", file_count="multiple",
                                  file_types=UPLOAD_TYPES, type="filepath")
            test_files = gr.File(label="test images (optional)", file_count="multiple",
                                 file_types=UPLOAD_TYPES, type="filepath")
            mask_files = gr.File(label="test masks (optional, name.png or name_mask.png; a DICOM SEG for DICOM series)",
                                 file_count="multiple", file_types=UPLOAD_TYPES, type="filepath")
        unmasked_normal = gr.Checkbox(label="test images without a mask are normal", value=False)
        upload_btn = gr.Button("Load the upload", variant="primary", elem_id="load-upload")
    with gr.Group(visible=False) as g_folder:
        folder = gr.Textbox(label="Folder on the server (MVTec layout or a folder of normal images)",
                            info=f"inside the allowed folders ({', '.join(r.name for r in roots)}); "
                                 f"a relative path starts in {roots[0].name if roots else '-'}")
        folder_btn = gr.Button("Load the folder", variant="primary", elem_id="load-folder")
    with gr.Group(visible=False) as g_hf:
        with gr.Row():
            hf_repo = gr.Textbox(label="Dataset id", placeholder="owner/name")
            hf_config = gr.Textbox(label="Config (optional)")
            hf_token = gr.Textbox(label="Token for private or gated data (yours; never stored)", type="password")
        with gr.Row():
            hf_split = gr.Textbox(label="Train split", value="train")
            hf_test_split = gr.Textbox(label="Test split", value="test")
            hf_limit = gr.Number(label="Max images per split", value=200, precision=0)
            hf_stream = gr.Checkbox(label="Stream: download only the rows read", value=True)
        with gr.Row():
            hf_image = gr.Textbox(label="Image column", value="image")
            hf_label = gr.Textbox(label="Label column", value="label")
            hf_mask = gr.Textbox(label="Mask column (optional)")
            hf_category = gr.Textbox(label="Category column (optional)")
        hf_btn = gr.Button("Load the dataset", variant="primary", elem_id="load-hf")
    summary = gr.Markdown(elem_id="data-summary")
    bad = gr.Markdown(elem_id="bad-files")
    preview = gr.Gallery(label="Preview", columns=8, height=260, elem_id="data-preview")

    outputs = [summary, preview, bad, category]
    show = lambda fn: in_panel(fn, status=0, n_outputs=len(outputs))  # noqa: E731  errors stay in this panel

    def load_upload(user, category, zip_file, train, test, masks, unmasked):
        return on_load_upload(user, category, Upload(zip_file, train or [], test or [], masks or [], bool(unmasked)))

    def load_hf(user, category, repo, config, split, test_split, limit, stream, image, label, mask, cat_col, token,
                progress=gr.Progress()):
        return on_load_hf(user, category, HfSource(repo, config, split, test_split, image, label, mask, cat_col,
                                                   None if limit in (None, "") else int(limit), bool(stream)), token,
                          progress)

    source.change(on_source_change, source, [g_demo, g_upload, g_folder, g_hf])
    loaded = [
        demo_btn.click(show(on_load_demo), [user, category], outputs),
        upload_btn.click(show(load_upload), [user, category, zip_file, train_files, test_files, mask_files,
                                             unmasked_normal], outputs),
        folder_btn.click(show(on_load_folder), [user, category, folder], outputs),
        hf_btn.click(show(load_hf), [user, category, hf_repo, hf_config, hf_split, hf_test_split, hf_limit, hf_stream,
                                     hf_image, hf_label, hf_mask, hf_category, hf_token], outputs),
    ]
    return SimpleNamespace(outputs=outputs, loaded=loaded, category=category)
