"""Fitted heads as plain data and back, without pickle: a file from elsewhere can be wrong, never run code.

An object becomes a JSON tree in which every node is a number, a string, a container, an array
(stored in a companion ``.npz`` and read with ``allow_pickle=False``) or an instance of one of the
classes in ``ALLOWED``, given by its name and its ``__getstate__``. Reading rebuilds an instance
only of an allowed class, with ``cls.__new__`` and the class's own ``__setstate__`` (scikit-learn's,
LightGBM's, which rebuilds a Booster from its own text model), fed nothing but such plain data.
A class outside the list is refused when saving and when loading.

skops.io does the same in general; it was not used because importing it walks every
scikit-learn module (about 3 s), which imports torch, and featx's head side must stay light.
"""

from __future__ import annotations

import importlib
import io
import json
import zipfile
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np

from featx.errors import DataError

ALLOWED = frozenset({
    "featx.heads.registry.AveragedHeads",
    "featx.heads.registry.EarlyStoppedLightGBM",
    "featx.heads.registry.HingeSGD",
    "lightgbm.basic.Booster",
    "lightgbm.sklearn.LGBMClassifier",
    "sklearn.calibration.CalibratedClassifierCV",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.decomposition._pca.PCA",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.model_selection._split.StratifiedShuffleSplit",
    "sklearn.neighbors._classification.KNeighborsClassifier",
    "sklearn.neural_network._multilayer_perceptron.MLPClassifier",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.Normalizer",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._label.LabelBinarizer",
    "sklearn.preprocessing._label.LabelEncoder",
    "sklearn.svm._classes.LinearSVC",
    "sklearn.svm._classes.SVC",
})
# Where featx's own head classes lived before featx 0.4 grouped its modules into folders: head files
# written then name them so, and still load.
FORMER_NAMES = {f"featx.heads.{kind}": f"featx.heads.registry.{kind}"
                for kind in ("AveragedHeads", "EarlyStoppedLightGBM", "HingeSGD")}
FACTORIES = {"builtins.dict": dict, "builtins.list": list, "collections.OrderedDict": OrderedDict}
NUMERIC_KINDS = "biufcUS"  # array kinds np.savez stores without pickle


def _name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


class _Encoder:
    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def __call__(self, value):
        if isinstance(value, np.generic):  # before float: np.float64 is a float, and would come back a Python one
            return {"$scalar": value.dtype.str, "value": value.item()}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in NUMERIC_KINDS:
                return {"$object_array": [self(v) for v in value.ravel().tolist()], "shape": list(value.shape)}
            key = f"a{len(self.arrays)}"
            self.arrays[key] = value
            return {"$array": key}
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, tuple):
            return {"$tuple": [self(v) for v in value]}
        if isinstance(value, dict):
            pairs = [[self(k), self(v)] for k, v in value.items()]
            if isinstance(value, defaultdict):
                return {"$defaultdict": _name(value.default_factory), "pairs": pairs}
            return {"$ordered" if isinstance(value, OrderedDict) else "$dict": pairs}
        if isinstance(value, np.random.RandomState):
            return {"$random_state": self(value.get_state(legacy=True))}
        name = _name(type(value))
        if name not in ALLOWED:
            raise DataError(f"cannot save a {name}: not a type a featx head holds")
        return {"$object": name, "state": self(value.__getstate__() or {})}  # None: an object without attributes


def _decode(node, arrays):
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, arrays) for v in node]
    tag = next(iter(node))
    if tag == "$array":
        return arrays[node["$array"]]
    if tag == "$object_array":
        return np.array([_decode(v, arrays) for v in node["$object_array"]], dtype=object).reshape(node["shape"])
    if tag == "$scalar":
        return np.dtype(node["$scalar"]).type(node["value"])
    if tag == "$tuple":
        return tuple(_decode(v, arrays) for v in node["$tuple"])
    if tag in ("$dict", "$ordered"):
        pairs = ((_decode(k, arrays), _decode(v, arrays)) for k, v in node[tag])
        return OrderedDict(pairs) if tag == "$ordered" else dict(pairs)
    if tag == "$defaultdict":
        if node["$defaultdict"] not in FACTORIES:
            raise ValueError(f"defaultdict of {node['$defaultdict']}")
        return defaultdict(FACTORIES[node["$defaultdict"]], ((_decode(k, arrays), _decode(v, arrays))
                                                              for k, v in node["pairs"]))
    if tag == "$random_state":
        state = np.random.RandomState()
        state.set_state(_decode(node["$random_state"], arrays))
        return state
    if tag == "$object":
        name = FORMER_NAMES.get(node["$object"], node["$object"])
        if name not in ALLOWED:  # checked before anything of the name is imported
            raise ValueError(f"a {name}, which is not a type a featx head holds")
        module, _, qualname = name.rpartition(".")
        kind = getattr(importlib.import_module(module), qualname)
        obj = kind.__new__(kind)
        state = _decode(node["state"], arrays)
        if hasattr(obj, "__setstate__"):
            obj.__setstate__(state)
        else:
            obj.__dict__.update(state)
        return obj
    raise ValueError(f"unknown node {tag!r}")


def dump(value, path: Path, extra: dict) -> None:
    """``path`` (JSON: ``extra`` plus the object's tree under "object") and ``path.with_suffix('.npz')`` (arrays)."""
    encode = _Encoder()
    document = {**extra, "object": encode(value)}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **encode.arrays)
    path.with_suffix(".npz").write_bytes(buffer.getvalue())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1))
    tmp.replace(path)  # the JSON last: a head is complete once it is there


def load(path: Path) -> dict:
    """The JSON document of ``dump`` with its "object" rebuilt; refuses anything outside ``ALLOWED``."""
    arrays_path = path.with_suffix(".npz")
    try:
        document = json.loads(path.read_text())
        with np.load(arrays_path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable head file, or {arrays_path.name} beside it is missing or damaged "
                        f"({type(err).__name__})") from None
    if not isinstance(document, dict) or "object" not in document:
        raise DataError(f"{path}: not a featx head file")
    try:
        return {**document, "object": _decode(document["object"], arrays)}
    except (ValueError, KeyError, TypeError, AttributeError, StopIteration, RecursionError) as err:
        raise DataError(f"{path}: refused: it holds {err}") from None
