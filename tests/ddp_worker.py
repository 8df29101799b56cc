"""One Trainer step with FeatureSpeedCallback; run alone or under torchrun / accelerate launch (gloo on CPU).

Usage: python tests/ddp_worker.py OUT_DIR   (the global batch is 8 samples in every setting)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from trainer_setup import tiny_gpt2, token_data, training_args  # noqa: E402
from transformers import Trainer  # noqa: E402

from hf_fsf.callback import FeatureSpeedCallback  # noqa: E402


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = tiny_gpt2()
    args = training_args(
        out,
        per_device_train_batch_size=4 // world,
        gradient_accumulation_steps=2,
        max_grad_norm=0.05,
        ddp_backend="gloo" if world > 1 else None,
    )
    callback = FeatureSpeedCallback(every=1, angle_every=1, figures=False)
    Trainer(model=model, args=args, train_dataset=token_data(8), callbacks=[callback]).train()
    # The Trainer leaves the gloo process group open; tearing it down at interpreter exit can abort a rank.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
