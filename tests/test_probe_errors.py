"""Bad input raises a clear error; faults during a step mark it invalid instead of raising."""

from __future__ import annotations

import pytest
import torch
from chain_models import make_case
from torch import nn

from hf_fsf import FeatureSpeedProbe, find_blocks


def test_plain_sequential_of_layers_asks_for_blocks():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="blocks="):
        FeatureSpeedProbe(model)


def test_two_block_lists_are_ambiguous_and_names_resolve_it():
    class TwoStacks(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.dec = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            for layer in [*self.enc, *self.dec]:
                x = layer(x)
            return x

    model = TwoStacks()
    with pytest.raises(ValueError, match="ambiguous"):
        find_blocks(model)
    layout = find_blocks(model, blocks=["enc.0", "enc.1", "dec.0"])
    assert layout.names == ["enc.0", "enc.1", "dec.0"]
    assert [n for n, _ in layout.head_params] == ["dec.1.weight", "dec.1.bias", "dec.2.weight", "dec.2.bias"]
    with pytest.raises(ValueError, match="no module named"):
        find_blocks(model, blocks=["enc.7"])


def test_layout_of_tied_model():
    model, _, _ = make_case("tied")
    layout = find_blocks(model)
    assert layout.names == ["blocks.0", "blocks.1", "blocks.2"]
    assert [n for n, _ in layout.stem_params] == ["pos"]
    assert [n for n, _ in layout.head_params] == ["norm.weight", "norm.bias"]
    assert len(layout.tied) == 1 and layout.tied[0].stem_name == "embed.weight"
    assert layout.tied[0].head_name == "readout.weight" and layout.tied[0].stem_module is model.embed


def test_non_scalar_loss_is_refused():
    model, x, y = make_case("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with FeatureSpeedProbe(model) as probe, pytest.raises(ValueError, match="scalar"):
        probe.measure_step(lambda: (model(x) - y) ** 2, opt)


def test_optimizer_that_does_not_step_is_reported():
    model, x, y = make_case("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with FeatureSpeedProbe(model) as probe, pytest.raises(RuntimeError, match="changed no parameter"):
        probe.measure_step(lambda: model.loss(model(x), y), opt)
    with FeatureSpeedProbe(
        model, strict=False
    ) as probe:  # inside training: lr = 0 at warm-up start is normal
        stats = probe.measure_step(lambda: model.loss(model(x), y), opt)
    assert not stats.valid


def test_nan_marks_the_step_invalid_without_raising():
    model, x, y = make_case("resnet")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with FeatureSpeedProbe(model, strict=False) as probe, pytest.warns(UserWarning, match="invalid"):
        stats = probe.measure_step(lambda: model.loss(model(bad), y), opt, angle=True)
    assert not stats.valid
    assert stats.to_dict()["fsf/valid"] == 0.0


def test_close_removes_every_hook():
    model, x, y = make_case("tied")
    count = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    before = count()
    probe = FeatureSpeedProbe(model)
    assert count() > before
    probe.close()
    assert count() == before
    assert all(not p._backward_hooks for p in model.parameters() if p._backward_hooks is not None)


def test_to_dict_keys():
    model, x, y = make_case("resnet")
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    with FeatureSpeedProbe(model) as probe:
        stats = probe.measure_step(lambda: model.loss(model(x), y), opt, angle=True)
    flat = stats.to_dict()
    assert flat["fsf/blocks.0/cos_theta"] == stats.blocks[0].cos_theta
    assert flat["fsf/cos_theta_min"] == min(b.cos_theta for b in stats.blocks)
    assert all(isinstance(v, float) for v in flat.values())
    record = stats.to_record()
    assert record["blocks"][2]["name"] == "blocks.2" and record["angle"] is True
