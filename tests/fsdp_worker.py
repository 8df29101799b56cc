"""Two measured steps (angle on, clipping) of a float64 model, alone or under torchrun with FSDP2 (gloo on CPU).

Usage: python tests/fsdp_worker.py OUT_DIR plain|fsdp   (models: gpt2, with a tied embedding; chain, a residual MLP)

The global batch is the same in every setting; each rank takes its equal slice, so the ranks' mean loss is the
one-process loss. With `fsdp`, fully_shard wraps each block and the root (what accelerate's FSDP2 plugin does).
Rank 0 writes every step's stats (StepStats.to_record()) to OUT_DIR/<model>.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from chain_models import RegressionChain  # noqa: E402
from trainer_setup import tiny_gpt2  # noqa: E402

from hf_fsf import FeatureSpeedProbe  # noqa: E402

BATCH = 8


def build(name: str):
    """(model, its block modules, inputs, loss of a slice) in float64."""
    g = torch.Generator().manual_seed(1)
    if name == "gpt2":
        model = tiny_gpt2(seed=0)
        ids = torch.randint(0, 64, (BATCH, 12), generator=g)
        return model, list(model.transformer.h), ids, lambda m, x: m(input_ids=x, labels=x).loss
    torch.manual_seed(0)
    model = RegressionChain("resnet").double()
    x = torch.randn(BATCH, 6 + 1, generator=g, dtype=torch.float64)  # inputs and the target, one row each
    return model, list(model.blocks), x, lambda m, xy: m.loss(m(xy[:, :-1]), xy[:, -1:])


def measure(name: str, mode: str, world: int, rank: int) -> list[dict]:
    model, blocks, inputs, loss_of = build(name)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    local = inputs.chunk(world)[rank]
    records = []
    with FeatureSpeedProbe(model) as probe:
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            probe.begin_step(angle=True)
            loss_of(model, local).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            probe.before_optimizer_step()
            optimizer.step()
            records.append(probe.after_optimizer_step().to_record())
    return records


def main(out: str, mode: str) -> None:
    world, rank = 1, 0
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
    for name in ("gpt2", "chain"):
        records = measure(name, mode, world, rank)
        if rank == 0:
            with open(os.path.join(out, f"{name}.json"), "w") as f:
                json.dump(records, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
