import numpy as np
from click.testing import CliRunner
from PIL import Image

from featx.use.advisor import SIMILAR_GAP, SMALL_PER_CLASS, measure, recommend
from featx.cli.commands import main
from featx.data.datasets import scan_dataset
from featx.data.sample import sample_path
from tests.conftest import make_class_folders


def test_the_size_similarity_matrix_on_constructed_cases():
    assert recommend(50, SIMILAR_GAP / 4, 0.8)[0] == 3             # tiny and similar: frozen features
    assert recommend(5000, SIMILAR_GAP * 1.5, 0.8)[0] == 1         # large and different: fine-tune all
    assert recommend(200, SIMILAR_GAP * 1.5, 0.7)[0] == 2          # small and different: top stages
    assert recommend(200, SIMILAR_GAP * 1.5, 0.97)[0] == 3         # different, but the probe is already good
    strategy, reasons = recommend(SMALL_PER_CLASS, None, 0.95)     # no BatchNorm: probe decides
    assert strategy == 3 and any("no BatchNorm" in r for r in reasons)
    assert "large dataset" in recommend(SMALL_PER_CLASS, 0.1, 0.9)[1][0]


def natural_photos(root, per_class=12):
    """Crops of scikit-learn's two sample photos (a temple, a flower): natural colour images, close to ImageNet."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    for name, photo in zip(("temple", "flower"), load_sample_images().images):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            top, left = rng.integers(0, photo.shape[0] - 200), rng.integers(0, photo.shape[1] - 200)
            Image.fromarray(photo[top:top + 200, left:left + 200]).save(root / name / f"{i}.jpg")
    return root


def test_x_rays_measure_farther_from_imagenet_than_natural_photos(tmp_path):
    """With real ImageNet weights: greyscale chest X-rays (the bundled sample) against natural colour photos."""
    natural, _ = measure(scan_dataset(natural_photos(tmp_path / "photos")), "efficientnet_lite0", sample_per_class=12)
    xray, _ = measure(scan_dataset(sample_path()), "efficientnet_lite0", sample_per_class=12)
    assert natural < SIMILAR_GAP < xray  # and so the advisor calls one similar, the other far from ImageNet


def test_cli_on_a_tiny_dataset(tmp_path):
    data = make_class_folders(tmp_path / "d", per_class=10)
    gap, probe = measure(scan_dataset(data), "resnet18", sample_per_class=10, weights="none")
    assert gap is not None and 0 <= probe <= 1
    result = CliRunner().invoke(main, ["advise", str(data), "--backbone", "resnet18", "--weights", "none",
                                       "--sample-per-class", "10"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("strategy ") and "why:" in result.output and "featx extract" in result.output
