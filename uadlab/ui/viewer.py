"""The heatmap viewer: one test image at a time, the original and one panel per method, side by side.

Plain python in, one HTML string out; everything interactive happens in the browser (``viewer.js``), so
zooming, panning, the threshold and stepping through images never wait for the server:

- panels >= 512 px wide where the page allows (a grid that wraps), full width on a phone;
- linked zoom and pan (wheel or pinch, drag; buttons; keys + - 0), click a panel to enlarge it to the
  image's own resolution (Esc closes);
- overlays: the calibrated heatmap in viridis on the FIXED scale [0, vmax] with an opacity slider, the
  contour of the region >= threshold (white on a dark halo) and the ground-truth outline (dashed magenta on
  a dark halo), each switchable; a colour bar with ticks 0, 1 = normal limit, ..., vmax on every heatmap;
- a threshold as a number AND a slider, linked, applied on every keystroke; the share of pixels above it;
- ← / → , the ◀ ▶ buttons and an item slider step through the items ("slice k / n" when every name shares the
  part before its last ``#``, as the NIfTI loader names slices ``<file>#z042``; no slider for one item); a
  dragged slider shows the slices live: only the newest item asked for is decoded, the ones passed over are
  skipped; all items are embedded in the HTML;
- window / level, typed (number fields) or dragged (sliders). For scans (items with ``values``: DICOM, NIfTI,
  16-bit images) in the scan's OWN units (HU for CT, raw values otherwise), starting at the run's window
  for that image, with the CT presets (brain, soft tissue, lung, bone) for HU; y = clip((v - (level -
  width / 2)) / width, 0, 1) * 255 (as :meth:`uadlab.medical.Window.display`), MONOCHROME1 inverted after
  it. The window stays while one steps through slices of the same kind. For ordinary images in their 0..255
  grey values (level 128, width 256 = the image as it is): DICOM's LINEAR function, as
  :func:`uadlab.medical.voi_window`, y = clip((v - (level - 0.5)) / (width - 1) + 0.5, 0, 1) * 255 per
  channel. "auto" windows the 0.5..99.5 % range of the shown image. It applies to the original panel, the
  enlarged view AND the image under the heat in every method's panel (they all draw the same windowed
  canvas: one pass per change). The heat colours themselves are never windowed.
- whole scans: an item of a volume or DICOM series (``ViewItem.volume``) gets a slice slider over ALL the
  volume's slices (:class:`Volume`), labelled in the volume's own numbering (``z 12``, ``instance 7``), with
  the slices of a finding (ground truth) marked on it and a button jumping to the slice with the highest
  score. Slices not embedded are asked from the server when reached (``volume.handle`` through the gr.HTML's
  server functions ``viewer_slice([handle, k])`` and ``viewer_volume_scores(handle)``, see compare_tab),
  computed there lazily and cached on both sides.

What is sent: each image as a data URL at most ``PANEL_MAX`` px on its long side for the panels, plus a copy
at its own resolution (at most ``FULL_MAX``) for the enlarged view when that is larger; each heat map as a
16-bit PNG (R = high byte, G = low byte over the map's own [min, max]) at most ``HEAT_MAX`` px on its long
side (maps are smooth, upsampled from a patch grid, so this loses nothing visible); masks as 1-bit PNGs at
most ``PANEL_MAX`` px. No file of the workspace is served: data URLs only. A 224 px map costs ~100 KB; the
browser decodes the current image and its two neighbours only.

Mount it in gradio (6.x)::

    view = gr.HTML(viewer_html(items), head=HEAD, js_on_load=None)   # or viewer_component(items)
    ...  # a callback returns viewer_html(new_items) as the new value

``HEAD`` may also go to ``demo.launch(head=HEAD)`` instead; it is idempotent. Do not give the gr.HTML the
same ``elem_id`` as the viewer (the viewer's root element carries that id).
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Sequence

import numpy as np
from PIL import Image

PANEL_MAX = 1024  # long side of the image in the panels
FULL_MAX = 2048  # long side of the enlarged view (the image's own resolution up to this cap)
HEAT_MAX = 512  # long side of a heat map sent to the browser (viz.HEAT_MAX: exports colour it as the viewer)
LABELS = ("normal", "anomalous", "unlabelled")
_ELEM_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


@dataclass
class Panel:
    """One method's view of an image: a CALIBRATED map (0 = median normal, 1 = normal limit) and score."""

    method: str
    heat: np.ndarray  # (H, W) float; any size, it is stretched onto the image
    image_score: float  # same scale


@dataclass
class ViewItem:
    """A test image with one panel per method and its ground truth, if any.

    Scans add ``values`` (the image in its modality units, same size), their ``unit`` ("HU" for CT, "" for
    raw values), the run's ``window`` (centre, width) on them and MONOCHROME1's ``invert``: the viewer then
    windows the values itself. ``volume`` / ``slice_pos`` place the item in a :class:`Volume` of the viewer.
    """

    name: str
    image: np.ndarray  # (H, W, 3) uint8 at the image's own resolution ((H, W) grayscale is accepted)
    panels: list[Panel] = field(default_factory=list)
    mask: np.ndarray | None = None  # (H, W) bool ground truth
    label: str = "unlabelled"  # "normal" / "anomalous" / "unlabelled"
    values: np.ndarray | None = None  # (H, W) float modality units
    unit: str = ""
    window: tuple[float, float] | None = None  # (centre, width) in modality units
    invert: bool = False
    volume: str | None = None  # key of the viewer's ``volumes``
    slice_pos: int | None = None  # position in that volume's slices


@dataclass
class Volume:
    """A volume or series the items belong to: every slice in order, named in its own numbering.

    Attributes:
        name: what the slider says it browses (``patient00.nii.gz``, ``series3``).
        slices: per slice (in order) ``{"name": sample name, "label": "z 12", "finding": bool}``.
        handle: the server's key to compute slices not embedded (None: only embedded slices can be shown).
    """

    name: str
    slices: list[dict[str, Any]]
    handle: str | None = None


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _head() -> str:
    js, css = _asset("viewer.js"), _asset("viewer.css")
    if "</script" in js.lower() or "</style" in css.lower():  # would end the tag early
        raise ValueError("viewer.js / viewer.css must not contain a closing tag")
    return f'<style id="uadlab-viewer-css">\n{css}</style>\n<script>\n{js}</script>\n'


HEAD: str = _head()  # <style> + <script> for gr.HTML(head=...) or launch(head=...)


# ---- encoding ------------------------------------------------------------------------------------------------
def _data_url(img: Image.Image, fmt: str = "PNG", compress_level: int = 6) -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, "JPEG", quality=90)
    else:
        img.save(buf, "PNG", compress_level=compress_level)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fit(w: int, h: int, cap: int) -> tuple[int, int]:
    """(w, h) scaled down so the long side is at most ``cap``."""
    f = min(1.0, cap / max(w, h))
    return max(1, round(w * f)), max(1, round(h * f))


def _image_url(img: Image.Image, cap: int) -> str:
    """The image at most ``cap`` px on its long side: PNG (lossless) when small, JPEG otherwise."""
    size = _fit(*img.size, cap)
    if size != img.size:
        img = img.resize(size, Image.LANCZOS)
    return _data_url(img, "PNG" if size[0] * size[1] <= 512 * 512 else "JPEG")


def encode_heat(heat: np.ndarray, cap: int = HEAT_MAX) -> dict[str, Any]:
    """A map as {"heat": 16-bit PNG data URL, "lo", "hi"}: code q in R (high byte) and G (low byte),
    value = lo + q * (hi - lo) / 65535; at most ``cap`` px on its long side (bilinear)."""
    a = np.asarray(heat, np.float32)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    size = _fit(a.shape[1], a.shape[0], cap)
    if size != (a.shape[1], a.shape[0]):
        a = np.asarray(Image.fromarray(a, mode="F").resize(size, Image.BILINEAR))
    span = hi - lo if hi > lo else 1.0
    q = np.clip(np.round((a - lo) / span * 65535), 0, 65535).astype(np.uint16)
    rgb = np.stack([q >> 8, q & 255, np.zeros_like(q)], -1).astype(np.uint8)
    # the low byte is close to noise: zlib gains ~5% at level 6 for 4x the time, so level 1
    return {"heat": _data_url(Image.fromarray(rgb), compress_level=1), "lo": lo, "hi": lo + span}


def decode_heat(url: str, lo: float, hi: float) -> np.ndarray:
    """The inverse of :func:`encode_heat` (what the browser does), as float32."""
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"), np.float64)
    return (lo + (rgb[..., 0] * 256 + rgb[..., 1]) * (hi - lo) / 65535).astype(np.float32)


def _rgb(image: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"viewer item {name!r}: the image must be uint8, not {a.dtype}")
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        a = a[..., :3] if a.shape[2] != 1 else a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, 2)
    if a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 1:
        raise ValueError(f"viewer item {name!r}: the image must be (H, W, 3) uint8, not {np.asarray(image).shape}")
    return np.ascontiguousarray(a)


def _score(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None  # JSON has no NaN


def item_payload(it: ViewItem) -> dict[str, Any]:
    """What the browser gets of one item (JSON-ready; see viewer.js)."""
    rgb = _rgb(it.image, it.name)
    img = Image.fromarray(rgb)
    w, h = _fit(img.width, img.height, FULL_MAX)  # the enlarged view's size
    vals = None
    if it.values is not None:
        v = np.asarray(it.values, np.float32)
        if v.shape != rgb.shape[:2]:
            raise ValueError(f"viewer item {it.name!r}: values are {v.shape}, the image is {rgb.shape[:2]}")
        vals = encode_heat(v, FULL_MAX)  # 16 bits over the slice's own range: < 0.1 HU steps for CT
        vals = {"url": vals["heat"], "lo": vals["lo"], "hi": vals["hi"]}
    # with values the browser draws the image from them: the 8-bit copies are not sent
    panel_url = _image_url(img, PANEL_MAX) if vals is None else None
    full_url = _image_url(img, FULL_MAX) if vals is None and max(img.size) > PANEL_MAX else None
    gt = None
    if it.mask is not None:
        m = np.asarray(it.mask)
        if m.ndim != 2:
            raise ValueError(f"viewer item {it.name!r}: the mask must be (H, W), not {m.shape}")
        mimg = Image.fromarray((m > 0).astype(np.uint8) * 255)
        size = _fit(mimg.width, mimg.height, PANEL_MAX)
        gt = _data_url(mimg.resize(size, Image.NEAREST).convert("1"))
    panels = []
    for p in it.panels:
        heat = np.asarray(p.heat)
        if heat.ndim != 2 or heat.size == 0:
            raise ValueError(f"viewer item {it.name!r}: the map of {p.method} must be (H, W), not {heat.shape}")
        panels.append({"method": str(p.method), "score": _score(p.image_score), **encode_heat(heat)})
    label = it.label if it.label in LABELS else "unlabelled"
    out = {"name": str(it.name), "label": label, "w": w, "h": h, "img": panel_url, "full": full_url,
           "gt": gt, "panels": panels}
    if vals is not None:
        lo, hi = vals["lo"], vals["hi"]
        c, wd = it.window if it.window is not None else ((lo + hi) / 2, max(hi - lo, 1e-6))
        if not (math.isfinite(c) and math.isfinite(wd) and wd > 0):
            raise ValueError(f"viewer item {it.name!r}: bad window {it.window}")
        out.update(vals=vals, unit=str(it.unit or ""), win=[float(c), float(wd)], inv=bool(it.invert))
    if it.volume is not None:
        out.update(vol=str(it.volume), zi=int(it.slice_pos or 0))
    return out


_item_payload = item_payload  # the former private name


def _volume_payload(key: str, v: Volume) -> dict[str, Any]:
    if not v.slices:
        raise ValueError(f"volume {v.name!r} has no slices")
    slices = [{"name": str(s["name"]), "label": str(s.get("label", k)), "finding": bool(s.get("finding"))}
              for k, s in enumerate(v.slices)]
    return {"name": str(v.name), "slices": slices, "handle": v.handle}


def viewer_html(items: Sequence[ViewItem], threshold: float = 1.0, vmax: float = 3.0, elem_id: str = "viewer",
                volumes: dict[str, Volume] | None = None, presets: dict[str, tuple[float, float]] | None = None) -> str:
    """The viewer of ``items`` as an HTML string for a gr.HTML whose page has :data:`HEAD`.

    Args:
        items: the test images to step through (all are embedded in the HTML).
        threshold: the initial calibrated threshold of the contours.
        vmax: top of the fixed colour scale (calibrated units; the scale is [0, vmax] for every map).
        elem_id: id of the viewer's root element; its controls get ids ``{elem_id}-thr-num``,
            ``{elem_id}-thr-range``, ``{elem_id}-opacity``, ``{elem_id}-show-heat|contour|gt``, the item
            slider ``{elem_id}-item``, the window ``{elem_id}-level`` and ``{elem_id}-width``, and the enlarged
            view ``{elem_id}-modal``. The root reports ``data-index``, ``data-state`` (loading / ready /
            error), ``data-threshold``, ``data-zoom``, ``data-level`` and ``data-width`` (in the shown
            image's units, ``data-unit``), and for a volume ``data-slice`` (the slice's own label); the
            volume's slice slider is ``{elem_id}-slice``.
        volumes: the volumes items belong to (``ViewItem.volume`` keys).
        presets: window presets {name: (centre, width)} offered for HU images (default: the CT presets).

    Raises:
        ValueError: a bad image, map or mask (naming the item), or a bad threshold, vmax or elem_id.
    """
    if not _ELEM_ID.fullmatch(elem_id):
        raise ValueError(f"elem_id must be letters, digits, - or _ (starting with a letter), not {elem_id!r}")
    if not (math.isfinite(vmax) and vmax > 0):
        raise ValueError(f"vmax must be a positive number, not {vmax}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a number, not {threshold}")
    if not items:
        return (f'<div class="uadv-root uadv-empty" id="{elem_id}"><p>No images to show: choose test images '
                "and a trained run.</p></div>")
    volumes = volumes or {}
    missing = {it.volume for it in items if it.volume is not None} - set(volumes)
    if missing:
        raise ValueError(f"viewer items name volumes {sorted(missing)} that are not given")
    if presets is None:
        from ..medical import WINDOW_PRESETS as presets
    payload = json.dumps({"vmax": float(vmax), "threshold": float(threshold),
                          "items": [item_payload(it) for it in items],
                          "volumes": {k: _volume_payload(k, v) for k, v in volumes.items()},
                          "presets": {k: [float(c), float(w)] for k, (c, w) in presets.items()}},
                         separators=(",", ":"))
    uid = hashlib.sha1(payload.encode()).hexdigest()[:16]
    # html.escape quotes & < > " ': user-chosen names cannot leave the attribute
    return (f'<div class="uadv-root" id="{elem_id}" data-uid="{uid}" data-payload="{html.escape(payload)}">'
            '<div class="uadv-fallback">Loading the heatmap viewer (it needs JavaScript)…</div></div>')


# the gr.HTML hands its server functions to the viewers inside it (viewer.js looks for ``uadlabServer`` upwards)
JS_ON_LOAD = "element.uadlabServer = server;"


def viewer_component(items: Sequence[ViewItem] = (), threshold: float = 1.0, vmax: float = 3.0,
                     elem_id: str = "viewer", volumes: dict[str, Volume] | None = None, **kwargs: Any):
    """A gr.HTML showing the viewer of ``items`` that brings :data:`HEAD` itself (kwargs go to gr.HTML; give
    ``server_functions=[viewer_slice, viewer_volume_scores]`` for volumes with a handle)."""
    import gradio as gr

    return gr.HTML(viewer_html(items, threshold, vmax, elem_id, volumes), head=HEAD,
                   js_on_load=JS_ON_LOAD if kwargs.get("server_functions") else None, **kwargs)
