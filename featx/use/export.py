"""``featx export RUN --onnx``: a run's backbone(s) and head as one ONNX graph, image pixels to probabilities.

The graph takes what ``featx predict`` hands its backbone: uint8 pixels ``(N, H, W, 3)``, each image already
resized and cropped as the run's preprocessing says (the metadata records how; the README does it with Pillow).
Inside: normalisation and the backbone(s) (``torch.onnx``), the features rounded as the cache stored them, the
head (``featx.heads.to_onnx``) joined on with ``onnx.compose``, the remedies predict replays, and the open-set
scores of a run's best head. What cannot be put in a graph is refused with the reason. Before the file is
written, onnxruntime's probabilities are checked against featx's own on probe images.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featx.comparison.runs import RUN_FILE, best_head, head_files, load_run
from featx.errors import ConfigError, DataError, FeatxError
from featx.heads.openset import KNN, OpenSet
from featx.heads.registry import load_head
from featx.heads.to_onnx import ML_OPSET, head_to_onnx
from featx.shift.remedies import REMEDIES, check_steps, replay_scores
from featx.shift.remedy import Remedy
from featx.use.predict import Backbone, head_probabilities, head_steps, validation_threshold
from featx.version import __version__
from featx.vocab import OPEN_SET_SCORES

log = logging.getLogger(__name__)

FORMAT = "featx.onnx/1"
TOLERANCE = 1e-4  # largest difference in probability allowed between onnxruntime and featx on the probe images
PROBES = 4


@dataclass(frozen=True)
class Exported:
    """What ``export_onnx`` wrote: the file, the head it holds, and the largest probability difference
    between onnxruntime and featx on the probe images."""

    path: Path
    head_file: Path
    metadata: dict
    difference: float


class Pixels(nn.Module):
    """uint8 ``(N, H, W, 3)`` → the features ``Predictor`` computes: each backbone's (averaged with the mirror
    image's where the extraction did), rounded to the dtype the cache stored, side by side."""

    def __init__(self, backbones: list[Backbone]):
        super().__init__()
        self.models = nn.ModuleList(b.eager_model() for b in backbones)
        self.flips = [bool(b.meta.get("tta")) for b in backbones]
        self.dtypes = [getattr(torch, b.meta.get("dtype", "float32")) for b in backbones]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.permute(0, 3, 1, 2)
        parts = []
        for model, flip, dtype in zip(self.models, self.flips, self.dtypes):
            features = model(images)
            if flip:
                features = (features + model(images.flip(3))) / 2
            parts.append(features.to(dtype).float())
        return torch.cat(parts, dim=1)


def export_onnx(run: str | Path, out: str | Path, head: str | None = None, trust: bool = False) -> Exported:
    """Write ``out``: the run's best head (or its ``head`` of that name) with its backbone(s), as ONNX."""
    onnx = _import_extra()
    head_file = _head_file(Path(run), head)
    loaded = load_head(head_file, trust=trust)
    steps = head_steps(loaded)
    check_steps(steps, str(head_file))
    meta = loaded["embeddings_meta"]
    backbones = [Backbone(head_file.parent, part) for part in meta.get("part_meta") or [meta]]
    reason = refusal(backbones, steps)
    if reason:
        raise DataError(f"{head_file}: cannot be exported to ONNX: {reason}")
    size = backbones[0].preprocess.size
    pixels = Pixels(backbones).eval()
    try:
        graph = _joined(onnx, pixels, backbones, loaded, size)
    except DataError as err:
        raise DataError(f"{head_file}: {err}") from None
    open_set = OpenSet.load(head_file.parent) if head is None else None
    threshold = replay_scores(steps, np.zeros((0, 1)), np.zeros((0, len(loaded["classes"]))),
                              validation_threshold(loaded))[1]
    _finish(onnx, graph, steps, open_set)
    metadata = _metadata(Path(run), head_file, loaded, backbones, threshold, open_set)
    onnx.helper.set_model_props(graph, {key: json.dumps(value) for key, value in metadata.items()})
    onnx.checker.check_model(graph)
    difference = _check(graph, pixels, loaded, steps, size, open_set)
    if any(b.meta.get("precision", "fp32") != "fp32" for b in backbones):
        log.warning("%s: its features were embedded in %s; the graph computes in fp32, so its probabilities differ "
                    "from featx predict's in that precision by its rounding", head_file, metadata["precision"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        partial.write_bytes(graph.SerializeToString())
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return Exported(out, head_file, metadata, difference)


def refusal(backbones: list[Backbone], steps: list[dict]) -> str:
    """Why this head cannot become one ONNX graph ('' when it can)."""
    preprocessing = {json.dumps(b.preprocess.as_dict(), sort_keys=True) for b in backbones}
    if len(preprocessing) > 1:
        return ("its backbones take images prepared differently (" + "; ".join(sorted(preprocessing)) + "), "
                "and the graph takes one image input")
    for backbone in backbones:
        config = backbone.meta.get("config") or {}
        for remedy in (r for r in REMEDIES.values() if r.stage == "extraction"):
            if remedy.wanted(remedy.in_effect(config)) and remedy.not_exportable:
                return f"{remedy.name}: {remedy.not_exportable}"
    for step in steps:
        remedy = REMEDIES[step["name"]]
        if not remedy.replayable:
            return f"{remedy.name}: {remedy.not_replayable}"
        if remedy.not_exportable:
            return f"{remedy.name}: {remedy.not_exportable}"
        if remedy.stage == "features" and type(remedy).target is not Remedy.target:
            return f"{remedy.name}: it changes new images' features, and featx has no ONNX form for that"
    return ""


def _import_extra():
    try:
        import onnx
        import onnxruntime  # noqa: F401  (the check before writing)
        import onnxscript  # noqa: F401  (torch.onnx's exporter)
        import skl2onnx  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"featx export --onnx needs its extra ({err.name} is missing): "
                          "pip install 'featx[export]'") from None
    return onnx


def _head_file(run: Path, head: str | None) -> Path:
    if head is None:
        return best_head(run)
    found = head_files(run, head)
    if len(found) != 1:
        saved = sorted({p.stem.rpartition("__")[2] for p in (run / "heads").glob("*__*.json")})
        if not found:
            raise ConfigError(f"{run}: no saved head {head!r}; it has {', '.join(saved) or 'none'}")
        raise ConfigError(f"{run}: {len(found)} heads {head!r}, one per input ({', '.join(p.name for p in found)}); "
                          "export the best (no --head) or compare that input alone")
    return found[0]


def _joined(onnx, pixels: Pixels, backbones: list[Backbone], head: dict, size: int):
    """The backbone graph (input ``image``, output ``features``) and the head's graph joined on the features."""
    backbone = onnx.ModelProto()
    backbone.CopyFrom(_backbone_graph(pixels, _recipe(backbones), size))
    opset = next(o.version for o in backbone.opset_import if o.domain in ("", "ai.onnx"))
    dimensions = backbone.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    scores = head_to_onnx(head["pipeline"], dimensions, target_opset={"": opset, "ai.onnx.ml": ML_OPSET})
    scores.ir_version = backbone.ir_version = max(scores.ir_version, backbone.ir_version)
    backbone.opset_import.extend(o for o in scores.opset_import if o.domain == "ai.onnx.ml")
    return onnx.compose.merge_models(backbone, scores, io_map=[("features", "features")], prefix2="head/",
                                     outputs=["features", "head/probabilities"], producer_name="featx")


def _recipe(backbones: list[Backbone]) -> str:
    return json.dumps([b.meta for b in backbones], sort_keys=True, default=str)


_TRACED: dict[str, object] = {}  # recipe -> the backbone's ONNX model, this process's latest


def _backbone_graph(pixels: Pixels, recipe: str, size: int):
    """``pixels`` through ``torch.onnx`` (the slow part of an export): kept for the latest recipe, so that
    exporting several heads of one run in one process traces the backbone once."""
    if recipe not in _TRACED:
        probe = torch.zeros((2, size, size, 3), dtype=torch.uint8)
        with torch.no_grad(), _quiet("onnxscript", "onnx_ir"):
            program = torch.onnx.export(pixels, (probe,), dynamo=True, input_names=["image"],
                                        output_names=["features"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        verbose=False)
        _TRACED.clear()
        _TRACED[recipe] = program.model_proto
    return _TRACED[recipe]


@contextmanager
def _quiet(*loggers: str):
    """The exporter's optimiser logs every pass at INFO; only its warnings are the user's business."""
    kept = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in kept.items():
            logging.getLogger(name).setLevel(level)


def _finish(onnx, graph, steps: list[dict], open_set: OpenSet | None) -> None:
    """The outputs after the head: ``probabilities`` with the scores-stage remedies replayed (a re-weighting,
    ``Remedy.reweighting``), and the open-set scores (``OpenSet.scores``) where the head has a calibration."""
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    nodes, constants = [], []

    def constant(name: str, value) -> str:
        constants.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), f"post/{name}"))
        return f"post/{name}"

    probabilities = "head/probabilities"
    for index, step in enumerate(s for s in steps if s["stage"] == "scores"):
        factors = REMEDIES[step["name"]].reweighting(step["replay"])
        if factors is None:
            continue
        weighted = f"post/weighted_{index}"
        nodes += [helper.make_node("Mul", [probabilities, constant(f"factors_{index}", factors)], [weighted]),
                  helper.make_node("ReduceSum", [weighted, _axes(constants, numpy_helper)], [f"{weighted}_sum"],
                                   keepdims=1),
                  helper.make_node("Div", [weighted, f"{weighted}_sum"], [f"{weighted}_normalised"])]
        probabilities = f"{weighted}_normalised"
    nodes.append(helper.make_node("Identity", [probabilities], ["probabilities"]))
    outputs = [helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["batch", "classes"])]
    if open_set is not None:
        axes = _axes(constants, numpy_helper)
        one = constant("one", 1.0)
        nodes += [
            helper.make_node("ReduceL2", ["features", axes], ["post/norm"], keepdims=1),
            helper.make_node("Max", ["post/norm", constant("tiny", 1e-12)], ["post/norm_floor"]),
            helper.make_node("Div", ["features", "post/norm_floor"], ["post/unit"]),
            helper.make_node("MatMul", ["post/unit", constant("reference", open_set.reference.T)], ["post/similarity"]),
            helper.make_node("TopK", ["post/similarity", _int64(constants, numpy_helper, "k",
                                                                min(KNN, len(open_set.reference)))],
                             ["post/nearest", "post/nearest_rows"], axis=1),
            helper.make_node("ReduceMean", ["post/nearest", axes], ["post/nearest_mean"], keepdims=1),
            helper.make_node("Sub", [one, "post/nearest_mean"], ["post/knn"]),
            helper.make_node("MatMul", ["post/unit", constant("centroids", open_set.centroids.T)], ["post/to_centroids"]),
            helper.make_node("ReduceMax", ["post/to_centroids", axes], ["post/closest"], keepdims=1),
            helper.make_node("Sub", [one, "post/closest"], ["post/centroid"]),
            helper.make_node("ReduceMax", ["probabilities", axes], ["post/top"], keepdims=1),
            helper.make_node("Sub", [one, "post/top"], ["post/max_prob"]),
            helper.make_node("Concat", [f"post/{name}" for name in OPEN_SET_SCORES], ["open_set_scores"], axis=1),
        ]
        outputs.append(helper.make_tensor_value_info("open_set_scores", onnx.TensorProto.FLOAT,
                                                     ["batch", len(OPEN_SET_SCORES)]))
    graph.graph.node.extend(nodes)
    graph.graph.initializer.extend(constants)
    del graph.graph.output[:]
    graph.graph.output.extend(outputs)


def _axes(constants: list, numpy_helper) -> str:
    if not any(c.name == "post/axes" for c in constants):
        constants.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "post/axes"))
    return "post/axes"


def _int64(constants: list, numpy_helper, name: str, value: int) -> str:
    constants.append(numpy_helper.from_array(np.array([value], dtype=np.int64), f"post/{name}"))
    return f"post/{name}"


def _metadata(run: Path, head_file: Path, head: dict, backbones: list[Backbone], threshold, open_set) -> dict:
    """What a program using the graph needs besides it: how to prepare its input, the class names, and how
    featx decides (``decision_threshold`` for two classes: class 1 where its probability is at least that)."""
    preprocess = backbones[0].preprocess
    metadata = {
        "format": FORMAT, "featx_version": __version__, "head": head["head"], "classes": head["classes"],
        "backbones": [b.meta.get("label") or b.meta["backbone"] for b in backbones],
        "input": {"name": "image", "dtype": "uint8", "layout": "NHWC", "channels": "RGB",
                  "height": preprocess.size, "width": preprocess.size,
                  "preprocess": {**preprocess.as_dict(), "fit": preprocess.fit},
                  "note": "pixels after the resize and crop of `preprocess`; normalisation is inside the graph"},
        "normalisation": {"mean": list(preprocess.mean), "std": list(preprocess.std), "scale": 255},
        "decision_threshold": threshold,
        "outputs": ["probabilities"] + (["open_set_scores"] if open_set else []),
        "precision": [b.meta.get("precision", "fp32") for b in backbones],
        "cache_key": head["cache_key"],
    }
    if open_set is not None:
        metadata["open_set"] = {"scores": list(OPEN_SET_SCORES), "thresholds": open_set.thresholds,
                                "default": "knn", "coverage": open_set.coverage,
                                "rule": "unknown where the chosen score is above its threshold"}
    if (run / RUN_FILE).exists():
        metadata["trained"] = load_run(run).info.get("created")
    return metadata


def _check(graph, pixels: Pixels, head: dict, steps: list[dict], size: int, open_set) -> float:
    """onnxruntime against featx on seeded random images: the largest difference in probability (and in open-set
    score), refused above ``TOLERANCE``."""
    import onnxruntime

    probe = np.random.default_rng(0).integers(0, 256, (PROBES, size, size, 3), dtype=np.uint8)
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    found = session.run(None, {"image": probe})
    with torch.no_grad():
        features = pixels(torch.from_numpy(probe)).numpy()
    features, expected, _ = head_probabilities(head, features, steps)
    difference = float(np.abs(found[0] - expected).max())
    if open_set is not None:
        scores = open_set.scores(features, expected)
        difference = max(difference, float(np.abs(found[1] - np.stack([scores[n] for n in OPEN_SET_SCORES], 1)).max()))
    if not difference <= TOLERANCE:
        raise FeatxError(f"the ONNX graph's answers differ from featx's by {difference:.2g} (more than {TOLERANCE}) "
                         "on probe images; nothing written")
    return difference
