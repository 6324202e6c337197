"""Docs that cannot drift: the CLI reference is the commands' own help, every link resolves, the README stays short."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_is_the_commands_own_help(tmp_path):
    reference = load_script("make_cli_reference")
    assert not reference.is_stale(), "docs/cli.md is stale: run python scripts/make_cli_reference.py"
    edited = tmp_path / "cli.md"
    edited.write_text(reference.REFERENCE.read_text().replace("--top-k", "--top-n"))
    assert reference.is_stale(edited) and reference.is_stale(tmp_path / "missing.md")


def test_every_relative_link_in_the_docs_resolves():
    pages = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+:", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} → {target}")
    assert not broken


def test_the_readme_fits_on_a_screen_and_points_into_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300 and len(readme.encode()) <= 40 * 1024
    for doc in ("docs/cli.md", "docs/guide.md", "docs/api.md", "docs/formats.md", "docs/distributed.md",
                "docs/performance.md", "docs/results/"):
        assert f"({doc}" in readme, f"README.md does not point to {doc}"
    assert "pip install -e . && featx demo" in readme and 'pip install -e ".[test]" && python -m pytest' in readme


def test_every_results_table_says_how_it_was_made():
    for table in sorted((ROOT / "docs" / "results").glob("*.md")):
        head = table.read_text().splitlines()[:6]
        assert any(re.search(r"python scripts/\w+\.py", line) for line in head), table.name
        assert any(line.startswith("Machine:") for line in head), table.name


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path):
    """The ten-minute walkthrough, command by command, on the bundled sample (a few minutes on 2 cores)."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("S=featx/data/sample_data")
    script = readme[start:readme.index("```", start)]
    (tmp_path / "featx" / "data").mkdir(parents=True)
    (tmp_path / "featx" / "data" / "sample_data").symlink_to(ROOT / "featx" / "data" / "sample_data")
    done = subprocess.run(["bash", "-euc", script], cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "runs" / "sample" / "report.html").exists()
    board = (tmp_path / "runs" / "sample-both" / "leaderboard.md").read_text()
    assert "efficientnet_lite0+ft-" in board and board.count("| logreg |") == 2


def test_the_reproduce_script_says_where_each_table_goes():
    from click.testing import CliRunner

    shown = CliRunner().invoke(load_script("reproduce_chest_xray").main, ["--help"])
    assert shown.exit_code == 0
    for page in ("chest_xray.md", "flowers5.md", "remedies.md", "README.md"):
        assert page in shown.output.replace("\n", " "), page
