/* uadlab: the 2 x 2 ROC / PR figure (viz.curves_figure) becomes one column of four plots when its box is
   narrower than 600 px (a phone), and goes back when it is wide again: every plot keeps a readable size and
   nothing is cut. Only layout changes (axis domains, subplot titles, legends, height), through Plotly.relayout. */
(() => {
  if (window.__uadCurves) return;
  window.__uadCurves = true;
  const NARROW = 600, ROW_PX = 300, GAP = 0.085;
  const suffix = k => (k === 1 ? "" : String(k));
  const count = L => { let n = 0; while (L["xaxis" + suffix(n + 1)]) n++; return n; };

  function narrowUpdate(gd) {
    const L = gd.layout, n = count(L), h = (1 - GAP * (n - 1)) / n, up = {}, wide = {};
    const set = (key, value, old) => { up[key] = value; wide[key] = old; };
    for (let k = 1; k <= n; k++) {
      const top = 1 - (k - 1) * (h + GAP), bottom = top - h, s = suffix(k);
      set(`xaxis${s}.domain`, [0, 1], L[`xaxis${s}`].domain);
      set(`yaxis${s}.domain`, [bottom, top], L[`yaxis${s}`].domain);
      const lg = L[`legend${s}`];
      if (lg) {
        set(`legend${s}.x`, lg.xanchor === "right" ? 0.99 : 0.01, lg.x);
        set(`legend${s}.y`, lg.yanchor === "top" ? top - 0.005 : bottom + 0.005, lg.y);
      }
    }
    // the subplot titles: make_subplots writes them first, in paper coordinates above each plot
    (L.annotations || []).slice(0, n).forEach((a, i) => {
      if (a.xref !== "paper" || a.yref !== "paper") return;
      const top = 1 - i * (h + GAP);
      set(`annotations[${i}].x`, 0.5, a.x);
      set(`annotations[${i}].y`, top, a.y);
    });
    set("height", ROW_PX * n + 120, L.height);
    set("meta", "uad-narrow", L.meta === undefined ? null : L.meta);
    return [up, wide];
  }

  function fit(gd, resized) {
    const L = gd.layout, box = gd.parentElement;
    if (!window.Plotly || !L || !L.xaxis || !box || count(L) < 2 || gd.__uadBusy) return;
    const width = Math.floor(box.getBoundingClientRect().width);
    const narrow = width < NARROW, isNarrow = L.meta === "uad-narrow";
    let update = null;
    if (narrow && !isNarrow) {
      const [up, wide] = narrowUpdate(gd);
      gd.__uadWide = {...wide, width: null};  // wide again: plotly sizes the plot to its box
      update = {...up, width};
    } else if (!narrow && isNarrow && gd.__uadWide) {
      update = gd.__uadWide;
    } else if (narrow && resized && Math.abs((L.width || 0) - width) > 2) {
      update = {width};  // a narrow box changed its width: the plot follows (only on a resize, never in a loop)
    }
    if (!update) return;
    gd.__uadBusy = true;
    Promise.resolve(window.Plotly.relayout(gd, update)).finally(() => { gd.__uadBusy = false; });
  }

  const seen = new WeakSet();
  const watch = () => document.querySelectorAll("#curves .js-plotly-plot").forEach(gd => {
    if (seen.has(gd)) return;
    seen.add(gd);
    fit(gd, false);
    new ResizeObserver(() => fit(gd, true)).observe(gd.parentElement || gd);
    if (gd.on) gd.on("plotly_afterplot", () => fit(gd, false));  // a new figure (Plotly.react) arrives wide
  });
  let queued = false;  // new plots are looked for once per frame, however many nodes change
  new MutationObserver(() => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; watch(); });
  }).observe(document.documentElement, {childList: true, subtree: true});
  watch();
})();
