"""Where the blocks are: stem, chain of blocks, head, and who owns which parameter.

The rule is structural, so that new architectures of a known shape need no entry: the blocks are the children of
the one `nn.ModuleList` / `nn.Sequential` of repeated blocks; parameters registered before it belong to the stem
(embeddings, input projection), after it to the head (final norm, readout, classifier). A parameter registered in
both (tied input/output embeddings) is a *tied* parameter, whose gradient mixes the stem and head paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

HOW_TO_PASS_BLOCKS = (
    "Pass the blocks explicitly, e.g. FeatureSpeedProbe(model, blocks=['layers.0', 'layers.1', ...]) "
    "(names as in model.named_modules()) or blocks=[module, ...], in the order the forward pass runs them."
)


@dataclass
class TiedParameter:
    """A parameter used by the stem and by the head (e.g. GPT-2's token embedding and LM head)."""

    stem_name: str
    head_name: str
    param: nn.Parameter
    stem_module_name: (
        str  # the stem module that owns it (its output is linear in the parameter for embeddings)
    )
    stem_module: nn.Module


@dataclass
class BlockLayout:
    """The chain stem -> blocks -> head of a model, with the parameters each part owns."""

    blocks: list[tuple[str, nn.Module]]
    block_params: list[list[tuple[str, nn.Parameter]]]
    stem_params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    head_params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    tied: list[TiedParameter] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    def __len__(self) -> int:
        return len(self.blocks)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / FSDP / accelerate / torch.compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
    return model


def _is_block_container(module: nn.Module) -> bool:
    children = list(module.children())
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(children) < 2:
        return False
    if not all(any(True for _ in c.parameters()) for c in children):
        return False  # e.g. Sequential(Linear, ReLU, ...): a layer list, not a list of blocks
    # A ModuleList is a list of layers by construction (hybrid models mix classes); a Sequential must repeat.
    return isinstance(module, nn.ModuleList) or len({type(c) for c in children}) == 1


def _block_container_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost containers of repeated blocks (a container nested inside another's block is not a candidate)."""
    candidates = [(n, m) for n, m in model.named_modules() if _is_block_container(m)]
    outer = []
    for name, module in candidates:
        nested = any(name.startswith(other + ".") for other, _ in candidates if other != name)
        if not nested:
            outer.append((name, module))
    return outer


def _resolve_blocks(
    model: nn.Module, blocks: Sequence[str] | Sequence[nn.Module] | None
) -> list[tuple[str, nn.Module]]:
    named = dict(model.named_modules())
    if blocks is None:
        candidates = _block_container_candidates(model)
        if not candidates:
            raise ValueError(
                f"find_blocks: no nn.ModuleList or nn.Sequential of repeated blocks in {type(model).__name__}. "
                + HOW_TO_PASS_BLOCKS
            )
        if len(candidates) > 1:
            listed = ", ".join(
                f"'{n}' ({len(list(m.children()))} x {type(next(iter(m.children()))).__name__})"
                for n, m in candidates
            )
            raise ValueError(
                f"find_blocks: {type(model).__name__} has several block lists ({listed}); which one is the chain is "
                "ambiguous. " + HOW_TO_PASS_BLOCKS
            )
        prefix, container = candidates[0]
        return [(f"{prefix}.{n}" if prefix else n, m) for n, m in container.named_children()]
    if isinstance(blocks, (str, nn.Module)):
        raise TypeError(
            "blocks= takes a list of module names or modules, not a single one. " + HOW_TO_PASS_BLOCKS
        )
    resolved = []
    by_id = {id(m): n for n, m in named.items()}
    for item in blocks:
        if isinstance(item, str):
            if item not in named:
                raise ValueError(f"find_blocks: no module named {item!r} in the model. " + HOW_TO_PASS_BLOCKS)
            resolved.append((item, named[item]))
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"find_blocks: module {type(item).__name__} is not part of the model.")
            resolved.append((by_id[id(item)], item))
        else:
            raise TypeError(f"blocks= entries must be str or nn.Module, got {type(item).__name__}.")
    if len(resolved) < 1:
        raise ValueError("find_blocks: blocks= is empty. " + HOW_TO_PASS_BLOCKS)
    names = [n for n, _ in resolved]
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"find_blocks: block {b!r} is inside block {a!r}; blocks must be disjoint.")
    return resolved


def _owner_module_name(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def find_blocks(model: nn.Module, blocks: Sequence[str] | Sequence[nn.Module] | None = None) -> BlockLayout:
    """The BlockLayout of `model`: blocks auto-detected (blocks=None) or given by name or module.

    Parameters are split by registration order in `model.named_parameters()`, which follows the forward order in
    Hugging Face models and in models written the usual way (input layers, blocks, output layers).
    """
    model = unwrap_model(model)
    resolved = _resolve_blocks(model, blocks)
    prefixes = [name + "." for name, _ in resolved]
    block_params: list[list[tuple[str, nn.Parameter]]] = [[] for _ in resolved]
    stem: list[tuple[str, nn.Parameter]] = []
    head: list[tuple[str, nn.Parameter]] = []
    where: dict[int, set[str]] = {}  # id(param) -> parts that use it
    first_name: dict[int, str] = {}
    seen_block = False
    for name, param in model.named_parameters(remove_duplicate=False):
        index = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
        part = "block" if index is not None else ("head" if seen_block else "stem")
        if index is not None:
            seen_block = True
        pid = id(param)
        if pid in first_name:
            where[pid].add(part)
            if part == "head" and "stem" in where[pid] and len(where[pid]) == 2:
                head.append((name, param))  # tied: recorded on both sides, resolved below
            continue
        first_name[pid] = name
        where[pid] = {part}
        if index is not None:
            block_params[index].append((name, param))
        elif part == "stem":
            stem.append((name, param))
        else:
            head.append((name, param))
    named_modules = dict(model.named_modules())
    tied = []
    for name, param in list(head):
        pid = id(param)
        if where[pid] == {"stem", "head"}:
            stem_name = first_name[pid]
            if stem_name == name:
                continue
            owner = _owner_module_name(stem_name)
            tied.append(TiedParameter(stem_name, name, param, owner, named_modules[owner]))
    tied_ids = {id(t.param) for t in tied}
    shared_with_blocks = [
        first_name[pid] for pid, parts in where.items() if "block" in parts and len(parts) > 1
    ]
    if shared_with_blocks:
        raise ValueError(
            f"find_blocks: parameters {shared_with_blocks[:3]} are used inside a block and outside it, so the model "
            "is not a chain stem -> blocks -> head. " + HOW_TO_PASS_BLOCKS
        )
    return BlockLayout(
        blocks=resolved,
        block_params=block_params,
        stem_params=[(n, p) for n, p in stem if id(p) not in tied_ids],
        head_params=[(n, p) for n, p in head if id(p) not in tied_ids],
        tied=tied,
    )


def block_output(output: object) -> torch.Tensor | None:
    """f_ℓ from what a block returned: a tensor, or the first element of a tuple / ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict):
        first = next(iter(output.values()), None)
        return first if isinstance(first, torch.Tensor) else None
    return None


def block_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The residual stream a block reads: first positional tensor, else `hidden_states=`, else a tensor kwarg."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
