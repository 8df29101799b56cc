"""Count the ATen ops a piece of code dispatches, and its host syncs (a CPU proxy for GPU launch overhead).

On a GPU every non-view ATen op is (at least) one kernel launch and every `.item()` / `float(tensor)` is a host
sync that stalls the CPU until the GPU catches up; a step bound by the host costs about its op count. Counting the
ops on CPU shows a regression in CI without a GPU. Views, aliases and allocations launch no kernel, so they are not
counted.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only make a new view / alias or allocate uninitialized memory: no kernel on a GPU.
NON_LAUNCHING = frozenset(
    {
        "aten.view",
        "aten._unsafe_view",
        "aten.empty",
        "aten.empty_like",
        "aten.empty_strided",
        "aten.new_empty",
        "aten.new_empty_strided",
        "aten.detach",
        "aten.alias",
        "aten.as_strided",
        "aten.t",
        "aten.reshape",
        "aten.expand",
        "aten.select",
        "aten.slice",
        "aten.unsqueeze",
        "aten.squeeze",
        "aten.transpose",
        "aten.permute",
        "aten.split",
        "aten.split_with_sizes",
        "aten.unbind",
        "aten.view_as",
        "aten.lift_fresh",
    }
)

# Ops that copy a device scalar to the host (a sync on a GPU).
HOST_SYNCS = frozenset({"aten._local_scalar_dense", "aten.item"})
# Tensor methods that read a tensor to the host without dispatching an op on CPU (on a GPU they copy and sync).
HOST_READS = ("tolist", "numpy")


def _op_name(func) -> str:
    """The op without its overload: 'aten.mul' for aten.mul.Tensor, 'aten.mul_' for the in-place aten.mul_.Tensor."""
    return f"{func.namespace}.{func._schema.name.split('::')[-1]}"


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        if name in HOST_SYNCS:
            self.syncs += 1
        elif name not in NON_LAUNCHING and func.namespace != "profiler":
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> tuple[collections.Counter[str], int]:
    """Run fn() once; return (Counter of kernel-launching ATen op names, number of host syncs).

    Host syncs are counted apart and not in the Counter: `aten._local_scalar_dense` / `aten.item` (`.item()`,
    `float(t)`, `bool(t)`) and calls of `Tensor.tolist()` / `Tensor.numpy()`. Profiler markers are not counted.
    """
    counter = _OpCounter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    inherited = [name for name in HOST_READS if name not in vars(torch.Tensor)]

    def reading(original):
        def read(tensor, *args, **kwargs):
            counter.syncs += 1
            return original(tensor, *args, **kwargs)

        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, reading(original))
        with counter:
            fn()
    finally:
        for name, original in originals.items():
            if name in inherited:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
    return counter.ops, counter.syncs
