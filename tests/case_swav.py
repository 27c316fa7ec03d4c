"""SwAV's entry in the battery: swav_loss with and without a queue against the paper's formula computed one image
at a time (Sinkhorn-Knopp written out over the whole matrix, as the official distributed_sinkhorn on one rank),
and the buffers that must not depend on how the batch is split over ranks: the codes of every image and the
queue after an enqueue. A rank scores its own share of the queue, as train() does."""
import math

import torch
import torch.distributed as dist

from battery import MethodCase

TEMPERATURE, EPS, ITERATIONS = 0.5, 0.3, 3
CROPS, PROTOTYPES = 4, 12  # 2 global and 2 local crops


def swav_inputs():
    """Batch first, as the battery splits it: scores n x crops x K, and the global crops' embeddings z."""
    g = torch.Generator().manual_seed(0)
    return {"scores": torch.randn(8, CROPS, PROTOTYPES, generator=g), "z": torch.randn(8, 2, 16, generator=g)}


def start_queue():
    """The scores of a queue of 16 past embeddings per global crop (2 x 16 x K), and the queue itself."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 16, PROTOTYPES, generator=g), torch.randn(2, 16, 16, generator=g)


def swav_call(module, x):
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = len(x["scores"])
    scores = x["scores"].transpose(0, 1).reshape(CROPS * n, PROTOTYPES)  # crop by crop, as SwAV.forward
    queue_scores, queue = start_queue()
    share = queue_scores.view(2, world_size, -1, PROTOTYPES)[:, rank]  # this rank's share, as SwAV.queue_scores
    loss, codes = module.swav_loss(scores, CROPS, TEMPERATURE, EPS, ITERATIONS)
    queued_loss, queued_codes = module.swav_loss(scores, CROPS, TEMPERATURE, EPS, ITERATIONS, share)
    for crop in range(2):  # step 1: the embeddings of all ranks fill rows 8..15
        module.enqueue(queue[crop], x["z"][:, crop], step=1)
    codes = module.gather_no_grad(torch.cat([codes, queued_codes]).transpose(0, 1))  # N x 4 x K: every image's
    return loss + queued_loss, {"codes": codes, "queue": queue}


def sinkhorn_reference(rows, eps=EPS, iterations=ITERATIONS):
    """The official algorithm on one matrix of B rows (lists of K floats): Q = exp(S / eps)^T normalised to sum 1,
    then each iteration rows of Q (prototypes) to 1/K and its columns (images) to 1/B; returns B x Q^T."""
    b, k = len(rows), len(rows[0])
    q = [[math.exp(rows[i][j] / eps) for i in range(b)] for j in range(k)]  # K x B
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        q = [[v / sum(row) / k for v in row] for row in q]
        columns = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / columns[i] / b for i in range(b)] for j in range(k)]
    return [[q[j][i] * b for j in range(k)] for i in range(b)]


def swav_reference(x):
    """Per image i, global crop a and other crop v: -sum_k q_a[i]_k log softmax(s_v[i] / T)_k; the mean over v, a
    and i; without the queue, then with it (the queue's rows join Sinkhorn's matrix, only the batch's codes kept)."""
    scores = x["scores"].double().tolist()  # n x crops x K
    n = len(scores)
    queue_scores = start_queue()[0].double().tolist()

    def log_softmax(row):
        top = max(v / TEMPERATURE for v in row)
        log_total = top + math.log(sum(math.exp(v / TEMPERATURE - top) for v in row))
        return [v / TEMPERATURE - log_total for v in row]

    def loss(queue):
        codes = [sinkhorn_reference(queue[a] + [scores[i][a] for i in range(n)])[len(queue[a]):] for a in range(2)]
        terms = [-sum(q * l for q, l in zip(codes[a][i], log_softmax(scores[i][v])))
                 for a in range(2) for v in range(CROPS) if v != a for i in range(n)]
        return sum(terms) / len(terms)

    return loss([[], []]) + loss(queue_scores)


CASE = MethodCase(model="SwAV", inputs=swav_inputs, call=swav_call, reference=swav_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32", "--num_prototypes", "30", "--num_local", "2",
                         "--local_size", "8", "--queue_size", "32", "--queue_start_epoch", "0",
                         "--freeze_prototypes_epochs", "0.75"])
