"""MoCo-specific checks: shuffle-BN (against its definition, and 2 ranks = 1 process), the key encoder's
stop-gradient and EMA, the queue's rows, v1's one-direction loss and step schedule, the settings that must fit
together, every config, and v3 with a ViT and v1 with shuffle-BN run end to end (the battery runs the default,
v2+). The battery (its case, below) checks both loss forms and the queue across ranks.

Its case in the battery (CASE, which tests/test_battery.py runs): one call runs both of moco_loss's forms against
their per-query formulas, the queue form of v1 / v2 (symmetric, "v2+") and the global-batch form of v3, then
enqueues the keys.

The keys are plain inputs here: the stop-gradient is where the papers put it, on the key encoder (MoCo.forward
runs it under torch.no_grad(); a test below checks that)."""
import math

import pytest
import torch
import torch.nn.functional as F

import moco
from battery import MethodCase, quick_args, run_ranks
from common.config import UsageError, load_config
from helpers import REPO, assert_ok, read_jsonl, run_script, run_torchrun


# ---- the battery's case ----
TEMPERATURE = 0.3


def moco_inputs():
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(8, 16, generator=g) for name in ("q1", "q2", "k1", "k2")}


def start_queue():
    """Two queues (views) of 16 unit keys: two global batches of 8."""
    return F.normalize(torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1)), dim=2)


def moco_call(module, x):
    queue = start_queue()
    loss = (module.moco_loss(x["q1"], x["q2"], x["k1"], x["k2"], TEMPERATURE, queue)[0]  # v2+: the queues
            + module.moco_loss(x["q1"], x["q2"], x["k1"], x["k2"], TEMPERATURE)[0])  # v3: the global batch
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


# ---- moco's own tests ----
def tiny(**overrides):
    settings = dict(image_size=16, batch_size=4, proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16, queue_size=8)
    return moco.Config(**{**settings, **overrides})


def images(n=8):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(3))


# ---- shuffle-BN ----
def _shuffled_keys(rank, world_size):
    torch.manual_seed(0)
    model = moco.MoCo(tiny(shuffle_bn=True, bn_groups=2), world_size).train()
    x = images().chunk(world_size)[rank]
    return model.keys(x, draw=5)


def test_shuffle_bn_keys_follow_the_definition():
    """Each key is the key encoder's output for its image inside its BN group of the shuffled global batch."""
    torch.manual_seed(0)
    model = moco.MoCo(tiny(shuffle_bn=True, bn_groups=2)).train()
    x = images()
    keys = model.keys(x, draw=5)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0 * 1_000_003 + 5))
    expected = torch.empty_like(keys)
    for group in order.view(2, 4):  # groups of 4 images of the shuffled batch
        expected[group] = model.key_projector(model.key_backbone(x[group]))
    torch.testing.assert_close(keys, expected)
    in_order = torch.cat([model.key_projector(model.key_backbone(part)) for part in x.chunk(2)])
    assert not torch.allclose(keys, in_order, atol=1e-3)  # the groups' statistics differ: the test can fail
    assert model.queries(x).shape == (8, 8)


def test_shuffle_bn_copies_its_host_permutation_without_waiting(monkeypatch):
    """The permutation is drawn on the host (the same on every rank, whatever its GPU) and reaches the images'
    device by to_device: from pinned memory, non-blocking (a plain copy would make the GPU wait for the host)."""
    copies = []
    monkeypatch.setattr(moco, "to_device", lambda x, device: copies.append((x.device.type, device)) or x.to(device))
    model = moco.MoCo(tiny(shuffle_bn=True, bn_groups=2)).train()
    x = images()
    model.keys(x, draw=5)
    assert copies == [("cpu", x.device)]


def test_shuffle_bn_on_two_ranks_equals_one_process():
    """bn_groups fixes the BN groups of the global batch: 2 ranks x 1 group = 1 process x 2 groups."""
    whole = _shuffled_keys(0, 1)
    ranks = run_ranks(_shuffled_keys, 2)
    torch.testing.assert_close(torch.cat(ranks), whole)


# ---- the key encoder ----
def test_key_encoder_gets_no_gradient_and_follows_the_ema():
    torch.manual_seed(0)
    model = moco.MoCo(tiny(version=3)).train()
    q1, q2, k1, k2 = model(images(), images().flip(0), step=0)
    assert not k1.requires_grad and not k2.requires_grad  # MoCo.forward's torch.no_grad: the stop-gradient
    moco.moco_loss(q1, q2, k1, k2, 0.2)[0].backward()
    assert all(p.grad is None for p in list(model.key_backbone.parameters()) + list(model.key_projector.parameters()))
    assert model.backbone.conv1.weight.grad is not None and model.predictor[0].weight.grad is not None
    online = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("key_")}
    before = {name: p.clone() for name, p in model.named_parameters() if name.startswith("key_")}
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    model.update_key_encoder(0.75)
    for name, p in model.named_parameters():
        if name.startswith("key_"):
            theta = model.get_parameter(name[len("key_"):])
            torch.testing.assert_close(p, 0.75 * before[name] + 0.25 * theta.detach())
    assert len(before) == len([n for n in online if not n.startswith("predictor.")])  # no key predictor


def test_tau_schedule_ends_and_fixed_rate():
    assert moco.ema_at(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert moco.ema_at(100, 100, 0.99, 1.0) == 1.0
    assert moco.ema_at(50, 100, 0.99, 0.999) == pytest.approx((0.99 + 0.999) / 2)
    assert [moco.ema_at(s, 100, 0.999, 0.999) for s in range(101)] == pytest.approx([0.999] * 101)


# ---- the queue ----
def test_enqueue_overwrites_the_oldest_rows_and_wraps():
    queue = torch.zeros(12, 2)
    for step in range(4):  # 3 batches of 4 fill the queue, the 4th overwrites the first
        moco.enqueue(queue, torch.full((4, 2), float(step + 1)), step)
    expected = torch.tensor([4.0] * 4 + [2.0] * 4 + [3.0] * 4)
    torch.testing.assert_close(queue, F.normalize(expected[:, None].expand(12, 2), dim=1))


def test_v1_loss_is_one_direction_against_the_queue():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    queue = F.normalize(torch.randn(1, 5, 6, generator=g), dim=2)
    loss, _ = moco.moco_loss(q, None, None, k, 0.07, queue)
    total = 0.0
    for i in range(4):
        logits = [F.cosine_similarity(q[i], k[i], dim=0).item()] + [
            F.cosine_similarity(q[i], negative, dim=0).item() for negative in queue[0]]
        total += -logits[0] / 0.07 + math.log(sum(math.exp(s / 0.07) for s in logits))
    assert loss.item() == pytest.approx(total / 4, rel=1e-5)


def test_v1_step_schedule():
    assert [moco.step_lr_at(s, 10, 0.3, (2, 3)) for s in (0, 19, 20, 29, 30, 99)] == pytest.approx(
        [0.3, 0.3, 0.03, 0.03, 0.003, 0.003])


# ---- settings ----
@pytest.mark.parametrize("overrides, fragment", [
    (dict(queue_size=10), "queue_size 10 must be a positive multiple of the global batch 4"),
    (dict(version=4), "version must be 1, 2 or 3"),
    (dict(version=3, shuffle_bn=True), "shuffle_bn is for the queue of v1 / v2"),
    (dict(shuffle_bn=True, bn_groups=1), "shuffle_bn needs bn_groups >= 2"),
    (dict(shuffle_bn=True, bn_groups=3), "shuffle_bn needs bn_groups >= 2"),
    (dict(lr_drops=(120, 160)), "lr_drops replaces the cosine and its warm-up"),
])
def test_settings_that_do_not_fit_are_clear_errors(overrides, fragment):
    with pytest.raises(UsageError, match=fragment):
        moco.check_moco(tiny(**overrides), world_size=1)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("moco*.yaml")))
def test_every_config_builds_its_model(name):
    cfg = load_config(moco.Config, ["--config", str(REPO / "configs" / name)])
    model = moco.MoCo(cfg)
    assert (model.queue is None) == (cfg.version == 3)
    assert isinstance(model.predictor, torch.nn.Identity) == (cfg.version < 3)
    if cfg.freeze_patch_embed:
        assert not any(p.requires_grad for p in model.backbone.conv_proj.parameters())


# ---- end to end: v3 with a ViT, v1 with shuffle-BN under torchrun ----
def test_v3_vit_trains_and_its_checkpoint_evaluates(tmp_path):
    out = tmp_path / "vit"
    assert_ok(run_script(quick_args("moco", out, "--version", "3", "--arch", "vit_tiny", "--patch_size", "8",
                                    "--pos_embed", "sincos", "--freeze_patch_embed", "true", "--optimizer", "adamw",
                                    "--lr", "1e-3", "--proj_layers", "3", "--proj_last_bn", "true",
                                    "--pred_last_bn", "true", "--channels_last", "false", epochs=1)))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    state = ckpt["model"]
    for name in ("conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding"):  # frozen: EMA of a constant
        torch.testing.assert_close(state[f"backbone.{name}"], state[f"key_backbone.{name}"], rtol=1e-6, atol=1e-7)
    moved = state["backbone.encoder.layers.encoder_layer_0.mlp.0.weight"] - state[
        "key_backbone.encoder.layers.encoder_layer_0.mlp.0.weight"]
    assert moved.abs().max() > 1e-5  # a trained weight: the key encoder lags behind it
    assert not any(key.startswith("key_predictor") for key in state)
    linear = ["linear_eval.py", "--epochs", "1", "--cache_features", "true", "--batch_size", "32"]
    for script in (["knn_eval.py"], linear):
        assert_ok(run_script(script + ["--checkpoint", str(out / "last.pt"), "--train_subset", "64",
                                       "--val_subset", "32", "--num_workers", "0"]))


def test_v1_shuffle_bn_trains_under_torchrun(tmp_path):
    out = tmp_path / "v1"
    assert_ok(run_torchrun(2, quick_args("moco", out, "--version", "1", "--symmetric", "false", "--shuffle_bn",
                                         "true", "--bn_groups", "4", "--proj_layers", "1", "--lr_drops", "[1]",
                                         "--warmup_epochs", "0", "--log_every", "1", epochs=2)))
    lrs = [line["train/lr"] for line in read_jsonl(out / "metrics.jsonl") if "train/lr" in line]
    assert lrs == pytest.approx([0.3 * 32 / 256] * 2 + [0.03 * 32 / 256] * 2)  # the drop at epoch 1
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["model"]["queue"].shape == (1, 64, 32)
    assert torch.allclose(ckpt["model"]["queue"].norm(dim=2), torch.ones(1, 64))


# ---- the instance discrimination's accuracy ----
def test_instance_accuracy_counts_the_positive_among_the_top_scores():
    """Row 0: the positive scores highest; row 1: second highest (top-5 only); row 2: lowest (neither)."""
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0, 0], [1.0, 5, 4, 3, 2, 0, 6], [0.0, 1, 2, 3, 4, 5, 6]])
    torch.testing.assert_close(moco.instance_accuracy(logits, torch.tensor([0, 1, 0])),
                               torch.tensor([100 / 3, 200 / 3]))


def test_the_trained_run_logs_the_instance_accuracy(trained):
    """train/instance_top1 and _top5 every log_every steps and per epoch, as the official code logs Acc@1 / Acc@5."""
    lines = read_jsonl(trained["moco"] / "metrics.jsonl")
    steps = [line for line in lines if "train/instance_top1" in line]
    epochs = [line for line in lines if "train/epoch_instance_top1" in line]
    assert steps and epochs
    assert all(0 <= line["train/instance_top1"] <= line["train/instance_top5"] <= 100 for line in steps)


# ---- DDP: BN statistics broadcast, the queue left out ----
def _ddp_buffers(rank, world_size):
    """Each rank starts with its own BN statistics and queue and runs one forward of the same images under
    ddp_without_queue: DDP first broadcasts rank 0's buffers, so the BN statistics end the same on both ranks;
    the queue, left out, stays each rank's own."""
    torch.manual_seed(0)
    model = moco.MoCo(tiny(), world_size).train()
    with torch.no_grad():
        model.backbone.bn1.running_mean.fill_(rank + 1.0)
        model.queue.fill_(rank + 1.0)
    ddp_model = moco.ddp_without_queue(model, world_size)
    ddp_model(images(4), images(4).flip(0), step=0)
    return model.backbone.bn1.running_mean.clone(), model.queue.clone()


def test_ddp_broadcasts_bn_statistics_but_not_the_queue():
    (bn0, queue0), (bn1, queue1) = run_ranks(_ddp_buffers, 2)
    torch.testing.assert_close(bn0, bn1)
    assert (queue0 == 1).all() and (queue1 == 2).all()
