"""Recipe: how accurate are the stats under bf16 autocast? The same tiny GPT-2 Trainer run in float32 and in bf16.

    python recipes/precision_check.py [--steps 5]

Prints the largest and median |fsf_ratio − 1| of each run (the first-order identity; float32 shows the step's own
non-linearity) and the largest |cos θ(bf16) − cos θ(float32)| over blocks and steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from hf_fsf import FeatureSpeedCallback
from hf_fsf.models import small_gpt2


def run(out: Path, bf16: bool, steps: int) -> list[dict]:
    # GPT2Config's default dropout (0.1, attention included): the bf16 run sees the same masks.
    model = small_gpt2(3, 32, heads=2, block_size=16, vocab_size=64, dropout=0.1, attn_pdrop=0.1, seed=0)
    g = torch.Generator().manual_seed(1)
    data = [
        {"input_ids": row, "labels": row.clone()}
        for row in torch.randint(0, 64, (16 * steps, 12), generator=g)
    ]
    args = TrainingArguments(
        output_dir=str(out),
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        max_steps=steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    Trainer(
        model=model,
        args=args,
        train_dataset=data,
        callbacks=[FeatureSpeedCallback(angle_every=1, figures=False)],
    ).train()
    return [json.loads(line) for line in open(out / "fsf_stats.jsonl")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    steps = parser.parse_args().steps
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: run(Path(tmp) / name, name == "bf16", steps) for name in ("float32", "bf16")}
    for name, records in runs.items():
        errors = [abs(b["fsf_ratio"] - 1) for r in records for b in r["blocks"]]
        print(f"{name}: |fsf_ratio - 1| max {max(errors):.2e}, median {statistics.median(errors):.2e}")
    pairs = zip(runs["float32"], runs["bf16"])
    gap = max(
        abs(a["cos_theta"] - b["cos_theta"]) for ra, rb in pairs for a, b in zip(ra["blocks"], rb["blocks"])
    )
    print(f"max |cos θ(bf16) - cos θ(float32)|: {gap:.2e}")


if __name__ == "__main__":
    main()
