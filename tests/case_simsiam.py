"""SimSiam's entry in the battery: the symmetric negative cosine against its per-sample formula.

The inputs are the projections z1, z2; the predictions come from a fixed linear predictor, p = h(z) = z W, so
that z, like in the model, reaches the loss twice: as the (stopped) target and through the predictor. The
stop-gradient then shows in the gradient the battery compares (z's gradient flows only through h) rather
than leaving z without a gradient."""
import torch

from battery import MethodCase

DIM = 16


def predictor_weight():
    noise = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(1))
    return torch.eye(DIM) + 0.3 * noise / DIM ** 0.5


def simsiam_inputs():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(8, DIM, generator=g)
    return {"z1": z1, "z2": z1 + 0.5 * torch.randn(8, DIM, generator=g)}  # two views: similar, not equal


def simsiam_call(module, x):
    w = predictor_weight()
    return module.simsiam_loss(x["z1"] @ w, x["z2"] @ w, x["z1"], x["z2"]), {}


def simsiam_reference(x):
    """L = 1/2 D(p1, z2) + 1/2 D(p2, z1), D(p, z) = -p.z / (||p|| ||z||), literally, per image, averaged."""
    w = predictor_weight().double()
    z1, z2 = x["z1"].double(), x["z2"].double()
    total = 0.0
    for i in range(len(z1)):
        p1 = [sum(z1[i, k] * w[k, j] for k in range(DIM)) for j in range(DIM)]  # h(z1_i)
        p2 = [sum(z2[i, k] * w[k, j] for k in range(DIM)) for j in range(DIM)]  # h(z2_i)
        total += 0.5 * negative_cosine(p1, z2[i]) + 0.5 * negative_cosine(p2, z1[i])
    return total / len(z1)


def negative_cosine(p, z):
    dot = sum(float(a) * float(b) for a, b in zip(p, z))
    norm_p = sum(float(a) ** 2 for a in p) ** 0.5
    norm_z = sum(float(b) ** 2 for b in z) ** 0.5
    return -dot / (norm_p * norm_z)


CASE = MethodCase(model="SimSiam", inputs=simsiam_inputs, call=simsiam_call, reference=simsiam_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32", "--pred_hidden_dim", "16"])
