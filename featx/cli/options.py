"""Click options, each declared once and typed from ``featx.vocab``; commands stack them, as pip-tools does.

A choice list or a range is never typed here: ``param_type`` makes it from the parameter's
constraint, the same one the configs check themselves with, so the CLI and the Python API
accept exactly the same values.
"""

from __future__ import annotations

from pathlib import Path

import click

from featx.embed.backbones import DEFAULT_BACKBONE
from featx.vocab import PARAMETERS, Interval, Maybe, OneOf, Pattern


class _Matching(click.ParamType):
    """A string that must match a ``vocab.Pattern``; refused with the pattern's own description."""

    name = "text"

    def __init__(self, constraint: Pattern):
        self.constraint = constraint

    def convert(self, value, param, ctx):
        if self.constraint.accepts(value):
            return value
        self.fail(f"must be {self.constraint}. Got {value!r} instead.", param, ctx)


def param_type(name: str) -> click.ParamType:
    """The click type of ``vocab.PARAMETERS[name]``: a Choice, an int or float range, or a checked string."""
    constraint = PARAMETERS[name]
    if isinstance(constraint, Maybe):
        constraint = constraint.constraint
    if isinstance(constraint, OneOf):
        return click.Choice([str(v) for v in constraint.values])
    if isinstance(constraint, Interval):
        kind = click.IntRange if constraint.kind is int else click.FloatRange
        return kind(min=constraint.low, max=constraint.high, min_open=constraint.low_open)
    return _Matching(constraint)


def option(name: str, *flags: str, **kwargs):
    """``--name-with-dashes`` for the vocabulary parameter ``name``, typed from its constraint."""
    return click.option(*(flags or ("--" + name.replace("_", "-"),)), name, type=param_type(name), **kwargs)


def backbone(multiple: bool = False):
    if multiple:
        return click.option("--backbone", "backbones", multiple=True, default=[DEFAULT_BACKBONE], show_default=True,
                            metavar="NAME", help="Registered backbone (see `featx list`) or timm:<model>; repeat "
                                                 "for several.")
    return click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True, metavar="NAME",
                        help="Registered backbone (see `featx list`) or timm:<model>.")


weights = click.option("--weights", metavar="PATH|none",
                       help="Weights file, or 'none' for random init (tests). Default: the backbone's pretrained "
                            "weights from its offline package, the torch hub cache, or a download.")


def seed(purpose: str):
    return option("seed", default=0, show_default=True, help=purpose)


def heads(flag: str, default: str):
    """Comma-separated and repeatable: ``--heads logreg --heads svm`` is ``--heads logreg,svm`` (a plain click
    option would keep the last one without a word)."""
    return click.option(flag, "heads", default=[default], multiple=True, show_default=True,
                        callback=lambda _ctx, _param, given: ",".join(given),
                        help="Comma list of heads (logreg, svm, lightgbm, knn, mlp; see `featx list heads`) or "
                             "'all'; repeatable.")


def run_folder(help: str, default: str | None = None):
    return click.option("--out", default=default, show_default=default is not None, type=click.Path(path_type=Path),
                        help=help)


cluster = option("cluster", metavar="ADDRESS", envvar="FEATX_CLUSTER", show_envvar=True,
                 help="Run on Dask distributed: local, local:N (N worker processes here) or a scheduler such as "
                      "tcp://host:8786. Needs pip install 'featx[cluster]'.")


def aug(purpose: str):
    return option("aug", default="natural", show_default=True, help=purpose)


image_size = option("image_size", help="Input size in pixels instead of the backbone's own (the resize keeps the "
                                       "same crop ratio).")
fit = option("fit", default="crop", show_default=True,
             help="crop: shorter side resized, centre crop (ImageNet); full: the whole image squeezed to the input "
                  "size (Keras' target_size), for images whose edges matter such as X-rays.")
batch_size = option("batch_size", default=32, show_default=True, help="Images per batch.")
precision = option("precision", default="auto", show_default=True,
                   help="Autocast precision. auto: bf16 on a GPU that has it (else fp16); on a CPU, bf16 where it "
                        "is native (AMX, AVX-512 BF16) and the backbone is dense, else fp32.")
decode = option("decode", default="auto", show_default=True,
                help="How images are decoded: tensor (JPEGs in batches on the device: nvJPEG on a GPU), pillow "
                     "(one by one on CPU threads or DataLoader workers), or auto (pillow: the faster of the two "
                     "where measured).")
device = option("device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                help="Where the backbone runs; auto is the GPU when there is one.")
val_fraction = option("val_fraction", default=0.15, show_default=True,
                      help="Share of train carved out (stratified, seeded) as validation when there is no val split.")
