"""The ensemble earns its default (issue 25.7): members and weights chosen without test labels, recorded,
and on the hard synthetic set the default ensemble is not below its best member by more than 0.01."""
from __future__ import annotations

import numpy as np
import pytest

from uadlab import metrics as M
from uadlab.data import Sample
from uadlab.features import FeatureCache
from uadlab.pipeline import Run, RunConfig


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    from harddata import hard_set

    train, test, labels, _, masks = hard_set("brick", size=96, n_train=12, n_per_kind=5)
    tr = [Sample(f"train{i}", image=im, label=0, category="brick") for i, im in enumerate(train)]
    te = [Sample(f"test{i}", image=im, label=int(y), mask=m.astype(np.uint8), category="brick")
          for i, (im, y, m) in enumerate(zip(test, labels, masks))]
    return tr, te, FeatureCache(tmp_path_factory.mktemp("cache"))


def test_default_ensemble_holds_its_best_member_on_the_hard_set(hard):
    tr, te, cache = hard
    run = Run(RunConfig(methods=["patchcore", "anomalydino", "spatial_ar", "ensemble"], preset="tiny", image_size=96),
              workdir=cache.root.parent / "runs", cache=cache)
    run.fit(tr)
    ens = run.heads["ensemble"]
    assert ens.fit_record.details["members_used"] == ["patchcore", "anomalydino"]  # the memory banks, a stated prior
    assert set(ens.fit_record.details["member_weights"]) == {"patchcore", "anomalydino"}
    res = run.evaluate(te)
    best = max(res[m][M.IMAGE_AUROC] for m in ("patchcore", "anomalydino", "spatial_ar"))
    assert res["ensemble"][M.IMAGE_AUROC] >= best - 0.01
    # the ensemble's own calibration: on its members' cross-fitted held-out outputs, all 12 normal images
    assert run.calibration["ensemble"].n == 12 and run.calibration["ensemble"].protocol == "cross-fit"
    # saved and loaded: the same members and weights, the same scores
    again = Run.load(run.save(), cache=cache)
    assert again.heads["ensemble"].members_in(again.heads) == ["patchcore", "anomalydino"]
    np.testing.assert_allclose(again.score(te[:3])["ensemble"].scores, run.score(te[:3])["ensemble"].scores,
                               rtol=1e-5, atol=1e-5)

