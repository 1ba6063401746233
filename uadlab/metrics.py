"""Image- and pixel-level metrics: AUROC, AP, F1-max, AUPRO; curve points for plotting; bootstrap intervals
of AUROC / AP and the sample sizes behind them (``intervals``).

scikit-learn and SciPy are imported on first use: with pandas and pyarrow behind them they add ~150 MB to a
process, which a fit (the memory peak of ``uadlab fit`` / ``bench``) does not need.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


def _both_classes(labels: np.ndarray) -> bool:
    return labels.size > 0 and labels.min() != labels.max()


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import precision_recall_curve

    p, r, _ = precision_recall_curve(labels, scores)
    return float(np.max(2 * p * r / np.clip(p + r, 1e-12, None)))


def binary_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC, AP and F1-max; NaN when only one class is present (undefined, not zero)."""
    labels = np.asarray(labels).ravel().astype(np.uint8)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not _both_classes(labels):
        return {"auroc": float("nan"), "ap": float("nan"), "f1max": float("nan")}
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {"auroc": float(roc_auc_score(labels, scores)), "ap": float(average_precision_score(labels, scores)),
            "f1max": f1_max(labels, scores)}


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, num_thresholds: int = 200) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1].

    For each threshold: PRO = mean over connected ground-truth regions of the fraction of the region
    predicted anomalous; FPR = fraction of normal pixels predicted anomalous. The curve (FPR, PRO) is
    integrated over FPR in [0, fpr_limit] (the last segment interpolated) and divided by ``fpr_limit``.

    Args:
        masks: (N, H, W) binary ground truth.
        maps: (N, H, W) anomaly maps.
    """
    from scipy import ndimage

    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    if not masks.any() or masks.all():
        return float("nan")
    # label connected regions (8-connectivity) per image
    regions = []
    for m in masks:
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions.append((lab, n))
    normal_px = maps[~masks]
    # thresholds: quantiles of normal pixels (FPR spans [0, fpr_limit] finely) and of anomalous pixels
    # (PRO steps are not missed when scores tie), plus +inf for the origin
    qs = np.linspace(0.0, 1.0, num_thresholds)
    ths = np.concatenate([np.quantile(normal_px, 1.0 - qs * fpr_limit), np.quantile(maps[masks], qs), [np.inf]])
    ths = np.unique(ths)[::-1]
    fprs, pros = [], []
    for t in ths:
        pred = maps >= t
        fprs.append(float((pred & ~masks).sum()) / normal_px.size)
        overlaps = []
        for (lab, n), p in zip(regions, pred):
            if n == 0:
                continue
            hits = ndimage.sum(p, lab, index=np.arange(1, n + 1))
            sizes = ndimage.sum(np.ones_like(p), lab, index=np.arange(1, n + 1))
            overlaps.extend(np.asarray(hits) / np.asarray(sizes))
        pros.append(float(np.mean(overlaps)))
    fprs, pros = np.array(fprs), np.array(pros)
    order = np.argsort(fprs, kind="stable")
    fprs, pros = fprs[order], pros[order]
    keep = fprs <= fpr_limit
    f, p = fprs[keep], pros[keep]
    if f.size == 0 or f[-1] < fpr_limit:
        nxt = np.searchsorted(fprs, fpr_limit)
        if nxt < len(fprs) and f.size:
            # interpolate PRO at exactly fpr_limit
            p_lim = np.interp(fpr_limit, [f[-1], fprs[nxt]], [p[-1], pros[nxt]])
            f, p = np.append(f, fpr_limit), np.append(p, p_lim)
    return float(np.trapezoid(p, f) / fpr_limit)


def image_metrics(labels, scores) -> dict[str, float]:
    m = binary_metrics(labels, scores)
    return {"image_auroc": m["auroc"], "image_ap": m["ap"], "image_f1max": m["f1max"]}


def pixel_metrics(masks: np.ndarray | None, maps: np.ndarray, max_pixels: int = 4_000_000) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AUPRO; all NaN when there are no masks (missing, not zero)."""
    nan = float("nan")
    if masks is None:
        return {"pixel_auroc": nan, "pixel_ap": nan, "pixel_f1max": nan, "aupro": nan}
    masks = np.asarray(masks).astype(np.uint8)
    maps = np.asarray(maps, dtype=np.float32)
    m = binary_metrics(*_pixels(masks, maps, max_pixels))
    return {"pixel_auroc": m["auroc"], "pixel_ap": m["ap"], "pixel_f1max": m["f1max"], "aupro": aupro(masks, maps)}


def _pixels(masks: np.ndarray, maps: np.ndarray, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) of all pixels, or of a fixed random subset of ``max_pixels`` of them (keeps AUROC/AP
    exact in expectation and memory bounded)."""
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    lab, sc = masks.ravel(), maps.ravel()
    if lab.size > max_pixels:
        idx = np.random.default_rng(0).choice(lab.size, max_pixels, replace=False)
        lab, sc = lab[idx], sc[idx]
    return lab, sc


def curves(labels, scores, max_points: int = 200) -> dict[str, list[float]]:
    """ROC and PR curve points (thinned to at most ``max_points`` each) for plotting."""
    labels = np.asarray(labels).ravel().astype(np.uint8)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not _both_classes(labels):
        return {"fpr": [], "tpr": [], "precision": [], "recall": []}
    from sklearn.metrics import precision_recall_curve, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    p, r, _ = precision_recall_curve(labels, scores)

    def thin(*a):
        idx = np.unique(np.linspace(0, len(a[0]) - 1, min(max_points, len(a[0]))).round().astype(int))
        return [x[idx].tolist() for x in a]

    fpr, tpr = thin(fpr, tpr)
    p, r = thin(p, r)
    return {"fpr": fpr, "tpr": tpr, "precision": p, "recall": r}


def pixel_curves(masks: np.ndarray | None, maps: np.ndarray, max_points: int = 200,
                 max_pixels: int = 4_000_000) -> dict[str, list[float]]:
    """Pixel-level ROC and PR curve points (the pixels subsampled as in :func:`pixel_metrics`); empty lists
    when there are no masks."""
    if masks is None:
        return curves([], [], max_points)
    lab, sc = _pixels(np.asarray(masks).astype(np.uint8), np.asarray(maps, dtype=np.float32), max_pixels)
    return curves(lab, sc, max_points)


# ---- uncertainty: bootstrap intervals and sample sizes ------------------------------------------------------------
MIN_PER_CLASS = 10  # below this many normal or anomalous test images, an AUROC / AP is not meaningful
N_RESAMPLES = 1000


class Interval(NamedTuple):
    """A two-sided confidence interval (a tuple, so it is a JSON list ``[low, high]``)."""

    low: float
    high: float

    def __str__(self) -> str:
        return f"[{self.low:.3f}, {self.high:.3f}]"


def _auroc_ap(tp: np.ndarray, fp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AP per row from (R, K) cumulative (weighted) true and false positives at K thresholds in
    descending order, as scikit-learn computes them: AUROC = trapezoids of the ROC (ties as one step), AP =
    sum over thresholds of the recall step times the precision. NaN where a class has weight 0."""
    tp, fp = tp.astype(np.float64), fp.astype(np.float64)
    P, N = tp[:, -1], fp[:, -1]
    tp0, fp0 = np.pad(tp, ((0, 0), (1, 0))), np.pad(fp, ((0, 0), (1, 0)))
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (np.diff(fp0, axis=1) * (tp0[:, 1:] + tp0[:, :-1])).sum(1) / (2 * P * N)
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 1.0)
        ap = (np.diff(tp0, axis=1) * precision).sum(1) / P
    bad = (P == 0) | (N == 0)
    return np.where(bad, np.nan, auroc), np.where(bad, np.nan, ap)


def weighted_auroc_ap(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AP of ``(labels, scores)`` under each row of ``weights`` (R, n): with integer weights, exactly
    scikit-learn's values on the items repeated that many times (ties included)."""
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # the last item of every run of tied scores
    y = labels[order].astype(np.float32)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float32))[:, order]
    total = np.cumsum(weights, axis=1)[:, ends]  # float32 sums of counts: exact below 2^24
    tp = np.cumsum(weights * y, axis=1)[:, ends]
    return _auroc_ap(tp, total - tp)


def binned_counts(masks: np.ndarray, maps: np.ndarray, bins: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Per image, how many anomalous and normal pixels fall in each of ``bins`` score bins (quantiles of all
    pixels; bins in DESCENDING score order): (pos, neg), each (n_images, K). What a bootstrap that resamples
    whole images needs: a resample's counts are a weighted sum of these rows."""
    masks = np.asarray(masks).astype(bool).reshape(len(masks), -1)
    maps = np.asarray(maps, dtype=np.float32).reshape(len(maps), -1)
    edges = np.unique(np.quantile(maps[:, ::max(1, maps.size // (1 << 22))], np.linspace(0, 1, bins + 1)[1:-1]))
    b = len(edges) - np.searchsorted(edges, maps, side="right")  # 0 = the highest scores
    K = len(edges) + 1
    rows = np.arange(len(maps))[:, None] * K
    pos = np.bincount((rows + b)[masks], minlength=len(maps) * K).reshape(len(maps), K)
    neg = np.bincount((rows + b)[~masks], minlength=len(maps) * K).reshape(len(maps), K)
    return pos.astype(np.float32), neg.astype(np.float32)


def stratified_weights(strata: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(n_resamples, n) bootstrap counts: each resample draws, within every stratum, as many items as the
    stratum holds, with replacement (so every resample keeps the numbers of normal and anomalous items)."""
    strata = np.asarray(strata).ravel()
    rng = np.random.default_rng(seed)
    w = np.zeros((n_resamples, len(strata)), np.float32)
    for v in np.unique(strata):
        idx = np.flatnonzero(strata == v)
        w[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=n_resamples)
    return w


def _percentiles(values: dict[str, np.ndarray], level: float) -> dict[str, Interval]:
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out = {}
    for name, v in values.items():
        v = v[np.isfinite(v)]
        out[name] = Interval(*map(float, np.percentile(v, q))) if v.size else Interval(float("nan"), float("nan"))
    return out


def bootstrap_intervals(labels: np.ndarray, scores: np.ndarray, n_resamples: int = N_RESAMPLES, level: float = 0.95,
                        seed: int = 0) -> dict[str, Interval]:
    """Percentile bootstrap intervals of AUROC and AP, ``{"auroc": Interval, "ap": Interval}``: the items are
    resampled with replacement within their class (stratified: every resample keeps the numbers of normal
    and anomalous items). Fixed ``seed``: the same data give the same interval. NaN when a class is missing.
    A percentile interval cannot leave the values resamples can take: when the classes separate perfectly
    it collapses to [1, 1] whatever n is, so read it with the counts (``sample_note``)."""
    labels = np.asarray(labels).ravel().astype(np.uint8)
    if not _both_classes(labels):
        return _percentiles({"auroc": np.array([]), "ap": np.array([])}, level)
    auroc, ap = weighted_auroc_ap(labels, scores, stratified_weights(labels, n_resamples, seed))
    return _percentiles({"auroc": auroc, "ap": ap}, level)


def pixel_bootstrap_intervals(masks: np.ndarray, maps: np.ndarray, image_labels: np.ndarray,
                              n_resamples: int = N_RESAMPLES, level: float = 0.95, seed: int = 0,
                              bins: int = 2048) -> dict[str, Interval]:
    """Percentile bootstrap intervals of pixel AUROC and AP: whole IMAGES are resampled within their class (the
    pixels of one image are not independent: resampling pixels would give far too narrow an interval).
    Pixel scores are ranked in ``bins`` quantile bins (``binned_counts``), so a resample costs one matrix
    product, not a sort of every pixel; the point estimates stay exact (``pixel_metrics``)."""
    masks = np.asarray(masks)
    if masks.shape != np.shape(maps):
        raise ValueError(f"masks {masks.shape} and maps {np.shape(maps)} differ in shape")
    if not masks.any() or masks.all():
        return _percentiles({"auroc": np.array([]), "ap": np.array([])}, level)
    pos, neg = binned_counts(masks, maps, bins)
    W = stratified_weights(image_labels, n_resamples, seed)  # (R, n_images)
    tp, fp = W @ np.cumsum(pos, axis=1), W @ np.cumsum(neg, axis=1)  # (R, K)
    auroc, ap = _auroc_ap(tp, fp)
    return _percentiles({"auroc": auroc, "ap": ap}, level)


def sample_note(n_normal: int, n_anomalous: int) -> str:
    """"" when both classes have at least ``MIN_PER_CLASS`` test images, else what a reader must know."""
    if min(n_normal, n_anomalous) >= MIN_PER_CLASS:
        return ""
    return (f"not meaningful: {n_normal} normal / {n_anomalous} anomalous test images "
            f"(fewer than {MIN_PER_CLASS} of a class)")


def intervals(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None = None, maps: np.ndarray | None = None,
              n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """The uncertainty of an evaluation: bootstrap 95% intervals of image AUROC / AP and of pixel AUROC / AP
    (NaN bounds without masks), the numbers of normal and anomalous images, and ``note`` (``sample_note``)."""
    labels = np.asarray(labels).ravel().astype(np.uint8)
    img = bootstrap_intervals(labels, scores, n_resamples=n_resamples, seed=seed)
    n_normal, n_anomalous = int((labels == 0).sum()), int((labels == 1).sum())
    px = pixel_bootstrap_intervals(masks, maps, labels, n_resamples, seed=seed) if masks is not None else \
        _percentiles({"auroc": np.array([]), "ap": np.array([])}, 0.95)
    return {"image_auroc_ci": img["auroc"], "image_ap_ci": img["ap"], "pixel_auroc_ci": px["auroc"],
            "pixel_ap_ci": px["ap"], "n_normal": n_normal, "n_anomalous": n_anomalous,
            "note": sample_note(n_normal, n_anomalous)}
