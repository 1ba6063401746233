"""Image- and pixel-level metrics: AUROC, AP, F1-max, AUPRO; curve points for plotting.

scikit-learn and SciPy are imported on first use: with pandas and pyarrow behind them they add ~150 MB to a
process, which a fit (the memory peak of ``uadlab fit`` / ``bench``) does not need.
"""
from __future__ import annotations

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
