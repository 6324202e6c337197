"""Build the chest X-ray sample bundled with featx (featx/data/sample_data/chest_xray_sample) from ../shared/data.

200 images (train 70+70, test 30+30 NORMAL/PNEUMONIA), chosen with a fixed seed and
downsized to 128 px, so `featx extract --sample` and `featx demo` work right after install.
Usage: python scripts/make_sample.py [SHARED_CHEST_XRAY_DIR]
"""

import random
import sys
from pathlib import Path

from PIL import Image

SOURCE = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/chest_xray")
TARGET = Path(__file__).resolve().parents[1] / "featx" / "data" / "sample_data" / "chest_xray_sample"
PER_CLASS = {"train": 70, "test": 30}

rng = random.Random(0)
for split, count in PER_CLASS.items():
    for label in ("NORMAL", "PNEUMONIA"):
        files = sorted((SOURCE / split / label).glob("*.jpeg"))
        out_dir = TARGET / split / label
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in rng.sample(files, count):
            with Image.open(path) as img:
                img.convert("L").resize((128, 128), Image.Resampling.BICUBIC).save(
                    out_dir / path.name, quality=90, optimize=True)
print(f"wrote {sum(PER_CLASS.values()) * 2} images under {TARGET}")
