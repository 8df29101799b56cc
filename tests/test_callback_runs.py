"""The callback across runs: configuration errors stop a run, faults do not, a dead run leaves nothing behind."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from trainer_setup import tiny_gpt2, token_data, training_args
from transformers import Trainer, TrainerCallback

from hf_fsf.callback import FeatureSpeedCallback
from hf_fsf.probe import FeatureSpeedProbe
from hf_fsf.report import load_run


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(every=1.5), "every"),
        (dict(every=float("nan")), "every"),
        (dict(every="x"), "every"),
        (dict(every=0), "every"),
        (dict(every=True), "every"),
        (dict(angle_every=-1), "angle_every"),
        (dict(angle_every=2.0), "angle_every"),
        (dict(heatmap_every=-3), "heatmap_every"),
        (dict(figures="yes"), "figures"),
        (dict(blocks=5), "blocks"),
        (dict(blocks=["transformer.h.0", 1]), "blocks"),
        (dict(log_blocks=("cos_theta", "speed")), "log_blocks"),
        (dict(log_blocks=5), "log_blocks"),
        (dict(log_summary=("transformer.h.0/cos_theta",)), "log_summary"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(kwargs, named):
    with pytest.raises(ValueError, match=rf"FeatureSpeedCallback\({named}="):
        FeatureSpeedCallback(**kwargs)


def test_arguments_that_are_fine():
    callback = FeatureSpeedCallback(every=np.int64(3), log_blocks="grad_norm", log_summary=())
    assert callback.every == 3 and callback.log_blocks == ("grad_norm",) and callback.log_summary == ()


def test_a_typo_in_blocks_stops_the_run_before_the_first_step(tmp_path):
    model = tiny_gpt2()
    before = [p.detach().clone() for p in model.parameters()]
    callback = FeatureSpeedCallback(blocks=["transformer.h.0", "transformer.h.O1"], figures=False)
    trainer = Trainer(
        model=model, args=training_args(tmp_path), train_dataset=token_data(8), callbacks=[callback]
    )
    with pytest.raises(ValueError, match=r"blocks=.*no module named 'transformer.h.O1'.*"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_model_without_blocks_stops_the_run_and_says_how_to_pass_them(tmp_path):
    class Regressor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 3)

        def forward(self, x, labels):
            return {"loss": ((self.net(x) - labels) ** 2).mean()}

    data = [{"x": torch.randn(3), "labels": torch.randn(3)} for _ in range(8)]
    trainer = Trainer(
        model=Regressor(),
        args=training_args(tmp_path),
        train_dataset=data,
        callbacks=[FeatureSpeedCallback()],
    )
    with pytest.raises(ValueError, match="blocks="):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_fault_during_a_step_is_a_warning_and_a_skipped_measurement(tmp_path, monkeypatch):
    original = FeatureSpeedProbe.after_optimizer_step
    calls = []

    def flaky(self):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated fault")
        return original(self)

    monkeypatch.setattr(FeatureSpeedProbe, "after_optimizer_step", flaky)
    args = training_args(tmp_path, max_steps=3, per_device_train_batch_size=2)
    callback = FeatureSpeedCallback(angle_every=1, figures=False)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(6), callbacks=[callback])
    with pytest.warns(UserWarning, match="measurement skipped.*simulated fault"):
        trainer.train()
    assert trainer.state.global_step == 3
    records = [json.loads(line) for line in open(tmp_path / "fsf_stats.jsonl")]
    assert [r["step"] for r in records] == [1, 3]


def forward_hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_run_that_died_mid_step_leaves_nothing_to_the_next_run(tmp_path):
    """Run 1 measures step 1 (not yet logged) and dies in step 2's forward; run 2 reuses the callback."""
    model = tiny_gpt2()
    baseline = forward_hook_count(model)
    calls = []

    def crash_in_second_step(module, args):
        calls.extend([1] if module.training and torch.is_grad_enabled() else [])  # not the layout's dry run
        if len(calls) == 2:
            raise RuntimeError("simulated out of memory")

    handle = model.register_forward_pre_hook(crash_in_second_step)
    callback = FeatureSpeedCallback(angle_every=1, figures=False)
    args = training_args(tmp_path / "one", max_steps=4, logging_steps=2, learning_rate=1e-3)
    with pytest.raises(RuntimeError, match="simulated"):
        Trainer(model=model, args=args, train_dataset=token_data(16), callbacks=[callback]).train()
    handle.remove()
    assert len(callback.averages.counts) > 0  # step 1 was measured and not logged

    class HookCounter(TrainerCallback):
        seen = []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append(len(model.transformer.h[0]._forward_hooks))

    counter = HookCounter()
    args = training_args(tmp_path / "two", max_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=token_data(4), callbacks=[callback, counter])
    trainer.train()
    assert counter.seen == [1], "one probe's hook on a block during run 2, not the dead run's as well"
    assert forward_hook_count(model) == baseline, "no hook outlives the runs"
    record = json.loads(open(tmp_path / "two" / "fsf_stats.jsonl").readline())
    entry = trainer.state.log_history[0]
    # the first log entry of run 2 holds run 2's step only, not run 1's unlogged step 1
    assert entry["fsf/total_loss_decrease"] == pytest.approx(
        record["stem_contribution"]
        + record["head_contribution"]
        + sum(b["contribution"] for b in record["blocks"]),
        rel=1e-12,
    )
    assert entry["fsf/cos_theta_min"] == min(b["cos_theta"] for b in record["blocks"])


def test_invalid_steps_are_written_as_null_and_the_report_reads_them(tmp_path):
    model = tiny_gpt2()
    calls = []

    def nan_in_second_step(module, args, output):
        calls.extend([1] if module.training and torch.is_grad_enabled() else [])  # not the layout's dry run
        return output * math.nan if len(calls) == 2 else output

    model.transformer.h[1].mlp.register_forward_hook(nan_in_second_step)
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=4)
    callback = FeatureSpeedCallback(angle_every=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(model=model, args=args, train_dataset=token_data(8), callbacks=[callback]).train()
    assert not [w for w in caught if "report could not be written" in str(w.message)]
    text = (tmp_path / "fsf_stats.jsonl").read_text()

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    records = [json.loads(line, parse_constant=refuse) for line in text.splitlines()]
    assert [r["valid"] for r in records] == [True, False]
    assert records[1]["loss"] is None and records[1]["blocks"][1]["backward_norm"] is None
    run = load_run(tmp_path / "fsf_stats.jsonl")
    assert list(run.steps) == [1] and any("invalid" in note for note in run.notes)
    assert (tmp_path / "fsf_report" / "report.md").exists()


def test_fsc_scales_in_the_stats_file_are_the_optimizers(tmp_path):
    """With FSCOptimizer, every record carries that step's per-group scales, read in the probe's transfer."""
    from hf_fsf.fsc import _ROWS, FSCOptimizer

    model = tiny_gpt2()
    opt = FSCOptimizer(model, base=torch.optim.AdamW, rate=0.05, lr=1e-3)
    args = training_args(tmp_path, max_steps=3, per_device_train_batch_size=2, max_grad_norm=0.0)
    callback = FeatureSpeedCallback(angle_every=2, figures=False)
    trainer = Trainer(
        model=model, args=args, train_dataset=token_data(6), callbacks=[callback], optimizers=(opt, None)
    )
    trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "fsf_stats.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    device_read = opt.last_step.values[_ROWS.index("scale")].tolist()  # the record's own tensor, read here
    assert list(records[-1]["scales"].values()) == pytest.approx(device_read, rel=1e-12)
    assert list(records[-1]["scales"]) == opt.group_names and all(v > 0 for v in device_read)
