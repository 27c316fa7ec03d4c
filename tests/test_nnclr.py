"""NNCLR-specific checks: the nearest neighbour is the support set's most similar entry and carries no gradient,
the support set advances by the global batch and wraps, and a support set that does not fit the global batch
is a clear error. The battery (tests/case_nnclr.py) checks the loss and the support set across ranks."""
import pytest
import torch
import torch.nn.functional as F

import nnclr
from common.config import UsageError


def test_nearest_neighbour_is_the_most_similar_entry_without_gradient():
    g = torch.Generator().manual_seed(0)
    queue = F.normalize(torch.randn(32, 8, generator=g), dim=1)
    z = (3 * queue[[5, 17, 5]] + 0.01 * torch.randn(3, 8, generator=g)).requires_grad_()  # near entries 5, 17, 5
    nn = nnclr.nearest_neighbour(z, queue)
    assert torch.equal(nn, queue[[5, 17, 5]]) and not nn.requires_grad
    cosines = F.normalize(z.detach(), dim=1) @ queue.T
    assert torch.equal(nn, queue[cosines.argmax(1)])


def test_the_predictions_carry_the_gradient():
    g = torch.Generator().manual_seed(1)
    p1, p2, nn1, nn2 = (torch.randn(4, 8, generator=g).requires_grad_() for _ in range(4))
    nnclr.nnclr_loss(p1, p2, nn1.detach(), nn2.detach(), 0.2).backward()
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def test_support_set_advances_by_the_global_batch_and_wraps():
    queue = torch.zeros(12, 2)
    for step in range(4):
        nnclr.enqueue(queue, torch.full((4, 2), float(step + 1)), step)
    expected = torch.tensor([4.0] * 4 + [2.0] * 4 + [3.0] * 4)[:, None].expand(12, 2)
    torch.testing.assert_close(queue, F.normalize(expected, dim=1))


def test_support_set_size_must_fit_the_global_batch():
    with pytest.raises(UsageError, match="queue_size 1000 must be a positive multiple of the global batch 64"):
        nnclr.NNCLR(nnclr.Config(batch_size=32, queue_size=1000, proj_hidden_dim=16, pred_hidden_dim=16), 2)
    model = nnclr.NNCLR(nnclr.Config(batch_size=32, queue_size=1024, proj_hidden_dim=16, pred_hidden_dim=16), 2)
    assert model.queue.shape == (1024, 256) and torch.allclose(model.queue.norm(dim=1), torch.ones(1024))
    assert [type(m).__name__ for m in model.projector][-1] == "BatchNorm1d"  # BN after every Linear
