"""MoCo's entry in the battery: one call runs both of moco_loss's forms against their per-query formulas, the
queue form of v1 / v2 (symmetric, "v2+") and the global-batch form of v3, then enqueues the keys.

The keys are plain inputs here: the stop-gradient is where the papers put it, on the key encoder (MoCo.forward
runs it under torch.no_grad(); tests/test_moco.py checks that)."""
import math

import torch
import torch.nn.functional as F

from battery import MethodCase

TEMPERATURE = 0.3


def moco_inputs():
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(8, 16, generator=g) for name in ("q1", "q2", "k1", "k2")}


def start_queue():
    """Two queues (views) of 16 unit keys: two global batches of 8."""
    return F.normalize(torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1)), dim=2)


def moco_call(module, x):
    queue = start_queue()
    loss = (module.moco_loss(x["q1"], x["q2"], x["k1"], x["k2"], TEMPERATURE, queue)  # v2+: the queues
            + module.moco_loss(x["q1"], x["q2"], x["k1"], x["k2"], TEMPERATURE))  # v3: the global batch
    queue = queue.clone()  # train() enqueues after the backward, which needs the queue the loss saw
    for view, keys in enumerate((x["k2"], x["k1"])):  # step 1: the keys of all ranks fill rows 8..15
        module.enqueue(queue[view], keys, step=1)
    return loss, {"queue": queue}


def moco_reference(x):
    """Per query q with its positive key k+ and negatives k_j, all compared by cosine:
    L = -log exp(q.k+ / T) / (exp(q.k+ / T) + sum_j exp(q.k_j / T)).
    v2+: the mean over queries of L(q1, k2; queue 0) and L(q2, k1; queue 1), averaged;
    v3: 2T x (mean L(q1_i, k2_i; other images' k2) + mean L(q2_i, k1_i; other images' k1))."""
    t, n = TEMPERATURE, len(x["q1"])
    rows = {name: x[name].double() for name in x}
    queue = start_queue().double()

    def nce(q, positive, negatives):
        pos = math.exp(F.cosine_similarity(q, positive, dim=0).item() / t)
        neg = sum(math.exp(F.cosine_similarity(q, k, dim=0).item() / t) for k in negatives)
        return -math.log(pos / (pos + neg))

    v2 = sum(nce(rows["q1"][i], rows["k2"][i], queue[0]) + nce(rows["q2"][i], rows["k1"][i], queue[1])
             for i in range(n)) / n / 2
    v3 = 2 * t * sum(nce(rows[q][i], rows[k][i], [rows[k][j] for j in range(n) if j != i])
                     for q, k in (("q1", "k2"), ("q2", "k1")) for i in range(n)) / n
    return v2 + v3


CASE = MethodCase(model="MoCo", inputs=moco_inputs, call=moco_call, reference=moco_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32", "--pred_hidden_dim", "64",
                         "--queue_size", "64"])
