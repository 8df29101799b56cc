"""Recipe: train a GPT-2-style byte-level language model with the Trainer and FeatureSpeedCallback.

    python recipes/train_lm.py --config configs/train_lm.yaml max_steps=200 beta=1/sqrt(L)
    accelerate launch --config_file configs/accelerate/single_gpu.yaml recipes/train_lm.py \
        --config configs/train_lm.yaml

`key=value` pairs after the config override its entries (values parsed as YAML: 3 is an int, 1e-3 a float,
null is None). The model goes to `output_dir/final` (save_pretrained), the per-step stats to
`output_dir/fsf_stats.jsonl`, the figures to `output_dir/fsf_report/`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from hf_fsf.callback import FeatureSpeedCallback
from hf_fsf.data import VOCAB_SIZE, load_text_dataset
from hf_fsf.distributed import exit_distributed_run
from hf_fsf.residual import apply_branch_scaling

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train_lm.yaml"


def load_config(path: str | os.PathLike, overrides: list[str]) -> dict:
    """The YAML config at `path`, with `key=value` overrides (YAML-typed) applied on top."""
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value; write e.g. max_steps=100.")
        if key not in config:
            raise KeyError(
                f"override {key!r} is not a key of {path}; known keys: {', '.join(sorted(config))}."
            )
        config[key] = yaml.safe_load(value)
    return config


def parse_args(argv: list[str] | None = None, default_config: Path = DEFAULT_CONFIG) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=str(default_config), help=f"YAML config (default: {default_config})"
    )
    parser.add_argument("overrides", nargs="*", help="key=value pairs overriding the config")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def training_arguments(cfg: dict, output_dir: str | os.PathLike, **extra) -> TrainingArguments:
    """TrainingArguments from the config keys both recipes share (GPU + bf16 when available, else CPU)."""
    use_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg["max_steps"],
        per_device_train_batch_size=cfg["batch_size"],
        per_device_eval_batch_size=cfg["batch_size"],
        learning_rate=cfg["learning_rate"],
        warmup_steps=max(1, int(cfg["warmup_fraction"] * cfg["max_steps"])),
        lr_scheduler_type=cfg["lr_scheduler_type"],
        weight_decay=cfg["weight_decay"],
        max_grad_norm=cfg["max_grad_norm"],
        logging_steps=cfg["logging_steps"],
        save_strategy="no",
        report_to=cfg["report_to"],
        seed=cfg["seed"],
        use_cpu=not use_gpu,
        bf16=use_gpu and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        **extra,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs: nothing to download
    output_dir = Path(cfg["output_dir"])

    # Data: byte-level blocks, vocabulary 256, no tokenizer.
    splits = load_text_dataset(cfg["dataset"], block_size=cfg["block_size"], max_bytes=cfg["max_bytes"])
    if cfg.get("eval_blocks"):
        # A fixed, spread-out subset keeps evaluation short.
        stride = max(1, len(splits.validation) // cfg["eval_blocks"])
        keep = range(0, len(splits.validation), stride)[: cfg["eval_blocks"]]
        splits.validation = torch.utils.data.Subset(splits.validation, keep)

    # Model: GPT-2 built from a config (seeded so every process starts from the same weights).
    torch.manual_seed(cfg["seed"])
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB_SIZE,
            n_positions=cfg["block_size"],
            n_embd=cfg["width"],
            n_layer=cfg["layers"],
            n_head=cfg["heads"],
            resid_pdrop=cfg["dropout"],
            embd_pdrop=cfg["dropout"],
            attn_pdrop=0.0,
            bos_token_id=0,  # GPT-2's 50256 is outside the byte vocabulary; byte 0 never occurs in text
            eos_token_id=0,
        )
    )
    if cfg.get("beta") is not None:
        apply_branch_scaling(model, beta=cfg["beta"])  # stored in model.config, so the checkpoint keeps it

    training = training_arguments(
        cfg,
        output_dir,
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"],
        ddp_find_unused_parameters=False,
    )
    callback = FeatureSpeedCallback(every=cfg["fsf_every"], angle_every=cfg["fsf_angle_every"])
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=splits.train,
        eval_dataset=splits.validation,
        callbacks=[callback],
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(output_dir / "final"))  # save_pretrained on the main process only
    if trainer.is_world_process_zero():
        (output_dir / "final" / "train_lm_config.yaml").write_text(yaml.safe_dump(cfg))
        (output_dir / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))
        print(
            f"processes: {training.world_size}; corpus: {splits.source}; eval_loss {metrics['eval_loss']:.4f} nats/byte"
        )
        print(f"model: {output_dir / 'final'}; stats: {output_dir / 'fsf_stats.jsonl'}")
    exit_distributed_run()  # everything is saved; see hf_fsf/distributed.py for why not a normal exit


if __name__ == "__main__":
    main()
