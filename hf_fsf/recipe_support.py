"""What the recipes (recipes/*.py) share: their arguments, the hf_fsf settings a Trainer gets, the end of a run.

Arguments: a YAML config plus Hugging Face-style flags, parsed by `transformers.HfArgumentParser` over the recipe's
own dataclasses and `TrainingArguments`, so every Trainer flag is available:

    python recipes/train_lm.py --config configs/train_lm.yaml --max_steps 7 --save_strategy steps --bf16

The config's keys are field names of those dataclasses; a flag overrides the config, the config overrides the
field's default. `--help` lists every field with its help and default.
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from hf_fsf.callback import FeatureSpeedCallback
from hf_fsf.control import FSCOptimizerFactory
from hf_fsf.distributed import exit_distributed_run, world_size


@dataclass
class FeatureSpeedArguments:
    """The hf_fsf settings of a recipe: when the callback measures, and whether FSCOptimizer sets the steps."""

    fsf_every: int = field(
        default=1, metadata={"help": "Feature-speed stats (no extra forward) every N steps."}
    )
    fsf_angle_every: int = field(
        default=50, metadata={"help": "The angle cos θ (one extra no-grad forward) every N steps; 0: never."}
    )
    fsc: bool = field(
        default=False,
        metadata={
            "help": "Train with FSCOptimizer (balanced per-block steps, PAPER.md §6) over AdamW, which takes the "
            "Trainer's learning_rate (as its own step size), adam_beta1/2, adam_epsilon and weight_decay (on the "
            "parameters the Trainer decays)."
        },
    )
    fsc_rate: float = field(
        default=0.01,
        metadata={"help": "FSCOptimizer's rate: target loss decrease per step as a fraction of the loss."},
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the recipe's docstring as written and shows every default."""


def parse_recipe_args(
    dataclass_types: Sequence[type],
    default_config: str | os.PathLike,
    argv: list[str] | None = None,
    description: str | None = None,
) -> tuple:
    """(one instance per dataclass type..., TrainingArguments) from `--config` YAML and command-line flags.

    Machine defaults come first: the CPU when there is no CUDA device, bf16 on a GPU that supports it (unless the
    config or the flags ask for fp16). Unknown config keys and unknown flags are errors that name the fix.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(
        (*dataclass_types, TrainingArguments), description=description, formatter_class=_HelpFormatter
    )
    parser.add_argument(
        "--config", default=str(default_config), help=f"YAML config file (default: {default_config})."
    )
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=str(default_config))
    config_path = pre.parse_known_args(argv)[0].config
    config = _read_config(config_path, parser.dataclass_types)

    cuda = torch.cuda.is_available()
    wants_fp16 = bool(config.get("fp16")) or any(a.split("=")[0] == "--fp16" for a in argv)
    parser.set_defaults(use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported() and not wants_fp16)
    parser.set_defaults(**config)

    *parsed, unused = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unused:
        raise ValueError(
            f"unknown command-line arguments {unused}: flags are Hugging Face style, e.g. `--max_steps 7` or "
            "`--max_steps=7` (bare key=value is not accepted); `--help` lists every flag."
        )
    return tuple(p for p in parsed if not isinstance(p, argparse.Namespace))  # drops the --config namespace


def _read_config(path: str, dataclass_types: Sequence[type]) -> dict:
    """The YAML mapping at `path`, checked against the fields the recipe knows."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path!r} not found; pass --config <file.yaml>.")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(
            f"config {path} must be a YAML mapping of field: value, got {type(config).__name__}."
        )
    known = {f.name for t in dataclass_types for f in fields(t)}
    for key in config:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean {', '.join(near)}?" if near else " `--help` lists every field."
            raise ValueError(
                f"config {path}: {key!r} is not a field of this recipe or of TrainingArguments.{hint}"
            )
    return config


def feature_speed_trainer_kwargs(settings: FeatureSpeedArguments, training: TrainingArguments) -> dict:
    """Trainer keyword arguments for the settings: `callbacks`, and `optimizer_cls_and_kwargs` with --fsc."""
    kwargs: dict = {
        "callbacks": [FeatureSpeedCallback(every=settings.fsf_every, angle_every=settings.fsf_angle_every)]
    }
    if settings.fsc:
        base = dict(
            lr=training.learning_rate,
            betas=(training.adam_beta1, training.adam_beta2),
            eps=training.adam_epsilon,
            weight_decay=training.weight_decay,
        )
        kwargs["optimizer_cls_and_kwargs"] = (
            FSCOptimizerFactory,
            {"rate": settings.fsc_rate, "base": torch.optim.AdamW, **base},
        )
    return kwargs


def end_recipe_run() -> None:
    """Ends a recipe once everything is saved; under torchrun / accelerate launch, every rank leaves together.

    exit_distributed_run leaves through os._exit (hf_fsf/distributed.py says why: gloo torn down at interpreter
    exit can abort or deadlock a rank), which skips the exit handlers. Trackers finish there (W&B's run, MLflow's
    end_run and others are atexit hooks), so the handlers run here first. In one process: a normal exit.
    """
    if world_size() > 1:
        atexit._run_exitfuncs()  # the interpreter's own exit sequence, minus the teardown os._exit avoids
    exit_distributed_run()
