"""Backbones built from torchvision's constructors (random init), returned without their classifier.

A trunk's state_dict loads with strict=True into the matching torchvision model whose `fc` (ResNets) or
`heads` (ViTs) was replaced by nn.Identity, after `apply_cifar_stem` where the trunk uses the CIFAR stem.
"""
import torch.nn as nn
import torchvision.models as tvm

from common.config import UsageError

RESNETS = {
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "resnet101": tvm.resnet101,
    "resnet152": tvm.resnet152,
    "resnext50_32x4d": tvm.resnext50_32x4d,
    "resnext101_32x8d": tvm.resnext101_32x8d,
    "wide_resnet50_2": tvm.wide_resnet50_2,
    "wide_resnet101_2": tvm.wide_resnet101_2,
}
VITS = {  # name: (layers, heads, width, mlp width)
    "vit_tiny": (12, 3, 192, 768),
    "vit_small": (12, 6, 384, 1536),
    "vit_base": (12, 12, 768, 3072),
}
ARCHS = sorted(RESNETS) + sorted(VITS)


def apply_cifar_stem(resnet):
    """3x3 stride-1 first conv and no max-pool: at 32 px the ImageNet stem throws away 5-10 points."""
    resnet.conv1 = nn.Conv2d(3, resnet.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    resnet.maxpool = nn.Identity()
    return resnet


def backbone_args(arch, image_size, cifar_stem="auto", patch_size=16):
    """Check and resolve the backbone settings of a config; checkpoints store the result so that evaluation
    rebuilds the same trunk. cifar_stem "auto" turns the CIFAR stem on for images of 64 px or less."""
    if arch not in RESNETS and arch not in VITS:
        raise UsageError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    stems = {"auto": image_size <= 64, "true": True, "false": False, True: True, False: False}
    if cifar_stem not in stems:
        raise UsageError(f"cifar_stem must be auto, true or false, got {cifar_stem!r}")
    if arch in VITS and image_size % patch_size:
        raise UsageError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    return {"arch": arch, "image_size": image_size, "cifar_stem": stems[cifar_stem] and arch in RESNETS,
            "patch_size": patch_size}


def build_backbone(arch, image_size=224, cifar_stem=False, patch_size=16, zero_init_residual=False):
    """Return (trunk, feature width); the first arguments are those of backbone_args. zero_init_residual starts
    the last BN of each residual block at gamma 0, so that every block begins as the identity (Goyal et al. 2017;
    the official SimSiam and Barlow Twins code do this). It is only an initialisation: evaluation rebuilds the
    trunk without it, so it is not part of backbone_args."""
    if zero_init_residual and arch not in RESNETS:
        raise UsageError(f"zero_init_residual applies to ResNets only, not to {arch}; set it to false")
    if arch in RESNETS:
        net = RESNETS[arch](zero_init_residual=zero_init_residual)
        if cifar_stem:
            apply_cifar_stem(net)
        width = net.fc.in_features
        net.fc = nn.Identity()
        return net, width
    if arch in VITS:
        layers, heads, width, mlp = VITS[arch]
        net = tvm.VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=layers,
                                    num_heads=heads, hidden_dim=width, mlp_dim=mlp)
        net.heads = nn.Identity()  # forward returns the class token
        return net, width
    raise UsageError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")

