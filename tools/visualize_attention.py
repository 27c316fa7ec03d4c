"""What a ViT's class token attends to: the self-attention of the last block's class token over the patches, per
head, for given images, drawn as one PNG grid (a row per image: the image, then one map per head), as in DINO's
and MoCo v3's figures.

    python tools/visualize_attention.py runs/dino_vit/last.pt cat.jpg dog.jpg --out attention.png
    python tools/visualize_attention.py runs/moco_v3_vit/last.pt *.png --image_size 224

The trunk is the checkpoint's "backbone" (DINO: the teacher's). Each image is resized and centre-cropped to
--image_size (default: the checkpoint's; any multiple of the patch size works, the position embedding is
resized), normalised with ImageNet's statistics (--dataset to use another's). matplotlib is an optional dependency
(requirements-dev.txt), as for tools/plot_metrics.py."""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.augment import eval_transform  # noqa: E402
from common.backbones import VITS, resized_position_embedding  # noqa: E402
from common.checkpoints import load_backbone  # noqa: E402
from common.config import UsageError, usage_errors  # noqa: E402


@torch.no_grad()
def last_block_attention(vit, x):
    """heads x n x (grid_h x grid_w): the softmax attention of the class token over the patches in the last block
    of `vit` (common.backbones.ViT, torchvision's layout) for images x (n x 3 x h x w); the class token's weight on
    itself is left out, so each map sums to at most 1."""
    n, _, h, w = x.shape
    p = vit.patch_size
    tokens = vit.conv_proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([vit.class_token.expand(n, -1, -1), tokens], dim=1)
    tokens = tokens + resized_position_embedding(vit.encoder.pos_embedding, h // p, w // p)
    layers = list(vit.encoder.layers)
    for layer in layers[:-1]:
        tokens = layer(tokens)
    block = layers[-1]
    attention = block.self_attention
    y = block.ln_1(tokens)
    q, k, _ = F.linear(y, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    heads, d = attention.num_heads, y.shape[-1] // attention.num_heads
    q, k = (t.reshape(n, -1, heads, d).transpose(1, 2) for t in (q, k))  # n x heads x tokens x d
    weights = (q[:, :, :1] @ k.transpose(-2, -1) / math.sqrt(d)).softmax(-1)  # n x heads x 1 x tokens
    return weights[:, :, 0, 1:].reshape(n, heads, h // p, w // p).transpose(0, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a DINO or MoCo v3 checkpoint with a ViT trunk")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--image_size", type=int, default=0, help="side of the input (0: the checkpoint's)")
    parser.add_argument("--dataset", default="folder", help="whose normalisation: folder (ImageNet's) | cifar10 | ...")
    parser.add_argument("--out", default="attention.png")
    args = parser.parse_args()
    with usage_errors():
        backbone, _, backbone_args, _ = load_backbone(args.checkpoint)
        if backbone_args["arch"] not in VITS:
            raise UsageError(f"{args.checkpoint} holds a {backbone_args['arch']}; attention maps need a ViT "
                             f"({', '.join(VITS)})")
        size = args.image_size or backbone_args["image_size"]
        if size % backbone_args["patch_size"]:
            raise UsageError(f"--image_size {size} is not a multiple of the patch size {backbone_args['patch_size']}")
        transform, pictures = eval_transform(size, args.dataset), []
        for path in args.images:
            try:
                pictures.append(Image.open(path).convert("RGB"))
            except OSError as e:
                raise UsageError(f"cannot read image {path} ({e})") from None
        maps = last_block_attention(backbone.eval(), torch.stack([transform(p) for p in pictures]))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: drawing needs matplotlib, an optional dependency: pip install matplotlib") from None
    heads = maps.shape[0]
    figure, axes = plt.subplots(len(pictures), heads + 1, figsize=(2 * (heads + 1), 2 * len(pictures)),
                                squeeze=False)
    for row, picture in enumerate(pictures):
        axes[row][0].imshow(picture.resize((size, size)))
        for head in range(heads):
            axes[row][head + 1].imshow(maps[head, row].numpy(), cmap="inferno")
            if row == 0:
                axes[row][head + 1].set_title(f"head {head + 1}")
        for ax in axes[row]:
            ax.axis("off")
    figure.tight_layout()
    figure.savefig(args.out, dpi=100)
    print(f"wrote {args.out}: the last block's class-token attention, {heads} heads x {len(pictures)} images")


if __name__ == "__main__":
    main()
