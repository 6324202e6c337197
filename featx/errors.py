"""Exceptions raised by featx; the CLI turns each into a one-line message and an exit code."""


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


def unknown_name(kind: str, name: str, known, also: str = "") -> ConfigError:
    """The registries' one error for a misspelt name: the closest matches, else every choice."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(known)}{also}"
    return ConfigError(f"unknown {kind} {name!r}; {hint}")


def check_positive_int(value, name: str, where: str) -> int:
    """The one wording for a bad count parameter, after scikit-learn's."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"The {name!r} parameter of {where} must be a positive int. Got {value!r} instead.")
    return value
