import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from uadlab import metrics as M


def test_image_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y
    m = M.image_metrics(y, s)
    assert m["image_auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["image_ap"] == pytest.approx(average_precision_score(y, s))
    # F1-max by brute force over all thresholds
    best = max(2 * ((s >= t) & (y == 1)).sum() / ((s >= t).sum() + (y == 1).sum()) for t in s)
    assert m["image_f1max"] == pytest.approx(best)


def test_one_class_is_nan_not_zero():
    m = M.image_metrics(np.zeros(5), np.arange(5.0))
    assert all(np.isnan(v) for v in m.values())
    assert all(np.isnan(v) for v in M.pixel_metrics(None, np.zeros((2, 4, 4))).values())


def test_aupro_perfect_and_hand_computed():
    masks = np.zeros((1, 10, 10), np.uint8)
    masks[0, 2:4, 2:4] = 1
    assert M.aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    # Two regions; the map detects region A fully at every threshold, region B never above normal pixels.
    masks = np.zeros((1, 10, 10), np.uint8)
    masks[0, 0:2, 0:2] = 1  # region A
    masks[0, 6:8, 6:8] = 1  # region B
    maps = np.zeros((1, 10, 10))
    maps[0, 0:2, 0:2] = 1.0
    # Curve points: (FPR 0, PRO 0.5) at threshold 1 (A found, B not); B ties with the normal pixels, so the
    # next point is (1, 1). PRO at FPR 0.3 interpolates to 0.65; area 0.3 * (0.5 + 0.65) / 2, over 0.3.
    assert M.aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.575, abs=1e-6)


def test_aupro_linear_ramp():
    # One region that is always found, and normal pixels with distinct scores: PRO = 1 at every FPR.
    rng = np.random.default_rng(1)
    maps = rng.random((2, 16, 16))
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 4:8, 4:8] = 1
    maps[masks == 1] = 2.0
    assert M.aupro(masks, maps) == pytest.approx(1.0, abs=1e-6)
    # Region pixels ranked exactly like normal pixels: PRO equals FPR -> area = 0.3^2/2 / 0.3 = 0.15.
    maps = rng.random((1, 100, 100))
    masks = np.zeros((1, 100, 100), np.uint8)
    masks[0, :50, :] = 1  # one big region, same score distribution as the normal half
    assert M.aupro(masks, maps) == pytest.approx(0.15, abs=0.02)


def test_pixel_metrics_shape_check_and_curves():
    with pytest.raises(ValueError, match="shape"):
        M.pixel_metrics(np.zeros((1, 4, 4)), np.zeros((1, 5, 5)))
    c = M.curves([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert c["fpr"][0] == 0 and c["tpr"][-1] == 1 and len(c["precision"]) == len(c["recall"])


def test_weighted_auroc_ap_equal_sklearn_on_repeated_items():
    """Bootstrap resamples are integer weights: the vectorised AUROC / AP equal scikit-learn's, ties included."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.normal(size=60) + y, 1)  # rounded: many tied scores
    w = rng.integers(0, 3, (4, 60)).astype(float)
    auroc, ap = M.weighted_auroc_ap(y, s, w)
    for i in range(4):
        assert auroc[i] == pytest.approx(roc_auc_score(y, s, sample_weight=w[i]), abs=1e-12)
        assert ap[i] == pytest.approx(average_precision_score(y, s, sample_weight=w[i]), abs=1e-12)
    assert np.isnan(M.weighted_auroc_ap(y, s, (y == 1)[None].astype(float))[0][0])  # one class drawn: undefined


def test_bootstrap_interval_is_stratified_seeded_and_shrinks_with_n():
    rng = np.random.default_rng(0)

    def data(n):
        y = np.repeat([0, 1], n)
        return y, rng.normal(size=2 * n) + 1.0 * y  # true AUROC ~0.76

    y, s = data(15)
    a, b = M.bootstrap_intervals(y, s), M.bootstrap_intervals(y, s)
    assert a == b  # fixed seed: the same interval for the same data
    auc = roc_auc_score(y, s)
    assert a["auroc"].low < auc < a["auroc"].high and 0 <= a["ap"].low < a["ap"].high <= 1
    W = M.stratified_weights(y, 50)
    assert (W[:, y == 0].sum(1) == 15).all() and (W[:, y == 1].sum(1) == 15).all()  # class sizes kept
    y2, s2 = data(400)
    wide, narrow = a["auroc"], M.bootstrap_intervals(y2, s2)["auroc"]
    assert narrow.high - narrow.low < 0.5 * (wide.high - wide.low)
    # coverage: the interval from 15 + 15 images holds the AUROC of a large sample from the same model
    y3, s3 = data(20000)
    truth = roc_auc_score(y3, s3)
    covered = 0
    for _ in range(40):
        yy, ss = data(15)
        ci = M.bootstrap_intervals(yy, ss, n_resamples=300)["auroc"]
        covered += ci.low <= truth <= ci.high
    assert covered >= 32  # nominal 95%: 38 of 40 expected; percentile intervals run a little short at n = 15


def test_intervals_counts_and_small_sample_note():
    y = np.array([0] * 12 + [1] * 3)
    out = M.intervals(y, np.linspace(0, 1, 15))
    assert (out["n_normal"], out["n_anomalous"]) == (12, 3)
    assert "not meaningful" in out["note"] and "3 anomalous" in out["note"]
    assert np.isnan(out["pixel_auroc_ci"].low)  # no masks: missing, not zero
    assert M.intervals(np.array([0] * 10 + [1] * 10), np.arange(20.0))["note"] == ""
    one_class = M.intervals(np.zeros(5), np.arange(5.0))
    assert np.isnan(one_class["image_auroc_ci"].high) and one_class["n_anomalous"] == 0


def test_pixel_interval_resamples_images_not_pixels():
    """Pixels of one image move together: the interval comes from resampling images, so one image that
    differs wholesale widens it; binned ranks give the exact pixel AUROC to within 1e-3."""
    rng = np.random.default_rng(0)
    n, S = 24, 32
    labels = np.repeat([0, 1], n // 2)
    masks = np.zeros((n, S, S), np.uint8)
    masks[n // 2:, 8:16, 8:16] = 1
    maps = rng.random((n, S, S)) + 0.8 * masks
    exact = M.pixel_metrics(masks, maps)["pixel_auroc"]
    pos, neg = M.binned_counts(masks, maps)
    binned, _ = M._auroc_ap(np.cumsum(pos.sum(0))[None], np.cumsum(neg.sum(0))[None])
    assert binned[0] == pytest.approx(exact, abs=1e-3)
    ci = M.pixel_bootstrap_intervals(masks, maps, labels)["auroc"]
    assert ci.low <= exact <= ci.high
    shifted = maps + rng.normal(0, 0.5, (n, 1, 1))  # per-image offsets: pixels are no longer independent
    wide = M.pixel_bootstrap_intervals(masks, shifted, labels)["auroc"]
    assert wide.high - wide.low > 3 * (ci.high - ci.low)
    assert str(ci).startswith("[") and ci == M.pixel_bootstrap_intervals(masks, maps, labels)["auroc"]
