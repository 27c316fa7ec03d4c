"""SupCon-specific checks: with every label distinct it is SimCLR's NT-Xent; any number of views; an anchor
without a positive contributes 0, never NaN; an unlabelled data set is a clear error."""
import math

import pytest
import torch
from PIL import Image

import simclr
import supcon
from case_supcon import supcon_reference
from battery import quick_args
from helpers import assert_one_line_error, run_script


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
    sims = torch.nn.functional.normalize(z[:, 0].detach().double(), dim=1) @ torch.nn.functional.normalize(
        z[:, 0].detach().double(), dim=1).T / 0.5
    expected = 0.0
    for i, p in ((0, 2), (2, 0)):
        others = [a for a in range(4) if a != i]
        expected += -(sims[i, p] - torch.logsumexp(sims[i, others], dim=0)).item()
    assert loss.item() == pytest.approx(expected / 4, rel=1e-5)


def test_unlabelled_images_are_a_clear_error(tmp_path):
    images = tmp_path / "flat"
    (images / "train").mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(images / "train" / f"{i}.png")
    args = quick_args("supcon", tmp_path / "run", "--dataset", "folder", "--data_dir", str(images), "--subset", "0",
                      "--batch_size", "4")
    assert_one_line_error(run_script(args), "SupCon needs a label for every image")
