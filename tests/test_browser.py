"""End to end: start ``python app.py`` on localhost and drive it in a real headless Chromium (playwright).

Load the demo data, train a quick PatchCore, see the comparison grid and the plotly ROC curve, paint an
annotation and save it, reload the page and find the annotation again. A screenshot of every step goes to
``$UADLAB_ARTIFACTS`` (default ``artifacts/screenshots``); the time from starting the app to the first
heatmap is written next to them (``timings.json``).

Chromium must be installed at /usr/bin/chromium (Debian package ``chromium``; .ci/run installs it): when it
is missing this test FAILS instead of skipping.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("UADLAB_ARTIFACTS", ROOT / "artifacts" / "screenshots"))
SMALL_DEMO = {"n_train": 10, "n_test_good": 3, "n_test_per_defect": 2, "size": 96}
# UADLAB_BROWSER_FULL_DEMO=1 runs on the app's real default demo (to time `python app.py` -> first heatmap)
DEMO = None if os.environ.get("UADLAB_BROWSER_FULL_DEMO") == "1" else SMALL_DEMO

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app in a subprocess on a free port, with its own workspace and caches."""
    port = _free_port()
    tmp = tmp_path_factory.mktemp("app")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UADLAB_WORKSPACE": str(tmp / "workspace"),
           "UADLAB_CACHE": str(tmp / "cache"), "GRADIO_ANALYTICS_ENABLED": "False"}
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
            time.sleep(0.5)
    yield {"url": url, "t0": t0, "ready_s": time.perf_counter() - t0, "log": tmp / "app.log"}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail(f"Chromium is not installed ({CHROMIUM} missing): run `apt-get install -y chromium` "
                    "(.ci/run does this) -- the browser test needs a real Chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                              headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_data_train_compare_annotate_reload(server, browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server["url"])
    shots = []

    # 1. data: the demo is restored on the first visit; load it explicitly too
    page.wait_for_selector("#data-summary >> text=demo/brick")
    page.locator("#load-data").click()
    page.wait_for_selector("#data-summary >> text=demo/brick")
    summary = page.locator("#data-summary").inner_text()
    assert "train (normal)" in summary and str((DEMO or {}).get("n_train", 30)) in summary, summary
    assert page.locator("#data-preview img").count() >= 8
    shots.append(_shot(page, "01_data.png"))

    # 2. train a quick PatchCore (only PatchCore ticked)
    page.get_by_role("tab", name="2 · Train").click()
    boxes = page.locator("#methods input[type=checkbox]")
    for i in range(boxes.count()):
        box = boxes.nth(i)
        label = box.evaluate("e => e.closest('label').innerText").strip()
        box.set_checked(label == "patchcore")
    page.get_by_role("button", name="Train", exact=True).click()
    page.wait_for_selector("#train-status >> text=trained and saved", timeout=150_000)
    shots.append(_shot(page, "02_train.png"))

    # 3. compare: the grid and the plotly ROC curve render after training, with the metrics table
    page.get_by_role("tab", name="3 · Compare").click()
    page.wait_for_function("() => { const i = document.querySelector('#compare-grid img');"
                           " return i && i.complete && i.naturalWidth > 300; }", timeout=120_000)
    first_heatmap_s = time.perf_counter() - server["t0"]
    page.wait_for_selector("#curves .js-plotly-plot .scatterlayer .trace", state="attached")
    plot_text = page.locator("#curves").inner_text()
    assert "ROC" in plot_text and "Precision-recall" in plot_text, plot_text
    assert "patchcore" in page.locator("#metrics").inner_text()
    n_traces = page.locator("#curves .scatterlayer .trace").count()
    assert n_traces >= 2, n_traces  # chance line + PatchCore's ROC (+ PR in the second subplot)
    shots.append(_shot(page, "03_compare.png"))

    # 4. annotate: paint with the brush on the editor canvas, label it, save
    page.get_by_role("tab", name="4 · Annotate & review").click()
    page.wait_for_selector("#ann-status >> text=Image 1 of")
    page.wait_for_selector("#review img")  # the methods' heatmaps of this image
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
    status = page.locator("#ann-status").inner_text()
    px = int(re.search(r"mask (\d+) px", status).group(1))
    assert px > 20, status
    shots.append(_shot(page, "04_annotate.png"))

    # 5. reload: same browser, same workspace: the annotation is still there
    page.reload()
    page.wait_for_selector("#data-summary >> text=demo/brick")
    page.get_by_role("tab", name="4 · Annotate & review").click()
    page.wait_for_selector(f"#ann-status >> text=saved: anomalous, mask {px} px")
    assert page.locator("#ann-label").get_by_label("anomalous").is_checked()
    assert "Annotated in this dataset: 1" in page.locator("#ann-status").inner_text()
    page.wait_for_timeout(1500)  # let the editor draw its canvas
    shown = np.asarray(Image.open(io.BytesIO(page.locator("#ann-editor").screenshot())).convert("RGB")).astype(int)
    red = (shown[..., 0] > 170) & (shown[..., 1] < 90) & (shown[..., 2] < 90)
    assert red.sum() > 100, f"the saved mask is not drawn in the editor after the reload ({red.sum()} red px)"
    shots.append(_shot(page, "05_reload.png"))

    # another browser (fresh storage) gets its own, empty workspace
    other = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    other.goto(server["url"])
    other.wait_for_selector("#data-summary >> text=demo/brick")
    other.get_by_role("tab", name="4 · Annotate & review").click()
    other.wait_for_selector("#ann-status >> text=Annotated in this dataset: 0")
    other.context.close()
    context.close()

    timings = {"app_ready_s": round(server["ready_s"], 1), "app_start_to_first_heatmap_s": round(first_heatmap_s, 1),
               "demo": DEMO or "default", "screenshots": [str(p) for p in shots]}
    (ARTIFACTS / "timings.json").write_text(json.dumps(timings, indent=2))
    print(json.dumps(timings, indent=2))
