"""Trainer steps on a tiny GPT-2; run alone or under torchrun / accelerate launch (gloo on CPU).

Usage: python tests/ddp_worker.py OUT_DIR [MODE]   (the global batch is 8 samples in every setting)

MODE "probe" (default): one step with FeatureSpeedCallback, which writes OUT_DIR/fsf_stats.jsonl.
MODE "fsc-global" / "fsc-local": two steps with FSCOptimizer over SGD and average_tokens_across_devices True /
False; every rank writes OUT_DIR/fsc_rank<R>.json with each step's loss and target and the final parameters' sum.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from trainer_setup import tiny_gpt2, token_data, training_args  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from hf_fsf.callback import FeatureSpeedCallback  # noqa: E402
from hf_fsf.control import FSCOptimizer  # noqa: E402
from hf_fsf.distributed import exit_distributed_run  # noqa: E402


class _RecordFSC(TrainerCallback):
    def __init__(self, optimizer: FSCOptimizer) -> None:
        self.optimizer, self.steps = optimizer, []

    def on_step_end(self, args, state, control, **kwargs):
        record = self.optimizer.last_step
        self.steps.append({"loss": record.loss, "target": record.target})


def main(out: str, mode: str = "probe") -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = tiny_gpt2()
    common = dict(
        per_device_train_batch_size=4 // world,
        gradient_accumulation_steps=2,
        ddp_backend="gloo" if world > 1 else None,
    )
    if mode == "probe":
        args = training_args(out, max_grad_norm=0.05, **common)
        callback = FeatureSpeedCallback(every=1, angle_every=1, figures=False)
        Trainer(model=model, args=args, train_dataset=token_data(8), callbacks=[callback]).train()
    else:
        args = training_args(out, max_steps=2, average_tokens_across_devices=(mode == "fsc-global"), **common)
        optimizer = FSCOptimizer(model, base=torch.optim.SGD, rate=0.05, lr=0.1, ema_beta=0.0)
        record = _RecordFSC(optimizer)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=token_data(16),
            optimizers=(optimizer, None),
            callbacks=[record],
        )
        trainer.train()
        rank = int(os.environ.get("RANK", "0"))
        checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
        with open(os.path.join(out, f"fsc_rank{rank}.json"), "w") as f:
            json.dump({"steps": record.steps, "checksum": checksum}, f)
    exit_distributed_run()


if __name__ == "__main__":
    main(*sys.argv[1:])
