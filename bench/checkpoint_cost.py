"""What the reliability guarantees cost (docs/reliability.md): a checkpoint of SimCLR's ImageNet model (ResNet-50
and its projector, with LARS momentum), written and read back as the scripts do, and the per-step checks.

    python bench/checkpoint_cost.py                     # ResNet-50, this machine's disk and CPU
    python bench/checkpoint_cost.py --arch resnet18 --out_dir /local/ssd/tmp

Prints one JSON object: checkpoint size (MB), time to save (the finite check, state_dict, write + fsync,
last.pt link) and to resume (load + copy into the model), the gradient norm every step adds, and the per-step
stop-signal agreement between two gloo processes (the `due()` all_reduce). Numbers depend on the disk
(fsync) and the host; run it on the cluster's file system to know yours."""
import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import simclr  # noqa: E402 (after the path set-up)
from common.checkpoints import Checkpointer  # noqa: E402
from common.config import load_config  # noqa: E402
from common.probe import OnlineProbe  # noqa: E402
from common.step_metrics import StepMetrics  # noqa: E402
from machine import machine  # noqa: E402 (bench/machine.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_of(n, fn):
    """The fastest of n timed calls (seconds)."""
    times = []
    for _ in range(n):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def agreement(rank, world_size, init_file, steps, out):
    """The per-step flag all_reduce of Checkpointer.due(), between two gloo processes on this host."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    flags = torch.zeros(2)
    for _ in range(100):  # warm-up
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    tic = time.perf_counter()
    for _ in range(steps):
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out, "w") as f:
            f.write(str((time.perf_counter() - tic) / steps))
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--out_dir", default="", help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = load_config(simclr.Config, ["--config", os.path.join(REPO, "configs", "simclr_imagenet.yaml"),
                                      "--arch", args.arch])
    folder = tempfile.mkdtemp(dir=args.out_dir or None)
    cfg.out_dir, cfg.keep_checkpoints = folder, 1
    model = simclr.SimCLR(cfg)
    optimizer = simclr.build_optimizer(cfg, model)
    for p in model.parameters():  # one step's worth of optimizer state: the momentum buffers
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    schedule = {"world_size": 1, "global_batch": 4096, "steps_per_epoch": 312, "total_steps": 31200, "peak_lr": 4.8}
    metrics = StepMetrics(folder)
    no_probe = OnlineProbe(cfg, model, None, 0, 1, torch.device("cpu"), "fp32")  # simclr_imagenet.yaml: probe_every 0
    checkpointer = Checkpointer(cfg, schedule, model, optimizer, scaler, metrics, no_probe, torch.device("cpu"), 0, 1)

    step = iter(range(1, 1000))
    save_s = best_of(args.repeats, lambda: checkpointer.save(next(step)))
    size_mb = os.path.getsize(os.path.join(folder, "last.pt")) / 2**20
    resume_s = best_of(args.repeats, checkpointer.resume)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm_ms = 1000 * best_of(20, lambda: torch.nn.utils.get_total_norm(grads))

    with tempfile.TemporaryDirectory() as tmp:
        out, steps = os.path.join(tmp, "us"), 2000
        mp.spawn(agreement, args=(2, os.path.join(tmp, "store"), steps, out), nprocs=2, join=True)
        with open(out) as f:
            agreement_us = 1e6 * float(f.read())
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)

    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"model": f"SimCLR {args.arch} (configs/simclr_imagenet.yaml)",
                      "parameters_M": round(params / 1e6, 1),
                      "checkpoint_MB": round(size_mb, 1), "save_s": round(save_s, 3), "resume_s": round(resume_s, 3),
                      "grad_norm_per_step_ms_cpu": round(grad_norm_ms, 2),
                      "signal_agreement_per_step_us_2_gloo_ranks": round(agreement_us, 1),
                      "host": machine(), "folder": args.out_dir or tempfile.gettempdir()}, indent=2))


if __name__ == "__main__":
    main()
