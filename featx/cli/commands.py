"""The ``featx`` command line: parse options, call one library function, print the outcome.

Library errors (``FeatxError``) become ``featx: error: …`` on one line with exit code 2 for
bad input or usage and 1 for failed work. torch is imported only inside the commands that
need it, so ``featx --help`` and the cache commands start fast.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
from pathlib import Path

import click

from featx.cli import options
from featx.comparison.config import CompareConfig
from featx.embed.planning import ExtractConfig
from featx.finetuning.config import FinetuneConfig
from featx.embed.backbones import BACKBONES, DEFAULT_BACKBONE, get_backbone
from featx.errors import DataError, FeatxError
from featx.version import __version__


# Control characters (and bidirectional overrides) a file name may hold: shown as \xNN, \uNNNN, never sent to the
# terminal, where an escape sequence would retitle or recolour it and a bidi override would disguise a name.
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in (*range(32), *range(127, 160)) if chr(c) not in "\n\t"}
_UNPRINTABLE |= {c: f"\\u{c:04x}" for c in (0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def printable(text: str) -> str:
    """``text`` as it may reach a terminal: names that are not UTF-8 with their odd bytes as ``\\xNN``, control
    characters escaped (newlines and tabs kept: featx's own messages use them)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").translate(_UNPRINTABLE)


def echo(message: str = "", err: bool = False) -> None:
    """``click.echo`` of text that may hold user-supplied names (``printable``)."""
    click.echo(printable(message), err=err)


class _PrintableFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


class FeatxGroup(click.Group):
    """Turns library errors, and the system's (a folder without permission, a full disk), into one line and an
    exit code; keeps tracebacks for real bugs."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FeatxError as err:
            echo(f"featx: error: {err}", err=True)
            ctx.exit(err.exit_code)
        except OSError as err:
            if err.filename is None:
                raise
            echo(f"featx: error: {os.fsdecode(err.filename)}: {err.strerror}", err=True)
            ctx.exit(1)


@click.group(cls=FeatxGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="featx")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Transfer learning the cheap way first: pretrained CNNs run once as frozen feature
    extractors, embeddings are cached in HDF5, and light heads are trained on top.

    \b
    Typical session:
      featx demo                                # the bundled sample, end to end
      featx advise data/chest_xray              # which strategy, and why
      featx extract data/chest_xray             # embeddings into cache/chest_xray/
      featx audit cache/chest_xray/*.h5         # shift between splits, leaked duplicates
      featx compare cache/chest_xray/*.h5 --out runs/xray
      featx report runs/xray                    # runs/xray/report.html
      featx predict runs/xray new_images/       # top-3 classes, or unknown
      featx finetune data/chest_xray --unfreeze 2 --out runs/ft
      featx doctor runs/xray                    # is everything sound? what to do if not
    """
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("featx: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("featx").setLevel(level)
    ctx.obj = {"progress": not quiet and sys.stderr.isatty()}
    atexit.register(gc.freeze)  # a process that loaded torch would spend ~1 s at exit collecting its objects


@main.command()
@click.argument("data_dir", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--sample", is_flag=True, help="Use the chest X-ray sample bundled with featx instead of DATA_DIR.")
@options.backbone(multiple=True)
@options.config_options(ExtractConfig)
@options.option("split", metavar="TRAIN,VAL,TEST",
                help="Fractions for a stratified split when the data has none (default 0.7,0.15,0.15).")
@options.seed("Seed of the stratified split.")
@click.option("--split-from", type=click.Path(exists=True, path_type=Path),
              help="CSV with path,split columns giving each image's split.")
@options.option("split_by", default="shuffle", show_default=True,
                help="How that split is drawn: shuffle (each class shuffled with --seed and cut at the fractions: "
                     "exact shares) or path (each image by a seeded hash of its class and relative path: images "
                     "added later never move one already split; shares vary by a few points).")
@click.option("--verify-content", is_flag=True,
              help="Hash every file again for the dataset's fingerprint instead of trusting the hashes remembered "
                   "while files keep their sizes, modification and change times.")
@click.option("--allow-outside-root", is_flag=True, help="Accept CSV paths that resolve outside the CSV's folder.")
@click.option("--force", is_flag=True, help="Extract again even if the file is cached (or damaged).")
@options.cluster
@options.option("shard_rows", metavar="N", help="Rows per shard with --cluster (default: shards of up to a minute "
                                                "of one worker's work that shrink to a few seconds' towards the end; "
                                                "a re-run keeps the shards the first run planned).")
@click.pass_context
def extract(ctx, data_dir, sample, backbones, split, seed, split_from, split_by, verify_content, allow_outside_root,
            force, cluster, shard_rows, **recipe):
    """Embed every image under DATA_DIR (class folders, train/val/test folders, or a CSV
    of path,label[,split[,group]]) with each backbone, into the HDF5 cache.

    Runs once: a second call with nothing changed returns the cached file at once, and an
    interrupted run resumes where it stopped. Unreadable images are recorded and skipped.
    """
    from featx.cluster import cluster_address
    from featx.data.datasets import scan_dataset
    from featx.embed.planning import cached_result, plan_extraction
    from featx.data.sample import sample_path

    if sample == (data_dir is not None):
        raise click.UsageError("give either DATA_DIR or --sample")
    source = sample_path() if sample else data_dir
    dataset = scan_dataset(source, split=split, seed=seed, split_from=split_from, split_by=split_by,
                           allow_outside_root=allow_outside_root, verify_content=verify_content)
    summary = ", ".join(f"{name} {sum(c.values())}" for name, c in dataset.counts().items())
    echo(f"{dataset.name}: {len(dataset)} images, {len(dataset.classes)} classes ({summary}); "
               f"split: {dataset.split_source}")
    _list_some(f"{dataset.name}: {len(dataset.skipped)} entries left out of the scan (recorded in the file's "
               "'scan_skipped'):", dataset.skipped)
    if recipe["checkpoint"] and backbones != (DEFAULT_BACKBONE,):
        raise click.UsageError("--checkpoint sets the backbone; drop --backbone")
    address = cluster_address(cluster)
    if shard_rows and not address:
        raise click.UsageError("--shard-rows needs --cluster")
    for name in backbones:
        config = ExtractConfig(backbone=name, **recipe)
        try:
            if address:
                from featx.embed.shards import extract_on_cluster

                result = extract_on_cluster(dataset, config, address, shard_rows=shard_rows,
                                            progress=ctx.obj["progress"], force=force)
            else:  # the plan and a cache hit need no torch: the model side is imported only for work to do
                plan = plan_extraction(dataset, config)
                result = None if force else cached_result(plan.path, plan.key)
                if result is None:
                    from featx.embed.extraction import extract_planned

                    result = extract_planned(plan, progress=ctx.obj["progress"], force=force)
        except KeyboardInterrupt:
            echo("featx: interrupted; run the same command again to resume", err=True)
            ctx.exit(1)
        name = result.label
        if result.cached:
            echo(f"{name}: cached {result.path} ({result.rows} rows), nothing to do")
            continue
        resumed = f", resumed at row {result.resumed_from}" if result.resumed_from else ""
        reused = (f"; {result.reused} rows reused from earlier files, {result.rows - result.reused - result.resumed_from}"
                  " embedded" if result.reused else "")
        echo(f"{name}: wrote {result.path} ({result.rows} rows in {result.seconds:.1f} s, "
             f"{result.images_per_second:.1f} img/s{resumed}{reused})")
        _list_some(f"{name}: {len(result.failed)} unreadable images skipped (recorded in 'errors'):", result.failed,
                   f"see `featx info {result.path}`")


def _list_some(title: str, items: list[tuple[str, str]], more: str = "") -> None:
    """A count and the first ten (path, reason) pairs on stderr; nothing when there are none."""
    if not items:
        return
    echo(title, err=True)
    for path, reason in items[:10]:
        echo(f"  {path}: {reason}", err=True)
    if len(items) > 10:
        echo(f"  … and {len(items) - 10} more{'; ' + more if more else ''}", err=True)


@main.command(name="ls")
@click.argument("cache_dir", default="cache", type=click.Path(path_type=Path))
def list_cache(cache_dir):
    """List the embedding files under CACHE_DIR: dataset, backbone, rows, dim, size, complete (or superseded by a
    newer file of the same dataset and recipe: `featx prune` removes those), how each was made (input size and fit,
    augmented copies, AdaBN, TTA and test-time views, the fine-tuned checkpoint it came from)."""
    from featx.store.embeddings import list_cache as entries_of
    from featx.store.prune import superseded

    if not cache_dir.is_dir():
        raise DataError(f"{cache_dir}: no such folder")
    entries = entries_of(cache_dir)
    newer = {str(old): new.name for old, new in superseded(cache_dir).items()}
    if not entries:
        echo(f"{cache_dir}: no embedding files")
        return
    rows = [("dataset", "backbone", "rows", "dim", "MB", "complete", "path", "made with")]
    for e in entries:
        if "problem" in e:
            rows.append(("?", "?", "", "", f"{e['size_mb']:.1f}", "unreadable", e["path"], ""))
            continue
        state = "yes" if e["complete"] else f"no ({e['rows_done']}/{e['rows']})"
        if e["path"] in newer:
            state = f"yes, superseded by {newer[e['path']]}"
        if not e["complete"] and e["resumes_at"] < e["rows_done"]:
            state = f"damaged after row {e['resumes_at']} (resumes there)"
        rows.append((e["dataset"], e["backbone"], str(e["rows"]), str(e["dim"]), f"{e['size_mb']:.1f}", state,
                     e["path"], e["made_with"]))
    echo(_table(rows))


@main.command()
@click.argument("cache_dir", default="cache", type=click.Path(path_type=Path))
@click.option("--yes", is_flag=True, help="Remove them; without it, only say what would go.")
@click.option("--runs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A run folder, or a folder of them, whose embedding files to keep besides the runs featx "
                   "registered (runs saved before featx 0.6). Repeatable.")
def prune(cache_dir, yes, runs):
    """Say what under CACHE_DIR is no longer needed, and the space it takes: files superseded by a newer file of
    the same dataset and recipe, unfinished files of superseded extractions, shards no file reads, records of run
    folders that are gone, memo entries of files that changed. Removes them with --yes. A file a run folder still
    uses is kept."""
    from featx.store.prune import plan_prune, prune as remove

    found = plan_prune(cache_dir, list(runs))
    if yes:
        remove(found)
    verb = "removed" if yes else "would remove"
    for removal in found.removals:
        echo(f"{verb} {removal.path} ({removal.size / 1e6:.1f} MB): {removal.why}")
    for path, why in found.kept:
        echo(f"kept {path}: {why}")
    if found.memo:
        echo(f"{'forgot' if yes else 'would forget'} {len(found.memo)} memo entries of files that are gone or changed")
    if not found.removals and not found.memo:
        echo(f"{cache_dir}: nothing to prune")
    else:
        echo(f"{'freed' if yes else 'would free'} {found.size / 1e6:.1f} MB" + ("" if yes else
             "; run again with --yes to remove"))


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--from", "source", default="train", show_default=True, help="The split the heads learn from.")
@click.option("--to", "target", default="test", show_default=True, help="The split whose figures are in question.")
@options.option("duplicate_cosine", default=0.88, show_default=True, metavar="COSINE",
                help="Cosine similarity of embeddings from which two images count as near-duplicates.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for duplicates.csv (every pair), label_issues.csv and audit.json.")
@click.option("--images/--no-images", default=True, show_default=True,
              help="Where the dataset is at hand: find identical files (SHA-256) and check the closest pairs by a "
                   "perceptual hash, whose confirming distance is calibrated on 200 of the images drawn at random.")
@options.seed("Seed of the balanced samples, folds and permutations, and of the images the hash is calibrated on.")
def audit(file, source, target, duplicate_cosine, out, images, seed):
    """Check an embedding file for what makes figures optimistic: shift between two splits (can a
    classifier tell them apart? within each class too), near-duplicate images leaked across splits,
    likely label errors and outliers. Reads the cached embeddings, and the image files where they are at
    hand (--no-images to skip): seconds, no torch."""
    from featx.shift.audit import HASH_SIZE, SHIFT_AUC, SHIFT_P, audit as run_audit
    from featx.store.embeddings import load_embeddings

    found = run_audit(load_embeddings(file), source, target, duplicate_cosine=duplicate_cosine, seed=seed,
                      images=images)
    report, emb = found.shift, found.embeddings
    test = report.overall
    echo(f"shift {source} → {target}: AUC {test.auc:.3f} (p = {test.p_value:.3f}, {test.n} rows a side; "
         "0.5 = alike)")
    for name, per_class in report.per_class.items():
        echo(f"  within {name}: AUC {per_class.auc:.3f} (p = {per_class.p_value:.3f}, {per_class.n} rows a side)")
    if report.shifted:
        echo(f"featx: warning: {target} differs from {source} (AUC > {SHIFT_AUC}, p ≤ {SHIFT_P}): figures measured "
             f"on validation carved from {source} are likely optimistic for {target}", err=True)
        echo(f"  least like {source}: " + ", ".join(report.least_alike_paths[:5]))
        echo(f"  the lever to try is fine-tuning: `featx advise {emb.meta.get('dataset_root') or 'DATA_DIR'}` measures "
             "how far the images are from ImageNet. No option that adapts to the test images without their labels "
             "helped on every dataset it was measured on (docs/results/remedies.md)")
    echo(f"near-duplicates (cosine ≥ {duplicate_cosine}): {len(found.pairs)} pairs; {len(found.leaked)} {target} "
         f"images have one in {source}")
    hashes = found.hashes
    if hashes and hashes.distances:
        rate = hashes.false_positive_rate
        calibration = "" if not hashes.random_pairs else (
            f"; {'none' if rate == 0 else f'{rate:.2%}'} of {hashes.random_pairs:,} random pairs of these images")
        echo(f"  confirmed by perceptual hash (≤ {hashes.same_image_bits} of {HASH_SIZE ** 2} bits differ"
             f"{calibration}): {hashes.confirmed} of the {len(hashes.distances)} closest pairs; "
             f"{len(found.leaked_and_confirmed)} of the {len(found.leaked)} {target} images")
    if found.exact:
        echo(f"identical files: {len(found.exact)} groups, {sum(map(len, found.exact))} rows")
    suggested = found.threshold_too_low
    if suggested:
        echo(f"featx: warning: more pairs than images: these images are alike in general, and cosine "
             f"{duplicate_cosine} (measured on photos) is too low for them; try --duplicate-cosine {suggested}",
             err=True)
    for pair in sorted(found.pairs, key=lambda p: -p.cosine)[:5]:
        echo(f"  {emb.paths[pair.first]} ({emb.splits[pair.first]}) ~ {emb.paths[pair.second]} "
             f"({emb.splits[pair.second]}): {pair.cosine:.3f}")
    echo(f"likely label errors in {source}: {len(found.issues)} rows (out-of-fold probabilities, confident learning)")
    for issue in found.issues[:5]:
        echo(f"  {emb.paths[issue.row]}: labelled {emb.classes[issue.given]} (p {issue.p_given:.2f}), looks "
             f"{emb.classes[issue.suggested]} (p {issue.p_suggested:.2f})")
    echo(f"least like any class in {source}: " + ", ".join(f"{emb.paths[row]} ({distance:.2f})"
                                                           for row, distance in found.far[:3]))
    if out:
        found.save(out)
        echo(f"wrote {out / 'duplicates.csv'}, {out / 'label_issues.csv'} and {out / 'audit.json'}")


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--full", is_flag=True, help="Print long lists in the metadata (e.g. a fine-tuned backbone's "
              "validation images) whole instead of counting them.")
def info(file, full):
    """Show how an embedding file was made and what is in it (splits, classes, failures)."""
    import numpy as np

    from featx.store.embeddings import AUGMENTED, load_embeddings, read_meta

    meta = read_meta(file)
    skip = {"recipe", "config", "n_rows", "dim", "classes", "shards"}
    echo(f"{file}")
    echo(f"  rows × dim: {meta['n_rows']} × {meta['dim']}")
    for key in sorted(k for k in meta if k not in skip):
        echo(f"  {key}: {meta[key] if full else _brief(meta[key])}")
    if not meta["complete"]:
        echo(f"  incomplete: {meta['rows_done']} of {meta['n_rows']} rows; run `featx extract` again to resume")
        return
    if meta.get("shards"):
        echo(f"  {len(meta['shards'])} shards (a virtual file over {file.name.removesuffix('.h5')}.shards/; "
             "`featx consolidate` makes it one file):")
        rows = [("shard", "rows", "seconds", "img/s", "worker")]
        rows += [(s["file"], f"{s['rows'][0]}-{s['rows'][1]}", f"{s['seconds']:.1f}", f"{s['images_per_second']:.1f}",
                  s["worker"]) for s in meta["shards"]]
        echo(_table(rows, indent="    "))
    emb = load_embeddings(file)
    rows = [("split", *emb.classes, "unlabelled", "unreadable")]
    for split in (emb.split_names + [AUGMENTED] * bool(emb.n_copies)) or [""]:
        labels = emb.labels(split or None)
        counts = np.bincount(labels[labels >= 0], minlength=len(emb.classes))
        unreadable = int(((emb.splits == split) & ~emb.ok).sum())
        rows.append((split or "-", *(str(c) for c in counts), str(int((labels < 0).sum())), str(unreadable)))
    echo(_table(rows, indent="  "))
    for i in [int(i) for i in (~emb.ok).nonzero()[0][:10]]:
        echo(f"  {emb.paths[i]}: {emb.errors[i]}")


_RUN_FOLDER = options.run_folder("Run folder for run.json, leaderboard.{csv,md,json}, heads/, plots/ and best/.")


def _run_compare(files, heads, out, **settings):
    from contextlib import nullcontext

    from featx.comparison.evaluate import compare
    from featx.comparison.runs import save_run, writing_run

    # a bad or busy --out is refused before the heads are fitted, and held until the run is saved
    with writing_run(out) if out else nullcontext():
        board = compare(list(files), heads, **settings)
        if out:
            save_run(board, out)
    echo(board.to_markdown())
    best = board.best()
    echo(f"best by validation {settings['sort_by']}: {best['backbone']} + {best['head']} "
         f"(test accuracy {best.get('test_accuracy', float('nan')):.4f}, "
         f"AUC {best.get('test_roc_auc', float('nan')):.4f})")
    if out:
        echo(f"saved run to {out}/ (run.json, leaderboard.*, heads/, plots/)")


@main.command()
@click.argument("embeddings", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@options.heads("--head", "logreg")
@_RUN_FOLDER
@options.config_options(CompareConfig, skip=("concat", "ensemble"))
def train(embeddings, heads, out, **settings):
    """Tune and fit heads on one embedding file (CPU, no torch); report val and test metrics.

    Hyper-parameters are chosen on the validation split (carved from train when the file has
    none) or by --cv; the test split is scored once, at the end.
    """
    _run_compare([embeddings], heads, out, **settings)


@main.command(name="compare")
@click.argument("embeddings", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@options.heads("--heads", "logreg,svm,lightgbm")
@_RUN_FOLDER
@options.config_options(CompareConfig)
def compare_command(embeddings, heads, out, **settings):
    """Leaderboard of every embedding file × head: val and test accuracy, balanced accuracy,
    F1, ROC-AUC with bootstrap 95 % intervals, fit and predict times."""
    _run_compare(embeddings, heads, out, **settings)


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, path_type=Path))
@options.config_options(FinetuneConfig)
@click.option("--lr-find", is_flag=True, help="Only run the LR finder: plot, suggested LRs, weights untouched.")
@options.run_folder("Run folder for best.pt, last.pt and the curves (default runs/finetune-<backbone>).")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out exactly where it stopped.")
@click.pass_context
def finetune(ctx, data_dir, lr_find, out, resume, **fields):
    """Fine-tune a backbone on DATA_DIR's train split (strategies 1 and 2), early-stopping on a
    validation split (the data's own, or carved from train; never test).

    \b
    Then cache its embeddings and compare them with the frozen ones:
      featx extract DATA_DIR --checkpoint OUT/best.pt
      featx compare cache/<dataset>/*.h5
    """
    from featx.finetuning.training import Trainer, finetune as run_finetune, lr_find as run_lr_find

    config = FinetuneConfig(**fields)
    out = out or Path("runs") / f"finetune-{config.backbone.replace(':', '_')}"
    progress = ctx.obj["progress"]
    if lr_find:
        found = run_lr_find(Trainer(data_dir, config, out))
        echo(f"suggested LR: {found['valley']:.1e} (valley), {found['steepest']:.1e} (steepest descent); "
                   f"plot: {found['plot']}")
        return
    try:
        result = run_finetune(data_dir, config, out=out, resume=resume, progress=progress)
    except KeyboardInterrupt:
        echo(f"featx: interrupted; continue with the same command and --resume --out {out}", err=True)
        ctx.exit(1)
    rows = [("epoch", "unfreeze", "train loss", "val loss", "val acc", "val bal acc")]
    for h in result.history:
        rows.append((str(h["epoch"]), h["unfreeze"], f"{h['train_loss']:.4f}", f"{h['val_loss']:.4f}",
                     f"{h['val_accuracy']:.4f}", f"{h['val_balanced_accuracy']:.4f}"))
    echo(_table(rows))
    echo(f"best epoch {result.best_epoch}: val loss {result.best_metrics['val_loss']:.4f}, "
               f"val accuracy {result.best_metrics['val_accuracy']:.4f} ({result.seconds:.0f} s)")
    echo(f"checkpoint: {out}/best.pt; next: featx extract {data_dir} --checkpoint {out}/best.pt")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@options.option("top_k", default=3, show_default=True, help="Classes shown per image.")
@options.option("score", default="knn", show_default=True,
                help="Open-set score deciding 'unknown' (threshold calibrated on validation data).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the predictions to this CSV file.")
@options.batch_size
@click.option("--trust", is_flag=True, help="Load a joblib head (run folders of featx before 0.2), which can run any "
                                            "code it holds: only for folders whose source you trust.")
@click.option("--adapt-to", "adapt_to", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="For a run extracted with --adapt-bn: unlabelled images (files or folders) of the new images' "
                   "domain whose BatchNorm statistics the backbone takes; default: IMAGES themselves (at least "
                   "32). Repeatable.")
def predict(run_dir, images, top_k, score, as_json, csv_path, batch_size, trust, adapt_to):
    """Classify IMAGES (files or folders) with the best head of RUN_DIR (a `featx compare --out`
    folder, or its best/ subfolder): top-k classes with probabilities, or 'unknown' for inputs
    far from every known class. Unreadable files are reported per file."""
    import csv
    import json
    import warnings

    from featx.errors import UnsafeFileWarning
    from featx.use.predict import Predictor

    if csv_path is not None and (not csv_path.name or csv_path.is_dir()):  # refuse before the work, not after it
        raise DataError(f"--csv {str(csv_path)!r}: not a file name; give the CSV file to write")
    if csv_path and not csv_path.parent.is_dir():
        raise DataError(f"{csv_path.parent}: no such folder for --csv")
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            predictor = Predictor(run_dir, score=score, trust=trust, adapt_to=list(adapt_to))
    finally:  # however loading ended, the user hears what trusting the file meant
        for warning in caught:
            if issubclass(warning.category, UnsafeFileWarning):  # printed here: no warnings filter can hide it
                echo(f"featx: warning: {warning.message}", err=True)
            else:  # other libraries' warnings (a head from another scikit-learn) go on as they came
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    results = predictor.predict(list(images), top_k=top_k, batch_size=batch_size)
    drift = predictor.drift()
    if drift is not None:
        tested = "no permutations needed at or below 0.6" if drift.p_value is None else f"p = {drift.p_value:.3f}"
        echo(f"featx: these {drift.n} images against the training ones: shift AUC {drift.auc:.3f} ({tested}; "
             "0.5 = alike)", err=True)
        if drift.shifted:
            echo("featx: warning: these images differ from the ones the head was trained on: expect lower accuracy "
                 "than the run's test figures", err=True)
    if as_json:
        echo(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        rows = [("image", "prediction", f"top {top_k}", score)]
        for r in results:
            top = ", ".join(f"{c} {p:.3f}" for c, p in r.top_k) if not r.error else f"error: {r.error}"
            rows.append((r.path, r.prediction or "-", top, "" if r.unknown_score is None else f"{r.unknown_score:.3f}"))
        echo(_table(rows))
    if csv_path:
        with open(csv_path, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:  # names as bytes
            writer = csv.writer(handle)
            writer.writerow(["path", "prediction", "unknown_score", "error"] +
                            [f"{kind}_{i + 1}" for i in range(top_k) for kind in ("class", "probability")])
            for r in results:
                flat = [x for c, p in r.top_k for x in (c, f"{p:.6f}")]
                writer.writerow([r.path, r.prediction or "", r.unknown_score if r.unknown_score is not None else "",
                                 r.error] + flat)
    failed = sum(1 for r in results if r.error)
    if failed:
        echo(f"featx: {failed} of {len(results)} images could not be read", err=True)
    if failed == len(results):
        raise FeatxError(f"none of the {len(results)} images could be read")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(run_dir):
    """Write RUN_DIR/report.html: leaderboard, confusion matrices, ROC curves, per-class scores,
    example and most confidently wrong images, fine-tune curves and provenance, all in one file."""
    from featx.use.report import write_report

    echo(f"report: {write_report(run_dir)}")


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, path_type=Path))
@options.backbone()
@options.weights
@options.option("sample_per_class", default=60, show_default=True, help="Training images per class measured.")
@options.seed("Seed of the sample (and of the split when the data has none).")
def advise(data_dir, backbone, weights, sample_per_class, seed):
    """Recommend strategy 1, 2 or 3 for DATA_DIR from its size (images per class) and its measured
    similarity to ImageNet (early-layer statistics gap, linear-probe accuracy), with the commands."""
    from featx.use.advisor import advise as run_advise

    echo(run_advise(data_dir, backbone, sample_per_class=sample_per_class, seed=seed,
                          weights=weights).as_text())


@main.command()
@options.run_folder("Run folder for the leaderboard, heads, plots and report.", default="runs/demo")
@click.option("--cache", "cache_dir", default="cache", show_default=True, type=click.Path(path_type=Path),
              help="Cache folder for the embeddings.")
@options.backbone()
@options.weights
@options.image_size
@options.heads("--heads", "logreg,svm,lightgbm")
@click.pass_context
def demo(ctx, out, cache_dir, backbone, weights, image_size, heads):
    """The whole product on the bundled chest X-ray sample: extract, compare heads, write the
    HTML report; prints the leaderboard and where the report is. About a minute on 2 CPU cores."""
    from featx.comparison.evaluate import compare
    from featx.embed.extraction import extract as run_extract
    from featx.use.report import write_report
    from featx.comparison.runs import save_run, writing_run
    from featx.data.sample import sample_path

    with writing_run(out):
        result = run_extract(sample_path(), ExtractConfig(backbone=backbone, weights=weights, image_size=image_size,
                                                         cache_dir=str(cache_dir)), progress=ctx.obj["progress"])
        echo(f"1/3 embeddings: {result.path} ({'cached' if result.cached else f'{result.seconds:.1f} s'})")
        board = compare([result.path], heads)
        save_run(board, out)
    echo("2/3 leaderboard (validation carved from train; test scored once):")
    echo(board.to_markdown())
    echo(f"3/3 report: {write_report(out)}")
    echo(f"try: featx predict {out} {sample_path() / 'test' / 'NORMAL'}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --token.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--token", envvar="FEATX_TOKEN", show_envvar=True,
              help="Secret every request must carry (Authorization: Bearer TOKEN; the page takes ?token=TOKEN).")
@options.option("score", default="knn", show_default=True,
                help="Open-set score deciding 'unknown' by default (a request may ask for another).")
@click.option("--max-bytes", default=20_000_000, show_default=True, type=click.IntRange(1),
              help="Largest upload accepted, per file.")
@click.option("--max-files", default=32, show_default=True, type=click.IntRange(1), help="Files per request.")
@options.option("max_pixels", default=50_000_000, show_default=True,
                help="Largest image accepted, in pixels (read from its header, never decoded).")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(1),
              help="Images of concurrent requests classified together, at most.")
@click.option("--wait-ms", default=10.0, show_default=True, type=click.FloatRange(0),
              help="How long the first image of a batch waits for others.")
@click.option("--trust", is_flag=True, help="Load a joblib head (run folders of featx before 0.2), which can run any "
                                            "code it holds: only for folders whose source you trust.")
@click.option("--adapt-to", "adapt_to", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="For a run extracted with --adapt-bn: unlabelled images of the domain to serve, whose BatchNorm "
                   "statistics the backbone takes. Repeatable.")
def serve(run_dir, host, port, token, score, max_bytes, max_files, max_pixels, batch, wait_ms, trust, adapt_to):
    """Serve RUN_DIR's best head (a `featx compare --out` folder or its best/) as a web page and a JSON API:
    POST /predict (multipart files), GET /health, GET /model, OpenAPI docs at /docs. Needs
    pip install 'featx[serve]'."""
    from featx.use.serve import ServeLimits, check_exposure, serve as run_server

    check_exposure(host, token)
    limits = ServeLimits(max_bytes=max_bytes, max_files=max_files, max_pixels=max_pixels, batch=batch, wait_ms=wait_ms)
    echo(f"serving {run_dir} on http://{host}:{port}/ (Ctrl-C stops)", err=True)
    run_server(run_dir, host=host, port=port, token=token, score=score, trust=trust, adapt_to=list(adapt_to) or None,
               limits=limits)


@main.command()
@click.argument("source", metavar="RUN_DIR|FILE.h5", type=click.Path(exists=True, path_type=Path))
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path),
              help="RUN_DIR: the ONNX file to write (replaced whole if it exists).")
@click.option("--head", help="RUN_DIR: a saved head of that kind (logreg, svm, ...) instead of the run's best; the "
                             "best alone carries the open-set scores.")
@click.option("--trust", is_flag=True, help="RUN_DIR: load a joblib head (run folders of featx before 0.2), which can "
                                            "run any code it holds: only for folders whose source you trust.")
@options.option("format", help="FILE.h5: parquet (one row per image, the embedding a fixed-size float32 list) or npy (features "
                   "beside a CSV of the same rows and a JSON of the file's provenance).")
@click.option("--split", "split_name", help="FILE.h5: only the rows of this split (train, val, test, augmented).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="FILE.h5: the file to write  [default: <file stem>[-<split>].<format> here]")
def export(source, onnx_path, head, trust, format, split_name, out):
    """Put a run or an embedding file to work elsewhere.

    RUN_DIR --onnx model.onnx: the run's best head and its backbone as one ONNX graph: uint8 pixels (N, H, W, 3),
    resized and cropped as the run's preprocessing says, to class probabilities (and open-set scores), with the
    class names, preprocessing and thresholds in its metadata; checked against featx's own answers before it is
    written. Needs pip install 'featx[export]'.

    FILE.h5 --format parquet|npy: every row of the embedding file (path, label, split, ok, error, content hash,
    features as float32) in file order, read and written a block at a time. Parquet needs pip install
    'featx[pandas]'.
    """
    if source.is_dir():
        if onnx_path is None or format or split_name or out:
            raise click.UsageError("a run folder exports with --onnx FILE (and --head, --trust)")
        _export_onnx(source, onnx_path, head, trust)
    else:
        if format is None or onnx_path or head or trust:
            raise click.UsageError("an embedding file exports with --format parquet|npy (and --split, --out)")
        from featx.store.tables import export_table

        written = export_table(source, format, out=out, split=split_name)
        echo(f"wrote {', '.join(map(str, written))} ({written[0].stat().st_size / 1e6:.1f} MB)")


def _export_onnx(run_dir: Path, onnx_path: Path, head: str | None, trust: bool) -> None:
    from featx.use.export import export_onnx

    echo(f"exporting {run_dir} (tracing the backbone takes a while)", err=True)
    exported = export_onnx(run_dir, onnx_path, head=head, trust=trust)
    info = exported.metadata
    echo(f"wrote {exported.path} ({exported.path.stat().st_size / 1e6:.1f} MB): {info['head']} on "
         f"{' + '.join(info['backbones'])}, input image uint8 (N, {info['input']['height']}, {info['input']['width']}, "
         f"3), outputs {', '.join(info['outputs'])}; onnxruntime agrees with featx within "
         f"{exported.difference:.1g} on probe images")


@main.command(name="map")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="The PNG to write  [default: <file stem>-map.png here]")
@options.option("map_method", "--method", default="auto", show_default=True,
                help="tsne (scikit-learn), umap (needs umap-learn), or auto: umap where installed.")
@options.option("max_points", "--max-points", default=2000, show_default=True,
                help="Beyond this many images, a seeded sample (the marked ones always in it).")
@options.seed("Seed of the layout and of the sample.")
def map_command(file, out, map_method, max_points, seed):
    """A 2-D map of FILE's images (t-SNE or UMAP of the embeddings) coloured by class and shaped by split, with
    the likely label errors among train and the test images least like train marked. Seeded: the same file
    gives the same picture."""
    from featx.comparison.embedding_map import dataset_map
    from featx.store.embeddings import load_embeddings

    made = dataset_map(load_embeddings(file), method=map_method, max_points=max_points, seed=seed)
    written = made.save(out or Path(f"{file.stem}-map.png"))
    echo(f"wrote {written}: {made.method} of {len(made.rows)} of {made.total} images; {len(made.label_errors)} "
         f"likely label errors and {len(made.least_like_train)} test images least like train marked"
         + (f" ({made.note})" if made.note else ""))


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("query", metavar="IMAGE_OR_ROW")
@options.option("k", "-k", default=10, show_default=True, help="How many images.")
@click.option("--split", "split_name", help="Search only this split (default: every image of the file).")
@options.option("index", default="exact", show_default=True,
               help="exact (every row compared) or faiss (an HNSW graph: faster on large files, may miss a "
                    "neighbour; pip install 'featx[similar]').")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def similar(file, query, k, split_name, index, as_json):
    """The K images of FILE nearest IMAGE_OR_ROW by cosine similarity, with their labels and splits.

    IMAGE_OR_ROW is a row number of FILE (left out of its own answer) or an image file, embedded first as FILE's
    rows were (its backbone, weights, preprocessing and precision)."""
    import json
    from dataclasses import asdict

    from featx.use.similar import similar as nearest

    found = nearest(file, query, k=k, split=split_name, index=index)
    if as_json:
        echo(json.dumps([asdict(n) for n in found], indent=2))
        return
    rows = [("rank", "similarity", "row", "split", "label", "path")]
    rows += [(str(i + 1), f"{n.similarity:.4f}", str(n.row), n.split, n.label, n.path) for i, n in enumerate(found)]
    echo(_table(rows))


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--per-class", default=20, show_default=True, type=click.IntRange(1),
              help="Rows kept of every class in every split (fewer where there are fewer).")
@options.option("dtype", help="Storage type of the subset's features [default: the file's].")
@options.seed("Seed of the rows drawn.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The subset's file (for example tests/fixtures/small.h5); never overwritten.")
def subset(file, per_class, dtype, seed, out):
    """A small, valid copy of FILE for tests: up to --per-class rows of every class in every split, drawn with
    --seed, provenance kept and marked as a subset. Loads, compares and predicts without torch."""
    from featx.store.embeddings import read_meta
    from featx.store.fixtures import subset_embeddings

    made = subset_embeddings(file, out, per_class, dtype=dtype, seed=seed)
    echo(f"wrote {made} ({read_meta(made)['n_rows']} rows of {read_meta(file)['n_rows']})")


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def doctor(path):
    """Check PATH, an embedding file, a run folder or a fine-tuned checkpoint: checksums, every chunk, schema,
    row counts, heads (loaded without running code), plots and calibration. Says what is wrong and what to
    do; exits 1 when anything is."""
    from featx.use.doctor import diagnose

    found = diagnose(path)
    for line in found.checked:
        echo(f"ok: {line}")
    for line in found.problems:
        echo(f"problem: {line}")
    echo(f"{path}: {'healthy' if found.healthy else f'{len(found.problems)} problems'} ({found.kind})")
    if not found.healthy:
        sys.exit(1)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def consolidate(file):
    """Copy FILE, a virtual file published over shards by `featx extract --cluster`, into one contiguous file
    at the same path, and remove its shards. Worth it beyond about a thousand shards, where opening the virtual
    file gets slow."""
    from featx.store.embeddings import consolidate as run_consolidate

    echo(f"consolidated {run_consolidate(file)}")


@main.command(name="list")
@click.argument("what", type=click.Choice(["backbones", "heads"]), default="backbones")
def list_registry(what):
    """List the registered backbones (feature size, input size, weights source) or heads."""
    if what == "heads":
        from featx.heads.registry import HEADS

        echo(_table([("name", "what")] + [(h.name, h.description) for h in HEADS.values()]))
        return
    rows = [("name", "dim", "input", "resize", "weights")]
    for name in BACKBONES:
        spec = get_backbone(name)
        source = f"pip {spec.offline_package[2]}" if spec.offline_package else f"torchvision {spec.weights}"
        rows.append((name, str(spec.dim), str(spec.input_size), str(spec.resize), source))
    echo(_table(rows))
    echo("Any timm model also works as timm:<name> (weights via the Hugging Face hub cache or --weights).")


def _brief(value, longest: int = 6, nested: bool = False) -> str:
    """``value`` printed with every list longer than ``longest`` shown by its length and first items: one screen
    a key. Top-level strings print bare, nested values as their repr, as ``str`` of a container would."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_brief(v, longest, True)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)) and len(value) > longest:
        first = ", ".join(_brief(v, longest, True) for v in value[:2])
        return f"[{len(value)} items: {first}, …; --full lists them]"
    return repr(value) if nested else str(value)


def _table(rows: list[tuple[str, ...]], indent: str = "") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
