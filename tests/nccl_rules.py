"""NCCL's rules for collectives, enforced under gloo, which accepts what NCCL rejects: every tensor handed to a
collective (input and outputs) is contiguous; NCCL raises "Tensors must be contiguous" otherwise, on the first
multi-GPU step. enforce() wraps torch.distributed's collectives in this process; run_ranks (tests/battery.py)
calls it in every gloo process, and run_torchrun (tests/helpers.py) starts every rank's script through this file:

    python -m torch.distributed.run ... tests/nccl_rules.py SCRIPT.py ARGS   # SCRIPT.py as __main__, rules on
"""
import functools
import runpy
import sys

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter")


class NonContiguousCollective(ValueError):
    pass


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _checked(name, collective):
    @functools.wraps(collective)
    def call(*args, **kwargs):
        for tensor in _tensors([*args, *kwargs.values()]):
            if not tensor.is_contiguous():
                raise NonContiguousCollective(f"dist.{name} was handed a non-contiguous tensor (shape "
                                              f"{tuple(tensor.shape)}, strides {tensor.stride()}): NCCL rejects it")
        return collective(*args, **kwargs)
    call.nccl_rules = True
    return call


def enforce():
    """Every collective of torch.distributed, as the scripts call it (dist.NAME), checks its tensors first."""
    for name in COLLECTIVES:
        collective = getattr(dist, name)
        if not getattr(collective, "nccl_rules", False):
            setattr(dist, name, _checked(name, collective))


if __name__ == "__main__":
    enforce()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
