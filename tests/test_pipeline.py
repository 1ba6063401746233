import numpy as np
import pytest

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
        assert r["image_auroc"] > 0.7 and r["pixel_auroc"] > 0.8 and len(r["curves"]["fpr"]) > 2
        pc = r["pixel_curves"]  # pixel ROC points: from (0, 0) to (1, 1), their area near the pixel AUROC
        assert pc["fpr"][0] == 0 and pc["tpr"][-1] == 1
        assert abs(np.trapezoid(pc["tpr"], pc["fpr"]) - r["pixel_auroc"]) < 0.02
    run.save({"dataset": ds.summary()})
    runs = list_runs(work)
    assert runs[0]["run_id"] == run.run_id and runs[0]["dataset"]["train"] == len(ds.train)
    assert "image_auroc" in runs[0]["info"]["metrics"]["patchcore"]
    assert not {"curves", "pixel_curves"} & set(runs[0]["info"]["metrics"]["patchcore"])  # points are not metrics
    (work / "broken").mkdir()
    (work / "broken" / "run.json").write_text("{half")
    assert len(list_runs(work)) == 1  # a damaged run is skipped, not a crash


def test_split_keeps_normals_apart():
    items = list(range(10))
    fit, val = split_normals(items, 0.2, seed=0)
    assert len(val) == 2 and not set(fit) & set(val) and sorted(fit + val) == items
    assert split_normals([1], 0.2, 0) == ([1], [1])


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


@pytest.mark.parametrize("mode,expected", [("refit", 5), ("holdout", 4)])
def test_calibration_protocol_fits_on_all_normals(tiny_demo, tmp_path, mode, expected):
    """refit: the final head sees every normal image, the held-out calibration carries over; holdout: 80%."""
    ds = load_mvtec(tiny_demo, categories=["brick"])
    train = ds.train[:5]
    run = Run(RunConfig(methods=["anomalydino"], image_size=64, calibration=mode), cache=FeatureCache(tmp_path))
    run.fit(train)
    grid = run.features(train[:1]).select(run.heads["anomalydino"].layers_for(run.backbone.spec)).grid[0]
    assert _bank_images(run, "anomalydino", grid) == expected
    assert run.info["n_fit"] == 4 and run.info["n_calibration"] == 1 and run.info["n_train"] == 5
    assert run.heads["anomalydino"].fit_info["calibration"] == run.calibration["anomalydino"].to_dict()


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
    # the ensemble's raw map is the mean of its members' calibrated maps; it is then calibrated again
    raw, _ = ens._raw("ensemble", ens.features(ds.test[:2]))
    members = np.mean([out[m].maps[:2] for m in ("patchcore", "anomalydino")], axis=0)
    np.testing.assert_allclose(raw.numpy(), members, rtol=1e-4, atol=1e-4)
    assert out["ensemble"].scores[labels == 1].mean() > out["ensemble"].scores[labels == 0].mean()
    again = Run.load(ens.save(), cache=run.cache).score(ds.test[:2])["ensemble"]
    np.testing.assert_allclose(again.maps, out["ensemble"].maps[:2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least two"):
        Run(RunConfig(methods=["patchcore", "ensemble"]))


def test_settings_resolved_once():
    """The paper preset brings each method's backbone and geometry unless the user chose them; defaults from one
    place; papers that disagree give a run of several backbones, never a silent fallback."""
    from uadlab.settings import OFFLINE_DEFAULT
    from uadlab.pipeline import Inputs
    from uadlab.settings import DEFAULT_IMAGE_SIZE

    quick = RunConfig.resolve(["patchcore"])
    assert (quick.backbone, quick.image_size, quick.resize) == (OFFLINE_DEFAULT, DEFAULT_IMAGE_SIZE, None)
    paper = RunConfig.resolve(["dinomaly"], "paper")
    assert (paper.backbone, paper.image_size, paper.resize) == ("dinov2_vitb14_reg", 392, 448)
    mine = RunConfig.resolve(["dinomaly"], "paper", backbone="efficientnet_lite0")
    assert (mine.backbone, mine.image_size) == ("efficientnet_lite0", DEFAULT_IMAGE_SIZE)
    mixed = RunConfig.resolve(["dinomaly", "patchcore", "ensemble"], "paper")  # papers disagree: each its own
    assert mixed.inputs_of("dinomaly") == Inputs("dinov2_vitb14_reg", 392, 448) == mixed.main_inputs
    assert mixed.inputs_of("patchcore") == Inputs("wide_resnet50_2", 224, 256)
    assert mixed.inputs_of("ensemble") == mixed.main_inputs  # no paper inputs of its own: the run's main ones
    assert RunConfig.from_dict(mixed.to_dict()) == mixed  # saved and read back as it was
    sized = RunConfig.resolve(["dinomaly", "patchcore"], "paper", image_size=256)  # the user's size serves all
    assert {i.image_size for i in sized.inputs_list()} == {256}
    for bad in (0, 1, -5, 16384, 100000):
        with pytest.raises(ValueError, match=f"image_size {bad} px is out of range"):
            RunConfig.resolve(["patchcore"], image_size=bad)


def test_paper_preset_resolves_each_methods_backbone(capsys):
    """``--preset paper``: every method with its paper's backbone and geometry (printed for the record)."""
    from uadlab.methods import get_method_class, list_methods

    for m in list_methods():
        cfg = RunConfig.resolve([m] if m != "ensemble" else ["patchcore", "anomalydino", "ensemble"], "paper")
        paper = get_method_class(m).paper_inputs
        got = cfg.inputs_of(m)
        print(f"{m:12s} {got.describe()}")
        if paper:
            assert (got.backbone, got.image_size, got.resize) == (paper["backbone"], paper["image_size"], paper["resize"])
    varad = RunConfig.resolve(["varad"], "paper").inputs_of("varad")
    assert (varad.backbone, varad.image_size) == ("dinov2_vits14", 512)  # the official README's, not Lite0 at 224
    every = RunConfig.resolve(list_methods(), "paper")
    print(every.describe_inputs())
    assert len({i.backbone for i in every.inputs_list()}) >= 4


@pytest.mark.parametrize("kw, message", [
    (dict(image_size=16384), "image_size 16384 px is out of range: use 32 to 4096"),
    (dict(image_size=100000), "image_size 100000 px is out of range"),
    (dict(image_size=64.5), "image_size 64.5: give a whole number"),
    (dict(image_size="224"), "image_size '224': give a whole number"),
    (dict(image_size=True), "image_size True"),
    (dict(image_size=64, resize=48), "resize 48 px is smaller than image_size 64"),
    (dict(resize=5000), "resize 5000 px is out of range"),
    (dict(val_fraction=0), "val_fraction 0"),
    (dict(val_fraction=1.5), "val_fraction 1.5"),
    (dict(calibration="sometimes"), "calibration must be one of"),
    (dict(sigma=0), "sigma 0"),
    (dict(sigma=-1.0), "sigma -1.0"),
    (dict(sigma=float("nan")), "sigma nan"),
    (dict(score_mode="top0"), "score_mode 'top0'"),
    (dict(score_mode="median"), "score_mode 'median'"),
    (dict(seed=-1), "seed -1"),
    (dict(preset="fast"), "preset 'fast'"),
    (dict(methods=[]), "methods \\[\\]"),
    (dict(methods=["patchcore", "nope"]), "unknown method 'nope'"),
    (dict(methods=["patchcore", "patchcore"]), "each method once"),
    (dict(window="sideways"), "window 'sideways'"),
    (dict(backbone=""), "backbone ''"),
    (dict(method_kwargs={"dinomaly": {"dropout": 0}}), "not among the methods"),
    (dict(method_kwargs={"patchcore": {"nope": 1}}), "unknown hyperparameters"),
    (dict(method_inputs={"patchcore": {"backbone": "x", "image_size": 9}}), "image_size 9 px"),
    (dict(weights="my.safetensors", method_inputs={"anomalydino": {"backbone": "vit_tiny_patch16_224", "image_size": 64}}),
     "a weights file fits one backbone"),
])
def test_run_config_validates_itself(kw, message):
    """One validation for the Python API, the CLI and the app: the error names the setting and its value."""
    with pytest.raises(ValueError, match=message):
        RunConfig(**kw)


def test_run_config_accepts_what_it_should():
    from uadlab.medical import Window

    cfg = RunConfig(image_size=1024, resize=1024.0, window="percentile:1,99", sigma=2, score_mode="top10%")
    assert cfg.image_size == 1024 and cfg.resize == 1024 and isinstance(cfg.resize, int)
    assert isinstance(cfg.window, Window) and cfg.window.percentiles == (1.0, 99.0)
    assert isinstance(RunConfig().window, Window) and RunConfig().window.spec == Window().spec
    assert RunConfig.from_dict({**cfg.to_dict(), "from_the_future": 1}) == cfg  # unknown settings are ignored


def test_to_geometry_maps_one_view_into_another():
    """Views are centred squares of the image: a map of a wider view, resampled into a narrower one, zooms in."""
    import torch

    from uadlab.pipeline import Inputs, to_geometry

    wide, narrow = Inputs("efficientnet_lite0", 64), Inputs("efficientnet_lite0", 32, 64)  # half of the image
    m = torch.zeros(1, 64, 64)
    m[0, 16:48, 16:48] = 1.0  # the centre half of the image
    assert torch.equal(to_geometry(m, wide, wide), m)
    z = to_geometry(m, wide, narrow)  # the narrow view sees exactly that centre half
    assert z.shape == (1, 32, 32) and z[0, 1:-1, 1:-1].min() == 1.0
    back = to_geometry(z, narrow, wide)  # outside what it saw, the border values extend
    assert back.shape == (1, 64, 64) and back[0, 20:44, 20:44].min() == 1.0
    same = to_geometry(m, wide, Inputs("vit_tiny_patch16_224", 32))  # same view, other size: a plain resize
    assert same.shape == (1, 32, 32) and abs(float(same.mean()) - float(m.mean())) < 1e-6


def test_a_run_with_two_backbones_fits_scores_saves_and_loads(tiny_demo, tmp_path):
    """Two backbones in one run (a random-weight tiny ViT and Lite0, other geometries): features cached per
    backbone, every map shown in the main geometry, metrics in each head's own, and the same after loading."""
    from uadlab.pipeline import Inputs

    ds = load_mvtec(tiny_demo, categories=["gravel"])
    vit = Inputs("vit_tiny_patch16_224", 48, 64)
    cfg = RunConfig(methods=["patchcore", "anomalydino", "ensemble"], image_size=64, weights="random",
                    method_inputs={"anomalydino": vit})
    cache = FeatureCache(tmp_path / "cache")
    run = Run(cfg, workdir=tmp_path, cache=cache).fit(ds.train)
    assert run.backbone_of("anomalydino").fingerprint != run.backbone_of("patchcore").fingerprint
    assert run.backbone_of("anomalydino").image_size == 48 and run.backbone.image_size == 64
    assert len([d for d in cache.root.iterdir() if d.is_dir()]) == 2  # one folder of features per backbone
    out = run.score(ds.test)
    assert {sc.maps.shape[1:] for sc in out.values()} == {(64, 64)}  # all shown in the main geometry
    native = run.score(ds.test[:2], native=True)
    assert native["anomalydino"].maps.shape[1:] == (48, 48)
    res = run.evaluate(ds.test)
    assert all(0 <= r["pixel_auroc"] <= 1 and 0 <= r["image_auroc"] <= 1 for r in res.values())
    again = Run.load(run.save(), cache=cache)
    assert again.config == cfg and again.config.inputs_of("anomalydino") == vit
    back = again.score(ds.test)
    for name, sc in out.items():
        np.testing.assert_allclose(back[name].scores, sc.scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(back[name].maps, sc.maps, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="2 backbones"):
        run.score(run.features(ds.test[:1]))


def test_a_backbone_that_cannot_load_fails_before_any_work(tiny_demo):
    """Offline the paper's DINOv2 weights cannot be fetched: the fit stops at once, naming them, no fallback."""
    from uadlab.backbones import BackboneWeightsError

    ds = load_mvtec(tiny_demo, categories=["gravel"])
    steps = []
    run = Run(RunConfig.resolve(["patchcore", "anomalydino"], "paper", image_size=64))
    with pytest.raises(BackboneWeightsError, match="dinov2|wide_resnet"):
        run.fit(ds.train, progress=steps.append)
    assert not any(p.stage.startswith("extracting") for p in steps)


def test_a_loaded_head_scores_like_its_run(fitted, tmp_path):
    """A head pulled from a folder (or the Hub) is a Run with one head: the same maps and scores."""
    from uadlab.hub import load_head, prepare_head

    run, ds, _, _ = fitted
    folder = prepare_head(run, "patchcore", tmp_path / "head")
    one = Run.from_head(load_head(str(folder)), cache=run.cache)
    a, b = run.score(ds.test[:3])["patchcore"], one.score(ds.test[:3])["patchcore"]
    np.testing.assert_allclose(b.maps, a.maps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-5, atol=1e-6)


def test_dinomaly_paper_budget_follows_the_setting():
    """The paper preset trains the official budget: 5,000 steps for one category, 10,000 multi-class."""
    import torch

    from uadlab.features import PatchFeatures
    from uadlab.methods import get_method_class

    class Stop(Exception):
        pass

    def stop(p):
        if p.unit == "steps":
            totals.append(p.total)
            raise Stop  # the budget is known at the first step: no need to train it

    g = torch.Generator().manual_seed(0)
    feats = PatchFeatures({"stage2": torch.randn(4, 16, 4, 4, generator=g), "stage3": torch.randn(4, 32, 4, 4, generator=g)},
                          (64, 64))
    for category, budget in (("screw", 5_000), (None, 10_000)):
        totals: list[int] = []
        head = get_method_class("dinomaly").from_preset("paper", layers=["stage2", "stage3"], batch_size=2)
        with pytest.raises(Stop):
            head.fit(feats, progress=stop, category=category)
        assert totals == [budget]
