"""Backbones beyond the ResNets and ViTs at their build size (tests/test_common.py): ViTs at any input size,
drop-path, MoCo v3's fixed sin-cos position embedding and frozen patch projection, and any torchvision
classification model by name. Every trunk still loads with strict=True into the torchvision model."""
import math

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

import common.backbones as backbones
from common.backbones import backbone_args, build_backbone, resized_position_embedding, sincos_position_embedding
from common.config import UsageError


def vit(**options):
    return build_backbone(**backbone_args("vit_tiny", 32, patch_size=8), **options)[0]


def torchvision_vit(image_size=32, patch_size=8):
    net = tvm.VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=12, num_heads=3,
                                hidden_dim=192, mlp_dim=768)
    net.heads = nn.Identity()
    return net


def test_vit_equals_torchvisions_at_its_build_size_and_runs_at_others():
    torch.manual_seed(0)
    trunk, reference = vit().eval(), torchvision_vit().eval()
    reference.load_state_dict(trunk.state_dict(), strict=True)
    trunk.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(trunk(x), reference(x))
    for h, w in ((16, 16), (48, 48), (24, 40)):  # the position embedding resized to the patch grid
        assert trunk(torch.randn(2, 3, h, w)).shape == (2, 192)
    with pytest.raises(ValueError, match="patch_size 8 needs input sides that are multiples of it, got 30 x 30"):
        trunk(torch.randn(1, 3, 30, 30))


def test_vit_built_at_224_runs_at_96():
    trunk, width = build_backbone(**backbone_args("vit_tiny", 224, patch_size=16))
    assert trunk.eval()(torch.randn(2, 3, 96, 96)).shape == (2, width)


def test_position_embedding_resize_keeps_the_class_token_and_a_constant_grid():
    pos = torch.randn(1, 1 + 16, 8)
    assert resized_position_embedding(pos, 4, 4) is pos  # the build grid: untouched
    pos[:, 1:] = pos[:, 1:2]  # the same embedding at every patch
    resized = resized_position_embedding(pos, 6, 3)
    assert resized.shape == (1, 1 + 18, 8) and torch.equal(resized[:, 0], pos[:, 0])
    torch.testing.assert_close(resized[:, 1:], pos[:, 1:2].expand(1, 18, 8))


def test_sincos_position_embedding_is_fixed_and_follows_the_formula():
    trunk = vit(pos_embed="sincos")
    pos = trunk.encoder.pos_embedding
    assert not pos.requires_grad and pos.shape == (1, 1 + 16, 192)
    assert torch.equal(pos[0, 0], torch.zeros(192))
    for row, col in ((0, 0), (1, 2), (3, 3)):
        token, k = pos[0, 1 + 4 * row + col], 5
        omega = 1 / 10000 ** (k / 48)
        expected = [math.sin(col * omega), math.cos(col * omega), math.sin(row * omega), math.cos(row * omega)]
        assert [token[k + 48 * i].item() for i in range(4)] == pytest.approx(expected, abs=1e-6)
    optimizer = torch.optim.SGD([p for p in trunk.parameters() if p.requires_grad], lr=1.0)
    before = pos.clone()
    trunk(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert torch.equal(pos, before) and pos.grad is None
    torchvision_vit().load_state_dict(trunk.state_dict(), strict=True)
    with pytest.raises(UsageError, match="divisible by 4"):
        sincos_position_embedding(4, 6)


def test_frozen_patch_projection_gets_no_gradient():
    trunk = vit(freeze_patch_embed=True)
    trunk(torch.randn(2, 3, 32, 32)).sum().backward()
    assert trunk.conv_proj.weight.grad is None and trunk.conv_proj.bias.grad is None
    assert trunk.encoder.layers[0].mlp[0].weight.grad is not None


def test_drop_path_rises_linearly_and_leaves_evaluation_and_weights_alone():
    torch.manual_seed(0)
    plain = vit().eval()
    dropped = vit(drop_path=0.5)
    dropped.load_state_dict(plain.state_dict(), strict=True)  # the same keys: evaluation loads it unchanged
    rates = [block.drop_path.p for block in dropped.encoder.layers]
    assert rates == pytest.approx([0.5 * i / 11 for i in range(12)])
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(dropped.eval()(x), plain(x))  # eval: no drop
    dropped.train()
    torch.manual_seed(1)
    first = dropped(x)
    torch.manual_seed(2)
    assert not torch.equal(first, dropped(x))  # train: a different draw of dropped paths


def without_classifier(model):
    """The module docstring's rule: the last nn.Linear (squeezenet: the last Conv2d) replaced by nn.Identity."""
    kind = nn.Linear if any(isinstance(m, nn.Linear) for m in model.modules()) else nn.Conv2d
    parent, _, child = [name for name, m in model.named_modules() if isinstance(m, kind)][-1].rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return model


@pytest.mark.parametrize("arch, width", [("convnext_tiny", 768), ("efficientnet_b0", 1280), ("regnet_y_400mf", 440),
                                         ("densenet121", 1024), ("vgg11_bn", 4096), ("mobilenet_v3_large", 1280),
                                         ("squeezenet1_1", 512), ("googlenet", 1024)])
def test_any_torchvision_classification_model(arch, width, capsys, monkeypatch):
    """The trunk loads strict into get_model(arch) (googlenet: without its auxiliary heads) with the same change."""
    monkeypatch.setattr(backbones, "_stem_noted", False)
    trunk, w = build_backbone(**backbone_args(arch, 32, "auto"))
    assert "keeps its ImageNet stem" in capsys.readouterr().out
    backbone_args(arch, 32, "auto")
    assert capsys.readouterr().out == ""  # once per process
    assert w == width and trunk.eval()(torch.randn(2, 3, 32, 32)).shape == (2, width)
    reference = without_classifier(tvm.get_model(arch, **backbones.BUILD_KWARGS.get(arch, {})))
    reference.load_state_dict(trunk.state_dict(), strict=True)


@pytest.mark.parametrize("arch", ["alexnet", "inception_v3", "convnext_tiny", "vgg11", "densenet121", "squeezenet1_0",
                                  "squeezenet1_1", "googlenet"])
def test_least_image_sizes(arch):
    """MIN_SIZES is where the model stops failing, and below it backbone_args says so. The model is made on the meta
    device and given uninitialised CPU memory (no initialisation to wait for; the shapes are what is checked): the
    CPU kernels check them, where the meta device's checks of older torch (2.6) let a too small input through."""
    least = next(size for prefix, size in backbones.MIN_SIZES.items() if arch.startswith(prefix))
    with torch.device("meta"):
        model = tvm.get_model(arch, **backbones.BUILD_KWARGS.get(arch, {})).eval()
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        model(torch.zeros(1, 3, least, least))
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, least - 1, least - 1))
    backbone_args(arch, least, "false")
    with pytest.raises(UsageError, match=f"{arch} needs images of {least} px or more"):
        backbone_args(arch, least - 1, "false")


@pytest.mark.parametrize("arch, options, fragment", [
    ("convnext_tiny", dict(cifar_stem="true"), "cifar_stem applies to ResNets only, not to convnext_tiny"),
    ("vit_b_16", {}, "torchvision's ViTs take one input size"),
    ("no_such_net", {}, "or any torchvision classification model name"),
])
def test_unsuitable_arch_settings_are_clear_errors(arch, options, fragment):
    with pytest.raises(UsageError, match=fragment):
        backbone_args(arch, 32, **options)


def test_vit_options_on_a_resnet_are_clear_errors():
    for options in (dict(drop_path=0.1), dict(pos_embed="sincos"), dict(freeze_patch_embed=True)):
        with pytest.raises(UsageError, match="apply to ViTs only, not to resnet18"):
            build_backbone(**backbone_args("resnet18", 32), **options)
    with pytest.raises(UsageError, match="pos_embed must be learned or sincos"):
        vit(pos_embed="rope")


def test_evaluation_rebuilds_a_torchvision_model_trunk(tmp_path):
    """knn_eval.py and linear_eval.py rebuild the trunk from the checkpoint's backbone_args (load_backbone)."""
    from common.checkpoints import load_backbone
    args = backbone_args("squeezenet1_1", 32, "false")
    trunk, _ = build_backbone(**args)
    torch.save({"method": "SimCLR", "backbone": trunk.state_dict(), "backbone_args": args}, tmp_path / "last.pt")
    loaded, width, loaded_args, _ = load_backbone(str(tmp_path / "last.pt"))
    assert loaded_args == args and width == 512
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), trunk.eval()(x))


# ---- the official ViT initialisations ----
def _vit(vit_init, **options):
    torch.manual_seed(0)
    return build_backbone(**backbone_args("vit_small", 32, patch_size=4), vit_init=vit_init, **options)[0]


def test_dino_vit_init_is_the_official_truncated_normal():
    """facebookresearch/dino: Linear weights (qkv included), class token and position embedding ~ trunc normal
    std 0.02, biases 0, LayerNorms 1 / 0; the patch projection keeps PyTorch's default Conv2d init."""
    vit = _vit("dino")
    attention = vit.encoder.layers[0].self_attention
    for weight in (attention.in_proj_weight, attention.out_proj.weight, vit.encoder.layers[0].mlp[0].weight,
                   vit.class_token, vit.encoder.pos_embedding):
        assert abs(weight.std().item() - 0.02) < 0.003  # truncated at +-2 (absolute), as the official call
    assert (attention.in_proj_bias == 0).all() and (vit.encoder.layers[0].mlp[3].bias == 0).all()
    fan_in = 3 * 4 * 4
    assert vit.conv_proj.weight.abs().max() <= 1 / fan_in ** 0.5 and vit.conv_proj.weight.std() > 0.5 / 48 ** 0.5 / 3


def test_moco_v3_vit_init_is_the_official_xavier_uniform():
    """facebookresearch/moco-v3: xavier-uniform Linear weights with q, k, v drawn as separate matrices, biases 0,
    class token ~ N(0, 1e-6), the (frozen) patch projection uniform in +-sqrt(6 / (3 p^2 + width)): at patch 4
    and width 384 a std of 0.068, against torchvision's 0.144."""
    vit = _vit("moco_v3", pos_embed="sincos", freeze_patch_embed=True)
    width = 384
    attention = vit.encoder.layers[0].self_attention
    qkv_bound, mlp_bound = (6 / (2 * width)) ** 0.5, (6 / (width + 4 * width)) ** 0.5
    assert qkv_bound * 0.98 < attention.in_proj_weight.abs().max() <= qkv_bound
    assert mlp_bound * 0.98 < vit.encoder.layers[0].mlp[0].weight.abs().max() <= mlp_bound
    assert (attention.in_proj_bias == 0).all() and vit.class_token.abs().max() < 1e-5
    patch_bound = (6 / (3 * 16 + width)) ** 0.5
    assert abs(vit.conv_proj.weight.std().item() - patch_bound / 3 ** 0.5) < 0.004
    assert vit.conv_proj.weight.abs().max() <= patch_bound and not vit.conv_proj.weight.requires_grad
    assert abs(_vit("torchvision").conv_proj.weight.std().item() - 0.144) < 0.01  # torchvision: 2.1 x


def test_vit_inits_keep_torchvisions_parameters():
    """The same state_dict keys and shapes whatever the init: evaluation rebuilds the trunk without it."""
    reference = _vit("torchvision").state_dict()
    for vit_init in ("dino", "moco_v3"):
        state = _vit(vit_init).state_dict()
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}


@pytest.mark.parametrize("arch, vit_init, message", [
    ("vit_tiny", "timm", "vit_init must be one of torchvision, dino, moco_v3"),
    ("resnet18", "dino", "apply to ViTs only"),
])
def test_bad_vit_init_is_a_clear_error(arch, vit_init, message):
    with pytest.raises(UsageError, match=message):
        build_backbone(**backbone_args(arch, 32, patch_size=4), vit_init=vit_init)
