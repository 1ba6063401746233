"""The heatmap viewer's HTML (payload, sizes, escaping, errors), pixel curves, the curves figure and the
numeric metrics table. The browser side is in test_viewer_browser.py."""
from __future__ import annotations

import base64
import html
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from uadlab.metrics import Evaluation
from uadlab import metrics as M
from uadlab import viz
from uadlab.ui.viewer import FULL_MAX, HEAD, HEAT_MAX, PANEL_MAX, Panel, ViewItem, decode_heat, viewer_html


def _payload(page: str) -> dict:
    m = re.search(r'data-payload="([^"]*)"', page)
    return json.loads(html.unescape(m.group(1)))


def _size(url: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size


def _blob(h: int, w: int, cy: float, cx: float, peak: float = 3.5) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return (peak * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * (0.12 * w) ** 2)) - 0.4).astype(np.float32)


def test_payload_decodes_back_to_the_maps_within_16_bit_quantisation():
    rng = np.random.default_rng(0)
    heat = _blob(96, 128, 40, 70) + rng.normal(0, 0.05, (96, 128)).astype(np.float32)
    mask = np.zeros((96, 128), bool)
    mask[30:50, 60:80] = True
    item = ViewItem("a.png", rng.integers(0, 256, (96, 128, 3), dtype=np.uint8),
                    [Panel("patchcore", heat, 1.7), Panel("dinomaly", heat * 0.5, float("nan"))], mask, "anomalous")
    p = _payload(viewer_html([item], threshold=1.2, vmax=3.0))
    assert p["vmax"] == 3.0 and p["threshold"] == 1.2
    it = p["items"][0]
    assert (it["w"], it["h"]) == (128, 96) and it["full"] is None and it["label"] == "anomalous"
    for panel, want in zip(it["panels"], (heat, heat * 0.5)):
        got = decode_heat(panel["heat"], panel["lo"], panel["hi"])
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= (want.max() - want.min()) / 65535 * 0.51 + 1e-6
    assert [q["score"] for q in it["panels"]] == [1.7, None]  # NaN is not JSON: missing
    # small images travel losslessly (PNG); the mask too
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(it["img"].split(",", 1)[1]))).convert("RGB"))
    assert np.array_equal(img, item.image)
    gt = np.asarray(Image.open(io.BytesIO(base64.b64decode(it["gt"].split(",", 1)[1]))).convert("L")) > 127
    assert np.array_equal(gt, mask)


def test_large_images_are_capped_for_panels_and_enlarged_view():
    big = np.zeros((1200, 2600, 3), np.uint8)
    item = ViewItem("big", big, [Panel("m", np.zeros((1200, 2600), np.float32) + 0.5, 0.5)],
                    np.zeros((1200, 2600), bool))
    it = _payload(viewer_html([item]))["items"][0]
    assert max(_size(it["img"])) == PANEL_MAX  # panels: downscaled
    assert max(_size(it["full"])) == FULL_MAX == it["w"] and it["h"] == round(1200 * FULL_MAX / 2600)
    assert max(_size(it["panels"][0]["heat"])) == HEAT_MAX and max(_size(it["gt"])) <= PANEL_MAX
    assert it["full"].startswith("data:image/jpeg") and it["img"].startswith("data:image/jpeg")


def test_names_from_users_files_cannot_inject_html():
    evil = '"><img src=x onerror=alert(1)><script>alert(2)</script>&amp;\''
    item = ViewItem(evil, np.zeros((8, 8, 3), np.uint8), [Panel(evil, np.zeros((8, 8)), 1.0)], None, evil)
    page = viewer_html([item])

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags = []

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))

    parser = Tags()
    parser.feed(page)
    assert [t for t, _ in parser.tags] == ["div", "div"]  # the root and its loading note, nothing injected
    payload = json.loads(parser.tags[0][1]["data-payload"])
    assert payload["items"][0]["name"] == evil and payload["items"][0]["panels"][0]["method"] == evil
    assert payload["items"][0]["label"] == "unlabelled"  # unknown labels are not shown as given


def test_bad_input_names_the_item_and_the_problem():
    ok = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="'x.png'.*uint8"):
        viewer_html([ViewItem("x.png", ok.astype(np.float32), [])])
    with pytest.raises(ValueError, match="'y.png'.*map of m"):
        viewer_html([ViewItem("y.png", ok, [Panel("m", np.zeros((2, 2, 2)), 1.0)])])
    with pytest.raises(ValueError, match="elem_id"):
        viewer_html([ViewItem("z", ok, [])], elem_id='a" onclick="x')
    with pytest.raises(ValueError, match="vmax"):
        viewer_html([ViewItem("z", ok, [])], vmax=0)
    assert "No images to show" in viewer_html([]) and "data-payload" not in viewer_html([])
    # grayscale and RGBA images are accepted
    for image in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8)):
        assert _payload(viewer_html([ViewItem("g", image, [])]))["items"][0]["w"] == 8


def test_head_brings_the_viewer_script_and_style_once():
    assert HEAD.count("<script>") == 1 and HEAD.count("<style") == 1
    assert "MutationObserver" in HEAD and "uadv-grid" in HEAD
    # the viridis reference colours, the fixed scale and the ids the app and tests rely on are there
    assert "#440154" in HEAD and "#fde725" in HEAD and "-thr-num" in HEAD and "-thr-range" in HEAD
    assert all(f"`${{id}}-{c}`" in HEAD for c in ("item", "level", "width"))  # item slider, window / level


def test_pixel_curves_follow_the_pixels():
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 4:8, 4:8] = 1
    maps = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    perfect = M.pixel_curves(masks, maps + 2 * masks)  # every defect pixel above every normal one
    assert perfect["fpr"][0] == 0 and max(t for f, t in zip(perfect["fpr"], perfect["tpr"]) if f == 0) == 1.0
    noisy = M.pixel_curves(masks, maps)
    auc = np.trapezoid(noisy["tpr"], noisy["fpr"])
    assert abs(auc - M.pixel_metrics(masks, maps)["pixel_auroc"]) < 0.02 and 0.2 < auc < 0.8
    assert M.pixel_curves(None, maps) == {"fpr": [], "tpr": [], "precision": [], "recall": []}
    # subsampled like pixel_metrics: the same fixed subset, so the same curve twice
    assert M.pixel_curves(masks, maps, max_pixels=100) == M.pixel_curves(masks, maps, max_pixels=100)
    with pytest.raises(ValueError, match="differ in shape"):
        M.pixel_curves(masks, maps[:, :8])


def _curve(k: float) -> dict:
    x = np.linspace(0, 1, 11)
    return {"fpr": x.tolist(), "tpr": (x ** k).tolist(), "recall": x.tolist(), "precision": (1 - 0.5 * x ** k).tolist()}


def test_curves_figure_2x2_one_colour_and_dash_per_method_metrics_in_legend():
    results = {"patchcore": {"curves": _curve(0.3), "pixel_curves": _curve(0.2), "image_auroc": 0.91,
                             "image_ap": 0.88, "pixel_auroc": 0.97, "pixel_ap": 0.55},
               "dinomaly": {"curves": _curve(0.5), "pixel_curves": _curve(0.4), "image_auroc": 0.8,
                            "image_ap": 0.7, "pixel_auroc": 0.9, "pixel_ap": 0.4},
               "novel": {"curves": _curve(0.6), "image_auroc": 0.7, "image_ap": 0.65}}  # no masks: no pixel curves
    fig = viz.curves_figure({m: Evaluation.from_dict(r) for m, r in results.items()})
    lines = [t for t in fig.data if t.name != "chance"]
    axes = {(t.xaxis, t.yaxis) for t in fig.data}
    assert axes == {("x", "y"), ("x2", "y2"), ("x3", "y3"), ("x4", "y4")}  # 2 x 2 subplots
    assert "patchcore (AUROC 0.910)" in [t.name for t in lines if t.xaxis == "x"]
    assert "patchcore (AP 0.880)" in [t.name for t in lines if t.xaxis == "x2"]
    assert "patchcore (AUROC 0.970)" in [t.name for t in lines if t.xaxis == "x3"]
    assert "dinomaly (AP 0.400)" in [t.name for t in lines if t.xaxis == "x4"]
    assert not any(t.name.startswith("novel") for t in lines if t.xaxis in ("x3", "x4"))
    style = {}
    for t in lines:  # the same colour and dash for a method in all four subplots ...
        style.setdefault(t.name.split(" (")[0], set()).add((t.line.color, t.line.dash))
    assert all(len(s) == 1 for s in style.values())
    assert len({s.pop() for s in style.values()}) == 3  # ... and different ones between methods
    assert len({t.legend for t in lines}) == 4  # a legend per subplot


def test_metrics_frame_is_numeric_and_sorts_as_numbers():
    results = {"a": {"image_auroc": 0.9, "pixel_auroc": float("nan"), "fit_s": 12.34},
               "b": {"image_auroc": 0.85, "pixel_auroc": 0.97, "head_ms": None},
               "c": {"image_auroc": 0.95123, "pixel_auroc": 0.9}}
    frame = viz.metrics_frame({m: Evaluation.from_dict(r) for m, r in results.items()})
    assert list(frame.columns) == ["method"] + [label for _, label in viz.METRIC_COLUMNS]
    assert all(str(frame[label].dtype) == "float64" for _, label in viz.METRIC_COLUMNS)
    assert frame["pixel AUROC"].isna().tolist() == [True, False, False] and frame["ms / image"].isna().all()
    assert frame.sort_values("image AUROC")["method"].tolist() == ["b", "a", "c"]  # 0.85 < 0.9 < 0.951
    assert frame.loc[2, "image AUROC"] == 0.951 and frame.loc[0, "fit s"] == 12.3
