"""How a comparison runs: ``CompareConfig``, one field per option of ``featx compare`` and ``featx train``.

Each field declares its default, its constraint (``vocab.PARAMETERS``, by name) and its help text; the
command-line options are made from the fields (``featx.cli.options.config_options``), so a new option is one
field. Options of remedies registered from outside featx go in ``remedies``, by parameter name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from featx.errors import ConfigError
from featx.vocab import check, check_fields, setting, shared_setting


@dataclass(frozen=True)
class CompareConfig:
    cv: int | None = setting(None, "Tune by stratified K-fold CV on train instead of on the validation split.")
    seed: int = setting(0, "Seed for the carved validation split, CV folds and the heads.")
    threshold: str | None = setting(
        None, "Binary tasks: choose the decision threshold on validation for balanced_accuracy, f1 or "
              "sensitivity=0.95; or (mixture) cut the test images' own scores where they part into two groups (no "
              "test labels read), where the same rule on validation costs at most 0.02 of balanced accuracy, else "
              "validation's balanced_accuracy threshold.", metavar="OBJECTIVE")
    val_fraction: float = shared_setting("val_fraction", 0.15)
    sort_by: str = setting("balanced_accuracy", "Validation metric that ranks the leaderboard.")
    max_train_rows: int | None = setting(None, "Train on a stratified, seeded sample of N training rows (recorded in "
                                               "run.json).", metavar="N")
    cluster: str | None = shared_setting("cluster", None)
    out_of_core: bool = setting(False, "With --cluster: train the lightgbm head over the file on the workers, for "
                                       "training rows that do not fit in this machine's memory.")
    exclude_leaked: bool = setting(False, "Score test without its images that have a near-duplicate among train and "
                                          "val (cosine of embeddings ≥ --duplicate-cosine); the figures with them are "
                                          "reported too.")
    duplicate_cosine: float | None = setting(
        None, "Near-duplicate threshold for --exclude-leaked [default: 0.88, measured on photos; `featx audit` "
              "suggests one for alike images such as X-rays].", metavar="COSINE")
    align: str = setting("none", "Map train and val features towards the test images before fitting (no test labels "
                                 "read): per-dimension moments (standardize) or covariance too (coral).")
    prior_shift: str = setting("off", "The test images' class balance by EM on each head's probabilities: report it "
                                      "(estimate), or also re-weight to it where a simulated change on validation "
                                      "helps (auto).")
    smooth_test: int = setting(0, "Spread each scored split's probabilities over its K nearest images of the same "
                                  "split (cosine; label spreading, no labels read): alike images get alike scores. Val "
                                  "is smoothed too, so the threshold is chosen on scores like the test ones. 0: off. "
                                  "Not reproducible by predict image by image.", metavar="K")
    concat: bool = setting(False, "Also compare all files' features side by side (several backbones of the same "
                                  "images) as one more input.")
    ensemble: bool = setting(False, "Also average each head over the files (several backbones of the same images) in "
                                    "logit space, as one more row per head; --smooth-test finds its neighbours in all "
                                    "the files' features.")
    head_params: dict = setting({}, "Pipeline parameters fixed instead of tuned, by head: "
                                    "{'logreg': {'clf__class_weight': None}}.", cli=False)
    remedies: dict = setting({}, "Options of remedies registered from outside featx, by parameter name.", cli=False)

    def __post_init__(self):
        from featx.shift.remedies import remedy_parameters  # the remedies load scikit-learn: not for `--help`

        check_fields(self, "compare")
        unknown = sorted(set(self.remedies) - set(remedy_parameters()))
        if unknown:
            raise ConfigError(f"compare has no option {', '.join(map(repr, unknown))}; the registered remedies take "
                              f"{', '.join(remedy_parameters())}")
        check("compare", **self.remedies)

    @classmethod
    def from_options(cls, **options) -> CompareConfig:
        """Keyword options as ``compare`` takes them: fields by name, and registered remedies' parameters."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = {k: options.pop(k) for k in list(options) if k not in names}
        return cls(**{**options, "remedies": {**options.get("remedies", {}), **extra}})

    def options(self) -> dict:
        """Every option by name, registered remedies' too: what the remedies read."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "remedies"}
        return {**values, **self.remedies}

    def changed(self) -> dict:
        """The options that differ from their defaults, as run.json records them (so earlier folders read the same)."""
        defaults = CompareConfig().options()
        return {k: v for k, v in self.options().items() if v != defaults.get(k)}
