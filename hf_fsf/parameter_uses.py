"""Which parameters a forward pass uses outside their own module's call, and when.

Module hooks see a parameter only where its module runs. Many models also use a parameter directly: a language
model whose logits are `h @ self.embed.weight.T` or `F.linear(h, self.embed.weight)` ties its output layer to the
input embedding without calling the embedding module. `DirectUses`, a TorchFunctionMode active during the layout's
trace, sees every op: an op *uses* a parameter when its arguments combine the parameter (or a tensor computed from
parameters alone, such as `weight.T`) with another tensor, and the use is *direct* when none of the parameter's
owners (the modules that register it; for a block's parameter, the block) is running at that moment.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


class DirectUses(TorchFunctionMode):
    """Records (id(parameter), time) of each direct use; the time is the trace's clock, advanced by each use.

    owners: id(parameter) -> ids of the modules whose call covers the parameter's own uses. running(id(module)):
    whether that module's call is open. clock: a one-element list shared with the trace's module hooks.
    """

    def __init__(self, owners: dict[int, set[int]], running: Callable[[int], bool], clock: list[int]) -> None:
        super().__init__()
        self.owners = owners
        self.running = running
        self.clock = clock
        self.uses: list[tuple[int, int]] = []
        # id(tensor) -> (the tensor, weakly; the parameters it was computed from alone): `weight.T` used later
        self._derived: dict[int, tuple[weakref.ref, frozenset[int]]] = {}

    def _sources(self, value: torch.Tensor) -> frozenset[int] | None:
        """The parameters `value` is, or was computed from alone; None for a tensor that depends on data."""
        if id(value) in self.owners:  # the parameters are alive during the trace: their ids are theirs
            return frozenset((id(value),))
        entry = self._derived.get(id(value))
        return entry[1] if entry is not None and entry[0]() is value else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        sources = [self._sources(t) for t in tensors]
        params = frozenset().union(*(s for s in sources if s is not None))
        out = func(*args, **kwargs)
        if not params:
            return out
        if all(s is not None for s in sources):  # parameters only: the use is where the result meets data
            for value in tree_leaves(out):
                if isinstance(value, torch.Tensor):
                    self._derived[id(value)] = (weakref.ref(value), params)
            return out
        self.clock[0] += 1
        for pid in params:
            if not any(self.running(m) for m in self.owners[pid]):
                self.uses.append((pid, self.clock[0]))
        return out
