"""The paper's baselines: structure seen by find_blocks, the forward maps, init scales and per-layer rates."""

import math
from dataclasses import astuple

import pytest
import torch

from hf_fsf import find_blocks
from hf_fsf.models import (
    MLPBlock,
    ReLUMLP,
    ResidualBlock,
    ResNet,
    branch_scale,
    dense_inputs,
    model_scaling,
)


@pytest.mark.parametrize("make", [lambda: ReLUMLP(10, 16, 7), lambda: ResNet(10, 16, 7, beta="1/L")])
def test_find_blocks_sees_stem_hidden_layers_and_head(make):
    model = make()
    layout = find_blocks(model)
    assert layout.names == [f"blocks.{j}" for j in range(7 - 2)]  # L − 2 hidden layers ℓ = 2 .. L−1
    assert [n for n, _ in layout.stem_params] == ["input_layer.weight"]
    assert len(layout.head_params) == 1 and layout.head_params[0][1].shape == (1, 16)


def test_mlp_forward_is_the_papers_recursion():
    torch.manual_seed(1)
    model = ReLUMLP(5, 8, 5, output_dim=2).double()
    x = dense_inputs(3, 5, dtype=torch.float64)
    h = x @ model.input_layer.weight.T  # h_1 = W_1 x
    for block in model.blocks:  # h_ℓ = W_ℓ φ(h_{ℓ−1})
        h = torch.relu(h) @ block.linear.weight.T
    out = torch.relu(h) @ model.readout.linear.weight.T  # out = W_L φ(h_{L−1})
    torch.testing.assert_close(model(x), out)


def test_residual_block_recursion_and_beta_one_is_the_mlp_block():
    torch.manual_seed(2)
    f = torch.randn(4, 8, dtype=torch.float64)
    beta = 0.3
    block = ResidualBlock(8, beta).double()
    expected = math.sqrt(1 - beta**2) * f + beta * torch.relu(f) @ block.linear.weight.T
    torch.testing.assert_close(block(f), expected)
    plain, mlp = ResidualBlock(8, 1.0).double(), MLPBlock(8).double()
    mlp.linear.weight.data.copy_(plain.linear.weight.data)
    torch.testing.assert_close(plain(f), mlp(f))


def test_branch_rules():
    assert branch_scale("1", 100) == 1.0
    assert branch_scale("1/sqrt(L)", 100) == pytest.approx(0.1)
    assert branch_scale("1/L", 100) == pytest.approx(0.01)
    assert branch_scale("c/sqrt(L)", 100, c=3.0) == pytest.approx(0.3)
    assert branch_scale(0.25, 100) == 0.25
    with pytest.raises(ValueError, match="β ≤ 1"):
        branch_scale("c/sqrt(L)", 4, c=4.0)
    with pytest.raises(ValueError, match="unknown branch rule"):
        branch_scale("1/L^2", 10)
    with pytest.raises(ValueError, match="L must be an integer ≥ 3"):
        ReLUMLP(10, 16, 2)


@pytest.mark.parametrize(
    "make", [lambda: ReLUMLP(10, 256, 20), lambda: ResNet(10, 256, 20, beta="1/sqrt(L)")]
)
def test_he_init_propagates_the_signal(make):
    """Forward rms of every hidden layer stays Θ(1) (SP): ‖x‖ = √d, σ_1 = 1/√d, σ_hid = √(2/m)."""
    torch.manual_seed(3)
    model = make()
    x = dense_inputs(32, 10)
    rms = []
    hooks = [
        b.register_forward_hook(lambda m, a, o: rms.append(float(o.detach().pow(2).mean().sqrt())))
        for b in model.blocks
    ]
    model(x)
    for h in hooks:
        h.remove()
    assert all(0.6 < r < 1.6 for r in rms), rms


def test_table_one_scalings_set_init_std_and_rates():
    m, L, d, k = 300, 12, 10, 2
    model = ReLUMLP(d, m, L, output_dim=k, scaling="fsc", freeze_first_layer=True)
    # init std, measured on the weights (Table 1, FSC row)
    assert model.input_layer.weight.std().item() == pytest.approx(1 / math.sqrt(d), rel=0.15)
    assert model.blocks[0].linear.weight.std().item() == pytest.approx(math.sqrt(2 / m), rel=0.05)
    assert model.readout.linear.weight.std().item() == pytest.approx(math.sqrt(k * L) / m, rel=0.15)
    groups = {g["name"]: g for g in model.param_groups(1e-3)}
    assert set(groups) == {"hidden", "readout"}  # the frozen first layer is left out
    assert groups["hidden"]["lr"] == pytest.approx(1e-3 / L**2)
    assert groups["readout"]["lr"] == pytest.approx(1e-3 * k / (m * L))
    assert len(groups["hidden"]["params"]) == L - 2
    ntk = {g["name"]: g["lr"] for g in ReLUMLP(d, m, L, scaling="ntk").param_groups(1.0)}
    assert ntk == pytest.approx({"input": 1 / (d * L), "hidden": 1 / (m * L), "readout": 1 / (m * L)})
    std = {g["name"]: g["lr"] for g in ReLUMLP(d, m, L).param_groups(0.1)}
    assert std == pytest.approx({"input": 0.1, "hidden": 0.1, "readout": 0.1})
    with pytest.raises(ValueError, match="unknown scaling"):
        ReLUMLP(d, m, L, scaling="mup")


def test_resnet_scalings_divide_hidden_rate_by_beta_squared():
    m, L, d = 64, 16, 10
    beta = 1 / math.sqrt(L)
    fsc = model_scaling("fsc", m, L, d, 1, beta=beta)
    assert fsc.sigma_out == pytest.approx(1 / m)  # no √L: cos θ = Θ(1) for β = 1/√L
    assert fsc.lr_hidden == pytest.approx(1.0)  # depth-μP
    # β = 1: the ResNet's blocks are the MLP's, and so is its FSC row
    assert astuple(model_scaling("fsc", m, L, d, 1, beta=1.0)) == pytest.approx(
        astuple(model_scaling("fsc", m, L, d, 1))
    )
    ntk_mlp, ntk_res = model_scaling("ntk", m, L, d), model_scaling("ntk", m, L, d, beta=0.5)
    assert ntk_res.lr_hidden == pytest.approx(ntk_mlp.lr_hidden / 0.25)
    assert ntk_res.lr_out == pytest.approx(ntk_mlp.lr_out)


def test_frozen_first_layer_does_not_move_under_sgd():
    torch.manual_seed(4)
    model = ReLUMLP(10, 32, 5, scaling="fsc", freeze_first_layer=True)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.param_groups(1.0))
    x = dense_inputs(4, 10)
    model(x).pow(2).mean().backward()
    opt.step()
    after = list(model.parameters())
    assert torch.equal(before[0], after[0])
    assert all(not torch.equal(b, a) for b, a in zip(before[1:], after[1:]))
