"""Reproducible results tables: frozen (and fine-tuned) featx on the chest X-ray test set next to published
figures, flowers5, and what each remedy for shift did on each dataset.

One command extracts every configuration (cached: a second run only re-fits heads), compares heads, and
writes the tables into docs/results/ (chest_xray.md, flowers5.md, remedies.md), each opening with the
command that regenerates it and the machine it ran on: the tables are generated, never edited by hand.
Every choice (hyper-parameters, decision threshold, the best configuration, each remedy's settings) is
made on a validation split carved from train (15 %, stratified, seeded) or on unlabelled test images; the
test images are scored once per configuration and never used to choose (asserted below).

Usage:
  python scripts/reproduce_chest_xray.py [--data ../shared/data/chest_xray] [--cache cache]
         [--checkpoint runs/ft-lite0/best.pt ...] [--flowers ../shared/data/flowers5]
         [--flowers-checkpoint runs/ft-flowers/best.pt ...] [--docs docs/results]
         [--only REGEX] [--no-chest]
"""

from __future__ import annotations

import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from datetime import date
from pathlib import Path

import click
import numpy as np

from featx.comparison.evaluate import compare
from featx.embed.extraction import ExtractConfig, extract
from featx.store.embeddings import concat_embeddings, load_embeddings

PUBLISHED = [
    ("Kermany et al. 2018, InceptionV3 fine-tuned", "92.8 %", "0.968"),
    ("fastai ResNet fine-tuned (seed notebook)", "92.9 %", ""),
    ("Keras ResNet-152, frozen base + dense head", "93.75 %", ""),
    ("Keras VGG16, frozen base + dense head", "90.06 %", ""),
]
HEADS = ["logreg", "svm", "lightgbm"]
README = Path(__file__).resolve().parents[1] / "README.md"
HEADLINE_BEGIN, HEADLINE_END = "<!-- results: written by scripts/reproduce_chest_xray.py -->", "<!-- end of results -->"
COPIES = {"fit": "full", "augment": 2, "aug": "xray"}  # whole image, two augmented copies of each train image


@dataclass
class Lever:
    name: str
    configs: list[ExtractConfig]
    threshold: str | None = None
    head_params: dict | None = None  # heads' settings fixed instead of tuned
    remedy: dict = field(default_factory=dict)  # compare's options against shift and leakage (no test labels)
    ensemble: bool = False  # each head fitted on every file and averaged (compare --ensemble): only that row shown
    remedy_of: str | None = None  # a remedy for shift: the name of the lever it is measured against ("" for none)
    extract_seconds: float = 0.0
    files: list[Path] = field(default_factory=list)


def remedies(against: str, found: list[Lever]) -> list[Lever]:
    """Marks levers as remedies for shift, each measured against the lever named ``against``."""
    for lever in found:
        lever.remedy_of = against
    return found


def levers(cache: str, checkpoints: tuple[str, ...]) -> list[Lever]:
    def cfg(**kw):
        return ExtractConfig(cache_dir=cache, **kw)

    found = [
        Lever("lite0 (baseline)", [cfg()]),
        Lever("lite0 + threshold for balanced accuracy on val", [cfg()], threshold="balanced_accuracy"),
        Lever("lite0, no class weights", [cfg()], head_params={
            "logreg": {"clf__class_weight": None}, "svm": {"clf__estimator__class_weight": None},
            "lightgbm": {"clf__class_weight": None}}),
        Lever("lite0, weak regularisation (logreg C=1, svm C=10, fixed)", [cfg()], head_params={
            "logreg": {"clf__C": 1.0}, "svm": {"clf__estimator__C": 10.0}, "lightgbm": {}}),
        Lever("lite1", [cfg(backbone="efficientnet_lite1")]),
        Lever("lite2", [cfg(backbone="efficientnet_lite2")]),
        Lever("lite0 at 288 px", [cfg(image_size=288)]),
        Lever("lite0 stages + penultimate", [cfg(layer="stages,penultimate")]),
        Lever("lite0 + flip TTA", [cfg(tta=True)]),
        Lever("lite0+lite1+lite2 concatenated", [cfg(), cfg(backbone="efficientnet_lite1"),
                                                 cfg(backbone="efficientnet_lite2")]),
        Lever("lite0, whole image (--fit full)", [cfg(fit="full")]),
        Lever("lite0 full + threshold", [cfg(fit="full")], threshold="balanced_accuracy"),
        Lever("lite0 full + 2 xray copies (--augment 2)", [cfg(**COPIES)]),
        Lever("lite0 full + copies + threshold", [cfg(**COPIES)], threshold="balanced_accuracy"),
        Lever("lite1 full + copies + threshold", [cfg(backbone="efficientnet_lite1", **COPIES)],
              threshold="balanced_accuracy"),
        Lever("lite2 full + copies + threshold", [cfg(backbone="efficientnet_lite2", **COPIES)],
              threshold="balanced_accuracy"),
        Lever("lite0+1+2 full + copies, concatenated, + threshold",
              [cfg(backbone=f"efficientnet_lite{i}", **COPIES) for i in range(3)], threshold="balanced_accuracy"),
    ]
    full = cfg(fit="full")
    found += remedies("lite0, whole image (--fit full)", [  # for the shift between train and test, no test label
        Lever("lite0 full, test without images leaked from train (cosine ≥ 0.943)", [full],
              remedy={"exclude_leaked": True, "duplicate_cosine": 0.943}),
        Lever("lite0 full + per-domain standardisation (--align standardize)", [full],
              remedy={"align": "standardize"}),
        Lever("lite0 full + CORAL (--align coral)", [full], remedy={"align": "coral"}),
        Lever("lite0 full + prior shift by EM (--prior-shift auto)", [full], remedy={"prior_shift": "auto"}),
        Lever("lite0 full + AdaBN (--adapt-bn)", [cfg(fit="full", adapt_bn=True)]),
        Lever("lite0 full + AdaBN + CORAL", [cfg(fit="full", adapt_bn=True)], remedy={"align": "coral"}),
        Lever("lite0 full + test's own threshold (--threshold mixture)", [full], threshold="mixture"),
        Lever("lite0 full + spread over 10 neighbours (--smooth-test 10)", [full], remedy={"smooth_test": 10}),
        Lever("lite0 full + --smooth-test 10 + --threshold mixture", [full], threshold="mixture",
              remedy={"smooth_test": 10}),
    ]) + remedies("lite0 full + 2 xray copies (--augment 2)", [
        Lever("lite0 full + copies + --threshold mixture", [cfg(**COPIES)], threshold="mixture"),
        Lever("lite0 full + copies + --smooth-test 10 + --threshold mixture", [cfg(**COPIES)], threshold="mixture",
              remedy={"smooth_test": 10}),
        Lever("lite0 full + copies + 4 xray views (--tta-views 4) + --smooth-test 10 + --threshold mixture",
              [cfg(tta_views=4, **COPIES)], threshold="mixture", remedy={"smooth_test": 10}),
    ]) + remedies("", [  # several backbones averaged: no single-file lever to measure against
        Lever("lite0+1+2 full + copies averaged (--ensemble) + --smooth-test 10 + --threshold mixture",
              [cfg(backbone=f"efficientnet_lite{i}", **COPIES) for i in range(3)], threshold="mixture",
              remedy={"smooth_test": 10}, ensemble=True),
        Lever("lite0+1+2 full + copies + 4 xray views averaged (--ensemble) + --smooth-test 10 + --threshold mixture",
              [cfg(backbone=f"efficientnet_lite{i}", tta_views=4, **COPIES) for i in range(3)], threshold="mixture",
              remedy={"smooth_test": 10}, ensemble=True),
    ])
    for path in checkpoints:
        name = f"fine-tuned {Path(path).parent.name}"
        frozen = f"{name}, frozen afterwards"
        found.append(Lever(frozen, [cfg(checkpoint=path)]))
        found.append(Lever(f"{name} + threshold on val", [cfg(checkpoint=path)], threshold="balanced_accuracy"))
        found += remedies(frozen, [
            Lever(f"{name} + AdaBN (--adapt-bn)", [cfg(checkpoint=path, adapt_bn=True)]),
            Lever(f"{name} + AdaBN + threshold on val", [cfg(checkpoint=path, adapt_bn=True)],
                  threshold="balanced_accuracy"),
            Lever(f"{name} + --align standardize", [cfg(checkpoint=path)], remedy={"align": "standardize"}),
            Lever(f"{name} + --align standardize + threshold on val", [cfg(checkpoint=path)],
                  threshold="balanced_accuracy", remedy={"align": "standardize"}),
            Lever(f"{name} + --threshold mixture", [cfg(checkpoint=path)], threshold="mixture"),
            Lever(f"{name} + --smooth-test 10 + --threshold mixture", [cfg(checkpoint=path)],
                  threshold="mixture", remedy={"smooth_test": 10}),
        ]) + remedies("", [
            Lever(f"lite0+1+2 full + copies and {name} averaged (--ensemble) + --smooth-test 10 + --threshold mixture",
                  [*(cfg(backbone=f"efficientnet_lite{i}", **COPIES) for i in range(3)), cfg(checkpoint=path)],
                  threshold="mixture", remedy={"smooth_test": 10}, ensemble=True),
        ])
    if len(checkpoints) > 1:
        found.append(Lever("fine-tuned checkpoints concatenated + threshold on val",
                           [cfg(checkpoint=path) for path in checkpoints], threshold="balanced_accuracy"))
        # runs of one recipe with several --seed values (one --val-seed): an ensemble over training seeds
        names = " + ".join(Path(path).parent.name for path in checkpoints)
        found += remedies("", [Lever(f"fine-tuned {names} averaged (--ensemble) + --smooth-test 10 + --threshold mixture",
                                     [cfg(checkpoint=path) for path in checkpoints], threshold="mixture",
                                     remedy={"smooth_test": 10}, ensemble=True)])
    return found


def inputs_of(lever: Lever) -> list:
    """The lever's embeddings: one file, several backbones' files side by side, or each (to be averaged)."""
    embeddings = [load_embeddings(f) for f in lever.files]
    return [concat_embeddings(embeddings)] if len(embeddings) > 1 and not lever.ensemble else embeddings


def compared(lever: Lever, embeddings: list, heads: list[str], seed: int):
    """compare as the lever says, and the rows it shows: every row, or for an ensemble the averaged ones."""
    board = compare(embeddings, heads, seed=seed, threshold=lever.threshold, head_params=lever.head_params,
                    ensemble=lever.ensemble, **lever.remedy)
    return [r for r in board.rows if not lever.ensemble or r["backbone"].endswith(" averaged")], board


def run_lever(lever: Lever, data: Path, seed: int = 0):
    for config in lever.configs:
        result = extract(data, config, progress=False)
        lever.files.append(result.path)
        lever.extract_seconds += load_embeddings(result.path).meta.get("extract_seconds", 0.0)
    rows, board = compared(lever, inputs_of(lever), HEADS, seed)
    for row in rows:  # nothing was chosen on test: tuning and thresholds come from train/val only
        assert row["tuned_on"] in ("validation split",) and "test" not in row["val_source"]
    if lever.remedy or lever.threshold == "mixture":
        # and the remedies read no test label: with the test labels shuffled, every choice is the same
        _, blind = compared(lever, [emb.with_labels(shuffled_test_labels(emb, seed)) for emb in inputs_of(lever)],
                            HEADS, seed)
        assert choices(blind) == choices(board), f"{lever.name}: a choice depended on the test labels"
    return rows, board


def shuffled_test_labels(emb, seed: int):
    labels = emb.labels_at().copy()
    test = emb.rows("test")
    labels[test] = np.random.default_rng(seed).permutation(labels[test])
    return labels


def choices(board) -> dict:
    """Everything compare chose: hyper-parameters, thresholds (validation's and test's own), prior-shift decisions,
    alignment, leaked rows."""
    picked = {(r["file"], r["head"]): (r["params"], r["threshold"], r.get("remedies"), r.get("test_leaked_rows"))
              for r in board.rows}
    return {"rows": picked, "remedies": board.settings.get("remedies")}


def pneumonia(board, row) -> dict:
    return board.result_of(row).test["per_class"]["PNEUMONIA"]


LEGEND = ("Every choice (head hyper-parameters, decision threshold, every remedy's settings) is made on a "
          "validation split carved from train (15 %, stratified, seed 0) or on unlabelled test images; the test "
          "images are scored once per configuration. \"shift AUC\" is the audit's train → test two-sample AUC of "
          "the file (0.5: alike), and after aligning where aligned; \"extract s\" is the extraction time recorded "
          "in the cache file, from when it was extracted (by this run or an earlier one).")


def table(results) -> str:
    """The chest X-ray rows: one per configuration × head."""
    lines = ["| configuration | head | val bal. acc | test acc | test bal. acc | PNEUMONIA P / R / F1 | test AUC [95 % CI] "
             "| shift AUC | extract s | head fit s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for lever, rows, board in results:
        for row in rows:
            p = pneumonia(board, row)
            ci = row["test_roc_auc_ci"]
            lines.append(
                f"| {lever.name} | {row['head']} | {row['val_balanced_accuracy']:.4f} | {row['test_accuracy']:.2%} | "
                f"{row['test_balanced_accuracy']:.4f} | {p['precision']:.3f} / {p['recall']:.3f} / {p['f1']:.3f} | "
                f"{row['test_roc_auc']:.4f} [{ci[0]:.3f}, {ci[1]:.3f}] | {shift_score(board, row)} | "
                f"{lever.extract_seconds:.0f} | {row['fit_s']:.1f} |")
    return "\n".join(lines)


def picked(rows: list[dict]) -> dict:
    """The row a user would keep: the best by validation balanced accuracy (never by test)."""
    return max(rows, key=lambda r: r["val_balanced_accuracy"])


def remedy_tables(datasets: dict) -> list[str]:
    """Per dataset: what each remedy did to the validation-picked head's test figures, then every row."""
    parts = [LEGEND, "",
             "Each remedy is measured against the same configuration without it; the figures are those of the head "
             "validation picks in each. A remedy that lowers test accuracy on any dataset is an option to measure "
             "on your own data, not advice."]
    for name, (results, rows_table) in datasets.items():
        remedies_run = [r for r in results if r[0].remedy_of is not None]
        if not remedies_run:
            continue
        by_name = {lever.name: rows for lever, rows, _ in results}
        lines = ["| remedy | measured against | test acc (picked head) | Δ test acc | test AUC | Δ test AUC |",
                 "|---|---|---|---|---|---|"]
        for lever, rows, _ in remedies_run:
            with_it, base = picked(rows), by_name.get(lever.remedy_of)
            if base:
                without = picked(base)
                delta = (f"{100 * (with_it['test_accuracy'] - without['test_accuracy']):+.2f} points",
                         f"{with_it['test_roc_auc'] - without['test_roc_auc']:+.4f}")
                against = f"{lever.remedy_of} ({without['test_accuracy']:.2%}, {without['test_roc_auc']:.4f})"
            else:
                delta, against = ("", ""), "—"
            lines.append(f"| {lever.name} | {against} | {with_it['head']} {with_it['test_accuracy']:.2%} | {delta[0]} | "
                         f"{with_it['test_roc_auc']:.4f} | {delta[1]} |")
        parts += ["", f"## {name}", "", *lines, "", f"### {name}: every row", "", rows_table(remedies_run)]
    return parts


def shift_score(board, row) -> str:
    """The train → test two-sample AUC of the row's file (0.5: alike), and after alignment where it was aligned;
    for heads averaged over files (``--ensemble``), the largest of the files'."""
    config = board.settings
    shifts = config.get("shift") or {}
    overall = [s.get("tests", {}).get("overall", {}).get("auc") for f, s in shifts.items()
               if f == row["file"] or row["backbone"].endswith(" averaged")]
    before = max((auc for auc in overall if auc is not None), default=None)
    after = (config.get("remedies") or {}).get(row["file"], {}).get("align", {}).get("shift_auc_after")
    if before is None:
        return ""
    return f"{before:.3f}" + (f" → {after:.3f}" if after is not None else "")


@click.command()
@click.option("--data", default="../shared/data/chest_xray", show_default=True,
              type=click.Path(exists=True, path_type=Path), help="The chest X-ray set: its table goes to "
              "DOCS/chest_xray.md, its remedy rows to DOCS/remedies.md.")
@click.option("--cache", default="cache", show_default=True,
              help="The embedding cache: configurations cached there are not extracted again.")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A fine-tuned best.pt to add (repeatable); rows are named after its run folder. Several "
                   "are also compared side by side and averaged (runs of one recipe over seeds).")
@click.option("--flowers", type=click.Path(exists=True, path_type=Path),
              help="Also flowers5 (e.g. ../shared/data/flowers5): its table goes to DOCS/flowers5.md, its remedy "
                   "rows to DOCS/remedies.md.")
@click.option("--fashion", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Also a Fashion-MNIST subset made by scripts/make_fashion_mnist.py (no shift: each remedy must do no "
                   "harm): its table goes to DOCS/fashion_mnist.md, its remedy rows to DOCS/remedies.md.")
@click.option("--docs", default="docs/results", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the tables are written (chest_xray.md, flowers5.md, remedies.md). A dataset that does not "
                   "run leaves its own table as it was; remedies.md holds the datasets of the last run.")
@click.option("--only", metavar="REGEX", help="Only the configurations whose name matches REGEX, e.g. 'AdaBN|--align' "
              "(with, for a remedy, the configuration it is measured against).")
@click.option("--flowers-checkpoint", "flower_checkpoints", multiple=True,
              type=click.Path(exists=True, dir_okay=False), help="A best.pt fine-tuned on flowers5 to add (repeatable).")
@click.option("--no-chest", is_flag=True, help="Skip the chest X-ray set (with --flowers: only flowers5's tables).")
def main(data, cache, checkpoints, flowers, fashion, flower_checkpoints, docs, only, no_chest):
    """Extract, compare and write featx's results tables into docs/results/ (and README.md's short table when
    both datasets run), every choice made without test labels. Each opens with this command and the machine."""
    began = time.perf_counter()
    docs.mkdir(parents=True, exist_ok=True)

    def measure(found, images, page, title, tables):
        """Runs one dataset's levers and writes its page at once, so a long run keeps what it finished."""
        results = run_levers(selected(found, only), images)
        plain = [r for r in results if r[0].remedy_of is None]
        if plain:
            write(docs / page, provenance(time.perf_counter() - began), title, tables(plain))
        return results

    chest = [] if no_chest else measure(levers(cache, checkpoints), data, "chest_xray.md",
                                        "Chest X-ray (Kermany et al. 2018 test set, 624 images)", chest_tables)
    flower = measure(flower_levers(cache, flower_checkpoints), flowers, "flowers5.md",
                     "flowers5 (featx's own stratified 70/15/15 split, seed 0)",
                     lambda plain: [LEGEND, "", multiclass_table(plain)]) if flowers else []
    fashion_results = measure(fashion_levers(cache), fashion, "fashion_mnist.md",
                              "Fashion-MNIST (a stratified subset, scripts/make_fashion_mnist.py)",
                              lambda plain: [LEGEND, "", multiclass_table(plain)]) if fashion else []
    header = provenance(time.perf_counter() - began)
    if any(r[0].remedy_of is not None for r in chest + flower + fashion_results):
        write(docs / "remedies.md", header, "Remedies for shift, measured on every dataset at hand",
              remedy_tables({"chest X-ray": (chest, table), "flowers5": (flower, multiclass_table),
                             "Fashion-MNIST": (fashion_results, multiclass_table)}))
    if chest and flower:
        pages = {"chest X-ray": (chest, "chest_xray.md"), "flowers5": (flower, "flowers5.md"),
                 "Fashion-MNIST": (fashion_results, "fashion_mnist.md")}
        write_headline(README, header, {name: page for name, page in pages.items() if page[0]})
    else:
        print("README.md's results left as they were: they are written when both datasets run")


def write_headline(readme: Path, header: list[str], datasets: dict) -> None:
    """README's short results table, between its two markers: per dataset the frozen baseline, the fine-tuned
    backbone where a checkpoint ran, and the best configuration by validation, each with its picked head."""
    lines = ["| dataset | configuration, head picked on validation | test accuracy | test AUC | every row |",
             "|---|---|---|---|---|"]
    for name, (results, page) in datasets.items():
        plain = [(lever, picked(rows)) for lever, rows, _ in results if lever.remedy_of is None]
        best = max(plain, key=lambda pair: pair[1]["val_balanced_accuracy"])
        shown = [plain[0], *(p for p in plain if p[0].name.endswith("frozen afterwards")), best]
        for lever, row in dict((p[0].name, p) for p in shown).values():
            tag = " (best by validation)" if lever is best[0] else ""
            lines.append(f"| {name} | {lever.name}{tag}, {row['head']} | {row['test_accuracy']:.2%} | "
                         f"{row['test_roc_auc']:.4f} | [{page}](docs/results/{page}) |")
    text = readme.read_text()
    start, end = text.index(HEADLINE_BEGIN) + len(HEADLINE_BEGIN), text.index(HEADLINE_END)
    block = "\n".join(["", *header, "", *lines, ""])
    readme.write_text(text[:start] + block + text[end:])
    print(f"wrote {readme}'s results", flush=True)


def selected(found: list[Lever], only: str | None) -> list[Lever]:
    """The levers whose name matches ``only``, and for each remedy the lever it is measured against."""
    if not only:
        return found
    wanted = {lever.name for lever in found if re.search(only, lever.name)}
    wanted |= {lever.remedy_of for lever in found if lever.name in wanted and lever.remedy_of}
    return [lever for lever in found if lever.name in wanted]


def run_levers(found: list[Lever], data: Path) -> list:
    results = []
    for lever in found:
        rows, board = run_lever(lever, data)
        results.append((lever, rows, board))
        say_best(lever, rows)
    return results


def provenance(seconds: float) -> list[str]:
    """The opening lines of every table file: the command that regenerates it and the machine it ran on."""
    import torch

    from featx.embed.hardware import cpu_model
    from featx.version import __version__

    command = " ".join(["python scripts/reproduce_chest_xray.py", *map(shlex.quote, sys.argv[1:])])
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return [f"Generated by `{command}` on {date.today().isoformat()}; do not edit by hand.",
            f"Machine: {cpu_model()}, {os.cpu_count()} cores, {gpu}; featx {__version__}, torch {torch.__version__}; "
            f"{seconds:.0f} s in all."]


def write(path: Path, header: list[str], title: str, parts: list[str]) -> None:
    path.write_text("\n".join([f"# {title}", "", *header, "", *parts]).rstrip() + "\n")
    print(f"wrote {path}", flush=True)


def say_best(lever: Lever, rows: list[dict]) -> None:
    best = picked(rows)
    print(f"{lever.name}: best by val {best['head']} → test accuracy {best['test_accuracy']:.2%}, "
          f"AUC {best['test_roc_auc']:.4f}", flush=True)


def no_harm_levers(cfg) -> list[Lever]:
    """lite0 and each remedy for shift on it: where there is little or no shift, a remedy must do no harm."""
    lite0 = cfg()
    return [Lever("lite0", [lite0])] + remedies("lite0", [
        Lever("lite0, test without images leaked from train (cosine ≥ 0.88)", [lite0], remedy={"exclude_leaked": True}),
        Lever("lite0 + --align standardize", [lite0], remedy={"align": "standardize"}),
        Lever("lite0 + --align coral", [lite0], remedy={"align": "coral"}),
        Lever("lite0 + --prior-shift auto", [lite0], remedy={"prior_shift": "auto"}),
        Lever("lite0 + AdaBN (--adapt-bn)", [cfg(adapt_bn=True)]),
        Lever("lite0 + --smooth-test 10", [lite0], remedy={"smooth_test": 10}),
        Lever("lite0 + 4 natural views (--tta-views 4)", [cfg(tta_views=4)]),
    ])


def fashion_levers(cache: str) -> list[Lever]:
    return no_harm_levers(partial(ExtractConfig, cache_dir=cache))


def flower_levers(cache: str, checkpoints: tuple[str, ...]) -> list[Lever]:
    def cfg(**kw):
        return ExtractConfig(cache_dir=cache, **kw)

    baseline, *remedy_levers = no_harm_levers(cfg)
    found = [
        baseline,
        Lever("lite1", [cfg(backbone="efficientnet_lite1")]),
        Lever("lite0 stages + penultimate", [cfg(layer="stages,penultimate")]),
        Lever("lite0 + 2 natural copies (--augment 2)", [cfg(augment=2, aug="natural")]),
        *remedy_levers,
    ]
    for path in checkpoints:  # as on the chest X-rays, less the two-class cut
        name = f"fine-tuned {Path(path).parent.name}"
        found.append(Lever(f"{name}, frozen afterwards", [cfg(checkpoint=path)]))
        found += remedies(f"{name}, frozen afterwards", [
            Lever(f"{name} + --smooth-test 10", [cfg(checkpoint=path)], remedy={"smooth_test": 10})])
        found += remedies("", [Lever(f"lite0+1+2 and {name} averaged (--ensemble) + --smooth-test 10",
                                     [*(cfg(backbone=f"efficientnet_lite{i}") for i in range(3)), cfg(checkpoint=path)],
                                     remedy={"smooth_test": 10}, ensemble=True)])
    return found


def chest_tables(results) -> list[str]:
    """The chest X-ray table, the best configuration by validation repeated with 3 seeds, and published figures."""
    lever, row = max(((lv, r) for lv, rows, _ in results for r in rows), key=lambda t: t[1]["val_balanced_accuracy"])
    seeds, optimistic = [], []
    for seed in (0, 1, 2):
        rows_of_seed, board = compared(lever, inputs_of(lever), [row["head"]], seed)
        first = rows_of_seed[0]
        seeds.append((first["test_accuracy"], first["test_roc_auc"], first["test_f1_macro"]))
        for leaked in board.settings.get("validation_trained_on", {}).values():
            optimistic.append(f"seed {seed}: {leaked['images']} of {leaked['of']}")
    acc, auc, f1 = zip(*seeds)
    summary = (f"Best configuration by validation balanced accuracy: **{lever.name} + {row['head']}**; over seeds 0, 1, 2 "
               f"(validation carve and head): test accuracy {statistics.mean(acc):.2%} ± {statistics.stdev(acc):.2%}, "
               f"AUC {statistics.mean(auc):.4f} ± {statistics.stdev(auc):.4f}, macro F1 {statistics.mean(f1):.4f} ± "
               f"{statistics.stdev(f1):.4f}.")
    if optimistic:  # a checkpoint fine-tuned with one seed held out only that seed's validation images
        summary += (" Its validation images include images its fine-tuned backbone trained on ("
                    + "; ".join(dict.fromkeys(optimistic))
                    + "), so those seeds' choices are optimistic; their test figures are still held out.")
    published = "\n".join(["| published | test accuracy | AUC |", "|---|---|---|"] +
                          [f"| {n} | {a} | {u} |" for n, a, u in PUBLISHED])
    return [LEGEND, "", table(results), "", summary, "", "Published figures on the same 624 test images:", "",
            published]


def multiclass_table(results) -> str:
    lines = ["| configuration | head | val bal. acc | test acc | test macro F1 | test AUC (OvR) | shift AUC | extract s |",
             "|---|---|---|---|---|---|---|---|"]
    for lever, rows, board in results:
        for row in rows:
            lines.append(f"| {lever.name} | {row['head']} | {row['val_balanced_accuracy']:.4f} | "
                         f"{row['test_accuracy']:.2%} | {row['test_f1_macro']:.4f} | {row['test_roc_auc']:.4f} | "
                         f"{shift_score(board, row)} | {lever.extract_seconds:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
