"""Fixtures for users' tests: `featx subset` and `featx.testing.make_embeddings` write small, valid files that
load, pass `featx doctor`, compare and predict without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from featx.errors import DataError
from featx.store.embeddings import load_embeddings
from featx.use.doctor import diagnose
from tests.test_hardening import FIXTURE, invoke


def test_a_subset_keeps_every_split_and_class_its_rows_and_says_where_it_came_from(tmp_path):
    out = tmp_path / "small.h5"
    result = invoke("subset", FIXTURE, "--per-class", "5", "--dtype", "float16", "--out", out)
    assert result.exit_code == 0 and "20 rows of 280" in result.output
    small, full = load_embeddings(out), load_embeddings(FIXTURE)
    assert diagnose(out).healthy
    for split in full.split_names:
        assert np.bincount(small.labels(split)).tolist() == [5, 5]
    rows = {p: i for i, p in enumerate(full.paths)}
    picked = [rows[p] for p in small.paths]
    assert picked == sorted(picked)  # in file order
    np.testing.assert_array_equal(small.features_at(), full.features_at(np.array(picked)).astype(np.float16))
    assert small.meta["subset_of"] == {"path": str(full.path), "cache_key": full.cache_key, "rows": 280,
                                       "per_class": 5, "seed": 0}
    assert small.cache_key != full.cache_key and small.meta["weights_sha256"] == full.meta["weights_sha256"]
    again = tmp_path / "again.h5"
    invoke("subset", FIXTURE, "--per-class", "5", "--dtype", "float16", "--out", again)
    assert load_embeddings(again).paths.tolist() == small.paths.tolist()  # seeded
    assert invoke("subset", FIXTURE, "--out", out).exit_code == 2  # never overwritten


def test_synthetic_files_are_valid_learnable_and_refuse_what_cannot_be_split(tmp_path):
    from featx.testing import make_embeddings

    emb = load_embeddings(make_embeddings(tmp_path / "syn.h5", n=300, dim=16, classes=3, seed=1))
    assert emb.classes == ["class0", "class1", "class2"] and emb.dim == 16 and diagnose(emb.path).healthy
    assert {s: len(emb.rows(s)) for s in emb.split_names} == {"train": 210, "val": 45, "test": 45}
    from featx.comparison.evaluate import compare

    accuracy = compare([emb], ["logreg"]).rows[0]["test_accuracy"]
    assert 0.6 < accuracy < 1.0  # learnable, not trivial
    with pytest.raises(DataError, match="at least 2 classes"):
        make_embeddings(tmp_path / "tiny.h5", n=5)


def test_a_users_test_suite_runs_on_them_without_torch(tmp_path):
    script = f"""
import json, sys
import featx
from featx.testing import make_embeddings, subset_embeddings
from featx.comparison.runs import save_run
from featx.heads.registry import load_head
synthetic = make_embeddings({str(tmp_path / 'syn.h5')!r})
small = subset_embeddings({str(FIXTURE)!r}, {str(tmp_path / 'small.h5')!r}, per_class=10)
for path in (synthetic, small):
    run = save_run(featx.compare([path], ["logreg"]), {str(tmp_path)!r} + "/run-" + path.stem)
    head = load_head(run / "best" / "head.json")
    proba = head["pipeline"].predict_proba(featx.load_embeddings(path).features("test"))
    assert abs(proba.sum(1) - 1).max() < 1e-6
print(json.dumps(sorted({{"torch", "torchvision", "timm"}} & set(sys.modules))))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
