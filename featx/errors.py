"""Exceptions and warnings raised by featx; the CLI turns each exception into a one-line message and an exit code."""

from __future__ import annotations


class FeatxError(Exception):
    """Base class: the work failed (exit code 1)."""

    exit_code = 1


class ConfigError(FeatxError):
    """A parameter or option was wrong (exit code 2)."""

    exit_code = 2


class DataError(FeatxError):
    """An input file or folder is unusable (exit code 2)."""

    exit_code = 2


class SchemaError(DataError):
    """An HDF5 file is not a complete featx embeddings file of a known schema."""


class WeightsError(FeatxError):
    """Pretrained weights could not be found anywhere featx looked."""


class FeatxWarning(UserWarning):
    """featx's own warnings, so that silencing them never silences another library's."""


class UnsafeFileWarning(FeatxWarning):
    """A file that can run code when loaded (a joblib pickle) is being loaded."""


def unknown_name(kind: str, name: str, known, also: str = "") -> ConfigError:
    """The registries' one error for a misspelt name: the closest matches, else every choice."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(known)}{also}"
    return ConfigError(f"unknown {kind} {name!r}; {hint}")


def name_taken(kind: str, name: str) -> ConfigError:
    """The registries' one error for registering a name twice."""
    return ConfigError(f"a {kind} named {name!r} is already registered; pass replace=True to replace it")
