"""Cases where the probe used to return a wrong number marked valid: each is now measured exactly or refused.

measure_step calls loss_fn once; shared blocks, blocks listed out of order and stale gradients are refused; a step
left unfinished stops recording; an optimizer that moved nothing says so; FSCOptimizer gets the step's loss.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from chain_models import make_case
from torch import nn

from hf_fsf import FeatureSpeedProbe, find_blocks
from hf_fsf.fsc import FSCOptimizer
from hf_fsf.models import small_gpt2
from hf_fsf.stats import StepStats


def _gpt2_and_batches(n: int = 2):
    model = small_gpt2(
        layers=2, width=32, heads=2, block_size=16, vocab_size=64, dropout=0.1, seed=0
    ).double()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 12), generator=g) for _ in range(n)]
    return model, [{"input_ids": b, "labels": b} for b in batches]


# --- measure_step calls loss_fn once and re-runs the model calls it made -------------------------------------------


def test_loss_fn_that_consumes_an_iterator_is_measured_on_the_batch_it_took():
    model, batches = _gpt2_and_batches()
    twin = copy.deepcopy(model)
    it = iter(batches)
    torch.manual_seed(5)  # the same dropout masks in both runs
    with FeatureSpeedProbe(model) as probe:
        got = probe.measure_step(
            lambda: model(**next(it)).loss, torch.optim.AdamW(model.parameters(), lr=1e-4), angle=True
        )
    assert next(it) is batches[1]  # loss_fn was called exactly once
    torch.manual_seed(5)
    with FeatureSpeedProbe(twin) as probe:
        want = probe.measure_step(
            lambda: twin(**batches[0]).loss, torch.optim.AdamW(twin.parameters(), lr=1e-4), angle=True
        )
    assert got.valid and want.valid and got.loss == want.loss
    for a, b in zip(got.blocks, want.blocks):
        assert abs(a.cos_theta - b.cos_theta) < 1e-12 and abs(a.fsf_ratio - b.fsf_ratio) < 1e-12
        assert abs(a.fsf_ratio - 1) < 0.05  # and it is the right number: δf of one batch against its b


def test_loss_fn_that_runs_the_blocks_outside_a_model_call_gets_no_angle():
    model, batches = _gpt2_and_batches(1)
    ids = batches[0]["input_ids"]

    def loss_fn():  # the trunk called directly: the probe's model (the LM) is never called
        hidden = model.transformer(input_ids=ids).last_hidden_state
        return nn.functional.cross_entropy(model.lm_head(hidden).flatten(0, 1), ids.flatten())

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with (
        FeatureSpeedProbe(model) as probe,
        pytest.raises(RuntimeError, match="outside a call of the probe's"),
    ):
        probe.measure_step(loss_fn, opt, angle=True)
    with (
        FeatureSpeedProbe(model, strict=False) as probe,
        pytest.warns(UserWarning, match="call the model itself"),
    ):
        stats = probe.measure_step(loss_fn, opt, angle=True)
    assert stats.valid and not stats.angle and stats.blocks[0].cos_theta is None
    assert stats.blocks[0].forward_rms > 0 and stats.blocks[1].contribution != 0  # the cheap stats stand


def test_measure_step_hands_the_loss_to_fsc():
    model, x, y = make_case("mlp")  # its forward returns no .loss: FSC learns the loss only from measure_step
    opt = FSCOptimizer(model, base=torch.optim.SGD, rate=0.01, ema_beta=0.0, lr=1e-3)
    try:
        with FeatureSpeedProbe(model) as probe:
            stats = probe.measure_step(lambda: model.loss(model(x), y), opt, angle=True)
    finally:
        opt.close()
    assert stats.valid and opt.last_step.skipped is None
    assert abs(opt.last_step.loss - stats.loss) < 1e-12
    # FSC's steps decrease the loss by its target rate x loss, to first order: the probe measures the same step.
    assert abs(stats.total_loss_decrease - 0.01 * stats.loss) < 1e-9 * stats.loss


# --- blocks that run more than once, or out of order --------------------------------------------------------------


class LoopedChain(nn.Module):
    """Two blocks run twice each (a weight-shared loop)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        h = self.inp(x)
        for _ in range(2):
            for block in self.blocks:
                h = torch.tanh(block(h))
        return self.out(h)


def _measure(model, loss_fn, strict, **probe_kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with FeatureSpeedProbe(model, strict=strict, **probe_kwargs) as probe:
        return probe.measure_step(loss_fn, opt, angle=False)


def test_block_that_runs_twice_per_forward_is_refused():
    model = LoopedChain().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    loss_fn = lambda: model(x).square().mean()  # noqa: E731
    with pytest.raises(RuntimeError, match="'blocks.0' ran more than once in one forward"):
        _measure(model, loss_fn, strict=True)
    with pytest.warns(UserWarning, match="more than once"):
        stats = _measure(model, loss_fn, strict=False)
    assert not stats.valid


def test_module_list_that_repeats_a_module_is_refused():
    class Repeats(nn.Module):
        def __init__(self):
            super().__init__()
            a, b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.layers = nn.ModuleList([a, b, a])
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return self.head(x)

    model = Repeats().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    # Refused when the layout is found (the parameters are used twice) or, at the latest, on the first step.
    with pytest.raises((ValueError, RuntimeError), match="more than once|used inside the chain"):
        _measure(model, lambda: model(x).square().mean(), strict=True, blocks=["layers.0", "layers.1"])


def test_albert_shared_layers_are_refused():
    from transformers import AlbertConfig, AlbertModel

    config = AlbertConfig(
        vocab_size=64,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=3,
        num_hidden_groups=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = AlbertModel(config).double()
    with pytest.raises(ValueError, match="blocks="):  # no list of distinct blocks: it asks for them
        find_blocks(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    loss_fn = lambda: model(input_ids=ids).last_hidden_state.square().mean()  # noqa: E731
    shared = ["encoder.albert_layer_groups.0.albert_layers.0"]  # runs 3 times per forward
    with pytest.raises(RuntimeError, match="ran more than once in one forward .*ALBERT"):
        _measure(model, loss_fn, strict=True, blocks=shared)


def test_gradient_checkpointing_re_run_is_not_a_repeat():
    model = small_gpt2(layers=2, width=32, heads=2, block_size=16, vocab_size=64, seed=0).double()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    stats = _measure(model, lambda: model(input_ids=ids, labels=ids).loss, strict=True)
    assert stats.valid


def test_blocks_listed_out_of_order_are_refused():
    model, x, y = make_case("mlp")
    names = ["blocks.1", "blocks.0", "blocks.2", "blocks.3"]
    loss_fn = lambda: model.loss(model(x), y)  # noqa: E731
    with pytest.raises(RuntimeError, match="'blocks.1' ran after 'blocks.0'.*order the forward runs"):
        _measure(model, loss_fn, strict=True, blocks=names, trace=False)
    with pytest.warns(UserWarning, match="listed the other way round"):
        stats = _measure(model, loss_fn, strict=False, blocks=names, trace=False)
    assert not stats.valid


# --- stale gradients, an optimizer that moved nothing, an unfinished step -----------------------------------------


def _low_level_step(probe, model, x, y, opt):
    probe.begin_step(angle=True)
    model.loss(model(x), y).backward()
    probe.before_optimizer_step()
    opt.step()
    return probe.after_optimizer_step()


def test_gradients_left_in_grad_are_refused():
    model, x, y = make_case("resnet")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.loss(model(x), y).backward()  # a forgotten zero_grad: these would be added to the step's gradients
    with (
        FeatureSpeedProbe(model) as probe,
        pytest.raises(RuntimeError, match=r"zero_grad\(set_to_none=True\)"),
    ):
        probe.begin_step()
    with FeatureSpeedProbe(model, strict=False) as probe, pytest.warns(UserWarning, match="already in .grad"):
        stats = _low_level_step(probe, model, x, y, opt)
    assert not stats.valid
    opt.zero_grad(set_to_none=True)
    with FeatureSpeedProbe(model) as probe:
        assert _low_level_step(probe, model, x, y, opt).valid


def test_optimizer_that_moved_nothing_warns_once():
    model, x, y = make_case("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the first steps of a warm-up from 0
    with FeatureSpeedProbe(model, strict=False) as probe:
        with pytest.warns(UserWarning, match=r"changed no parameter .*lr = 0"):
            first = probe.measure_step(lambda: model.loss(model(x), y), opt)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = probe.measure_step(lambda: model.loss(model(x), y), opt)
    assert not first.valid and not second.valid


def test_unfinished_step_stops_recording_after_the_cap():
    model, x, y = make_case("resnet")
    with FeatureSpeedProbe(model, strict=False) as probe:
        probe.begin_step(angle=True, max_micro_batches=2)
        held = []
        with pytest.warns(UserWarning, match="begun and never finished after 2 model calls") as caught:
            for _ in range(10):  # the loop that should have finished the step died; training goes on
                model.loss(model(x), y).backward()
                step = probe._step
                held.append(0 if step is None else len(step.micro))
        assert max(held) <= 2 and held[-1] == 0  # dropped: nothing is held any more
        assert sum("never finished" in str(w.message) for w in caught) == 1
        with pytest.raises(ValueError, match="max_micro_batches"):
            probe.begin_step(max_micro_batches=0)


# --- records ----------------------------------------------------------------------------------------------------


def test_invalid_record_is_strict_json():
    model, x, y = make_case("resnet")
    bad = x.clone()
    bad[0, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with FeatureSpeedProbe(model, strict=False) as probe, pytest.warns(UserWarning, match="NaN"):
        stats = probe.measure_step(lambda: model.loss(model(bad), y), opt, angle=True)
    record = stats.to_record()
    text = json.dumps(record, allow_nan=False)  # raises on a bare NaN
    assert record["loss"] is None and record["blocks"][0]["forward_rms"] is None
    back = StepStats.from_record(json.loads(text))
    assert not back.valid and back.loss is None and math.isnan(back.stem_contribution)
