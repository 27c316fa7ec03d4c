"""What each precision costs on this machine, and what `precision: auto` picks here and why: a ResNet-18 with the
ImageNet stem, forward and backward of one batch at 32 px (the model of the CPU checks in docs/methods/), in fp32
and in bf16 autocast (and fp16 on a GPU).

    python bench/precision.py                                  # batch 256, best of 3 after one warm-up pass
    python bench/precision.py --markdown docs/benchmarks.md    # also a section of docs/benchmarks.md

Where the CPU lacks native bf16 (x86 without AVX512-BF16 or AMX), bf16 autocast is emulated and many times slower
than fp32: that is why auto computes in fp32 there. A benchmark, not a test: nothing asserts a speed."""
import argparse
import datetime
import json
import sys
import time

import torch

from docs_section import write_section  # bench/docs_section.py
from machine import REPO, machine  # bench/machine.py

sys.path.insert(0, REPO)
from common.backbones import backbone_args, build_backbone  # noqa: E402 (after the path set-up)
from common.precision import autocast, resolve_precision  # noqa: E402


def seconds_per_step(precision, device, batch_size, repeats):
    """The best of `repeats` forward + backward passes (after one warm-up pass) of a batch in `precision`."""
    torch.manual_seed(0)
    model = build_backbone(**backbone_args("resnet18", 32, "false"))[0].to(device)
    images = torch.randn(batch_size, 3, 32, 32, device=device)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        with autocast(device, precision):
            loss = model(images).float().square().mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    return min(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", default="", help="also write a section of this file (docs/benchmarks.md)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    auto, reason = resolve_precision("auto", device, is_main=False)
    precisions = ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16")
    seconds = {p: round(seconds_per_step(p, device, args.batch_size, args.repeats), 3) for p in precisions}
    result = {"machine": machine(), "auto": auto, "auto_reason": reason, "batch_size": args.batch_size,
              "seconds_per_step": seconds, "bf16_over_fp32": round(seconds["bf16"] / seconds["fp32"], 2)}
    print(json.dumps(result, indent=1))
    if args.markdown:
        command = "python bench/precision.py " + " ".join(sys.argv[1:])
        write_section(args.markdown, "precision", "\n".join([
            "## What each precision costs", "",
            f"Measured {datetime.date.today()} by `{command.strip()}`: ResNet-18 (ImageNet stem), forward and backward "
            f"of {args.batch_size} images at 32 px, the best of {args.repeats} after a warm-up pass; {machine()}.",
            f"`precision: auto` picks {auto} here: {reason.removeprefix('auto: ')}.", "",
            "| precision | seconds a step | images/s |", "|---|---|---|",
            *[f"| {p} | {s} | {args.batch_size / s:.0f} |" for p, s in seconds.items()]]))


if __name__ == "__main__":
    main()
