"""Head speed and the accuracy cost of featx's speed shortcuts, measured in one run.

1. Fit and predict time, and peak memory (each in a fresh process), of every head with its
   middle hyper-parameters, on the committed fixture (280 × 1280) and on a synthetic
   70,000 × 1280 matrix (predict on 10,000 rows).
2. `compare` of logreg + svm + lightgbm, each tuned, on the chest X-ray training set
   (5,216 × 1280) when its embeddings are cached, else on a synthetic matrix of that size.
3. The shortcuts against their slow versions on the same embeddings: SVM on PCA-256 vs all
   dims, LightGBM on PCA-64 vs all dims, a linear vs an RBF SVM.
4. With --sixty-thousand: `featx compare FILE --heads logreg,svm,lightgbm` as a user runs it, on a
   generated stand-in of a 70,000-image, 10-class set (60,000 train, 10,000 test, 1280 dims, about 90 %
   accurate), and with --baseline-rev REV the same command with featx at git revision REV, in one run.

Usage: python scripts/bench_heads.py [--chest-xray cache/chest_xray/efficientnet_lite0-<key>.h5] [--quick]
       python scripts/bench_heads.py --sixty-thousand [--baseline-rev 761037a]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "chest_xray_efficientnet_lite0.h5"


def synthetic(n_rows: int, dim: int = 1280, n_classes: int = 10, seed: int = 0, noise: float = 1.5):
    """Non-negative, correlated features like pooled CNN embeddings, with a learnable class signal
    (``noise`` 2.4: a logistic regression is about 90 % accurate on 10 classes, as on the users' set)."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(0, 1, (64, dim)).astype(np.float32)
    centres = rng.normal(0, 1, (n_classes, 64)).astype(np.float32)
    y = rng.integers(0, n_classes, n_rows)
    latent = centres[y] + rng.normal(0, noise, (n_rows, 64)).astype(np.float32)
    X = np.maximum(latent @ basis / 8 + rng.normal(0, 0.3, (n_rows, dim)).astype(np.float32), 0)
    return X.astype(np.float32), y


def middle(grid: dict) -> dict:
    return {k: v[len(v) // 2] for k, v in grid.items()}


def time_one_head(args) -> dict:
    """Runs in its own process so that ru_maxrss is this head's peak."""
    name, source, n_predict = args
    from featx.heads.registry import get_head

    X, y = np.load(source)["X"], np.load(source)["y"]
    plan = get_head(name).plan(len(X), X.shape[1], 0)
    pipeline = plan.pipeline.set_params(**middle(plan.grid))
    began = time.perf_counter()
    pipeline.fit(X, y)
    fit = time.perf_counter() - began
    began = time.perf_counter()
    pipeline.predict_proba(X[:n_predict])
    predict = time.perf_counter() - began
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"head": name, "fit_s": fit, "predict_s": predict, "peak_mb": peak_mb, "note": plan.note}


def head_table(label: str, X, y, n_predict: int, tmp: Path, heads) -> None:
    source = tmp / f"{label}.npz"
    np.savez(source, X=X, y=y)
    print(f"\n{label}: {X.shape[0]} × {X.shape[1]}, predict on {min(n_predict, len(X))} rows")
    print(f"  {'head':9s} {'fit s':>8s} {'predict s':>10s} {'peak MB':>8s}  how")
    for name in heads:
        with ProcessPoolExecutor(max_workers=1) as pool:
            r = pool.submit(time_one_head, (name, source, n_predict)).result()
        print(f"  {r['head']:9s} {r['fit_s']:8.2f} {r['predict_s']:10.3f} {r['peak_mb']:8.0f}  {r['note']}")


def shortcut_costs(emb) -> None:
    from sklearn.decomposition import PCA
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    from featx.heads.registry import EarlyStoppedLightGBM

    X, y = emb.features("train"), emb.labels("train")
    X_fit, X_val, y_fit, y_val = train_test_split(X, y, test_size=0.15, random_state=0, stratify=y)
    variants = {
        "svm RBF on PCA-256 (featx)": make_pipeline(StandardScaler(), PCA(256, random_state=0),
                                                    SVC(class_weight="balanced")),
        "svm RBF on all dims": make_pipeline(StandardScaler(), SVC(class_weight="balanced")),
        "svm linear on PCA-256 (featx beyond 10k rows)": make_pipeline(
            StandardScaler(), PCA(256, random_state=0), LinearSVC(C=0.01, class_weight="balanced")),
        "lightgbm on PCA-64 (featx)": make_pipeline(PCA(64, random_state=0), EarlyStoppedLightGBM()),
        "lightgbm on all dims": EarlyStoppedLightGBM(),
    }
    print(f"\nshortcut costs on {emb.path.name} (train {len(X_fit)}, validation {len(X_val)} carved from train)")
    print(f"  {'variant':48s} {'fit s':>7s} {'val acc':>8s} {'val AUC':>8s}")
    for label, model in variants.items():
        began = time.perf_counter()
        model.fit(X_fit, y_fit)
        fit = time.perf_counter() - began
        score = model.decision_function(X_val) if hasattr(model, "decision_function") else \
            model.predict_proba(X_val)[:, 1]
        print(f"  {label:48s} {fit:7.2f} {accuracy_score(y_val, model.predict(X_val)):8.4f} "
              f"{roc_auc_score(y_val, score):8.4f}")


# Runs `featx compare` in this process and reports its peak memory: featx is imported from the working folder.
COMPARE = """
import json, resource, sys, time
from featx.cli.commands import main
began = time.perf_counter()
try:
    main(sys.argv[1:])
except SystemExit as stop:
    assert not stop.code, stop.code
print(json.dumps({"seconds": time.perf_counter() - began,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def sixty_thousand(tmp: Path, baseline_rev: str | None) -> None:
    """`featx compare` at the shape analysts iterate on, now and (optionally) at ``baseline_rev``, one run."""
    from featx.store.embeddings import EmbeddingWriter

    X, y = synthetic(70_000, noise=2.4)
    split = ["train"] * 60_000 + ["test"] * 10_000
    writer = EmbeddingWriter(tmp / "standin.h5", dim=X.shape[1], paths=[f"{i}.jpg" for i in range(len(y))],
                             labels=y.tolist(), splits=split, attrs={"backbone": "standin", "cache_key": "standin",
                                                                     "classes": [f"c{k}" for k in range(10)]})
    writer.write(X.astype(np.float16), np.ones(len(y), bool), [""] * len(y))
    file = writer.finish()
    root = Path(__file__).resolve().parents[1]
    trees = {"this tree": root}
    if baseline_rev:
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tmp / "baseline"), baseline_rev],
                       check=True, capture_output=True)
        trees = {f"featx at {baseline_rev}": tmp / "baseline", **trees}
    print("\n`featx compare FILE --heads logreg,svm,lightgbm` on a 70,000 × 1280 stand-in (60,000 train, 10 classes):")
    print(f"  {'featx':22s} {'total s':>8s} {'peak MB':>8s}   per head: fit s / test accuracy")
    totals = {}
    try:
        for label, tree in trees.items():
            out = tmp / label.replace(" ", "_")
            done = subprocess.run([sys.executable, "-c", COMPARE, "-q", "compare", str(file), "--heads",
                                   "logreg,svm,lightgbm", "--out", str(out)], cwd=tree, check=True,
                                  capture_output=True, text=True)
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            rows = json.loads((out / "leaderboard.json").read_text())
            heads = "  ".join(f"{r['head']} {r['fit_s']:.0f} s / {r['test_accuracy']:.4f}"
                              for r in sorted(rows, key=lambda r: r["head"]))
            totals[label] = measured["seconds"]
            print(f"  {label:22s} {measured['seconds']:8.1f} {measured['peak_mb']:8.0f}   {heads}")
    finally:
        if baseline_rev:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tmp / "baseline")],
                           capture_output=True)
    if len(totals) == 2:
        before, after = totals.values()
        print(f"  speed-up: {before / after:.1f}× (goal: the whole command in ≤ 120 s)")


BUSY = "import time\nend = time.monotonic() + 1800\nwhile time.monotonic() < end:\n    pass\n"  # bounded


def compare_seconds(file: Path, out: Path, env: dict | None = None, tree: Path | None = None) -> tuple[float, dict]:
    """`featx compare FILE --heads logreg,svm,lightgbm` in a fresh process (of featx in ``tree``, this one by
    default): seconds, and fit seconds per head."""
    done = subprocess.run([sys.executable, "-c", COMPARE, "-q", "compare", str(file.resolve()), "--heads",
                           "logreg,svm,lightgbm", "--out", str(out)], check=True, capture_output=True, text=True,
                          env=env, cwd=tree)
    rows = json.loads((out / "leaderboard.json").read_text())
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"], {r["head"]: r["fit_s"] for r in rows}


LIGHTGBM_FIT = """
import sys, time, numpy as np
from featx.heads.registry import import_lightgbm
lightgbm = import_lightgbm()
rng = np.random.default_rng(0)
X = rng.normal(size=(54000, 64)).astype(np.float32); y = rng.integers(0, 10, 54000); X[:, :10] += np.eye(10)[y] * 1.5
model = lightgbm.LGBMClassifier(n_estimators=150, learning_rate=0.05, num_leaves=15, data_sample_strategy="goss",
                                colsample_bytree=0.8, random_state=0, verbose=-1, n_jobs=int(sys.argv[1]))
began = time.perf_counter(); model.fit(X, y); print(time.perf_counter() - began)
"""


def lightgbm_threads() -> list[str]:
    """One LightGBM fit (54,000 × 64, 10 classes, as the head's on PCA-64) alone and beside a busy process, per
    thread count and OpenMP wait policy, each in a fresh process."""
    import os

    lines = ["| threads | OMP_WAIT_POLICY | alone s | busy s | busy / alone |", "|---|---|---|---|---|"]
    for threads, policy in ((2, "ACTIVE"), (2, "PASSIVE"), (1, "ACTIVE")):
        seconds = []
        for busy_too in (False, True):
            busy = subprocess.Popen([sys.executable, "-c", BUSY]) if busy_too else None
            try:
                done = subprocess.run([sys.executable, "-c", LIGHTGBM_FIT, str(threads)], check=True,
                                      capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": policy})
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            seconds.append(float(done.stdout.strip().splitlines()[-1]))
        lines.append(f"| {threads} | {policy} | {seconds[0]:.1f} | {seconds[1]:.1f} | {seconds[1] / seconds[0]:.2f} |")
    return lines


TIMINGS = ("fit_s", "predict_s", "model")  # what differs between two runs of the same comparison


def shared_core(file: Path, tmp: Path, baseline_rev: str | None = None) -> list[str]:
    """The compare alone, then while one busy process takes a core, then alone again, in one run; first, with
    ``baseline_rev``, featx at that revision alone (and whether it gives the same leaderboard)."""
    lines = ["| featx | while | total s | logreg fit s | svm fit s | lightgbm fit s |", "|---|---|---|---|---|---|"]
    root = Path(__file__).resolve().parents[1]
    runs = [("this tree", "alone", None), ("this tree", "one busy process", None), ("this tree", "alone again", None)]
    if baseline_rev:
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tmp / "baseline"), baseline_rev],
                       check=True, capture_output=True)
        runs.insert(0, (f"at {baseline_rev}", "alone", tmp / "baseline"))
    totals, boards = {}, {}
    try:
        for k, (featx, label, tree) in enumerate(runs):
            busy = subprocess.Popen([sys.executable, "-c", BUSY]) if label == "one busy process" else None
            try:
                total, fits = compare_seconds(file, tmp / f"run{k}", tree=tree)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            totals[featx, label] = total
            boards[featx] = [{key: value for key, value in row.items() if key not in TIMINGS}
                             for row in json.loads((tmp / f"run{k}" / "leaderboard.json").read_text())]
            lines.append(f"| {featx} | {label} | {total:.1f} | {fits['logreg']:.1f} | {fits['svm']:.1f} | "
                         f"{fits['lightgbm']:.1f} |")
    finally:
        if baseline_rev:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tmp / "baseline")],
                           capture_output=True)
    alone = min(totals["this tree", "alone"], totals["this tree", "alone again"])
    lines.append(f"\nbusy / alone: {totals['this tree', 'one busy process'] / alone:.2f}×")
    if baseline_rev:
        same = boards[f"at {baseline_rev}"] == boards["this tree"]
        lines.append(f"at {baseline_rev} / this tree, alone: {totals[f'at {baseline_rev}', 'alone'] / alone:.2f}×; "
                     f"the same leaderboard scores: {'yes' if same else 'NO'}")
    return lines


@click.command()
@click.option("--shared-core", "shared_core_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Only `featx compare FILE --heads logreg,svm,lightgbm` alone and while a busy process shares "
                   "the cores (section 5).")
@click.option("--lightgbm-threads", "lightgbm_threads_only", is_flag=True, help="Only one LightGBM fit alone and beside a busy process, per "
                                                       "thread count and OpenMP wait policy.")
@click.option("--docs", type=click.Path(dir_okay=False, path_type=Path), help="With --shared-core: also write the "
                                                                            "table to this markdown file.")
@click.option("--chest-xray", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Embeddings of the full chest X-ray set (from `featx extract ../shared/data/chest_xray`).")
@click.option("--quick", is_flag=True, help="Skip the 70,000-row table.")
@click.option("--sixty-thousand", "sixty_thousand_only", is_flag=True, help="Only the 60,000-row `featx compare` (section 4).")
@click.option("--baseline-rev", help="With --sixty-thousand or --shared-core: also run featx at this git revision, "
                                     "for a ratio.")
def main(shared_core_file, lightgbm_threads_only, docs, chest_xray, quick, sixty_thousand_only, baseline_rev):
    import os
    import tempfile

    from featx.embed.hardware import cpu_model
    from featx.store.embeddings import read_meta

    print(f"{cpu_model()}, {os.cpu_count()} cores")
    if lightgbm_threads_only:
        print("\n".join(lightgbm_threads()))
        return
    if shared_core_file:
        meta = read_meta(shared_core_file)
        with tempfile.TemporaryDirectory() as tmp:
            lines = shared_core(shared_core_file, Path(tmp), baseline_rev)
        print("\n".join(lines))
        if docs:
            docs.write_text(f"# Heads that share the machine\n\nGenerated by `python scripts/bench_heads.py "
                            f"--shared-core {shared_core_file}"
                            + (f" --baseline-rev {baseline_rev}" if baseline_rev else "")
                            + f"` on {time.strftime('%Y-%m-%d')}; do not edit by hand.\n"
                            f"Machine: {cpu_model()}, {os.cpu_count()} cores. `featx compare FILE --heads "
                            f"logreg,svm,lightgbm` on {meta['n_rows']} × {meta['dim']} embeddings of "
                            f"{meta.get('dataset_name')} ({meta['backbone']}), in a fresh process each time; the busy "
                            "process is a Python loop on one core.\n\n" + "\n".join(lines) + "\n")
        return
    if sixty_thousand_only:
        with tempfile.TemporaryDirectory() as tmp:
            sixty_thousand(Path(tmp), baseline_rev)
        return

    from featx.comparison.evaluate import compare
    from featx.heads.registry import list_heads
    from featx.store.embeddings import load_embeddings

    fixture = load_embeddings(FIXTURE)
    with tempfile.TemporaryDirectory() as tmp:
        head_table("fixture", fixture.features("train"), fixture.labels("train"), 1000, Path(tmp), list_heads())
        if not quick:
            X, y = synthetic(70_000)
            head_table("synthetic", X, y, 10_000, Path(tmp), list_heads())

    if chest_xray:
        emb = load_embeddings(chest_xray)
        label = f"{chest_xray.name} (chest X-ray train {len(emb.rows('train'))} rows)"
    else:
        from featx.store.embeddings import Embeddings

        X, y = synthetic(5216 + 624, n_classes=2)
        split = np.array(["train"] * 5216 + ["test"] * 624)
        emb = Embeddings(Path("synthetic.h5"), {"backbone": "synthetic", "cache_key": "-"}, ["a", "b"],
                         np.array([f"{i}" for i in range(len(y))]), split, np.ones(len(y), bool),
                         np.array([""] * len(y)), X.astype(np.float16), y)
        label = "synthetic 5,216 × 1280 (pass --chest-xray for the real one)"
    began = time.perf_counter()
    board = compare([emb], ["logreg", "svm", "lightgbm"])
    seconds = time.perf_counter() - began
    print(f"\nfeatx compare logreg+svm+lightgbm, each tuned, on {label}: {seconds:.1f} s (target <= 60 s)")
    print(board.to_markdown())
    shortcut_costs(emb)


if __name__ == "__main__":
    main()
