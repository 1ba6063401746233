"""End to end: start ``python app.py`` cold on localhost and use it in a real headless Chromium (playwright).

The example run (built in the background at start) shows its heatmaps in the viewer; the viewer is used
as a person would (linked zoom, enlarge, a typed and a dragged threshold); an error stays in its panel;
a quick PatchCore is trained; an annotation is painted, saved and found again after a reload; another
browser sees its own empty workspace; the page has no horizontal overflow at 400 px.

Screenshots at 1280 and 400 px go to ``$UADLAB_E2E_OUT`` (else ``$UADLAB_ARTIFACTS``, default
``artifacts/screenshots``) with ``metrics.json``: ``first_heatmap_s`` (from starting the process to the
first heatmap on screen, cold caches), ``heatmap_px`` (rendered width of one method's panel at 1280),
``overflow_400_px`` and the screenshot names. With ``UADLAB_E2E_OUT`` (or ``UADLAB_BROWSER_FULL_DEMO=1``)
the app runs on its real default demo; otherwise on a small one to keep CI short.

Chromium must be installed at /usr/bin/chromium (Debian package ``chromium``; .ci/run installs it): when it
is missing this test FAILS instead of skipping.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import free_port, viewer_shares, viewer_transforms, wheel_zoom

ROOT = Path(__file__).resolve().parents[1]
E2E_OUT = os.environ.get("UADLAB_E2E_OUT")
OUT = Path(E2E_OUT or os.environ.get("UADLAB_ARTIFACTS", ROOT / "artifacts" / "screenshots"))
SMALL_DEMO = {"n_train": 10, "n_test_good": 3, "n_test_per_defect": 2, "size": 96}
FULL = bool(E2E_OUT) or os.environ.get("UADLAB_BROWSER_FULL_DEMO") == "1"
DEMO = None if FULL else SMALL_DEMO

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app in a subprocess on a free port, with its own (cold) workspace and caches."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("app")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UADLAB_WORKSPACE": str(tmp / "workspace"),
           "UADLAB_CACHE": str(tmp / "cache"), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("UADLAB_DEMO", None)
    if DEMO:
        env["UADLAB_DEMO"] = json.dumps(DEMO)
    log = open(tmp / "app.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=tmp, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with code {proc.returncode}:\n{(tmp / 'app.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                pytest.fail(f"the app did not answer within 120 s:\n{(tmp / 'app.log').read_text()[-3000:]}")
            time.sleep(0.2)
    yield {"url": url, "t0": t0, "ready_s": time.perf_counter() - t0, "log": tmp / "app.log"}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _shot(page, name: str, shots: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / name), full_page=True)
    shots.append(name)


def _overflow(page) -> int:
    return page.evaluate("document.scrollingElement.scrollWidth - window.innerWidth")


def test_app_end_to_end(server, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    shots: list[str] = []
    page.goto(server["url"])

    # 1. first visit: the demo is restored; the example run shows its heatmaps in Compare
    page.wait_for_selector("#data-summary >> text=demo/brick")
    assert page.locator("#data-preview img").count() >= 8
    page.get_by_role("tab", name="3 · Compare").click()
    page.wait_for_selector("#viewer[data-state=ready] .uadv-panel[data-kind=heat] canvas", timeout=240_000)
    first_heatmap_s = time.perf_counter() - server["t0"]
    assert "example" in page.locator("#run-select").inner_text() or \
        "example" in page.eval_on_selector("#run-select input", "e => e.value")
    panels = page.locator("#viewer .uadv-panel[data-kind=heat]")
    methods = panels.evaluate_all("els => els.map(e => e.dataset.method)")
    assert len(methods) == 3 and "patchcore" in methods and "anomalydino" in methods, methods
    heatmap_px = min(panels.nth(i).locator("canvas").bounding_box()["width"] for i in range(panels.count()))
    assert heatmap_px >= 512, heatmap_px
    _shot(page, "compare-1280.png", shots)

    # 2. the viewer: linked zoom, enlarge to the image's own resolution, typed and dragged threshold
    before = viewer_transforms(page)
    zoomed = wheel_zoom(page, panels.nth(0).locator(".uadv-stage"))
    assert len(set(zoomed)) == 1 and zoomed != before, zoomed  # every panel moved the same way
    page.focus("#viewer")
    page.keyboard.press("0")  # keyboard: 0 resets the view
    page.wait_for_function("document.querySelector('#viewer').dataset.zoom === '1.0000'")
    panels.nth(1).locator(".uadv-stage").scroll_into_view_if_needed()
    panels.nth(1).locator(".uadv-stage").click()
    page.wait_for_selector("#viewer-modal canvas")
    big = page.locator("#viewer-modal canvas").bounding_box()
    side = (DEMO or {}).get("size", 160)  # demo images are square: the network sees all of it
    assert (round(big["width"]), round(big["height"])) == (side, side), big
    page.keyboard.press("Escape")
    page.wait_for_selector("#viewer-modal", state="detached")
    shares = viewer_shares(page)
    page.fill("#viewer-thr-num", "0.5")
    page.wait_for_function("document.querySelector('#viewer').dataset.threshold === '0.5'")
    typed = viewer_shares(page)
    assert typed != shares and all(t >= s for t, s in zip(typed, shares)), (shares, typed)
    page.locator("#viewer-thr-range").scroll_into_view_if_needed()
    rb = page.locator("#viewer-thr-range").bounding_box()
    page.mouse.move(rb["x"] + rb["width"] * 0.2, rb["y"] + rb["height"] / 2)
    page.mouse.down()
    page.mouse.move(rb["x"] + rb["width"] * 0.8, rb["y"] + rb["height"] / 2, steps=5)
    page.mouse.up()
    assert float(page.input_value("#viewer-thr-num")) > 1.5 and viewer_shares(page) != typed

    # 3. curves and metrics of the example run
    page.wait_for_selector("#curves .js-plotly-plot .scatterlayer .trace", state="attached", timeout=240_000)
    assert "patchcore" in page.locator("#metrics").inner_text()
    _shot(page, "compare-1280-threshold.png", shots)

    # 4. an error stays in its panel: metrics from "my annotations" with none saved
    page.locator("#compare-labels").get_by_label("my annotations").check()
    page.wait_for_selector("#compare-status .ui-error >> text=no annotations")
    assert page.locator("#viewer[data-state=ready] .uadv-panel[data-kind=heat]").count() == 3  # still shown
    assert page.locator("#curves .js-plotly-plot").count() == 1
    page.locator("#compare-labels").get_by_label("dataset labels").check()
    page.wait_for_selector("#compare-status .ui-error", state="detached")

    # 5. train a quick PatchCore: the Train tab says what it trains on; the new run is selected
    page.get_by_role("tab", name="2 · Train").click()
    page.wait_for_selector("#train-data >> text=normal images")
    boxes = page.locator("#methods input[type=checkbox]")
    for i in range(boxes.count()):
        b = boxes.nth(i)
        b.set_checked(b.evaluate("e => e.closest('label').innerText").strip() == "patchcore")
    page.get_by_role("button", name="Train", exact=True).click()
    page.wait_for_selector("#train-status >> text=trained and saved", timeout=300_000)
    page.wait_for_function("document.querySelector('#run-select input').value.startsWith('demo/brick · patchcore ·')")
    page.get_by_role("tab", name="3 · Compare").click()
    page.wait_for_function("() => [...document.querySelectorAll('#viewer .uadv-panel[data-kind=heat]')]"
                           ".map(e => e.dataset.method).join() === 'patchcore'", timeout=120_000)

    # 6. annotate: paint with the brush, label, save; a reload finds it again
    page.get_by_role("tab", name="4 · Annotate & review").click()
    page.wait_for_selector("#ann-status >> text=Image 1 of")
    page.wait_for_selector("#review img")
    editor = page.locator("#ann-editor")
    editor.get_by_role("button", name="Brush", exact=True).click()
    box = editor.locator("canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 60, cy - 40)
    page.mouse.down()
    for k in range(1, 21):
        page.mouse.move(cx - 60 + 6 * k, cy - 40 + 4 * k)
    page.mouse.up()
    page.locator("#ann-label").get_by_label("anomalous").check()
    page.get_by_role("button", name="Save annotation").click()
    page.wait_for_selector("#ann-status >> text=/saved: anomalous, mask [1-9]\\d* px/")
    px = int(re.search(r"mask (\d+) px", page.locator("#ann-status").inner_text()).group(1))
    assert px > 20
    page.reload()
    page.wait_for_selector("#data-summary >> text=demo/brick")
    page.get_by_role("tab", name="4 · Annotate & review").click()
    page.wait_for_selector(f"#ann-status >> text=saved: anomalous, mask {px} px")
    assert "Annotated in this dataset: 1" in page.locator("#ann-status").inner_text()
    page.wait_for_timeout(1500)  # let the editor draw its canvas
    shown = np.asarray(Image.open(io.BytesIO(page.locator("#ann-editor").screenshot())).convert("RGB")).astype(int)
    red = (shown[..., 0] > 170) & (shown[..., 1] < 90) & (shown[..., 2] < 90)
    assert red.sum() > 100, f"the saved mask is not drawn in the editor after the reload ({red.sum()} red px)"

    # 7. a phone: 400 px wide, no horizontal scrolling, the viewer's panels full width
    page.get_by_role("tab", name="3 · Compare").click()
    page.wait_for_selector("#viewer[data-state=ready] .uadv-panel[data-kind=heat] canvas")
    page.set_viewport_size({"width": 400, "height": 860})
    page.wait_for_timeout(600)
    overflow_400 = _overflow(page)
    root_w = page.eval_on_selector("#viewer", "e => e.getBoundingClientRect().width")
    panel_w = page.locator("#viewer .uadv-panel[data-kind=heat] canvas").first.bounding_box()["width"]
    _shot(page, "compare-400.png", shots)
    for tab in ("1 · Data", "2 · Train", "4 · Annotate & review"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(300)
        overflow_400 = max(overflow_400, _overflow(page))
    _shot(page, "annotate-400.png", shots)
    assert overflow_400 == 0, overflow_400
    assert panel_w >= root_w - 1 and panel_w >= 300, (panel_w, root_w)

    # a wide screen: still no horizontal scrolling
    page.set_viewport_size({"width": 1920, "height": 1080})
    page.get_by_role("tab", name="3 · Compare").click()
    page.wait_for_timeout(600)
    assert _overflow(page) == 0
    _shot(page, "compare-1920.png", shots)

    # another browser (fresh storage) gets its own, empty workspace
    other = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    other.goto(server["url"])
    other.wait_for_selector("#data-summary >> text=demo/brick")
    other.get_by_role("tab", name="4 · Annotate & review").click()
    other.wait_for_selector("#ann-status >> text=Annotated in this dataset: 0")
    other.context.close()
    context.close()
    assert not errors, errors

    metrics = {"first_heatmap_s": round(first_heatmap_s, 1), "app_ready_s": round(server["ready_s"], 1),
               "heatmap_px": round(heatmap_px), "overflow_400_px": overflow_400,
               "demo": DEMO or "default", "screenshots": shots}
    (OUT / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
