"""A fitted head as an ONNX graph, features → class probabilities, through skl2onnx (the ``[export]`` extra).

featx's own estimators get converters in skl2onnx's registry, so ``skl2onnx.to_onnx`` takes any featx head:
``HingeSGD`` (a linear SVM, calibrated by scikit-learn's converter around it), ``EarlyStoppedLightGBM`` (its
booster through onnxmltools), ``AveragedHeads`` (each member on its columns, averaged in logit space). The
k-nearest-neighbours converter is replaced by one that weights neighbours by distance exactly as scikit-learn
does (skl2onnx 1.20's own differed by up to 0.05 in probability on featx's cosine kNN); configurations featx
never makes (other metrics, a tree index) are refused rather than converted approximately.
No torch here.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

from featx.errors import DataError
from featx.heads.registry import AveragedHeads, EarlyStoppedLightGBM, HingeSGD

OPSET = 18  # the default domain's opset of a head converted alone (an export takes its backbone graph's)
ML_OPSET = 3  # ai.onnx.ml: TreeEnsembleClassifier, ArrayFeatureExtractor
CLASSIFIER_OPTIONS = {"zipmap": [False], "nocl": [False], "raw_scores": [True, False]}


def head_to_onnx(pipeline, n_features: int, target_opset: dict | None = None, input_name: str = "features",
                 output_name: str = "probabilities"):
    """The ONNX model of a fitted head: float32 ``(N, n_features)`` in, ``(N, classes)`` probabilities out
    (``target_opset``: by domain, ONNX's ``OPSET`` and ``ML_OPSET`` by default)."""
    import skl2onnx
    from skl2onnx.common.data_types import FloatTensorType

    register_converters()
    final = pipeline.steps[-1][1] if hasattr(pipeline, "steps") else pipeline
    try:
        with warnings.catch_warnings():
            # skl2onnx 1.20 reads SVC's probA_/probB_, deprecated since scikit-learn 1.9 (the [export] extra keeps a
            # scikit-learn that still has them)
            warnings.simplefilter("ignore", FutureWarning)
            model = skl2onnx.to_onnx(pipeline, initial_types=[(input_name, FloatTensorType([None, n_features]))],
                                     options={id(final): {"zipmap": False}},
                                     target_opset=target_opset or {"": OPSET, "ai.onnx.ml": ML_OPSET})
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
        raise DataError(f"this head has no ONNX form ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    probabilities = model.graph.output[1].name
    kept = [o for o in model.graph.output if o.name == probabilities]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    return _rename_output(model, probabilities, output_name)


def _rename_output(model, old: str, new: str):
    """Every use of the value ``old`` named ``new`` (skl2onnx names a pipeline's output ``probabilities`` too, but
    a converter may pick another name)."""
    if old == new:
        return model
    for node in model.graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
        node.input[:] = [new if name == old else name for name in node.input]
    for output in model.graph.output:
        if output.name == old:
            output.name = new
    return model


_REGISTERED = False


def register_converters() -> None:
    """Add featx's converters to skl2onnx's registry (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from lightgbm import LGBMClassifier
    from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import calculate_linear_classifier_output_shapes as shapes

    update_registered_converter(LGBMClassifier, "LightGbmLGBMClassifier", shapes, convert_lightgbm,
                                options={"nocl": [True, False], "zipmap": [True, False, "columns"]})
    for model, alias, convert in ((HingeSGD, "FeatxHingeSGD", _convert_hinge_sgd),
                                  (EarlyStoppedLightGBM, "FeatxEarlyStoppedLightGBM", _convert_lightgbm),
                                  (AveragedHeads, "FeatxAveragedHeads", _convert_averaged),
                                  (KNeighborsClassifier, "FeatxKNeighborsClassifier", _convert_knn)):
        update_registered_converter(model, alias, shapes, convert, options=CLASSIFIER_OPTIONS)
    _REGISTERED = True


# --- converters (skl2onnx's calling convention: scope, operator, container) --------------------------------------

def _labels(probabilities, classes: np.ndarray, operator, scope, container):
    """The label output: the class of the largest column."""
    from skl2onnx.algebra.onnx_ops import OnnxArgMax, OnnxGather

    opv = container.target_opset
    values = classes.astype(np.int64) if np.issubdtype(classes.dtype, np.number) else classes.astype(str)
    index = OnnxArgMax(probabilities, axis=1, keepdims=0, op_version=opv)
    OnnxGather(values, index, op_version=opv, output_names=[operator.outputs[0]]).add_to(scope, container)


def _convert_hinge_sgd(scope, operator, container):
    """Decision scores ``X · coefᵀ + intercept`` (two classes: ``[-d, d]``, as the calibration converter reads
    column 1), in the probabilities output: CalibratedClassifierCV turns them into probabilities."""
    from skl2onnx.algebra.onnx_ops import OnnxAdd, OnnxConcat, OnnxIdentity, OnnxMatMul, OnnxNeg

    op, opv = operator.raw_operator, container.target_opset
    scores = OnnxAdd(OnnxMatMul(operator.inputs[0], op.coef_.T.astype(np.float32), op_version=opv),
                     op.intercept_.astype(np.float32), op_version=opv)
    if op.coef_.shape[0] == 1:
        scores = OnnxConcat(OnnxNeg(scores, op_version=opv), scores, axis=1, op_version=opv)
    OnnxIdentity(scores, op_version=opv, output_names=[operator.outputs[1]]).add_to(scope, container)
    _labels(scores, op.classes_, operator, scope, container)


def _convert_lightgbm(scope, operator, container):
    """The early-stopped booster (LightGBM dumps its best iteration's trees) through onnxmltools."""
    from skl2onnx.algebra.onnx_ops import OnnxIdentity
    from skl2onnx.algebra.onnx_operator import OnnxSubEstimator

    op, opv = operator.raw_operator, container.target_opset
    if len(op.classes_) < 2:
        raise NotImplementedError("a LightGBM head trained on one class")
    booster = OnnxSubEstimator(op.model_, operator.inputs[0], op_version=opv, options={"zipmap": False})
    OnnxIdentity(booster[1], op_version=opv, output_names=[operator.outputs[1]]).add_to(scope, container)
    _labels(booster[1], op.classes_, operator, scope, container)


def _convert_averaged(scope, operator, container):
    """Each member on its block of columns, their probabilities averaged as log-probabilities and renormalised
    (``registry.average_in_logit_space``)."""
    from skl2onnx.algebra.onnx_ops import OnnxClip, OnnxDiv, OnnxLog, OnnxSlice, OnnxSoftmax, OnnxSum
    from skl2onnx.algebra.onnx_operator import OnnxSubEstimator

    op, opv = operator.raw_operator, container.target_opset
    logs = []
    for member, (start, stop) in zip(op.members, op.blocks):
        columns = OnnxSlice(operator.inputs[0], np.array([start]), np.array([stop]), np.array([1]), op_version=opv)
        *transforms, final = member.steps if hasattr(member, "steps") else [("clf", member)]
        for _name, step in transforms:  # step by step: skl2onnx cannot nest a whole Pipeline here
            columns = OnnxSubEstimator(step, columns, op_version=opv)
        proba = OnnxSubEstimator(final[1], columns, op_version=opv, options={"zipmap": False})[1]
        logs.append(OnnxLog(OnnxClip(proba, np.array(1e-7, dtype=np.float32), op_version=opv), op_version=opv))
    mean = OnnxDiv(OnnxSum(*logs, op_version=opv), np.array(len(logs), dtype=np.float32), op_version=opv)
    probabilities = OnnxSoftmax(mean, axis=1, op_version=opv, output_names=[operator.outputs[1]])
    probabilities.add_to(scope, container)
    _labels(probabilities, op.classes_, operator, scope, container)


def _convert_knn(scope, operator, container):
    """Brute-force k nearest neighbours by cosine or Euclidean distance, votes uniform or weighted by 1/distance
    (rows with a neighbour at distance 0 count only those, as scikit-learn's ``_get_weights`` does)."""
    from skl2onnx.algebra.onnx_ops import (OnnxAdd, OnnxCast, OnnxDiv, OnnxEqual, OnnxGather, OnnxIdentity,
                                           OnnxLpNormalization, OnnxMatMul, OnnxMax, OnnxMul, OnnxNeg, OnnxOneHot,
                                           OnnxReciprocal, OnnxReduceMax, OnnxReduceSum, OnnxSqrt, OnnxSub, OnnxTopK,
                                           OnnxUnsqueeze, OnnxWhere)

    op, opv = operator.raw_operator, container.target_opset
    metric = op.effective_metric_
    if op._fit_method != "brute" or metric not in ("cosine", "euclidean"):
        raise NotImplementedError(f"k nearest neighbours by {metric} on a {op._fit_method} index")
    fitted = np.asarray(op._fit_X, dtype=np.float32)
    X = operator.inputs[0]
    if metric == "cosine":
        unit = fitted / np.maximum(np.linalg.norm(fitted, axis=1, keepdims=True), 1e-12)
        similarity = OnnxMatMul(OnnxLpNormalization(X, axis=1, p=2, op_version=opv), unit.T, op_version=opv)
        distance = OnnxSub(np.array(1.0, dtype=np.float32), similarity, op_version=opv)
    else:
        squared = OnnxReduceSum(OnnxMul(X, X, op_version=opv), np.array([1]), keepdims=1, op_version=opv)
        cross = OnnxMatMul(X, (-2 * fitted).T, op_version=opv)
        total = OnnxAdd(OnnxAdd(squared, cross, op_version=opv), (fitted ** 2).sum(1).astype(np.float32),
                        op_version=opv)
        distance = OnnxSqrt(OnnxMax(total, np.array(0.0, dtype=np.float32), op_version=opv), op_version=opv)
    distance = OnnxMax(distance, np.array(0.0, dtype=np.float32), op_version=opv)  # rounding below 0 is 0
    nearest = OnnxTopK(OnnxNeg(distance, op_version=opv), np.array([op.n_neighbors], dtype=np.int64), axis=1,
                       op_version=opv)
    near_distance = OnnxNeg(nearest[0], op_version=opv)
    classes = len(op.classes_)
    votes = OnnxOneHot(OnnxGather(op._y.astype(np.int64), nearest[1], op_version=opv),
                       np.array(classes, dtype=np.int64), np.array([0.0, 1.0], dtype=np.float32), axis=-1,
                       op_version=opv)  # (N, k, classes)
    if op.weights == "distance":
        zero = OnnxCast(OnnxEqual(near_distance, np.array(0.0, dtype=np.float32), op_version=opv), to=1,
                        op_version=opv)
        any_zero = OnnxReduceMax(zero, np.array([1]), keepdims=1, op_version=opv)
        inverse = OnnxReciprocal(OnnxMax(near_distance, np.array(1e-30, dtype=np.float32), op_version=opv),
                                 op_version=opv)
        weights = OnnxWhere(OnnxCast(any_zero, to=9, op_version=opv), zero, inverse, op_version=opv)
    elif op.weights == "uniform":
        weights = OnnxMul(near_distance, np.array(0.0, dtype=np.float32), op_version=opv)
        weights = OnnxAdd(weights, np.array(1.0, dtype=np.float32), op_version=opv)
    else:
        raise NotImplementedError("k nearest neighbours weighted by a function")
    weighted = OnnxReduceSum(OnnxMul(votes, OnnxUnsqueeze(weights, np.array([2]), op_version=opv), op_version=opv),
                             np.array([1]), keepdims=0, op_version=opv)
    total = OnnxReduceSum(weighted, np.array([1]), keepdims=1, op_version=opv)
    probabilities = OnnxDiv(weighted, total, op_version=opv)
    OnnxIdentity(probabilities, op_version=opv, output_names=[operator.outputs[1]]).add_to(scope, container)
    _labels(probabilities, op.classes_, operator, scope, container)
