"""What the probe needs to know of sharded parameters (FSDP2's DTensors) and of the wrappers it cannot measure.

Under FSDP2 (`torch.distributed.fsdp.fully_shard`) each parameter is a DTensor sharded along dim 0 over all ranks;
its gradient, after the backward pass, is sharded the same way. A sum over a parameter's elements (⟨g, w⟩, ‖g‖²) is
then the sum over ranks of the sums over the local shards: the probe computes those on `.to_local()` and adds them
into the entries of its vector that are summed over ranks, so nothing parameter-sized crosses ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from hf_fsf.distributed import world_size
from hf_fsf.layout import BlockLayout

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch without torch.distributed
    DTensor = Replicate = Shard = None


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def is_sharded(param: torch.Tensor) -> bool:
    """Whether sums over `param` are sums over ranks of sums over local shards (True: each element lives on one
    rank) or plain local sums (False: a plain tensor, or a DTensor replicated on every rank).

    Raises ValueError for layouts where neither holds (HSDP's replicated shards, tensor parallelism on a sub-mesh):
    summing their shards over all ranks would count elements several times or miss some."""
    if DTensor is None or not isinstance(param, DTensor):
        return False
    placements = param.placements
    if all(isinstance(p, Replicate) for p in placements):
        return False
    if all(isinstance(p, Shard) for p in placements) and param.device_mesh.size() == world_size():
        return True
    raise ValueError(
        f"FeatureSpeedProbe: a parameter is a DTensor with placements {placements} on a mesh of "
        f"{param.device_mesh.size()} of {world_size()} ranks; only parameters sharded over all ranks (FSDP2's "
        "fully_shard on one mesh dimension) or replicated are supported. Shard with fully_shard over all ranks "
        "(no HSDP / tensor parallelism), or measure an unsharded run."
    )


def _fsdp_modules(root: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def registered_layout(model: nn.Module, layout: BlockLayout) -> BlockLayout:
    """The layout with the parameters registered on the model. FSDP2's root keeps its parameters gathered after a
    forward until the next backward (find_blocks' dry forward is one), and the layout then holds the gathered
    copies: every FSDP2 module is resharded (registering the sharded parameters again) and the layout's
    parameters are looked up again by name."""
    fsdp = _fsdp_modules(model)
    if not fsdp:
        return layout
    for module in fsdp:
        module.reshard()
    params = dict(model.named_parameters(remove_duplicate=False))

    def registered(pairs):
        return [(name, params.get(name, p)) for name, p in pairs]

    return dataclasses.replace(
        layout,
        block_params=[registered(b) for b in layout.block_params],
        stem_params=registered(layout.stem_params),
        head_params=registered(layout.head_params),
        tied=[dataclasses.replace(t, param=params.get(t.stem_name, t.param)) for t in layout.tied],
    )


def fsdp_owner(module: nn.Module, root: nn.Module) -> nn.Module | None:
    """The FSDP2 module whose parameter group holds `module`'s own parameters: the closest fully_shard'ed module
    that contains it (None when nothing in `root` is sharded)."""
    owner = None
    for candidate in _fsdp_modules(root):
        if any(m is module for m in candidate.modules()):
            owner = candidate  # modules() runs outside-in: the last match is the closest
    return owner


@contextlib.contextmanager
def unsharded(owner: nn.Module | None):
    """The owner's parameters gathered for a call outside its forward: FSDP2's own unshard / reshard, the all-gather
    it runs for that parameter group at every forward."""
    if owner is None:
        yield
        return
    owner.unshard()
    try:
        yield
    finally:
        owner.reshard()


def after_backward(callback) -> None:
    """Runs `callback` when the current backward pass ends (after FSDP2's own end-of-backward work, which is queued
    when the backward starts): the gradients are then final, before the training loop clips them."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def refuse_deepspeed(model: nn.Module) -> None:
    """DeepSpeed ZeRO partitions parameters and gradients in its own buffers that the probe cannot read (and it does
    not install on these CPU-only machines, so it cannot be tested): refused rather than measured wrong."""
    wrapped = any(
        type(m).__module__.startswith("deepspeed") for m in (model, getattr(model, "module", None)) if m
    )
    plugin = None
    try:
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state:  # only when an Accelerator exists: reading it must not create one
            plugin = getattr(AcceleratorState(), "deepspeed_plugin", None)
    except ImportError:
        pass
    if wrapped or plugin is not None:
        raise ValueError(
            "FeatureSpeedProbe: DeepSpeed is not supported: ZeRO keeps parameters and gradients in partitioned "
            "buffers the probe cannot read, so every number would be wrong. Use FSDP2 (accelerate's FSDP plugin "
            "with fsdp_version: 2, e.g. configs/accelerate/fsdp.yaml) or DDP to measure a sharded run."
        )
