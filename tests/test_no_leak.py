"""No test image is ever training data: annotated test images that trained a zero-shot head (auxiliary set
"annotations") are left out of every evaluation of that run, and the run says so."""
from __future__ import annotations

import numpy as np
import pytest


def test_annotations_that_train_zero_shot_heads_are_never_evaluated_on(app):
    user, _, _ = app.header.on_start(None)
    ws = app.W.Workspace(user)
    ws.data.set(app.W.DataChoice("demo", category="brick"))
    test = ws.data.dataset(ws.data.choice()).test
    labelled = [s for s in test if s.label in (0, 1)]
    painted = np.zeros(test[1].load().size[::-1], np.uint8)
    painted[20:50, 20:50] = 1
    ws.annotations.save(0, "normal", None)
    ws.annotations.save(1, "anomalous", painted)
    ws.annotations.save(2, "normal", None)
    aux_names = {test[0].name, test[1].name, test[2].name}

    run_id, evaluation = ws.runs.train(["patchcore", "spg"], "efficientnet_lite0", "tiny", 96, "annotations")
    run = ws.runs.get(run_id)
    assert set(run.meta["excluded_from_evaluation"]) == aux_names and run.meta["aux_source"] == "annotations"
    assert run.meta["n_evaluated"] == len([s for s in labelled if s.name not in aux_names])  # the rest only
    assert set(evaluation) == {"patchcore", "spg"}
    notes = ws.runs.notes(run_id)
    assert any("3 annotated test images" in n and "excluded from every evaluation" in n for n in notes)
    assert any(n.startswith("spg: ") for n in notes) and any(n.startswith("patchcore: ") for n in notes)
    # the annotations are this run's training data: evaluating with them as labels has nothing left, and says why
    with pytest.raises(ValueError, match="3 annotated images trained this run's zero-shot heads"):
        ws.runs.evaluation(run_id, "annotations")
    # the app shows the notes beside the numbers
    md = app.compare.on_notes(user, run_id)
    assert "excluded from every evaluation" in md and "spg:" in md

    # a run that trained on other categories evaluates on every labelled test image
    other_id, _ = ws.runs.train(["patchcore"], "efficientnet_lite0", "tiny", 96, "other categories")
    other = ws.runs.get(other_id)
    assert other.meta["excluded_from_evaluation"] == [] and other.meta["n_evaluated"] == len(labelled)
    assert len(ws.runs.evaluation(other_id, "annotations")) == 1  # annotations are fair labels for it
