"""Recipe: fine-tune a checkpoint (default: the one recipes/train_lm.py saved) with FeatureSpeedCallback.

    python recipes/finetune.py --config configs/finetune.yaml checkpoint=runs/train_lm/final
    python recipes/finetune.py --config configs/finetune.yaml task=lm dataset=path/to/texts/

task=classify: GPT2ForSequenceClassification loaded from the LM checkpoint (the LM head is dropped, a fresh
classification head is added) learns which standard-library package a `snippet_bytes`-byte snippet of source
comes from (classes: `packages`); files are held out whole, so the test is on unseen files. Accuracy through
`evaluate`, loaded from the metric module shipped in hf_fsf (no download).
task=lm: continued language modelling of the checkpoint on `dataset` (held-out loss in nats/byte).
A β recorded in the checkpoint's config (train_lm.py beta=...) is re-applied after loading.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from pathlib import Path

import evaluate
import numpy as np
import torch
import yaml
from torch.utils.data import Dataset
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, Trainer

import hf_fsf
from hf_fsf.callback import FeatureSpeedCallback
from hf_fsf.data import load_text_dataset, stdlib_files
from hf_fsf.residual import apply_branch_scaling, get_branch_scaling

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_lm import parse_args, training_arguments  # noqa: E402  (the sibling recipe's config helpers)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "finetune.yaml"
ACCURACY_MODULE = Path(hf_fsf.__file__).parent / "metrics" / "accuracy"


class PackageSnippets(Dataset):
    """Byte snippets of standard-library source, labelled with the package they come from."""

    def __init__(self, snippets: list[bytes], labels: list[int]):
        self.snippets, self.labels = snippets, labels

    def __len__(self) -> int:
        return len(self.snippets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.frombuffer(bytearray(self.snippets[i]), dtype=torch.uint8).long()
        return {"input_ids": ids, "labels": torch.tensor(self.labels[i])}


def package_snippets(
    packages: list[str], snippet_bytes: int, per_class: int, eval_every_nth_file: int
) -> tuple[PackageSnippets, PackageSnippets]:
    """(train, eval) snippet datasets; every `eval_every_nth_file`-th file of a package is held out whole."""
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
    return PackageSnippets(*splits[0]), PackageSnippets(*splits[1])


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv, default_config=DEFAULT_CONFIG)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    output_dir = Path(cfg["output_dir"])
    checkpoint = cfg["checkpoint"]
    if not Path(checkpoint, "config.json").exists():
        raise FileNotFoundError(
            f"no checkpoint at {checkpoint!r}; run recipes/train_lm.py first (it saves output_dir/final) "
            "or pass checkpoint=<folder with config.json>."
        )

    torch.manual_seed(cfg["seed"])  # the fresh classification head
    if cfg["task"] == "classify":
        train, held_out = package_snippets(
            cfg["packages"], cfg["snippet_bytes"], cfg["snippets_per_class"], cfg["eval_every_nth_file"]
        )
        model = GPT2ForSequenceClassification.from_pretrained(checkpoint, num_labels=len(cfg["packages"]))
        # Snippets are full length: no padding. Byte 0 never occurs in source text, so it is a safe pad id.
        model.config.pad_token_id = 0
        accuracy = evaluate.load(str(ACCURACY_MODULE))

        def compute_metrics(prediction) -> dict:
            logits = prediction.predictions
            logits = logits[0] if isinstance(logits, tuple) else logits
            return accuracy.compute(predictions=np.argmax(logits, -1), references=prediction.label_ids)

    elif cfg["task"] == "lm":
        splits = load_text_dataset(
            cfg["dataset"], block_size=cfg["snippet_bytes"], max_bytes=cfg["max_bytes"]
        )
        train, held_out = splits.train, splits.validation
        model = GPT2LMHeadModel.from_pretrained(checkpoint)
        compute_metrics = None
    else:
        raise ValueError(f"task={cfg['task']!r}: choose 'classify' or 'lm'.")
    model.config.use_cache = False  # no key/value cache in the outputs: evaluation returns logits only
    if get_branch_scaling(model) is not None:
        apply_branch_scaling(model)  # hooks are not in the state dict; the β record in config.json is

    training = training_arguments(cfg, output_dir)
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=train,
        eval_dataset=held_out,
        compute_metrics=compute_metrics,
        callbacks=[FeatureSpeedCallback(every=cfg["fsf_every"], angle_every=cfg["fsf_angle_every"])],
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(output_dir / "final"))
    if trainer.is_world_process_zero():
        (output_dir / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))
        (output_dir / "final" / "finetune_config.yaml").write_text(yaml.safe_dump(cfg))
        summary = {k: v for k, v in metrics.items() if k in ("eval_loss", "eval_accuracy")}
        print(f"task {cfg['task']}: {len(train)} training and {len(held_out)} held-out examples; {summary}")


if __name__ == "__main__":
    main()
