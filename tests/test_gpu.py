"""GPU checks: deselected by default (`-m gpu` to run) and skipped where no CUDA device exists."""

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from featx.embed.extraction import extract
from featx.embed.planning import ExtractConfig
from featx.store.embeddings import load_embeddings

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_gpu_extraction_matches_cpu(image_folder, tiny_config, precision):
    # fp32 on the CPU too: on a CPU with AMX, auto would run resnet18 in bf16
    cpu = load_embeddings(extract(image_folder, replace(tiny_config, precision="fp32"), progress=False).path).features()
    gpu_config = replace(tiny_config, device="cuda", precision=precision, decode="pillow",
                         out=str(image_folder.parent / "g.h5"))
    gpu = load_embeddings(extract(image_folder, gpu_config, progress=False).path)
    assert gpu.meta["device"].startswith("cuda") and gpu.meta["precision"] == precision
    tolerance = 1e-3 if precision == "fp32" else 5e-2
    np.testing.assert_allclose(gpu.features(), cpu, rtol=tolerance, atol=tolerance)


def test_gpu_tensor_decoding_matches_the_pillow_path(tmp_path):
    from .test_decoding import cosines, make_photos

    data = make_photos(tmp_path / "photos")
    files = {}
    for decode in ("tensor", "pillow"):  # both on the GPU in fp32: only the decoders differ
        config = ExtractConfig(device="cuda", decode=decode, precision="fp32", cache_dir=str(tmp_path / decode))
        files[decode] = load_embeddings(extract(data, config, progress=False).path)
    tensor, pillow = files["tensor"], files["pillow"]
    assert tensor.meta["decoder"] == "tensor" and list(tensor.ok) == list(pillow.ok)
    # nvJPEG upsamples chroma without libjpeg's smoothing: colour pixels differ by 3 levels on average (grey ones
    # not at all), and the features by cosine 0.988 at worst on an H100 (0.999 on a CPU, where both use libjpeg)
    assert cosines(tensor.features(), pillow.features()).min() >= 0.98


def test_a_local_gpu_cluster_extracts_what_one_process_does(image_folder, tiny_config, tmp_path):
    pytest.importorskip("distributed")
    from featx.embed.shards import extract_on_cluster

    config = replace(tiny_config, device="cuda", precision="fp32", decode="pillow", cache_dir=str(tmp_path / "seq"))
    one = load_embeddings(extract(image_folder, config, progress=False).path)
    sharded = extract_on_cluster(image_folder, replace(config, cache_dir=str(tmp_path / "shards")), "local",
                                 shard_rows=max(1, len(one.paths) // 3), progress=False)
    sharded = load_embeddings(sharded.path)
    assert sharded.paths.tolist() == one.paths.tolist() and sharded.meta["device"].startswith("cuda")
    np.testing.assert_allclose(sharded.features(), one.features(), rtol=1e-3, atol=1e-3)


def test_fine_tuning_on_a_gpu_decodes_in_worker_processes_by_default(tmp_path):
    from featx.finetuning.training import FinetuneConfig, Trainer
    from tests.conftest import make_class_folders

    data = make_class_folders(tmp_path / "colours", per_class=4)
    config = FinetuneConfig(backbone="resnet18", weights="none", image_size=32, epochs=1, device="cuda")
    assert Trainer(data, config, tmp_path / "run").loader([], train=False).num_workers == min(8, os.cpu_count())
