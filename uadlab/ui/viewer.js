/* uadlab heatmap viewer (the client side of uadlab/ui/viewer.py).
 *
 * The server renders <div class="uadv-root" data-payload="{json}">; this script turns every such element into
 * a viewer when it enters the page (a MutationObserver, because gradio inserts HTML with innerHTML, which runs
 * no script tags, and replaces or patches it when the value changes). Everything after that is client-side:
 * zoom, pan, threshold, overlays, the window / level and stepping through the images never call the server.
 *
 * Payload (see viewer.py): {vmax, threshold, presets: {name: [centre, width]}, volumes: {key: {name, handle,
 * slices: [{name, label, finding}]}}, items: [{name, label, w, h, img, full, gt, panels: [{method, score, heat,
 * lo, hi}], vals?: {url, lo, hi}, unit?, win?: [centre, width], inv?, vol?, zi?}]}. `heat` is a PNG whose R,G
 * channels hold a 16-bit code q of the calibrated map: value = lo + q * (hi - lo) / 65535; `vals` holds a
 * scan's modality values the same way (then `img` is null: the image is drawn from them through the window).
 * `gt` is a PNG mask (white = defect). (w, h) is the image's own size (capped on the server); every layer is
 * stretched onto that extent. An item with `vol` belongs to a volume: its slice slider reaches every slice,
 * asking the server (`server.viewer_slice([handle, k])`, the gr.HTML's server functions) for those not embedded.
 */
(function () {
  "use strict";
  if (window.uadlabViewer) return; // HEAD may be injected twice (page head and a component's head)

  // ---- colour map: viridis (colour-blind safe, perceptually uniform), 256 entries interpolated between
  // ten reference colours of the viridis scale ------------------------------------------------------------------
  const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e",
                   "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"];
  const LUT = (function buildLut(stops) {
    const rgb = stops.map((s) => [1, 3, 5].map((i) => parseInt(s.slice(i, i + 2), 16)));
    const lut = new Uint8ClampedArray(256 * 3);
    for (let i = 0; i < 256; i++) {
      const f = (i / 255) * (rgb.length - 1), j = Math.min(Math.floor(f), rgb.length - 2), t = f - j;
      for (let c = 0; c < 3; c++) lut[i * 3 + c] = Math.round(rgb[j][c] * (1 - t) + rgb[j + 1][c] * t);
    }
    return lut;
  })(VIRIDIS);
  const CSS_RAMP = "linear-gradient(to right, " + Array.from({ length: 17 }, (_, k) => {
    const i = Math.min(k * 16, 255);
    return `rgb(${LUT[i * 3]},${LUT[i * 3 + 1]},${LUT[i * 3 + 2]}) ${((i / 255) * 100).toFixed(1)}%`;
  }).join(", ") + ")";

  // Outline styles: a bright line on a dark halo stays visible on any image and on the viridis overlay;
  // the two differ in colour AND in dash, so they stay apart without colour vision.
  const STYLES = {
    contour: { colour: "#ffffff", halo: "rgba(0,0,0,0.85)", dash: [] },        // map >= threshold
    gt: { colour: "#ff40ff", halo: "rgba(0,0,0,0.85)", dash: [6, 4] },          // ground truth
  };
  const LINE_PX = 1.75, HALO_PX = 4; // CSS pixels, whatever the zoom
  const ZOOM_MIN = 1, ZOOM_MAX = 40, ZOOM_STEP = 1.25;
  const PREFETCH_MS = 80; // decode the neighbours of an item once it has been on screen this long

  // ---- window / level of the image (0..255 units of the displayed image) ---------------------------------
  const WINDOW_ID = { level: 128, width: 256 }; // the identity
  const WIDTH_MAX = 512; // wider than 256 lowers the contrast

  /** The window as a 256-entry LUT, DICOM's LINEAR VOI function (PS3.3 C.11.2.1.2, as uadlab.medical.voi_window):
   * y = clip((v - (level - 0.5)) / (width - 1) + 0.5, 0, 1) * 255. It is the plain
   * clip((v - (level - width / 2)) / width, 0, 1) * 255 (DICOM's LINEAR_EXACT) up to < 1 grey level, and exactly
   * the identity at level 128, width 256 (the plain form would darken 255 to 254). Width 1 is a threshold at
   * `level`. */
  function windowLut(level, width) {
    const lut = new Uint8ClampedArray(256), w1 = Math.max(width - 1, 1e-6);
    for (let v = 0; v < 256; v++) lut[v] = Math.round(Math.min(Math.max((v - (level - 0.5)) / w1 + 0.5, 0), 1) * 255);
    return lut;
  }

  /** A scan's values through a window in their own units: y = clip((v - (level - width / 2)) / width, 0, 1),
   * as uadlab.medical.Window.display, inverted after the window for MONOCHROME1; grey RGBA pixels. */
  function windowValues(vals, level, width, invert) {
    const out = new ImageData(vals.w, vals.h), d = out.data, v = vals.v, lo = level - width / 2;
    const k = 255 / Math.max(width, 1e-12);
    for (let i = 0; i < v.length; i++) {
      let g = Math.round(Math.min(Math.max((v[i] - lo) * k, 0), 255));
      if (invert) g = 255 - g;
      d[i * 4] = d[i * 4 + 1] = d[i * 4 + 2] = g;
      d[i * 4 + 3] = 255;
    }
    return out;
  }

  /** The value below which a share q of the values lies (a sorted copy, made once per item). */
  function quantile(sorted, q) {
    return sorted[Math.min(sorted.length - 1, Math.max(0, Math.floor(q * sorted.length)))];
  }

  /** A level and width that spread the image's 0.5 %..99.5 % grey range (mean of R, G, B) over 0..255. */
  function autoWindow(px) {
    const hist = new Uint32Array(256), d = px.data, n = d.length / 4;
    for (let i = 0; i < d.length; i += 4) hist[Math.round((d[i] + d[i + 1] + d[i + 2]) / 3)]++;
    const at = (q) => { // the grey value below which a share q of the pixels lies
      let acc = 0;
      for (let v = 0; v < 256; v++) if ((acc += hist[v]) >= q * n) return v;
      return 255;
    };
    const lo = at(0.005), hi = Math.max(at(0.995), lo + 1);
    return { level: (lo + hi + 1) / 2, width: hi - lo + 1 }; // LINEAR maps lo -> 0 and hi -> 255
  }

  // ---- decoding ----------------------------------------------------------------------------------------------
  function bytesOf(dataUrl) {
    const s = atob(dataUrl.slice(dataUrl.indexOf(",") + 1));
    const a = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
    return a;
  }

  /** RGBA pixels of a PNG data URL, with no colour management (the channels carry numbers, not colours). */
  async function pixelsOf(dataUrl) {
    const blob = new Blob([bytesOf(dataUrl)], { type: "image/png" });
    const bmp = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    const c = document.createElement("canvas");
    c.width = bmp.width;
    c.height = bmp.height;
    const ctx = c.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bmp, 0, 0);
    bmp.close();
    return ctx.getImageData(0, 0, c.width, c.height);
  }

  async function loadImage(url) {
    const img = new Image();
    img.src = url;
    await img.decode();
    return img;
  }

  /** A calibrated map: values (Float32Array, row-major) and its viridis layer on the fixed scale [0, vmax]. */
  async function decodeHeat(panel, vmax) {
    const px = await pixelsOf(panel.heat);
    const w = px.width, h = px.height, d = px.data, n = w * h;
    const v = new Float32Array(n), step = (panel.hi - panel.lo) / 65535;
    const layer = document.createElement("canvas");
    layer.width = w;
    layer.height = h;
    const lctx = layer.getContext("2d");
    const out = lctx.createImageData(w, h);
    for (let i = 0; i < n; i++) {
      v[i] = panel.lo + (d[i * 4] * 256 + d[i * 4 + 1]) * step;
      const k = Math.round(Math.min(Math.max(v[i] / vmax, 0), 1) * 255) * 3;
      out.data[i * 4] = LUT[k];
      out.data[i * 4 + 1] = LUT[k + 1];
      out.data[i * 4 + 2] = LUT[k + 2];
      out.data[i * 4 + 3] = 255;
    }
    lctx.putImageData(out, 0, 0);
    return { w, h, v, layer };
  }

  /** A scan's values (Float32Array in modality units) from their 16-bit PNG. */
  async function decodeValues(vals) {
    const px = await pixelsOf(vals.url), n = px.width * px.height, d = px.data;
    const v = new Float32Array(n), step = (vals.hi - vals.lo) / 65535;
    for (let i = 0; i < n; i++) v[i] = vals.lo + (d[i * 4] * 256 + d[i * 4 + 1]) * step;
    return { w: px.width, h: px.height, v, lo: vals.lo, hi: vals.hi };
  }

  /** The server functions of the gr.HTML holding `root` (null outside gradio or without them). */
  function serverOf(root) {
    for (let e = root; e; e = e.parentElement) if (e.uadlabServer) return e.uadlabServer;
    return null;
  }

  async function decodeMask(url) {
    const px = await pixelsOf(url);
    const v = new Float32Array(px.width * px.height);
    for (let i = 0; i < v.length; i++) v[i] = px.data[i * 4] > 127 ? 1 : 0;
    return { w: px.width, h: px.height, path: isoPath({ w: px.width, h: px.height, v }, 0.5).path };
  }

  // ---- iso-lines (marching squares) ----------------------------------------------------------------------
  /** The map with a one-pixel frame of -Infinity (outside counts as below every level); made once per map. */
  function padded(heat) {
    if (!heat.pad) {
      const w = heat.w, h = heat.h, W2 = w + 2;
      heat.pad = new Float32Array(W2 * (h + 2)).fill(-Infinity);
      for (let y = 0; y < h; y++) heat.pad.set(heat.v.subarray(y * w, (y + 1) * w), (y + 1) * W2 + 1);
    }
    return heat.pad;
  }

  /** The line where the map crosses level t, as a Path2D of closed polylines in map pixel units (pixel centres
   * at x + 0.5), and its number of segments. Outside the map counts as below the level, so regions at the
   * border close along the border. Saddle cells are resolved by the mean of their four corners. Segments are
   * chained into polylines (so dashes run along the line instead of restarting at every cell). */
  function isoPath(heat, t) {
    const w = heat.w, h = heat.h, W2 = w + 2, P = padded(heat);
    const pts = new Map(), nb = new Map(); // crossing id -> [x, y]; crossing id -> neighbouring crossing ids
    let n = 0;
    // crossing position (0..1) between corner values p and q; halfway when one lies outside the map
    const f = (p, q) => (isFinite(p) && isFinite(q) ? (t - p) / (q - p) : 0.5);
    const seg = (p, q) => {
      pts.set(p[0], p[1]);
      pts.set(q[0], q[1]);
      (nb.get(p[0]) || nb.set(p[0], []).get(p[0])).push(q[0]);
      (nb.get(q[0]) || nb.set(q[0], []).get(q[0])).push(p[0]);
      n++;
    };
    // cell i of the padded grid has corners a = P[i] (top-left), b (top-right), c (bottom-right), d (bottom-left)
    for (let py = 0; py <= h; py++) {
      for (let px = 0, i = py * W2; px <= w; px++, i++) {
        const a = P[i], b = P[i + 1], c = P[i + W2 + 1], d = P[i + W2];
        const code = (a >= t ? 8 : 0) | (b >= t ? 4 : 0) | (c >= t ? 2 : 0) | (d >= t ? 1 : 0);
        if (code === 0 || code === 15) continue;
        // each cell edge has one id, shared with the neighbouring cell: even ids horizontal, odd vertical
        const id = i * 2, x0 = px - 0.5, y0 = py - 0.5; // (x0, y0): centre of map pixel (px - 1, py - 1)
        const T = () => [id, [x0 + f(a, b), y0]], B = () => [id + 2 * W2, [x0 + f(d, c), y0 + 1]];
        const L = () => [id + 1, [x0, y0 + f(a, d)]], R = () => [id + 3, [x0 + 1, y0 + f(b, c)]];
        const centreAbove = (a + b + c + d) / 4 >= t;
        switch (code) {
          case 1: case 14: seg(L(), B()); break;
          case 2: case 13: seg(B(), R()); break;
          case 3: case 12: seg(L(), R()); break;
          case 4: case 11: seg(T(), R()); break;
          case 6: case 9: seg(T(), B()); break;
          case 7: case 8: seg(T(), L()); break;
          case 5: // b and d above
            if (centreAbove) { seg(T(), L()); seg(R(), B()); } else { seg(T(), R()); seg(L(), B()); }
            break;
          case 10: // a and c above
            if (centreAbove) { seg(T(), R()); seg(L(), B()); } else { seg(T(), L()); seg(R(), B()); }
            break;
        }
      }
    }
    // walk the chains: every crossing has two neighbours (the lines are closed), so each walk is a loop
    const path = new Path2D(), seen = new Set();
    for (const start of nb.keys()) {
      if (seen.has(start)) continue;
      let prev = -1, cur = start;
      seen.add(start);
      path.moveTo(...pts.get(start));
      for (;;) {
        const next = nb.get(cur).find((k) => k !== prev && !seen.has(k));
        if (next === undefined) {
          if (cur !== start && nb.get(cur).includes(start)) path.closePath();
          break;
        }
        path.lineTo(...pts.get(next));
        seen.add(next);
        prev = cur;
        cur = next;
      }
    }
    return { path, n };
  }

  function shareAbove(v, t) {
    let k = 0;
    for (let i = 0; i < v.length; i++) if (v[i] >= t) k++;
    return k / v.length;
  }

  // ---- small DOM helpers (text always goes through textContent: names come from users' files) ---------------
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function button(text, title, onClick) {
    const b = el("button", "uadv-btn", text);
    b.type = "button";
    b.title = title;
    b.setAttribute("aria-label", title);
    b.addEventListener("click", onClick);
    return b;
  }
  /** A range input (`label` for screen readers); `onInput` runs at every move, not only at release. */
  function slider(cls, id, min, max, step, value, label, onInput) {
    const r = el("input", cls);
    Object.assign(r, { type: "range", id, min: String(min), max: String(max), step: String(step),
                       value: String(value) });
    r.setAttribute("aria-label", label);
    r.addEventListener("input", onInput);
    return r;
  }
  const fmt = (x, d = 2) => (x === null || x === undefined || !isFinite(x) ? "–" : Number(x).toFixed(d));

  // ---- the viewer ------------------------------------------------------------------------------------------
  const viewers = new Set();
  let activeViewer = null; // the one the keyboard talks to when the focus is outside every viewer

  class Viewer {
    constructor(root) {
      this.root = root;
      this.uid = root.dataset.uid;
      this.data = JSON.parse(root.dataset.payload);
      this.vmax = this.data.vmax;
      this.id = root.id || "uadv";
      this.index = 0; // the item asked for (buttons, keys, slider)
      this.shown = 0; // the item on screen: `index` once its images are decoded
      // NIfTI slices are named "<file>#z042": when every name shares the part before its last "#", the items
      // are slices of one scan
      const scan = (name) => (name.includes("#") ? name.slice(0, name.lastIndexOf("#")) : null);
      const first = scan(this.data.items[0].name);
      this.noun = first !== null && this.data.items.every((it) => scan(it.name) === first) ? "slice" : "image";
      this.level = WINDOW_ID.level;
      this.width = WINDOW_ID.width;
      this.winMode = "grey"; // "grey" (0..255 of an ordinary image) or a scan's unit ("HU", "values")
      this.winTouched = false; // the user set the window: it stays while the images are of one kind
      this.volumes = this.data.volumes || {};
      this.presets = this.data.presets || {};
      this.zi = null; // the slice asked for in the shown item's volume
      this.slicePayload = new Map(); // "volume:k" -> payload (or its Promise): embedded or fetched slices
      this.data.items.forEach((it) => {
        if (it.vol !== undefined && this.volumes[it.vol]) this.slicePayload.set(`${it.vol}:${it.zi}`, it);
      });
      this.srcPx = new Map(); // image of the shown item -> its pixels (ImageData), for the window
      this.windowedOf = new Map(); // image of the shown item -> {canvas, key}: it through the current window
      this.zoom = { s: 1, x: 0, y: 0 }; // shared by all panels: image x/w -> s * x/w + x (units of panel width)
      this.threshold = this.data.threshold;
      this.opacity = 0.5;
      this.show = { heat: true, contour: true, gt: true };
      this.cache = new Map(); // item index -> Promise of its decoded images and maps
      this.panels = [];
      this.modal = null;
      this.frame = 0;
      this.build();
      this.resizer = new ResizeObserver(() => this.schedule());
      this.resizer.observe(this.grid);
      viewers.add(this);
      this.go(0);
    }

    destroy() {
      this.dead = true; // pending decodes and frames of this viewer must not touch a re-used root
      this.closeModal();
      this.resizer.disconnect();
      viewers.delete(this);
      if (activeViewer === this) activeViewer = null;
    }

    // -- layout ---------------------------------------------------------------------------------------------
    build() {
      const id = this.id, root = this.root;
      root.replaceChildren();
      const app = el("section", "uadv-app"); // not a div: gradio's DOM patching then replaces it, never reuses it
      const bar = el("div", "uadv-bar");
      this.pos = el("span", "uadv-pos");
      this.pos.setAttribute("aria-live", "polite");
      const nav = el("span", "uadv-group"), n = this.data.items.length, noun = this.noun;
      // the item slider: jumps to item k while it is dragged (go() decodes only the newest item asked for)
      this.itemIn = slider("uadv-item", `${id}-item`, 0, n - 1, 1, 0, noun,
                           () => this.go(parseInt(this.itemIn.value, 10)));
      this.itemIn.hidden = n < 2;
      nav.append(button("◀", `previous ${noun} (←)`, () => this.step(-1)), this.itemIn,
                 button("▶", `next ${noun} (→)`, () => this.step(1)), this.pos);

      const thr = el("label", "uadv-group");
      thr.append(el("span", "", "threshold"));
      this.thrNum = el("input", "uadv-thr-num");
      Object.assign(this.thrNum, { type: "number", id: `${id}-thr-num`, step: "0.01", min: "0",
                                   value: String(this.threshold) });
      this.thrNum.setAttribute("aria-label", "threshold (calibrated, 1 = normal limit)");
      // "input" (not "change"): every keystroke and every slider move re-draws at once
      this.thrRange = slider("uadv-thr-range", `${id}-thr-range`, 0, this.vmax, 0.01, this.threshold,
                             "threshold slider", () => {
                               this.thrNum.value = this.thrRange.value;
                               this.setThreshold(parseFloat(this.thrRange.value));
                             });
      this.thrNum.addEventListener("input", () => {
        const t = parseFloat(this.thrNum.value);
        if (!isFinite(t)) return;
        this.thrRange.value = String(t);
        this.setThreshold(t);
      });
      thr.append(this.thrNum, this.thrRange);

      const layers = el("span", "uadv-group");
      const check = (key, label, swatch) => {
        const l = el("label", "uadv-check");
        const c = el("input");
        Object.assign(c, { type: "checkbox", checked: this.show[key], id: `${id}-show-${key}` });
        c.addEventListener("change", () => { this.show[key] = c.checked; this.redrawAll(); });
        l.append(c);
        if (swatch) l.append(el("span", `uadv-swatch uadv-swatch-${key}`));
        l.append(el("span", "", label));
        return l;
      };
      this.opacityIn = slider("uadv-opacity", `${id}-opacity`, 0, 1, 0.05, this.opacity, "heatmap opacity", () => {
        this.opacity = parseFloat(this.opacityIn.value);
        this.redrawAll();
      });
      layers.append(check("heat", "heatmap"), this.opacityIn, check("contour", "region ≥ threshold", true),
                    check("gt", "ground truth", true));

      const view = el("span", "uadv-group");
      view.append(el("span", "", "zoom"), button("+", "zoom in (+)", () => this.zoomBy(ZOOM_STEP)),
                  button("−", "zoom out (−)", () => this.zoomBy(1 / ZOOM_STEP)),
                  button("reset", "reset zoom and pan (0)", () => this.resetZoom()));
      // window / level of the image (all panels: the heat is drawn over the windowed image)
      // window / level: typed (number fields, in the image's own units) or dragged (sliders)
      const win = el("span", "uadv-group");
      const number = (cls, nid, label) => {
        const n = el("input", cls);
        Object.assign(n, { type: "number", id: nid, step: "any" });
        n.setAttribute("aria-label", label);
        return n;
      };
      this.levelIn = number("uadv-wl-num", `${id}-level`, "window level (centre)");
      this.widthIn = number("uadv-wl-num", `${id}-width`, "window width");
      const typed = () => {
        const l = parseFloat(this.levelIn.value), w = parseFloat(this.widthIn.value);
        if (isFinite(l) && isFinite(w) && w > 0) { this.winTouched = true; this.setWindow(l, w, "typed"); }
      };
      this.levelIn.addEventListener("input", typed);
      this.widthIn.addEventListener("input", typed);
      const dragged = () => {
        this.winTouched = true;
        this.setWindow(parseFloat(this.levelRange.value), parseFloat(this.widthRange.value));
      };
      this.levelRange = slider("uadv-wl", `${id}-level-range`, 0, 255, 0.5, this.level, "window level slider", dragged);
      this.widthRange = slider("uadv-wl", `${id}-width-range`, 1, WIDTH_MAX, 1, this.width, "window width slider",
                               dragged);
      this.winUnit = el("span", "uadv-wl-unit");
      const pair = (text, input, range) => { // a label, its field and its slider wrap together
        const l = el("label", "uadv-check");
        l.append(el("span", "", text), input, range);
        return l;
      };
      this.presetBox = el("span", "uadv-group uadv-presets");
      for (const [name, [c, w]] of Object.entries(this.presets)) {
        this.presetBox.append(button(name.replace("_", " "), `${name.replace("_", " ")} window: level ${c}, width ${w} HU`,
                                     () => { this.winTouched = true; this.setWindow(c, w); }));
      }
      win.append(el("span", "", "window"), this.winUnit, pair("level", this.levelIn, this.levelRange),
                 pair("width", this.widthIn, this.widthRange),
                 button("auto", "window the 0.5 %–99.5 % range of this image", () => this.autoWindow()),
                 button("reset", "reset the window (the run's window of a scan; an image's grey values as they are)",
                        () => { this.winTouched = false; this.setWindow(...this.defaultWindow()); }),
                 this.presetBox);
      // a volume: the slice slider over all its slices, the slices of a finding marked under it
      this.volBar = el("div", "uadv-bar uadv-volbar");
      this.sliceIn = slider("uadv-slice", `${id}-slice`, 0, 1, 1, 0, "slice of the volume",
                            () => this.goSlice(parseInt(this.sliceIn.value, 10)));
      this.marks = el("div", "uadv-marks");
      const track = el("span", "uadv-track");
      track.append(this.sliceIn, this.marks);
      this.sliceText = el("span", "uadv-pos");
      this.sliceText.setAttribute("aria-live", "polite");
      this.maxBtn = button("▲ highest score", "jump to the slice with the highest image score (first method)",
                           () => this.jumpToMax());
      this.maxBtn.id = `${id}-slice-max`;
      const slide = el("span", "uadv-group uadv-slide"); // the slider and its arrows stay on one line
      slide.append(el("span", "", "slice"), button("◀", "previous slice of the volume (↓)", () => this.stepSlice(-1)),
                   track, button("▶", "next slice of the volume (↑)", () => this.stepSlice(1)));
      this.volBar.append(slide, this.sliceText, this.maxBtn);
      this.volBar.hidden = true;
      bar.append(nav, thr, layers, win, view);

      const note = el("div", "uadv-note", "Maps and image scores are calibrated on held-out normal images: " +
        "0 = median normal pixel, 1.0 = normal limit. Wheel or pinch to zoom, drag to pan (all panels " +
        "together), click a panel to enlarge; keys ← → (↑ ↓: slices of a volume) + − 0 Esc. Level and width " +
        "window the image (a scan in its own units, HU for CT; other images in 0–255 grey values; the heatmaps " +
        "are drawn over the windowed image).");
      this.status = el("div", "uadv-status");
      this.grid = el("div", "uadv-grid");
      app.append(bar, this.volBar, note, this.status, this.grid);
      root.append(app);
      this.app = app;
      root.tabIndex = 0;
      root.addEventListener("pointerdown", () => { activeViewer = this; });
      root.addEventListener("focusin", () => { activeViewer = this; });
      this.setWindow(this.level, this.width);
    }

    get item() { return this.cur; } // what the panels draw (the item asked for may still be decoding)

    /** The key of what is asked for: item i, or slice zi of item i's volume. */
    keyOf(i, zi) {
      const it = this.data.items[i];
      return it.vol !== undefined && this.volumes[it.vol] && zi !== null ? `${it.vol}:${zi}` : `#${i}`;
    }

    /** The payload of item i (slice zi of its volume): embedded, or asked from the server once and kept. */
    payloadOf(i, zi) {
      const key = this.keyOf(i, zi);
      if (key.startsWith("#")) return Promise.resolve(this.data.items[i]);
      if (!this.slicePayload.has(key)) {
        const vol = this.volumes[this.data.items[i].vol], server = serverOf(this.root);
        if (!vol.handle || !server || !server.viewer_slice) {
          return Promise.reject(new Error("this slice was not sent and no server computes it here"));
        }
        const p = server.viewer_slice([vol.handle, zi]).then((r) => {
          const got = typeof r === "string" ? JSON.parse(r) : r;
          if (!got || got.error) throw new Error(got && got.error ? got.error : "no answer");
          this.slicePayload.set(key, got);
          return got;
        });
        p.catch(() => this.slicePayload.delete(key)); // a failure is asked again next time
        this.slicePayload.set(key, p);
        // fetched slices are kept (a few hundred KB each): forget the oldest beyond 96
        if (this.slicePayload.size > 96 + this.data.items.length) {
          for (const k of this.slicePayload.keys()) {
            if (!this.data.items.some((it) => `${it.vol}:${it.zi}` === k)) { this.slicePayload.delete(k); break; }
          }
        }
      }
      return Promise.resolve(this.slicePayload.get(key));
    }

    /** Decoded assets of what `key` names (decoded once, then cached). */
    assets(key, it) {
      if (!this.cache.has(key)) {
        this.cache.set(key, Promise.all([
          it.img ? loadImage(it.img) : null,
          it.full ? loadImage(it.full) : null,
          it.gt ? decodeMask(it.gt) : null,
          Promise.all(it.panels.map((p) => decodeHeat(p, this.vmax))),
          it.vals ? decodeValues(it.vals) : null,
        ]).then(([img, full, gt, heats, vals]) => ({ img, full: full || img, gt, heats, vals })));
      }
      return this.cache.get(key);
    }

    step(d) {
      const n = this.data.items.length;
      this.go((this.index + d + n) % n);
    }

    /** Ask for item i: the position, slider and data-index follow at once, the panels once it is decoded. */
    go(i) {
      this.index = i;
      const it = this.data.items[i];
      this.zi = it.vol !== undefined && this.volumes[it.vol] ? it.zi : null;
      this.request();
    }

    /** Ask for slice zi of the shown item's volume. */
    goSlice(zi) {
      const vol = this.volumes[this.data.items[this.index].vol];
      if (!vol) return;
      this.zi = Math.min(Math.max(zi, 0), vol.slices.length - 1);
      this.request();
    }
    stepSlice(d) { if (this.zi !== null) this.goSlice(this.zi + d); }

    request() {
      const n = this.data.items.length, i = this.index, it = this.data.items[i];
      const vol = this.zi !== null ? this.volumes[it.vol] : null;
      const sl = vol ? vol.slices[this.zi] : null;
      const name = sl ? sl.name : it.name, label = sl ? (sl.name === it.name ? it.label : sl.finding ? "anomalous" : "")
        : it.label;
      this.pos.textContent = `${this.noun} ${i + 1} / ${n}  ${name}  ${label}`.trimEnd();
      this.itemIn.value = String(i);
      this.itemIn.setAttribute("aria-valuetext", `${this.noun} ${i + 1} / ${n}`);
      this.root.dataset.index = String(i);
      this.volBar.hidden = !vol;
      if (vol) {
        if (this.marksOf !== it.vol) this.buildMarks(it.vol);
        this.sliceIn.value = String(this.zi);
        const where = `${sl.label} · ${this.zi + 1} / ${vol.slices.length} of ${vol.name}`;
        this.sliceText.textContent = where + (sl.finding ? " · finding" : "");
        this.sliceIn.setAttribute("aria-valuetext", where);
        this.root.dataset.slice = sl.label;
      } else {
        delete this.root.dataset.slice;
      }
      this.root.dataset.state = "loading";
      clearTimeout(this.slowTimer);
      this.slowTimer = setTimeout(() => { // say so when the server computes a slice
        if (this.root.dataset.state === "loading" && sl) this.status.textContent = `computing the heatmaps of ${sl.label}…`;
      }, 400);
      if (!this.loading) this.load();
    }

    /** The slider of a volume: its range and the slices of a finding as marks under it. */
    buildMarks(key) {
      const vol = this.volumes[key], n = vol.slices.length;
      this.marksOf = key;
      this.sliceIn.max = String(n - 1);
      this.marks.replaceChildren();
      vol.slices.forEach((s, k) => {
        if (!s.finding) return;
        const m = el("span", "uadv-finding");
        m.style.left = `calc(8px + (100% - 16px) * ${n > 1 ? k / (n - 1) : 0})`; // under the thumb's centre
        m.title = `${s.label}: finding`;
        this.marks.append(m);
      });
      this.marks.dataset.count = String(this.marks.childElementCount);
    }

    /** Jump to the slice of the shown volume with the highest image score of the first method (the server scores
     * every slice once). */
    async jumpToMax() {
      const it = this.data.items[this.index], vol = this.volumes[it.vol], server = serverOf(this.root);
      if (!vol) return;
      const method = this.item && this.item.panels.length ? this.item.panels[0].method : null;
      let scores = null;
      if (vol.handle && server && server.viewer_volume_scores) {
        this.status.textContent = `scoring the ${vol.slices.length} slices of ${vol.name}…`;
        try {
          const r = await server.viewer_volume_scores(vol.handle);
          const got = typeof r === "string" ? JSON.parse(r) : r;
          if (got && got.error) throw new Error(got.error);
          scores = got[method] || Object.values(got)[0];
        } catch (err) {
          this.status.textContent = `The slices could not be scored (${err && err.message ? err.message : err}).`;
          return;
        }
      } else { // no server: the embedded slices only
        scores = vol.slices.map((s, k) => {
          const p = this.slicePayload.get(`${it.vol}:${k}`);
          return p && p.panels ? p.panels[0].score : null;
        });
      }
      let best = -1;
      scores.forEach((v, k) => { if (v !== null && isFinite(v) && (best < 0 || v > scores[best])) best = k; });
      if (best < 0) return;
      this.status.textContent = "";
      this.maxBtn.dataset.best = String(best);
      this.maxBtn.title = `highest ${method || ""} score: ${vol.slices[best].label} (${fmt(scores[best])})`;
      this.goSlice(best);
    }

    /** Decode and show what is asked for. One decode at a time: when the slider moved on meanwhile, the newest
     * item is decoded next and the ones passed over are skipped, so dragging through slices stays live. */
    async load() {
      this.loading = true;
      try {
        for (;;) { // until the item decoded is still the one asked for
          const i = this.index, zi = this.zi, key = this.keyOf(i, zi);
          try {
            const it = await this.payloadOf(i, zi);
            if (this.dead) return;
            if (this.keyOf(this.index, this.zi) !== key) continue;
            const a = await this.assets(key, it);
            if (this.dead) return;
            if (this.keyOf(this.index, this.zi) === key) return this.showItem(key, it, a);
          } catch (err) {
            if (this.dead) return;
            if (this.keyOf(this.index, this.zi) === key) {
              this.root.dataset.state = "error";
              const why = err && err.message ? err.message : err;
              this.status.textContent = `This ${this.noun} could not be shown (${why}).`;
              return;
            }
          }
        }
      } finally {
        this.loading = false;
      }
    }

    showItem(key, it, a) {
      const n = this.data.items.length, i = this.index;
      // keep the neighbours decoded (instant ← / →), forget the rest (decoded maps are large). The neighbours
      // are decoded a moment later, and not at all when the user has moved on by then (a dragged slider or a
      // held key): during a drag they would triple the work per slice shown.
      const near = [[(i + 1) % n, null], [(i + n - 1) % n, null]].map(([j]) => [j, this.data.items[j].vol !== undefined
        && this.volumes[this.data.items[j].vol] ? this.data.items[j].zi : null]);
      const vol = this.zi !== null ? this.volumes[this.data.items[i].vol] : null;
      if (vol) for (const d of [1, -1]) if (this.zi + d >= 0 && this.zi + d < vol.slices.length) near.push([i, this.zi + d]);
      const keep = new Set([key, ...near.map(([j, z]) => this.keyOf(j, z))]);
      for (const k of [...this.cache.keys()]) if (!keep.has(k)) this.cache.delete(k);
      setTimeout(() => {
        if (this.dead || this.keyOf(this.index, this.zi) !== key) return;
        for (const [j, z] of near) this.payloadOf(j, z).then((p) => this.assets(this.keyOf(j, z), p)).catch(() => {});
      }, PREFETCH_MS);
      clearTimeout(this.slowTimer);
      this.status.textContent = "";
      this.closeModal();
      this.shown = i;
      this.cur = it;
      this.pos.textContent = `${this.noun} ${i + 1} / ${n}  ${it.name}  ${it.label}`; // a fetched slice's own label
      this.assetsNow = a;
      this.srcPx.clear();
      this.windowedOf.clear();
      this.useWindowOf(it);
      this.buildPanels(this.item, a);
      this.setThreshold(this.threshold);
      this.root.dataset.state = "ready";
    }

    /** The window's units follow the item: a scan's own units, else 0..255. It is kept while the kind stays and
     * the user has set it; otherwise it starts at the item's own (the run's window of a scan). */
    useWindowOf(it) {
      const mode = it.vals ? (it.unit || "values") : "grey";
      const changed = mode !== this.winMode;
      this.winMode = mode;
      this.winUnit.textContent = mode === "grey" ? "(0–255)" : mode === "HU" ? "(HU)" : "(raw values)";
      this.presetBox.hidden = mode !== "HU";
      this.root.dataset.unit = mode;
      let lo = 0, hi = 255, wmax = WIDTH_MAX, step = 0.5;
      if (it.vals) {
        const [c, w] = it.win;
        lo = Math.min(it.vals.lo, c - w / 2);
        hi = Math.max(it.vals.hi, c + w / 2);
        if (mode === "HU") for (const [pc, pw] of Object.values(this.presets)) { lo = Math.min(lo, pc - pw / 2); hi = Math.max(hi, pc + pw / 2); }
        wmax = Math.max(2 * (hi - lo), 1e-6);
        step = (hi - lo) > 200 ? 1 : (hi - lo) / 1000 || 0.001;
      }
      Object.assign(this.levelRange, { min: String(lo), max: String(hi), step: String(step) });
      Object.assign(this.widthRange, { min: String(it.vals ? step : 1), max: String(wmax), step: String(step) });
      if (changed) this.winTouched = false;
      if (!this.winTouched) this.setWindow(...this.defaultWindow(it));
      else this.setWindow(this.level, this.width);
    }

    /** The shown item's own window: the run's window of a scan, the identity of an ordinary image. */
    defaultWindow(it = this.item) {
      return it && it.vals ? it.win : [WINDOW_ID.level, WINDOW_ID.width];
    }

    buildPanels(it, a) {
      this.panels = [];
      this.grid.replaceChildren();
      const make = (method, title, score, heat) => {
        const fig = el("figure", "uadv-panel");
        fig.dataset.method = method;
        fig.dataset.kind = heat ? "heat" : "image";
        const cap = el("figcaption", "uadv-cap");
        cap.append(el("span", "uadv-title", title));
        if (heat) {
          const s = el("span", "uadv-score", `score ${fmt(score)}`);
          s.title = "calibrated image score: 1.0 = normal limit";
          cap.append(s);
        }
        const stage = el("div", "uadv-stage");
        stage.style.aspectRatio = `${it.w} / ${it.h}`;
        const canvas = el("canvas");
        canvas.setAttribute("role", "img");
        canvas.setAttribute("aria-label", heat ? `${title}: heatmap over ${it.name}` : it.name);
        stage.append(canvas);
        fig.append(cap, stage);
        const p = { el: fig, stage, canvas, ctx: canvas.getContext("2d"), heat, method, title, score };
        if (heat) {
          fig.append(this.colourBar(p));
          p.share = el("div", "uadv-share");
          fig.append(p.share);
        }
        cap.append(button("⤢", `enlarge ${title} to the image's own size`, () => this.enlarge(p)));
        this.bindPointer(p);
        this.grid.append(fig);
        this.panels.push(p);
        return p;
      };
      make("", `image · ${it.label}`, null, null);
      it.panels.forEach((pp, k) => make(pp.method, pp.method, pp.score, a.heats[k]));
    }

    /** A colour bar on the fixed calibrated scale with ticks 0, 1 (= normal limit), ..., vmax. */
    colourBar(p) {
      const box = el("div", "uadv-cbar");
      const ramp = el("div", "uadv-ramp");
      ramp.style.background = CSS_RAMP;
      p.mark = el("div", "uadv-mark");
      p.mark.title = "threshold";
      ramp.append(p.mark);
      const ticks = el("div", "uadv-ticks");
      const vmax = this.vmax, step = vmax <= 6 ? 1 : Math.ceil(vmax / 6);
      const values = [];
      for (let v = 0; v <= vmax + 1e-9; v += step) values.push(v);
      if (vmax - values[values.length - 1] > 0.3 * step) values.push(vmax);
      for (const v of values) {
        const t = el("span", "uadv-tick", v === 1 ? "1 = normal limit" : fmt(v, v % 1 ? 1 : 0));
        t.style.left = `${(v / vmax) * 100}%`;
        if (v === 0) t.classList.add("uadv-tick-first");
        if (v === vmax) t.classList.add("uadv-tick-last");
        ticks.append(t);
      }
      box.append(ramp, ticks);
      return box;
    }

    setThreshold(t) {
      this.threshold = t;
      this.root.dataset.threshold = String(t);
      for (const p of this.panels) {
        if (!p.heat) continue;
        const iso = isoPath(p.heat, t);
        p.contour = iso.path;
        const share = shareAbove(p.heat.v, t);
        p.share.textContent = `${(share * 100).toFixed(2)} % of pixels ≥ ${fmt(t)}`;
        p.share.dataset.share = String(share);
        p.share.dataset.segments = String(iso.n);
        p.mark.style.left = `${Math.min(Math.max(t / this.vmax, 0), 1) * 100}%`;
      }
      this.redrawAll();
    }

    // -- window / level ---------------------------------------------------------------------------------
    /** Set the window (in the shown image's units); `typed`: the number fields are the source, left as typed. */
    setWindow(level, width, typed) {
      if (this.winMode === "grey") {
        this.level = Math.min(Math.max(level, 0), 255);
        this.width = Math.min(Math.max(width, 1), WIDTH_MAX);
      } else {
        this.level = level;
        this.width = Math.max(width, 1e-6);
      }
      const round = (x) => (this.winMode === "grey" || Math.abs(x) >= 100 ? Math.round(x * 100) / 100 : +x.toPrecision(6));
      if (!typed) {
        this.levelIn.value = String(round(this.level));
        this.widthIn.value = String(round(this.width));
      }
      this.levelRange.value = String(this.level);
      this.widthRange.value = String(this.width);
      this.root.dataset.level = String(this.level);
      this.root.dataset.width = String(this.width);
      this.redrawAll();
    }

    autoWindow() {
      const a = this.assetsNow;
      if (!a) return;
      this.winTouched = true;
      if (a.vals) { // the 0.5 %..99.5 % range of the scan's values, in its units
        if (!a.sorted) a.sorted = Float32Array.from(a.vals.v).sort();
        const lo = quantile(a.sorted, 0.005), hi = Math.max(quantile(a.sorted, 0.995), lo + 1e-6);
        return this.setWindow((lo + hi) / 2, hi - lo);
      }
      const w = autoWindow(this.pixelsOf(a.img));
      this.setWindow(w.level, w.width);
    }

    /** The image under the panels: a scan's values through the window (one pass per window change), or the
     * 8-bit image (`big`: the full-size copy) through the window's LUT. */
    baseImage(big) {
      const a = this.assetsNow, it = this.item;
      if (!a.vals) return this.windowed(big ? a.full : a.img);
      const key = `${this.level} ${this.width}`;
      if (!a.valCanvas || a.valCanvas.key !== key) {
        const c = a.valCanvas ? a.valCanvas.canvas : document.createElement("canvas");
        c.width = a.vals.w;
        c.height = a.vals.h;
        c.getContext("2d").putImageData(windowValues(a.vals, this.level, this.width, it.inv), 0, 0);
        a.valCanvas = { canvas: c, key };
      }
      return a.valCanvas.canvas;
    }

    /** The pixels of `src` (an image of the shown item), read once per item. */
    pixelsOf(src) {
      if (!this.srcPx.has(src)) {
        const c = document.createElement("canvas");
        c.width = src.naturalWidth;
        c.height = src.naturalHeight;
        const ctx = c.getContext("2d", { willReadFrequently: true });
        ctx.drawImage(src, 0, 0);
        this.srcPx.set(src, ctx.getImageData(0, 0, c.width, c.height));
      }
      return this.srcPx.get(src);
    }

    /** `src` through the window: a canvas of the LUT applied to each of R, G, B, remade only when the window
     * changes; `src` itself at the identity. Every panel draws it, so the window costs one LUT pass per change
     * whatever the number of methods (and one more for the full-size image when zoomed in or enlarged). */
    windowed(src) {
      if (this.level === WINDOW_ID.level && this.width === WINDOW_ID.width) return src;
      const key = `${this.level} ${this.width}`;
      let w = this.windowedOf.get(src);
      if (!w || w.key !== key) {
        const px = this.pixelsOf(src), lut = windowLut(this.level, this.width);
        const out = new ImageData(px.width, px.height), s = px.data, d = out.data;
        for (let i = 0; i < s.length; i += 4) {
          d[i] = lut[s[i]];
          d[i + 1] = lut[s[i + 1]];
          d[i + 2] = lut[s[i + 2]];
          d[i + 3] = s[i + 3];
        }
        const canvas = w ? w.canvas : document.createElement("canvas");
        canvas.width = px.width;
        canvas.height = px.height;
        canvas.getContext("2d").putImageData(out, 0, 0);
        w = { canvas, key };
        this.windowedOf.set(src, w);
      }
      return w.canvas;
    }

    // -- drawing ------------------------------------------------------------------------------------------
    schedule() {
      if (!this.frame) this.frame = requestAnimationFrame(() => { this.frame = 0; this.drawAll(); });
    }
    redrawAll() {
      this.schedule();
      if (this.modal) this.paintModal();
    }
    drawAll() {
      if (this.dead) return;
      const z = this.zoom;
      this.root.dataset.zoom = z.s.toFixed(4);
      for (const p of this.panels) this.drawPanel(p);
    }

    drawPanel(p) {
      const it = this.item, z = this.zoom;
      const cssW = p.stage.clientWidth, cssH = p.stage.clientHeight;
      if (!cssW || !cssH || !this.assetsNow) return;
      const dpr = window.devicePixelRatio || 1;
      const W = Math.round(cssW * dpr), H = Math.round(cssH * dpr);
      if (p.canvas.width !== W || p.canvas.height !== H) { p.canvas.width = W; p.canvas.height = H; }
      const ctx = p.ctx;
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.fillStyle = "#111";
      ctx.fillRect(0, 0, W, H);
      const k = (z.s * cssW * dpr) / it.w; // device pixels per image pixel
      ctx.setTransform(k, 0, 0, k, z.x * cssW * dpr, z.y * cssW * dpr);
      const a = this.assetsNow;
      this.paint(ctx, p, k, dpr, this.baseImage(!a.vals && k * it.w > 1.5 * a.img.naturalWidth));
      p.el.dataset.transform = `${z.s.toFixed(4)} ${z.x.toFixed(4)} ${z.y.toFixed(4)}`;
    }

    /** Draw image (windowed) and overlays; ctx maps image pixels (own size w x h); k = device pixels per image
     * pixel. */
    paint(ctx, p, k, dpr, img) {
      const it = this.item, a = this.assetsNow;
      ctx.imageSmoothingEnabled = k < 3; // past 3x show the image's pixels as they are
      ctx.drawImage(img, 0, 0, it.w, it.h);
      if (p.heat && this.show.heat && this.opacity > 0) {
        ctx.imageSmoothingEnabled = true;
        ctx.globalAlpha = this.opacity;
        ctx.drawImage(p.heat.layer, 0, 0, it.w, it.h);
        ctx.globalAlpha = 1;
      }
      if (p.heat && this.show.contour && p.contour) {
        this.stroke(ctx, p.contour, it.w / p.heat.w, it.h / p.heat.h, k, dpr, STYLES.contour);
      }
      if (a.gt && this.show.gt) this.stroke(ctx, a.gt.path, it.w / a.gt.w, it.h / a.gt.h, k, dpr, STYLES.gt);
    }

    stroke(ctx, path, sx, sy, k, dpr, style) {
      ctx.save();
      ctx.scale(sx, sy);
      const unit = dpr / (k * Math.min(sx, sy)); // one CSS pixel in path units
      ctx.lineJoin = "round";
      ctx.lineCap = "round";
      ctx.setLineDash(style.dash.map((d) => d * unit));
      ctx.strokeStyle = style.halo;
      ctx.lineWidth = HALO_PX * unit;
      ctx.stroke(path);
      ctx.strokeStyle = style.colour;
      ctx.lineWidth = LINE_PX * unit;
      ctx.stroke(path);
      ctx.restore();
    }

    // -- linked zoom and pan --------------------------------------------------------------------------------
    /** Keep the image covering the panel: no empty margins when zoomed, no zoom below 1. */
    clamp() {
      const z = this.zoom, aspect = this.item.h / this.item.w;
      z.s = Math.min(Math.max(z.s, ZOOM_MIN), ZOOM_MAX);
      z.x = Math.min(0, Math.max(1 - z.s, z.x));
      z.y = Math.min(0, Math.max(aspect * (1 - z.s), z.y));
      for (const p of this.panels) p.stage.classList.toggle("uadv-zoomed", z.s > 1);
    }
    /** Zoom by factor f about the point (u, v) of the panel (units of panel width). */
    zoomAt(u, v, f) {
      const z = this.zoom, s = Math.min(Math.max(z.s * f, ZOOM_MIN), ZOOM_MAX);
      z.x = u - ((u - z.x) * s) / z.s;
      z.y = v - ((v - z.y) * s) / z.s;
      z.s = s;
      this.clamp();
      this.schedule();
    }
    zoomBy(f) {
      this.zoomAt(0.5, (0.5 * this.item.h) / this.item.w, f);
    }
    resetZoom() {
      this.zoom = { s: 1, x: 0, y: 0 };
      this.clamp();
      this.schedule();
    }

    bindPointer(p) {
      const stage = p.stage, pointers = new Map();
      let start = null; // {x, y, zx, zy} of a one-finger drag
      let pinch = null; // {d, u, v} of a two-finger pinch
      let moved = false;
      const rel = (e) => {
        const r = stage.getBoundingClientRect();
        return { u: (e.clientX - r.left) / r.width, v: (e.clientY - r.top) / r.width, w: r.width };
      };
      stage.addEventListener("wheel", (e) => {
        if (e.deltaY > 0 && this.zoom.s <= ZOOM_MIN) return; // nothing to zoom out: let the page scroll
        e.preventDefault();
        const q = rel(e);
        this.zoomAt(q.u, q.v, Math.exp(-e.deltaY * 0.0015));
      }, { passive: false });
      stage.addEventListener("pointerdown", (e) => {
        if (e.pointerType === "mouse" && e.button !== 0) return;
        stage.setPointerCapture(e.pointerId);
        pointers.set(e.pointerId, e);
        moved = false;
        if (pointers.size === 1) {
          start = { x: e.clientX, y: e.clientY, zx: this.zoom.x, zy: this.zoom.y };
        } else if (pointers.size === 2) {
          const [a, b] = [...pointers.values()];
          pinch = { d: Math.hypot(a.clientX - b.clientX, a.clientY - b.clientY) };
          start = null;
          moved = true;
        }
      });
      stage.addEventListener("pointermove", (e) => {
        if (!pointers.has(e.pointerId)) return;
        pointers.set(e.pointerId, e);
        if (pinch && pointers.size === 2) {
          const [a, b] = [...pointers.values()];
          const d = Math.hypot(a.clientX - b.clientX, a.clientY - b.clientY);
          const mid = rel({ clientX: (a.clientX + b.clientX) / 2, clientY: (a.clientY + b.clientY) / 2 });
          if (pinch.d > 0) this.zoomAt(mid.u, mid.v, d / pinch.d);
          pinch.d = d;
        } else if (start) {
          const dx = e.clientX - start.x, dy = e.clientY - start.y;
          if (Math.hypot(dx, dy) > 4) moved = true;
          if (!moved) return;
          const w = stage.clientWidth;
          this.zoom.x = start.zx + dx / w;
          this.zoom.y = start.zy + dy / w;
          this.clamp();
          this.schedule();
        }
      });
      const end = (e) => {
        if (!pointers.has(e.pointerId)) return;
        pointers.delete(e.pointerId);
        const click = e.type === "pointerup" && start && !moved && pointers.size === 0;
        if (pointers.size < 2) pinch = null;
        if (pointers.size === 0) start = null;
        if (click) this.enlarge(p);
      };
      stage.addEventListener("pointerup", end);
      stage.addEventListener("pointercancel", end);
    }

    // -- enlarged view: one panel at the image's own resolution -------------------------------------------
    enlarge(p) {
      this.closeModal();
      const it = this.item;
      const modal = el("div", "uadv-modal");
      modal.setAttribute("role", "dialog");
      modal.setAttribute("aria-modal", "true");
      modal.id = `${this.id}-modal`;
      modal.tabIndex = -1;
      const head = el("div", "uadv-modal-head");
      const what = p.heat ? `${p.method} · score ${fmt(p.score)}` : "image";
      head.append(el("span", "uadv-modal-title", `${it.name} (${it.label}) · ${what} · ${it.w} × ${it.h} px`),
                  button("✕", "close (Esc)", () => this.closeModal()));
      const canvas = el("canvas", "uadv-modal-canvas");
      canvas.dataset.naturalWidth = String(it.w);
      canvas.dataset.naturalHeight = String(it.h);
      canvas.style.width = `${it.w}px`;
      canvas.style.height = `${it.h}px`;
      const body = el("div", "uadv-modal-body");
      body.append(canvas);
      modal.append(head, body);
      modal.addEventListener("click", (e) => { if (e.target === modal || e.target === body) this.closeModal(); });
      document.body.append(modal); // outside gradio's containers, so `position: fixed` means the viewport
      this.modal = { el: modal, canvas, panel: p, returnFocus: document.activeElement };
      this.root.dataset.enlarged = p.method || "image";
      this.paintModal();
      modal.focus();
    }

    paintModal() {
      const m = this.modal, it = this.item, dpr = window.devicePixelRatio || 1;
      m.canvas.width = Math.round(it.w * dpr);
      m.canvas.height = Math.round(it.h * dpr);
      const ctx = m.canvas.getContext("2d");
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      this.paint(ctx, m.panel, dpr, dpr, this.baseImage(true));
    }

    closeModal() {
      if (!this.modal) return;
      const back = this.modal.returnFocus;
      this.modal.el.remove();
      this.modal = null;
      delete this.root.dataset.enlarged;
      if (back && back.isConnected && back.focus) back.focus();
      else if (this.root.isConnected) this.root.focus();
    }

    // -- keyboard -------------------------------------------------------------------------------------------
    key(e) {
      if (e.key === "Escape") { if (this.modal) { this.closeModal(); return true; } return false; }
      if (this.modal) return false;
      switch (e.key) {
        case "ArrowRight": this.step(1); return true;
        case "ArrowLeft": this.step(-1); return true;
        case "ArrowUp": if (this.zi === null) return false; this.stepSlice(1); return true;
        case "ArrowDown": if (this.zi === null) return false; this.stepSlice(-1); return true;
        case "+": case "=": this.zoomBy(ZOOM_STEP); return true;
        case "-": case "_": this.zoomBy(1 / ZOOM_STEP); return true;
        case "0": this.resetZoom(); return true;
      }
      return false;
    }
  }

  const TYPING = new Set(["text", "number", "range", "search", "email", "url", "password", "tel"]);
  function typingIn(t) {
    if (!t || !t.tagName) return false;
    if (t.isContentEditable || t.tagName === "TEXTAREA" || t.tagName === "SELECT") return true;
    return t.tagName === "INPUT" && TYPING.has(t.type);
  }

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const open = [...viewers].find((v) => v.modal);
    let v = open;
    if (!v) {
      const root = e.target && e.target.closest ? e.target.closest(".uadv-root") : null;
      v = root ? root.uadlabViewer : null;
      // with the focus on the page itself, the last viewer used answers
      if (!v && (e.target === document.body || e.target === document.documentElement)) v = activeViewer;
    }
    if (!v || !v.root.isConnected || (!open && typingIn(e.target))) return;
    if (v.key(e)) e.preventDefault();
  });

  // ---- start every viewer that enters the page, and restart it when gradio replaces or patches its HTML ------
  function needsStart(root) {
    const v = root.uadlabViewer;
    return !v || v.uid !== root.dataset.uid || v.app.parentNode !== root || v.app.className !== "uadv-app";
  }
  function scan() {
    for (const v of [...viewers]) if (!v.root.isConnected) v.destroy();
    for (const root of document.querySelectorAll(".uadv-root[data-payload]")) {
      if (!needsStart(root)) continue;
      if (root.uadlabViewer) root.uadlabViewer.destroy();
      try {
        root.uadlabViewer = new Viewer(root);
      } catch (err) {
        root.textContent = `The heatmap viewer could not start: ${err && err.message ? err.message : err}`;
        console.error(err);
      }
    }
  }
  let queued = false;
  new MutationObserver(() => {
    if (queued) return;
    queued = true;
    queueMicrotask(() => { queued = false; scan(); });
  }).observe(document.documentElement, { childList: true, subtree: true, attributes: true,
                                          attributeFilter: ["data-uid", "data-payload"] });
  window.uadlabViewer = { scan, viewers, LUT };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", scan);
  else scan();
})();
