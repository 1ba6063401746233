import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from uadlab.postprocess import Calibration, conformal_rank, f1_threshold, images_needed, gaussian_smooth, image_score, threshold_from_normals, upsample


def test_gaussian_matches_scipy_per_image():
    rng = np.random.default_rng(0)
    x = rng.random((3, 40, 50)).astype(np.float32)
    ours = gaussian_smooth(torch.from_numpy(x), sigma=2.0).numpy()
    for i in range(3):  # per image: scipy on a batch would also blur across images
        ref = gaussian_filter(x[i], sigma=2.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(ours[i], ref, atol=1e-5)


def test_image_score_modes():
    m = torch.zeros(1, 10, 10)
    m[0, 0, :3] = torch.tensor([5.0, 3.0, 1.0])
    assert image_score(m, "max").item() == 5.0
    assert image_score(m, "top1").item() == 5.0  # 1% of 100 pixels = 1 pixel
    assert image_score(m, "top2").item() == 4.0
    assert image_score(m, "top3%").item() == 3.0
    with pytest.raises(ValueError):
        image_score(m, "median")


def test_upsample_shape():
    assert upsample(torch.rand(2, 7, 7), (56, 64)).shape == (2, 56, 64)


def test_calibration_puts_normals_on_one_scale():
    rng = np.random.default_rng(0)
    for scale, shift in [(1.0, 0.0), (1000.0, 50.0)]:  # two "methods" with different raw ranges
        normal = torch.from_numpy(rng.normal(shift, scale, (8, 32, 32))).float()
        cal = Calibration.fit(normal, image_score(normal))
        c = cal.maps(normal)
        assert abs(float(c.median())) < 0.05 and float(torch.quantile(c.flatten(), 0.999)) == pytest.approx(1, abs=0.05)
        anomalous = cal.maps(normal + 5 * scale)
        assert float(anomalous.median()) > 1


def test_thresholds():
    assert threshold_from_normals(np.arange(101), 0.01) == 100  # k = ceil(102 * 0.99) = 101: the largest
    assert threshold_from_normals(np.arange(200), 0.05) == 190  # k = ceil(201 * 0.95) = 191
    with pytest.raises(ValueError, match="needs at least 99"):
        threshold_from_normals(np.arange(50), 0.01)
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    y = np.array([0, 0, 0, 1, 1])
    assert 0.3 < f1_threshold(s, y) <= 0.8
    with pytest.raises(ValueError):
        f1_threshold(s, np.zeros(5))


def test_conformal_threshold_and_its_statement():
    """1.0 on the image scale = the ceil((n + 1)(1 - alpha))-th smallest held-out score; too few images: no
    threshold, and the statement says what cannot be promised and how many images it needs."""
    scores = torch.arange(1.0, 21.0)  # 20 held-out normal scores 1..20
    cal = Calibration.fit(torch.rand(20, 8, 8), scores, alpha=0.05)
    assert conformal_rank(20, 0.05) == 20 and cal.calibrated and cal.threshold == 20.0
    assert cal.promised == pytest.approx(1 / 21) and cal.smallest_alpha == pytest.approx(1 / 21)
    assert float(cal.scores(torch.tensor([20.0]))) == pytest.approx(1.0) and cal.score_lo == 10.0
    assert "at most 0.0476" in cal.statement and "1/21" in cal.statement
    few = Calibration.fit(torch.rand(20, 8, 8), scores, alpha=0.01)
    assert not few.calibrated and few.threshold is None and few.promised is None
    assert images_needed(0.01) == 99 and "cannot be calibrated" in few.statement and "at least 99" in few.statement
    none = Calibration.fit(torch.rand(0, 8, 8), torch.zeros(0))
    assert none.n == 0 and none.threshold is None and "Not calibrated" in none.statement
    saved = Calibration.from_dict(cal.to_dict())  # derived entries (statement, promised) are not fields
    assert saved == cal and saved.to_dict()["statement"] == cal.statement
    legacy = Calibration.from_dict(dict(lo=0.1, hi=2.0, score_lo=0.5, score_hi=3.0, q=0.999))
    assert legacy.threshold is None and legacy.hi == 2.0  # an old normal-approximation scale promises nothing


def test_pixel_scale_is_a_rank_statistic_when_enough_images():
    rng = np.random.default_rng(1)
    maps = torch.from_numpy(rng.random((1000, 4, 4))).float()
    cal = Calibration.fit(maps, maps.flatten(1).max(1).values, q=0.99)  # rank ceil(1001 * 16 * 0.99) of 16000
    assert cal.pixel_calibrated and cal.hi == float(maps.flatten().sort().values[math.ceil(1001 * 16 * 0.99) - 1])
    assert not Calibration.fit(maps[:50], maps[:50, 0, 0], q=0.99).pixel_calibrated  # 50 < 99 images


@pytest.mark.parametrize("n,alpha", [(5, 0.2), (20, 0.05), (200, 0.01)])
def test_split_conformal_false_alarms_within_the_guarantee(n, alpha):
    """Over many draws of n held-out normal scores, the share of NEW normal scores above the threshold is
    at most the promise (exact for exchangeable continuous scores: 1 - k / (n + 1))."""
    rng = np.random.default_rng(n)
    over = []
    for _ in range(2000):
        s = rng.gamma(2.0, 1.0, n + 200)  # right-skewed, like max / top-k image scores
        cal = Calibration.fit(torch.zeros(n, 1, 1), torch.from_numpy(s[:n]), alpha=alpha)
        over.append(float((cal.scores(torch.from_numpy(s[n:])) > 1.0).double().mean()))
    promised = Calibration.fit(torch.zeros(n, 1, 1), torch.rand(n), alpha=alpha).promised
    assert promised <= alpha and np.mean(over) <= promised + 3 * np.std(over) / np.sqrt(len(over))
    assert np.mean(over) > promised - 1 / (n + 1) - 0.01  # and not far below it: the bound is tight


def test_ensemble_weights_from_held_out_normals_only():
    """A member whose held-out normal scores share nothing with the others' (noise) gets no weight; members
    that rank the normal images alike share the weight; fewer than 3 images: equal weights."""
    from uadlab.methods.ensemble import member_weights

    rng = np.random.default_rng(0)
    common = rng.normal(size=200)  # what makes a normal image less typical, seen by every good member
    good = [common + 0.3 * rng.normal(size=200) for _ in range(2)]
    noise = rng.normal(size=200)
    w = member_weights(torch.tensor(np.stack(good + [noise])))
    assert w[2] < 0.1 and abs(float(w[0] - w[1])) < 0.1 and float(w.sum()) == pytest.approx(1)
    assert torch.allclose(member_weights(torch.tensor(np.stack(good + [noise])), "equal"), torch.full((3,), 1 / 3))
    assert torch.allclose(member_weights(torch.rand(3, 2)), torch.full((3,), 1 / 3))
