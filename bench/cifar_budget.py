"""What each method learns at one small budget on real images: every method script pre-trained on the same
10,000-image subset of a JPEG copy of CIFAR-10 (--data: an ImageFolder tree with train/ and val/; ResNet-18 with
the ImageNet stem at 32 px, batch 256, precision auto: bf16 where the CPU computes it natively, else fp32; 20
epochs = 780 steps by default), then knn_eval.py (k 200, T 0.1, the 45k train images as the bank, the 5k val images
as queries) and a short linear probe (linear_eval.py on cached features), beside the same evaluations of a randomly
initialised trunk (the floor); the pre-training's own online linear probe (--probe_every, the metric of solo-learn's
CIFAR-10 numbers) is checked on the same val images. SimCLR runs with two seeds, to show the noise.

    python bench/cifar_budget.py --data DIR            # every method (hours on 2 CPU cores)
    python bench/cifar_budget.py --methods swav dino   # some of them
    python bench/cifar_budget.py --dry-run             # the commands only
    python bench/cifar_budget.py --methods simclr --json docs/cifar_budget.json --markdown docs/benchmarks.md

Each method trains with the flags below (FLAGS: its recipe, or the settings that suit this budget, said on
its page in docs/methods/). Finished steps are not redone (their JSON is there), a stopped pre-training
resumes. The table (top-1 / top-5 of both evaluations, seconds per epoch, the loss's first and last epoch) is
printed, and written with the machine, the date and each run's commands to --markdown (docs/benchmarks.md) after
every run. --json keeps each run's row in a file with the rows of earlier invocations (replacing a run's earlier
row), and the --markdown table then shows them all: the runs of a table that takes longer than one sitting can be
made in several. A method whose loss does not fall, or a contrastive method that does not clear the floor, is a
bug to find.
"""
import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys

from docs_section import write_section  # bench/docs_section.py
from machine import machine  # bench/machine.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SGD = ["--optimizer", "sgd", "--lr", "0.12", "--warmup_epochs", "0", "--weight_decay", "5e-4"]
MULTI_CROP = ["--num_local", "2", "--local_size", "24"]  # the smallest local crops the ImageNet stem takes in bf16
FLAGS = {  # name: (script, flags)
    "simclr": ("simclr", [*SGD, "--temperature", "0.5"]),
    "simclr_seed1": ("simclr", [*SGD, "--temperature", "0.5", "--seed", "1"]),
    "moco": ("moco", ["--proj_layers", "1", "--proj_dim", "128", "--queue_size", "4096", "--temperature", "0.1",
                      "--base_ema", "0.99", "--final_ema", "0.99", "--lr", "0.06", "--weight_decay", "5e-4",
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
                      "--num_prototypes", "2048", "--base_ema", "0.99", "--teacher_temperature", "0.04",
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
                           "--probe_every", str(args.probe_every), "--out_dir", folder, *flags], None),
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


def measure(name, args, where):
    """One finished run's numbers: the evaluations, seconds per epoch, the loss of its first and last epochs, its
    flags and commands, the precision it computed in, the machine and the date."""
    folder = os.path.join(args.out, name)
    found = {what: _read(os.path.join(folder, f"{what}.json"), "top1", "top5") for what in ("knn", "linear")}
    precision = _read(os.path.join(folder, "config.json"), "precision") or _read(
        os.path.join(folder, "knn.json"), "precision")  # the pre-training's; the floor has only evaluations
    epochs, probes = [], []
    if os.path.exists(os.path.join(folder, "metrics.jsonl")):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        epochs = [m for m in lines if "train/epoch_loss" in m]
        probes = [[m["eval/probe_top1"], m["eval/probe_top5"]] for m in lines if "eval/probe_top1" in m]
    found["probe"] = probes[-1] if probes else None  # the online probe at the last check (--probe_every)
    rates = sorted(m["train/images_per_s"] for m in epochs)
    return {"run": name, **found, "s_per_epoch": round(args.subset / rates[len(rates) // 2]) if epochs else None,
            "loss": [epochs[0]["train/epoch_loss"], epochs[-1]["train/epoch_loss"]] if epochs else None,
            "epochs": args.epochs, "subset": args.subset, "linear_epochs": args.linear_epochs,
            "flags": FLAGS[name][1] if name in FLAGS else [],
            "commands": [shlex.join(command) for _, command, _ in commands(name, args)],
            "precision": precision[0] if precision else None, "machine": where,
            "date": str(datetime.date.today())}


def table_row(r, machines):
    cells = [f"{r[what][0]:.2f} / {r[what][1]:.2f}" if r.get(what) else "-"
             for what in ("knn", "linear", "probe")]
    loss = f"{r['loss'][0]:.3f} -> {r['loss'][1]:.3f}" if r["loss"] else "-"
    flags = f"`{shlex.join(r['flags'])}`" if r["flags"] else "-"
    return (f"| {r['run']} | {cells[0]} | {cells[1]} | {cells[2]} | {r['s_per_epoch'] or '-'} | {loss} | {flags} | "
            f"{r['date']} [{machines.index(machine_of(r)) + 1}] |")


def machine_of(r):
    return f"{r['machine']}, computing in {r.get('precision') or 'an unrecorded precision'}"


def keep(path, row):
    """Adds `row` to the runs kept in the JSON file at path (replacing an earlier row of the same run, keeping the
    others) and returns them all."""
    kept = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                kept = {r["run"]: r for r in json.load(f)}
        except (ValueError, TypeError, KeyError) as error:
            raise SystemExit(f"error: {path} is not a list of this script's rows ({error!r}); fix or move it, then "
                             "run the same command again (the finished runs are not redone)")
    kept[row["run"]] = row
    with open(path + ".tmp", "w") as f:  # written whole, then put in place: a stop never leaves half a file
        json.dump(list(kept.values()), f, indent=1)
    os.replace(path + ".tmp", path)
    return list(kept.values())


def table(rows, args):
    """The markdown table of `rows` (the floor first, then FLAGS' order), naming each machine and budget."""
    order = ["floor", *FLAGS]
    rows = sorted(rows, key=lambda r: order.index(r["run"]) if r["run"] in order else len(order))
    budgets = sorted({f"{r['epochs']} epochs on {r['subset']} images" for r in rows if r["run"] != "floor"})
    probes = sorted({str(r["linear_epochs"]) for r in rows})
    machines = sorted({machine_of(r) for r in rows})
    return [f"Pre-training: {', '.join(budgets) or '-'} (ResNet-18, ImageNet stem, 32 px, batch 256, precision auto, "
            f"views batched); kNN k 200, T 0.1; linear probe {' or '.join(probes)} epochs on cached features. "
            "Machines (the `measured` column's numbers): "
            + "; ".join(f"[{i + 1}] {m}" for i, m in enumerate(machines)) + ".", "",
            "| run | kNN top-1 / top-5 (%) | linear top-1 / top-5 (%) | online probe top-1 / top-5 (%), last check | "
            "s / epoch | loss, first -> last epoch | flags | measured |", "|---|---|---|---|---|---|---|---|",
            *(table_row(r, machines) for r in rows)]


def write_markdown(args, rows, argv):
    """The section of --markdown: the table of `rows`, how it was made and each row's commands."""
    how = f"`python bench/cifar_budget.py {shlex.join(argv)}`"
    if args.json:
        how += f", with the rows of earlier invocations kept in `{os.path.relpath(args.json)}`"
    run_commands = [line for r in rows for line in [f"# {r['run']}", *r["commands"]]]
    write_section(args.markdown, "cifar_budget", "\n".join([
        "## What each method learns at a small CPU budget", "",
        f"Written by {how}; the `measured` column says when each row was, the commands below how.", "",
        *table(rows, args), "", "Each run's commands:", "", "```", *run_commands, "```"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(FLAGS), help=f"runs, from: {', '.join(FLAGS)}")
    parser.add_argument("--data", default="/tmp/cifar10-jpeg", help="the JPEG CIFAR-10 tree (train/, val/); "
                        "extracted there from ../shared/data/cifar10-jpeg.tar.gz if missing")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--subset", type=int, default=10000, help="pre-training images")
    parser.add_argument("--linear_epochs", type=int, default=30, help="the linear probe's epochs (cached features)")
    parser.add_argument("--probe_every", type=int, default=5, help="the pre-training's online linear probe: its "
                        "val checks every this many epochs (the column of the last one; 0: none)")
    parser.add_argument("--out", default=None, help="runs' folder (default: runs/cifar_budget in the repository)")
    parser.add_argument("--markdown", default="", help="write the table to this file too (docs/benchmarks.md)")
    parser.add_argument("--json", default="", help="keep each run's numbers in this file, with those of earlier "
                        "invocations (docs/cifar_budget.json); the --markdown table then shows them all")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(FLAGS))
    if unknown:
        raise SystemExit(f"error: no run named {', '.join(unknown)}; choose from {', '.join(FLAGS)}")
    # paths given here are relative to the caller's folder; every command runs in the repository
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out) if args.out else "runs/cifar_budget"
    args.markdown = os.path.abspath(args.markdown) if args.markdown else ""
    args.json = os.path.abspath(args.json) if args.json else ""
    os.chdir(REPO)
    archive = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10-jpeg.tar.gz")
    if not args.dry_run and not os.path.isdir(os.path.join(args.data, "train")):
        if not os.path.exists(archive):
            raise SystemExit(f"error: no CIFAR-10 tree at {args.data} and no archive at {archive}; pass --data")
        os.makedirs(os.path.dirname(os.path.abspath(args.data)), exist_ok=True)
        subprocess.run(["tar", "-xzf", archive, "-C", os.path.dirname(os.path.abspath(args.data))], check=True)
    where = ""
    if not args.dry_run:
        where = machine()
    rows = []
    for name in ["floor", *args.methods]:
        for what, command, writes in commands(name, args):
            print(f"# {name}: {what}\n{shlex.join(command)}", flush=True)
            if args.dry_run or (writes and os.path.exists(writes)):
                continue
            if subprocess.run([sys.executable, *command[1:]]).returncode != 0:
                raise SystemExit(f"error: {name}'s {what} failed (above); run the same command again to resume")
        if args.dry_run:
            continue
        rows.append(measure(name, args, where))  # written after every run: a stopped session keeps its rows
        shown = keep(args.json, rows[-1]) if args.json else rows  # --json: with earlier invocations' rows
        if args.markdown:
            write_markdown(args, shown, argv)
    if not args.dry_run:
        print("\n" + "\n".join(table(rows, args)))


if __name__ == "__main__":
    main()
