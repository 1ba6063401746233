import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata

from uadlab.backbones import Backbone, BackboneWeightsError, backbone_spec


def test_packaged_efficientnet_is_really_pretrained():
    """The offline default carries real ImageNet weights: skimage's cat photo is classified as a cat."""
    import timm

    from uadlab.backbones import packaged_efficientnet_lite0_state

    m = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    m.load_state_dict(packaged_efficientnet_lite0_state(m))
    bb = Backbone("efficientnet_lite0", image_size=224)
    x = bb.transform(Image.fromarray(skdata.chelsea()))[None]
    with torch.no_grad():
        top = int(m(x).argmax())
    assert 281 <= top <= 285  # ImageNet's domestic cat classes


def test_cnn_layers_and_fingerprint():
    bb = Backbone("efficientnet_lite0", layers=["stage2", "stage3"], image_size=128)
    f = bb.extract([Image.fromarray(skdata.brick())])
    assert f.maps["stage2"].shape == (1, 40, 16, 16) and f.maps["stage3"].shape == (1, 112, 8, 8)
    assert "packaged" in bb.fingerprint and "128" in bb.fingerprint


@pytest.mark.parametrize("name,grid", [("dinov2_vits14_reg", 8), ("dinov3_vits16", 7)])
def test_vit_paths_with_random_weights(name, grid):
    bb = Backbone(name, layers=["block2", "norm"], image_size=112, weights="random")
    f = bb.extract([Image.fromarray(skdata.gravel())] * 2)
    assert f.maps["block2"].shape == (2, 384, grid, grid) and f.cls.shape == (2, 384)
    assert not torch.allclose(f.maps["block2"], f.maps["norm"])
    # the normed map is LayerNorm of the last block: zero mean over channels per token
    assert f.maps["norm"].mean(1).abs().max() < 0.1 + bb.model.norm.bias.abs().max()


def test_resize_and_crop_geometry():
    bb = Backbone("efficientnet_lite0", image_size=64, resize=80)
    img = Image.new("RGB", (160, 100))
    assert bb.transform(img).shape == (3, 64, 64)
    m = np.zeros((100, 160), np.uint8)
    m[50, 80] = 1
    out = bb.mask_transform(m)
    assert out.shape == (64, 64) and out.sum() >= 1 and out[30:34, 30:34].sum() >= 1  # centre stays centre


def test_unknown_layer_and_missing_weights(tmp_path):
    with pytest.raises(ValueError, match="unknown layers"):
        Backbone("efficientnet_lite0", layers=["block3"])
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        Backbone("efficientnet_lite0", weights=str(tmp_path / "nope.safetensors"))
    with pytest.raises(BackboneWeightsError, match="vit_small_patch14_dinov2.*(Hub|offline|local)"):
        Backbone("dinov2_vits14", image_size=56)  # offline: says which weights and what to do


def test_local_weights_file(tmp_path):
    import timm

    src = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    torch.nn.init.normal_(src.conv_stem.weight)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    a = Backbone("efficientnet_lite0", image_size=64, weights=str(tmp_path / "w.safetensors"))
    b = Backbone("efficientnet_lite0", image_size=64)
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(a(x).maps["stage2"], b(x).maps["stage2"])
    assert torch.allclose(a.model.conv_stem.weight, src.conv_stem.weight)


def test_spec_without_weights():
    s = backbone_spec("dinov3_vitb16")
    assert s.kind == "vit" and s.depth == 12 and s.dims[0] == 768
    assert backbone_spec("efficientnet_lite0").dims == (16, 24, 40, 112, 320)
