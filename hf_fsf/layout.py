"""Where the blocks are: stem, chain of blocks, head, and who owns which parameter.

The rule is structural, so that new architectures of a known shape need no entry:

- **Blocks** are the children of the one outermost `nn.ModuleList` / `nn.Sequential` of repeated blocks (the
  decoder layers of GPT-2, Llama, Mistral, Mixtral, Qwen, Gemma, Phi, OPT, Falcon, BLOOM, ...; the encoder layers of
  BERT, RoBERTa, DistilBERT, Electra, ViT).
- **Stem** and **head** are the parameters used before the first block and after the last one. Registration order
  usually says which, but not always (OPT registers its final norm before its layers, BART its embedding norm after
  them), so for Hugging Face models the order is taken from one forward pass on tiny dummy inputs, in eval mode and
  without backward (a *trace*; `example_inputs=` does the same for any model). Without a trace, parameters
  registered before the blocks are the stem and those after the head.
- A parameter used in the stem and in the head (tied input/output embeddings) is a *tied* parameter, whose gradient
  mixes the stem and head paths. Its stem share is measured at the output of the stem module that uses it (exact:
  an embedding's output is linear in its weight), so the head may use it any way: through a module (Hugging Face's
  `tie_word_embeddings`) or directly (`logits = h @ self.embed.weight.T`, `F.linear(h, self.embed.weight)`). The
  trace sees direct uses (parameter_uses.py); registration order does not, so a model that is not from Hugging
  Face and uses a parameter outside its module needs `example_inputs=`. Where the stem share cannot be measured
  that way (the stem reads the parameter outside a module call, its module owns other parameters or runs twice
  before the blocks), and where a parameter is used directly while the blocks run, find_blocks refuses the model.

Encoder-decoder models (T5, BART, Whisper, Marian, ...) have two block lists. The default chain is the **encoder**:
its parameters up to block ℓ reach the loss only through f_ℓ (the decoder, which reads the encoder output, is the
head). T5 is the exception: its relative position bias is computed in encoder block 0 and passed to every later
block, a path around f_ℓ that −⟨δf_ℓ, b_ℓ⟩ misses for ℓ < L. The trace detects such paths (a trainable tensor that a
block returns besides f_ℓ and a later block reads) and warns; freezing the bias makes the chain exact. The decoder is
chosen with `blocks="decoder"`; for it the chain identity holds only if the encoder and the shared embeddings are
frozen, since the encoder output feeds every decoder block through cross-attention.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from hf_fsf.distributed import cuda_rng_devices
from hf_fsf.parameter_uses import DirectUses
from hf_fsf.stats import HEAD, STEM  # the names of the groups around the chain (stats.py: no torch there)

HOW_TO_PASS_BLOCKS = (
    "Pass the blocks explicitly, e.g. FeatureSpeedProbe(model, blocks=['layers.0', 'layers.1', ...]) "
    "(names as in model.named_modules()) or blocks=[module, ...], in the order the forward pass runs them; "
    "or name the block list: blocks='model.layers' (or blocks='encoder' / 'decoder' for an encoder-decoder)."
)


@dataclass
class TiedParameter:
    """A parameter used by the stem and by the head (e.g. GPT-2's token embedding and LM head)."""

    stem_name: str
    head_name: str
    param: nn.Parameter
    stem_module_name: (
        str  # the stem module that uses it (its output is linear in the parameter for embeddings)
    )
    stem_module: nn.Module


@dataclass
class BlockLayout:
    """The chain stem -> blocks -> head of a model, with the parameters each part owns.

    traced: whether stem and head were split by the execution order of a forward pass (True) or by registration
    order (False).
    """

    blocks: list[tuple[str, nn.Module]]
    block_params: list[list[tuple[str, nn.Parameter]]]
    stem_params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    head_params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    tied: list[TiedParameter] = field(default_factory=list)
    traced: bool = False

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    def __len__(self) -> int:
        return len(self.blocks)

    def parameter_groups(self, tied: Literal["own", "stem"] = "own") -> dict[str, list[nn.Parameter]]:
        """{group name: parameters}: "stem", each block by its module name, "head", in chain order.

        tied="own": each tied parameter is a group of its own, "tied:<i>" (the probe splits its contribution
        between stem and head); tied="stem": tied parameters join the stem group (FSC optimizes them there).
        Every parameter appears once; frozen ones are included (consumers filter on requires_grad).
        """
        groups = {STEM: [p for _, p in self.stem_params]}
        if tied == "stem":
            groups[STEM] += [t.param for t in self.tied]
        for name, params in zip(self.names, self.block_params):
            groups[name] = [p for _, p in params]
        groups[HEAD] = [p for _, p in self.head_params]
        if tied == "own":
            groups.update({f"tied:{i}": [t.param] for i, t in enumerate(self.tied)})
        return groups


BlocksArg = str | Sequence[str] | Sequence[nn.Module] | BlockLayout | None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / FSDP / accelerate / torch.compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
    return model


# --- which modules are the blocks --------------------------------------------------------------------------------


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


def _stack_of(name: str) -> str | None:
    """'encoder' or 'decoder' when a container lives under a module of that name (T5, BART, Whisper, ...)."""
    parts = name.split(".")
    for stack in ("encoder", "decoder"):
        if stack in parts:
            return stack
    return None


def _children_of(prefix: str, container: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}.{n}" if prefix else n, m) for n, m in container.named_children()]


def _describe(candidates: list[tuple[str, nn.Module]]) -> str:
    return ", ".join(
        f"'{n}' ({len(list(m.children()))} x {type(next(iter(m.children()))).__name__})"
        for n, m in candidates
    )


def _container_by_name(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """blocks='model.layers' (a block list by name) or blocks='encoder' / 'decoder' (the stack of that name)."""
    named = dict(model.named_modules())
    if name in named and isinstance(named[name], (nn.ModuleList, nn.Sequential)):
        return _children_of(name, named[name])
    candidates = _block_container_candidates(model)
    matching = [(n, m) for n, m in candidates if name in n.split(".") or n.startswith(name + ".")]
    if len(matching) == 1:
        return _children_of(*matching[0])
    found = f"block lists found: {_describe(candidates)}" if candidates else "no block list found"
    what = "several block lists match" if matching else "no block list matches"
    raise ValueError(f"find_blocks: blocks={name!r}: {what} ({found}). " + HOW_TO_PASS_BLOCKS)


def _resolve_blocks(model: nn.Module, blocks: BlocksArg) -> list[tuple[str, nn.Module]]:
    named = dict(model.named_modules())
    if blocks is None:
        candidates = _block_container_candidates(model)
        if not candidates:
            raise ValueError(
                f"find_blocks: no nn.ModuleList or nn.Sequential of repeated blocks in {type(model).__name__}. "
                + HOW_TO_PASS_BLOCKS
            )
        stacks = [_stack_of(n) for n, _ in candidates]
        if len(candidates) == 2 and sorted(map(str, stacks)) == ["decoder", "encoder"]:
            # Encoder-decoder: the encoder is a chain (the decoder is its head); see the module docstring.
            return _children_of(*candidates[stacks.index("encoder")])
        if len(candidates) > 1:
            raise ValueError(
                f"find_blocks: {type(model).__name__} has several block lists ({_describe(candidates)}); which "
                "one is the chain is ambiguous. " + HOW_TO_PASS_BLOCKS
            )
        return _children_of(*candidates[0])
    if isinstance(blocks, str):
        return _container_by_name(model, blocks)
    if isinstance(blocks, nn.Module):
        raise TypeError(
            "blocks= takes a list of modules (or names), or the name of a block list, not a single module. "
            + HOW_TO_PASS_BLOCKS
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


# --- execution order ---------------------------------------------------------------------------------------------

# Phases of a module call relative to the chain: before the first block (STEM), after the last (HEAD), or in
# between (outside any block, while the chain runs: a parameter shared by the blocks, which breaks the chain).
_CHAIN = "chain"


def _dummy_inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Tiny inputs for one forward of a Hugging Face model, built from its config; None for other models.

    Covers the main input kinds (`input_ids`, `pixel_values`, Whisper-style `input_features`), plus
    `decoder_input_ids` for encoder-decoders.
    """
    config = getattr(model, "config", None)
    param = next(model.parameters(), None)
    if config is None or param is None:
        return None
    device = param.device
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtype = floats[0] if floats else torch.float32
    kind = getattr(model, "main_input_name", "input_ids")
    vocab = getattr(config, "vocab_size", None) or 2
    if kind == "input_ids":
        inputs = {"input_ids": torch.arange(1, 5, device=device).remainder(vocab).unsqueeze(0)}
    elif kind == "pixel_values" and getattr(config, "image_size", None) is not None:
        size = config.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = getattr(config, "num_channels", 3)
        inputs = {"pixel_values": torch.zeros(1, channels, height, width, device=device, dtype=dtype)}
    elif kind == "input_features" and hasattr(config, "max_source_positions"):
        frames = 2 * config.max_source_positions  # what Whisper's encoder requires (two convs, stride 2)
        inputs = {"input_features": torch.zeros(1, config.num_mel_bins, frames, device=device, dtype=dtype)}
    else:
        return None
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in _argument_names(model):
        inputs["decoder_input_ids"] = torch.arange(1, 3, device=device).remainder(vocab).unsqueeze(0)
    return inputs


def _argument_names(module: nn.Module) -> list[str]:
    """The names of module.forward's arguments (an encoder stack takes no decoder_input_ids)."""
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []


@contextlib.contextmanager
def _quiet_eval(model: nn.Module):
    """eval mode, the random state restored: the trace leaves no trace (dropout, BatchNorm statistics)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.random.fork_rng(devices=cuda_rng_devices(model)), torch.enable_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def _call(model: nn.Module, inputs: Any) -> None:
    if isinstance(inputs, Mapping):
        model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        model(*inputs)
    else:
        model(inputs)


@dataclass
class _Trace:
    """What one forward pass says about the chain."""

    phases: dict[int, set[str]]  # id(module outside the blocks) -> phases in which it ran
    # id(parameter) -> phases in which an op used it outside its owners' calls (`h @ embed.weight.T`)
    direct: dict[int, set[str]]
    stem_calls: dict[int, int]  # id(module) -> how many times it ran before the blocks
    order: list[int]  # block indices in the order they first ran
    # (block, later block, argument name): trainable tensors passed from block to block around the stream
    side_inputs: list[tuple[str, str, str]]


def _trace(model: nn.Module, blocks: list[tuple[str, nn.Module]], inputs: Any) -> _Trace:
    """Runs the model once and says, for every module outside the blocks, in which phases it was called, and for
    every parameter that an op used outside its owners' calls, in which phases (see parameter_uses.py).

    Modules whose call encloses the chain (the model itself, a stack) are not classified: their own parameters
    are placed by when ops use them, or by registration order. Also records the trainable tensors that a block returns besides f_ℓ and a
    later block reads (T5's position bias): a path around the residual stream, which breaks the chain identity.
    The forward runs with grad enabled (to see which tensors depend on trainable parameters) but no backward.
    """
    block_index = {id(m): i for i, (_, m) in enumerate(blocks)}
    clock = [0]
    calls: dict[int, list[tuple[int, int]]] = {}
    open_calls: dict[int, list[int]] = {}
    returned: dict[int, tuple[int, torch.Tensor]] = {}  # id(tensor) -> (block, tensor kept alive)
    side_inputs: list[tuple[str, str, str]] = []

    def pre(module: nn.Module, args: tuple) -> None:
        clock[0] += 1
        open_calls.setdefault(id(module), []).append(clock[0])

    def post(module: nn.Module, args: tuple, output: object) -> None:
        clock[0] += 1
        start = open_calls[id(module)].pop()
        calls.setdefault(id(module), []).append((start, clock[0]))

    def block_pre(index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        names = _argument_names(module)
        named = [(names[i] if i < len(names) else f"argument {i}", a) for i, a in enumerate(args)]
        named += list(kwargs.items())
        for argument, value in named:
            source = returned.get(id(value)) if isinstance(value, torch.Tensor) else None
            if source is not None and source[1] is value and source[0] != index:
                side_inputs.append((blocks[source[0]][0], blocks[index][0], argument))

    def block_post(index: int, module: nn.Module, args: tuple, output: object) -> None:
        extra = output[1:] if isinstance(output, (tuple, list)) else ()
        for value in extra:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                returned[id(value)] = (index, value)

    inside_blocks = {id(m) for _, block in blocks for m in block.modules()} - set(block_index)
    uses = DirectUses(_owners(model, blocks), lambda mid: bool(open_calls.get(mid)), clock)
    handles = []
    try:
        for module in model.modules():
            if id(module) not in inside_blocks:
                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(post))
        for index, (_, block) in enumerate(blocks):
            handles.append(
                block.register_forward_pre_hook(functools.partial(block_pre, index), with_kwargs=True)
            )
            handles.append(block.register_forward_hook(functools.partial(block_post, index)))
        with _quiet_eval(model), uses:
            _call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [blocks[i][0] for i in range(len(blocks)) if id(blocks[i][1]) not in calls]
    if missing:
        raise RuntimeError(f"blocks {missing[:3]} did not run in the forward pass")
    spans = [calls[id(m)][0] for _, m in blocks]
    order = sorted(range(len(blocks)), key=lambda i: spans[i][0])
    first, last = spans[order[0]][0], max(end for _, end in spans)
    phases: dict[int, set[str]] = {}
    for mid, module_calls in calls.items():
        if mid in block_index:
            continue
        seen = set()
        for start, end in module_calls:
            if end < first:
                seen.add(STEM)
            elif start > last:
                seen.add(HEAD)
            elif not (start < first and end > last):
                seen.add(_CHAIN)
        if seen:
            phases[mid] = seen
    stem_calls = {mid: sum(end < first for _, end in c) for mid, c in calls.items()}
    direct: dict[int, set[str]] = {}
    for pid, time in uses.uses:
        direct.setdefault(pid, set()).add(STEM if time < first else HEAD if time > last else _CHAIN)
    return _Trace(phases, direct, stem_calls, order, list(dict.fromkeys(side_inputs)))


def _owners(model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> dict[int, set[int]]:
    """id(parameter) -> ids of the modules in whose call its uses are its own: the modules that register it, or,
    for a parameter inside a block, that block (whose submodules the trace does not hook). A module whose call
    encloses blocks (the model, a stack) owns nothing here: its parameters' uses are placed by when they run."""
    modules = dict(model.named_modules(remove_duplicate=False))
    enclosing = {n for n in modules for b, _ in blocks if n == "" or b.startswith(n + ".")}
    prefixes = [(name + ".", id(block)) for name, block in blocks]
    owners: dict[int, set[int]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        block = next((b for prefix, b in prefixes if name.startswith(prefix)), None)
        owner = _owner_module_name(name)
        found = {block} if block is not None else set() if owner in enclosing else {id(modules[owner])}
        owners.setdefault(id(param), set()).update(found)
    return owners


# --- parameters: stem, blocks, head ------------------------------------------------------------------------------


def _owner_module_name(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def _embedding_hints(model: nn.Module, resolved: list[tuple[str, nn.Module]]) -> dict[int, str]:
    """Registration-order fallback for HF models: the output embeddings are head; the input embeddings are stem
    unless they belong to another stack than the blocks (Whisper's are the decoder's)."""
    hints: dict[int, str] = {}
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    with contextlib.suppress(Exception):
        out = get_out() if callable(get_out) else None
        if isinstance(out, nn.Module):
            hints[id(out)] = HEAD
    with contextlib.suppress(Exception):
        emb = get_in() if callable(get_in) else None
        by_id = {id(m): n for n, m in model.named_modules()}
        if isinstance(emb, nn.Module) and id(emb) in by_id:
            stacks = {_stack_of(n) for n, _ in resolved}
            if _stack_of(by_id[id(emb)]) in stacks | {None}:
                hints.setdefault(id(emb), STEM)
    return hints


def _try_trace(
    model: nn.Module, resolved: list[tuple[str, nn.Module]], example_inputs: Any, trace: bool
) -> tuple[_Trace | None, str | None]:
    """(trace, why not) from a forward on example_inputs, or on HF dummy inputs; (None, None) for a plain model."""
    if not trace:
        return None, None
    inputs = example_inputs if example_inputs is not None else _dummy_inputs(model)
    if inputs is None:
        return None, None
    try:
        return _trace(model, resolved, inputs), None
    except Exception as error:  # a failed dry run only means falling back to registration order
        return None, f"{type(error).__name__}: {str(error)[:200]}"


def _parts(
    model: nn.Module, resolved: list[tuple[str, nn.Module]], traced: _Trace | None
) -> tuple[dict[int, dict[str, list[str]]], dict[int, nn.Parameter], dict[int, str]]:
    """{id(param): {part: names}} where part is 'stem', 'head', 'chain' or 'block:<i>'; a parameter registered
    under several names (tied), or used directly outside its module, can be in several parts. Also the parameters
    by id, and the embedding hints used."""
    phases = traced.phases if traced is not None else None
    direct = traced.direct if traced is not None else {}
    modules = dict(model.named_modules(remove_duplicate=False))
    hints = _embedding_hints(model, resolved) if phases is None else {}
    prefixes = [name + "." for name, _ in resolved]
    parts: dict[int, dict[str, list[str]]] = {}
    params: dict[int, nn.Parameter] = {}
    seen_block = False
    for name, param in model.named_parameters(remove_duplicate=False):
        index = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
        owner = modules[_owner_module_name(name)]
        used = direct.get(id(param), set())
        if index is not None:
            seen_block, found = True, {f"block:{index}"} | used
        elif phases is not None and (id(owner) in phases or used):
            found = phases.get(id(owner), set()) | used
        elif id(owner) in hints:
            found = {hints[id(owner)]}
        else:  # registration order
            found = {HEAD if seen_block else STEM}
        params[id(param)] = param
        for part in found:
            parts.setdefault(id(param), {}).setdefault(part, []).append(name)
    return parts, params, hints


def find_blocks(
    model: nn.Module,
    blocks: BlocksArg = None,
    *,
    example_inputs: Any = None,
    trace: bool = True,
) -> BlockLayout:
    """The BlockLayout of `model`.

    blocks: None (auto-detect; the encoder of an encoder-decoder), a list of module names or modules, the name
    of a block list ('model.layers', 'encoder', 'decoder'), or a BlockLayout (returned as it is: find the layout
    once and pass it to every consumer).
    example_inputs: inputs for one forward pass (a dict of keyword arguments, a tuple, or a tensor) that orders the
    parameters outside the blocks by execution. Hugging Face models get dummy inputs from their config when it is
    None. The forward runs in eval mode with the random state restored, and no backward. trace=False skips it:
    stem and head then follow registration order. Only the trace sees a parameter used outside its module (a head
    computing h @ self.embed.weight.T): pass example_inputs= for such a model unless it is from Hugging Face, or
    the embedding's whole gradient counts as the stem's.
    """
    if isinstance(blocks, BlockLayout):
        return blocks
    model = unwrap_model(model)
    resolved = _resolve_blocks(model, blocks)
    traced, why_not = _try_trace(model, resolved, example_inputs, trace)
    if traced is not None:
        # The chain order is the execution order. The trace's phases are keyed by module, not by block index,
        # so they stay valid after the reordering.
        resolved = [resolved[i] for i in traced.order]
    parts, params, hints = _parts(model, resolved, traced)

    block_params: list[list[tuple[str, nn.Parameter]]] = [[] for _ in resolved]
    stem, head, tied, shared, unsplittable = [], [], [], [], []
    for pid, where in parts.items():
        param = params[pid]
        in_blocks = [p for p in where if p.startswith("block:")]
        if (in_blocks and len(where) > 1) or _CHAIN in where:
            shared.append(next(iter(where.values()))[0])
        elif in_blocks:
            block_params[int(in_blocks[0].split(":")[1])].append((where[in_blocks[0]][0], param))
        elif set(where) == {STEM, HEAD}:
            tied.append(_tied_parameter(model, where, param, traced))
            why = _why_unsplittable(tied[-1], traced)
            if why is not None:
                unsplittable.append(f"{tied[-1].stem_name!r}: {why}")
        elif STEM in where:
            stem.append((where[STEM][0], param))
        else:
            head.append((where[HEAD][0], param))
    if shared:
        raise ValueError(
            f"find_blocks: parameters {shared[:3]} are used inside the chain of blocks and elsewhere (another "
            "block, between blocks, or by an op outside their module while the blocks run), so the model is not a "
            "chain stem -> blocks -> head. " + HOW_TO_PASS_BLOCKS
        )
    if unsplittable:
        raise ValueError(
            "find_blocks: a parameter used before the blocks and after them (tied input and output embeddings) "
            "has a gradient that mixes the stem's path and the head's, and the probe measures the stem's share "
            "at the output of the one module that uses it before the blocks; here it cannot: "
            + "; ".join(unsplittable[:3])
            + ". Use the parameter before the blocks only through one call of a module that owns nothing else "
            "(e.g. h = self.embed(ids) with an nn.Embedding; the head may use self.embed.weight directly)."
        )
    if why_not is not None and _unverified_stem(model, stem, hints):
        warnings.warn(
            f"find_blocks: the dry forward that orders stem and head failed ({why_not}); parameters were split by "
            "registration order, which is wrong for models that register a final norm before their blocks (OPT). "
            "Pass example_inputs= to find_blocks to fix it.",
            stacklevel=2,
        )
    if traced is not None and traced.side_inputs:
        source, target, argument = traced.side_inputs[0]
        warnings.warn(
            f"find_blocks: block {source!r} returns a trainable tensor besides its output that {target!r} reads as "
            f"{argument!r} (T5's relative position bias is one): the parameters that compute it reach the loss "
            "around the residual stream, so fsf_ratio drifts from 1 for the blocks in between. Freeze them "
            "(requires_grad_(False)) to make the chain exact.",
            stacklevel=2,
        )
    return BlockLayout(
        blocks=resolved,
        block_params=block_params,
        stem_params=stem,
        head_params=head,
        tied=tied,
        traced=traced is not None,
    )


def _tied_parameter(
    model: nn.Module, where: dict[str, list[str]], param: nn.Parameter, traced: _Trace | None
) -> TiedParameter:
    """The stem side is the module seen running before the blocks (BART's model.shared never runs: its weight
    runs in encoder.embed_tokens); the head side is preferably a head-only name (the LM head)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    phases = traced.phases if traced is not None else {}
    ran = [n for n in where[STEM] if STEM in phases.get(id(modules[_owner_module_name(n)]), ())]
    stem_name = (ran or where[STEM])[0]
    head_only = [n for n in where[HEAD] if n not in where[STEM]]
    owner = _owner_module_name(stem_name)
    return TiedParameter(stem_name, (head_only or where[HEAD])[-1], param, owner, modules[owner])


def _why_unsplittable(tied: TiedParameter, traced: _Trace | None) -> str | None:
    """Why the stem module's output change, −⟨δ(stem output), b⟩, is not the tied parameter's stem share; None
    when it is. The trace's checks need a trace (example_inputs= for a model that is not from Hugging Face)."""
    if traced is not None and STEM in traced.direct.get(id(tied.param), ()):
        return "an op outside its module uses it before the blocks (e.g. F.embedding(ids, weight))"
    others = [n for n, p in tied.stem_module.named_parameters() if p is not tied.param]
    if others:
        return (
            f"its module {tied.stem_module_name!r} also owns {others[:2]}, whose update moves the same output"
        )
    calls = traced.stem_calls.get(id(tied.stem_module), 0) if traced is not None else 0
    if calls > 1:
        return f"its module {tied.stem_module_name!r} runs {calls} times before the blocks; the probe reads one call"
    return None


def _unverified_stem(model: nn.Module, stem: list[tuple[str, nn.Parameter]], hints: dict[int, str]) -> bool:
    """Whether registration order put in the stem a parameter that is not the input embeddings."""
    modules = dict(model.named_modules(remove_duplicate=False))
    return any(id(modules[_owner_module_name(n)]) not in hints for n, _ in stem)


# --- what a block reads and returns -------------------------------------------------------------------------------


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
