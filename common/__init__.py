"""Thin shared plumbing: datasets, augmentations, backbones, config parsing, run folder, kNN.

Nothing here knows about a method: losses, gathers, EMA, queues and schedules live in the method scripts.
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
