"""FSCOptimizer(zero_init_head=True): the zero-initialised output layer of the paper's App. B, in float64."""

from __future__ import annotations

import pytest
import torch

from hf_fsf.fsc import FSCOptimizer
from hf_fsf.models import ReLUMLP, dense_inputs


def _setup():
    torch.manual_seed(0)
    model = ReLUMLP(6, 32, 5, scaling="fsc").double()
    x = dense_inputs(8, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.randn(8, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return model, x, y


def _loss(model, x, y):
    return 0.5 * (model(x) - y).pow(2).mean()


def test_first_step_moves_only_the_head_by_the_polyak_step():
    model, x, y = _setup()
    rate = 0.05
    opt = FSCOptimizer(
        model, torch.optim.SGD, rate=rate, lr=1.0, zero_init_head=True, capture_loss=False, balance="blocks"
    )
    head = model.readout.linear.weight
    assert torch.count_nonzero(head) == 0
    others = {n: p.detach().clone() for n, p in model.named_parameters() if p is not head}
    loss = _loss(model, x, y)
    loss.backward()
    grad = head.grad.detach().clone()
    opt.step(loss=loss)
    # the only group with a gradient moves by its own share of the target (rate · loss / 5 groups with
    # balance="blocks"), so its first-step rate is the Polyak step η_L = share / ‖∇_L‖²
    share = rate * loss.item() / len(opt.group_names)
    eta = share / float((grad**2).sum())
    torch.testing.assert_close(head.detach(), -eta * grad, rtol=1e-12, atol=0)
    assert all(torch.equal(p, others[n]) for n, p in model.named_parameters() if p is not head)
    groups = opt.last_step.groups
    assert [n for n, g in groups.items() if g.active] == ["head"]
    assert groups["head"].contribution == pytest.approx(share, rel=1e-12)
    # second step: the backward pass reaches every group again
    opt.zero_grad()
    loss = _loss(model, x, y)
    loss.backward()
    opt.step(loss=loss)
    assert all(g.active for g in opt.last_step.groups.values())


def test_default_leaves_the_head_alone_and_tied_heads_are_refused():
    model, _, _ = _setup()
    before = model.readout.linear.weight.detach().clone()
    FSCOptimizer(model, torch.optim.SGD, lr=1.0, capture_loss=False)
    assert torch.equal(model.readout.linear.weight, before)
    model.readout.linear.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="zero_init_head needs a trainable readout weight"):
        FSCOptimizer(model, torch.optim.SGD, lr=1.0, zero_init_head=True, capture_loss=False)
