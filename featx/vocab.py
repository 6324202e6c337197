"""The words featx understands and the constraints on its parameters, declared once and torch-free.

Click options (``featx.cli.options``) and the configs' own checks (``__post_init__``) are both made
from ``PARAMETERS``, after scikit-learn's ``_param_validation``: one constraint per parameter
name, and one sentence for a value that breaks it, made in ``invalid``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from featx.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STORAGE_DTYPES = ("float16", "float32")
DECODERS = ("auto", "pillow", "tensor")  # auto: tensor batches on a GPU, Pillow on a CPU
FITS = ("crop", "full")  # ImageNet centre crop, or the whole image squeezed to the input size
AUGMENTATIONS = ("natural", "xray", "none")
BN_MODES = ("frozen", "train")
STAGE_GROUPS = 4  # a backbone's four stages, the unit of unfreezing
UNFREEZE = tuple(str(n) for n in range(STAGE_GROUPS + 1)) + ("all",)
STAGE_NAMES = tuple(f"stage{n}" for n in range(1, STAGE_GROUPS + 1))
OPEN_SET_SCORES = ("knn", "centroid", "max_prob")
SORTABLE = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "log_loss")  # validation metrics that rank
ALIGNMENTS = ("none", "standardize", "coral")  # training features mapped towards the test images (featx.shift.align)
PRIOR_SHIFTS = ("off", "estimate", "auto")  # the test split's class balance: ignored, reported, applied if it helps
TABLE_FORMATS = ("parquet", "npy")  # an embedding file for other tools (featx.store.tables)
NEIGHBOUR_INDEXES = ("exact", "faiss")  # exact search, or an HNSW graph from faiss (featx.store.neighbours)
MAP_METHODS = ("auto", "tsne", "umap")  # auto: UMAP where umap-learn is installed (featx.comparison.dataset_map)


@dataclass(frozen=True)
class OneOf:
    values: tuple

    def accepts(self, value) -> bool:
        return value in self.values

    def __str__(self) -> str:
        return f"one of {', '.join(map(str, self.values))}"


@dataclass(frozen=True)
class Interval:
    """Numbers of ``kind`` between ``low`` and ``high`` (inclusive; ``low`` excluded when ``low_open``)."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def accepts(self, value) -> bool:
        kinds = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        article, name = ("an", "int") if self.kind is int else ("a", "float")
        if self.high is None and ((self.low == 0 and self.low_open) or (name == "int" and self.low == 1)):
            return f"a positive {name}"
        if self.high is None:
            return f"{article} {name} {'>' if self.low_open else '>='} {self.low}"
        return f"{article} {name} in {'(' if self.low_open else '['}{self.low}, {self.high}]"


@dataclass(frozen=True)
class Pattern:
    regex: str
    description: str

    def accepts(self, value) -> bool:
        return isinstance(value, str) and re.fullmatch(self.regex, value) is not None

    def __str__(self) -> str:
        return self.description


@dataclass(frozen=True)
class Maybe:
    """``None`` (not given) or a value meeting ``constraint``."""

    constraint: OneOf | Interval | Pattern

    def accepts(self, value) -> bool:
        return value is None or self.constraint.accepts(value)

    def __str__(self) -> str:
        return f"{self.constraint}, or None"


@dataclass(frozen=True)
class Boolean:
    """A flag: ``True`` or ``False`` (a command-line flag)."""

    def accepts(self, value) -> bool:
        return isinstance(value, bool)

    def __str__(self) -> str:
        return "a bool"


@dataclass(frozen=True)
class Fractions:
    """``train,val,test`` fractions (or ``train,test``): finite, none negative, train above 0, summing to 1."""

    def parse(self, value) -> tuple[float, float, float] | None:
        try:
            parts = [float(p) for p in (value.split(",") if isinstance(value, str) else value)]
        except (TypeError, ValueError):
            return None
        if len(parts) == 2:
            parts = [parts[0], 0.0, parts[1]]
        if (len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or parts[0] <= 0
                or abs(sum(parts) - 1.0) > 1e-6):
            return None
        return tuple(parts)

    def accepts(self, value) -> bool:
        return self.parse(value) is not None

    def __str__(self) -> str:
        return "train,val,test fractions summing to 1 (e.g. 0.7,0.15,0.15)"


_LAYER_TOKEN = rf"\s*(?:{'|'.join(STAGE_NAMES)}|stages|penultimate)\s*"
_UNIT_FLOAT = r"(?:0|1|0?\.\d+|1\.0*)"

MAX_IMAGE_SIZE = 4096  # input side in pixels: 4096² × 3 channels is already 200 MB a batch of four

PARAMETERS: dict[str, OneOf | Interval | Pattern | Maybe | Boolean | Fractions] = {
    # extraction and the backbone at run time
    "precision": OneOf(PRECISIONS),
    "dtype": OneOf(STORAGE_DTYPES),
    "device": Pattern(r"auto|cpu|cuda(?::\d+)?", "auto, cpu, cuda or cuda:N"),
    "fit": OneOf(FITS),
    "decode": OneOf(DECODERS),
    "aug": OneOf(AUGMENTATIONS),
    "augment": Interval(int, 0),
    "tta_views": Interval(int, 0),
    "layer": Pattern(rf"{_LAYER_TOKEN}(?:,{_LAYER_TOKEN})*",
                     f"penultimate, stages, or a comma list of {', '.join(STAGE_NAMES)}, penultimate"),
    "image_size": Maybe(Interval(int, 16, MAX_IMAGE_SIZE)),
    "max_pixels": Interval(int, 1),
    "batch_size": Interval(int, 1),
    "workers": Maybe(Interval(int, 0)),
    "prefetch": Maybe(Interval(int, 0, 64)),
    "shard_rows": Maybe(Interval(int, 1)),
    "cluster": Maybe(Pattern(r"local(?::[1-9]\d*)?|(?:tcp|tls|ucx|inproc)://.+",
                             "local, local:N or a scheduler address such as tcp://host:8786")),
    # fine-tuning
    "unfreeze": OneOf(UNFREEZE),
    "bn": OneOf(BN_MODES),
    "epochs": Interval(int, 0),
    "head_epochs": Interval(int, 0),
    "lr": Interval(float, 0, low_open=True),
    "lr_min": Maybe(Interval(float, 0, low_open=True)),
    "weight_decay": Interval(float, 0),
    "clip_grad": Interval(float, 0, low_open=True),
    "dropout": Interval(float, 0, 0.95),
    "drop_path": Maybe(Interval(float, 0, 0.95)),
    "patience": Interval(int, 1),
    "ema": Maybe(Interval(float, 0.5, 0.9999)),
    # heads and comparison
    "seed": Interval(int, 0),
    "split_seed": Interval(int, 0),
    "split": Maybe(Fractions()),
    "split_by": OneOf(("shuffle", "path")),
    "val_seed": Maybe(Interval(int, 0)),
    "val_fraction": Interval(float, 0.05, 0.5),
    "cv": Maybe(Interval(int, 2)),
    "max_train_rows": Maybe(Interval(int, 10)),
    "threshold": Maybe(Pattern(rf"balanced_accuracy|f1|sensitivity={_UNIT_FLOAT}|mixture",
                               "balanced_accuracy, f1, sensitivity=<0..1> or mixture")),
    "sort_by": OneOf(SORTABLE),
    "align": OneOf(ALIGNMENTS),
    "prior_shift": OneOf(PRIOR_SHIFTS),
    "duplicate_cosine": Maybe(Interval(float, 0.5, 1.0)),
    "smooth_test": Interval(int, 0),
    "exclude_leaked": Boolean(),
    "adapt_bn": Boolean(),
    # using a run
    "score": OneOf(OPEN_SET_SCORES),
    "top_k": Interval(int, 1),
    "sample_per_class": Interval(int, 2),
    # embeddings where analysts work
    "format": OneOf(TABLE_FORMATS),
    "k": Interval(int, 1),
    "index": OneOf(NEIGHBOUR_INDEXES),
    "map_method": OneOf(MAP_METHODS),
    "max_points": Interval(int, 10),
}


def invalid(name: str, where: str, expected: str, value) -> ConfigError:
    """The one wording of a parameter error: "The 'x' parameter of y must be …. Got … instead."."""
    return ConfigError(f"The {name!r} parameter of {where} must be {expected}. Got {value!r} instead.")


def check(where: str, **values) -> None:
    """Check each named value against its constraint in ``PARAMETERS``."""
    for name, value in values.items():
        constraint = PARAMETERS[name]
        if not constraint.accepts(value):
            raise invalid(name, where, str(constraint), value)


def check_fields(config, where: str) -> None:
    """Check every field of a config dataclass that ``PARAMETERS`` constrains (called from ``__post_init__``)."""
    check(where, **{f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in PARAMETERS})


def parse_layer(layer: str, where: str = "extract") -> tuple[str, ...]:
    """``penultimate`` (default), ``stages`` (all four), or a comma list like ``stage2,stage3,penultimate``."""
    check(where, layer=layer)
    parts = []
    for token in layer.replace(" ", "").split(","):
        parts.extend(STAGE_NAMES if token == "stages" else [token])
    return tuple(dict.fromkeys(parts))


# Help texts of parameters that several commands take, so that each is written once.
SHARED_HELP = {
    "weights": "Weights file, or 'none' for random init (tests). Default: the backbone's pretrained weights from its "
               "offline package, the torch hub cache, or a download.",
    "image_size": "Input size in pixels instead of the backbone's own (the resize keeps the same crop ratio).",
    "fit": "crop: shorter side resized, centre crop (ImageNet); full: the whole image squeezed to the input size "
           "(Keras' target_size), for images whose edges matter such as X-rays.",
    "batch_size": "Images per batch.",
    "precision": "Autocast precision. auto: bf16 on a GPU that has it (else fp16); on a CPU, bf16 where it is native "
                 "(AMX, AVX-512 BF16) and the backbone is dense, else fp32.",
    "device": "Where the backbone runs; auto is the GPU when there is one.",
    "val_fraction": "Share of train carved out (stratified, seeded) as validation when there is no val split.",
    "cluster": "Run on Dask distributed: local, local:N (N worker processes here) or a scheduler such as "
               "tcp://host:8786. Needs pip install 'featx[cluster]'.",
}
SHARED_CLI = {"weights": {"metavar": "PATH|none"}, "device": {"metavar": "auto|cpu|cuda[:N]"},
              "cluster": {"metavar": "ADDRESS", "envvar": "FEATX_CLUSTER"}}


def setting(default, help: str, *, metavar: str | None = None, envvar: str | None = None, flag: str | None = None,
            path: str | None = None, cli: bool = True):
    """A config field that declares its command-line option too: the help text in the field's metadata, and what
    the command line needs besides (``metavar``, ``envvar``, ``flag`` where it is not ``--field-name``, ``path``:
    file, folder or any, for a path that must exist), from which ``featx.cli.options.config_options`` makes the
    option, typed from ``PARAMETERS``. ``cli=False`` keeps a field out of the command line (the Python API only)."""
    metadata = {"help": help, "metavar": metavar, "envvar": envvar, "flag": flag, "path": path, "cli": cli}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def shared_setting(name: str, default):
    """The field of a parameter that several commands take (``SHARED_HELP``)."""
    return setting(default, SHARED_HELP[name], **SHARED_CLI.get(name, {}))
