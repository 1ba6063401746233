"""The heatmap viewer in a real headless Chromium: a minimal gr.Blocks on localhost with the viewer (3 methods,
2 images, a ground-truth mask) and a metrics table.

At 1280 px: heatmap panels >= 512 px wide; wheel zoom and drag pan move ALL panels identically; a click
enlarges a panel to the image's own size and Esc closes it; a typed and a dragged threshold re-draw at once
(the share of pixels above it equals numpy's on the same map); → steps to the next image; the table sorts
numbers as numbers; the curves have four subplots with a legend each; a new value re-starts the viewer; a
second viewer on the page stays apart. At 400 px: no horizontal overflow, full-width panels.
Screenshots at 1280 and 400 px go to a temp folder (printed).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import free_port
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
        gr.Plot(curves_figure(_results()), elem_id="curves")
        swap.click(lambda: viewer_html(items[::-1]), outputs=view)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", items
    demo.close()


def _transforms(page) -> list[str]:
    return page.eval_on_selector_all("#viewer .uadv-panel", "els => els.map(e => e.dataset.transform)")


def _shares(page) -> list[float]:
    return page.eval_on_selector_all("#viewer .uadv-share", "els => els.map(e => parseFloat(e.dataset.share))")


def _wait_ready(page, index: int = 0) -> None:
    page.wait_for_selector(f"#viewer[data-state=ready][data-index='{index}']", state="attached", timeout=30_000)


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
    for share, p in zip(_shares(page), items[0].panels):
        assert abs(share - float((p.heat >= 1.0).mean())) < 2 / p.heat.size

    # linked zoom: a wheel on one panel zooms all panels identically
    before = _transforms(page)
    box = panels.nth(0).locator(".uadv-stage").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.4)
    page.mouse.wheel(0, -400)
    page.wait_for_function("parseFloat(document.querySelector('#viewer').dataset.zoom) > 1.5")
    page.wait_for_timeout(100)
    zoomed = _transforms(page)
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
    panned = _transforms(page)
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
    share_before = _shares(page)
    page.fill("#viewer-thr-num", "2.2")
    page.wait_for_function("document.querySelector('#viewer').dataset.threshold === '2.2'")
    typed = _shares(page)
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
    assert _shares(page) != typed
    assert page.eval_on_selector("#viewer .uadv-share", "e => e.dataset.segments") != segments
    page.screenshot(path=str(shots / "viewer-1280-threshold.png"), full_page=True)

    # → steps to the next image (the focus is in the viewer, not in an input)
    page.focus("#viewer")
    page.keyboard.press("ArrowRight")
    _wait_ready(page, 1)
    assert "2 / 2" in page.inner_text("#viewer .uadv-pos") and "normal" in page.inner_text("#viewer .uadv-pos")
    page.click("#viewer button[title^='previous']")
    _wait_ready(page, 0)

    # the metrics table sorts numbers as numbers (as text "0.85" would come before "0.9" in descending order)
    head = page.locator("#metrics thead th").nth(1)
    head.hover()
    head.locator("button").last.click()  # gradio 6: sorting is in the column's cell menu
    page.get_by_text("Sort descending", exact=True).click()
    page.wait_for_timeout(300)
    rows = page.eval_on_selector_all("#metrics [role=row], #metrics tbody:not(.sizing-body) tr",
                                     "rs => rs.map(r => r.innerText.replace(/\\s+/g, ' ').trim()).filter(t => t)")
    assert rows[1:] == ["c 0.951 0.8", "a 0.9", "b 0.85"], rows  # NaN cells are blank

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
