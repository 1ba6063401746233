"""``uadlab bench``: every method on the same data, backbone and feature cache, in one run.

Rows per (method, category) plus a mean row per method. Times: ``fit_s`` is the head's fit on cached
features; ``backbone_ms`` and ``head_ms`` are medians per test image (batch 1) measured in this run;
``head_mb`` is the size of the head's state; ``peak_rss_mb`` is the process's peak resident memory so far.

Every AUROC / AP comes with its bootstrap 95% interval (``*_ci``, ``metrics.intervals``) and the numbers of
normal and anomalous test images; with fewer than 10 of a class the row's ``note`` says the number is not
meaningful. ``seeds=K`` repeats the whole benchmark with seeds ``seed .. seed + K - 1`` (the split of the
normals and every method's own seed): each value is then the mean over seeds, ``*_std`` its standard
deviation, ``*_seeds`` the values per seed, and an interval the mean of the per-seed bounds.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .data import Dataset, load_data
from .features import FeatureCache
from .methods import get_method_class
from .pipeline import Run, RunConfig, auxiliary_set, default_cache_dir, peak_rss_mb
from .progress import ProgressFn

COLUMNS = ["method", "category", "image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap",
           "pixel_f1max", "aupro", "fit_s", "backbone_ms", "head_ms", "head_mb", "peak_rss_mb",
           "normal_px_over_1", "normal_img_over_1", "n_normal", "n_anomalous"]
METRICS = COLUMNS[2:9]
INTERVALS = ["image_auroc_ci", "image_ap_ci", "pixel_auroc_ci", "pixel_ap_ci"]
NOT_MEANINGFUL = "†"


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


def _per_category(samples, cats: Sequence[str], n: int | None) -> list:
    """The first ``n`` samples of EACH category (all with ``n`` None), categories in order."""
    return [s for c in cats for s in _limit([s for s in samples if s.category == c], n)]


def seeded(config: RunConfig, k: int) -> RunConfig:
    """``config`` for repetition ``k``: seed ``config.seed + k`` for the split of the normals and for every
    method that takes a ``seed`` (a seed given with ``--param`` is shifted by ``k`` too)."""
    import inspect

    kwargs = {m: dict(v) for m, v in config.method_kwargs.items()}
    for m in config.methods:
        if "seed" in inspect.signature(get_method_class(m).__init__).parameters:
            kwargs.setdefault(m, {})["seed"] = kwargs.get(m, {}).get("seed", config.seed) + k
    return dataclasses.replace(config, seed=config.seed + k, method_kwargs=kwargs)


def run_bench(data: str | Dataset, config: RunConfig, categories: Sequence[str] | None = None,
              multi_class: bool = False, train_limit: int | None = None, cache: FeatureCache | None = None,
              log=print, progress: Callable[[], ProgressFn | None] = lambda: None,
              data_kwargs: dict[str, Any] | None = None, seeds: int = 1) -> list[dict[str, Any]]:
    """Fit and evaluate ``config.methods`` per category (or once for all with ``multi_class``); one row per
    method and category, then each method's mean. ``config`` is the resolved run settings
    (``RunConfig.resolve``); each group of methods gets a copy of it. ``train_limit``: the first N normal
    images of each category (with ``multi_class`` too). ``seeds``: repetitions with seeds
    ``config.seed + k`` (``seeded``), summarised by ``over_seeds``. ``progress()`` gives a fresh progress
    callback per fit and per evaluation (the CLI's progress bar). ``data_kwargs`` go to ``load_data`` (e.g.
    ``streaming=True`` for a Hugging Face dataset)."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    data_kwargs = data_kwargs or {}
    ds = data if isinstance(data, Dataset) else load_data(data, categories=categories, **data_kwargs)
    cache = cache or FeatureCache(default_cache_dir())
    runs = []
    for k in range(seeds):
        if seeds > 1:
            log(f"seed {config.seed + k} ({k + 1} of {seeds})")
        runs.append(_bench_once(data, ds, seeded(config, k), categories, multi_class, train_limit, cache, log,
                                progress, data_kwargs))
    return runs[0] if seeds == 1 else over_seeds(runs)


def _bench_once(data, ds: Dataset, config: RunConfig, categories, multi_class: bool, train_limit: int | None,
                cache: FeatureCache, log, progress, data_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    methods = config.methods
    cats = list(categories) if categories else ds.categories
    trained = [m for m in methods if not get_method_class(m).zero_shot]
    zero_shot = [m for m in methods if get_method_class(m).zero_shot]
    rows: list[dict[str, Any]] = []

    def make(ms):
        return Run(config.subset(ms), cache=cache)

    def emit(run: Run, cat: str, test, bms: dict[str, float]) -> None:
        res = run.evaluate(test, progress())
        for name, r in res.items():
            row = {"method": name, "category": cat, **{k: r[k] for k in METRICS}, "fit_s": r["fit_s"],
                   "backbone_ms": bms[name], "head_ms": r["head_ms"], "head_mb": r["head_mb"], "peak_rss_mb": peak_rss_mb(),
                   "normal_px_over_1": r["normal_px_over_1"], "normal_img_over_1": r["normal_img_over_1"],
                   **{k: r.get(k) for k in INTERVALS + ["n_normal", "n_anomalous", "note"]}}
            rows.append(row)
            ci = r.get("image_auroc_ci")
            log(f"  {name:12s} {cat:10s} image AUROC {row['image_auroc']:.4f}"
                + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None else "")
                + f"  pixel AUROC {row['pixel_auroc']:.4f}  fit {row['fit_s']:.1f}s  head {row['head_ms']:.1f} ms/img"
                + (f"  ({row['note']})" if row.get("note") else ""))

    if trained:
        groups = [("all", cats)] if multi_class else [(c, [c]) for c in cats]
        for gname, gcats in groups:
            run = make(trained)
            train = _per_category(ds.train, gcats, train_limit)  # N per category, also in one multi-class model
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
            for k in ("n_normal", "n_anomalous"):  # test images behind the mean: all categories'
                mean[k] = sum(int(r[k]) for r in mine if r.get(k) is not None)
            small = [r["category"] for r in mine if r.get("note")]
            mean["note"] = f"includes categories with too few test images: {', '.join(small)}" if small else ""
            rows.append(mean)
    return rows


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def over_seeds(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (method, category) from the rows of several seeds: every number the mean over seeds;
    for the metrics also ``*_std`` (sample standard deviation) and ``*_seeds`` (the values per seed, None
    where undefined); an interval the mean of the per-seed bounds (the test-sample uncertainty of one run,
    beside the seed spread)."""
    out = []
    for first in runs[0]:
        key = (first["method"], first["category"])
        same = [next(r for r in rows if (r["method"], r["category"]) == key) for rows in runs]
        row = dict(first)
        for k in COLUMNS[2:]:
            vals = [r.get(k) for r in same]
            good = [float(v) for v in vals if _finite(v)]
            row[k] = float(np.mean(good)) if good else float("nan")
            if k in METRICS:
                row[f"{k}_std"] = float(np.std(good, ddof=1)) if len(good) > 1 else float("nan")
                row[f"{k}_seeds"] = [float(v) if _finite(v) else None for v in vals]
        for k in ("n_normal", "n_anomalous"):
            row[k] = first.get(k)
        for k in INTERVALS:
            bounds = [r[k] for r in same if r.get(k) is not None and all(_finite(float(b)) for b in r[k])]
            row[k] = [float(np.mean([b[0] for b in bounds])), float(np.mean([b[1] for b in bounds]))] if bounds \
                else None
        row["seeds"] = len(runs)
        out.append(row)
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table: each AUROC / AP with its 95% interval (and ± the standard deviation over
    seeds when repeated), the numbers of normal / anomalous test images, and a † on the values of rows whose
    test images are too few to mean anything (a footnote says so)."""
    def fmt(k, v, r):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        if k in METRICS:
            text = f"{v:.4f}"
            if _finite(r.get(f"{k}_std")):
                text += f" ± {r[f'{k}_std']:.4f}"
            ci = r.get(f"{k}_ci")
            if ci is not None and all(_finite(float(b)) for b in ci):
                text += f" [{float(ci[0]):.3f}, {float(ci[1]):.3f}]"
            return text + (NOT_MEANINGFUL if r.get("note") else "")
        if k in ("n_normal", "n_anomalous"):
            return str(int(v))
        if isinstance(v, float):
            return f"{v:.4f}" if k.startswith("normal_") else f"{v:.1f}" if v >= 10 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(k, r.get(k), r) for k in COLUMNS) + " |")
    lines.append("")
    lines.append("AUROC / AP: value" + (" ± standard deviation over seeds" if any("seeds" in r for r in rows) else "")
                 + " [bootstrap 95% interval, 1,000 stratified resamples of the test images].")
    if any(r.get("note") for r in rows):
        lines.append(f"{NOT_MEANINGFUL} not meaningful: fewer than 10 normal or anomalous test images "
                     f"(n_normal / n_anomalous).")
    return "\n".join(lines)


def _clean(v):
    """JSON without NaN (not valid JSON): NaN -> None, also inside intervals and per-seed lists."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_json(rows: list[dict[str, Any]], path: str | Path, meta: dict | None = None) -> None:
    clean = [{k: _clean(v) for k, v in r.items()} for r in rows]
    Path(path).write_text(json.dumps({"rows": clean, **(meta or {})}, indent=2))
