"""What the online linear probe (common/probe.py, --probe_every) costs a pre-training.

    python bench/probe_cost.py                          # simclr, ResNet-18 at 32 px, batch 256, this machine
    python bench/probe_cost.py --methods all --markdown docs/benchmarks.md

Each method's own train() runs the same steps with the probe off (--probe_every 0) and on (--probe_every 1), the
two interleaved, --repeats times each (the best counts), every step on one batch of views made before the run
(bench/throughput.py's "model" mode: the method's compute alone, so the probe's share is not hidden behind
data loading). Reported:
  step       the median step time without and with the probe, and the probe's share of a step: its forward,
             backward and SGD step on the detached features of the global views (the goal: under 3 %); also
             OnlineProbe.step alone, timed in this process on two views' features of one batch (the difference
             of two whole steps is within a shared host's noise);
  val check  one evaluation of the probe on the synthetic val split (256 images: the trunk's forward in eval
             mode and the head), timed from metrics.jsonl, per image, and what it adds to a CIFAR-10 run of the
             configs (50,000 images, batch 256: 195 steps an epoch; a check of 10,000 val images every
             probe_every = 10 epochs), computed from the two measured times.
A benchmark, not a test: nothing asserts a speed."""
import argparse
import datetime
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile

from docs_section import write_section  # bench/docs_section.py
from machine import machine  # bench/machine.py
from throughput import METHODS, MULTI_CROP, REPO  # bench/throughput.py runs each child (--one METHOD model ...)

CIFAR_STEPS_PER_EPOCH, CIFAR_VAL, PROBE_EVERY = 50_000 // 256, 10_000, 10  # the CIFAR-10 configs


def step_seconds(out_dir, warmup_steps):
    """The median time between metrics.jsonl's per-step lines after warmup_steps."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        times = [line["time"] for line in map(json.loads, f) if "train/loss" in line][warmup_steps:]
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def check_seconds(out_dir):
    """The time from the epoch's line to the probe's line: its val check (the kNN monitor is off)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    epoch = next(line["time"] for line in lines if "train/epoch_loss" in line)
    return next(line["time"] for line in lines if "eval/probe_top1" in line) - epoch


def probe_step_seconds(arch, image_size, batch_size, precision, views=2, repeats=50):
    """OnlineProbe.step alone, in this process: the head's forward, backward and SGD step on the features of
    `views` global views of a batch (random, in the run's precision), the median of `repeats` steps."""
    sys.path.insert(0, REPO)
    import time
    from types import SimpleNamespace

    import torch
    import torch.nn as nn

    from common.backbones import backbone_args, build_backbone
    from common.data import build_dataset
    from common.probe import OnlineProbe
    cfg = SimpleNamespace(probe_every=1, dataset="synthetic", data_dir="", download=False, image_size=image_size,
                          bad_images="stop", seed=0, batch_size=batch_size, num_workers=0)
    model = nn.Module()
    model.backbone_args = backbone_args(arch, image_size, "false")
    model.backbone, width = build_backbone(**model.backbone_args)
    images = build_dataset("synthetic", "", "pretrain", image_size=image_size)
    probe = OnlineProbe(cfg, model, images, 0, 1, torch.device("cpu"), precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    features, labels = torch.randn(views * batch_size, width).to(dtype), torch.arange(batch_size) % 10
    times = []
    for _ in range(repeats + 5):
        probe.features = [features]  # what the hook keeps in a step's forward
        tic = time.perf_counter()
        probe.step(labels, 0.1)
        times.append(time.perf_counter() - tic)
    return statistics.median(times[5:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["simclr"], help="method scripts, or all")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--steps", type=int, default=12, help="steps timed per run, after the warm-up")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="runs with and without the probe; the best counts")
    parser.add_argument("--markdown", default="", help="also write the table to this file (docs/benchmarks.md)")
    args = parser.parse_args()
    methods = list(METHODS) if args.methods == ["all"] else args.methods
    steps = args.steps + args.warmup_steps
    images = min(1024, steps * args.batch_size)  # the synthetic data set's size
    epochs = -(-steps * args.batch_size // images)  # enough epochs for `steps` steps (a median ignores their ends)
    best, checks, precisions = {}, {}, set()
    for _, method, probe_every in itertools.product(range(args.repeats), methods, (0, 1)):
        with tempfile.TemporaryDirectory() as out_dir:
            command = [sys.executable, os.path.join(REPO, "bench", "throughput.py"), "--one", method, "model",
                       "--dataset", "synthetic", "--arch", args.arch, "--image_size", str(args.image_size),
                       "--cifar_stem", "false", "--batch_size", str(args.batch_size), "--precision", args.precision,
                       "--num_workers", "0", "--epochs", str(epochs), "--subset", str(images),
                       "--log_every", "1", "--warmup_epochs", "0", "--checkpoint_every_minutes", "0",
                       "--probe_every", str(probe_every), "--out_dir", out_dir]
            if method in MULTI_CROP:
                command += ["--local_size", "18"]
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"error: {method} (probe_every {probe_every}) failed:\n{done.stderr[-2000:]}")
            seconds = step_seconds(out_dir, args.warmup_steps)
            key = (method, probe_every)
            best[key] = min(best.get(key, seconds), seconds)
            if probe_every:
                checks[method] = min(checks.get(method, float("inf")), check_seconds(out_dir))
            with open(os.path.join(out_dir, "config.json")) as f:
                precisions.add(json.load(f)["precision"])
            print(json.dumps({"method": method, "probe_every": probe_every, "step_s": round(seconds, 4)}), flush=True)
    alone = probe_step_seconds(args.arch, args.image_size, args.batch_size, sorted(precisions)[0])
    precision = "/".join(sorted(precisions)) + (" (precision auto)" if args.precision == "auto" else "")
    lines = [f"{args.arch} at {args.image_size} px, batch {args.batch_size}, {precision}, synthetic images, views "
             f"made before the run; {machine()}; best of {args.repeats}", "",
             "| method | step without probe (s) | step with probe (s) | difference (noisy) | the probe's step "
             "alone (ms; share of a step) | val check (ms per image) | a CIFAR-10 config's checks, share of its "
             "training time |", "|---|---|---|---|---|---|---|"]
    for method in methods:
        off, on, check = best[(method, 0)], best[(method, 1)], checks[method]
        per_image = check / 256
        cifar = CIFAR_VAL * per_image / (PROBE_EVERY * CIFAR_STEPS_PER_EPOCH * on)
        lines.append(f"| {method} | {off:.3f} | {on:.3f} | {(on - off) / off:+.1%} | {1000 * alone:.2f}; "
                     f"{alone / off:.2%} | {1000 * per_image:.2f} | {cifar:.2%} |")
    print("\n" + "\n".join(lines))
    if args.markdown:
        command = "python bench/probe_cost.py " + " ".join(sys.argv[1:])
        write_section(args.markdown, "probe_cost", "\n".join([
            "## What the online linear probe costs", "",
            f"Measured {datetime.date.today()} by `{command}` (bench/probe_cost.py says how). On this shared "
            "host, whole steps vary by up to a third from one step to the next, so the difference of the two "
            "medians (each the best of its repeats) says little; the probe's step timed alone (its head's forward, "
            "backward, gradient check and SGD step on two views' features: all that the probe adds to a step but "
            "a hook that keeps a reference to a tensor) measures its cost. The last column: one check of 10,000 "
            "val images every 10 epochs of 195 steps, at the measured times.", "", *lines]))


if __name__ == "__main__":
    main()
