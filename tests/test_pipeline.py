import numpy as np
import pytest

from uadlab import metrics as M
from uadlab.data import load_mvtec
from uadlab.features import FeatureCache
from uadlab.pipeline import Run, RunConfig, list_runs, split_normals


@pytest.fixture(scope="module")
def fitted(tiny_demo, tmp_path_factory):
    ds = load_mvtec(tiny_demo, categories=["gravel"])
    work = tmp_path_factory.mktemp("runs")
    run = Run(RunConfig(methods=["patchcore", "anomalydino"], image_size=96), workdir=work,
              cache=FeatureCache(work / "cache"))
    steps = []
    run.fit(ds.train, progress=steps.append)
    return run, ds, steps, work


def test_progress_is_monotone_and_complete(fitted):
    _, _, steps, _ = fitted
    fracs = [p.overall for p in steps]
    assert fracs[-1] == 1.0 and all(b >= a - 1e-9 for a, b in zip(fracs, fracs[1:]))
    assert any("patchcore" in p.text for p in steps) and any("extract" in p.text for p in steps)
    # every stage reports its counts; a stage with counts under way has an ETA
    extraction = [p for p in steps if p.stage.startswith("extracting") and p.done]
    assert extraction and extraction[-1].done == extraction[-1].total == len(fitted[1].train)
    assert all(p.eta_s is not None for p in extraction)


def test_methods_share_one_calibrated_scale(fitted):
    run, ds, _, _ = fitted
    out = run.score(ds.test)
    labels = np.array([s.label for s in ds.test])
    for name, sc in out.items():
        normal_px = sc.maps[labels == 0]
        # normal images stay low on the shared scale; anomalous images reach above the normal range
        assert np.quantile(normal_px, 0.5) < 0.5 and np.quantile(normal_px, 0.99) < 1.5, name
        assert sc.maps[labels == 1].max(axis=(1, 2)).mean() > 1.0, name


def test_evaluate_save_and_list(fitted):
    run, ds, _, work = fitted
    res = run.evaluate(ds.test)
    assert set(res) == {"patchcore", "anomalydino"}
    for r in res.values():
        assert r.get(M.IMAGE_AUROC) > 0.7 and r.get(M.PIXEL_AUROC) > 0.8 and len(r.curves.fpr) > 2
        pc = r.pixel_curves  # pixel ROC points: from (0, 0) to (1, 1), their area near the pixel AUROC
        assert pc.fpr[0] == 0 and pc.tpr[-1] == 1
        assert abs(np.trapezoid(pc.tpr, pc.fpr) - r.get(M.PIXEL_AUROC)) < 0.02
        assert set(r.metrics) <= set(M.ALL)  # curve points are never metrics
    run.save({"dataset": ds.summary(), "evaluation": res})
    runs = list_runs(work)
    assert runs[0]["run_id"] == run.run_id and runs[0]["dataset"]["train"] == len(ds.train)
    assert M.IMAGE_AUROC in runs[0]["info"]["metrics"]["patchcore"]
    assert set(runs[0]["info"]["metrics"]["patchcore"]) <= set(M.ALL)  # points are not metrics
    loaded = Run.load(work / run.run_id, cache=run.cache).meta["evaluation"]["patchcore"]  # typed again
    assert loaded == res["patchcore"]
    assert "conformal" in runs[0]["calibration"]["patchcore"]["statement"] or \
        "cannot be calibrated" in runs[0]["calibration"]["patchcore"]["statement"]
    (work / "broken").mkdir()
    (work / "broken" / "run.json").write_text("{half")
    assert len(list_runs(work)) == 1  # a damaged run is skipped, not a crash


def test_split_keeps_normals_apart():
    items = list(range(10))
    fit, val = split_normals(items, 0.2, seed=0)
    assert len(val) == 2 and not set(fit) & set(val) and sorted(fit + val) == items
    assert split_normals([1], 0.2, 0) == ([1], [])  # one image: nothing held out, nothing calibrated


def test_zero_shot_needs_aux(tiny_demo):
    from uadlab.methods import list_methods, get_method_class

    zs = [m for m in list_methods() if get_method_class(m).zero_shot]
    if not zs:
        pytest.skip("no zero-shot method registered")
    ds = load_mvtec(tiny_demo, categories=["brick"])
    run = Run(RunConfig(methods=zs[:1], preset="tiny", image_size=64))
    with pytest.raises(ValueError, match="auxiliary"):
        run.fit(ds.train)


def _bank_images(run: Run, name: str, grid: int) -> int:
    return run.heads[name].memory_bank.shape[0] // (grid * grid)


@pytest.mark.parametrize("mode,expected,held,protocol", [("refit", 5, 5, "monotone"), ("holdout", 4, 1, "split")])
def test_calibration_protocol_fits_on_all_normals(tiny_demo, tmp_path, mode, expected, held, protocol):
    """refit: the shipped head sees every normal image and every image got a cross-fitted held-out score;
    holdout: the head fitted on 80% is shipped and calibrated on the rest."""
    ds = load_mvtec(tiny_demo, categories=["brick"])
    train = ds.train[:5]
    run = Run(RunConfig(methods=["anomalydino"], image_size=64, calibration=mode), cache=FeatureCache(tmp_path))
    run.fit(train)
    grid = run.features(train[:1]).select(run.heads["anomalydino"].layers_for(run.backbone.spec)).grid[0]
    assert _bank_images(run, "anomalydino", grid) == expected
    assert run.info["n_fit"] == expected and run.info["n_calibration"] == held and run.info["n_train"] == 5
    cal = run.calibration["anomalydino"]
    assert run.heads["anomalydino"].fit_info["calibration"] == cal.to_dict()
    assert (cal.n, cal.protocol, cal.calibrated) == (held, protocol, False)  # 5 images cannot promise 1%
    assert "cannot be calibrated" in cal.statement and f"1/{held + 1}" in cal.statement


def test_calibration_mode_is_checked():
    with pytest.raises(ValueError, match="calibration"):
        Run(RunConfig(methods=["patchcore"], calibration="sometimes"))


def test_ensemble_combines_calibrated_members(fitted, tmp_path):
    run, ds, _, work = fitted
    ens = Run(RunConfig(methods=["patchcore", "anomalydino", "ensemble"], image_size=96), workdir=tmp_path,
              cache=run.cache)
    ens.fit(ds.train)
    out = ens.score(ds.test)
    assert set(out) == {"patchcore", "anomalydino", "ensemble"}
    labels = np.array([s.label for s in ds.test])
    # the ensemble's raw map is the weighted mean of its members' calibrated maps; it is then calibrated again
    raw, _ = ens._raw("ensemble", ens.features(ds.test[:2]))
    w = ens.heads["ensemble"].fit_info["weights"]  # chosen from held-out normal scores, recorded
    assert set(w) == {"patchcore", "anomalydino"} and sum(w.values()) == pytest.approx(1, abs=1e-3)
    members = sum(w[m] * out[m].maps[:2] for m in ("patchcore", "anomalydino"))
    np.testing.assert_allclose(raw.numpy(), members, rtol=1e-3, atol=1e-3)
    assert out["ensemble"].scores[labels == 1].mean() > out["ensemble"].scores[labels == 0].mean()
    again = Run.load(ens.save(), cache=run.cache).score(ds.test[:2])["ensemble"]
    np.testing.assert_allclose(again.maps, out["ensemble"].maps[:2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least two"):
        Run(RunConfig(methods=["patchcore", "ensemble"]))


def test_settings_resolved_once():
    """The paper preset brings its backbone and geometry unless the user chose them; defaults from one place."""
    from uadlab.backbones import DEFAULT_IMAGE_SIZE, OFFLINE_DEFAULT

    quick = RunConfig.resolve(["patchcore"])
    assert (quick.backbone, quick.image_size, quick.resize) == (OFFLINE_DEFAULT, DEFAULT_IMAGE_SIZE, None)
    paper = RunConfig.resolve(["dinomaly"], "paper")
    assert (paper.backbone, paper.image_size, paper.resize) == ("dinov2_vitb14_reg", 392, 448)
    mine = RunConfig.resolve(["dinomaly"], "paper", backbone="efficientnet_lite0")
    assert (mine.backbone, mine.image_size) == ("efficientnet_lite0", DEFAULT_IMAGE_SIZE)
    mixed = RunConfig.resolve(["dinomaly", "patchcore"], "paper")  # papers disagree: the offline default
    assert mixed.backbone == OFFLINE_DEFAULT
    for bad in (0, 1, -5):
        with pytest.raises(ValueError, match="image size"):
            RunConfig.resolve(["patchcore"], image_size=bad)


def test_a_loaded_head_scores_like_its_run(fitted, tmp_path):
    """A head pulled from a folder (or the Hub) is a Run with one head: the same maps and scores."""
    from uadlab.hub import load_head, prepare_head

    run, ds, _, _ = fitted
    folder = prepare_head(run, "patchcore", tmp_path / "head")
    one = Run.from_head(load_head(str(folder)), cache=run.cache)
    a, b = run.score(ds.test[:3])["patchcore"], one.score(ds.test[:3])["patchcore"]
    np.testing.assert_allclose(b.maps, a.maps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-5, atol=1e-6)
