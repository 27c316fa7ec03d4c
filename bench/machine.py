"""What every benchmark says of the machine it ran on: the CPU with its SIMD level and whether it computes bf16
natively (an AVX2-only CPU emulates bf16, many times slower: rates of two kinds of host are not comparable), the
cores, torch, and the GPU where there is one."""
import os
import platform
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine():
    """e.g. 'AMD EPYC (AVX512 with AVX512-BF16: native bf16), 2 cores, torch 2.14.1'."""
    sys.path.insert(0, REPO)
    import torch

    from common.precision import cpu_bf16_support
    native, capability = cpu_bf16_support()
    text = (f"{cpu_name()} ({capability}: {'native' if native else 'emulated'} bf16), {os.cpu_count()} cores, "
            f"torch {torch.__version__}")
    return f"{torch.cuda.get_device_name()}; {text}" if torch.cuda.is_available() else text
