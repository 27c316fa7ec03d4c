"""DINO-specific checks: the teacher's stop-gradient and its global crops, the head (its last layer's fixed norm),
the checkpoint keeping the teacher's trunk, the last layer frozen at first, the schedules (teacher temperature,
weight decay), the per-parameter gradient clip, the collapse warning, the settings that must fit together, every
config, and DINO with a ViT end to end. The battery (its case, below) checks the loss and the center.

Its case in the battery (CASE, which tests/test_battery.py runs): dino_loss against the paper's cross-entropy
computed one image at a time, and the center after its update (the mean of the teacher's outputs over ALL ranks): 2
ranks with half the batch each = 1 process with the whole batch.

The teacher's outputs are plain inputs here: the stop-gradient is where the paper puts it, on the teacher
(DINO.forward runs it under torch.no_grad(); a test below checks that), and dino_loss detaches P_t too."""
import math

import pytest
import torch

import dino
from battery import MethodCase, quick_args
from common.config import UsageError
from helpers import assert_ok, run_script


# ---- the battery's case ----
STUDENT_T, TEACHER_T, MOMENTUM = 0.1, 0.04, 0.9
CROPS, OUTPUTS = 4, 12  # 2 global and 2 local crops


def dino_inputs():
    """Batch first, as the battery splits it: student outputs n x crops x K, teacher outputs n x 2 x K."""
    g = torch.Generator().manual_seed(0)
    return {"student": torch.randn(8, CROPS, OUTPUTS, generator=g), "teacher": torch.randn(8, 2, OUTPUTS, generator=g)}


def start_center():
    return 0.1 * torch.randn(1, OUTPUTS, generator=torch.Generator().manual_seed(1))


def dino_call(module, x):
    n = len(x["student"])
    student = x["student"].transpose(0, 1).reshape(CROPS * n, OUTPUTS)  # crop by crop, as DINO.forward
    teacher = x["teacher"].transpose(0, 1).reshape(2 * n, OUTPUTS)
    center = start_center()
    loss = module.dino_loss(student, teacher, center, STUDENT_T, TEACHER_T)
    module.update_center(center, teacher, MOMENTUM)  # after the loss, as train()
    return loss, {"center": center}


def dino_reference(x):
    """Per image i, global crop a and other crop v: H(P_t, P_s) = -sum_k P_t(t_a[i] - c)_k log P_s(s_v[i])_k with
    P_t at the teacher's temperature, P_s at the student's; the mean over v, a and i."""
    student, teacher = x["student"].double().tolist(), x["teacher"].double().tolist()
    center = start_center().double()[0].tolist()

    def softmax(row, t):
        top = max(v / t for v in row)
        e = [math.exp(v / t - top) for v in row]
        return [v / sum(e) for v in e]

    terms = []
    for i in range(len(student)):
        for a in range(2):
            p_t = softmax([v - c for v, c in zip(teacher[i][a], center)], TEACHER_T)
            for v in range(CROPS):
                if v != a:
                    terms.append(-sum(p * math.log(q) for p, q in zip(p_t, softmax(student[i][v], STUDENT_T))))
    return sum(terms) / len(terms)


CASE = MethodCase(model="DINO", inputs=dino_inputs, call=dino_call, reference=dino_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32", "--num_prototypes", "30", "--num_local", "2",
                         "--local_size", "8", "--freeze_last_layer_epochs", "0.75"])


# ---- dino's own tests ----
def tiny(**overrides):
    settings = dict(image_size=16, local_size=8, num_local=2, batch_size=4, proj_hidden_dim=16, proj_dim=8,
                    num_prototypes=6)
    return dino.Config(**{**settings, **overrides})


def crops(n=4):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)] + [torch.randn(n, 3, 8, 8, generator=g)
                                                                         for _ in range(2)]


def test_teacher_sees_the_global_crops_and_gets_no_gradient():
    torch.manual_seed(0)
    model = dino.DINO(tiny()).train()
    with torch.autocast("cpu", torch.bfloat16):  # mixed precision: the head's last layer still in fp32
        student_out, teacher_out = model(crops())
    assert student_out.shape == (16, 6) and teacher_out.shape == (8, 6) and student_out.dtype == torch.float32
    assert not teacher_out.requires_grad
    dino.dino_loss(student_out, teacher_out, model.center, 0.1, 0.04).backward()
    assert all(p.grad is None for p in (*model.teacher_backbone.parameters(), *model.teacher_head.parameters()))
    assert all(p.grad is not None for p in model.backbone.parameters())
    student = dict(model.backbone.named_parameters())
    for name, value in model.teacher_backbone.named_parameters():  # the teacher starts as the student
        assert torch.equal(value, student[name]), name


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_last_layer_has_unit_rows_and_its_norm_is_fixed(norm_last_layer):
    head = dino.DINOHead(8, 16, 4, 6, norm_last_layer=norm_last_layer)
    g = head.last_layer.parametrizations.weight.original0
    assert g.requires_grad == (not norm_last_layer)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(6))  # g = 1: unit rows
    out = head(torch.randn(5, 8))
    assert out.shape == (5, 6) and out.abs().max() <= 1 + 1e-5  # a unit bottleneck against unit rows


def test_checkpoint_keeps_the_teachers_trunk_and_the_last_layer_was_frozen(trained):
    """The battery's run (its case, above: last layer frozen for 0.75 epoch = 3 steps): the checkpoint's
    "backbone" is the teacher's trunk; after step 3 the optimizer holds no state for the last layer, after step 4
    it does; the center has moved from 0 and the teacher lags behind the student."""
    ckpt = torch.load(trained["dino"] / "last.pt", weights_only=True)
    teacher = {k[len("teacher_backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("teacher_backbone.")}
    assert teacher.keys() == ckpt["backbone"].keys()
    assert all(torch.equal(teacher[k], ckpt["backbone"][k]) for k in teacher)
    weight = "backbone.layer1.0.conv1.weight"
    assert not torch.equal(ckpt["model"][weight], ckpt["model"][f"teacher_{weight}"])
    assert ckpt["model"]["center"].abs().sum() > 0
    cfg = dino.Config(proj_hidden_dim=64, proj_dim=32, num_prototypes=30)
    model = dino.DINO(cfg)
    params = [p for group in dino.build_optimizer(cfg, model).param_groups for p in group["params"]]
    index = next(i for i, p in enumerate(params) if p is model.head.last_layer.parametrizations.weight.original1)
    at_3 = torch.load(trained["dino"] / "step_00000003.pt", weights_only=True)
    at_4 = torch.load(trained["dino"] / "step_00000004.pt", weights_only=True)
    assert index not in at_3["optimizer"]["state"] and index in at_4["optimizer"]["state"]


def test_schedules():
    assert dino.teacher_temperature_at(0, 100, 0.04, 0.07) == 0.04
    assert dino.teacher_temperature_at(50, 100, 0.04, 0.07) == pytest.approx(0.055)
    assert dino.teacher_temperature_at(100, 100, 0.04, 0.07) == dino.teacher_temperature_at(500, 100, 0.04, 0.07)
    assert dino.teacher_temperature_at(0, 0, 0.04, 0.07) == 0.07  # no warm-up
    assert dino.weight_decay_at(0, 1000, 0.04, 0.4) == pytest.approx(0.04)
    assert dino.weight_decay_at(500, 1000, 0.04, 0.4) == pytest.approx(0.22)
    assert dino.weight_decay_at(1000, 1000, 0.04, 0.4) == pytest.approx(0.4)
    cfg = tiny(optimizer="adamw")
    optimizer = dino.build_optimizer(cfg, dino.DINO(cfg))
    dino.set_weight_decay(optimizer, 0.3)
    assert {(g["params"][0].ndim > 1, g["weight_decay"]) for g in optimizer.param_groups} == {(True, 0.3), (False, 0)}


def test_gradients_are_clipped_per_parameter():
    big, small = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    big.grad, small.grad = torch.full((4,), 5.0), torch.full((4,), 0.5)  # norms 10 and 1
    dino.clip_gradients(torch.nn.ParameterList([big, small]), 3.0)
    assert big.grad.norm().item() == pytest.approx(3.0, rel=1e-5) and small.grad.norm().item() == pytest.approx(1.0)


def test_collapse_warning():
    assert dino.collapse_warning({"train/epoch_teacher_entropy": 2.0, "train/epoch_kl": 0.5}, 4096) is None
    for entropy, kl in ((8.3, 0.5), (0.01, 1e-4)):  # uniform; one dimension (KL 0)
        message = dino.collapse_warning({"train/epoch_teacher_entropy": entropy, "train/epoch_kl": kl}, 4096)
        assert message.startswith("warning: DINO looks collapsed")


def test_settings_that_must_fit_together():
    for overrides, message in ((dict(local_min_scale=0.5, crop_min_scale=0.4), "crop scales must satisfy"),
                               (dict(teacher_temperature=0.0), "must be > 0"),
                               (dict(arch="vit_tiny", patch_size=8, image_size=16, local_size=12), "local_size 12")):
        with pytest.raises(UsageError, match=message):
            dino.check_dino(tiny(**overrides))


def test_vit_trains_and_its_checkpoint_evaluates(tmp_path):
    out = tmp_path / "vit"
    assert_ok(run_script(quick_args("dino", out, "--arch", "vit_tiny", "--patch_size", "8", "--optimizer", "adamw",
                                    "--lr", "1e-3", "--weight_decay", "0.04", "--weight_decay_end", "0.4",
                                    "--drop_path", "0.1", "--channels_last", "false", "--log_every", "1", epochs=1)))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["backbone_args"]["arch"] == "vit_tiny" and ckpt["backbone_args"]["patch_size"] == 8
    linear = ["linear_eval.py", "--epochs", "1", "--cache_features", "true", "--batch_size", "32"]
    for script in (["knn_eval.py"], linear):
        assert_ok(run_script(script + ["--checkpoint", str(out / "last.pt"), "--train_subset", "64",
                                       "--val_subset", "32", "--num_workers", "0"]))
