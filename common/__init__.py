"""Thin shared plumbing that knows no method: losses, gathers, EMA, queues, schedules and the training loop live in
the method scripts.

    config.py        parsing (defaults < --config file.yaml < --key value) and PretrainConfig, the data and run
                     settings every pre-training script shares
    data.py          data sets, samplers, subsets, unreadable images
    augment.py       the views of each recipe, per image (torchvision transforms)
    batched.py       the same views a batch at a time on the device, and JPEG folders decoded a batch at a time
    loaders.py       pretrain_loader: the pre-training loader for either view path
    backbones.py     ResNets, ViTs and any torchvision classifier as a trunk; the CIFAR stem
    knn.py           the weighted kNN classifier and the online kNN monitor
    probe.py         the online linear probe: trained every step on the detached trunk features, checked on val
    distributed.py   torchrun set-up (NCCL / gloo, a collective timeout) and lost ranks
    precision.py     the precision a run computes in, autocast, non-blocking copies
    run_folder.py    the run folder's checks, config.json and metrics.jsonl
    checkpoints.py   checkpoints that survive kills, exact resume, loading a trunk for evaluation
    stopping.py      stop signals and the exit statuses of a run stopped early
    step_metrics.py  per-step scalars kept on the device, read every log_every steps


Importing it checks the torch and torchvision floor (requirements.txt): below it a script stops with one line.
"""
import re

import torch
import torchvision

# the oldest versions that have every API the scripts use (torch.nn.utils.get_total_norm arrived in torch 2.6);
# requirements.txt says the same (a test holds them together), and a scratch install of exactly this pair
# passes the quick tier
MIN_TORCH, MIN_TORCHVISION = "2.6", "0.21"


def _release(version):
    """(major, minor) of a version string such as '2.14.1+cu130' or '0.21.0a0'."""
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())


for _name, _found, _needed in (("torch", torch.__version__, MIN_TORCH),
                               ("torchvision", torchvision.__version__, MIN_TORCHVISION)):
    if _release(str(_found)) < _release(_needed):
        raise SystemExit(f"error: this code needs {_name} >= {_needed} (found {_found}); "
                         "pip install -r requirements.txt")
