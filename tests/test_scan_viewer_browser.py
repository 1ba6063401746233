"""Compare on a CT volume in a real headless Chromium, with the app's own Compare screen and server.

A DICOM CT set (series of CT_small.dcm slices, a lesion series with its DICOM SEG) is uploaded as a zip and
trained (intensity + PatchCore) through the app's callbacks; a gr.Blocks holds the real Compare screen.

At 1280 px: the window / level is in Hounsfield units (typed, and the lung preset) and the image panel's pixels
are the slice's HU through that window; the lesion series' slice slider reaches all its slices with the SEG's
finding slices marked; a slice that was not sent is computed by the server when reached (its map is the run's);
the window stays while stepping through slices; "highest score" jumps to the slice the server scores highest.
The export button takes the viewer's threshold; the exported heatmap of the shown slice is the viewer's enlarged
heat layer (same size, same colours). At 400 px: nothing wider than the screen.
Screenshots go to a temp folder (printed); ``UADLAB_SHOTS=<folder>`` writes them there instead.
"""
from __future__ import annotations

import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import free_port, load_data, viewer_shares
from meddata import make_ct_set

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def ct_app(app, tmp_path_factory):
    import gradio as gr

    from uadlab.ui import compare_tab
    from uadlab.workspace import default_selection

    tmp = tmp_path_factory.mktemp("ct")
    root = make_ct_set(tmp / "set")
    archive = shutil.make_archive(str(tmp / "ct"), "zip", root)
    user = app.header.on_start(None)[0]
    load_data(app, user, "Upload", zip_file=archive)
    _, _, run_id = app.train.on_train(user, "efficientnet_lite0", ["intensity", "patchcore"], "quick", 96,
                                      "other categories", "", "auto", progress=lambda *a, **k: None)
    ws = app.W.Workspace(user)
    test = ws.runs.dataset(run_id).test
    picks = default_selection(test)
    with gr.Blocks() as demo:
        user_state = gr.State(user)
        run = gr.Dropdown([run_id], value=run_id, label="Run")
        compare = compare_tab.build(user_state, run)
        demo.load(lambda: gr.update(choices=[s.name for s in test], value=picks), None, compare.names
                  ).then(*compare.show)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}/", "ws": ws, "run_id": run_id, "test": test, "picks": picks}
    demo.close()


def _ready(page, **data) -> None:
    cond = " && ".join(f"v.dataset.{k} === {v!r}" for k, v in {"state": "ready", **data}.items())
    page.wait_for_function(f"(() => {{ const v = document.querySelector('#viewer'); return v && {cond}; }})()",
                           timeout=60_000)


def _frame(page) -> None:
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def _modal_pixels(page) -> np.ndarray:
    _frame(page)
    w, h, data = page.eval_on_selector("#viewer-modal canvas", """c => [c.width, c.height,
        Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data)]""")
    return np.array(data, np.uint8).reshape(h, w, 4)[..., :3]


def test_compare_on_a_ct_volume(ct_app, browser):
    shots = Path(os.environ.get("UADLAB_SHOTS") or ct_app["ws"].dir / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    ws, run_id, test = ct_app["ws"], ct_app["run_id"], ct_app["test"]
    run = ws.runs.get(run_id)
    page = browser.new_context(viewport={"width": 1280, "height": 1000}, device_scale_factor=1).new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(ct_app["url"])
    _ready(page, index="0")

    # the first pick: a normal series' middle slice, windowed in HU from the run's (fitted) window
    assert ct_app["picks"][0].startswith("chest/test/good/") and ct_app["picks"][1].startswith("chest/test/lesion/")
    assert page.eval_on_selector("#viewer", "v => v.dataset.unit") == "HU"
    level = float(page.input_value("#viewer-level"))
    assert abs(level - (run.window.lo + run.window.hi) / 2) < 0.01 and "(HU)" in page.inner_text("#viewer .uadv-bar")
    # typed level / width in HU: the image is the slice's HU through clip((v - (L - W / 2)) / W)
    page.fill("#viewer-level", "40")
    page.fill("#viewer-width", "400")
    _ready(page, level="40", width="400")
    page.locator("#viewer .uadv-panel[data-kind=image] .uadv-stage").click()
    page.wait_for_selector("#viewer-modal canvas")
    sample = next(s for s in test if s.name == ct_app["picks"][0])
    hu = sample.pixels().values
    want = np.floor(np.clip((hu - (40 - 200)) / 400, 0, 1) * 255 + 0.5)
    got = _modal_pixels(page)[..., 0].astype(float)
    assert got.shape == hu.shape and np.abs(got - want).max() <= 1, np.abs(got - want).max()
    page.keyboard.press("Escape")
    page.click("#viewer button:text-is('lung')")  # the CT presets
    _ready(page, level="-600", width="1500")

    # the lesion series: a slice slider over all 10 slices, the SEG's four finding slices marked
    page.focus("#viewer")
    page.keyboard.press("ArrowRight")
    _ready(page, index="1")
    lesion = [s for s in test if s.name.startswith("chest/test/lesion/")]
    assert page.eval_on_selector("#viewer-slice", "e => [e.max, e.value]") == ["9", str(
        [s.name for s in lesion].index(ct_app["picks"][1]))]
    assert page.eval_on_selector("#viewer .uadv-marks", "e => e.dataset.count") == "4"
    assert page.eval_on_selector("#viewer", "v => [v.dataset.level, v.dataset.width]") == ["-600", "1500"]  # kept
    # a slice that was not sent: the server computes it when the slider reaches it; the map is the run's
    page.fill("#viewer-slice", "0")
    _ready(page, slice="instance 1")
    scored, _ = ws.runs.scored(run_id, [lesion[0]])
    for share, m in zip(viewer_shares(page), ("intensity", "patchcore")):
        heat = scored[m].maps[0]
        assert abs(share - float((heat >= 1.0).mean())) < 2 / heat.size, m
    assert page.eval_on_selector("#viewer", "v => v.dataset.level") == "-600"  # the window stays through slices
    page.screenshot(path=str(shots / "compare-volume-1280.png"), full_page=True)
    # the slice with the highest (first method's) score
    scores = ws.runs.scored(run_id, lesion)[0]["intensity"].scores
    page.click("#viewer-slice-max")
    _ready(page, slice=f"instance {int(np.argmax(scores)) + 1}")
    page.locator("#viewer").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "compare-volume-1280-max.png"), full_page=False)

    # export: the viewer's threshold; the exported heatmap of the shown slice is the viewer's heat layer
    page.fill("#viewer-thr-num", "1.3")
    _ready(page, threshold="1.3")
    shown = lesion[int(np.argmax(scores))]
    page.click("#export-btn")
    link = page.wait_for_selector("#export-file a[href]", timeout=120_000)
    blob = page.request.get(link.get_attribute("href")).body()
    from uadlab.workspace.runs import export_name

    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        readme = zf.read("README.txt").decode()
        assert "threshold 1.3" in readme and "level -600, width 1500 (HU)" in readme  # the viewer's, not the run's
        exported = np.asarray(Image.open(io.BytesIO(zf.read(f"intensity/{export_name(shown.name)}_heatmap.png"))))
        overlay = Image.open(io.BytesIO(zf.read(f"intensity/{export_name(shown.name)}_overlay.png")))
    panel = page.locator("#viewer .uadv-panel[data-method=intensity]")
    panel.screenshot(path=str(shots / "viewer-panel.png"))
    page.fill("#viewer-opacity", "1")
    page.uncheck("#viewer-show-contour")
    page.uncheck("#viewer-show-gt")
    panel.locator("button[title^='enlarge']").click()
    page.wait_for_selector("#viewer-modal canvas")
    seen = _modal_pixels(page).astype(int)
    assert seen.shape == exported.shape  # the slice's own size (128 px; the map is 96 px)
    diff = np.abs(seen - exported)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 3, (diff.mean(), diff.max())
    page.keyboard.press("Escape")
    # side by side for the record: the viewer's panel and the exported overlay
    left = Image.open(shots / "viewer-panel.png").convert("RGB")
    right = overlay.convert("RGB").resize((left.width, round(overlay.height * left.width / overlay.width)))
    both = Image.new("RGB", (left.width * 2 + 24, max(left.height, right.height)), "white")
    both.paste(left, (0, 0))
    both.paste(right, (left.width + 24, 0))
    both.save(shots / "export-vs-viewer.png")

    # 400 px: nothing wider than the screen, the slice slider still there
    small = browser.new_context(viewport={"width": 400, "height": 900}, device_scale_factor=1).new_page()
    small.goto(ct_app["url"])
    small.wait_for_function("document.querySelector('#viewer')?.dataset.state === 'ready'", timeout=60_000)
    small.focus("#viewer")
    small.keyboard.press("ArrowRight")
    small.wait_for_function("document.querySelector('#viewer')?.dataset.index === '1' && "
                            "document.querySelector('#viewer').dataset.state === 'ready'", timeout=60_000)
    assert small.evaluate("document.documentElement.scrollWidth") <= 400
    assert small.locator("#viewer-slice").is_visible()
    small.screenshot(path=str(shots / "compare-volume-400.png"), full_page=True)
    assert not errors, errors
    print(f"screenshots in {shots}")
