from click.testing import CliRunner

from featx.advisor import SIMILAR_GAP, SMALL_PER_CLASS, measure, recommend
from featx.cli import main
from featx.datasets import scan_dataset
from tests.conftest import make_class_folders


def test_the_size_similarity_matrix_on_constructed_cases():
    assert recommend(50, SIMILAR_GAP / 4, 0.8)[0] == 3             # tiny and similar: frozen features
    assert recommend(5000, SIMILAR_GAP * 1.5, 0.8)[0] == 1         # large and different: fine-tune all
    assert recommend(200, SIMILAR_GAP * 1.5, 0.7)[0] == 2          # small and different: top stages
    assert recommend(200, SIMILAR_GAP * 1.5, 0.97)[0] == 3         # different, but the probe is already good
    strategy, reasons = recommend(SMALL_PER_CLASS, None, 0.95)     # no BatchNorm: probe decides
    assert strategy == 3 and any("no BatchNorm" in r for r in reasons)
    assert "large dataset" in recommend(SMALL_PER_CLASS, 0.1, 0.9)[1][0]


def test_measure_and_cli_on_a_tiny_dataset(tmp_path):
    data = make_class_folders(tmp_path / "d", per_class=10)
    gap, probe = measure(scan_dataset(data), "resnet18", sample_per_class=10, weights="none")
    assert gap is not None and gap >= 0 and 0 <= probe <= 1
    result = CliRunner().invoke(main, ["advise", str(data), "--backbone", "resnet18", "--weights", "none",
                                       "--sample-per-class", "10"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("strategy ") and "why:" in result.output and "featx extract" in result.output
