"""The heatmap viewer in a real headless Chromium: a minimal gr.Blocks on localhost with the viewer (3 methods,
2 images, a ground-truth mask), a metrics table, a one-image viewer and a three-slice "scan" viewer.

At 1280 px: heatmap panels >= 512 px wide; wheel zoom and drag pan move ALL panels identically; a click
enlarges a panel to the image's own size and Esc closes it; a typed and a dragged threshold re-draw at once
(the share of pixels above it equals numpy's on the same map); → steps to the next image; the table sorts
numbers as numbers; the curves have four subplots with a legend each; a new value re-starts the viewer; a
second viewer on the page stays apart. The item slider jumps to item k and follows ← → and the buttons (hidden
for one item; "slice" for the slices of one scan). Window / level remaps the image panel's pixels by DICOM's
LINEAR window (uadlab.medical.voi_window), the image under the heatmaps and the enlarged view too.
At 400 px: no horizontal overflow, full-width panels.
Screenshots at 1280 and 400 px go to a temp folder (printed).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import free_port, viewer_shares, viewer_transforms, wheel_zoom
from uadlab.medical import voi_window
from uadlab.ui.viewer import Panel, ViewItem, viewer_component, viewer_html
from uadlab.viz import curves_figure, metrics_frame

METHODS = ("patchcore", "anomalydino", "dinomaly")
pytestmark = pytest.mark.browser


def _items() -> list[ViewItem]:
    rng = np.random.default_rng(0)
    out = []
    for k, (h, w) in enumerate([(150, 200), (128, 128)]):
        y, x = np.mgrid[:h, :w]
        image = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], -1).astype(np.uint8)
        panels = []
        for j, m in enumerate(METHODS):  # a blob of a different size per method, plus a little noise
            blob = np.exp(-((y - 0.4 * h) ** 2 + (x - 0.6 * w) ** 2) / (2 * (0.08 * w * (j + 1)) ** 2))
            heat = (3.2 * blob - 0.3 + rng.normal(0, 0.05, (h, w))).astype(np.float32)
            panels.append(Panel(m, heat, float(np.sort(heat.ravel())[-h * w // 100:].mean())))
        mask = None
        if k == 0:
            mask = np.zeros((h, w), bool)
            mask[45:75, 100:140] = True
        out.append(ViewItem(f"img{k}<&>.png", image, panels, mask, "anomalous" if k == 0 else "normal"))
    return out


def _slices() -> list[ViewItem]:
    """Three 32 px slices of one scan, named like the NIfTI loader names them (``<file>#z<k>``)."""
    y, x = np.mgrid[:32, :32]
    return [ViewItem(f"vol<&>.nii.gz#z{k:03d}", np.full((32, 32, 3), 60 * k + 40, np.uint8),
                     [Panel("patchcore", (np.exp(-((y - 16) ** 2 + (x - 8 * k - 8) ** 2) / 50) * 3).astype(np.float32),
                            3.0)]) for k in range(3)]


def _results() -> dict:
    """Curves of three methods; the third without masks (no pixel curves)."""
    x = np.linspace(0, 1, 21)
    out = {}
    for i, m in enumerate(METHODS):
        k = 0.2 + 0.2 * i
        c = {"fpr": x.tolist(), "tpr": (x ** k).tolist(), "recall": x.tolist(),
             "precision": (1 - 0.5 * x ** (1 / k)).tolist()}
        out[m] = {"curves": c, "image_auroc": 1 / (1 + k), "image_ap": 0.9 - 0.1 * i}
        if i < 2:
            out[m].update(pixel_curves=c, pixel_auroc=1 / (1 + k), pixel_ap=0.5 - 0.1 * i)
    return out


@pytest.fixture(scope="module")
def served():
    import gradio as gr

    items = _items()
    results = {"a": {"image_auroc": 0.9, "pixel_auroc": float("nan")}, "b": {"image_auroc": 0.85},
               "c": {"image_auroc": 0.951, "pixel_auroc": 0.8}}
    with gr.Blocks() as demo:
        view = viewer_component(items, elem_id="viewer")
        swap = gr.Button("swap", elem_id="swap")
        gr.Dataframe(metrics_frame(results), elem_id="metrics")
        viewer_component(items[1:], elem_id="second")  # a second viewer on the page stays independent
        viewer_component(_slices(), elem_id="slices")
        gr.Plot(curves_figure(_results()), elem_id="curves")
        swap.click(lambda: viewer_html(items[::-1]), outputs=view)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", items
    demo.close()


def _wait_ready(page, index: int = 0, viewer: str = "viewer") -> None:
    page.wait_for_selector(f"#{viewer}[data-state=ready][data-index='{index}']", state="attached", timeout=30_000)


def _next_frame(page) -> None:
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def _pixels(page, selector: str, points: list[tuple[int, int]], image_w: int) -> np.ndarray:
    """RGB of a panel canvas at the centres of image pixels (x, y) (zoom 1: the canvas is the image, scaled)."""
    return np.array(page.eval_on_selector(selector, """(c, [pts, w]) => pts.map(([x, y]) => {
        const k = c.width / w, d = c.getContext("2d").getImageData(Math.floor((x + 0.5) * k),
                                                                     Math.floor((y + 0.5) * k), 1, 1).data;
        return [d[0], d[1], d[2]]; })""", [points, image_w]), float)


def _set_window(page, level: float, width: float) -> None:
    page.fill("#viewer-level", str(level))
    page.fill("#viewer-width", str(width))
    page.wait_for_function(f"document.querySelector('#viewer').dataset.level === '{level}' && "
                           f"document.querySelector('#viewer').dataset.width === '{width}'")
    _next_frame(page)


def _window(v: np.ndarray, level: float, width: float) -> np.ndarray:
    return voi_window(level, width)(np.asarray(v, float)) * 255


def test_viewer_in_chromium(served, browser, tmp_path_factory):
    url, items = served
    shots = tmp_path_factory.mktemp("viewer-shots")
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    _wait_ready(page)

    # panels: the original + one per method, each heatmap >= 512 px wide; caption = method and score
    panels = page.locator("#viewer .uadv-panel[data-kind=heat]")
    assert panels.count() == 3
    widths = [panels.nth(i).locator("canvas").bounding_box()["width"] for i in range(3)]
    assert min(widths) >= 512, widths
    assert page.locator("#viewer .uadv-panel[data-method=patchcore] .uadv-score").inner_text() == \
        f"score {items[0].panels[0].image_score:.2f}"
    assert "1 / 2" in page.inner_text("#viewer .uadv-pos") and "img0<&>.png" in page.inner_text("#viewer .uadv-pos")
    page.screenshot(path=str(shots / "viewer-1280.png"), full_page=True)

    # the share of pixels above the threshold is numpy's on the same map: the maps arrived intact
    for share, p in zip(viewer_shares(page), items[0].panels):
        assert abs(share - float((p.heat >= 1.0).mean())) < 2 / p.heat.size

    # linked zoom: a wheel on one panel zooms all panels identically
    before = viewer_transforms(page)
    zoomed = wheel_zoom(page, panels.nth(0).locator(".uadv-stage"), at=(0.6, 0.4))
    assert len(set(zoomed)) == 1 and zoomed != before and float(zoomed[0].split()[0]) > 1.5, zoomed
    assert page.eval_on_selector("#second", "e => e.dataset.state + ' ' + e.dataset.zoom") == "ready 1.0000"

    # linked pan: dragging another panel moves all of them, and a drag does not enlarge
    panels.nth(1).locator(".uadv-stage").scroll_into_view_if_needed()
    box = panels.nth(1).locator(".uadv-stage").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 60, cy + 40, steps=6)
    page.mouse.up()
    page.wait_for_timeout(100)
    panned = viewer_transforms(page)
    assert len(set(panned)) == 1 and panned != zoomed and panned[0].split()[0] == zoomed[0].split()[0], panned
    assert page.locator("#viewer-modal").count() == 0
    page.keyboard.press("0")  # the focus is in the viewer: 0 resets the view
    page.wait_for_function("document.querySelector('#viewer').dataset.zoom === '1.0000'")

    # click enlarges to the image's own resolution; Esc closes
    panels.nth(2).locator(".uadv-stage").click()
    page.wait_for_selector("#viewer-modal canvas")
    big = page.locator("#viewer-modal canvas").bounding_box()
    assert (round(big["width"]), round(big["height"])) == (200, 150) == items[0].image.shape[1::-1]
    page.keyboard.press("Escape")
    page.wait_for_selector("#viewer-modal", state="detached")

    # a typed threshold applies at every keystroke (input event), the slider follows
    share_before = viewer_shares(page)
    page.fill("#viewer-thr-num", "2.2")
    page.wait_for_function("document.querySelector('#viewer').dataset.threshold === '2.2'")
    typed = viewer_shares(page)
    assert typed != share_before and page.input_value("#viewer-thr-range") == "2.2"
    for share, p in zip(typed, items[0].panels):
        assert abs(share - float((p.heat >= 2.2).mean())) < 2 / p.heat.size
    segments = page.eval_on_selector("#viewer .uadv-share", "e => e.dataset.segments")
    # dragging the slider too
    page.locator("#viewer-thr-range").scroll_into_view_if_needed()
    rng_box = page.locator("#viewer-thr-range").bounding_box()
    ry = rng_box["y"] + rng_box["height"] / 2
    page.mouse.move(rng_box["x"] + rng_box["width"] * 0.7, ry)
    page.mouse.down()
    page.mouse.move(rng_box["x"] + rng_box["width"] * 0.15, ry, steps=5)
    page.mouse.up()
    dragged = float(page.input_value("#viewer-thr-num"))
    assert 0 < dragged < 1.2, dragged
    assert viewer_shares(page) != typed
    assert page.eval_on_selector("#viewer .uadv-share", "e => e.dataset.segments") != segments
    page.screenshot(path=str(shots / "viewer-1280-threshold.png"), full_page=True)

    # window / level: the image panel's pixels go through the window; the identity (128 / 256) by default
    assert page.eval_on_selector("#viewer", "e => [e.dataset.level, e.dataset.width]") == ["128", "256"]
    image_canvas, img0 = "#viewer .uadv-panel[data-kind=image] canvas", items[0].image
    points = [(20, 110), (50, 110), (60, 20), (180, 130)]  # away from the ground-truth outline
    before = _pixels(page, image_canvas, points, img0.shape[1])
    assert np.abs(before - [img0[y, x] for x, y in points]).max() <= 2  # the image as it is
    _set_window(page, 110, 120)
    after = _pixels(page, image_canvas, points, img0.shape[1])
    # the panel interpolates between image pixels: the window maps the value drawn before (+-0.5) within 2.2
    assert np.abs(after - _window(before, 110, 120)).max() <= 2.5, (before, after)
    assert np.abs(after - before).max() > 30
    _set_window(page, 8, 8)  # every channel here is above the window (>= 25): white
    assert (_pixels(page, image_canvas, points, img0.shape[1]) == 255).all()
    # the heatmap panels draw the heat over the windowed image: with the heat hidden they show the same pixels
    _set_window(page, 140.5, 60)
    page.uncheck("#viewer-show-heat")
    page.uncheck("#viewer-show-contour")
    _next_frame(page)
    windowed = _pixels(page, image_canvas, points, img0.shape[1])
    assert np.array_equal(_pixels(page, "#viewer .uadv-panel[data-method=dinomaly] canvas", points,
                                  img0.shape[1]), windowed)
    page.check("#viewer-show-heat")
    page.check("#viewer-show-contour")
    # the enlarged view: the image at its own size, every pixel through the window (but the ground truth's)
    page.locator("#viewer .uadv-panel[data-kind=image] .uadv-stage").click()
    page.wait_for_selector("#viewer-modal canvas")
    _next_frame(page)
    big = np.array(page.eval_on_selector("#viewer-modal canvas", """c => Array.from(
        c.getContext("2d").getImageData(0, 0, c.width, c.height).data)""")).reshape(150, 200, 4)[..., :3]
    keep = np.ones((150, 200), bool)
    keep[40:80, 95:145] = False  # the dashed ground-truth outline
    assert np.abs(big[keep] - _window(img0[keep], 140.5, 60)).max() <= 1
    page.keyboard.press("Escape")
    page.wait_for_selector("#viewer-modal", state="detached")
    page.click("#viewer button[title^='reset the window']")
    assert page.eval_on_selector("#viewer", "e => [e.dataset.level, e.dataset.width]") == ["128", "256"]
    # auto: the image's 0.5..99.5 % grey range (mean of R, G, B) fills 0..255
    page.click("#viewer button:text-is('auto')")
    grey = np.round(img0.astype(float).mean(-1))
    lo, hi = np.percentile(grey, 0.5, method="inverted_cdf"), np.percentile(grey, 99.5, method="inverted_cdf")
    level, width = page.eval_on_selector("#viewer", "e => [+e.dataset.level, +e.dataset.width]")
    assert (level, width) == ((lo + hi + 1) / 2, hi - lo + 1), (level, width, lo, hi)
    _set_window(page, 128, 256)

    # → steps to the next image (the focus is in the viewer, not in an input)
    page.focus("#viewer")
    page.keyboard.press("ArrowRight")
    _wait_ready(page, 1)
    assert "2 / 2" in page.inner_text("#viewer .uadv-pos") and "normal" in page.inner_text("#viewer .uadv-pos")
    assert page.input_value("#viewer-item") == "1"  # the item slider follows the keys and buttons
    page.click("#viewer button[title^='previous']")
    _wait_ready(page, 0)
    assert page.input_value("#viewer-item") == "0" and page.locator("#viewer-item").is_visible()
    assert page.inner_text("#viewer .uadv-pos").startswith("image 1 / 2")
    page.fill("#viewer-item", "1")  # the slider jumps to item k
    _wait_ready(page, 1)
    page.fill("#viewer-item", "0")
    _wait_ready(page, 0)
    assert not page.locator("#second-item").is_visible()  # one image: no slider

    # the slices of one scan: "slice k / n"; the slider jumps, follows ← →, and a drag steps through them live
    page.locator("#slices").scroll_into_view_if_needed()
    _wait_ready(page, 0, "slices")
    assert page.inner_text("#slices .uadv-pos").startswith("slice 1 / 3 vol<&>.nii.gz#z000")
    page.fill("#slices-item", "2")
    _wait_ready(page, 2, "slices")
    assert page.inner_text("#slices .uadv-pos").startswith("slice 3 / 3 vol<&>.nii.gz#z002")
    page.focus("#slices")
    page.keyboard.press("ArrowLeft")
    _wait_ready(page, 1, "slices")
    assert page.input_value("#slices-item") == "1"
    page.click("#slices button[title^='next slice']")
    _wait_ready(page, 2, "slices")
    assert page.input_value("#slices-item") == "2"
    seen = []
    page.expose_function("sliceSeen", lambda i: seen.append(i))
    page.eval_on_selector("#slices-item", "e => e.addEventListener('input', () => sliceSeen(+e.value))")
    box = page.locator("#slices-item").bounding_box()
    page.mouse.move(box["x"] + box["width"] - 4, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + 2, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    _wait_ready(page, 0, "slices")
    assert 1 in seen and seen[-1] == 0, seen  # it went through slice 2 to 1 to 0 while dragged
    shown = page.eval_on_selector("#slices .uadv-panel[data-kind=image] canvas", """c => Array.from(
        c.getContext("2d").getImageData(c.width >> 1, c.height >> 1, 1, 1).data.slice(0, 3))""")
    assert shown == [40, 40, 40]  # slice 0's grey is on screen

    # the metrics table sorts numbers as numbers (as text "0.85" would come before "0.9" in descending order)
    head = page.locator("#metrics thead th").nth(1)
    head.hover()
    head.locator("button").last.click()  # gradio 6: sorting is in the column's cell menu
    page.get_by_text("Sort descending", exact=True).click()
    page.wait_for_timeout(300)
    rows = page.eval_on_selector_all("#metrics [role=row], #metrics tbody:not(.sizing-body) tr",
                                     "rs => rs.map(r => r.innerText.replace(/\\s+/g, ' ').trim()).filter(t => t)")
    # (method, image AUROC) of each row; NaN cells are blank, the intervals "–" where missing
    assert [r.split(" ")[:2] for r in rows[1:]] == [["c", "0.951"], ["a", "0.9"], ["b", "0.85"]], rows

    # the curves: four subplots, a legend in each, 3 + 3 + 2 + 2 method lines and two chance lines
    page.wait_for_selector("#curves .js-plotly-plot .scatterlayer .trace", state="attached")
    page.locator("#curves").scroll_into_view_if_needed()
    page.locator("#curves").screenshot(path=str(shots / "curves-1280.png"))
    assert page.locator("#curves .legend, #curves .legend2, #curves .legend3, #curves .legend4").count() == 4
    assert page.locator("#curves .scatterlayer .trace").count() == 12

    # a new value (a callback's output) re-starts the viewer with the new items
    page.click("#swap")
    page.wait_for_function("document.querySelector('#viewer .uadv-pos')?.textContent.includes('img1')")
    _wait_ready(page, 0)
    assert page.locator("#viewer .uadv-panel[data-kind=heat]").count() == 3

    # a phone: no horizontal overflow, panels full width
    page.set_viewport_size({"width": 400, "height": 850})
    page.wait_for_timeout(400)
    overflow = page.evaluate("document.scrollingElement.scrollWidth - window.innerWidth")
    root_w = page.eval_on_selector("#viewer", "e => e.getBoundingClientRect().width")
    panel_w = page.locator("#viewer .uadv-panel[data-kind=heat] canvas").first.bounding_box()["width"]
    page.screenshot(path=str(shots / "viewer-400.png"), full_page=True)
    print(f"\nscreenshots: {shots}/viewer-1280.png {shots}/viewer-1280-threshold.png {shots}/viewer-400.png"
          f"\nheatmap_px at 1280: {min(widths):.0f}; overflow at 400: {overflow}; panel at 400: {panel_w:.0f} of "
          f"{root_w:.0f}")
    assert overflow == 0
    assert panel_w >= root_w - 1 and panel_w > 300
    assert not errors, errors
