"""``uadlab bench``: every method on the same data, backbone and feature cache, in one run.

Rows per (method, category) plus a mean row per method. Times: ``fit_s`` is the head's fit on cached
features; ``backbone_ms`` and ``head_ms`` are medians per test image (batch 1) measured in this run;
``head_mb`` is the size of the head's state; ``peak_rss_mb`` is the process's peak resident memory so far.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import metrics as M
from .data import Dataset, load_data
from .features import FeatureCache
from .methods import get_method_class
from .pipeline import Run, RunConfig, auxiliary_set, default_cache_dir, peak_rss_mb
from .progress import ProgressFn

COLUMNS = ["method", "category", *M.IMAGE_METRICS, *M.PIXEL_METRICS, M.FIT_S, "backbone_ms", M.HEAD_MS, M.HEAD_MB,
           "peak_rss_mb", M.NORMAL_PX_OVER_1, M.NORMAL_IMG_OVER_1]
METRICS = COLUMNS[2:9]


def backbone_ms(run: Run, samples, n: int = 8) -> dict[str, float]:
    """Median backbone time per image (batch 1, no cache) over up to ``n`` images, after one warm-up, of each
    head's backbone (a paper preset may give heads different ones): {method: ms}."""
    per_bb: dict[int, float] = {}
    out = {}
    for name in run.heads:
        bb = run.backbone_of(name)
        if id(bb) not in per_bb:
            per_bb[id(bb)] = _backbone_ms(bb, samples, n)
        out[name] = per_bb[id(bb)]
    return out


def _backbone_ms(bb, samples, n: int) -> float:
    xs = [bb.transform(s.load())[None] for s in samples[:n]]
    bb(xs[0])
    times = []
    for x in xs:
        t0 = time.perf_counter()
        bb(x)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def _limit(samples, n: int | None):
    return list(samples) if not n else list(samples)[:n]


def run_bench(data: str | Dataset, config: RunConfig, categories: Sequence[str] | None = None,
              multi_class: bool = False, train_limit: int | None = None, cache: FeatureCache | None = None,
              log=print, progress: Callable[[], ProgressFn | None] = lambda: None,
              data_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Fit and evaluate ``config.methods`` per category (or once for all with ``multi_class``); one row per
    method and category, then each method's mean. ``config`` is the resolved run settings
    (``RunConfig.resolve``); each group of methods gets a copy of it. ``progress()`` gives a fresh progress
    callback per fit and per evaluation (the CLI's progress bar). ``data_kwargs`` go to ``load_data`` (e.g.
    ``streaming=True`` for a Hugging Face dataset)."""
    methods = config.methods
    data_kwargs = data_kwargs or {}
    ds = data if isinstance(data, Dataset) else load_data(data, categories=categories, **data_kwargs)
    cats = list(categories) if categories else ds.categories
    cache = cache or FeatureCache(default_cache_dir())
    trained = [m for m in methods if not get_method_class(m).zero_shot]
    zero_shot = [m for m in methods if get_method_class(m).zero_shot]
    rows: list[dict[str, Any]] = []

    def make(ms):
        return Run(config.subset(ms), cache=cache)

    def emit(run: Run, cat: str, test, bms: dict[str, float]) -> None:
        res = run.evaluate(test, progress())
        for name, r in res.items():
            row = {"method": name, "category": cat, **{k: r.metrics.get(k) for k in COLUMNS[2:]},
                   "backbone_ms": bms[name], "peak_rss_mb": peak_rss_mb()}
            rows.append(row)
            log(f"  {name:12s} {cat:10s} image AUROC {row[M.IMAGE_AUROC]:.4f}  pixel AUROC {row[M.PIXEL_AUROC]:.4f}"
                f"  fit {row[M.FIT_S]:.1f}s  head {row[M.HEAD_MS]:.1f} ms/img")

    if trained:
        groups = [("all", cats)] if multi_class else [(c, [c]) for c in cats]
        for gname, gcats in groups:
            run = make(trained)
            train = _limit([s for s in ds.train if s.category in gcats], train_limit)
            log(f"[{gname}] fitting {', '.join(trained)} on {len(train)} normal images ({run.config.backbone})")
            run.fit(train, progress())
            for c in gcats:
                test = [s for s in ds.test if s.category == c]
                emit(run, c, test, backbone_ms(run, test))
    pool = load_data(data, **data_kwargs) if zero_shot and categories and not isinstance(data, Dataset) else ds
    for c in cats if zero_shot else []:
        aux = auxiliary_set(pool, [c])  # the other categories' labelled test images, never c's
        run = make(zero_shot)
        log(f"[{c}] zero-shot {', '.join(zero_shot)}: auxiliary set = test splits of the other categories "
            f"({len(aux)} labelled images); target normals only calibrate the scale")
        run.fit(_limit([s for s in ds.train if s.category == c], train_limit), progress(), aux=aux)
        test = [s for s in ds.test if s.category == c]
        emit(run, c, test, backbone_ms(run, test))
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        if len(mine) > 1:
            mean = {"method": name, "category": "mean"}
            for k in COLUMNS[2:]:
                vals = [r[k] for r in mine if r[k] is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
                mean[k] = float(np.mean(vals)) if vals else float("nan")
            rows.append(mean)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def fmt(k, v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        if isinstance(v, float):
            return f"{v:.4f}" if k in METRICS or k.startswith("normal_") else f"{v:.1f}" if v >= 10 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(k, r.get(k)) for k in COLUMNS) + " |")
    return "\n".join(lines)


def write_json(rows: list[dict[str, Any]], path: str | Path, meta: dict | None = None) -> None:
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    Path(path).write_text(json.dumps({"rows": clean, **(meta or {})}, indent=2))
