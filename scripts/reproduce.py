"""Full-length reproductions on GPU machines: every method's recipe in configs/, then knn_eval.py and
linear_eval.py on its last checkpoint, then a table of each measured number beside the published one.

    python scripts/reproduce.py cifar10|imagenet [--gpus N] [--data DIR] [--out DIR] [--dry-run] [NAME ...]

(scripts/reproduce_cifar10.sh and scripts/reproduce_imagenet.sh call it.) Each run keeps its recipe's global
batch: the per-GPU batch is the global batch / N. Run the same command again after an interruption: a
pre-training run resumes (resume: auto) and the evaluations already written are kept. --dry-run prints every
command and runs none; `--report` prints the table of what is there so far.

Targets (../shared/reference/methods.md and the configs' headers): CIFAR-10, solo-learn's ONLINE linear probe
after 1000 epochs (our probe is offline: 100 epochs of SGD on the frozen trunk, with crops and flips) and
lightly's kNN (k 200, T 0.1, 800 epochs at batch 512: a different recipe, shown for scale). ImageNet, each
paper's linear top-1 at the epochs the config runs, measured with the linear protocol of its official code
where linear_eval.py can express it (the comment above IMAGENET), and DINO's k-NN (k 20, T 0.07).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field


@dataclass
class Run:
    name: str  # the run's folder under --out
    config: str  # configs/<config>.yaml
    global_batch: int  # the recipe's images per step over all GPUs
    linear: float  # the published linear top-1 (%), or None
    knn: float = None  # the published kNN top-1 (%), or None
    source: str = ""  # where the target comes from
    pretrain: list = field(default_factory=list)  # extra pre-training flags
    probe: list = field(default_factory=list)  # linear_eval.py flags (the official protocol), beside its batch
    probe_batch: int = 256  # the linear probe's global batch

    @property
    def script(self):
        return self.config.split("_")[0] + ".py"


SOLO = "solo-learn online linear, 1000 ep; lightly kNN, 800 ep"
CIFAR10 = [
    Run("simclr", "simclr", 256, 90.74, 87.9, SOLO),
    Run("moco_v2", "moco_v2", 256, 92.94, 89.9, SOLO),
    Run("moco_v3", "moco_v3", 256, 93.10, None, SOLO),
    Run("simsiam", "simsiam", 256, 90.51, 90.4, SOLO),
    Run("byol", "byol", 256, 92.58, 91.0, SOLO),
    Run("barlow", "barlow", 256, 92.10, 85.9, SOLO),
    Run("swav", "swav", 256, 89.17, 88.4, SOLO),
    Run("dino", "dino", 256, 89.52, 84.8, SOLO),
    Run("nnclr", "nnclr", 256, 91.88, 89.2, SOLO),
    Run("supcon", "supcon", 256, 93.82, None, SOLO + " (uses the labels)"),
    Run("relic", "relic", 256, None, None, "no published CIFAR recipe"),
]
# The linear probes of the official code (or the paper where there is none), as far as linear_eval.py expresses
# them (SGD with momentum 0.9 or LARS, lr per 256 images, cosine; no Nesterov, no step schedule, the last block's
# features only): MoCo v1/v2 main_lincls.py lr 30 at batch 256, no wd, 100 epochs (a step schedule there);
# MoCo v3 lr 0.1 (ViT: 3) per 256 at 1024, 90 epochs; SimSiam LARS lr 0.1 per 256 at 4096, 90 epochs; SwAV
# eval_linear.py lr 0.3 at 256, wd 1e-6, 100 epochs; DINO eval_linear.py lr 0.001 per 256 at 1024, 100 epochs
# (ViT-S/16: the CLS tokens of its last 4 blocks, here the last one's); Barlow Twins evaluate.py lr 0.3 at 256,
# wd 1e-6, 100 epochs; SimCLR (App. B.6) lr 0.1 per 256 at 4096, 90 epochs, Nesterov; BYOL (official eval config)
# lr 0.2 per 256 at 1024, 80 epochs, Nesterov, also for NNCLR and ReLIC, whose papers follow BYOL's protocol and
# state no lr; SupCon's head-only script: lr 0.1 per 256 at 6144, wd 1e-6, 90 epochs (the paper's RMSProp
# stage is not expressible here).
MOCO_PROBE = ["--lr", "30", "--epochs", "100"]
BYOL_PROBE = ["--lr", "0.2", "--epochs", "80"]
IMAGENET = [
    Run("moco_v1", "moco_v1_imagenet", 256, 60.6, None, "MoCo v1 paper, 200 ep", probe=MOCO_PROBE),
    Run("moco_v2", "moco_v2_imagenet", 256, 67.5, None, "MoCo v2 paper, 200 ep", probe=MOCO_PROBE),
    Run("moco_v3", "moco_v3_imagenet", 4096, 68.9, None, "moco-v3 CONFIG.md, R50 100 ep",
        probe=["--lr", "0.1", "--epochs", "90"], probe_batch=1024),
    Run("moco_v3_vit", "moco_v3_vit_imagenet", 4096, 73.2, None, "MoCo v3 paper, ViT-S 300 ep",
        probe=["--lr", "3", "--epochs", "90"], probe_batch=1024),
    Run("simclr", "simclr_imagenet", 4096, 69.3, None, "SimCLR paper, 1000 ep", pretrain=["--epochs", "1000"],
        probe=["--lr", "0.1", "--epochs", "90"], probe_batch=4096),
    Run("simsiam", "simsiam_imagenet", 512, 68.1, None, "SimSiam paper Table 4, 100 ep",
        probe=["--optimizer", "lars", "--lr", "0.1", "--epochs", "90"], probe_batch=4096),
    Run("byol", "byol_imagenet", 4096, 74.3, None, "BYOL paper, 1000 ep", probe=BYOL_PROBE, probe_batch=1024),
    Run("barlow", "barlow_imagenet", 2048, 73.5, None, "Barlow Twins README (main.py, 16 GPUs), 1000 ep",
        probe=["--lr", "0.3", "--weight_decay", "1e-6", "--epochs", "100"]),
    Run("swav", "swav_imagenet", 256, 72.7, None, "swav_200ep_bs256_pretrain.sh, 200 ep",
        probe=["--lr", "0.3", "--weight_decay", "1e-6", "--epochs", "100"]),
    Run("dino", "dino_imagenet", 512, 74.0, 69.3, "dino README, ViT-S/16 100 ep",
        probe=["--lr", "0.001", "--epochs", "100"], probe_batch=1024),
    Run("nnclr", "nnclr_imagenet", 4096, 75.6, None, "NNCLR paper, 1000 ep", probe=BYOL_PROBE, probe_batch=1024),
    Run("relic", "relic_imagenet", 4096, 70.3, None, "ReLIC paper, 1000 ep", probe=BYOL_PROBE, probe_batch=1024),
    Run("supcon", "supcon_imagenet", 6144, 77.9, None, "SupCon paper Supp. Table 9 (SimAugment), 350 ep",
        probe=["--lr", "0.1", "--weight_decay", "1e-6", "--epochs", "90"], probe_batch=6144),
]
SUITES = {"cifar10": (CIFAR10, [], ["--k", "200", "--temperature", "0.1"]),
          "imagenet": (IMAGENET, [], ["--k", "20", "--temperature", "0.07"])}


def commands(suite, run, gpus, data, out):
    """(what, command, the JSON it writes or None) for the pre-training, kNN and linear probe of one run."""
    _, pretrain_flags, knn_flags = SUITES[suite]
    for what, batch in (("global batch", run.global_batch), ("linear probe's global batch", run.probe_batch)):
        if batch % gpus:
            raise SystemExit(f"error: {run.name}'s {what} {batch} does not split over {gpus} GPUs; pick --gpus "
                             "that divides it")
    launch = ["torchrun", f"--nproc_per_node={gpus}"] if gpus > 1 else ["python"]  # run as sys.executable
    folder = os.path.join(out, run.name)
    checkpoint = os.path.join(folder, "last.pt")
    probe = [*run.probe, "--batch_size", str(run.probe_batch // gpus)]
    return [("pre-train", [*launch, run.script, "--config", f"configs/{run.config}.yaml", "--data_dir", data,
                           "--out_dir", folder, "--batch_size", str(run.global_batch // gpus), *pretrain_flags,
                           *run.pretrain], None),
            ("kNN", [*launch, "knn_eval.py", "--checkpoint", checkpoint, *knn_flags, "--out",
                     os.path.join(folder, "knn.json")], os.path.join(folder, "knn.json")),
            ("linear", [*launch, "linear_eval.py", "--checkpoint", checkpoint, *probe, "--out",
                        os.path.join(folder, "linear.json")], os.path.join(folder, "linear.json"))]


def top1(path):
    try:
        with open(path) as f:
            return f"{json.load(f)['top1']:.2f}"
    except (OSError, ValueError, KeyError):
        return "-"


def report(suite, runs, out):
    print(f"\n{suite}: measured (this reproduction) beside published, top-1 %")
    print("| run | linear | published | kNN | published kNN | source |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        folder = os.path.join(out, run.name)
        published = [f"{v:.2f}" if v is not None else "-" for v in (run.linear, run.knn)]
        print(f"| {run.name} | {top1(os.path.join(folder, 'linear.json'))} | {published[0]} | "
              f"{top1(os.path.join(folder, 'knn.json'))} | {published[1]} | {run.source} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Full-length reproductions of every method (GPU machines).")
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("names", nargs="*", help="runs to do (default: all)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of this machine (torchrun when > 1)")
    parser.add_argument("--data", default=None, help="data set root (default: data for cifar10; required "
                                                     "for imagenet: an ImageFolder tree with train/ and val/)")
    parser.add_argument("--out", default=None, help="runs' folder (default: runs/reproduce_<suite>)")
    parser.add_argument("--dry-run", action="store_true", help="print every command, run none")
    parser.add_argument("--report", action="store_true", help="print the table of the results so far, run none")
    args = parser.parse_intermixed_args(argv)
    # paths given here are relative to the caller's folder; the defaults, and every command, to the repository
    args.data, args.out = [os.path.abspath(path) if path else None for path in (args.data, args.out)]
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    runs = SUITES[args.suite][0]
    unknown = sorted(set(args.names) - {run.name for run in runs})
    if unknown:
        raise SystemExit(f"error: no run named {', '.join(unknown)} in {args.suite}; choose from "
                         f"{', '.join(run.name for run in runs)}")
    if args.gpus < 1:
        raise SystemExit(f"error: --gpus must be at least 1, got {args.gpus}")
    data = args.data or ("data" if args.suite == "cifar10" else None)
    if data is None and not (args.dry_run or args.report):
        raise SystemExit("error: imagenet needs --data DIR (an ImageFolder tree with train/ and val/)")
    out = args.out or f"runs/reproduce_{args.suite}"
    selected = [run for run in runs if not args.names or run.name in args.names]
    if not args.report and args.suite == "cifar10":  # once, here: every torchrun rank downloading it would race
        fetch = ["python", "-c", "import sys, torchvision; [torchvision.datasets.CIFAR10(sys.argv[1], train=t, "
                 "download=True) for t in (True, False)]", data]
        print(f"# cifar10: download it into {data} once\n{shlex.join(fetch)}", flush=True)
        if not args.dry_run and subprocess.run([sys.executable, *fetch[1:]]).returncode != 0:
            raise SystemExit(f"error: could not download CIFAR-10 into {data} (above); put it there by hand")
    if not args.report:
        for run in selected:
            for what, command, writes in commands(args.suite, run, args.gpus, data or "/path/to/imagenet", out):
                print(f"# {run.name}: {what}\n{shlex.join(command)}", flush=True)
                if args.dry_run or (writes and os.path.exists(writes)):
                    continue
                if subprocess.run([sys.executable, *command[1:]] if args.gpus == 1 else command).returncode != 0:
                    raise SystemExit(f"error: {run.name}'s {what} failed (above); run the same command again to "
                                     "resume it")
    if not args.dry_run:
        report(args.suite, selected, out)


if __name__ == "__main__":
    main()
