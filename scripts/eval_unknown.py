"""How well does 'unknown' work? In-distribution vs out-of-distribution images, measured on cached embeddings.

For each direction (a chest X-ray head shown flower photos, and a flower head shown chest X-rays):
fit the head as `featx compare` does (logreg, tuned on validation), calibrate the open-set scores
on validation images at 95 % coverage, then report for each score (kNN distance, distance to the
nearest class centroid, 1 - max probability): AUROC of in- vs out-of-distribution test images and
the share of each that is accepted (not called unknown).

Usage: python scripts/eval_unknown.py CHEST_XRAY.h5 FLOWERS.h5   (both from the same backbone)
  e.g. featx extract ../shared/data/chest_xray && featx extract ../shared/data/flowers5
"""

from pathlib import Path

import click
import numpy as np
from sklearn.metrics import roc_auc_score

from featx.comparison.evaluate import split_arrays
from featx.heads.registry import fit_head
from featx.heads.openset import OpenSet
from featx.store.embeddings import load_embeddings


def direction(known, other, coverage: float) -> None:
    splits = split_arrays(known, 0.15, 0)
    (X_train, y_train), (X_val, y_val) = (splits.train.features, splits.train.labels), (splits.val.features,
                                                                                        splits.val.labels)
    X_test = splits.test.features
    head = fit_head("logreg", X_train, y_train, X_val, y_val).pipeline
    open_set = OpenSet.calibrate(X_train, y_train, X_val, head.predict_proba(X_val), coverage=coverage)
    X_out = other.features("test") if "test" in other.split_names else other.features()
    inside = open_set.scores(X_test, head.predict_proba(X_test))
    outside = open_set.scores(X_out, head.predict_proba(X_out))
    print(f"\nhead on {known.path.name} ({known.label}); in-distribution: its {len(X_test)} test images; "
          f"out-of-distribution: {len(X_out)} images of {Path(other.meta.get('dataset_root', other.path)).name}")
    print(f"  {'score':10s} {'AUROC':>7s} {'in accepted':>12s} {'out accepted':>13s}  (threshold at {coverage:.0%} "
          "of validation images)")
    for name in inside:
        truth = np.r_[np.zeros(len(inside[name])), np.ones(len(outside[name]))]
        auroc = roc_auc_score(truth, np.r_[inside[name], outside[name]])
        t = open_set.thresholds[name]
        print(f"  {name:10s} {auroc:7.4f} {np.mean(inside[name] <= t):12.1%} {np.mean(outside[name] <= t):13.1%}")


@click.command()
@click.argument("chest_xray", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("flowers", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--coverage", default=0.95, show_default=True)
def main(chest_xray, flowers, coverage):
    xray, flower = load_embeddings(chest_xray), load_embeddings(flowers)
    direction(xray, flower, coverage)
    direction(flower, xray, coverage)


if __name__ == "__main__":
    main()
