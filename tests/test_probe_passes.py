"""The probe's passes over parameters (⟨g, w⟩ per group before and after the step) against float64 computations of
−⟨∇L, δw⟩: however the parameters are cut into chunks, in low precision, and with the layout passed as a value."""

from __future__ import annotations

import copy

import torch
from chain_models import make_case

import hf_fsf.probe as probe_module
from hf_fsf import FeatureSpeedProbe, find_blocks
from hf_fsf.layout import HEAD, STEM


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def step_with_reference(model, x, y, optimizer, angle=False, **probe_kwargs):
    """(stats, {group: −⟨g, δw⟩ in float64}) of one step; tied parameters count in the stem and head sums."""
    before = {id(p): p.detach().double().clone() for p in model.parameters()}
    torch.manual_seed(1)  # the same dropout masks in every run
    with FeatureSpeedProbe(model, **probe_kwargs) as probe:
        stats = probe.measure_step(lambda: model.loss(model(x), y), optimizer, angle=angle)
        groups = probe.layout.parameter_groups(tied="own")
    want = {}
    for name, params in groups.items():
        want[name] = -sum(
            float((p.grad.double() * (p.detach().double() - before[id(p)])).sum())
            for p in params
            if p.grad is not None
        )
    return stats, want


def test_contributions_do_not_depend_on_the_chunks(monkeypatch):
    """Chunks of 50 elements cut every parameter into pieces and every group into several chunks."""
    model, x, y = make_case("tied")
    twin = copy.deepcopy(model)
    whole, want = step_with_reference(model, x, y, torch.optim.Adam(model.parameters(), lr=1e-5))
    monkeypatch.setattr(probe_module, "_CHUNK_CPU", 50)
    cut, _ = step_with_reference(twin, x, y, torch.optim.Adam(twin.parameters(), lr=1e-5))
    for a, b in zip(whole.blocks, cut.blocks):
        assert rel(b.contribution, a.contribution) < 1e-9  # the summation order differs
        assert rel(a.contribution, want[a.name]) < 1e-6, a.name
    assert rel(cut.total_loss_decrease, whole.total_loss_decrease) < 1e-9
    assert rel(whole.total_loss_decrease, sum(want.values())) < 1e-6
    for name in (STEM, HEAD, *whole.group_grad_norms):
        assert rel(cut.group_grad_norms[name], whole.group_grad_norms[name]) < 1e-6


def test_bf16_parameters_multiply_in_float32():
    """bf16 × bf16 is exact in float32 and rounded in bf16: the products must be taken in float32."""
    model, x, y = make_case("mlp")
    model, x, y = model.to(torch.bfloat16), x.to(torch.bfloat16), y.to(torch.bfloat16)
    stats, want = step_with_reference(model, x, y, torch.optim.SGD(model.parameters(), lr=1e-2))
    assert stats.valid
    for block in stats.blocks:
        assert rel(block.contribution, want[block.name]) < 1e-9, block.name
    assert rel(stats.total_loss_decrease, sum(want.values())) < 1e-9


def test_blocks_may_be_a_layout():
    model, x, y = make_case("resnet")
    twin = copy.deepcopy(model)
    layout = find_blocks(twin)
    by_names, _ = step_with_reference(model, x, y, torch.optim.SGD(model.parameters(), lr=1e-3), angle=True)
    by_layout, _ = step_with_reference(
        twin, x, y, torch.optim.SGD(twin.parameters(), lr=1e-3), angle=True, blocks=layout
    )
    assert [b.name for b in by_layout.blocks] == layout.names == [b.name for b in by_names.blocks]
    for a, b in zip(by_names.blocks, by_layout.blocks):
        assert a == b
