"""The analyst's loop never waits for torch: ls, info, compare, train, report and a cache hit run without it."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from featx.embed.hardware import cpu_model, resolve_precision
from featx.store.memo import memo_path, remembered_sha256

from .conftest import make_class_folders

# Runs one featx command and says on its last line whether torch (or torchvision) got imported.
PROBE = """
import sys
from featx.cli.commands import main
try:
    main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print(json.dumps({"code": code, "torch": sorted({"torch", "torchvision", "timm"} & set(sys.modules))}))
""".replace("import sys", "import json, sys")


def run_featx(*args, env_home) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "FEATX_OFFLINE": "1", "FEATX_HOME": str(env_home)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_head_side_commands_never_import_torch(tiny_run, tmp_path):
    report_copy = tmp_path / "run"
    shutil.copytree(tiny_run.run, report_copy)
    for args in (("ls", tiny_run.embeddings.parents[1]), ("info", tiny_run.embeddings),
                 ("train", tiny_run.embeddings, "--head", "logreg"),
                 ("compare", tiny_run.embeddings, "--heads", "logreg", "--out", tmp_path / "cmp"),
                 ("report", report_copy)):
        outcome = run_featx(*args, env_home=tmp_path)
        assert outcome == {"code": 0, "torch": []}, args


def test_a_cache_hit_imports_no_torch_and_hashes_the_weights_once(tmp_path):
    data = make_class_folders(tmp_path / "colours", per_class=2)
    args = ("extract", data, "--image-size", "32", "--out", tmp_path / "cache")
    first = run_featx(*args, env_home=tmp_path)
    assert first["code"] == 0 and "torch" in first["torch"]  # work to do: the model side was needed
    remembered = json.loads((tmp_path / "memo.json").read_text())
    assert any(key.startswith("sha256:") and "efficientnet" in key for key in remembered)  # the weights' hash
    assert not any(key.startswith("intact:") for key in remembered)  # written only by a cache hit
    second = run_featx(*args, env_home=tmp_path)
    assert second == {"code": 0, "torch": []}
    assert any(key.startswith("intact:") for key in json.loads((tmp_path / "memo.json").read_text()))
    files = list((tmp_path / "cache").rglob("*.h5"))
    assert len(files) == 1  # the same key both times


def test_a_remembered_hash_is_recomputed_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_HOME", str(tmp_path / "home"))
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"a" * 1000)
    first = remembered_sha256(weights)
    weights.write_bytes(b"b" * 1001)
    assert remembered_sha256(weights) != first
    assert len(json.loads(memo_path().read_text())) == 2


def test_benchmarks_name_the_cpu_and_its_bf16(monkeypatch):
    monkeypatch.setattr("featx.embed.hardware.cpu_has_bf16", lambda: True)
    named = cpu_model()
    assert named.endswith(" (native bf16)") and len(named) > len(" (native bf16)")
    monkeypatch.setattr("featx.embed.hardware.cpu_has_bf16", lambda: False)
    assert cpu_model() == named.replace("(native bf16)", "(no native bf16)")


@pytest.mark.parametrize("precision, device, architecture, bf16, expected", [
    ("auto", "cpu", "resnet50", False, "fp32"),
    ("auto", "cpu", "resnet50", True, "bf16"),
    ("auto", "cpu", "efficientnet_lite0", True, "fp32"),  # depthwise: no gain measured for bf16
    ("bf16", "cpu", "efficientnet_lite0", False, "fp32"),  # asked for, but emulated here: fp32 instead
    ("fp16", "cpu", "resnet50", True, "fp32"),
    ("bf16", "cpu", "resnet50", True, "bf16"),
    ("fp32", "cpu", "resnet50", True, "fp32"),
])
def test_precision_auto_picks_bf16_only_where_native_and_worth_it(monkeypatch, precision, device, architecture,
                                                                   bf16, expected):
    monkeypatch.setattr("featx.embed.hardware.cpu_has_bf16", lambda: bf16)
    chosen, reason = resolve_precision(precision, device, architecture)
    assert chosen == expected and reason
