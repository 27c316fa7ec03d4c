"""Checks the CPU bf16 pitfall of docs/troubleshooting.md (NaN or inf): the bf16 weight gradient of a 3x3
stride-2 convolution (a ResNet's layer4 entry) against the fp32 one, for inputs of 1, 2 and 4 pixels a side.
Run: python tools/cpu_bf16_conv_check.py. torch 2.14.1 on CPU prints an infinite (or huge) error at 1 pixel,
~0.003 at 2 and 4."""
import torch

torch.manual_seed(0)
for size in (1, 2, 4):
    conv = torch.nn.Conv2d(256, 512, 3, stride=2, padding=1, bias=False)
    x = torch.randn(512, 256, size, size)
    grad_out = torch.randn(512, 512, (size + 1) // 2, (size + 1) // 2)
    conv(x).backward(grad_out)
    reference, conv.weight.grad = conv.weight.grad.clone(), None
    worst = 0.0
    for _ in range(5):  # the wrong values change from call to call
        with torch.autocast("cpu", torch.bfloat16):
            out = conv(x)
        out.float().backward(grad_out)
        worst = max(worst, ((conv.weight.grad - reference).norm() / reference.norm()).item())
        conv.weight.grad = None
    print(f"input {size} x {size}: relative error of the bf16 weight gradient {worst:.3g} (torch {torch.__version__})")
