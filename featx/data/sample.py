"""The small real dataset bundled with featx, so the main job runs right after install."""

from pathlib import Path


def sample_path() -> Path:
    """Root of the bundled chest X-ray sample (train/ and test/ folders of NORMAL and PNEUMONIA)."""
    return Path(__file__).parent / "sample_data" / "chest_xray_sample"
