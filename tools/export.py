"""A checkpoint's trunk, exported for other code: a plain torchvision state_dict, timm's key names for the same
architecture, or a detectron2 .pkl (the conversion MoCo's official convert-pretrain-to-detectron2.py makes).

    python tools/export.py runs/moco_v2/last.pt                          # runs/moco_v2/last_torchvision.pt
    python tools/export.py runs/dino/last.pt --format timm               # runs/dino/last_timm.pt
    python tools/export.py runs/moco_v2_imagenet/last.pt --format detectron2 --out r50_moco.pkl

The trunk is the one evaluation measures: the checkpoint's "backbone" (DINO: its teacher's; MoCo: the query
encoder, as the official code exports). torchvision: the state_dict loads (strict) into the torchvision model
with its classifier removed (`fc` / `heads` = nn.Identity; with the CIFAR stem, after common.backbones.
apply_cifar_stem). timm: ResNets keep torchvision's names (timm uses the same); ViTs are renamed to timm's
VisionTransformer (cls_token, pos_embed, patch_embed.proj, blocks.N.attn.qkv, ..., norm), which loads strict into
timm.create_model("vit_small_patch16_224", num_classes=0) and the like at the same image and patch size.
detectron2: ResNets with the ImageNet stem only, the keys renamed as detectron2's ResNet names them (stem, res2-5,
convN.norm, shortcut), numpy arrays, with "matching_heuristics" on; use it with MODEL.WEIGHTS, as MoCo's detection
configs do (their input format: RGB, ImageNet's pixel mean and std)."""
import argparse
import os
import pickle
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.backbones import RESNETS, VITS  # noqa: E402
from common.checkpoints import load_backbone  # noqa: E402
from common.config import UsageError, usage_errors  # noqa: E402

FORMATS = ("torchvision", "timm", "detectron2")


def timm_vit_keys(state):
    """torchvision's VisionTransformer names -> timm's (the tensors unchanged: both keep q, k, v in one matrix)."""
    renamed = {}
    for key, value in state.items():
        new = (key.replace("class_token", "cls_token").replace("encoder.pos_embedding", "pos_embed")
               .replace("conv_proj", "patch_embed.proj").replace("encoder.ln.", "norm."))
        new = re.sub(r"encoder\.layers\.encoder_layer_(\d+)\.", r"blocks.\1.", new)
        new = (new.replace(".ln_1.", ".norm1.").replace(".ln_2.", ".norm2.")
               .replace(".self_attention.in_proj_weight", ".attn.qkv.weight")
               .replace(".self_attention.in_proj_bias", ".attn.qkv.bias")
               .replace(".self_attention.out_proj.", ".attn.proj.")
               .replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.3.", ".mlp.fc2."))
        renamed[new] = value
    return renamed


def detectron2_keys(state):
    """torchvision's ResNet names -> detectron2's, as MoCo's convert-pretrain-to-detectron2.py renames them."""
    renamed = {}
    for key, value in state.items():
        new = key if "layer" in key else f"stem.{key}"
        for i in (1, 2, 3, 4):
            new = new.replace(f"layer{i}", f"res{i + 1}")
        for i in (1, 2, 3):
            new = new.replace(f"bn{i}", f"conv{i}.norm")
        new = new.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        renamed[new] = value.detach().numpy()
    return {"model": renamed, "__author__": "ssl-pytorch", "matching_heuristics": True}


def export(checkpoint, fmt, out=""):
    """Write the trunk of `checkpoint` in format `fmt`; returns the path written."""
    if fmt not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    backbone, _, args, _ = load_backbone(checkpoint)
    state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    arch = args["arch"]
    if fmt != "torchvision" and arch not in RESNETS and arch not in VITS:
        raise UsageError(f"--format {fmt} exports ResNets and ViTs; {arch} exports as --format torchvision only")
    if fmt == "detectron2" and (arch not in RESNETS or args.get("cifar_stem")):
        raise UsageError(f"--format detectron2 takes a ResNet with the ImageNet stem; this trunk is a {arch}"
                         + (" with the CIFAR stem" if arch in RESNETS else ""))
    if fmt == "timm" and args.get("cifar_stem"):
        raise UsageError("--format timm takes the ImageNet stem; this trunk has the CIFAR stem (export it as "
                         "--format torchvision)")
    root, _ = os.path.splitext(checkpoint)
    out = out or f"{root}_{fmt}.{'pkl' if fmt == 'detectron2' else 'pt'}"
    if fmt == "detectron2":
        with open(out, "wb") as f:
            pickle.dump(detectron2_keys(state), f)
    else:
        torch.save(timm_vit_keys(state) if fmt == "timm" and arch in VITS else state, out)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a method script's checkpoint (e.g. runs/simclr/last.pt)")
    parser.add_argument("--format", default="torchvision", help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--out", default="", help="the file to write (default: next to the checkpoint)")
    args = parser.parse_args()
    with usage_errors():
        path = export(args.checkpoint, args.format, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
