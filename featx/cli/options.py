"""Click options, each declared once and typed from ``featx.vocab``; commands stack them, as pip-tools does.

A choice list or a range is never typed here: ``param_type`` makes it from the parameter's
constraint, the same one the configs check themselves with, so the CLI and the Python API
accept exactly the same values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from featx.embed.backbones import DEFAULT_BACKBONE
from featx.vocab import PARAMETERS, SHARED_CLI, SHARED_HELP, Boolean, Fractions, Interval, Maybe, OneOf, Pattern


class _Matching(click.ParamType):
    """A string that a ``vocab.Pattern`` (or ``Fractions``) must accept; refused with its own description."""

    name = "text"

    def __init__(self, constraint: Pattern | Fractions):
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
    if isinstance(constraint, Boolean):
        return click.BOOL
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


def shared(name: str, **kwargs):
    """The option of a parameter that several commands take, with its one help text (``vocab.SHARED_HELP``)."""
    return option(name, help=SHARED_HELP[name], **{**SHARED_CLI.get(name, {}), **kwargs})


weights = click.option("--weights", metavar=SHARED_CLI["weights"]["metavar"], help=SHARED_HELP["weights"])


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


cluster = shared("cluster", show_envvar=True)
image_size = shared("image_size")
batch_size = shared("batch_size", default=32, show_default=True)

def config_options(config, skip: tuple[str, ...] = ()):
    """An option for every field of the config dataclass ``config`` that declares one (``vocab.setting``), in field
    order: ``--name-with-dashes``, typed from ``PARAMETERS`` (a flag for a bool), with the field's default and help.
    A new option of a command is then one field of its config."""
    def decorate(command):
        for found in reversed(dataclasses.fields(config)):
            if found.name not in skip and found.metadata.get("cli"):
                command = _field_option(found)(command)
        return command

    return decorate


PATHS = {"file": {"exists": True, "dir_okay": False}, "folder": {"exists": True, "file_okay": False}, "any": {}}


def _field_option(found: dataclasses.Field):
    meta = found.metadata
    flag = meta["flag"] or "--" + found.name.replace("_", "-")
    described = {"help": meta["help"], "metavar": meta["metavar"], "envvar": meta["envvar"],
                 "show_envvar": bool(meta["envvar"])}
    if isinstance(found.default, bool):
        return click.option(flag, found.name, is_flag=True, default=found.default, show_default="/" in flag,
                            **described)
    if meta["path"]:
        kind = click.Path(**PATHS[meta["path"]])
    elif found.name in PARAMETERS:
        kind = param_type(found.name)
    else:
        kind = click.STRING if found.default is None else type(found.default)
    return click.option(flag, found.name, type=kind, default=found.default,
                        show_default=found.default is not None, **described)
