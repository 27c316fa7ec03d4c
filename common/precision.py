"""The precision a run computes in (auto: bf16 where the device computes it natively, else fp16 on a GPU and fp32
on a CPU), its autocast context, and host-to-device copies that do not make the host wait."""
import platform
import sys

import torch

from common.config import UsageError


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def cpu_bf16_support():
    """(native, what): whether this CPU computes bf16 natively, and the capability that says so. x86 needs
    AVX512-BF16 or AMX (AVX2-only and plain AVX512 parts emulate bf16 autocast, about 30x slower than fp32 for a
    ResNet); ARM needs the BF16 instructions (ARMv8.6: Graviton3, Apple M2 and later)."""
    capability = torch.backends.cpu.get_cpu_capability()  # the SIMD level torch's own kernels use
    if platform.machine().lower() in ("arm64", "aarch64"):
        try:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # asks cpuinfo for ARM's BF16 extension
        except (AttributeError, RuntimeError):  # a build without oneDNN
            native = False
        return native, f"ARM {capability}, {'with' if native else 'without'} BF16 instructions"
    for native, what in ((torch.cpu._is_amx_tile_supported(), "AMX"),
                         (torch.cpu._is_avx512_bf16_supported(), "AVX512-BF16")):
        if native:
            return True, f"{capability} with {what}"
    return False, f"{capability} without AVX512-BF16 or AMX"


def resolve_precision(precision, device, is_main=True):
    """The precision a run computes in, and why. `auto`: bf16 where the device computes it natively (NVIDIA A100,
    H100 and later; CPUs with AVX512-BF16, AMX or ARM's BF16), else fp16 with a GradScaler on a GPU (V100, T4)
    and fp32 on a CPU (where bf16 is emulated and many times slower). The main process prints the choice once;
    a bf16 forced on a CPU without it runs, with a warning."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("fp16 needs a GPU (its GradScaler is CUDA-only); use --precision auto, bf16 or fp32 on CPU")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        hardware = f"this GPU {'computes' if native else 'does not compute'} bf16 natively"
    else:
        native, capability = cpu_bf16_support()
        hardware = f"this CPU ({capability}) {'computes' if native else 'does not compute'} bf16 natively"
    if precision == "auto":
        chosen = "bf16" if native else "fp16" if device.type == "cuda" else "fp32"
        reason = f"auto: {hardware}"
    else:
        chosen, reason = precision, f"asked for: {hardware}"
    if is_main:
        print(f"precision: {chosen} ({reason})", flush=True)
        if chosen == "bf16" and not native:
            print(f"warning: precision bf16 on a device without native bf16 ({hardware}): it is emulated, many "
                  "times slower than fp32; use --precision auto (docs/troubleshooting.md#a-slow-cpu-run)",
                  file=sys.stderr, flush=True)
    return chosen, reason


def autocast(device, precision):
    """The autocast context of a resolved precision (resolve_precision): bf16, fp16, or none for fp32."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def to_device(x, device):
    """A host tensor on `device` without making the host wait: on a GPU, from pinned memory, non-blocking (the
    pinned block is kept until the copy is done)."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device, non_blocking=True)
