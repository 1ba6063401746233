"""The method contract, checked for EVERY registered method (a new method is tested by adding its file)."""
import json

import numpy as np
import pytest
import torch

from uadlab.backbones import backbone_spec
from uadlab.data import load_mvtec
from uadlab.errors import UadlabError
from uadlab.features import FeatureCache
from uadlab.methods import FitRecord, NotFittedError, create_method, get_method_class, list_methods
from uadlab.pipeline import Run, RunConfig


def test_registry():
    assert {"patchcore", "anomalydino"} <= set(list_methods())
    with pytest.raises(KeyError, match="known methods"):
        create_method("nope")


@pytest.fixture(scope="module")
def demo(tiny_demo):
    return load_mvtec(tiny_demo)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return FeatureCache(tmp_path_factory.mktemp("feat"))


@pytest.mark.parametrize("name", list_methods())
def test_contract(name, demo, cache, tmp_path):
    cls = get_method_class(name)
    assert cls.paper and cls.summary and "tiny" in cls.presets and "quick" in cls.presets and "paper" in cls.presets
    head = cls.from_preset("tiny")
    json.dumps(head.config())  # hyperparameters are JSON-serialisable
    assert head.layers_for(backbone_spec("efficientnet_lite0"))

    methods = ["patchcore", "anomalydino", name] if cls.combines_heads else [name]  # an ensemble needs members
    run = Run(RunConfig(methods=methods, preset="tiny", image_size=96, seed=0), workdir=tmp_path, cache=cache)
    with pytest.raises(NotFittedError):
        run.heads[name].score(run.features(demo.test[:1]))
    brick = demo.category("brick")
    aux = [s for s in demo.test if s.category != "brick"]
    assert run.fit(brick.train, aux=aux) is run
    out = run.score(brick.test)[name]
    assert np.isfinite(out.maps).all() and np.isfinite(out.scores).all()
    assert out.maps.shape == (len(brick.test), 96, 96)
    labels = np.array([s.label for s in brick.test])
    if not cls.zero_shot:  # learned normality: the synthetic defects score higher than normal test images
        assert out.scores[labels == 1].mean() > out.scores[labels == 0].mean()

    # save -> load gives identical scores; only safetensors + config.json + model card on disk
    path = run.save()
    files = {p.name for p in (path / name).iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= files and not any(f.endswith((".bin", ".pt")) for f in files)
    assert name in (path / name / "README.md").read_text()
    loaded = Run.load(path, cache=cache)
    assert loaded.heads[name].fit_record == run.heads[name].fit_record  # the typed record survives the file
    assert loaded.heads[name].fit_record.calibration == run.calibration[name]
    again = loaded.score(brick.test)[name]
    np.testing.assert_allclose(again.scores, out.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again.maps, out.maps, rtol=1e-5, atol=1e-5)


def test_pickle_is_never_loaded(tmp_path):
    head = create_method("patchcore")
    (tmp_path / "config.json").write_text("{}")
    torch.save(head.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UadlabError, match="no model.safetensors"):
        get_method_class("patchcore").from_pretrained(str(tmp_path))


def test_fit_record_of_an_older_head():
    """uadlab_info.json as heads saved before the typed record wrote it (a flat object) still loads, keeps
    every key, and writes back the same object."""
    old = {"epochs": 3, "steps": 6, "best_epoch": 2, "selection": "val_loss", "stopped_early": True,
           "val_discrepancy": [0.3, 0.2, 0.25], "category": "brick", "method": "varad", "image_size": 224,
           "calibration": {"lo": 0.1, "hi": 0.9, "score_lo": 0.2, "score_hi": 1.1, "q": 0.999},
           "window": {"spec": "auto", "lo": 0.0, "hi": 1.0, "description": "auto"},
           "metrics": {"image_auroc": 0.9}, "sigma": 4.0}
    rec = FitRecord.from_dict(old)
    assert rec.train is not None and rec.train.best_epoch == 2 and rec.train.val_loss == []  # not recorded then
    assert rec.details == {"val_discrepancy": [0.3, 0.2, 0.25]}  # a key the record does not know: kept
    assert rec.calibration.score_hi == 1.1 and rec.category == "brick" and rec.metrics["image_auroc"] == 0.9
    again = rec.to_dict()
    assert again["calibration"].items() >= old["calibration"].items()  # plus what it derives (its statement)
    assert {k: v for k, v in again.items() if k not in ("val_loss", "calibration")} == \
        {k: v for k, v in old.items() if k != "calibration"}
    # a head that is not trained by the loop (no epochs): its steps stay a detail, no training record
    assert FitRecord.from_dict({"steps": 10, "dim": 32}).train is None
    assert FitRecord.from_dict(None) == FitRecord()
