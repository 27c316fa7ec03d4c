"""What each method learns at one small budget on real images: every method script pre-trained on the same
10,000-image subset of the JPEG CIFAR-10 copy in ../shared/data (ResNet-18 with the ImageNet stem at 32 px,
batch 256, bf16, 20 epochs = 780 steps by default), then knn_eval.py (k 200, T 0.1, the 45k train images as
the bank, the 5k val images as queries) and a short linear probe (linear_eval.py on cached features), beside
the same evaluations of a randomly initialised trunk (the floor). SimCLR runs with two seeds, to show the noise.

    python bench/cifar_budget.py                       # every method (hours on 2 CPU cores)
    python bench/cifar_budget.py --methods swav dino   # some of them
    python bench/cifar_budget.py --dry-run             # the commands only

Each method trains with the flags below (FLAGS: its recipe, or the settings that suit this budget, said in
README's short-budget section). Finished steps are not redone (their JSON is there), a stopped pre-training
resumes. The table (top-1 / top-5 of both evaluations, seconds per epoch, the loss's first and last epoch) is
printed, and written with the date, the machine and the commands to --markdown (docs/benchmarks.md). A method
whose loss does not fall, or a contrastive method that does not clear the floor, is a bug to find.
"""
import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys

from docs_section import write_section  # bench/docs_section.py
from throughput import cpu_name  # bench/throughput.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SGD = ["--optimizer", "sgd", "--lr", "0.12", "--warmup_epochs", "0", "--weight_decay", "5e-4"]
MULTI_CROP = ["--num_local", "2", "--local_size", "24"]  # the smallest local crops the ImageNet stem takes in bf16
FLAGS = {  # name: (script, flags)
    "simclr": ("simclr", [*SGD, "--temperature", "0.5"]),
    "simclr_seed1": ("simclr", [*SGD, "--temperature", "0.5", "--seed", "1"]),
    "moco": ("moco", ["--proj_layers", "1", "--proj_dim", "128", "--queue_size", "4096", "--temperature", "0.1",
                      "--base_tau", "0.99", "--final_tau", "0.99", "--lr", "0.06", "--weight_decay", "5e-4",
                      "--decay_bias_and_norm", "true", "--warmup_epochs", "0", "--shuffle_bn", "true",
                      "--bn_groups", "8"]),  # the official CIFAR-10 demo's settings
    "byol": ("byol", SGD),
    "simsiam": ("simsiam", ["--warmup_epochs", "2"]),
    "barlow": ("barlow", ["--warmup_epochs", "2"]),
    "nnclr": ("nnclr", ["--warmup_epochs", "2", "--queue_size", "4096"]),
    "relic": ("relic", ["--warmup_epochs", "2"]),
    "supcon": ("supcon", ["--warmup_epochs", "2"]),
    "swav": ("swav", [*MULTI_CROP, "--warmup_epochs", "2", "--freeze_prototypes_epochs", "1", "--sinkhorn_eps",
                      "0.02"]),
    "dino": ("dino", [*MULTI_CROP, *SGD, "--weight_decay_end", "5e-4", "--proj_layers", "2", "--proj_bn", "true",
                      "--num_prototypes", "2048", "--base_tau", "0.99", "--teacher_temperature", "0.04",
                      "--warmup_teacher_temperature", "0.04"]),  # lightly's CIFAR-10 DINO settings
}


def commands(name, args):
    """(what, command, the JSON it writes or None) of one run; name "floor": the random-init trunk."""
    python, folder = "python", os.path.join(args.out, name)  # run as sys.executable
    data = ["--dataset", "folder", "--data_dir", args.data]
    probe = ["--cache_features", "true", "--epochs", str(args.linear_epochs), "--num_workers", "2"]
    knn = ["--k", "200", "--temperature", "0.1", "--num_workers", "2"]
    if name == "floor":
        trunk = os.path.join(folder, "random_init.pt")
        plain = ["--checkpoint", trunk, "--arch", "resnet18", "--image_size", "32", "--cifar_stem", "false", *data]
        make = ("import os, sys, torch; from common.backbones import backbone_args, build_backbone; "
                "torch.manual_seed(0); os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True); "
                "torch.save(build_backbone(**backbone_args('resnet18', 32, 'false'))[0].state_dict(), sys.argv[1])")
        return [("random init", [python, "-c", make, trunk], trunk),
                ("kNN", [python, "knn_eval.py", *plain, *knn, "--out", f"{folder}/knn.json"], f"{folder}/knn.json"),
                ("linear", [python, "linear_eval.py", *plain, *probe, "--out", f"{folder}/linear.json"],
                 f"{folder}/linear.json")]
    script, flags = FLAGS[name]
    checkpoint = os.path.join(folder, "last.pt")
    return [("pre-train", [python, f"{script}.py", *data, "--subset", str(args.subset), "--epochs", str(args.epochs),
                           "--batch_size", "256", "--cifar_stem", "false", "--num_workers", "2", "--views", "batched",
                           "--out_dir", folder, *flags], None),
            ("kNN", [python, "knn_eval.py", "--checkpoint", checkpoint, *data, *knn, "--out", f"{folder}/knn.json"],
             f"{folder}/knn.json"),
            ("linear", [python, "linear_eval.py", "--checkpoint", checkpoint, *data, *probe, "--out",
                        f"{folder}/linear.json"], f"{folder}/linear.json")]


def _read(path, *keys):
    try:
        with open(path) as f:
            found = json.load(f)
        return [found[k] for k in keys]
    except (OSError, ValueError, KeyError):
        return None


def row(name, args):
    """One line of the table: the evaluations, seconds per epoch and the loss of the first and last epochs."""
    folder = os.path.join(args.out, name)
    cells = []
    for what in ("knn", "linear"):
        found = _read(os.path.join(folder, f"{what}.json"), "top1", "top5")
        cells.append(f"{found[0]:.2f} / {found[1]:.2f}" if found else "-")
    epochs = []
    if os.path.exists(os.path.join(folder, "metrics.jsonl")):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            epochs = [m for m in map(json.loads, f) if "train/epoch_loss" in m]
    speed = f"{args.subset / sorted(m['train/images_per_s'] for m in epochs)[len(epochs) // 2]:.0f}" if epochs else "-"
    loss = f"{epochs[0]['train/epoch_loss']:.3f} -> {epochs[-1]['train/epoch_loss']:.3f}" if epochs else "-"
    flags = shlex.join(FLAGS[name][1]) if name in FLAGS else "-"
    return f"| {name} | {cells[0]} | {cells[1]} | {speed} | {loss} | `{flags}` |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(FLAGS), help=f"runs, from: {', '.join(FLAGS)}")
    parser.add_argument("--data", default="/tmp/cifar10-jpeg", help="the JPEG CIFAR-10 tree (train/, val/); "
                        "extracted there from ../shared/data/cifar10-jpeg.tar.gz if missing")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--subset", type=int, default=10000, help="pre-training images")
    parser.add_argument("--linear_epochs", type=int, default=30, help="the linear probe's epochs (cached features)")
    parser.add_argument("--out", default=None, help="runs' folder (default: runs/cifar_budget in the repository)")
    parser.add_argument("--markdown", default="", help="write the table to this file too (docs/benchmarks.md)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(FLAGS))
    if unknown:
        raise SystemExit(f"error: no run named {', '.join(unknown)}; choose from {', '.join(FLAGS)}")
    # paths given here are relative to the caller's folder; every command runs in the repository
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out) if args.out else "runs/cifar_budget"
    args.markdown = os.path.abspath(args.markdown) if args.markdown else ""
    os.chdir(REPO)
    archive = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10-jpeg.tar.gz")
    if not args.dry_run and not os.path.isdir(os.path.join(args.data, "train")):
        if not os.path.exists(archive):
            raise SystemExit(f"error: no CIFAR-10 tree at {args.data} and no archive at {archive}; pass --data")
        os.makedirs(os.path.dirname(os.path.abspath(args.data)), exist_ok=True)
        subprocess.run(["tar", "-xzf", archive, "-C", os.path.dirname(os.path.abspath(args.data))], check=True)
    runs = ["floor", *args.methods]
    done = []
    for name in runs:
        for what, command, writes in commands(name, args):
            print(f"# {name}: {what}\n{shlex.join(command)}", flush=True)
            done.append(shlex.join(command))
            if args.dry_run or (writes and os.path.exists(writes)):
                continue
            if subprocess.run([sys.executable, *command[1:]]).returncode != 0:
                raise SystemExit(f"error: {name}'s {what} failed (above); run the same command again to resume")
    if args.dry_run:
        return
    import torch
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lines = [f"{args.epochs} epochs on {args.subset} images (ResNet-18, ImageNet stem, 32 px, batch 256, bf16, "
             f"views batched); kNN k 200, T 0.1; linear probe {args.linear_epochs} epochs on cached features. "
             f"{machine}, {datetime.date.today()}.", "",
             "| run | kNN top-1 / top-5 (%) | linear top-1 / top-5 (%) | s / epoch | loss, first -> last epoch | "
             "flags |", "|---|---|---|---|---|---|", *(row(name, args) for name in runs)]
    print("\n" + "\n".join(lines))
    if args.markdown:
        write_section(args.markdown, "cifar_budget", "## What each method learns at a small CPU budget\n\nMeasured by "
                      "`python bench/cifar_budget.py " + " ".join(sys.argv[1:]) + "`:\n\n" + "\n".join(lines)
                      + "\n\nCommands:\n\n```\n" + "\n".join(done) + "\n```")


if __name__ == "__main__":
    main()
