"""The leaderboard: one row per input × head, ranked on validation, with the fitted heads and scores behind it."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, replace

import numpy as np

from featx.comparison.plots import confusion_figure, roc_figure
from featx.errors import ConfigError
from featx.heads.metrics import predict_labels
from featx.heads.registry import FittedHead
from featx.shift.remedy import Splits
from featx.store.embeddings import Embeddings
from featx.notebook import html_table
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

    def confusion_figure(self, split: str = "test"):
        """The confusion matrix of ``split`` (counts and row-normalised) as a matplotlib Figure."""
        truth, proba = self._scored(split)
        return confusion_figure(truth, predict_labels(proba, self.decision_threshold(split)), self.classes,
                                self._title(split, truth))

    def roc_figure(self, split: str = "test"):
        """The ROC curve(s) of ``split`` as a matplotlib Figure."""
        truth, proba = self._scored(split)
        return roc_figure(truth, proba, self.classes, self._title(split, truth))

    def _scored(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        truth, proba = (self.val_truth, self.val_proba) if split == "val" else (self.test_truth, self.test_proba)
        if split not in ("val", "test") or truth is None:
            raise ConfigError(f"{self.row['head']} on {self.row['backbone']} has no {split!r} scores; "
                              f"choose {'val or test' if self.test_truth is not None else 'val'}")
        return truth, proba

    def _title(self, split: str, truth: np.ndarray) -> str:
        return f"{self.row['backbone']} + {self.row['head']} ({split}, n={len(truth)})"


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

    def _repr_html_(self) -> str:
        return rows_html(self.rows, self.rows.index(self.best()), self.sort_by)

    def to_pandas(self):
        """The rows as a DataFrame, in this leaderboard's order (intervals stay [low, high] lists)."""
        try:
            import pandas as pd
        except ImportError:
            raise ConfigError("Leaderboard.to_pandas needs pandas: pip install 'featx[pandas]'") from None
        return pd.DataFrame(self.rows)

    def __str__(self) -> str:
        return self.to_markdown()


def rows_html(rows: list[dict], best: int, sort_by: str) -> str:
    """Leaderboard rows as an HTML table, row ``best`` marked."""
    columns = [c for c in Leaderboard.COLUMNS if any(c in r for r in rows)]
    cells = [[("★\u00a0" if i == best else "") + format_cell(r.get(columns[0]))]
             + [format_cell(r.get(c), seconds=c.endswith("_s")) for c in columns[1:]] for i, r in enumerate(rows)]
    return html_table(columns, cells, marked=best, caption=f"ranked by val_{sort_by}; ★ the best")


def format_cell(value, seconds: bool = False) -> str:
    """A leaderboard value as printed: 4 decimals, 2 for seconds, intervals as [low, high]."""
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.2f}" if seconds else f"{value:.4f}"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    return "" if value is None else str(value)
