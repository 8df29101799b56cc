"""The backward speed formula (hf_fsf/backward_speed.py, Prop. 6.1) in float64: the identity to first order, its
parts against independent computations, and the cases where it does not apply."""

from __future__ import annotations

import math

import pytest
import torch
from chain_models import make_case
from torch import nn

from hf_fsf.backward_speed import BackwardSpeedProbe, backward_speed
from hf_fsf.models import ReLUMLP, ResNet, dense_inputs


def _mlp_linear_step(lr: float, n: int = 4, depth: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    model = ReLUMLP(10, 96, depth, scaling="fsc").double()
    x = dense_inputs(n, 10, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    u = torch.randn(n, 1, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)

    def linear_loss(out: torch.Tensor) -> torch.Tensor:
        return -(out * u).sum() / n

    optimizer = torch.optim.SGD(model.param_groups(lr))
    return model, x, BackwardSpeedProbe(model).measure_step(lambda: model(x), linear_loss, optimizer)


RESNET_STEPS = (1e-4, 2.5e-5)
CONV_STEPS = (2e-4, 5e-5)


def _max_error(stats) -> float:
    return max(abs(b.bsf_ratio - 1.0) for b in stats.blocks)


def test_relu_mlp_linear_loss_identity_is_first_order():
    errors = [_max_error(_mlp_linear_step(lr)[2]) for lr in (4e-3, 1e-3, 2.5e-4)]
    assert errors[-1] < 1e-4
    # first order: the error shrinks like the step (×4 per step), not faster or slower
    for big, small in zip(errors, errors[1:]):
        assert 2.5 < big / small < 6.5, errors
    _, _, stats = _mlp_linear_step(1e-3)
    assert stats.curvature_term == 0.0  # a linear loss has no curvature term
    assert all(b.homogeneous and b.euler_gap < 1e-12 for b in stats.blocks)


def test_formula_gives_the_measured_backward_speed():
    _, _, stats = _mlp_linear_step(2.5e-4)
    assert all(b.sign_flips == 0 for b in stats.blocks)  # a small step: no ReLU switches
    for b in stats.blocks:
        predicted = backward_speed(
            stats.curvature_term, b.downstream_decrease, b.forward_norm, b.cos_theta_backward
        )
        assert predicted == pytest.approx(b.backward_update_norm, rel=1e-4)


def test_last_block_angle_is_that_of_relu():
    # One input, linear loss: only W_L moves b_{L−1} = φ'(h) ⊙ W_Lᵀ g, and δW_L = −η_L g φ(h)ᵀ, so
    # δb_{L−1} = −η_L ‖g‖² φ(h) and cos θ̃_{L−1} = ⟨h, φ(h)⟩ / (‖h‖ ‖φ(h)‖) = ‖φ(h)‖ / ‖h‖ (≈ 1/√2).
    model, x, stats = _mlp_linear_step(1e-5, n=1)
    with torch.no_grad():
        h = x
        h = model.input_layer(h)
        for block in model.blocks:
            h = block(h)
    expected = float(torch.relu(h).norm() / h.norm())
    assert stats.blocks[-1].cos_theta_backward == pytest.approx(expected, rel=1e-6)
    assert 0.5 < expected < 0.9


def test_downstream_decrease_is_the_sum_of_downstream_gradients_for_sgd():
    torch.manual_seed(3)
    model = ResNet(10, 48, 8, scaling="ntk").double()
    x = dense_inputs(5, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.randn(5, 1, dtype=torch.float64)

    def mse(out):
        return 0.5 * ((out - y) ** 2).sum() / 5

    lr = 0.3
    grads = torch.autograd.grad(mse(model(x)), list(model.parameters()))
    sq = {id(p): float((g**2).sum()) for p, g in zip(model.parameters(), grads)}
    stats = BackwardSpeedProbe(model).measure_step(
        lambda: model(x), mse, torch.optim.SGD(model.parameters(), lr)
    )
    for v, b in enumerate(stats.blocks):
        downstream = [blk.linear.weight for blk in model.blocks[v + 1 :]] + [model.readout.weight]
        assert b.downstream_decrease == pytest.approx(lr * sum(sq[id(p)] for p in downstream), rel=1e-12)


def _resnet_mse_step(lr: float):
    torch.manual_seed(5)
    model = ResNet(10, 64, 9, scaling="standard").double()
    x = dense_inputs(6, 10, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = torch.randn(6, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def mse(out):
        return 0.5 * ((out - y) ** 2).sum() / 6

    return BackwardSpeedProbe(model).measure_step(
        lambda: model(x), mse, torch.optim.SGD(model.parameters(), lr)
    )


def test_resnet_squared_loss_needs_the_curvature_term():
    # Standard scaling (σ_L = 1/√m): the output is O(1), so −f_Lᵀ ∇²loss δf_L is a large part of the numerator.
    errors = []
    for lr in RESNET_STEPS:
        stats = _resnet_mse_step(lr)
        assert abs(stats.curvature_term) > 0.2 * abs(stats.blocks[-1].downstream_decrease)
        errors.append(_max_error(stats))
    assert errors[1] < 1e-3
    assert 2.5 < errors[0] / errors[1] < 6.5


class _ConvBlock(nn.Module):
    """Bias-free residual 1-D conv block with dropout: positively 1-homogeneous for a fixed dropout mask."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.drop = nn.Dropout(0.2)

    def forward(self, h):
        return h + 0.4 * self.drop(self.conv(torch.relu(h)))


class _ConvNet(nn.Module):
    def __init__(self, channels=6, length=10, classes=3, depth=4):
        super().__init__()
        self.inp = nn.Conv1d(2, channels, 1, bias=False)
        self.blocks = nn.ModuleList(_ConvBlock(channels) for _ in range(depth))
        self.out = nn.Linear(channels * length, classes, bias=False)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(torch.relu(h).flatten(1))


def _conv_step(lr: float):
    torch.manual_seed(8)
    model = _ConvNet().double()
    x = torch.randn(7, 2, 10, dtype=torch.float64)
    t = torch.randint(0, 3, (7,))
    optimizer = torch.optim.Adam(model.parameters(), lr)
    return BackwardSpeedProbe(model).measure_step(
        lambda: model(x), lambda z: nn.functional.cross_entropy(z, t), optimizer
    )


def test_conv_net_with_dropout_and_cross_entropy():
    # Another homogeneous network: convolutions, dropout (the second pass replays the mask), and a loss with
    # curvature (cross-entropy), trained with Adam: the identity holds for any update.
    errors = []
    for lr in CONV_STEPS:
        stats = _conv_step(lr)
        assert all(b.homogeneous for b in stats.blocks)
        assert stats.curvature_term != 0.0
        errors.append(_max_error(stats))
    assert errors[1] < 1e-3
    assert 2.5 < errors[0] / errors[1] < 6.5


def test_inhomogeneous_network_has_no_ratio():
    model, x, y = make_case("mlp")  # biases in the input layer and the readout
    probe = BackwardSpeedProbe(model)
    with pytest.warns(UserWarning, match="not positively 1-homogeneous"):
        stats = probe.measure_step(
            lambda: model(x), lambda out: model.loss(out, y), torch.optim.SGD(model.parameters(), 1e-3)
        )
    assert all(not b.homogeneous and b.bsf_ratio is None for b in stats.blocks)
    assert all(math.isfinite(b.cos_theta_backward) for b in stats.blocks)


def test_errors_name_the_cause():
    model, ids, targets = make_case("tied")
    with pytest.raises(ValueError, match="tied between the stem and the head"):
        BackwardSpeedProbe(model)
    torch.manual_seed(0)
    mlp = ReLUMLP(4, 8, 5).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="scalar"):
        BackwardSpeedProbe(mlp).measure_step(
            lambda: mlp(x), lambda out: out, torch.optim.SGD(mlp.parameters(), 0.1)
        )
    for p in list(mlp.input_layer.parameters()) + list(mlp.blocks[0].parameters()):
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        BackwardSpeedProbe(mlp).measure_step(
            lambda: mlp(x),
            lambda out: out.sum(),
            torch.optim.SGD([p for p in mlp.parameters() if p.requires_grad], 0.1),
        )
