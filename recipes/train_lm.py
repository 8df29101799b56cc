r"""Recipe: train a GPT-2-style byte-level language model with the Trainer and FeatureSpeedCallback.

    python recipes/train_lm.py --config configs/train_lm.yaml --max_steps 200 --beta "1/sqrt(L)"
    python recipes/train_lm.py --save_strategy steps --save_steps 100            # then, to continue:
    python recipes/train_lm.py --max_steps 400 --resume_from_checkpoint runs/train_lm/checkpoint-200
    accelerate launch --config_file configs/accelerate/single_gpu.yaml recipes/train_lm.py \
        --config configs/train_lm.yaml

The config's keys and the flags are the fields of the dataclasses below, of FeatureSpeedArguments (hf_fsf's
settings) and of TrainingArguments (every Trainer flag: --bf16, --gradient_checkpointing, --report_to, ...); `--help`
lists them. The model goes to `output_dir/final` (save_pretrained), the per-step stats to
`output_dir/fsf_stats.jsonl`, the figures to `output_dir/fsf_report/`.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import Trainer

from hf_fsf.data import load_text_dataset
from hf_fsf.models import small_gpt2
from hf_fsf.recipe_support import (
    FeatureSpeedArguments,
    end_recipe_run,
    feature_speed_trainer_kwargs,
    parse_recipe_args,
)
from hf_fsf.residual import apply_branch_scaling

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train_lm.yaml"


@dataclass
class LMArguments:
    """The corpus and the GPT-2 this recipe builds (from a config: nothing is downloaded)."""

    dataset: str = field(
        default="stdlib",
        metadata={"help": "'stdlib' (Python's own source), local files / glob, or a cached `datasets` name."},
    )
    block_size: int = field(default=128, metadata={"help": "Tokens (bytes) per training sequence."})
    max_bytes: int = field(default=3_000_000, metadata={"help": "Bytes of text read, train and held-out."})
    eval_blocks: int | None = field(
        default=64, metadata={"help": "Held-out blocks evaluated at the end (None: all)."}
    )
    layers: int = field(default=4, metadata={"help": "GPT-2 blocks."})
    width: int = field(default=128, metadata={"help": "Embedding width."})
    heads: int = field(default=4, metadata={"help": "Attention heads."})
    dropout: float = field(default=0.1, metadata={"help": "Residual and embedding dropout."})
    beta: str | None = field(
        default=None,
        metadata={"help": "Residual branch scale: a number, '1/sqrt(L)' or '1/L'; None: plain GPT-2."},
    )


def branch_beta(value: str | float | None) -> str | float | None:
    """β as apply_branch_scaling takes it: a number, or a rule such as '1/sqrt(L)'."""
    try:
        return float(value) if value is not None else None
    except ValueError:
        return value


def main(argv: list[str] | None = None) -> None:
    lm, fsf, training = parse_recipe_args(
        (LMArguments, FeatureSpeedArguments), DEFAULT_CONFIG, argv, description=__doc__
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs: nothing to download
    output_dir = Path(training.output_dir)

    # Data: byte-level blocks, vocabulary 256, no tokenizer.
    splits = load_text_dataset(lm.dataset, block_size=lm.block_size, max_bytes=lm.max_bytes)
    if lm.eval_blocks:
        # A fixed, spread-out subset keeps evaluation short.
        stride = max(1, len(splits.validation) // lm.eval_blocks)
        keep = range(0, len(splits.validation), stride)[: lm.eval_blocks]
        splits.validation = torch.utils.data.Subset(splits.validation, keep)

    # Model: seeded so that every process starts from the same weights.
    model = small_gpt2(
        lm.layers, lm.width, heads=lm.heads, block_size=lm.block_size, dropout=lm.dropout, seed=training.seed
    )
    if lm.beta is not None:
        apply_branch_scaling(
            model, beta=branch_beta(lm.beta)
        )  # stored in model.config: the checkpoint keeps it

    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=splits.train,
        eval_dataset=splits.validation,
        **feature_speed_trainer_kwargs(fsf, training),
    )
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    metrics = trainer.evaluate()
    trainer.save_model(str(output_dir / "final"))  # save_pretrained on the main process only
    if trainer.is_world_process_zero():
        # A config of this recipe that reproduces the run: --config output_dir/final/train_lm_config.yaml
        settings = {**asdict(lm), **asdict(fsf), **json.loads(training.to_json_string())}
        (output_dir / "final" / "train_lm_config.yaml").write_text(yaml.safe_dump(settings))
        (output_dir / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))
        print(
            f"processes: {training.world_size}; corpus: {splits.source}; eval_loss {metrics['eval_loss']:.4f} nats/byte"
        )
        print(f"model: {output_dir / 'final'}; stats: {output_dir / 'fsf_stats.jsonl'}")
    end_recipe_run()


if __name__ == "__main__":
    main()
