"""GPU checks: deselected by default (`-m gpu` to run) and skipped where no CUDA device exists."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from featx.extraction import extract
from featx.planning import ExtractConfig
from featx.store import load_embeddings

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_gpu_extraction_matches_cpu(image_folder, tiny_config, precision):
    cpu = load_embeddings(extract(image_folder, tiny_config, progress=False).path).features()
    gpu_config = replace(tiny_config, device="cuda", precision=precision, decode="pillow",
                         out=str(image_folder.parent / "g.h5"))
    gpu = load_embeddings(extract(image_folder, gpu_config, progress=False).path)
    assert gpu.meta["device"].startswith("cuda") and gpu.meta["precision"] == precision
    tolerance = 1e-3 if precision == "fp32" else 5e-2
    np.testing.assert_allclose(gpu.features(), cpu, rtol=tolerance, atol=tolerance)


def test_gpu_tensor_decoding_matches_the_pillow_path(tmp_path):
    from .test_decoding import cosines, make_photos

    data = make_photos(tmp_path / "photos")
    gpu = extract(data, ExtractConfig(device="cuda", decode="tensor", cache_dir=str(tmp_path / "g")), progress=False)
    cpu = extract(data, ExtractConfig(device="cpu", decode="pillow", precision="fp32", cache_dir=str(tmp_path / "c")),
                  progress=False)
    gpu, cpu = load_embeddings(gpu.path), load_embeddings(cpu.path)
    assert gpu.meta["decoder"] == "tensor" and list(gpu.ok) == list(cpu.ok)
    assert cosines(gpu.features(), cpu.features()).min() >= 0.99  # bf16 on the GPU adds its own rounding
