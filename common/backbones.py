"""Backbones built from torchvision's constructors (random init), returned without their classifier.

A trunk's state_dict loads with strict=True into the matching torchvision model without renaming keys:
- ResNets: torchvision's resnet / resnext / wide_resnet with `fc` replaced by nn.Identity, after
  `apply_cifar_stem` where the trunk uses the CIFAR stem;
- ViTs (vit_tiny, vit_small, vit_base with any patch_size): torchvision's VisionTransformer(image_size,
  patch_size, ...) with `heads` replaced by nn.Identity. Ours (class ViT) runs at any input size whose sides are
  multiples of the patch size, interpolating the position embedding (multi-crop, 96 / 224 px evaluation), and
  starts from torchvision's initial weights or from those of the official DINO or MoCo v3 code (vit_init);
- any other torchvision classification model by name (torchvision.models.list_models(), e.g. convnext_tiny,
  efficientnet_b0, regnet_y_400mf, densenet121, vgg11_bn, mobilenet_v3_large, swin_t):
  torchvision.models.get_model(name) with its LAST nn.Linear replaced by nn.Identity, the feature width that
  Linear's in_features (vgg: its 4096-d penultimate layer; mobilenet_v3: the 1280-d one). Any layers after that
  Linear's input stay in the trunk, dropout included (efficientnet, mobilenet, vgg: active in training only).
  squeezenet has no Linear: its 1x1 classifier conv (classifier[1]) is the one replaced, width 512. googlenet
  and inception_v3 are built with aux_logits=False, init_weights=True (plain outputs; the state_dict then has
  no aux* keys). These keep their ImageNet stem at every size; some need a least image size (MIN_SIZES).
  Rejected (UNSUITABLE): torchvision's vit_* and maxvit_t, which take one input size. swin_* run at any size.
"""
import math
import os
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from torchvision.models.vision_transformer import EncoderBlock
from torchvision.ops import StochasticDepth

from common.config import UsageError

RESNETS = {
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "resnet101": tvm.resnet101,
    "resnet152": tvm.resnet152,
    "resnext50_32x4d": tvm.resnext50_32x4d,
    "resnext101_32x8d": tvm.resnext101_32x8d,
    "resnext101_64x4d": tvm.resnext101_64x4d,
    "wide_resnet50_2": tvm.wide_resnet50_2,
    "wide_resnet101_2": tvm.wide_resnet101_2,
}
VITS = {  # name: (layers, heads, width, mlp width)
    "vit_tiny": (12, 3, 192, 768),
    "vit_small": (12, 6, 384, 1536),
    "vit_base": (12, 12, 768, 3072),
}
ARCHS = sorted(RESNETS) + sorted(VITS)
# torchvision models that cannot serve as a trunk here, and why
UNSUITABLE = {"vit_": "torchvision's ViTs take one input size: use vit_tiny, vit_small or vit_base with --patch_size",
              "maxvit_t": "MaxViT takes one input size (224 px)"}
# the least image size at which these models' pooling leaves a feature map (torchvision 0.2x; by name prefix)
MIN_SIZES = {"alexnet": 63, "inception_v3": 75, "convnext": 32, "vgg": 32, "densenet": 29, "squeezenet1_0": 21,
             "squeezenet1_1": 17, "googlenet": 15}
# built with these arguments: plain tensor outputs, no auxiliary classifiers
BUILD_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                "inception_v3": {"aux_logits": False, "init_weights": True}}
_stem_noted = False  # the ImageNet-stem note is printed once per process


def _other_models():
    return set(tvm.list_models(module=tvm)) - set(RESNETS)


def _unsuitable(arch):
    return next((why for prefix, why in UNSUITABLE.items() if arch.startswith(prefix)), None)


def apply_cifar_stem(resnet):
    """3x3 stride-1 first conv and no max-pool: at 32 px the ImageNet stem throws away 5-10 points."""
    resnet.conv1 = nn.Conv2d(3, resnet.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    resnet.maxpool = nn.Identity()
    return resnet


def backbone_args(arch, image_size, cifar_stem="auto", patch_size=16):
    """Check and resolve the backbone settings of a config; checkpoints store the result so that evaluation
    rebuilds the same trunk. cifar_stem "auto" turns the CIFAR stem on for ResNets at 64 px or less."""
    if arch not in RESNETS and arch not in VITS and (arch not in _other_models() or _unsuitable(arch)):
        why = f" ({_unsuitable(arch)})" if _unsuitable(arch) else ""
        raise UsageError(f"unknown arch {arch!r}{why}; choose one of {', '.join(ARCHS)}, or any torchvision "
                         "classification model name (torchvision.models.list_models())")
    stems = {"auto": image_size <= 64, "true": True, "false": False, True: True, False: False}
    if cifar_stem not in stems:
        raise UsageError(f"cifar_stem must be auto, true or false, got {cifar_stem!r}")
    if stems[cifar_stem] and cifar_stem != "auto" and arch not in RESNETS:
        raise UsageError(f"cifar_stem applies to ResNets only, not to {arch}; set it to auto or false")
    if arch in VITS and image_size % patch_size:
        raise UsageError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    least = next((size for prefix, size in MIN_SIZES.items() if arch.startswith(prefix)), 0)
    if image_size < least:
        raise UsageError(f"{arch} needs images of {least} px or more (its pooling shrinks smaller ones to nothing), "
                         f"got image_size {image_size}")
    global _stem_noted
    if stems[cifar_stem] and arch not in RESNETS and arch not in VITS and not _stem_noted \
            and int(os.environ.get("RANK", "0")) == 0:
        _stem_noted = True
        print(f"note: {arch} keeps its ImageNet stem and downsampling, made for 224-px images: {image_size}-px "
              "images shrink to a few pixels or one; the CIFAR stem exists for ResNets only", flush=True)
    return {"arch": arch, "image_size": image_size, "cifar_stem": stems[cifar_stem] and arch in RESNETS,
            "patch_size": patch_size}


def build_backbone(arch, image_size=224, cifar_stem=False, patch_size=16, zero_init_residual=False, drop_path=0.0,
                   pos_embed="learned", freeze_patch_embed=False, vit_init="torchvision"):
    """Return (trunk, feature width), the width also as trunk.feature_width; the first arguments are those of
    backbone_args. The others only change
    how the trunk trains, not its weights' shapes, so they are not part of backbone_args (evaluation rebuilds
    the trunk without them and loads the weights):
    - zero_init_residual (ResNets): the last BN of each residual block starts at gamma 0, so that every block
      begins as the identity (Goyal et al. 2017; the official SimSiam, Barlow Twins and MoCo v3 code do this);
    - drop_path (ViTs): stochastic depth on both residual branches of each block, its rate rising linearly from
      0 at the first block to drop_path at the last (DeiT, DINO);
    - pos_embed (ViTs): "learned" (torchvision's) or "sincos", MoCo v3's fixed 2-D sine-cosine embedding;
    - freeze_patch_embed (ViTs): the random patch projection is never trained (MoCo v3's stop-grad-conv1);
    - vit_init (ViTs): the initial weights, "torchvision" or the official code's, "dino" or "moco_v3" (vit_init)."""
    if arch not in VITS and (drop_path or pos_embed != "learned" or freeze_patch_embed or vit_init != "torchvision"):
        raise UsageError(f"drop_path, pos_embed, freeze_patch_embed and vit_init apply to ViTs only, not to {arch}; "
                         "leave them at 0, learned, false and torchvision")
    if zero_init_residual and arch not in RESNETS:
        raise UsageError(f"zero_init_residual applies to ResNets only, not to {arch}; set it to false")
    if arch in RESNETS:
        net = RESNETS[arch](zero_init_residual=zero_init_residual)
        if cifar_stem:
            apply_cifar_stem(net)
        width = net.fc.in_features
        net.fc = nn.Identity()
        net.feature_width = width  # what a probe or a head on this trunk takes
        return net, width
    if arch in VITS:
        layers, heads, width, mlp = VITS[arch]
        net = ViT(image_size=image_size, patch_size=patch_size, num_layers=layers, num_heads=heads, hidden_dim=width,
                  mlp_dim=mlp)
        net.heads = nn.Identity()  # forward returns the class token
        official_vit_init(net, vit_init)
        if pos_embed not in ("learned", "sincos"):
            raise UsageError(f"pos_embed must be learned or sincos, got {pos_embed!r}")
        if pos_embed == "sincos":
            with torch.no_grad():
                net.encoder.pos_embedding.copy_(sincos_position_embedding(image_size // patch_size, width))
            net.encoder.pos_embedding.requires_grad_(False)
        if freeze_patch_embed:
            net.conv_proj.requires_grad_(False)
        if drop_path:
            add_drop_path(net, drop_path)
        net.feature_width = width  # what a probe or a head on this trunk takes
        return net, width
    net = tvm.get_model(arch, weights=None, **BUILD_KWARGS.get(arch, {}))
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    parent_name, last = (linears or [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)])[-1]
    width = last.in_features if isinstance(last, nn.Linear) else last.in_channels
    parent, _, child = parent_name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, nn.Identity())
    net.feature_width = width  # what a probe or a head on this trunk takes
    return net, width


VIT_INITS = ("torchvision", "dino", "moco_v3")


@torch.no_grad()
def official_vit_init(vit, style):
    """Re-draw a ViT's weights as an official code draws its own (torchvision's: left as built); the same
    parameters, in torchvision's layout (attention's q, k, v in one in_proj_weight, as in the official qkv Linear).
    - "dino" (facebookresearch/dino, vision_transformer.py): every Linear weight (qkv included) and the class token
      and position embedding truncated normal with std 0.02, biases 0, LayerNorms 1 and 0; the patch projection
      keeps PyTorch's default Conv2d init.
    - "moco_v3" (facebookresearch/moco-v3, vits.py): every Linear weight xavier-uniform, the qkv weight as three
      separate q, k, v matrices, biases 0; the class token normal with std 1e-6; the patch projection uniform in
      +-sqrt(6 / (3 p^2 + width)), bias 0 (with its fixed sine-cosine position embedding, pos_embed sincos)."""
    if style not in VIT_INITS:
        raise UsageError(f"vit_init must be one of {', '.join(VIT_INITS)}, got {style!r}")
    if style == "torchvision":
        return
    attentions = [m for m in vit.modules() if isinstance(m, nn.MultiheadAttention)]
    linears = [m for m in vit.modules() if isinstance(m, nn.Linear)]  # the MLPs and attention's out_proj
    for m in vit.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in attentions:
        nn.init.zeros_(m.in_proj_bias)
    for m in linears:
        nn.init.zeros_(m.bias)
    if style == "dino":
        for weight in [m.in_proj_weight for m in attentions] + [m.weight for m in linears]:
            nn.init.trunc_normal_(weight, std=0.02)
        nn.init.trunc_normal_(vit.class_token, std=0.02)
        nn.init.trunc_normal_(vit.encoder.pos_embedding, std=0.02)
        vit.conv_proj.reset_parameters()
        return
    for m in attentions:  # q, k and v each a width x width matrix: xavier-uniform's bound of one of them
        width = m.in_proj_weight.shape[1]
        bound = math.sqrt(6.0 / (width + width))
        nn.init.uniform_(m.in_proj_weight, -bound, bound)
    for m in linears:
        nn.init.xavier_uniform_(m.weight)
    nn.init.normal_(vit.class_token, std=1e-6)
    p, width = vit.patch_size, vit.hidden_dim
    bound = math.sqrt(6.0 / (3 * p * p + width))
    nn.init.uniform_(vit.conv_proj.weight, -bound, bound)
    nn.init.zeros_(vit.conv_proj.bias)


class ViT(tvm.VisionTransformer):
    """torchvision's VisionTransformer (the same parameters and state_dict keys) at any input size whose sides
    are multiples of the patch size: the position embedding of the patches is resized bicubically to the input's
    patch grid (the class token's is kept), as DINO and MoCo v3 evaluate at other sizes. At the build size it
    computes exactly what torchvision's forward does."""

    def forward(self, x):
        n, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"a ViT with patch_size {p} needs input sides that are multiples of it, got {h} x {w}")
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # n x (h/p * w/p) x width
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = x + resized_position_embedding(self.encoder.pos_embedding, h // p, w // p)
        x = self.encoder.ln(self.encoder.layers(self.encoder.dropout(x)))
        return self.heads(x[:, 0])  # the class token


def resized_position_embedding(pos, grid_h, grid_w):
    """pos: 1 x (1 + g * g) x width for a g x g patch grid; returns it for a grid_h x grid_w grid."""
    g = math.isqrt(pos.shape[1] - 1)
    if (grid_h, grid_w) == (g, g):
        return pos
    patches = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # 1 x width x g x g
    patches = F.interpolate(patches, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)


def sincos_position_embedding(grid, width):
    """MoCo v3's fixed 2-D sine-cosine embedding, 1 x (1 + grid^2) x width: for the patch in row y, column x,
    [sin(x w), cos(x w), sin(y w), cos(y w)] with w_k = 10000^(-k / (width / 4)); zeros for the class token."""
    if width % 4:
        raise UsageError(f"the sin-cos position embedding needs a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                          indexing="ij")
    x, y = x.flatten()[:, None] * omega, y.flatten()[:, None] * omega  # grid^2 x width / 4, row by row
    patches = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), patches])[None].float()


class DropPathBlock(EncoderBlock):
    """torchvision's EncoderBlock (the same parameters) with stochastic depth on its two residual branches."""

    def __init__(self, block, rate):
        attention = block.self_attention
        super().__init__(attention.num_heads, attention.embed_dim, block.mlp[0].out_features, block.dropout.p,
                         attention.dropout, partial(nn.LayerNorm, eps=block.ln_1.eps))
        self.load_state_dict(block.state_dict())
        self.drop_path = StochasticDepth(rate, "row")

    def forward(self, input):
        x, _ = self.self_attention(*[self.ln_1(input)] * 3, need_weights=False)
        x = input + self.drop_path(self.dropout(x))
        return x + self.drop_path(self.mlp(self.ln_2(x)))


def add_drop_path(vit, drop_path):
    """Stochastic depth in every block of `vit`, the rate rising linearly from 0 to drop_path."""
    layers = vit.encoder.layers
    rates = torch.linspace(0, drop_path, len(layers)).tolist()
    for i, (name, block) in enumerate(layers.named_children()):
        setattr(layers, name, DropPathBlock(block, rates[i]))
