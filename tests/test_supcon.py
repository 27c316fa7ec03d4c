"""SupCon-specific checks: with every label distinct it is SimCLR's NT-Xent; any number of views; an anchor
without a positive contributes 0, never NaN; the ImageNet config builds the official TensorFlow head on a
normalised representation; unlabelled images are a clear error before anything is written.

Its case in the battery (CASE, which tests/test_battery.py runs): L_out against its per-anchor formula, over labels
that repeat and labels that occur once (whose only positive is the image's other view), with the labels gathered
across ranks."""
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import simclr
import supcon
from battery import MethodCase
from common.config import UsageError, load_config
from helpers import REPO


# ---- the battery's case ----
LABELS = [0, 1, 0, 2, 1, 1, 3, 0]  # 2 and 3 occur once; each rank's half holds a label found on the other rank
TEMPERATURE = 0.3


def supcon_inputs():
    g = torch.Generator().manual_seed(0)
    return {"z": torch.randn(8, 2, 16, generator=g), "labels": torch.tensor(LABELS)}  # n x views x d, n


def supcon_call(module, x):
    return module.supcon_loss(x["z"], x["labels"], temperature=TEMPERATURE), {}


def supcon_reference(x):
    """Eq. 2 of the paper, literally: over the views i of all images, with A(i) every other view and P(i) those of
    i's class, -1/|P(i)| sum_p log exp(s_ip / tau) / sum_{a in A(i)} exp(s_ia / tau), averaged over the anchors
    (an anchor without positives counts 0, as in the official code)."""
    tau = TEMPERATURE
    views = [(x["z"][i, v].double(), x["labels"][i].item()) for v in range(x["z"].shape[1]) for i in range(len(x["z"]))]
    total = 0.0
    for i, (zi, yi) in enumerate(views):
        sims = [F.cosine_similarity(zi, za, dim=0).item() / tau for za, _ in views]
        denominator = sum(math.exp(s) for a, s in enumerate(sims) if a != i)
        positives = [p for p, (_, yp) in enumerate(views) if p != i and yp == yi]
        total += -sum(math.log(math.exp(sims[p]) / denominator) for p in positives) / max(len(positives), 1)
    return total / len(views)


CASE = MethodCase(model="SupCon", inputs=supcon_inputs, call=supcon_call, reference=supcon_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32"])


# ---- supcon's own tests ----
def test_distinct_labels_give_simclrs_nt_xent():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    ours = supcon.supcon_loss(torch.stack([z1, z2], dim=1), torch.arange(6), temperature=0.2)
    torch.testing.assert_close(ours, simclr.simclr_loss(z1, z2, temperature=0.2))


def test_any_number_of_views():
    g = torch.Generator().manual_seed(1)
    x = {"z": torch.randn(5, 3, 8, generator=g), "labels": torch.tensor([0, 1, 0, 2, 1])}
    loss = supcon.supcon_loss(x["z"], x["labels"], temperature=0.3)
    assert loss.item() == pytest.approx(supcon_reference(x), rel=1e-5)


def test_an_anchor_without_positive_contributes_zero():
    """One view each: the images of classes 1 and 2 have no positive; the loss is that of the two images of
    class 0 (each the other's only positive), divided by all 4 anchors, as the official code averages."""
    z = torch.randn(4, 1, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    loss = supcon.supcon_loss(z, torch.tensor([0, 1, 0, 2]), temperature=0.5)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(z.grad).all()
    unit = F.normalize(z[:, 0].detach().double(), dim=1)
    sims = unit @ unit.T / 0.5
    expected = 0.0
    for i, p in ((0, 2), (2, 0)):
        others = [a for a in range(4) if a != i]
        expected += -(sims[i, p] - torch.logsumexp(sims[i, others], dim=0)).item()
    assert loss.item() == pytest.approx(expected / 4, rel=1e-5)


def test_imagenet_config_builds_the_official_head_on_a_normalised_representation():
    """configs/supcon_imagenet.yaml: Proj is one Linear layer to 128 without bias, fed r / ||r|| (here on a
    ResNet-18 at 32 px, for speed)."""
    cfg = load_config(supcon.Config, ["--config", str(REPO / "configs" / "supcon_imagenet.yaml"),
                                      "--arch", "resnet18", "--image_size", "32"])
    model = supcon.SupCon(cfg).eval()
    assert [type(m) for m in model.projector] == [torch.nn.Linear] and model.projector[0].bias is None
    assert model.projector[0].out_features == 128
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        z1, _ = model(x1, x2)
        r = F.normalize(model.backbone(x1), dim=1)
    torch.testing.assert_close(z1, model.projector(r))


def test_unlabelled_images_are_a_clear_error(tmp_path):
    """A folder without class sub-folders (label -1, as stl10's unlabeled images): a one-line UsageError that
    names the count, raised before anything is written."""
    (tmp_path / "flat" / "train").mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(tmp_path / "flat" / "train" / f"{i}.png")
    cfg = supcon.Config(dataset="folder", data_dir=str(tmp_path / "flat"), batch_size=4, num_workers=0,
                        out_dir=str(tmp_path / "run"))
    with pytest.raises(UsageError, match="SupCon needs a label for every image, and 8 of the pre-training") as e:
        supcon.train(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()
