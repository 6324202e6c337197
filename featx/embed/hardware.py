"""What this machine can run: the device and the precision, decided without importing torch where it can be.

A cache key depends on the precision that will run, and so on the device. Finding a cached file must
not cost a torch import (about 2 s), so a machine with no NVIDIA driver is known to have no CUDA from
the filesystem alone; torch is asked only where a driver is present.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

from featx.errors import ConfigError
from featx.vocab import check

log = logging.getLogger(__name__)

# Backbone families whose CPU forward gains from bf16 (dense convolutions, where AMX/AVX-512 BF16 double
# the throughput); depthwise-separable ones (efficientnet, mobilenet) are memory-bound and stay in fp32.
BF16_FAMILIES = ("resnet", "wide_resnet", "resnext", "vgg", "densenet", "convnext", "inception", "regnet")


def nvidia_driver_present() -> bool:
    """False where no NVIDIA driver is loaded: CUDA is then surely absent, and torch need not be asked."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def cuda_available() -> bool:
    if not nvidia_driver_present():
        return False
    import torch

    return torch.cuda.is_available()


def device_type(device: str) -> str:
    """``cpu`` or ``cuda`` for a ``--device`` value; asking for CUDA where there is none is a usage error."""
    check("device_type", device=device)
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device.startswith("cuda") and not cuda_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return device.split(":")[0]


def cpu_model() -> str:
    """The CPU's model name and whether it computes bf16 natively, as benchmarks print it beside their figures
    (speeds compare only on one model, and a virtual machine may name no more than "Intel(R) Xeon(R) Processor")."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    name = names[0] if names else platform.processor() or platform.machine() or "CPU"
    return f"{name} ({'native bf16' if cpu_has_bf16() else 'no native bf16'})"


def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere it is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gains_from_bf16(architecture: str) -> bool:
    return architecture.split(".")[0].startswith(BF16_FAMILIES)


def resolve_precision(precision: str, device: str, architecture: str = "") -> tuple[str, str]:
    """(the precision that will run, why). ``auto``: bf16 on a GPU that has it (else fp16); on a CPU, bf16 where
    the chip computes it natively and the backbone family gains from it, fp32 elsewhere. An explicit fp16, or bf16
    without native support, falls back to fp32 on a CPU."""
    check("resolve_precision", precision=precision)
    if device == "cuda":
        if precision != "auto":
            return precision, "asked for"
        import torch

        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU computes bf16"
        return "fp16", "auto: the GPU has no bf16"
    native = cpu_has_bf16()
    if precision == "auto":
        if not native:
            return "fp32", "auto: this CPU has no native bf16 (AVX-512 BF16 or AMX)"
        if not gains_from_bf16(architecture):
            return "fp32", f"auto: {architecture or 'this backbone'} is depthwise or unmeasured; fp32 is as fast"
        return "bf16", "auto: native bf16 on this CPU, and a dense backbone"
    if precision == "fp16" or (precision == "bf16" and not native):
        log.warning("%s is not native on this CPU; running in fp32 instead", precision)
        return "fp32", f"{precision} asked for, not native on this CPU"
    return precision, "asked for"
