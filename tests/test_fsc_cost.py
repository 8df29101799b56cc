"""What FSCOptimizer.step costs beyond its base's step, counted in dispatched ops and host syncs (a CPU proxy for
GPU launch overhead): at most one host sync, and a number of ops that grows with the groups, not the parameters."""

import pytest
import torch
from op_counting import count_ops

from hf_fsf.fsc import _ROWS, FSCOptimizer
from hf_fsf.models import small_gpt2

# Per group: flatten its gradients, multiply by −δw, sum, rescale. The rest is per step (finite check, loss,
# the shares, scales and error feedback of all groups at once,
# the batched copy and update).
OPS_PER_GROUP = 4
OPS_PER_STEP = 100


def _extra_cost(layers: int, balance: str) -> tuple[int, int, int, int]:
    """(groups, parameters, ops of FSC's own work, host syncs of FSC's own work) of one step on a tiny GPT-2,
    the loss coming from the model's forward (the Trainer's path)."""
    model = small_gpt2(layers, 32, vocab_size=64, block_size=16, seed=0)
    opt = FSCOptimizer(model, base=torch.optim.AdamW, rate=0.05, lr=1e-3, balance=balance, max_scale=10.0)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))

    def forward_backward():
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()

    forward_backward()
    opt.step()  # the base's state exists from here on, as in training
    forward_backward()
    base_step, base = opt.base.step, {}

    def counted_base_step(*args, **kwargs):
        base["ops"], base["syncs"] = count_ops(lambda: base_step(*args, **kwargs))

    opt.base.step = counted_base_step
    ops, syncs = count_ops(opt.step)
    assert opt.fsc_state["step"] == 2 and opt.last_step.skipped is None
    extra_ops = sum(ops.values()) - sum(base["ops"].values())
    return len(opt.param_groups), len(list(model.parameters())), extra_ops, syncs - base["syncs"]


@pytest.mark.parametrize("balance", ["blocks", "stages"])
def test_fsc_step_costs_one_host_sync_and_ops_per_group_not_per_parameter(balance):
    (groups2, params2, ops2, syncs2), (groups8, params8, ops8, syncs8) = (
        _extra_cost(layers, balance) for layers in (2, 8)
    )
    assert (groups2, groups8) == (4, 10)
    assert params8 - params2 == 72  # 12 parameters per block: a per-parameter op would add ≥ 72
    assert syncs2 <= 1 and syncs8 <= 1
    assert ops8 - ops2 <= OPS_PER_GROUP * (groups8 - groups2)
    assert ops8 <= OPS_PER_GROUP * groups8 + OPS_PER_STEP


def test_fsc_scales_ride_along_in_the_probes_one_transfer():
    """With the callback's path (probe + FSCOptimizer), reading FSC's per-group record costs no sync of its own:
    it comes to the host in the probe's transfer, with the same numbers as a read of the record itself."""
    from hf_fsf import FeatureSpeedProbe

    model = small_gpt2(layers=2, width=32, heads=2, block_size=16, seed=0)
    opt = FSCOptimizer(model, base=torch.optim.AdamW, rate=0.05, lr=1e-3)
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))

    def measured(also_read: bool):
        opt.zero_grad(set_to_none=True)
        probe.begin_step(angle=False)
        model(input_ids=batch, labels=batch).loss.backward()
        probe.before_optimizer_step()
        opt.step()
        record = opt.last_step
        extra = [record.values] if also_read else []
        counts = count_ops(lambda: probe.after_optimizer_step(also_read=extra))[1]
        if also_read:
            counts += count_ops(lambda: record.read_from(probe.also_read_values[0]))[1]
        expected = [row.tolist() for row in record.values]  # read here, outside the counted calls
        counts += count_ops(lambda: opt.last_scales)[1]
        return counts, record, expected

    with FeatureSpeedProbe(model) as probe:
        measured(False)
        alone, _, _ = measured(False)  # the probe's sync, then FSC's record read on its own: one more
        together, record, expected = measured(True)
    assert together == alone - 1
    scales = [record.groups[name].scale for name in record.names]
    assert scales == expected[_ROWS.index("scale")]
    assert len(record.groups) == len(opt.group_names) and record.groups[opt.group_names[0]].share > 0
