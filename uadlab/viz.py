"""Pictures for people: heatmap overlays on ONE shared colour scale, colour bars, comparison grids,
ROC / PR figures and metric tables.

Heatmaps arrive CALIBRATED (0 = median normal pixel, 1 = the 99.9th percentile of held-out normal
pixels, see ``postprocess.Calibration``), so one fixed range (default [0, 3]) serves every method and
every image: a normal image stays dark, and the same colour means the same thing in every column.
Nothing here is min-max normalised per image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

VMIN, VMAX = 0.0, 3.0  # the shared calibrated range of every heatmap in the app (the viewer's too)
SCALE_NOTE = "calibrated score: 1 = 99.9th percentile of held-out normal pixels"

# viridis (colour-blind safe, perceptually uniform; the viewer's map): ten reference colours, interpolated
_COLOURS = np.array([[0x44, 0x01, 0x54], [0x48, 0x28, 0x78], [0x3e, 0x49, 0x89], [0x31, 0x68, 0x8e], [0x26, 0x82, 0x8e],
                     [0x1f, 0x9e, 0x89], [0x35, 0xb7, 0x79], [0x6e, 0xce, 0x58], [0xb5, 0xde, 0x2b], [0xfd, 0xe7, 0x25]],
                    np.float32)
_STOPS = np.linspace(0, 1, len(_COLOURS))
# rounded half up, as the viewer's Math.round: the exported colours are the viewer's to the last bit
_LUT = np.floor(np.stack([np.interp(np.linspace(0, 1, 256), _STOPS, _COLOURS[:, c]) for c in range(3)], 1)
                + 0.5).astype(np.uint8)
HEAT_MAX = 512  # long side of a heat map as the viewer receives and colours it (see ui/viewer.py)
# Okabe-Ito (colour-blind safe; yellow last, it is faint on white) and a dash per method as a second cue
METHOD_COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
METHOD_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]


def font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def colormap(values: np.ndarray, vmin: float = VMIN, vmax: float = VMAX) -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8 on the fixed range [vmin, vmax] (values outside are clipped)."""
    t = np.clip((np.asarray(values, np.float32) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return _LUT[np.floor(t * 255 + 0.5).astype(np.int64)]


def overlay(image: np.ndarray, heat: np.ndarray, vmin: float = VMIN, vmax: float = VMAX) -> np.ndarray:
    """Blend a calibrated heatmap over an RGB uint8 image of the same size; hotter = more opaque."""
    img = np.asarray(image, np.float32)
    t = np.clip((np.asarray(heat, np.float32) - vmin) / max(vmax - vmin, 1e-12), 0, 1)[..., None]
    alpha = 0.2 + 0.6 * t
    return (img * (1 - alpha) + colormap(heat, vmin, vmax).astype(np.float32) * alpha).round().astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask) > 0
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def mask_overlay(image: np.ndarray, mask: np.ndarray | None, colour: tuple[int, int, int] = (255, 40, 40),
                 alpha: float = 0.45, outline: bool = True) -> np.ndarray:
    """Tint the pixels of a binary mask (and draw its outline) over an RGB uint8 image."""
    out = np.asarray(image, np.float32).copy()
    if mask is None:
        return out.astype(np.uint8)
    m = np.asarray(mask) > 0
    out[m] = out[m] * (1 - alpha) + np.array(colour, np.float32) * alpha
    if outline:
        edge = _outline(m)
        out[edge] = colour
    return out.round().astype(np.uint8)


# Outlines drawn as a bright line inside a dark halo stay visible on any image (light, dark, red defects):
CONTOUR = (255, 255, 255)  # the region at or above the threshold: white (as in the viewer)
GT_OUTLINE = (255, 64, 255)  # ground truth: magenta (as in the viewer)


def outline_overlay(image: np.ndarray, mask: np.ndarray | None, colour: tuple[int, int, int] = GT_OUTLINE) -> np.ndarray:
    """Draw the outline of a binary mask as a coloured line with a dark halo (no tint: the image stays visible)."""
    out = np.asarray(image, np.uint8).copy()
    if mask is None:
        return out
    edge = _outline(np.asarray(mask) > 0)
    halo = np.zeros_like(edge)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        halo |= np.roll(edge, (dy, dx), (0, 1))
    out[halo & ~edge] = 0
    out[edge] = colour
    return out


def with_colorbar(image: np.ndarray, vmin: float = VMIN, vmax: float = VMAX, title: str = "score") -> np.ndarray:
    """``image`` with the calibrated colour bar on its right (same height), as one RGB array."""
    img = np.asarray(image, np.uint8)
    bar = colorbar(max(img.shape[0], 120), vmin, vmax, title=title)  # below 120 px the labels would not fit
    bar = np.asarray(bar if bar.height == img.shape[0] else bar.resize((70, img.shape[0])))
    pad = np.full((img.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([img, pad, bar], 1)


def predicted_mask(heat: np.ndarray, threshold: float) -> np.ndarray:
    """The predicted defect mask of a calibrated heatmap at ``threshold`` (same units)."""
    return (np.asarray(heat) >= threshold).astype(np.uint8)


def colorbar(height: int = 256, vmin: float = VMIN, vmax: float = VMAX, width: int = 18,
             title: str = "anomaly", ticks: int = 5, threshold: float | None = None) -> Image.Image:
    """A vertical colour bar (high values on top) with tick labels, as a PIL image."""
    f = font(12)
    pad_top, pad_bottom = 22, 10
    bar_h = max(height - pad_top - pad_bottom, 20)
    img = Image.new("RGB", (width + 52, height), "white")
    ramp = colormap(np.linspace(vmax, vmin, bar_h)[:, None].repeat(width, 1), vmin, vmax)
    img.paste(Image.fromarray(ramp), (4, pad_top))
    d = ImageDraw.Draw(img)
    d.rectangle([4, pad_top, 4 + width - 1, pad_top + bar_h - 1], outline="black")
    d.text((2, 3), title, fill="black", font=f)
    for i in range(ticks):
        v = vmin + (vmax - vmin) * i / (ticks - 1)
        y = pad_top + bar_h - 1 - round((bar_h - 1) * i / (ticks - 1))
        d.line([4 + width, y, 8 + width, y], fill="black")
        d.text((11 + width, y - 7), f"{v:g}", fill="black", font=f)
    if threshold is not None and vmin <= threshold <= vmax:
        y = pad_top + bar_h - 1 - round((bar_h - 1) * (threshold - vmin) / (vmax - vmin))
        d.line([2, y, 6 + width, y], fill=(0, 200, 255), width=2)
    return img


# ---- what the viewer draws, as files (exports) -----------------------------------------------------------------
def fit_size(w: int, h: int, cap: int) -> tuple[int, int]:
    """(w, h) scaled down so that the long side is at most ``cap`` (the viewer's rule)."""
    f = min(1.0, cap / max(w, h))
    return max(1, round(w * f)), max(1, round(h * f))


def heat_at(heat: np.ndarray, size: tuple[int, int], cap: int = HEAT_MAX) -> np.ndarray:
    """A calibrated map as the viewer holds it (at most ``cap`` px, bilinear), then stretched to ``size``
    (w, h) bilinearly: the values under the viewer's colours and contour."""
    a = np.nan_to_num(np.asarray(heat, np.float32))
    small = fit_size(a.shape[1], a.shape[0], cap)
    img = Image.fromarray(a, mode="F")
    if small != img.size:
        img = img.resize(small, Image.BILINEAR)
    return np.asarray(img.resize(size, Image.BILINEAR) if img.size != size else img, np.float32)


def heat_layer(heat: np.ndarray, size: tuple[int, int], vmax: float = VMAX, cap: int = HEAT_MAX) -> np.ndarray:
    """(h, w, 3) uint8: the viewer's heat layer of a calibrated map at ``size`` (w, h). As the viewer: the map
    (at most ``cap`` px) is coloured on [0, vmax] with the viridis LUT, then the colours are stretched
    bilinearly over the image (as a canvas draws a smaller layer with smoothing)."""
    a = np.nan_to_num(np.asarray(heat, np.float32))
    small = fit_size(a.shape[1], a.shape[0], cap)
    if small != (a.shape[1], a.shape[0]):
        a = np.asarray(Image.fromarray(a, mode="F").resize(small, Image.BILINEAR))
    rgb = Image.fromarray(colormap(a, 0.0, vmax))
    return np.asarray(rgb.resize(size, Image.BILINEAR) if rgb.size != size else rgb)


def viewer_colorbar(width: int, vmax: float = VMAX, threshold: float | None = None, height: int = 40) -> np.ndarray:
    """(height, width, 3) uint8: the viewer's horizontal colour bar (viridis on [0, vmax], ticks 0, 1 = normal
    limit, ..., vmax, the threshold as a white mark) on white."""
    f = font(11)
    img = Image.new("RGB", (width, height), "white")
    x0, x1, top, bar_h = 4, width - 5, 2, 10
    ramp = colormap(np.linspace(0, vmax, max(x1 - x0, 2))[None].repeat(bar_h, 0), 0.0, vmax)
    img.paste(Image.fromarray(ramp), (x0, top))
    d = ImageDraw.Draw(img)
    d.rectangle([x0 - 1, top - 1, x1, top + bar_h], outline=(102, 102, 102))
    step = 1 if vmax <= 6 else math.ceil(vmax / 6)
    values = list(np.arange(0, vmax + 1e-9, step))
    if vmax - values[-1] > 0.3 * step:
        values.append(vmax)
    xs = lambda v: x0 + (x1 - x0) * min(max(v / vmax, 0), 1)  # noqa: E731
    for v in values:
        text = "1 = normal limit" if v == 1 and width >= 300 else f"{v:g}"  # a narrow bar: plain numbers
        tw = d.textlength(text, font=f)
        x = xs(v)
        d.line([x, top + bar_h, x, top + bar_h + 3], fill="black")
        d.text((min(max(x - tw / 2, 0), width - tw - 1), top + bar_h + 5), text, fill="black", font=f)
    if threshold is not None:
        x = round(xs(threshold))
        d.rectangle([x - 2, top - 2, x + 2, top + bar_h + 1], fill="white", outline="black")
    return np.asarray(img)


def viewer_overlay(image: np.ndarray, heat: np.ndarray, threshold: float, vmax: float = VMAX, opacity: float = 0.5,
                   mask: np.ndarray | None = None) -> np.ndarray:
    """One method's panel of the viewer as a picture at the image's own size: the image, the heat layer at
    ``opacity``, the region >= ``threshold`` outlined in white and the ground truth in magenta (both on a dark
    halo), and the colour bar below."""
    img = np.asarray(image, np.uint8)
    img = np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img[..., :3]
    size = (img.shape[1], img.shape[0])
    out = (img * (1 - opacity) + heat_layer(heat, size, vmax).astype(np.float32) * opacity)
    out = outline_overlay(np.floor(out + 0.5).astype(np.uint8), heat_at(heat, size) >= threshold, CONTOUR)
    if mask is not None:
        out = outline_overlay(out, mask, GT_OUTLINE)
    return np.concatenate([out, viewer_colorbar(size[0], vmax, threshold)], 0)


@dataclass
class GridRow:
    """One test image in a comparison grid: its view, its ground truth and every method's calibrated map."""

    name: str
    image: np.ndarray  # (S, S, 3) uint8, as the network sees it
    gt: np.ndarray | None = None  # (S, S) 0/1
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (S, S) calibrated
    scores: dict[str, float] = field(default_factory=dict)  # method -> calibrated image score
    caption: str = ""


def compare_grid(rows: Sequence[GridRow], methods: Sequence[str], mode: str = "heatmap", threshold: float = 1.0,
                 vmin: float = VMIN, vmax: float = VMAX, cell: int = 150) -> Image.Image:
    """Rows = images; columns = image, ground truth, one cell per method; one colour bar for all.

    Args:
        mode: "heatmap" (overlays on the shared scale) or "mask" (each method's mask at ``threshold``).
        threshold: calibrated threshold, drawn on the colour bar and used in "mask" mode.
        cell: side of one cell in pixels.
    """
    if not rows:
        raise ValueError("no images to show")
    has_gt = any(r.gt is not None for r in rows)
    cols = ["image"] + (["ground truth"] if has_gt else []) + list(methods)
    f, fs = font(14), font(12)
    head_h, cap_h, gap = 24, 32, 6
    bar_w = 80
    W = len(cols) * (cell + gap) + gap + bar_w
    H = head_h + len(rows) * (cell + cap_h) + gap
    canvas = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(canvas)
    for j, c in enumerate(cols):
        d.text((gap + j * (cell + gap) + 2, 4), _fit(c, cell, f), fill="black", font=f)
    for i, r in enumerate(rows):
        y = head_h + i * (cell + cap_h)
        cells: list[tuple[np.ndarray, str]] = [(r.image, _fit(r.name, cell, fs))]
        if has_gt:
            cells.append((mask_overlay(r.image, r.gt) if r.gt is not None else r.image,
                          "no mask" if r.gt is None else f"{int(r.gt.sum())} px"))
        for m in methods:
            heat = r.maps.get(m)
            if heat is None:
                cells.append((np.full_like(r.image, 230), f"{m}: -"))
                continue
            s = r.scores.get(m)
            score = "" if s is None else f"score {s:.2f}"
            if mode == "mask":
                pm = predicted_mask(heat, threshold)
                cells.append((mask_overlay(r.image, pm, colour=(0, 200, 255)), f"{score}  {pm.mean() * 100:.1f}% px"))
            else:
                cells.append((overlay(r.image, heat, vmin, vmax), f"{score}  max {float(heat.max()):.2f}"))
        for j, (arr, cap) in enumerate(cells):
            x = gap + j * (cell + gap)
            canvas.paste(Image.fromarray(np.asarray(arr, np.uint8)).resize((cell, cell), Image.BILINEAR), (x, y))
            d.text((x + 2, y + cell + 2), cap, fill="black", font=fs)
        if r.caption:
            d.text((gap + 2, y + cell + 16), _fit(r.caption, cell, fs), fill=(90, 90, 90), font=fs)
    bar = colorbar(min(H - head_h, 360), vmin, vmax, title="anomaly",
                   threshold=threshold if mode == "mask" else None)
    canvas.paste(bar, (W - bar_w + 4, head_h))
    return canvas


def _fit(text: str, width: int, f: ImageFont.ImageFont) -> str:
    """Shorten text from the left until it fits ``width`` pixels."""
    if f.getlength(text) <= width - 4:
        return text
    while text and f.getlength("…" + text) > width - 4:
        text = text[1:]
    return "…" + text


def explanation_image(arr: Any, size: int = 224) -> np.ndarray:
    """An explanation from ``Method.explain`` as a displayable RGB uint8 image.

    2-D float maps are shown with the colour map on their own range (explanations are not calibrated);
    RGB arrays are passed through (floats in [0, 1] are scaled to 0..255).
    """
    a = np.asarray(arr.detach().cpu() if hasattr(arr, "detach") else arr)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        rgb = colormap(a, lo, hi if hi > lo else lo + 1)
    else:
        rgb = a[..., :3]
        if rgb.dtype != np.uint8:
            rgb = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8) if rgb.max() <= 1.0 else \
                np.clip(rgb, 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    if max(img.size) < size:
        img = img.resize((size, round(size * img.height / img.width)), Image.NEAREST)
    return np.asarray(img)


# ---- curves and tables ------------------------------------------------------------------------------
def curves_figure(results: dict[str, dict[str, Any]], title: str = "ROC and precision-recall curves"):
    """ROC and PR curves of every method at image level (top row) and pixel level (bottom row).

    Each method has one colour (Okabe-Ito) AND one dash style in all four subplots; each subplot has its own
    legend, whose labels carry the AUROC (ROC) or AP (PR) of that level. Pixel curves come from
    ``results[m]["pixel_curves"]``; a level without curves (no masks, one class only) stays empty.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, horizontal_spacing=0.1, vertical_spacing=0.14,
                        subplot_titles=("image ROC", "image precision-recall", "pixel ROC", "pixel precision-recall"))
    subplot = 0  # 1..4 row by row: the axes and the legend of subplot k are named xaxis{k}, legend{k} (k > 1)
    for row, (level, key) in enumerate([("image", "curves"), ("pixel", "pixel_curves")], start=1):
        have = {name: r[key] for name, r in results.items() if (r.get(key) or {}).get("fpr")}
        if have:
            fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="grey", width=1),
                                     name="chance", hoverinfo="skip", showlegend=False), row=row, col=1)
        for col, (x, y, metric, short) in enumerate([("fpr", "tpr", "auroc", "AUROC"),
                                                     ("recall", "precision", "ap", "AP")], start=1):
            subplot += 1
            suffix = "" if subplot == 1 else str(subplot)
            legend = f"legend{suffix}"
            for i, name in enumerate(results):
                if name not in have:
                    continue
                c, value = have[name], results[name].get(f"{level}_{metric}")
                colour, dash = METHOD_COLOURS[i % len(METHOD_COLOURS)], METHOD_DASHES[i % len(METHOD_DASHES)]
                fig.add_trace(go.Scatter(
                    x=c[x], y=c[y], mode="lines", name=f"{name} ({short} {_f(value)})", legend=legend,
                    line=dict(color=colour, dash=dash, width=2.5),
                    hovertemplate=f"{name}<br>{x} %{{x:.3f}}<br>{y} %{{y:.3f}}<extra></extra>"),
                    row=row, col=col)
            # the legend goes inside the subplot, in the corner its curves leave emptiest
            xanchor, yanchor = _emptiest_corner([(have[n][x], have[n][y]) for n in have])
            dom_x, dom_y = fig.layout[f"xaxis{suffix}"].domain, fig.layout[f"yaxis{suffix}"].domain
            fig.update_layout({legend: dict(
                x=dom_x[1] - 0.01 if xanchor == "right" else dom_x[0] + 0.01, xanchor=xanchor,
                y=dom_y[1] - 0.02 if yanchor == "top" else dom_y[0] + 0.02, yanchor=yanchor,
                bgcolor="rgba(255,255,255,0.75)", bordercolor="#bbb", borderwidth=1, font=dict(size=11))})
    for row in (1, 2):
        fig.update_xaxes(title_text="false positive rate", range=[0, 1], row=row, col=1)
        fig.update_yaxes(title_text="true positive rate", range=[0, 1.02], row=row, col=1)
        fig.update_xaxes(title_text="recall", range=[0, 1], row=row, col=2)
        fig.update_yaxes(title_text="precision", range=[0, 1.02], row=row, col=2)
    fig.update_layout(title=title, height=720, margin=dict(l=55, r=20, t=70, b=50), template="plotly_white")
    return fig


def _emptiest_corner(lines: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[str, str]:
    """(xanchor, yanchor) of the corner of the unit square that the fewest curve points fall in (a ROC leaves
    the bottom right empty; a PR curve the bottom left when precision stays high, the top right when not)."""
    xs = np.concatenate([np.asarray(a, float) for a, _ in lines]) if lines else np.zeros(0)
    ys = np.concatenate([np.asarray(b, float) for _, b in lines]) if lines else np.zeros(0)
    corners = [("right", "bottom"), ("left", "bottom"), ("right", "top"), ("left", "top")]  # ties: first wins
    count = [int(np.sum(((xs > 0.45) if h == "right" else (xs < 0.55)) &
                        ((ys < 0.45) if v == "bottom" else (ys > 0.55)))) for h, v in corners]
    return corners[int(np.argmin(count))]


METRIC_COLUMNS = [("image_auroc", "image AUROC"), ("image_ap", "image AP"), ("image_f1max", "image F1-max"),
                  ("pixel_auroc", "pixel AUROC"), ("pixel_ap", "pixel AP"), ("pixel_f1max", "pixel F1-max"),
                  ("aupro", "AUPRO"), ("fit_s", "fit s"), ("head_ms", "ms / image"), ("head_mb", "head MB")]
# a bootstrap 95% interval (metrics.intervals) shown right after each AUROC / AP, then the sample sizes
INTERVAL_COLUMNS = {"image_auroc": "image AUROC 95% CI", "image_ap": "image AP 95% CI",
                    "pixel_auroc": "pixel AUROC 95% CI", "pixel_ap": "pixel AP 95% CI"}
COUNT_COLUMNS = [("n_normal", "n normal"), ("n_anomalous", "n anomalous")]
NOTE_COLUMN = "note"


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)


def _digits(key: str) -> int:
    return 1 if key in ("fit_s", "head_ms") else 2 if key == "head_mb" else 3


def _interval(v: Any) -> str:
    """"0.812–0.969" from an interval (a pair, or a JSON list from a saved run); "–" when missing."""
    try:
        low, high = (float(x) for x in v)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(low) or math.isnan(high) else f"{low:.3f}–{high:.3f}"


def _note(r: dict[str, Any]) -> str:
    from .metrics import sample_note

    if r.get("n_normal") is None or r.get("n_anomalous") is None:
        return r.get("note") or ""
    return sample_note(int(r["n_normal"]), int(r["n_anomalous"]))


def table_columns() -> list[tuple[str, str]]:
    """(key, header) of every column after "method": each metric, its interval after it, sample sizes, note."""
    cols: list[tuple[str, str]] = []
    for key, label in METRIC_COLUMNS:
        cols.append((key, label))
        if key in INTERVAL_COLUMNS:
            cols.append((f"{key}_ci", INTERVAL_COLUMNS[key]))
    return cols + COUNT_COLUMNS + [("note", NOTE_COLUMN)]


def _cell(r: dict[str, Any], key: str) -> str:
    if key.endswith("_ci"):
        return _interval(r.get(key))
    if key == "note":
        return _note(r)
    if key in ("n_normal", "n_anomalous"):
        return "–" if r.get(key) is None else str(int(r[key]))
    return _f(r.get(key), _digits(key))


def metrics_table(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the metrics table as text, one row per method; missing values show as "–"."""
    cols = table_columns()
    headers = ["method"] + [label for _, label in cols]
    rows = [[name] + [_cell(r, key) for key, _ in cols] for name, r in results.items()]
    return headers, rows


def small_sample_note(results: dict[str, dict[str, Any]]) -> str:
    """One sentence for the screen when the metrics rest on fewer than 10 normal or anomalous images; ""."""
    notes = {_note(r) for r in results.values()} - {""}
    if not notes:
        return ""
    return ("**Small sample.** AUROC / AP are " + "; ".join(sorted(notes)) +
            ". The 95% intervals in the table show how little they say.")


def metrics_frame(results: dict[str, dict[str, Any]]):
    """The metrics table as a pandas DataFrame: "method", then the metrics as NUMERIC (float) columns, rounded
    for display, NaN where a value is missing, so a gr.Dataframe sorts them as numbers; after each AUROC / AP
    its bootstrap 95% interval (text), then n normal / n anomalous and a note where the sample is too small
    to mean anything (fewer than 10 images of a class)."""
    import pandas as pd

    def num(v: Any, digits: int) -> float:
        try:
            return round(float(v), digits)
        except (TypeError, ValueError):
            return math.nan

    cols = table_columns()
    numeric = {key for key, _ in METRIC_COLUMNS + COUNT_COLUMNS}
    rows = [[name] + [num(r.get(key), _digits(key) if key in dict(METRIC_COLUMNS) else 0) if key in numeric
                      else _cell(r, key) for key, _ in cols] for name, r in results.items()]
    frame = pd.DataFrame(rows, columns=["method"] + [label for _, label in cols])
    frame = frame.astype({label: "float64" for key, label in METRIC_COLUMNS})
    return frame.astype({label: "Int64" for _, label in COUNT_COLUMNS})  # whole numbers, missing as <NA>
