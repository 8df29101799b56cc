"""The little that hf_fsf needs to know of devices and ranks: the world size, the CUDA devices whose random state
a replayed forward must restore, and a clean end to a multi-process run."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """Number of processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def cuda_rng_devices(module: nn.Module) -> list[int]:
    """The CUDA devices holding `module`'s parameters: whose random state a replay (dropout) saves and restores."""
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


def exit_distributed_run() -> None:
    """End a script launched with torchrun / accelerate launch once everything is saved (no-op in one process).

    Tearing gloo down at interpreter exit can abort a rank (the Trainer leaves the group open) or deadlock it (the
    DDP reducer's process group joins a worker thread that waits for the GIL), so every rank waits for the others
    and leaves without interpreter teardown. Call it last: exit handlers (e.g. a tracker's finish hook) do not run.
    """
    if world_size() <= 1:
        return
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
