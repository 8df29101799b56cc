"""What the callback logs where: trackers, console, trainer_state.json, heatmap images (hf_fsf/logging_plan.py)."""

from __future__ import annotations

import glob
import json

import numpy as np
import pytest
import transformers
from trainer_setup import tiny_gpt2, token_data, training_args
from transformers import Trainer, TrainerCallback

from hf_fsf.callback import FeatureSpeedCallback
from hf_fsf.logging_plan import DEFAULT_LOG_SUMMARY, SUMMARY_KEYS, flat_stats
from hf_fsf.stats import BLOCK_FIELDS
from hf_fsf.tracker_images import MAX_COLUMNS, HeatmapColumns


def read_jsonl(out):
    with open(out / "fsf_stats.jsonl") as f:
        return [json.loads(line) for line in f]


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


class Recorder(TrainerCallback):
    """Stands for TensorBoard / W&B: registered before FeatureSpeedCallback, records what each on_log receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_fsf_keys_reach_a_tracker_registered_before_the_callback(tmp_path):
    """Guards the one undocumented route (callback._trainer_callbacks reads the Trainer's list off the stack)."""
    recorder = Recorder()
    callback = FeatureSpeedCallback(angle_every=1, figures=False)
    args = training_args(tmp_path, max_steps=2)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(8), callbacks=[recorder, callback]).train()
    train_logs = [logs for logs in recorder.logs if "loss" in logs]
    assert len(train_logs) == 2
    for logs in train_logs:
        assert "fsf/cos_theta_min" in logs and "fsf/transformer.h.0/cos_theta" in logs, (
            f"transformers {transformers.__version__}: a tracker registered before FeatureSpeedCallback no longer "
            "receives the fsf/ keys in the same on_log call. FeatureSpeedCallback finds the Trainer's callback list "
            "on the call stack (hf_fsf/callback.py, _trainer_callbacks): this release changed CallbackHandler; "
            "update that function."
        )


def test_trackers_get_the_chosen_fields_log_history_and_console_the_summaries(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = training_args(tmp_path, max_steps=4, logging_steps=2, report_to=["tensorboard"])
    callback = FeatureSpeedCallback(every=1, angle_every=2, figures=False, heatmap_every=1)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(16), callbacks=[callback])
    trainer.train()
    records = read_jsonl(tmp_path)
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(train_logs) == 2
    for entry, pair in zip(train_logs, (records[0:2], records[2:4])):
        assert {k for k in entry if k.startswith("fsf/")} == {f"fsf/{k}" for k in DEFAULT_LOG_SUMMARY}
        assert rel(entry["fsf/cos_theta_min"], min(b["cos_theta"] for b in pair[0]["blocks"])) < 1e-9

    acc = EventAccumulator(glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)[0])
    acc.Reload()
    tags = acc.Tags()["scalars"]
    key = "fsf/transformer.h.1/contribution"
    # averaged between log entries: steps 1-2, then 3-4
    expected = [
        sum(r["blocks"][1]["contribution"] for r in pair) / 2 for pair in (records[0:2], records[2:4])
    ]
    assert [e.value for e in acc.Scalars(f"train/{key}")] == pytest.approx(expected, rel=1e-6)
    assert "train/fsf/transformer.h.1/relative_speed" in tags and "train/fsf/sensitivity_max" in tags
    assert not [
        t
        for t in tags
        if t.startswith("train/fsf/") and t.endswith(("/forward_rms", "/fsf_ratio", "/grad_norm"))
    ]
    images = acc.Tags()["images"]
    for tag in ("fsf/heatmap/cos_theta", "fsf/heatmap/relative_speed", "fsf/heatmap/contribution_share"):
        assert tag in images
        events = acc.Images(tag)
        assert [e.step for e in events] == [2, 4] and events[-1].width > 100 and events[-1].height > 50


def test_block_gradient_norms_and_a_chosen_summary(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = training_args(tmp_path, max_steps=2, report_to=["tensorboard"])
    callback = FeatureSpeedCallback(
        angle_every=0, figures=False, log_blocks=("grad_norm",), log_summary=("loss",), heatmap_every=0
    )
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(8), callbacks=[callback])
    trainer.train()
    records = read_jsonl(tmp_path)
    acc = EventAccumulator(glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)[0])
    acc.Reload()
    tags = acc.Tags()["scalars"]
    per_block = {t for t in tags if t.count("/") == 3}  # train/fsf/<block>/<field>
    assert per_block == {f"train/fsf/{g}/grad_norm" for g in records[0]["group_grad_norms"]}
    got = [e.value for e in acc.Scalars("train/fsf/transformer.h.2/grad_norm")]
    assert got == pytest.approx([r["group_grad_norms"]["transformer.h.2"] for r in records], rel=1e-6)
    assert acc.Tags()["images"] == []
    for entry in (e for e in trainer.state.log_history if "loss" in e):
        assert {k for k in entry if k.startswith("fsf/")} == {"fsf/loss"}
    console = capsys.readouterr().out
    assert "'fsf/loss'" in console and "transformer.h" not in console and "cos_theta" not in console


@pytest.mark.parametrize("layers", [2, 32])
def test_trainer_state_grows_under_1kb_per_log_entry_at_any_depth(tmp_path, layers):
    args = training_args(
        tmp_path, max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2
    )
    callback = FeatureSpeedCallback(angle_every=1, figures=False)
    Trainer(
        model=tiny_gpt2(layers=layers), args=args, train_dataset=token_data(8), callbacks=[callback]
    ).train()
    sizes = [(tmp_path / f"checkpoint-{s}" / "trainer_state.json").stat().st_size for s in (2, 4)]
    history = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert all("fsf/cos_theta_mean" in entry for entry in history)  # the summaries are there
    growth = (sizes[1] - sizes[0]) / 2  # two log entries between the checkpoints
    assert growth <= 1024, f"{growth:.0f} bytes per log entry with {layers} blocks"


def test_summary_keys_are_the_step_keys_of_stepstats(tmp_path):
    """SUMMARY_KEYS (what log_summary may name) must follow StepStats.to_dict when it changes."""
    args = training_args(tmp_path, max_steps=1)
    callback = FeatureSpeedCallback(angle_every=1, figures=False)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(4), callbacks=[callback]).train()
    flat = flat_stats(callback.last, {"transformer.h.0": 0.5})
    assert {k.split("/")[1] for k in flat if k.count("/") == 1} == set(SUMMARY_KEYS)
    fields = {k.rsplit("/", 1)[1] for k in flat if k.count("/") == 2}
    assert fields == {*BLOCK_FIELDS, "grad_norm", "scale"}


def test_wandb_gets_the_heatmaps_with_the_log_entry(tmp_path):
    """W&B is not installed here: a stand-in with WandbCallback's `_wandb` module attribute and its API."""

    class FakeWandb:
        run = object()
        calls = []

        @staticmethod
        def Image(array):
            return ("image", array.shape, array.dtype)

        @classmethod
        def log(cls, data, commit=True):
            cls.calls.append((data, commit))

    class WandbLike(TrainerCallback):
        _wandb = FakeWandb

    args = training_args(tmp_path, max_steps=3, logging_steps=1)
    callback = FeatureSpeedCallback(angle_every=1, figures=False, heatmap_every=2)
    Trainer(
        model=tiny_gpt2(), args=args, train_dataset=token_data(12), callbacks=[WandbLike(), callback]
    ).train()
    assert len(FakeWandb.calls) == 2  # after the 2nd log entry, and the rest at train end
    for data, commit in FakeWandb.calls:
        assert commit is False  # filed with the WandbCallback's own log entry
        assert set(data) == {
            "fsf/heatmap/cos_theta",
            "fsf/heatmap/relative_speed",
            "fsf/heatmap/contribution_share",
        }
        kind, shape, dtype = data["fsf/heatmap/cos_theta"]
        assert kind == "image" and shape[2] == 3 and dtype == np.uint8


def test_heatmap_columns_are_the_logged_means_and_stay_bounded():
    names = ["a", "b"]
    columns = HeatmapColumns(names)
    for step in range(1, 301):
        means = {
            "fsf/a/cos_theta": 0.1 * step,
            "fsf/b/relative_speed": 2.0,
            "fsf/a/contribution": 1.0,
            "fsf/b/contribution": 3.0,
            "fsf/stem_contribution": 0.5,
            "fsf/head_contribution": 0.5,
            "fsf/total_loss_decrease": 5.0,
        }
        columns.add(step, means)
    assert len(columns.steps) <= MAX_COLUMNS and columns.steps[0] == 1 and columns.steps[-1] == 300
    last = len(columns.steps) - 1
    assert columns.columns["contribution_share"][last] == [0.1, 0.2, 0.6, 0.1]
    assert columns.columns["cos_theta"][last][0] == pytest.approx(30.0)
    assert np.isnan(columns.columns["cos_theta"][last][1])  # block b had no angle in that window
    images = columns.images()
    assert set(images) == {
        "fsf/heatmap/cos_theta",
        "fsf/heatmap/relative_speed",
        "fsf/heatmap/contribution_share",
    }
