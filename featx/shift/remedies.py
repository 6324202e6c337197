"""The remedy registry: which remedies a compare asks for, in which order they run, and how a run replays them.

Built-in remedies are registered here in the order they apply within their stage; ``register_remedy`` adds
one from outside featx (it then runs after them). ``compare`` and ``predict`` only ever go through this module.
"""

from __future__ import annotations

import logging

import numpy as np

from featx.errors import ConfigError, DataError, unknown_name
from featx.shift.adapt_bn import AdaptBatchNorm
from featx.shift.align import Align
from featx.shift.exclude_leaked import ExcludeLeaked
from featx.shift.mixture_threshold import MixtureThreshold
from featx.shift.prior_shift import PriorShiftRemedy
from featx.shift.remedy import STAGES, Fitted, Remedy
from featx.shift.smooth_test import SmoothTest
from featx.shift.tta_views import TestTimeViews
from featx.vocab import PARAMETERS

log = logging.getLogger(__name__)
REMEDIES: dict[str, Remedy] = {}


def register_remedy(remedy: Remedy, constraint=None, replace: bool = False) -> Remedy:
    """Add ``remedy`` to the registry; ``constraint`` (a ``vocab`` constraint) declares its parameter's values
    where ``vocab.PARAMETERS`` does not know it yet. A name already held is refused unless ``replace``."""
    if remedy.name in REMEDIES and not replace:
        raise ConfigError(f"a remedy named {remedy.name!r} is already registered; pass replace=True to replace it")
    if remedy.stage not in STAGES:
        raise ConfigError(f"remedy {remedy.name!r}: stage {remedy.stage!r} is not one of {', '.join(STAGES)}")
    if constraint is not None:
        if remedy.parameter in PARAMETERS and PARAMETERS[remedy.parameter] != constraint and not replace:
            raise ConfigError(f"remedy {remedy.name!r}: the parameter {remedy.parameter!r} is already declared as "
                              f"{PARAMETERS[remedy.parameter]}")
        PARAMETERS[remedy.parameter] = constraint
    elif remedy.parameter not in PARAMETERS:
        raise ConfigError(f"remedy {remedy.name!r}: its parameter {remedy.parameter!r} has no constraint in "
                          "featx.vocab.PARAMETERS; pass constraint=")
    if remedy.replayable is False and not remedy.not_replayable:
        raise ConfigError(f"remedy {remedy.name!r}: replayable = False needs the reason in not_replayable")
    REMEDIES[remedy.name] = remedy
    return remedy


def get_remedy(name: str) -> Remedy:
    try:
        return REMEDIES[name]
    except KeyError:
        raise unknown_name("remedy", name, REMEDIES) from None


def remedy_parameters() -> list[str]:
    """The compare options that ask for a remedy (extraction's are options of extract)."""
    return list(dict.fromkeys(r.parameter for r in REMEDIES.values() if r.stage != "extraction"))


def requested(options: dict, stage: str) -> list[tuple[Remedy, object]]:
    """The remedies of ``stage`` that ``options`` (compare's, by parameter name) ask for, in the order they run."""
    return [(r, options.get(r.parameter)) for r in REMEDIES.values()
            if r.stage == stage and r.wanted(options.get(r.parameter))]


def in_extraction(configs: list[dict]) -> list[Fitted]:
    """The extraction-stage remedies that made an input's features, from its files' recorded configs."""
    found = []
    for remedy in (r for r in REMEDIES.values() if r.stage == "extraction"):
        values = [remedy.in_effect(config) for config in configs]
        used = [v for v in values if remedy.wanted(v)]
        if used:
            found.append(Fitted(remedy.name, record={"value": used[0]}, summary=remedy.describe(used[0])))
    return found


def not_reproducible(names: list[str]) -> str:
    """Why predict cannot give the leaderboard's figures image by image ('' when it can)."""
    return "; ".join(f"{n}: {REMEDIES[n].not_replayable}" for n in dict.fromkeys(names)
                     if n in REMEDIES and not REMEDIES[n].replayable)


# --- replaying a saved run ---------------------------------------------------------------------------------

def saved_steps(features: list[tuple[Fitted, tuple[int, int] | None]], scores: list[Fitted]) -> list[dict]:
    """What a head file keeps of its remedies, in order: each one's name, stage and replay (a features-stage one
    of an ``--ensemble`` member also the columns it applies to)."""
    steps = [{"name": f.name, "stage": "features", "replay": f.replay, **({"columns": list(c)} if c else {})}
             for f, c in features]
    return steps + [{"name": f.name, "stage": "scores", "replay": f.replay} for f in scores]


def check_steps(steps: list[dict], where: str) -> None:
    """Refuse a head whose remedies this featx does not know; warn in one line for each one predict cannot
    reproduce image by image."""
    for step in steps:
        if step["name"] not in REMEDIES:
            raise DataError(f"{where}: the run used the remedy {step['name']!r}, which is not registered here; "
                            "register it (featx.shift.remedies.register_remedy) before using the run")
    reason = not_reproducible([step["name"] for step in steps])
    if reason:
        log.warning("%s: not reproducible by predict (%s)", where, reason)


def replay_features(steps: list[dict], X: np.ndarray) -> np.ndarray:
    """New images' features as the run's heads scored its test images'."""
    for step in (s for s in steps if s["stage"] == "features"):
        remedy = REMEDIES[step["name"]]
        if "columns" in step:
            begin, end = step["columns"]
            X = X.copy()
            X[:, begin:end] = remedy.target(step["replay"], X[:, begin:end])
        else:
            X = remedy.target(step["replay"], X)
    return X


def replay_scores(steps: list[dict], features: np.ndarray, proba: np.ndarray,
                  threshold: float | None) -> tuple[np.ndarray, float | None]:
    """New images' probabilities and decision threshold as the run's test images' were made."""
    for step in (s for s in steps if s["stage"] == "scores"):
        proba, threshold = REMEDIES[step["name"]].replay_scores(step["replay"], features, proba, threshold)
    return proba, threshold


for _builtin in (ExcludeLeaked(), Align(), SmoothTest(), MixtureThreshold(), PriorShiftRemedy(), AdaptBatchNorm(),
                 TestTimeViews()):
    register_remedy(_builtin)
