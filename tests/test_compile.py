"""The probe in torch.compile'd models: the same stats as eager, graph breaks only on measured steps, no recompiles,
and no angle where dropout masks drawn by compiled code cannot be replayed.

The hooks run eagerly (torch.compiler.disable) behind a traced check of a plain bool: between measured steps a
compiled model runs without a break; on a measured step each forward breaks at the model call, after each block and
at the model's output (L + 2 breaks for L blocks), and those graphs are compiled once.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch._dynamo
from chain_models import make_case
from torch._dynamo.utils import counters
from trainer_setup import tiny_gpt2, token_data, training_args
from transformers import Trainer

from hf_fsf import FeatureSpeedProbe
from hf_fsf.callback import FeatureSpeedCallback
from hf_fsf.models import small_gpt2
from hf_fsf.probe import _draws_dropout
from hf_fsf.stats import BLOCK_FIELDS, STATS_FILE


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def _records(path):
    with open(path / STATS_FILE) as f:
        return [json.loads(line) for line in f]


def _run(tmp_path, **compile_args):
    model = tiny_gpt2(layers=2)
    args = training_args(tmp_path, max_steps=2, **compile_args)
    callback = FeatureSpeedCallback(every=1, angle_every=1, figures=False)
    Trainer(model=model, args=args, train_dataset=token_data(8), callbacks=[callback]).train()
    return _records(tmp_path)


def test_compiled_trainer_run_writes_the_eager_runs_stats(tmp_path):
    eager = _run(tmp_path / "eager")
    counters.clear()
    compiled = _run(tmp_path / "compiled", torch_compile=True, torch_compile_backend="aot_eager")
    assert counters["stats"]["unique_graphs"] > 0  # the Trainer did compile the model
    assert len(compiled) == len(eager) == 2
    for got, want in zip(compiled, eager):
        assert got["valid"] and got["angle"]
        assert rel(got["loss"], want["loss"]) < 1e-9
        for a, b in zip(got["blocks"], want["blocks"]):
            for name in BLOCK_FIELDS:
                if name != "name":
                    assert rel(a[name], b[name]) < 1e-6, (b["name"], name)


def _two_steps(compiled: bool):
    model, x, y = make_case("mlp")
    forward = torch.compile(model) if compiled else model  # the default backend, inductor
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with FeatureSpeedProbe(model) as probe:
        return [probe.measure_step(lambda: model.loss(forward(x), y), opt) for _ in range(2)]


def test_inductor_compiled_model_gives_the_eager_stats():
    for got, want in zip(_two_steps(compiled=True), _two_steps(compiled=False)):
        assert got.valid and got.angle
        for a, b in zip(got.blocks, want.blocks):
            for name in ("cos_theta", "fsf_ratio", "contribution", "forward_rms", "backward_norm"):
                assert rel(getattr(a, name), getattr(b, name)) < 1e-6, (b.name, name)


def _explain(model, ids):
    return torch._dynamo.explain(model)(input_ids=ids, labels=ids)


def test_hooks_break_the_graph_only_on_measured_steps():
    layers = 2
    model = small_gpt2(layers=layers, width=32, heads=2, block_size=16, vocab_size=64, seed=0)
    model.config.loss_type = "ForCausalLM"
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = _explain(model, ids).graph_break_count
    with FeatureSpeedProbe(model) as probe:
        assert _explain(model, ids).graph_break_count == plain  # attached, not measuring: nothing added
        probe.begin_step()
        measuring = _explain(model, ids).graph_break_count
        probe.abort_step()
    assert measuring == plain + layers + 2  # the model call, each block, the model's output


def test_compiled_training_does_not_recompile_for_the_probe():
    model = small_gpt2(layers=2, width=32, heads=2, block_size=16, vocab_size=64, seed=0)
    model.config.loss_type = "ForCausalLM"
    compiled = torch.compile(model, backend="eager")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(probe, measure, angle=False):
        opt.zero_grad(set_to_none=True)
        if measure:
            probe.begin_step(angle=angle)
        compiled(input_ids=ids, labels=ids).loss.backward()
        if measure:
            probe.before_optimizer_step()
        opt.step()
        return probe.after_optimizer_step() if measure else None

    with FeatureSpeedProbe(model) as probe:
        step(probe, False)
        step(probe, True)  # the two variants (measured or not) are compiled once each
        counters.clear()
        stats = [
            step(probe, measure, angle) for measure, angle in [(False, 0), (True, 0), (True, 1), (False, 0)]
        ]
    assert not counters["stats"]["unique_graphs"] and not counters["graph_break"]
    assert stats[1].valid and stats[2].valid and stats[2].angle


def test_dropout_under_compile_gets_no_angle():
    model, x, y = make_case("dropout")  # nn.Dropout(0.1) in every block
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss_fn = lambda: model.loss(compiled(x), y)  # noqa: E731
    with (
        FeatureSpeedProbe(model) as probe,
        pytest.raises(RuntimeError, match=r"dropout > 0 under torch.compile"),
    ):
        probe.measure_step(loss_fn, opt)
    with FeatureSpeedProbe(model, strict=False) as probe:
        with pytest.warns(UserWarning, match="set dropout to 0 on measured steps, or train eagerly"):
            stats = probe.measure_step(loss_fn, opt)
        assert stats.valid and not stats.angle and stats.blocks[0].contribution != 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            eager = probe.measure_step(lambda: model.loss(model(x), y), opt)  # eager: the masks replay
        assert eager.valid and eager.angle


def test_which_models_draw_dropout():
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(rate):
        config = LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            attention_dropout=rate,
        )
        return LlamaForCausalLM(config)

    assert _draws_dropout(llama(0.1).train())  # a rate the attention kernel gets, no Dropout module
    assert not _draws_dropout(llama(0.1).eval())
    assert not _draws_dropout(llama(0.0).train())
    assert _draws_dropout(make_case("dropout")[0].train())
    assert not _draws_dropout(make_case("resnet")[0].train())
