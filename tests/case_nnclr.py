"""NNCLR's entry in the battery: the nearest neighbours looked up in a support set, the symmetric loss against
its per-sample formula, and the support set (projections and their classes) after the enqueue: 2 ranks with half
the batch each = 1 process with the whole batch."""
import math

import torch
import torch.nn.functional as F

from battery import MethodCase

TEMPERATURE = 0.3


def nnclr_inputs():
    g = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(8, 16, generator=g) for name in ("z1", "z2", "p1", "p2")}
    return {**inputs, "labels": torch.randint(0, 3, (8,), generator=g)}


def start_queue():
    """A support set of 16 unit vectors, two global batches of 8, and their classes (built the same in every
    call, as NNCLR.__init__ draws it from the seed)."""
    g = torch.Generator().manual_seed(1)
    return F.normalize(torch.randn(16, 16, generator=g), dim=1), torch.randint(0, 3, (16,), generator=g)


def nnclr_call(module, x):
    queue, queue_labels = start_queue()
    (nn1, _), (nn2, _) = module.nearest_neighbour(x["z1"], queue), module.nearest_neighbour(x["z2"], queue)
    loss = module.nnclr_loss(x["p1"], x["p2"], nn1, nn2, TEMPERATURE)
    module.enqueue(queue, x["z1"], step=1)  # after the loss, as in train(): the z1 of all ranks fill rows 8..15
    module.enqueue_labels(queue_labels, x["labels"], step=1)
    return loss, {"queue": queue, "queue_labels": queue_labels}


def nnclr_reference(x):
    """For each image i: NN(z_i) = the support-set entry of highest cosine with z_i; then
    L_i = -log exp(cos(NN(z1_i), p2_i) / tau) / sum_k exp(cos(NN(z1_i), p2_k) / tau), the same with the views
    swapped, and the mean over images of the two halves."""
    queue = start_queue()[0].double()
    rows = {name: x[name].double() for name in ("z1", "z2", "p1", "p2")}

    def nearest(z):
        return max(queue, key=lambda q: F.cosine_similarity(z, q, dim=0).item())

    def term(nn, p, i):
        sims = [math.exp(F.cosine_similarity(nn, p[k], dim=0).item() / TEMPERATURE) for k in range(len(p))]
        return -math.log(sims[i] / sum(sims))

    n = len(x["z1"])
    return sum(term(nearest(rows["z1"][i]), rows["p2"], i) + term(nearest(rows["z2"][i]), rows["p1"], i)
               for i in range(n)) / n / 2


CASE = MethodCase(model="NNCLR", inputs=nnclr_inputs, call=nnclr_call, reference=nnclr_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32", "--pred_hidden_dim", "64",
                         "--queue_size", "64"])
