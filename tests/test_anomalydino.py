import numpy as np
import pytest
import torch
from PIL import Image

from uadlab.data import Sample, load_mvtec
from uadlab.features import FeatureCache, PatchFeatures
from uadlab.methods import FitContext, create_method
from uadlab.methods.anomalydino import first_component, foreground_mask, rotate_reflect
from uadlab.pipeline import Run, RunConfig


def test_k_shot_run_keeps_every_patch_of_the_k_references(tiny_demo, tmp_path):
    ds = load_mvtec(tiny_demo, categories=["brick"])
    run = Run(RunConfig(methods=["anomalydino"], image_size=64), cache=FeatureCache(tmp_path / "cache"))
    run.fit(ds.train[:2])
    head = run.heads["anomalydino"]
    h, w = run.features(ds.train[:1]).grid
    assert head.memory_bank.shape[0] == 2 * h * w  # refit on all k = 2 references, no coreset
    assert head.fit_record.category == "brick" and head.fit_record.details["masking"] is False  # textures: not in the table


def _object_tokens(seed=0):
    """(16, 16, 6) tokens: a centred 6x6 'object' far along one direction, background near 0."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(16, 16, 6, generator=g) * 0.5
    t[5:11, 5:11, 0] += 40.0
    return t


def test_first_component_is_deterministic_pca_with_sklearn_sign():
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([5.0, 1, 1, 1, 1])
    pc = first_component(x)
    xc = (x - x.mean(0)).double().numpy()
    v = np.linalg.svd(xc, full_matrices=False)[2][0]
    v = v * np.sign(v[np.abs(v).argmax()])
    np.testing.assert_allclose(pc.numpy(), xc @ v, rtol=1e-4, atol=1e-4)
    torch.manual_seed(1)
    a = first_component(x)
    torch.manual_seed(2)
    assert torch.equal(a, first_component(x))  # no global random state involved


def test_foreground_mask_finds_the_centred_object_whatever_the_sign():
    t = _object_tokens()
    for tokens in (t, -t):  # the object is on either side of PC1: the central-crop test picks the right one
        fg = foreground_mask(tokens, threshold=10.0)
        assert fg[4:12, 4:12].all() and fg.sum() == 64  # the 6x6 object grown by the 3x3 dilation; closing keeps it


def test_masking_auto_follows_the_paper_table_and_zeroes_background():
    ref = PatchFeatures({"stage2": _object_tokens(0).permute(2, 0, 1)[None]}, (64, 64))
    test = _object_tokens(1).permute(2, 0, 1)[None].clone()
    test[0, 1, 0, 0] += 30.0  # a background anomaly: masked away when masking applies
    test = PatchFeatures({"stage2": test}, (64, 64))
    masked = create_method("anomalydino", backbone="dinov2_vits14", layers=["stage2"]).fit(ref, context=FitContext(category="screw"))
    plain = create_method("anomalydino", backbone="dinov2_vits14", layers=["stage2"]).fit(ref, context=FitContext(category="carpet"))
    assert bool(masked.mask_test) and not bool(plain.mask_test)
    # the official code masks on DINOv2 only: the table's category on another backbone stays unmasked
    assert not bool(create_method("anomalydino", layers=["stage2"]).fit(ref, context=FitContext(category="screw")).mask_test)
    m, p = masked.score(test).patch_map[0], plain.score(test).patch_map[0]
    assert p[0, 0] > 0 and m[0, 0] == 0 and torch.equal(m, p * foreground_mask(test.maps["stage2"][0].permute(1, 2, 0)))
    assert bool(create_method("anomalydino", masking=True).fit(ref).mask_test)  # forced
    assert not bool(create_method("anomalydino").fit(ref).mask_test)  # "auto" without a category: off
    with pytest.raises(ValueError, match="masking"):
        create_method("anomalydino", masking="yes")


def test_rotation_is_opencv_warp_with_reflect_101_border():
    a = np.random.default_rng(0).integers(0, 256, (9, 9, 3)).astype(np.uint8)
    assert np.array_equal(np.asarray(rotate_reflect(Image.fromarray(a), 0)), a)
    r = np.asarray(rotate_reflect(Image.fromarray(a), 90))
    # 90 deg counter-clockwise about (W/2, H/2): dst[y, x] = src[x, W - y]; row 0 reads column W, mirrored to W - 2
    assert np.array_equal(r[1:], a.transpose(1, 0, 2)[::-1][:8])
    assert np.array_equal(r[0], a[:, 7])


def test_reference_augment_gives_eight_views_and_fit_insists_on_them():
    s = Sample("ref.png", image=Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)),
               label=0, category="screw")
    head = create_method("anomalydino", rotation=True)
    views = head.reference_augment([s])
    assert len(views) == 8 and views[0] is s and len({v.content_key() for v in views}) == 8
    assert create_method("anomalydino").reference_augment([s]) == [s]
    feats = PatchFeatures({"stage2": torch.randn(8, 4, 4, 4)}, (32, 32))
    with pytest.raises(ValueError, match="reference_augment"):
        head.fit(feats)
    assert head.fit(feats, context=FitContext(references_augmented=True)).memory_bank.shape == (8 * 16, 4)


def test_the_run_fits_rotated_references(tiny_demo, tmp_path):
    """rotation=True: the run extracts the 8 rotated views of every reference and the bank holds them all."""
    from uadlab.data import load_mvtec
    from uadlab.features import FeatureCache
    from uadlab.pipeline import Run, RunConfig

    train = load_mvtec(tiny_demo, categories=["brick"]).train[:2]
    run = Run(RunConfig(methods=["anomalydino"], image_size=64, method_kwargs={"anomalydino": {"rotation": True}}),
              cache=FeatureCache(tmp_path))
    run.fit(train)
    head = run.heads["anomalydino"]
    grid = run.features(train[:1]).select(head.layers_for(run.backbone.spec)).grid
    assert head.memory_bank.shape[0] == 2 * 8 * grid[0] * grid[1]
