"""What the probe's cheap path costs, counted instead of timed: kernel-launching ops and host syncs of one measured
step through the low-level API, against the same training step without the probe (tiny GPT-2, 2/4/8 layers).

On a GPU every counted op is a kernel launch and every sync stalls the host, so a step bound by the host costs
about its op count: these counts are the CPU proxy for the GPU overhead (see recipes/bench_overhead.py for times).
"""

from __future__ import annotations

import pytest
import torch
from op_counting import count_ops

from hf_fsf import FeatureSpeedProbe
from hf_fsf.models import small_gpt2

# The targets of the GPU-cost issue: ≤ 1.25× the ops of a plain step, at most one extra host sync.
MAX_OP_RATIO = 1.25
MAX_EXTRA_SYNCS = 1


def _training_step(model, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()


def _measured_step(probe, model, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    probe.begin_step(angle=False)
    model(input_ids=batch, labels=batch).loss.backward()
    probe.before_optimizer_step()
    optimizer.step()
    return probe.after_optimizer_step()


@pytest.mark.parametrize("layers", [2, 4, 8])
def test_cheap_step_launches_few_ops_and_syncs_once(layers):
    model = small_gpt2(layers=layers, width=32, heads=2, block_size=16, seed=0)
    # foreach AdamW: the optimizer a GPU run gets by default, a handful of ops per step (the strictest baseline).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with FeatureSpeedProbe(model) as probe:
        _training_step(model, optimizer, batch)  # optimizer state exists: later steps are alike
        _measured_step(probe, model, optimizer, batch)  # the probe's first-call work (if any) is not counted
        plain_ops, plain_syncs = count_ops(lambda: _training_step(model, optimizer, batch))
        stats = []
        probe_ops, probe_syncs = count_ops(
            lambda: stats.append(_measured_step(probe, model, optimizer, batch))
        )
    assert stats[0].valid and len(stats[0].blocks) == layers
    plain, measured = sum(plain_ops.values()), sum(probe_ops.values())
    extra = probe_ops - plain_ops
    assert measured <= MAX_OP_RATIO * plain, (
        f"{layers} layers: the cheap step dispatches {measured} ops, {measured / plain:.2f}× a plain step's "
        f"{plain}; most added: {extra.most_common(8)}"
    )
    assert probe_syncs - plain_syncs <= MAX_EXTRA_SYNCS, (
        f"{layers} layers: {probe_syncs} host syncs (item, tolist) in the cheap step against {plain_syncs} in a "
        "plain step"
    )
