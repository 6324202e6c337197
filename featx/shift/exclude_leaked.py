"""``--exclude-leaked``: test images with a near-duplicate among the labelled ones are left out of the figures.

Nothing changes for a single image, so predict has nothing to replay; the leaderboard reports the test figures
with those images kept too.
"""

from __future__ import annotations

import logging

import numpy as np

from featx.shift.audit import DUPLICATE_COSINE, has_near_duplicate
from featx.shift.remedy import Context, Fitted, Remedy

log = logging.getLogger(__name__)


class ExcludeLeaked(Remedy):
    name = parameter = "exclude_leaked"

    def fit(self, value, context: Context) -> Fitted:
        splits, cosine = context.splits, context.options.get("duplicate_cosine") or DUPLICATE_COSINE
        leaked = has_near_duplicate(splits.test.features,
                                    np.concatenate([splits.train.features, splits.val.features]), cosine)
        count, total = int(leaked.sum()), len(leaked)
        log.info("%s: %d of %d test images have a near-duplicate among the labelled ones (cosine ≥ %s); scored "
                 "without them, and with them for comparison", context.where, count, total, cosine)
        if count > total / 2:
            log.warning("%s: %d of %d test images count as leaked at cosine ≥ %s: too low a threshold for images "
                        "this alike; `featx audit` on the file suggests one", context.where, count, total, cosine)
        return Fitted(self.name, record={"cosine": cosine, "test_rows": count}, unscored=leaked,
                      summary=f"{count} test image{'s' * (count != 1)} with a near-duplicate among the labelled ones "
                              f"(cosine ≥ {cosine}) left out of the test figures; test_with_leaked_* keep them")

    def scored_without(self, fitted: Fitted, row: dict, with_all: dict) -> None:
        row.update(test_leaked_rows=int(fitted.unscored.sum()), test_with_leaked_accuracy=with_all["accuracy"],
                   test_with_leaked_roc_auc=with_all["roc_auc"])
