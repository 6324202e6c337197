"""The backbone at run time: built from a spec, weights, a layer and an optional fine-tuned state, mapping a uint8
image batch straight to pooled embeddings.

Normalisation lives inside the module so that extraction, prediction, fine-tuning and benchmarks
all feed the same thing (uint8 NCHW, as decoded) and cannot drift apart. Device and precision are
resolved here too, once for every caller.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featx.embed.backbones import RANDOM_INIT, BackboneSpec, ResolvedWeights
from featx.errors import ConfigError, DataError
from featx.embed.hardware import device_type
from featx.vocab import STAGE_NAMES, parse_layer

log = logging.getLogger(__name__)
# On a CPU the activations of a few images stay in cache: for efficientnet_lite0 on 2 cores a forward
# of 4 images at a time ran at 106-110 img/s against 54 img/s for 32 at a time (measured, frozen model).
CPU_CHUNK = 4
STOCHASTIC_DEPTH = ("DropPath", "StochasticDepth")  # timm's and torchvision's module names for it


# --- building -----------------------------------------------------------------------------------------

def load_tensors(path: Path, what: str):
    """``torch.load`` that never unpickles code (``weights_only``); a refusal or damage is one line naming ``what``."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a foreign pickle: refused below
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refusals quote the whole pickle: keep the first line
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise DataError(f"{path}: not a loadable {what} ({type(err).__name__}: {first}); featx loads only "
                        "state dicts of tensors, never pickled code") from None


def load_state_dict(path: Path) -> dict:
    """A state dict from a file, unwrapping the usual ``{"state_dict": ...}`` containers; never unpickles code."""
    state = load_tensors(path, "weights file")
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def build_classifier(spec: BackboneSpec, weights: ResolvedWeights, drop_path: float | None = None) -> nn.Module:
    """The full ImageNet classifier network (eval mode) with the resolved weights loaded strictly.

    ``drop_path``: the stochastic depth rate of the last block (earlier blocks less; None: the architecture's
    own), noise for fine-tuning; it adds no weights, so the checkpoint loads into a model built without it.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)  # random init ("--weights none") must give the same numbers every run
        try:
            model = _network(spec, weights, drop_path)
        except TypeError:
            if drop_path is None:
                raise
            model = _network(spec, weights, None)  # an architecture that takes no stochastic depth rate
        if drop_path and not any(type(m).__name__ in STOCHASTIC_DEPTH for m in model.modules()):
            raise ConfigError(f"--drop-path: backbone {spec.name!r} has no stochastic depth (EfficientNets, "
                              "ConvNeXt and most timm: models have); leave --drop-path out")
        if spec.name == "inception_v3" and weights.identifier != "none":
            model.transform_input = True  # the Google weights expect torchvision's input re-scaling
    if weights.path is not None:
        state = load_state_dict(weights.path)
        if spec.convert_state_dict and any(k.startswith("_blocks.") for k in state):
            state = spec.convert_state_dict(state, model)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[1:3]
            raise DataError(f"{weights.path}: does not fit backbone {spec.name!r}: {' '.join(first)}") from None
    return model.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def _network(spec: BackboneSpec, weights: ResolvedWeights, drop_path: float | None) -> nn.Module:
    if spec.library == "timm":
        import timm

        pretrained = weights.path is None and weights.identifier != "none"
        return timm.create_model(spec.architecture, pretrained=pretrained,
                                 **({"drop_path_rate": drop_path} if drop_path is not None else {}))
    import torchvision

    kwargs = {"init_weights": True, "aux_logits": True} if spec.name == "inception_v3" else {}
    if drop_path is not None:
        kwargs["stochastic_depth_prob"] = drop_path
    return torchvision.models.get_model(spec.architecture, weights=None, **kwargs)


def build_feature_model(spec: BackboneSpec, weights: ResolvedWeights, layer: str = "penultimate",
                        backbone_state: dict | None = None, drop_path: float | None = None) -> FeatureModel:
    """The feature model of ``spec`` with ``weights``, or with a fine-tuned ``backbone_state`` loaded over them.

    The one way extraction, prediction, fine-tuning and the advisor make a model, so they cannot differ.
    """
    model = FeatureModel(build_classifier(spec, weights if backbone_state is None else RANDOM_INIT, drop_path),
                         spec, parse_layer(layer))
    if backbone_state is not None:
        model.net.load_state_dict(backbone_state, strict=True)
    return model


class FeatureModel(nn.Module):
    """uint8 (B, 3, H, W) → float (B, D): the penultimate features and/or globally pooled stage outputs."""

    def __init__(self, classifier: nn.Module, spec: BackboneSpec, layers: tuple[str, ...]):
        super().__init__()
        self.layers = layers
        self.net = classifier
        if spec.library == "timm":
            self.net.reset_classifier(0)
        else:
            _replace_module(self.net, spec.head, nn.Identity())
            if spec.name.startswith("vgg"):
                self.net.avgpool = nn.AdaptiveAvgPool2d(1)
        self._stage_outputs: dict[str, torch.Tensor] = {}
        modules = dict(self.net.named_modules())
        for stage_name in (layer for layer in layers if layer != "penultimate"):
            module = modules[spec.stages[STAGE_NAMES.index(stage_name)]]
            module.register_forward_hook(self._keeper(stage_name))
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -torch.tensor(spec.mean).view(1, 3, 1, 1) / std, persistent=False)

    def _keeper(self, name: str):
        def keep(_module, _inputs, output):
            self._stage_outputs[name] = output
        return keep

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() * self.scale + self.shift).contiguous(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.normalise(images))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features of an already normalised float batch."""
        penultimate = self.net(x)
        if isinstance(penultimate, tuple):  # inception in train mode returns (logits, aux)
            penultimate = penultimate[0]
        parts = []
        for layer in self.layers:
            out = penultimate if layer == "penultimate" else self._stage_outputs.pop(layer)
            parts.append(out.flatten(1) if out.dim() == 2 else out.float().mean(dim=(2, 3)))
        return torch.cat([p.float() for p in parts], dim=1)


def _replace_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_path, _, leaf = dotted.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def optimise_for_cpu(model: FeatureModel, image_size: int, precision: str) -> nn.Module:
    """TorchScript trace + freeze: folds BatchNorm into the convolutions and fuses activations. In fp32 only: a
    bf16 forward runs eager under autocast, whose rounding the eager check below does not cover.

    For EfficientNet-Lite0 on a 2-core CPU this is about 1.6× the eager channels_last speed
    (2.6× eager NCHW). Tracing can fail or mis-trace on exotic models, so the frozen module
    is checked against eager outputs on two batch sizes and eager is kept if they differ.
    """
    if precision != "fp32":
        return model
    probe = torch.randint(0, 256, (3, 3, image_size, image_size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = torch.jit.freeze(torch.jit.trace(model.eval(), probe[:2], check_trace=False))
            same = all(torch.allclose(frozen(x), model(x), rtol=1e-3, atol=1e-3) for x in (probe[:1], probe))
    except Exception as err:  # any tracing failure just means "run eager"
        log.debug("TorchScript freeze failed (%s); running eager", err)
        return model
    if not same:
        log.debug("frozen model disagrees with eager; running eager")
        return model
    return frozen


# --- running --------------------------------------------------------------------------------------------

def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """Decoded HWC (or NHWC) uint8 pixels as the CHW (or NCHW) tensor a feature model takes."""
    if not pixels.flags.writeable:  # Pillow's arrays are read-only; torch wants memory it may write
        pixels = pixels.copy()
    return torch.from_numpy(pixels).movedim(-1, -3)


def adapt_batchnorm(model: nn.Module, batches) -> int:
    """AdaBN (Li et al. 2017): every BatchNorm's running mean and variance re-estimated from these uint8 batches
    (an equal-weight average over all of them), all weights untouched; no label is involved. Returns the number
    of images seen."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ConfigError("--adapt-bn re-estimates BatchNorm statistics, and this backbone has no BatchNorm layer")
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average instead of an exponential one
        norm.train()
    seen = 0
    with torch.no_grad():
        for images in batches:
            model(images)
            seen += len(images)
    for norm in norms:
        norm.eval()
    return seen


def embed(model: nn.Module, images: torch.Tensor, tta: bool = False, views=()) -> torch.Tensor:
    """Features of a uint8 batch, averaged with the horizontal flip's when ``tta``, and over the plain batch and
    each of ``views`` (functions of a batch: ``augment.fixed_views``) when there are any.

    On a CPU the forward runs ``CPU_CHUNK`` images at a time, a last short chunk padded with blank images: oneDNN
    picks its kernels by batch size, and an image's features then do not depend on the images batched with it
    (so rows reused from another file equal rows embedded afresh, bit for bit).
    """
    def forward(batch):
        if batch.device.type != "cpu":
            return model(batch)
        out = []
        for chunk in batch.split(CPU_CHUNK):
            blank = chunk.new_zeros((CPU_CHUNK - len(chunk), *chunk.shape[1:]))
            out.append(model(torch.cat([chunk, blank]))[:len(chunk)] if len(blank) else model(chunk))
        return torch.cat(out)

    def features_of(batch):
        features = forward(batch)
        return (features + forward(batch.flip(3))) / 2 if tta else features

    if not views:
        return features_of(images)
    total = features_of(images).float()  # summed in fp32: bf16 sums of several views lose their last digits
    for view in views:
        total += features_of(view(images)).float()
    return total / (1 + len(views))


def gpu_decoding_workers() -> int:
    """DataLoader processes that decode for a GPU: 8, or every core of a smaller machine. On a 16-core H100
    host 15 decoded faster but fed the GPU slower: they compete with the process that drives it."""
    return min(8, os.cpu_count() or 1)


def resolve_device(device: str) -> torch.device:
    """``auto`` is the GPU when there is one; asking for CUDA where there is none is a usage error."""
    kind = device_type(device)
    return torch.device(kind if device == "auto" else device)


@contextmanager
def strict_fp32():
    """fp32 as asked: cuDNN otherwise runs fp32 convolutions in TF32 on Ampere and later GPUs (on an H100,
    resnet18's features 7e-4 away from the CPU's, relative to the largest; 1.4e-6 in strict fp32)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved precision; fp32 on a GPU is strict fp32."""
    if precision == "fp32":
        return strict_fp32() if device.type == "cuda" else nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
