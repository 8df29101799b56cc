"""A tiny GPT-2 and token data for Trainer tests (float64 on CPU, no download)."""

from __future__ import annotations

import torch
from transformers import GPT2LMHeadModel, TrainingArguments

from hf_fsf.models import small_gpt2


def tiny_gpt2(dropout: float = 0.0, seed: int = 0, layers: int = 3) -> GPT2LMHeadModel:
    model = small_gpt2(
        layers,
        32,
        heads=2,
        block_size=16,
        vocab_size=64,
        dropout=dropout,
        attn_pdrop=dropout,
        attn_implementation="eager",
        seed=seed,
    )
    return model.double()


def token_data(n: int = 8, length: int = 12, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, length), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def training_args(out, **overrides) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        max_grad_norm=0.0,
    )
    base.update(overrides)
    return TrainingArguments(**base)
