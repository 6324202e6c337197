"""Make tests/fixtures/chest_xray_efficientnet_lite0.h5: real efficientnet_lite0 features of 280 shared chest X-rays.

Train 80 NORMAL + 120 PNEUMONIA, test 32 NORMAL + 48 PNEUMONIA, picked with seed 0 from
../shared/data/chest_xray and stored as float16 (well under 1 MB), so the head tests run on
real embeddings without torch. Usage: python tests/make_fixture.py
"""

import random
import shutil
import tempfile
from pathlib import Path

from featx.embed.extraction import ExtractConfig, extract

SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray"
TARGET = Path(__file__).resolve().parent / "fixtures" / "chest_xray_efficientnet_lite0.h5"
COUNTS = {("train", "NORMAL"): 80, ("train", "PNEUMONIA"): 120, ("test", "NORMAL"): 32, ("test", "PNEUMONIA"): 48}


def main() -> None:
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "chest_xray_fixture"
        for (split, label), count in COUNTS.items():
            (root / split / label).mkdir(parents=True)
            for path in rng.sample(sorted((SOURCE / split / label).glob("*.jpeg")), count):
                shutil.copy(path, root / split / label / path.name)
        TARGET.unlink(missing_ok=True)
        result = extract(root, ExtractConfig(out=str(TARGET), dtype="float16"), progress=True)
    print(f"wrote {result.path} ({result.path.stat().st_size / 1e6:.2f} MB, {result.rows} rows)")


if __name__ == "__main__":
    main()
