"""The Backward-to-Feature Kernel: exact on a case with a closed form, δf = −K b to first order, and the
spectral statements of PAPER.md §4 against the angle the probe measures."""

import pytest
import torch
from torch import nn

from hf_fsf.kernel import backward_feature_kernel, compare_with_probe, kernel_stats
from hf_fsf.models import ReLUMLP, ResNet, dense_inputs


def _regression(model, n, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = dense_inputs(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return lambda: 0.5 * (model(x) - y).pow(2).mean(), x


def _capture_blocks(model):
    out = {}
    hooks = [
        b.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, o.detach().flatten().clone()))
        for i, b in enumerate(model.blocks)
    ]
    return out, hooks


def test_single_block_kernel_has_closed_form():
    """Frozen W_1: f_2 = W_2 φ(h_1) has only W_2 upstream, so K_2 = η_hid · (G ⊗ I_m), G_ij = ⟨φ(h_1,i), φ(h_1,j)⟩."""
    torch.manual_seed(0)
    model = ReLUMLP(10, 6, 4, scaling="fsc", freeze_first_layer=True).double()
    loss_fn, x = _regression(model, n=3)
    opt = torch.optim.SGD(model.param_groups(0.7))
    (block,) = backward_feature_kernel(model, loss_fn, opt, blocks=["blocks.0"])
    eta = opt.param_groups[0]["lr"]
    phi = torch.relu(x @ model.input_layer.weight.T)
    expected = eta * torch.kron(phi @ phi.T, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(block.kernel, expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ReLUMLP(10, 12, 5, scaling="ntk"),
        lambda: ResNet(10, 12, 5, beta="c/sqrt(L)", c=1.5, scaling="fsc"),
    ],
)
def test_kernel_predicts_the_feature_update_to_first_order(make):
    """Plain GD with different rates per layer and a tiny step: the re-forward's δf_ℓ equals −K_ℓ b_ℓ."""
    torch.manual_seed(1)
    model = make().double()
    loss_fn, _ = _regression(model, n=4)
    opt = torch.optim.SGD(model.param_groups(1e-5))
    kernels = backward_feature_kernel(model, loss_fn, opt)
    after, hooks = _capture_blocks(model)
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    with torch.no_grad():
        loss_fn()
    for h in hooks:
        h.remove()
    for i, k in enumerate(kernels):
        delta = after[i] - k.output
        assert delta.norm() > 0
        rel = (k.kernel @ k.backward + delta).norm() / delta.norm()
        assert rel < 1e-4, (k.name, float(rel))


@pytest.mark.parametrize("n_inputs", [1, 4])
@pytest.mark.parametrize(
    "make", [lambda: ReLUMLP(10, 24, 6, scaling="fsc"), lambda: ResNet(10, 24, 6, beta="1", scaling="fsc")]
)
def test_measured_angle_lies_in_the_kernel_bound(make, n_inputs):
    torch.manual_seed(2)
    model = make().double()
    loss_fn, _ = _regression(model, n=n_inputs, seed=n_inputs)
    stats = compare_with_probe(model, loss_fn, torch.optim.SGD(model.param_groups(1e-3)))
    assert len(stats) == 4
    for s in stats:
        assert s.lower_bound - 1e-3 <= s.cos_theta_measured <= 1 + 1e-6, s
        assert s.cos_theta_measured == pytest.approx(s.cos_theta_kernel, abs=2e-3)  # first-order error only


def test_moment_prediction_at_init_with_one_input():
    """Width 256, one input, at init: cos θ_{L−1} ≈ M₁/√M₂ (b roughly Gaussian and independent of K)."""
    torch.manual_seed(3)
    model = ReLUMLP(10, 256, 6, scaling="fsc", freeze_first_layer=True).double()
    loss_fn, _ = _regression(model, n=1, seed=3)
    (s,) = compare_with_probe(model, loss_fn, torch.optim.SGD(model.param_groups(1e-3)), blocks=["blocks.3"])
    assert s.rank == 256
    assert s.moment_prediction == pytest.approx(s.cos_theta_measured, rel=0.2)
    assert s.cos_theta_measured < 0.9  # a real test: deep MLP angles are well below 1


class _PostActivation(nn.Module):
    """Blocks that output φ(W f): dead units give rows of zeros in the Jacobian, so K is rank-deficient."""

    def __init__(self, width=8, depth=3):
        super().__init__()
        self.input_layer = nn.Linear(4, width, bias=False).requires_grad_(False)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width, bias=False), nn.ReLU()) for _ in range(depth)
        )
        self.readout = nn.Linear(width, 1, bias=False)

    def forward(self, x):
        f = self.input_layer(x)
        for b in self.blocks:
            f = b(f)
        return self.readout(f)


def test_rank_deficient_kernel_bound_uses_the_range():
    torch.manual_seed(4)
    model = _PostActivation().double()
    x = torch.randn(2, 4, dtype=torch.float64)
    loss_fn = lambda: model(x).sum()  # noqa: E731
    stats = compare_with_probe(model, loss_fn, torch.optim.SGD(model.parameters(), lr=1e-4))
    deficient = [s for s in stats if s.rank < s.numel]
    assert deficient, [s.rank for s in stats]
    for s in deficient:
        assert s.range_fraction < 1.0
        assert s.lower_bound == pytest.approx(s.condition_bound * s.range_fraction)
        assert s.lower_bound - 1e-3 <= s.cos_theta_measured <= s.range_fraction + 1e-3


def test_bad_inputs_raise_clear_errors():
    model = ReLUMLP(10, 8, 4).double()
    loss_fn, _ = _regression(model, n=2)
    with pytest.raises(ValueError, match="plain gradient descent"):
        compare_with_probe(model, loss_fn, torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="not trainable parameters"):
        backward_feature_kernel(model, loss_fn, {"nope.weight": 1.0})
    (k,) = backward_feature_kernel(model, loss_fn, 0.1, blocks=["blocks.1"])
    assert kernel_stats(k).numel == 2 * 8
