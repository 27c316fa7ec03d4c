"""One prepared check of every GPU-only path and of GPU speed, within --minutes (default 8), on one CUDA GPU.

    python bench/gpu_check.py                            # the whole check, about 8 minutes
    python bench/gpu_check.py --minutes 4 --data /path/to/cifar10-jpeg
    python bench/gpu_check.py --dry-run                  # anywhere: every command, and each one's settings parsed

In order (the essential checks first; a check that would start past the budget is recorded as not run):
  1. train     every method script under torchrun --nproc_per_node=--gpus (default 1: NCCL's set-up and every CUDA
               path of a script; SyncBatchNorm, DDP and the NCCL gathers across ranks need --gpus 2 or more) for a
               few dozen steps on in-memory synthetic images: ResNet-50 at 224 px, batch 64 a GPU, precision auto
               (bf16 on A100 / H100), MoCo v3 and DINO also with a ViT-S/16; each must end with a finite loss.
  2. fp16      SimCLR and DINO (ViT-S/16) again in fp16 with the GradScaler.
  3. sync      no host sync between log lines in bf16: a run in this process with torch.cuda.set_sync_debug_mode
               ("error") on between its log lines, for SimCLR, SwAV and MoCo v2.
  4. resume    SIGTERM in the middle of a run writes a checkpoint and exits with 75; the same command resumes and
               finishes.
  5. speed     images/s of SimCLR, MoCo, SwAV and DINO (ResNet-50), the model alone (forward + backward on pre-made
               views) against end to end with views made a batch at a time on the GPU, and peak GPU memory
               (bench/throughput.py), SimCLR's also with --compile; with --data (a JPEG CIFAR-10 ImageFolder),
               views decoded on the GPU (nvJPEG, batched) against per-image views in loader workers.
Each check may take twice its share of the time left (a check past it is stopped with its processes); one that
cannot start with 20 s is recorded as not run. --json is rewritten after every check, so a stopped run keeps what
it measured.
Writes --json (docs/gpu_check.json) and a section of --markdown (docs/benchmarks.md) with the machine, torch,
CUDA and every figure, and prints a one-screen summary. Without a GPU it says so in one line (--dry-run works
anywhere: the suite runs it, so the commands cannot rot)."""
import argparse
import datetime
import importlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from docs_section import write_section  # noqa: E402 (bench/docs_section.py)

BATCH, EPOCHS = 64, 2  # synthetic data: 1024 images, 16 steps of 64 an epoch
R50 = ["--arch", "resnet50", "--image_size", "224", "--cifar_stem", "false"]
# (name, script, config, overrides): every method with a ResNet-50, MoCo v3 and DINO also with a ViT-S/16
RUNS = [
    ("simclr", "simclr", "simclr_imagenet", []),
    ("moco_v2", "moco", "moco_v2_imagenet", []),
    ("moco_v3_vit", "moco", "moco_v3_vit_imagenet", []),
    ("simsiam", "simsiam", "simsiam_imagenet", []),
    ("byol", "byol", "byol_imagenet", []),
    ("barlow", "barlow", "barlow_imagenet", []),
    ("swav", "swav", "swav_imagenet", []),
    ("dino_r50", "dino", "dino", R50 + ["--local_size", "96"]),
    ("dino_vit", "dino", "dino_imagenet", []),
    ("nnclr", "nnclr", "nnclr_imagenet", []),
    ("relic", "relic", "relic_imagenet", []),
    ("supcon", "supcon", "supcon_imagenet", []),
]
SYNC = ("simclr", "swav", "moco_v2")
FP16 = ("simclr", "dino_vit")
SPEED = ("simclr", "moco", "swav", "dino")  # the speed of the others follows from these (docs/benchmarks.md)


@dataclass
class Check:
    kind: str  # train, fp16, sync, resume, speed
    name: str
    command: list  # argv, run from the repository
    script: str = ""  # the method script whose Config the command's settings must parse into
    settings: list = field(default_factory=list)  # the script's own arguments
    share: float = 1.0  # its part of the time budget, relative to the others


def run_settings(script, config, overrides, out_dir, precision="auto", epochs=EPOCHS):
    """The arguments of a short run of `script`: its config, synthetic images in memory, a few dozen steps, the
    online probe trained every step and checked every epoch (its NCCL all_reduce and its step in the sync check)."""
    settings = ["--config", f"configs/{config}.yaml", *overrides, "--dataset", "synthetic", "--data_dir", "",
                "--epochs", str(epochs), "--warmup_epochs", "0", "--batch_size", str(BATCH),
                "--num_workers", "4", "--knn_every", "0", "--probe_every", "1", "--log_every", "5",
                "--checkpoint_every_minutes", "0", "--precision", precision, "--out_dir", out_dir]
    if script == "swav":
        settings += ["--queue_size", "0"]  # the queue needs whole global batches of the recipe's 256
    if script in ("moco", "nnclr"):
        settings += ["--queue_size", str(BATCH * 16)]  # a multiple of this global batch
    return settings


def plan(args, out):
    """Every check, in the order it runs."""
    checks = []
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"]
    for name, script, config, overrides in RUNS:
        settings = run_settings(script, config, overrides, os.path.join(out, "train", name))
        checks.append(Check("train", name, torchrun + [f"{script}.py", *settings], script, settings))
    for name, script, config, overrides in RUNS:
        if name in FP16:
            settings = run_settings(script, config, overrides, os.path.join(out, "fp16", name), precision="fp16")
            checks.append(Check("fp16", name, torchrun + [f"{script}.py", *settings], script, settings))
    for name, script, config, overrides in RUNS:
        if name in SYNC:
            settings = run_settings(script, config, overrides, os.path.join(out, "sync", name))
            checks.append(Check("sync", name, [sys.executable, os.path.abspath(__file__), "--sync", script, *settings],
                                script, settings))
    settings = run_settings("simclr", "simclr_imagenet", [], os.path.join(out, "resume", "simclr"), epochs=4)
    settings[settings.index("--log_every") + 1] = "1"
    checks.append(Check("resume", "simclr", [sys.executable, "simclr.py", *settings], "simclr", settings, share=1.5))
    speed = [sys.executable, "bench/throughput.py", "--batch_size", str(BATCH), "--steps", "10", "--warmup_steps",
             "3", "--repeats", "1", "--num_workers", "8", "--no-view-rates"]
    r50 = [*R50, "--local_size", "96"]
    checks.append(Check("speed", "synthetic", speed + ["--methods", *SPEED, *r50, "--modes", "model", "batched",
                                                      "--json", os.path.join(out, "speed.json")], share=3.0))
    checks.append(Check("speed", "synthetic, torch.compile", speed + [  # compiling takes a minute a model
        "--methods", "simclr", *r50, "--modes", "model", "batched", "--compile", "true", "--json",
        os.path.join(out, "speed_compiled.json")], share=2.0))
    if args.data:  # 32-px JPEGs: the decoding and the views, not the model, are what is measured
        checks.append(Check("speed", "jpeg folder", speed + [
            "--methods", "simclr", "swav", "--arch", "resnet18", "--image_size", "32", "--local_size", "16",
            "--dataset", "folder", "--data_dir", args.data, "--modes", "batched", "workers", "--json",
            os.path.join(out, "speed_folder.json")], share=1.5))
    return checks


def parse_settings(check):
    """The check's settings as its script would take them: a method script's Config, or bench/throughput.py's
    arguments (a bad key or value stops with its message)."""
    from common.config import load_config
    if check.script:
        return load_config(importlib.import_module(check.script).Config, check.settings)
    return importlib.import_module("throughput").build_parser().parse_args(check.command[2:])


def sync_check(script, settings):
    """In this process: `script`'s train() with torch.cuda.set_sync_debug_mode("error") between its log lines.
    Reading the metrics (every log_every steps), saving a checkpoint and the end of an epoch may wait for the GPU;
    a step that does raises RuntimeError, which ends the run with a traceback."""
    import torch

    from common.checkpoints import Checkpointer
    from common.config import load_config
    from common.step_metrics import StepMetrics
    module = importlib.import_module(script)
    cfg = load_config(module.Config, settings)

    def allowed(method):
        def wrapped(*a, **k):
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("default")
            try:
                return method(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        return wrapped
    StepMetrics.read, StepMetrics.read_epoch = allowed(StepMetrics.read), allowed(StepMetrics.read_epoch)
    Checkpointer.save = allowed(Checkpointer.save)
    real_loader = module.pretrain_loader

    def loader(*a):  # the first batch (cuDNN's benchmark, the allocator's warm-up) may wait; then none may
        made = real_loader(*a)

        class Armed:
            sampler, images = made.sampler, getattr(made, "images", None)

            def __len__(self):
                return len(made)

            def __iter__(self):
                for i, batch in enumerate(made):
                    if i == 1:
                        torch.cuda.set_sync_debug_mode("error")
                    yield batch
        return Armed()
    module.pretrain_loader = loader
    module.train(cfg)
    torch.cuda.set_sync_debug_mode("default")


def last_loss(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        losses = [line["train/loss"] for line in map(json.loads, f) if "train/loss" in line]
    return losses[-1] if losses else math.nan


def run(command, timeout, signal_when=None):
    """Run `command` in its own process group; stop the whole group (torchrun's workers, a benchmark's children) when
    `timeout` passes. signal_when(): polled every 0.2 s, SIGTERM to the command once it returns True. Returns
    (exit status, stdout, stderr); raises subprocess.TimeoutExpired after stopping the group."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + timeout
    while signal_when and process.poll() is None and time.time() < deadline:
        if signal_when():
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    try:
        out, err = process.communicate(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return process.returncode, out, err


def resume_check(check, timeout):
    """SIGTERM in the first epoch, once the run has logged 3 steps: it must checkpoint and exit with 75; the same
    command then resumes and finishes."""
    out_dir = check.settings[check.settings.index("--out_dir") + 1]
    metrics, tic = os.path.join(out_dir, "metrics.jsonl"), time.time()

    def logged_3_steps():
        return os.path.exists(metrics) and sum(1 for line in open(metrics) if '"train/loss"' in line) >= 3
    status, _, err = run(check.command, timeout / 2, signal_when=logged_3_steps)
    if status != 75:
        return {"ok": False, "detail": f"first run exited with {status}, not 75: {err[-300:]}"}
    second = subprocess.CompletedProcess(check.command, *run(check.command, timeout - (time.time() - tic)))
    ok = second.returncode == 0 and "resuming from" in second.stdout and math.isfinite(last_loss(out_dir))
    return {"ok": ok, "detail": "checkpointed on SIGTERM (75), resumed and finished" if ok else
            f"resume exited with {second.returncode}: {second.stderr[-300:]}"}


def run_check(check, timeout):
    if check.kind == "resume":
        return resume_check(check, timeout)
    done = subprocess.CompletedProcess(check.command, *run(check.command, timeout))
    if done.returncode != 0:
        return {"ok": False, "detail": f"exited with {done.returncode}: {done.stderr.strip()[-300:]}"}
    if check.kind == "speed":
        json_path = check.command[check.command.index("--json") + 1]
        with open(json_path) as f:
            measured = json.load(f)
        return {"ok": True, "detail": f"measured ({measured['precision']})", "rows": measured["results"]}
    out_dir = check.settings[check.settings.index("--out_dir") + 1]
    loss = last_loss(out_dir)
    with open(os.path.join(out_dir, "config.json")) as f:
        precision = json.load(f)["precision"]
    return {"ok": math.isfinite(loss), "detail": f"last loss {loss:.4g}, {precision}", "loss": loss,
            "precision": precision}


def main():
    if sys.argv[1:2] == ["--sync"]:  # a child: --sync SCRIPT, then the script's own arguments
        return sync_check(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="the time budget of the whole check")
    parser.add_argument("--gpus", type=int, default=1, help="ranks of the train checks (2 or more: SyncBatchNorm, "
                                                          "DDP and the NCCL gathers across ranks)")
    parser.add_argument("--data", default="", help="a JPEG CIFAR-10 ImageFolder tree (train/, val/) for the views' "
                                                   "speed from files")
    parser.add_argument("--out", default="", help="the runs' folder (default: a temporary one)")
    parser.add_argument("--json", default="docs/gpu_check.json")
    parser.add_argument("--markdown", default="docs/benchmarks.md")
    parser.add_argument("--dry-run", action="store_true", help="print every command and parse its settings")
    args = parser.parse_args()
    if args.minutes <= 0 or args.gpus < 1:
        raise SystemExit(f"error: --minutes and --gpus must be positive, got {args.minutes:g} and {args.gpus}")
    out = args.out or tempfile.mkdtemp(prefix="gpu_check_")
    checks = plan(args, out)
    if args.dry_run:
        for check in checks:
            parse_settings(check)  # a bad key or value stops here, naming it
            print(f"[{check.kind}] {check.name}: " + shlex.join(check.command))
        print(f"{len(checks)} checks; every method run's settings parse")
        return
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/gpu_check.py needs a CUDA GPU and none is visible; python bench/gpu_check.py "
                         "--dry-run prints and checks its commands anywhere")
    from machine import machine  # bench/machine.py
    budget, start = 60 * args.minutes, time.time()
    results = []
    report = {"date": str(datetime.date.today()), "machine": machine(), "gpu": torch.cuda.get_device_name(0),
              "gpus": args.gpus, "torch": torch.__version__, "cuda": torch.version.cuda, "minutes": args.minutes,
              "seconds": 0, "results": results}
    for i, check in enumerate(checks):  # each may take twice its share of what is left, so the whole stays within
        left = budget - (time.time() - start)
        timeout = min(left, 2 * left * check.share / sum(c.share for c in checks[i:]))
        if timeout < 20:
            results.append({"kind": check.kind, "name": check.name, "ok": None, "detail": "not run (time)"})
            continue
        try:
            result = run_check(check, timeout)
        except subprocess.TimeoutExpired:
            result = {"ok": False, "detail": f"stopped after {timeout:.0f} s"}
        results.append({"kind": check.kind, "name": check.name, **result})
        print(f"[{check.kind}] {check.name}: {'ok' if result['ok'] else 'FAILED'} ({result['detail']})", flush=True)
        report["seconds"] = round(time.time() - start)
        with open(os.path.join(REPO, args.json), "w") as f:  # after every check: a stopped run keeps its results
            json.dump(report, f, indent=2)
    lines = [f"Measured {report['date']} by `python bench/gpu_check.py {' '.join(sys.argv[1:])}` on "
             f"{report['gpu']} ({report['machine']}), torch {report['torch']}, CUDA {report['cuda']}: "
             f"{report['seconds']} s.", "", "| check | run | result |", "|---|---|---|"]
    lines += [f"| {r['kind']} | {r['name']} | {'ok' if r['ok'] else 'not run' if r['ok'] is None else 'FAILED'}: "
              f"{r['detail']} |" for r in results]
    for r in results:
        for row in r.get("rows", []):
            lines.append(f"| speed ({r['name']}) | {row['method']} | "
                         + ", ".join(f"{k} {v}" for k, v in row.items() if k != "method") + " |")
    write_section(os.path.join(REPO, args.markdown), "gpu_check", "## GPU check\n\n" + "\n".join(lines))
    print("\n".join(lines))
    if not all(r["ok"] for r in results if r["ok"] is not None):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
