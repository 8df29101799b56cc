"""FeatureSpeedCallback in real Trainer runs, against independent computations."""

from __future__ import annotations

import copy
import json

import torch
from trainer_setup import tiny_gpt2, token_data, training_args
from transformers import Trainer

from hf_fsf import FeatureSpeedProbe
from hf_fsf.callback import FeatureSpeedCallback
from hf_fsf.stats import BLOCK_FIELDS


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def read_jsonl(out):
    with open(out / "fsf_stats.jsonl") as f:
        return [json.loads(line) for line in f]


def test_accumulation_and_clipping_match_one_big_batch(tmp_path):
    """Trainer: 2 micro-batches of 4, clipped; reference: the probe on one batch of 8 with the same clipping.

    The Trainer divides the summed token loss by num_items_in_batch, which counts every label (12 per row)
    while the shifted loss has 11 per row: the back-propagated loss is 11/12 of the mean, and so is the reference.
    """
    model = tiny_gpt2()
    reference = copy.deepcopy(model)
    data = token_data(8)
    args = training_args(tmp_path, gradient_accumulation_steps=2, max_grad_norm=0.05, optim="adamw_torch")
    callback = FeatureSpeedCallback(every=1, angle_every=1, figures=False)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    got = read_jsonl(tmp_path)[0]

    batch = torch.stack([d["input_ids"] for d in data])
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-5, weight_decay=0.0)
    with FeatureSpeedProbe(reference) as probe:
        probe.begin_step(angle=True)
        (reference(input_ids=batch, labels=batch).loss * 11 / 12).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        probe.before_optimizer_step()
        opt.step()
        want = probe.after_optimizer_step()

    assert got["grad_scale"] < 0.5  # clipping really happened
    assert rel(got["grad_scale"], want.grad_scale) < 1e-6
    assert rel(got["loss"], want.loss) < 1e-6  # the HF loss upcasts logits to float32, not float64
    assert rel(got["stem_contribution"], want.stem_contribution) < 1e-6
    assert rel(got["head_contribution"], want.head_contribution) < 1e-6
    for a, b in zip(got["blocks"], want.blocks):
        assert a["name"] == b.name
        for field in BLOCK_FIELDS:
            assert rel(a[field], getattr(b, field)) < 1e-6, (b.name, field)


def test_dropout_accumulation_clipping_keep_the_identity(tmp_path):
    model = tiny_gpt2(dropout=0.1)
    args = training_args(
        tmp_path,
        gradient_accumulation_steps=2,
        max_grad_norm=0.05,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-6,
    )
    callback = FeatureSpeedCallback(every=1, angle_every=1, figures=False)
    Trainer(model=model, args=args, train_dataset=token_data(12), callbacks=[callback]).train()
    records = read_jsonl(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert record["valid"] and record["grad_scale"] < 1.0
        for block in record["blocks"]:
            assert abs(block["fsf_ratio"] - 1) < 1e-4, block


def test_resume_from_checkpoint_repeats_the_same_stats(tmp_path):
    def run(out, resume=None, max_steps=4):
        model = tiny_gpt2(dropout=0.1)
        args = training_args(
            out, max_steps=max_steps, save_strategy="steps", save_steps=2, per_device_train_batch_size=2
        )
        cb = FeatureSpeedCallback(every=1, angle_every=1, figures=False)
        Trainer(model=model, args=args, train_dataset=token_data(16), callbacks=[cb]).train(
            resume_from_checkpoint=resume
        )
        return read_jsonl(out)

    full = run(tmp_path / "full")
    run(tmp_path / "part", max_steps=4)  # writes checkpoint-2 and checkpoint-4
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    assert [r["step"] for r in resumed] == [
        1,
        2,
        3,
        4,
    ]  # records after the checkpoint were replaced, not doubled
    for a, b in zip(resumed[2:], full[2:]):
        for x, y in zip(a["blocks"], b["blocks"]):
            for field in BLOCK_FIELDS:
                assert rel(x[field], y[field]) < 1e-9, field


def test_frozen_stem_and_first_block(tmp_path):
    model = tiny_gpt2()
    for name, p in model.named_parameters():
        if name.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0.")):
            p.requires_grad_(False)
    args = training_args(tmp_path, max_steps=1)
    Trainer(
        model=model,
        args=args,
        train_dataset=token_data(8),
        callbacks=[FeatureSpeedCallback(angle_every=1, figures=False)],
    ).train()
    record = read_jsonl(tmp_path)[0]
    assert record["valid"]
    first, second = record["blocks"][0], record["blocks"][1]
    assert first["contribution"] == 0.0 and record["stem_contribution"] == 0.0
    assert first["update_norm"] == 0.0  # nothing upstream moved
    assert second["contribution"] > 0 and abs(second["fsf_ratio"] - 1) < 1e-4


def test_bf16_autocast_accuracy(tmp_path):
    """bf16 autocast: the identity holds to a few percent and cos θ stays within 0.02 of the float32 run."""
    records = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        model = tiny_gpt2(dropout=0.1).float()
        args = training_args(
            tmp_path / name, bf16=bf16, max_steps=3, learning_rate=1e-4, per_device_train_batch_size=8
        )
        cb = FeatureSpeedCallback(angle_every=1, figures=False)
        Trainer(model=model, args=args, train_dataset=token_data(40), callbacks=[cb]).train()
        records[name] = read_jsonl(tmp_path / name)
    for fp32, bf16 in zip(records["fp32"], records["bf16"]):
        for a, b in zip(fp32["blocks"], bf16["blocks"]):
            assert abs(b["fsf_ratio"] - 1) < 0.1
            assert abs(a["cos_theta"] - b["cos_theta"]) < 0.02


def test_report_written_at_train_end(tmp_path):
    args = training_args(tmp_path, max_steps=3)
    cb = FeatureSpeedCallback(angle_every=2)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(16), callbacks=[cb]).train()
    report = tmp_path / "fsf_report"
    assert (report / "report.md").exists()
    assert list(report.rglob("*.png"))


def test_angle_schedule_is_independent_of_every_and_a_cut_line_is_dropped(tmp_path):
    (tmp_path / "fsf_stats.jsonl").write_text(
        '{"step": 0, "blocks": []}\n{"step": 3, "blo'
    )  # a killed run's tail
    args = training_args(tmp_path, max_steps=7, per_device_train_batch_size=2)
    cb = FeatureSpeedCallback(every=4, angle_every=3, figures=False)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(14), callbacks=[cb]).train()
    records = read_jsonl(tmp_path)
    assert [(r["step"], r["angle"]) for r in records[1:]] == [(1, True), (4, True), (5, False), (7, True)]
