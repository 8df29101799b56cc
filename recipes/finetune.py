r"""Recipe: fine-tune a local checkpoint (default: the one recipes/train_lm.py saved) with FeatureSpeedCallback.

    python recipes/finetune.py --config configs/finetune.yaml --checkpoint runs/train_lm/final
    python recipes/finetune.py --task lm --checkpoint path/to/llama --dataset path/to/texts/ --lora_r 8

The checkpoint is any local folder written by save_pretrained. AutoModelForCausalLM (task lm) or
AutoModelForSequenceClassification (task classify: a fresh classification head on the checkpoint's body) builds the
architecture its config.json names, and the folder's own tokenizer (AutoTokenizer) encodes the text; only a folder
without tokenizer files is read byte-level (token id = byte: the 256-token vocabulary of train_lm.py). Weights the
model needs that the folder lacks or holds in another shape, and a tokenizer with more tokens than the model has
embeddings, are errors: a fine-tune never starts from random weights by accident.

task classify: which standard-library package a `snippet_bytes`-byte snippet of source comes from (classes:
`packages`); files are held out whole, so the test is on unseen files. Accuracy through `evaluate`, from the metric
module shipped in hf_fsf (no download). task lm: continued language modelling of `dataset` (held-out loss per token).
--lora_r N trains LoRA adapters of rank N (peft: `pip install 'hf_fsf[peft]'`) instead of every weight; then
output_dir/final holds the adapter. A β recorded in the checkpoint's config (train_lm.py --beta) is re-applied.
Flags: those of FinetuneArguments below, FeatureSpeedArguments and TrainingArguments (`--help`).
"""

import json
import os
import sysconfig
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import evaluate
import numpy as np
import torch
import yaml
from torch.utils.data import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    default_data_collator,
)

import hf_fsf
from hf_fsf.data import VOCAB_SIZE, load_text_dataset, stdlib_files
from hf_fsf.recipe_support import (
    FeatureSpeedArguments,
    end_recipe_run,
    feature_speed_trainer_kwargs,
    parse_recipe_args,
)
from hf_fsf.residual import apply_branch_scaling, get_branch_scaling

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "finetune.yaml"
ACCURACY_MODULE = Path(hf_fsf.__file__).parent / "metrics" / "accuracy"
# Files whose presence means the folder has its own tokenizer (fast, sentencepiece, BPE and WordPiece formats).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


@dataclass
class FinetuneArguments:
    """The checkpoint, the task and its data, and LoRA."""

    checkpoint: str = field(
        default="runs/train_lm/final", metadata={"help": "Local folder written by save_pretrained."}
    )
    task: Literal["classify", "lm"] = field(
        default="classify", metadata={"help": "classify: stdlib package of a snippet; lm: continued LM."}
    )
    packages: list[str] = field(
        default_factory=lambda: ["asyncio", "email", "xml", "multiprocessing"],
        metadata={"help": "task classify: the classes (top-level standard-library directories)."},
    )
    snippets_per_class: int = field(
        default=400, metadata={"help": "task classify: snippets per class and split."}
    )
    eval_every_nth_file: int = field(
        default=5, metadata={"help": "task classify: every n-th file of a package is held out whole."}
    )
    snippet_bytes: int = field(default=128, metadata={"help": "task classify: bytes of source per snippet."})
    dataset: str = field(
        default="stdlib",
        metadata={"help": "task lm: 'stdlib', local files / glob, or a cached `datasets` name."},
    )
    max_bytes: int = field(default=1_000_000, metadata={"help": "task lm: bytes of text read."})
    block_size: int = field(default=128, metadata={"help": "task lm: tokens per training sequence."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (peft); 0: train every weight."})
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA scale alpha (the update is alpha/r · BA)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "Comma-separated module names, or all-linear (not the head)."}
    )


class Examples(Dataset):
    """Token-id sequences with their labels (a class, or the sequence itself for a causal LM)."""

    def __init__(self, ids: list[list[int]], labels: list | None = None):
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i] if self.labels is None else self.labels[i]}


def package_snippets(
    packages: list[str], snippet_bytes: int, per_class: int, eval_every_nth_file: int
) -> tuple[tuple[list[bytes], list[int]], tuple[list[bytes], list[int]]]:
    """((train snippets, labels), (held-out snippets, labels)); every n-th file of a package is held out whole."""
    base = Path(sysconfig.get_paths()["stdlib"])
    by_package: dict[str, list[Path]] = {p: [] for p in packages}
    for path in stdlib_files():
        parts = path.relative_to(base).parts
        if len(parts) > 1 and parts[0] in by_package:
            by_package[parts[0]].append(path)
    missing = [p for p, files in by_package.items() if len(files) < 2]
    if missing:
        raise ValueError(
            f"packages {missing} have fewer than 2 source files in {base}; choose other `packages` "
            "(top-level standard-library directories such as asyncio, email, xml)."
        )
    splits: tuple[tuple[list, list], tuple[list, list]] = (([], []), ([], []))
    for label, package in enumerate(packages):
        for split in (0, 1):
            files = [
                f for i, f in enumerate(by_package[package]) if (i % eval_every_nth_file == 0) == bool(split)
            ]
            chunks = [
                data[s : s + snippet_bytes]
                for data in (f.read_bytes() for f in files)
                for s in range(0, len(data) - snippet_bytes + 1, snippet_bytes)
            ]
            # An evenly strided subset: the same number of snippets per class, spread over all files.
            stride = max(1, len(chunks) // per_class)
            chosen = chunks[::stride][:per_class]
            splits[split][0].extend(chosen)
            splits[split][1].extend([label] * len(chosen))
    return splits


def text_encoder(tokenizer) -> Callable[[bytes], list[int]]:
    """bytes -> token ids: the checkpoint's tokenizer, or the bytes themselves without one."""
    if tokenizer is None:
        return list
    return lambda data: tokenizer(
        data.decode("utf-8", errors="replace"), add_special_tokens=False, verbose=False
    )["input_ids"]


def token_blocks(ids: list[int], block_size: int, split: str) -> Examples:
    """Consecutive, non-overlapping blocks of `block_size` tokens (the shorter tail is dropped)."""
    if len(ids) < block_size:
        raise ValueError(
            f"the {split} text has {len(ids)} tokens, fewer than one block of {block_size}; "
            "raise --max_bytes or lower --block_size."
        )
    return Examples([ids[s : s + block_size] for s in range(0, len(ids) - block_size + 1, block_size)])


def load_tokenizer(folder: Path):
    """The folder's own tokenizer, or None (byte-level) when it has no tokenizer files."""
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(folder)


def load_checkpoint(folder: str | os.PathLike, task: str, num_labels: int | None = None):
    """(model, tokenizer or None) of a local checkpoint, checked so that no weight or token is silently random."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"no checkpoint at {str(folder)!r} (no config.json); run recipes/train_lm.py first (it saves "
            "output_dir/final) or pass --checkpoint <folder written by save_pretrained>."
        )
    tokenizer = load_tokenizer(folder)
    auto = AutoModelForCausalLM if task == "lm" else AutoModelForSequenceClassification
    extra = {"num_labels": num_labels} if task == "classify" else {}
    try:
        model, info = auto.from_pretrained(folder, output_loading_info=True, **extra)
    except (
        ValueError,
        RuntimeError,
    ) as error:  # an unknown architecture for the task, or weights of other shapes
        raise ValueError(
            f"{auto.__name__} cannot load the checkpoint {str(folder)!r} for task {task!r}: {error}"
        ) from error
    check_loaded_weights(model, info, folder, task)
    check_vocabulary(model, tokenizer, folder)
    return model, tokenizer


def check_loaded_weights(model, info: dict, folder: Path, task: str) -> None:
    """Missing or unexpected weights are errors, except a classifier's fresh head and the LM head it replaces."""
    body = model.base_model_prefix + "."

    def problem(key: str) -> bool:
        return task == "lm" or key.startswith(body)

    missing = sorted(k for k in info["missing_keys"] if problem(k))
    unexpected = sorted(k for k in info["unexpected_keys"] if problem(k))
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint {str(folder)!r} does not hold the weights of the {type(model).__name__} its config.json "
            f"describes: {len(missing)} missing (would be random: {missing[:4]}...), {len(unexpected)} unexpected "
            f"({unexpected[:4]}...). The config and the weights come from different models: save both with "
            "save_pretrained from the same model."
        )


def check_vocabulary(model, tokenizer, folder: Path) -> None:
    """Every token id the data can hold has an embedding."""
    embeddings = model.get_input_embeddings().num_embeddings
    if tokenizer is None and embeddings != VOCAB_SIZE:
        raise ValueError(
            f"the checkpoint {str(folder)!r} has no tokenizer files, and its vocabulary ({embeddings}) is not the "
            f"byte vocabulary ({VOCAB_SIZE}) used without one; save its tokenizer into the folder "
            "(tokenizer.save_pretrained(folder))."
        )
    if tokenizer is not None and len(tokenizer) > embeddings:
        raise ValueError(
            f"the tokenizer in {str(folder)!r} has {len(tokenizer)} tokens but the model only {embeddings} "
            "embeddings: they come from different models. Save the model's own tokenizer there, or resize the "
            "embeddings (model.resize_token_embeddings(len(tokenizer))) and save the model again."
        )


def add_lora(model, args: FinetuneArguments):
    """The model with LoRA adapters of rank args.lora_r (the classification head stays fully trainable)."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            f"--lora_r {args.lora_r} needs peft: pip install 'hf_fsf[peft]' (or pip install peft), or pass "
            "--lora_r 0 to train every weight."
        ) from error
    targets = args.lora_target_modules
    config = peft.LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type="CAUSAL_LM" if args.task == "lm" else "SEQ_CLS",
    )
    return peft.get_peft_model(model, config)


def task_data(args: FinetuneArguments, encode: Callable[[bytes], list[int]]) -> tuple[Examples, Examples]:
    """(train, held-out) examples of the task, encoded with the checkpoint's tokenizer (or as bytes)."""
    if args.task == "classify":
        (train, train_labels), (held_out, held_out_labels) = package_snippets(
            args.packages, args.snippet_bytes, args.snippets_per_class, args.eval_every_nth_file
        )
        return (
            Examples([encode(s)[: args.snippet_bytes] for s in train], train_labels),
            Examples([encode(s)[: args.snippet_bytes] for s in held_out], held_out_labels),
        )
    text = load_text_dataset(
        args.dataset, block_size=1, max_bytes=args.max_bytes
    )  # one block per byte: all text
    return (
        token_blocks(encode(text.train.to_bytes()), args.block_size, "training"),
        token_blocks(encode(text.validation.to_bytes()), args.block_size, "held-out"),
    )


def set_pad_token(model, tokenizer) -> None:
    """The classifier reads the last non-padding token, so it needs the pad id (byte 0 never occurs in text)."""
    if tokenizer is not None and tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "the checkpoint's tokenizer has no pad or eos token; add one (tokenizer.pad_token=...)."
            )
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = 0 if tokenizer is None else tokenizer.pad_token_id


def accuracy_metric() -> Callable:
    accuracy = evaluate.load(str(ACCURACY_MODULE))

    def compute_metrics(prediction) -> dict:
        logits = prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        return accuracy.compute(predictions=np.argmax(logits, -1), references=prediction.label_ids)

    return compute_metrics


def main(argv: list[str] | None = None) -> None:
    args, fsf, training = parse_recipe_args(
        (FinetuneArguments, FeatureSpeedArguments), DEFAULT_CONFIG, argv, description=__doc__
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    output_dir = Path(training.output_dir)

    torch.manual_seed(training.seed)  # the fresh classification head
    num_labels = len(args.packages) if args.task == "classify" else None
    model, tokenizer = load_checkpoint(args.checkpoint, args.task, num_labels)
    train, held_out = task_data(args, text_encoder(tokenizer))
    if args.task == "classify":
        set_pad_token(model, tokenizer)
    model.config.use_cache = False  # no key/value cache in the outputs: evaluation returns logits only
    if get_branch_scaling(model) is not None:
        apply_branch_scaling(model)  # hooks are not in the state dict; the β record in config.json is
    if args.lora_r > 0:
        model = add_lora(model, args)

    pad_to_longest = tokenizer is not None and args.task == "classify"  # snippets differ in token count
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,  # saved with the model
        data_collator=DataCollatorWithPadding(tokenizer) if pad_to_longest else default_data_collator,
        compute_metrics=accuracy_metric() if args.task == "classify" else None,
        **feature_speed_trainer_kwargs(fsf, training),
    )
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    metrics = trainer.evaluate()
    trainer.save_model(str(output_dir / "final"))
    if trainer.is_world_process_zero():
        settings = {**asdict(args), **asdict(fsf), **json.loads(training.to_json_string())}
        (output_dir / "final" / "finetune_config.yaml").write_text(yaml.safe_dump(settings))
        (output_dir / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))
        summary = {k: v for k, v in metrics.items() if k in ("eval_loss", "eval_accuracy")}
        tokens = (
            "byte-level" if tokenizer is None else f"{type(tokenizer).__name__} ({len(tokenizer)} tokens)"
        )
        print(
            f"task {args.task}: {type(trainer.model).__name__}, {tokens}; {len(train)} training and "
            f"{len(held_out)} held-out examples; {summary}"
        )
    end_recipe_run()


if __name__ == "__main__":
    main()
