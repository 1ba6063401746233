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
