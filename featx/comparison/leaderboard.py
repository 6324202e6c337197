"""The leaderboard: one row per input × head, ranked on validation, with the fitted heads and scores behind it."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, replace

import numpy as np

from featx.errors import ConfigError
from featx.heads.registry import FittedHead
from featx.shift.remedy import Splits
from featx.store.embeddings import Embeddings
from featx.vocab import check

REPORTED_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "log_loss", "accuracy_ci", "roc_auc_ci")


@dataclass
class HeadResult:
    """One head fitted on one embedding file, with its scores and the per-row probabilities behind them."""

    row: dict  # the leaderboard row (the same object as in ``Leaderboard.rows``)
    classes: list[str]
    fitted: FittedHead
    embeddings: Embeddings
    val: dict
    val_truth: np.ndarray
    val_proba: np.ndarray
    test: dict | None = None
    test_truth: np.ndarray | None = None
    test_proba: np.ndarray | None = None
    test_paths: np.ndarray | None = None
    threshold: float | None = None  # validation's decision threshold (binary tasks)
    test_threshold: float | None = None  # the one applied on test and to new images, after the remedies
    remedies: list[dict] = field(default_factory=list)  # what predict replays (``featx.shift.remedies.saved_steps``)

    def decision_threshold(self, split: str) -> float | None:
        return self.threshold if split == "val" else self.test_threshold


@dataclass
class Leaderboard:
    """One row per embedding file × head; printable, sortable, and formatted as CSV, markdown and JSON.

    ``results`` keep the fitted heads and probabilities, ``splits`` each input's ``Splits`` (by file name) as
    its heads saw them, and ``settings`` how the comparison ran: everything a run folder is made from.
    """

    rows: list[dict]
    sort_by: str = "balanced_accuracy"
    results: list[HeadResult] = field(default_factory=list, repr=False)
    inputs: list[Embeddings] = field(default_factory=list, repr=False)
    splits: dict[str, Splits] = field(default_factory=dict, repr=False)
    settings: dict = field(default_factory=dict, repr=False)

    COLUMNS = ("backbone", "head", "val_balanced_accuracy", "val_roc_auc", "test_accuracy", "test_accuracy_ci",
               "test_balanced_accuracy", "test_f1_macro", "test_roc_auc", "test_roc_auc_ci", "fit_s", "predict_s",
               "not_reproducible_by_predict")

    def sorted(self, metric: str | None = None) -> "Leaderboard":
        """Rows ranked by a validation metric: ranking by test would be choosing on the test split."""
        metric = metric or self.sort_by
        check("Leaderboard.sorted", sort_by=metric)
        sign = 1.0 if metric == "log_loss" else -1.0

        def rank(row):
            value = row.get(f"val_{metric}", float("nan"))
            return (bool(np.isnan(value)), sign * np.nan_to_num(value))

        return replace(self, rows=sorted(self.rows, key=rank), sort_by=metric)

    def best(self, metric: str | None = None) -> dict:
        """The row with the best validation score: choosing by test would tune on the test split."""
        return self.sorted(metric).rows[0]

    def result_of(self, row: dict) -> HeadResult:
        return next(r for r in self.results if r.row is row)

    def to_markdown(self) -> str:
        columns = [c for c in self.COLUMNS if any(c in r for r in self.rows)]
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(format_cell(r.get(c), seconds=c.endswith("_s")) for c in columns) + " |"
                  for r in self.rows]
        return "\n".join(lines)

    def to_csv(self) -> str:
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys)
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
        return buffer.getvalue()

    def to_json(self) -> str:
        return json.dumps(self.rows, indent=2, default=float)

    def to_pandas(self):
        """The rows as a DataFrame, in this leaderboard's order (intervals stay [low, high] lists)."""
        try:
            import pandas as pd
        except ImportError:
            raise ConfigError("Leaderboard.to_pandas needs pandas: pip install 'featx[pandas]'") from None
        return pd.DataFrame(self.rows)

    def __str__(self) -> str:
        return self.to_markdown()


def format_cell(value, seconds: bool = False) -> str:
    """A leaderboard value as printed: 4 decimals, 2 for seconds, intervals as [low, high]."""
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.2f}" if seconds else f"{value:.4f}"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    return "" if value is None else str(value)
