"""Every figure featx draws: confusion matrices and ROC curves (scikit-learn's Displays), fine-tuning history, the
LR finder, the dataset map.

Each ``*_figure`` returns a matplotlib ``Figure`` (a notebook shows it; the API hands it out), and ``save`` writes
it as a PNG where the caller says. Figures are made without pyplot: no global state, no backend to choose, nothing
left open, whether headless or in Jupyter.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np


def _figure(**options):
    return _shown_figure()(**options)


@functools.cache
def _shown_figure():
    """A ``Figure`` that Jupyter shows as a PNG (IPython's ``_repr_png_``) even where pyplot was never imported;
    made on first use, so that importing this module does not import matplotlib."""
    from matplotlib.figure import Figure

    class ShownFigure(Figure):
        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            return buffer.getvalue()

    return ShownFigure


def save(fig, path: Path) -> Path:
    """``fig`` as a PNG at ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def confusion_figure(truth: np.ndarray, predicted: np.ndarray, classes: list[str], title: str):
    """Raw counts and row-normalised rates side by side."""
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.6 * len(classes) + 2.5)
    fig = _figure(figsize=(2 * size + 1, size))
    axes = fig.subplots(1, 2)
    labels = list(range(len(classes)))
    for ax, normalize, name in ((axes[0], None, "counts"), (axes[1], "true", "row-normalised")):
        ConfusionMatrixDisplay.from_predictions(truth, predicted, labels=labels, display_labels=classes,
                                                normalize=normalize, ax=ax, colorbar=False, cmap="Blues",
                                                values_format="d" if normalize is None else ".2f")
        ax.set_title(name)
        ax.tick_params(axis="x", labelrotation=45)
    fig.suptitle(title)
    return fig


def roc_figure(truth: np.ndarray, proba: np.ndarray, classes: list[str], title: str):
    """The ROC curve (binary) or one-vs-rest curves per class."""
    from sklearn.metrics import RocCurveDisplay

    fig = _figure(figsize=(5.5, 5))
    ax = fig.subplots()
    if len(classes) == 2:
        RocCurveDisplay.from_predictions(truth, proba[:, 1], name=f"{classes[1]} vs {classes[0]}", ax=ax)
    else:
        for k, name in enumerate(classes):
            if 0 < (truth == k).sum() < len(truth):
                RocCurveDisplay.from_predictions(truth == k, proba[:, k], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_title(title)
    return fig


def lr_finder_figure(lrs: list[float], losses: list[float], suggestion: dict):
    """Smoothed loss against learning rate (log scale) with the suggested rates marked."""
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    # The divergence at the end of the sweep would flatten everything else; show the useful range.
    ax.set_ylim(min(losses) * 0.95, max(losses[0], min(losses)) * 1.5)
    for key, colour in (("steepest", "tab:red"), ("valley", "tab:green")):
        ax.axvline(suggestion[key], color=colour, linestyle="--", label=f"{key}: {suggestion[key]:.1e}")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.set_title("LR finder")
    ax.legend()
    return fig


def history_figure(history: list[dict]):
    """Train and validation loss, and validation accuracy, per epoch of a fine-tune."""
    epochs = [h["epoch"] for h in history]
    fig = _figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label="val loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.legend()
    for key in ("val_accuracy", "val_balanced_accuracy", "val_roc_auc"):
        if all(key in h for h in history):
            acc_ax.plot(epochs, [h[key] for h in history], marker="o", label=key.replace("_", " "))
    acc_ax.set_xlabel("epoch")
    acc_ax.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


SPLIT_MARKERS = {"train": "o", "val": "s", "test": "^"}


def map_figure(xy: np.ndarray, classes: list[str], splits: list[str], label_errors: list[int],
               least_like_train: list[int], title: str):
    """Points coloured by class and shaped by split; likely label errors crossed in red, the test images least
    like train ringed in black (indices into ``xy``)."""
    from matplotlib.lines import Line2D

    fig = _figure(figsize=(9, 7))
    ax = fig.subplots()
    names = sorted(set(classes))
    colours = {name: _colour(i, len(names)) for i, name in enumerate(names)}
    classes, splits = np.asarray(classes), np.asarray(splits)
    present = sorted(set(splits.tolist()), key=lambda s: (list(SPLIT_MARKERS) + [s]).index(s))
    for split in present:
        for name in names:
            at = (splits == split) & (classes == name)
            if at.any():
                ax.scatter(xy[at, 0], xy[at, 1], s=14, alpha=0.7, color=colours[name],
                           marker=SPLIT_MARKERS.get(split, "D"), linewidths=0)
    if label_errors:
        ax.scatter(xy[label_errors, 0], xy[label_errors, 1], s=70, marker="x", color="red", linewidths=1.8)
    if least_like_train:
        ax.scatter(xy[least_like_train, 0], xy[least_like_train, 1], s=110, facecolors="none", edgecolors="black",
                   linewidths=1.4)
    handles = [Line2D([], [], marker="o", linestyle="", color=colours[n], label=n or "(unlabelled)") for n in names]
    handles += [Line2D([], [], marker=SPLIT_MARKERS.get(s, "D"), linestyle="", color="grey", label=s)
                for s in present]
    handles += [Line2D([], [], marker="x", linestyle="", color="red",
                       label=f"likely label error ({len(label_errors)})"),
                Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="black",
                       label=f"test image least like train ({len(least_like_train)})")]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    return fig


def _colour(i: int, n: int):
    from matplotlib import colormaps

    return colormaps["tab10" if n <= 10 else "tab20"](i % 20)
