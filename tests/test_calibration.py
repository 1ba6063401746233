"""The calibrated image threshold keeps its promise on normal images the run never saw (issue 25.4).

200 normal images of a synthetic set (random crops of a real texture) train a run with the default protocol
(cross-fitting, the shipped head fitted on all 200); 600 other normal images are scored. The share above
1.0 must be within the split-conformal promise, up to the spread of one draw of the 200 held-out scores.
``benchmarks/false_alarms.py`` repeats this over many draws for n = 5, 20, 200.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from uadlab.features import FeatureCache
from uadlab.pipeline import Run, RunConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from false_alarms import normal_images  # noqa: E402


@pytest.fixture(scope="module")
def normals(tmp_path_factory):
    """200 training and 300 unseen normal images (32 px: a 4 x 4 Lite0 grid is enough here), one feature cache."""
    return normal_images(200, 32, seed=0), normal_images(300, 32, seed=1), FeatureCache(tmp_path_factory.mktemp("c"))


def test_false_alarms_on_unseen_normals_within_the_promise(normals):
    train, unseen, cache = normals
    alpha = 0.05
    run = Run(RunConfig(methods=["patchcore", "anomalydino"], image_size=32, alpha=alpha), cache=cache)
    run.fit(train)
    out = run.score(unseen)
    for name, protocol in (("patchcore", "cross-fit"), ("anomalydino", "monotone")):
        cal = run.calibration[name]
        assert (cal.n, cal.calibrated, cal.protocol) == (200, True, protocol)
        k = math.ceil(201 * (1 - alpha))
        assert cal.promised == pytest.approx(1 - k / 201) and cal.promised <= alpha
        observed = float((out[name].scores > 1.0).mean())
        # one draw: the threshold's own spread (Beta(n + 1 - k, k)) plus the binomial spread of 300 images
        sd = math.sqrt((201 - k) * k / (201 ** 2 * 202) + cal.promised * (1 - cal.promised) / len(unseen))
        assert observed <= cal.promised + 3 * sd, (name, observed, cal.promised)
        assert f"at most {cal.promised:.3g}" in cal.statement


def test_too_few_normals_say_what_cannot_be_calibrated(normals):
    train, _, cache = normals
    run = Run(RunConfig(methods=["patchcore"], image_size=32), cache=cache)  # alpha 1%
    run.fit(train[:20])
    cal = run.calibration["patchcore"]
    assert cal.n == 20 and not cal.calibrated and cal.threshold is None
    assert "cannot be calibrated to a false-alarm rate of 0.01 with 20 held-out normal images" in cal.statement
    one = Run(RunConfig(methods=["anomalydino"], image_size=32), cache=cache)
    one.fit(train[:1])  # 1-shot: the training image is no held-out image
    cal = one.calibration["anomalydino"]
    assert cal.n == 0 and cal.threshold is None and cal.statement.startswith("Not calibrated")
    s = one.score(train[1:4])["anomalydino"].scores
    assert np.all(np.abs(s) < 10)  # raw cosine distances, not a blown-up scale (1-shot used to give ~1e6)


def test_cli_states_the_calibration_instead_of_a_number(tiny_demo, tmp_path, capsys):
    """10 normal images cannot promise 1% false alarms: `uadlab fit` and `uadlab score` say so in words; with
    --alpha 0.1 (10 images allow 1/11) they state the promise."""
    from uadlab.cli import main

    assert main(["fit", "--data", str(tiny_demo / "grass"), "--methods", "anomalydino", "--image-size", "64",
                 "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "anomalydino: Image threshold: cannot be calibrated to a false-alarm rate of 0.01 with 10" in out
    run_dir = next((tmp_path / "a").iterdir())
    assert main(["score", "--run", str(run_dir), str(tiny_demo / "grass" / "test" / "hole" / "000.png")]) == 0
    assert "cannot be calibrated" in capsys.readouterr().err  # stdout stays JSON
    assert main(["fit", "--data", str(tiny_demo / "grass"), "--methods", "anomalydino", "--image-size", "64",
                 "--alpha", "0.1", "--out", str(tmp_path / "b")]) == 0
    assert "probability at most 0.0909 (requested 0.1" in capsys.readouterr().out
    assert main(["fit", "--data", str(tiny_demo / "grass"), "--methods", "anomalydino", "--alpha", "2"]) == 2
    assert "alpha 2.0" in capsys.readouterr().err
