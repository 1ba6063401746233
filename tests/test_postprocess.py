import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from uadlab.postprocess import Calibration, f1_threshold, gaussian_smooth, image_score, threshold_from_normals, upsample


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
    assert threshold_from_normals(np.arange(101), 0.99) == pytest.approx(99)
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    y = np.array([0, 0, 0, 1, 1])
    assert 0.3 < f1_threshold(s, y) <= 0.8
    with pytest.raises(ValueError):
        f1_threshold(s, np.zeros(5))
