"""Every PNG featx draws: confusion matrices and ROC curves (scikit-learn's Displays), fine-tuning history, LR finder.

Callers choose the file; this module only draws. matplotlib runs headless (Agg).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a screen
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_confusion(path: Path, truth: np.ndarray, predicted: np.ndarray, classes: list[str], title: str) -> Path:
    """Raw counts and row-normalised rates side by side in one PNG."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    size = max(4.0, 0.6 * len(classes) + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    labels = list(range(len(classes)))
    for ax, normalize, name in ((axes[0], None, "counts"), (axes[1], "true", "row-normalised")):
        ConfusionMatrixDisplay.from_predictions(truth, predicted, labels=labels, display_labels=classes,
                                                normalize=normalize, ax=ax, colorbar=False, cmap="Blues",
                                                values_format="d" if normalize is None else ".2f")
        ax.set_title(name)
        ax.tick_params(axis="x", labelrotation=45)
    fig.suptitle(title)
    return _save(fig, path)


def plot_roc(path: Path, truth: np.ndarray, proba: np.ndarray, classes: list[str], title: str) -> Path:
    """The ROC curve (binary) or one-vs-rest curves per class."""
    from sklearn.metrics import RocCurveDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if len(classes) == 2:
        RocCurveDisplay.from_predictions(truth, proba[:, 1], name=f"{classes[1]} vs {classes[0]}", ax=ax)
    else:
        for k, name in enumerate(classes):
            if 0 < (truth == k).sum() < len(truth):
                RocCurveDisplay.from_predictions(truth == k, proba[:, k], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_title(title)
    return _save(fig, path)


def plot_lr_finder(path: Path, lrs: list[float], losses: list[float], suggestion: dict) -> Path:
    """Smoothed loss against learning rate (log scale) with the suggested rates marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
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
    return _save(fig, path)


def plot_history(path: Path, history: list[dict]) -> Path:
    """Train and validation loss, and validation accuracy, per epoch of a fine-tune."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
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
    return _save(fig, path)
