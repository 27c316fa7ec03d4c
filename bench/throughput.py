"""Training throughput of the method scripts: the model alone, and end to end with each view path.

    python bench/throughput.py                                   # simclr, synthetic images, this machine
    python bench/throughput.py --methods simclr swav --dataset folder --data_dir /tmp/cifar10-jpeg

For each method and mode, --repeats runs of the method's own train() (the best counts; each in a fresh process,
--log_every 1, on a fixed subset of (warmup_steps + steps) x batch_size images), timed from the metrics.jsonl
line each step writes; images/s is the median over the steps after --warmup_steps:
  model      every step trains on one batch of views made before the run (pretrain_loader replaced by a loader
             that repeats it): the limit of this machine for the method
  batched    end to end, views made a batch at a time on the device (--views batched)
  workers    end to end, views made per image in --num_workers loader processes (--views workers)
Prints a markdown table (--json FILE also writes the numbers, --markdown FILE the tables with the date and the
command, e.g. docs/benchmarks.md) with each end-to-end rate's share of the model's and the peak memory of the
training process (RSS on a CPU, max allocated on a GPU), then the views one CPU thread makes per second on each
path (SimCLR's two views, SwAV's multi-crop). --methods all: every method script.
A benchmark, not a test: nothing asserts a speed. Settings by default: ResNet-18 with the ImageNet stem at
32 px, batch 256, precision auto (bf16 where the CPU computes it natively, else fp32: the tables name which, and the
CPU's capability); SwAV and DINO with their 2 global and 6
local crops, the local ones of --local_size px (18: SwAV's CIFAR size; DINO's 16 px would give the ImageNet stem
the 1 x 1 inputs whose bf16 gradient is wrong on a CPU: docs/troubleshooting.md, NaN or inf)."""
import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile

from docs_section import write_section  # bench/docs_section.py
from machine import machine  # bench/machine.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("model", "batched", "workers")
METHODS = ("simclr", "moco", "simsiam", "byol", "barlow", "swav", "dino", "nnclr", "relic", "supcon")
MULTI_CROP = ("swav", "dino")


class RepeatedBatch:
    """Stands in for pretrain_loader's loader: the same batch of views, steps times an epoch."""

    class Sampler:
        def set_epoch(self, epoch, skip=0):
            pass

    def __init__(self, batch, steps, images):
        self.batch, self.steps, self.sampler, self.images = batch, steps, self.Sampler(), images

    def __len__(self):
        return self.steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))


def run_one(method, mode, script_args):
    """In this process: the method's train() with views as `mode` says (see the module's docstring)."""
    sys.path.insert(0, REPO)
    import importlib

    import torch

    from common.config import load_config
    module = importlib.import_module(method)
    cfg = load_config(module.Config, script_args)
    if mode == "model":
        real_loader = module.pretrain_loader

        def repeated(cfg, views, rank, world_size, device):
            loader = real_loader(cfg, views, rank, world_size, device)
            made, labels = next(iter(loader))
            made = [v.to(device) for v in made]
            return RepeatedBatch((made, torch.as_tensor(labels).to(device)), len(loader), loader.images)

        module.pretrain_loader = repeated
    module.train(cfg)
    import resource
    peak = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if torch.cuda.is_available():
        peak["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    with open(os.path.join(cfg.out_dir, "peak_memory.json"), "w") as f:
        json.dump(peak, f)


def view_rates(dataset, data_dir, image_size, local_size, images=256, repeats=3):
    """Views made per second by one CPU thread, per image (torchvision, as a loader worker makes them) and a batch
    at a time (common/batched.py), for SimCLR's two views and SwAV's multi-crop (2 x image_size + 6 x local_size)."""
    sys.path.insert(0, REPO)
    import time

    import torch
    from torchvision.transforms.v2.functional import pil_to_tensor

    from common.augment import multi_crop, two_views
    from common.batched import BatchedViews
    from common.data import build_dataset
    torch.set_num_threads(1)
    data = build_dataset(dataset, data_dir, "pretrain", image_size=image_size)
    pil = [data[i][0].convert("RGB") for i in range(min(images, len(data)))]
    batch = [pil_to_tensor(p) for p in pil]  # a list: images of any sizes (one tensor when they share one)
    images = len(pil)
    rows = []
    for name, views in [("two views (SimCLR)", two_views("sym", image_size, dataset)),
                        ("multi-crop 2 + 6 (SwAV)", multi_crop("sym", dataset, image_size, local_size, 6))]:
        batched, generator = BatchedViews(views), torch.Generator().manual_seed(0)
        per_image, at_once = [], []
        for _ in range(repeats):
            tic = time.perf_counter()
            for p in pil:
                views(p)
            per_image.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            batched(batch, generator)
            at_once.append(time.perf_counter() - tic)
        made = images * len(views.settings)
        rows.append((name, round(made / min(per_image)), round(made / min(at_once))))
    return rows


def images_per_s(out_dir, global_batch, warmup_steps):
    """The median step rate after warmup_steps, from the times of metrics.jsonl's per-step lines."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        times = [line["time"] for line in map(json.loads, f) if "train/loss" in line][warmup_steps:]
    if len(times) < 3:
        raise SystemExit(f"error: only {len(times)} timed steps in {out_dir}; raise --steps")
    return global_batch / statistics.median(b - a for a, b in zip(times, times[1:]))


def main():
    if sys.argv[1:2] == ["--one"]:  # a child run: --one METHOD MODE, then the script's own arguments
        return run_one(sys.argv[2], sys.argv[3], sys.argv[4:])
    args = build_parser().parse_args()
    if args.methods == ["all"]:
        args.methods = list(METHODS)
    return measure(args)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["simclr"], help="method scripts, or all")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--cifar_stem", default="false")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--precision", default="auto", help="the scripts' own: auto is bf16 where the device "
                        "computes it natively, else fp32 on a CPU (fp16 on a GPU)")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--compile", default="false", choices=("false", "true"), help="torch.compile the model")
    parser.add_argument("--no-view-rates", dest="view_rates", action="store_false",
                        help="leave out the views one CPU thread makes per second (CPU work only)")
    parser.add_argument("--local_size", type=int, default=18, help="SwAV's and DINO's local crops (px)")
    parser.add_argument("--steps", type=int, default=12, help="steps timed per run, after the warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method and mode; the best counts")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    parser.add_argument("--markdown", default="", help="also write the tables, the machine, the date and this "
                                                       "command to this file (e.g. docs/benchmarks.md)")
    return parser


def measure(args):

    steps = args.steps + args.warmup_steps
    images = steps * args.batch_size if args.dataset != "synthetic" else min(1024, steps * args.batch_size)
    epochs = -(-steps * args.batch_size // images)  # enough epochs for `steps` steps
    rows = {method: {"method": method} for method in args.methods}
    precisions = set()
    for repeat, method, mode in itertools.product(range(args.repeats), args.methods, args.modes):
        # the modes interleaved, each rate the best of its repeats: a noisy shared host slows all of them alike
        row = rows[method]
        with tempfile.TemporaryDirectory() as out_dir:
            views = "workers" if mode == "workers" else "batched"
            command = [sys.executable, os.path.abspath(__file__), "--one", method, mode,
                       "--dataset", args.dataset, "--data_dir", args.data_dir, "--arch", args.arch,
                       "--image_size", str(args.image_size), "--cifar_stem", args.cifar_stem,
                       "--batch_size", str(args.batch_size), "--precision", args.precision,
                       "--num_workers", str(args.num_workers), "--views", views, "--epochs", str(epochs),
                       "--compile", args.compile,
                       "--subset", str(images), "--log_every", "1",
                       "--warmup_epochs", "0", "--checkpoint_every_minutes", "0", "--out_dir", out_dir]
            if method in MULTI_CROP:
                command += ["--local_size", str(args.local_size)]
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"error: {method} ({mode}) failed:\n{done.stderr[-2000:]}")
            rate = round(images_per_s(out_dir, args.batch_size, args.warmup_steps), 1)
            row[mode] = max(row.get(mode, 0.0), rate)
            with open(os.path.join(out_dir, "config.json")) as f:
                precisions.add(json.load(f)["precision"])  # what the run computed in (auto resolved)
            with open(os.path.join(out_dir, "peak_memory.json")) as f:
                peak = json.load(f)  # the training process's (loader workers have their own)
            key = "cuda_max_allocated_mb" if "cuda_max_allocated_mb" in peak else "rss_mb"
            row[f"{mode}_peak_mb"] = max(row.get(f"{mode}_peak_mb", 0), round(peak[key]))
            print(json.dumps({"repeat": repeat + 1, "method": method, "mode": mode, "images_per_s": rate}),
                  flush=True)
    results = list(rows.values())

    import torch
    where, precision = machine(), "/".join(sorted(precisions))
    if args.precision == "auto":
        precision += " (precision auto)"
    memory = "max allocated on the GPU" if torch.cuda.is_available() else "peak RSS of the training process"
    lines = [f"{args.arch} at {args.image_size} px (SwAV, DINO: 2 global and 6 local crops of {args.local_size} px), "
             f"batch {args.batch_size}, {precision}, {args.dataset}, "
             + ("torch.compile, " if args.compile == "true" else "")
             + f"{args.num_workers} loader workers; {where}; best of {args.repeats}", "",
             "| method | " + " | ".join(f"{m} (images/s)" for m in args.modes)
             + f" | batched / model | workers / model | memory (MB, {memory}; batched, else workers, else model) |",
             "|---|" + "---|" * (len(args.modes) + 3)]
    for row in results:
        shares = [f"{row[m] / row['model']:.0%}" if "model" in row and m in row else "-"
                  for m in ("batched", "workers")]
        peak = next((str(row[f"{m}_peak_mb"]) for m in ("batched", "workers", "model") if f"{m}_peak_mb" in row), "-")
        lines.append(f"| {row['method']} | " + " | ".join(str(row[m]) for m in args.modes) + " | "
                     + " | ".join(shares) + f" | {peak} |")
    views = view_rates(args.dataset, args.data_dir, args.image_size, args.local_size) if args.view_rates else []
    lines += ["", f"Views made by one thread, {args.image_size}-px images of {args.dataset}:", "",
              "| views | per image (views/s) | a batch at a time (views/s) |", "|---|---|---|"]
    lines += [f"| {name} | {per_image} | {at_once} |" for name, per_image, at_once in views]
    print("\n" + "\n".join(lines))
    if args.markdown:
        import datetime
        command = "python bench/throughput.py " + " ".join(sys.argv[1:])
        write_section(args.markdown, "throughput", "\n".join([
            f"## Throughput and memory: {args.dataset} images", "",
            f"Measured {datetime.date.today()} by `{command}`. Images/s: the median step rate after the warm-up "
            "steps, the best of the repeats; model: every step on one batch of views made before the run (the limit "
            "of this machine for the method); batched / workers: end to end with each view path (docs/guide.md, "
            "Views).",
            "", *lines]), part=args.dataset)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "precision": precision, "machine": where, "results": results,
                       "views_per_s_one_thread": [dict(zip(("views", "per_image", "batched"), row)) for row in views]},
                      f, indent=1)


if __name__ == "__main__":
    main()
