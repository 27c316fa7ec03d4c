"""NNCLR-specific checks: the nearest neighbour is the support set's most similar entry and carries no gradient,
the support set advances by the global batch and wraps (with the classes beside it), it is part of the model's
state, a support set that does not fit the global batch is a clear error before anything is written, a support set
holding the batch's own projections gives the plain cross-view InfoNCE, the nn_acc monitor, and the heads of both
configs. The battery (its case, below) checks the loss and the support set across ranks.

Its case in the battery (CASE, which tests/test_battery.py runs): the nearest neighbours looked up in a support
set, the symmetric loss against its per-sample formula, and the support set (projections and their classes) after
the enqueue: 2 ranks with half the batch each = 1 process with the whole batch."""
import math

import pytest
import torch
import torch.nn.functional as F

import nnclr
from battery import MethodCase, run_ranks
from common.config import UsageError, load_config
from helpers import REPO


# ---- the battery's case ----
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


# ---- nnclr's own tests ----
def tiny(**overrides):
    return nnclr.Config(**{**dict(proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16, queue_size=64), **overrides})


def test_nearest_neighbour_is_the_most_similar_entry_without_gradient():
    g = torch.Generator().manual_seed(0)
    queue = F.normalize(torch.randn(32, 8, generator=g), dim=1)
    z = (3 * queue[[5, 17, 5]] + 0.01 * torch.randn(3, 8, generator=g)).requires_grad_()  # near entries 5, 17, 5
    nn, index = nnclr.nearest_neighbour(z, queue)
    assert index.tolist() == [5, 17, 5] and torch.equal(nn, queue[[5, 17, 5]]) and not nn.requires_grad
    cosines = F.normalize(z.detach(), dim=1) @ queue.T
    assert torch.equal(index, cosines.argmax(1))  # the cosine, not the dot product: z's scale does not matter
    loss = nnclr.nnclr_loss(torch.randn(3, 8, requires_grad=True), z, nn, nn, 0.2)
    loss.backward()
    assert z.grad.abs().sum() > 0  # z gets its gradient as a prediction here, never through NN(z)


def test_only_the_predictions_carry_the_gradient():
    g = torch.Generator().manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(4, 8, generator=g).requires_grad_() for _ in range(4))
    queue = F.normalize(torch.randn(16, 8, generator=g), dim=1)
    (nn1, _), (nn2, _) = nnclr.nearest_neighbour(z1, queue), nnclr.nearest_neighbour(z2, queue)
    nnclr.nnclr_loss(p1, p2, nn1, nn2, 0.2).backward()
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0 and z1.grad is None and z2.grad is None


def test_support_set_advances_by_the_global_batch_and_wraps():
    queue, labels = torch.zeros(12, 2), torch.full((12,), -1)
    for step in range(4):  # 4 steps of 4 vectors into 12 rows: the 4th overwrites the 1st
        nnclr.enqueue(queue, torch.full((4, 2), float(step + 1)), step)
        nnclr.enqueue_labels(labels, torch.full((4,), step + 1), step)
    expected = torch.tensor([4.0] * 4 + [2.0] * 4 + [3.0] * 4)[:, None].expand(12, 2)
    torch.testing.assert_close(queue, F.normalize(expected, dim=1))  # stored L2-normalised
    assert labels.tolist() == [4] * 4 + [2] * 4 + [3] * 4


def test_support_set_is_model_state_drawn_from_the_seed():
    """queue and queue_labels are buffers (checkpoints and resume hold them), random unit vectors from the seed
    with no class yet."""
    torch.manual_seed(0)
    model = nnclr.NNCLR(tiny())
    torch.manual_seed(0)
    again = nnclr.NNCLR(tiny())
    state = model.state_dict()
    assert state["queue"].shape == (64, 8) and torch.equal(state["queue"], again.state_dict()["queue"])
    torch.testing.assert_close(state["queue"].norm(dim=1), torch.ones(64))
    assert state["queue_labels"].tolist() == [-1] * 64
    assert [type(m).__name__ for m in model.projector][-1] == "BatchNorm1d"  # BN after every Linear
    assert [type(m).__name__ for m in model.predictor][-1] == "Linear"  # none on the prediction


def test_support_set_must_fit_the_global_batch(tmp_path):
    with pytest.raises(UsageError, match="queue_size 1000 must be a positive multiple of the global batch 64 "
                                         r"\(32 x 2 ranks\).*--queue_size 960"):
        nnclr.check_nnclr(tiny(batch_size=32, queue_size=1000), world_size=2)
    nnclr.check_nnclr(tiny(batch_size=32, queue_size=1024), world_size=2)
    cfg = tiny(dataset="synthetic", batch_size=16, queue_size=40, num_workers=0, out_dir=str(tmp_path / "run"))
    with pytest.raises(UsageError, match="queue_size 40 must be a positive multiple of the global batch 16") as e:
        nnclr.train(cfg)  # before the data are loaded and before the run folder is made
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_a_support_set_of_the_batch_itself_gives_the_cross_view_infonce():
    """Q = the batch's own projections: NN(z) = z / ||z||, and the loss is InfoNCE of z1 against the other view's
    predictions (and back), the SimCLR-like loss without NNCLR's friend."""
    g = torch.Generator().manual_seed(2)
    z1, z2, p1, p2 = (torch.randn(6, 8, generator=g) for _ in range(4))
    queue = F.normalize(torch.cat([z1, z2]), dim=1)
    (nn1, index1), (nn2, index2) = nnclr.nearest_neighbour(z1, queue), nnclr.nearest_neighbour(z2, queue)
    assert index1.tolist() == list(range(6)) and index2.tolist() == list(range(6, 12))
    tau, labels = 0.2, torch.arange(6)
    expected = (F.cross_entropy(F.normalize(z1, dim=1) @ F.normalize(p2, dim=1).T / tau, labels)
                + F.cross_entropy(F.normalize(z2, dim=1) @ F.normalize(p1, dim=1).T / tau, labels)) / 2
    torch.testing.assert_close(nnclr.nnclr_loss(p1, p2, nn1, nn2, tau), expected)


def test_nn_accuracy_counts_labelled_queries_only():
    labels = torch.tensor([0, 1, 2, -1])
    assert nnclr.nn_accuracy(torch.tensor([0, 2, 2, -1]), labels).item() == pytest.approx(2 / 3)
    assert math.isnan(nnclr.nn_accuracy(torch.tensor([-1, -1]), torch.tensor([-1, -1])).item())  # no labels


@pytest.mark.parametrize("name, queue_size, temperature", [("nnclr.yaml", 65536, 0.2),
                                                            ("nnclr_imagenet.yaml", 98304, 0.1)])
def test_configs_build_the_papers_heads(name, queue_size, temperature):
    """Projector 2048-2048-256 with BN after every Linear (ReLU after all but the last), predictor 4096-256."""
    cfg = load_config(nnclr.Config, ["--config", str(REPO / "configs" / name), "--arch", "resnet18"])
    assert (cfg.queue_size, cfg.temperature) == (queue_size, temperature)
    model = nnclr.NNCLR(cfg)
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert [m.out_features for m in model.projector if isinstance(m, torch.nn.Linear)] == [2048, 2048, 256]
    assert [m.out_features for m in model.predictor if isinstance(m, torch.nn.Linear)] == [4096, 256]
    if name == "nnclr.yaml":  # the CIFAR recipe is the Config's defaults
        assert cfg == nnclr.Config(data_dir=cfg.data_dir, knn_every=cfg.knn_every, probe_every=cfg.probe_every)


# ---- DDP: BN statistics broadcast, the support set left out ----
def _ddp_buffers(rank, world_size):
    """Each rank starts with its own BN statistics and support set and runs one forward of the same images under
    ddp_without_queue: DDP first broadcasts rank 0's buffers, so the BN statistics end the same on both ranks;
    the support set and its labels, left out, stay each rank's own."""
    torch.manual_seed(0)
    model = nnclr.NNCLR(tiny(image_size=16)).train()
    with torch.no_grad():
        model.backbone.bn1.running_mean.fill_(rank + 1.0)
        model.queue.fill_(rank + 1.0)
        model.queue_labels.fill_(rank)
    ddp_model = nnclr.ddp_without_queue(model, world_size)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ddp_model(x, x.flip(0))
    return model.backbone.bn1.running_mean.clone(), model.queue.clone(), model.queue_labels.clone()


def test_ddp_broadcasts_bn_statistics_but_not_the_support_set():
    (bn0, queue0, labels0), (bn1, queue1, labels1) = run_ranks(_ddp_buffers, 2)
    torch.testing.assert_close(bn0, bn1)
    assert (queue0 == 1).all() and (queue1 == 2).all() and (labels0 == 0).all() and (labels1 == 1).all()
