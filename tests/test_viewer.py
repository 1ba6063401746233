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
    fig = viz.curves_figure(results)
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
    frame = viz.metrics_frame(results)
    assert list(frame.columns) == ["method"] + [label for _, label in viz.table_columns()]
    assert all(str(frame[label].dtype) == "float64" for _, label in viz.METRIC_COLUMNS)
    assert frame["pixel AUROC"].isna().tolist() == [True, False, False] and frame["ms / image"].isna().all()
    assert frame.sort_values("image AUROC")["method"].tolist() == ["b", "a", "c"]  # 0.85 < 0.9 < 0.951
    assert frame.loc[2, "image AUROC"] == 0.951 and frame.loc[0, "fit s"] == 12.3


def test_metrics_frame_shows_intervals_counts_and_small_samples():
    """Every AUROC / AP has its 95% interval beside it, with n normal / n anomalous; fewer than 10 images of a
    class: the row says the number is not meaningful (intervals from a saved run are JSON lists)."""
    from uadlab.metrics import Interval

    results = {"small": {"image_auroc": 1.0, "image_auroc_ci": Interval(1.0, 1.0), "n_normal": 1, "n_anomalous": 1},
               "big": {"image_auroc": 0.9, "image_auroc_ci": [0.85, 0.95], "pixel_ap_ci": [float("nan")] * 2,
                       "n_normal": 40, "n_anomalous": 12}}
    frame = viz.metrics_frame(results)
    cols = list(frame.columns)
    assert cols[cols.index("image AUROC") + 1] == "image AUROC 95% CI" and "pixel AP 95% CI" in cols
    assert frame["image AUROC 95% CI"].tolist() == ["1.000–1.000", "0.850–0.950"]
    assert frame["pixel AP 95% CI"].tolist() == ["–", "–"]  # no masks: missing
    assert frame["n normal"].tolist() == [1, 40] and frame["n anomalous"].tolist() == [1, 12]
    assert "not meaningful" in frame["note"][0] and frame["note"][1] == ""
    assert "Small sample" in viz.small_sample_note(results) and viz.small_sample_note({"big": results["big"]}) == ""


def test_scan_items_carry_values_window_and_volume():
    """A scan's slice travels as its modality values (16 bits over its range) with its unit and the run's window,
    no 8-bit copy; it names its volume, whose slices (own numbering, findings) come along; bad input is named."""
    from uadlab.medical import WINDOW_PRESETS
    from uadlab.ui.viewer import Volume

    rng = np.random.default_rng(0)
    hu = rng.uniform(-1024, 2000, (40, 50)).astype(np.float32)
    grey = (np.clip((hu + 160) / 400, 0, 1) * 255).astype(np.uint8)
    item = ViewItem("ct.nii.gz#z007", grey, [Panel("patchcore", _blob(40, 50, 20, 25), 2.0)], None, "anomalous",
                    values=hu, unit="HU", window=(40.0, 400.0), volume="v0", slice_pos=1)
    vol = Volume("ct.nii.gz", [{"name": f"ct.nii.gz#z{k:03d}", "label": f"z {k}", "finding": k == 7}
                               for k in (6, 7, 8)], "h4ndle")
    p = _payload(viewer_html([item], volumes={"v0": vol}))
    it = p["items"][0]
    assert it["img"] is None and it["full"] is None  # the browser draws the image from the values
    assert (it["unit"], it["win"], it["inv"], it["vol"], it["zi"]) == ("HU", [40.0, 400.0], False, "v0", 1)
    got = decode_heat(it["vals"]["url"], it["vals"]["lo"], it["vals"]["hi"])
    assert np.abs(got - hu).max() <= (hu.max() - hu.min()) / 65535 * 0.51 + 1e-3  # < 0.03 HU here
    assert p["volumes"]["v0"] == {"name": "ct.nii.gz", "handle": "h4ndle", "slices": [
        {"name": "ct.nii.gz#z006", "label": "z 6", "finding": False},
        {"name": "ct.nii.gz#z007", "label": "z 7", "finding": True},
        {"name": "ct.nii.gz#z008", "label": "z 8", "finding": False}]}
    assert p["presets"] == {k: list(v) for k, v in WINDOW_PRESETS.items()}
    with pytest.raises(ValueError, match="volumes \\['v0'\\] that are not given"):
        viewer_html([item])
    item.values = hu[:10]
    with pytest.raises(ValueError, match="'ct.nii.gz#z007': values are \\(10, 50\\), the image is \\(40, 50\\)"):
        viewer_html([item], volumes={"v0": vol})


def test_exported_heat_layer_is_the_viewers_colouring():
    """viz.heat_layer (what exports write) colours a map as viewer.js does: the map as sent (16-bit code), each
    value to the viridis LUT entry round(clip(v / vmax) * 255), the colours stretched bilinearly; the LUT is the
    viewer's to the bit (its ten stops, rounded half up)."""
    stops = re.search(r"const VIRIDIS = \[([^\]]*)\]", HEAD).group(1)
    rgb = [[int(s[i:i + 2], 16) for i in (1, 3, 5)] for s in re.findall(r'"(#[0-9a-f]{6})"', stops)]
    js_lut = []
    for i in range(256):  # buildLut of viewer.js
        f = i / 255 * (len(rgb) - 1)
        j = min(int(f), len(rgb) - 2)
        t = f - j
        js_lut.append([int(np.floor(rgb[j][c] * (1 - t) + rgb[j + 1][c] * t + 0.5)) for c in range(3)])
    assert np.array_equal(viz._LUT, np.array(js_lut, np.uint8))
    heat = _blob(56, 56, 20, 30) + np.float32(0.3)
    p = _payload(viewer_html([ViewItem("a", np.zeros((90, 120, 3), np.uint8), [Panel("m", heat, 1.0)])]))
    q = p["items"][0]["panels"][0]
    sent = decode_heat(q["heat"], q["lo"], q["hi"])  # what the browser colours
    k = np.floor(np.clip(sent.astype(np.float64) / 3.0, 0, 1) * 255 + 0.5).astype(int)
    want_small = viz._LUT[k]
    small = viz.heat_layer(heat, (56, 56), 3.0)
    assert np.abs(small.astype(int) - want_small).max() <= 1  # 16-bit quantisation may cross one LUT step
    layer = viz.heat_layer(heat, (120, 90), 3.0)  # the image's own size, as the enlarged view
    assert layer.shape == (90, 120, 3)
    stretched = np.asarray(Image.fromarray(want_small.astype(np.uint8)).resize((120, 90), Image.BILINEAR))
    assert np.abs(layer.astype(int) - stretched).max() <= 1


def test_export_names_are_clean():
    from uadlab.workspace.runs import export_name

    assert export_name("brain/test/lesion/patient00.nii.gz#z012") == "brain_test_lesion_patient00_z012"
    assert export_name("c/test/bad/series5/instance0001") == "c_test_bad_series5_instance0001"
    assert export_name("bottle/test/broken large/000.png") == "bottle_test_broken_large_000"
    assert export_name("../../etc/passwd") == "etc_passwd" and export_name("###") == "image"
