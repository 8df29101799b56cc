"""Branch scaling of residual blocks: every residual branch carries a multiplier β (PAPER.md §5).

A pre-LN transformer block has two residual branches (three in an encoder-decoder's decoder)::

    h <- h + β · attn(norm(h))
    h <- h + β · mlp(norm(h))

**Per-branch form.** β multiplies the output of each branch, not the whole block (h + β·(block(h) − h)). The
two are different parametrizations as soon as a block has two branches in sequence, because the MLP reads the
attention's output. The per-branch form is the one of the paper's ResNet (β W φ(f) added to the stream) and of
depth-μP, and it is the only one that can be made function-preserving by rescaling weights: 1/β in a branch's
output projection cancels β exactly, while the whole-block form would need to undo β inside the MLP's input,
which no weight rescaling can do. Both modes (fresh and function-preserving) use this form. The skip keeps
weight 1 (depth-μP, and what pretrained transformers use), not the paper's √(1−β²): pre-LN blocks read the
stream through a norm, so its growth does not reach the branches.

**Where β lives.** A forward hook (`BranchMultiplier`) on each branch's output module (its last projection, e.g.
`o_proj` / `down_proj`, or a fused-experts module) multiplies its output by β. Anything between that projection
and the residual add (dropout) commutes with a scalar. Hooks rather than a wrapper module: a wrapper would rename
parameters (`o_proj.weight` -> `o_proj.inner.weight`), so checkpoints would no longer load into the stock class,
and code that addresses modules by name (PEFT target modules, FSDP wrap policies, tensor-parallel plans) would
break. Hooks do not live in the state dict, so β is recorded in ``model.config.hf_fsf_branch_scaling`` (saved in
config.json by ``save_pretrained``); after ``from_pretrained``, one ``apply_branch_scaling(model)`` re-registers
the hooks from it. The hooks are visible in ``module._forward_hooks`` (their repr names β) and the record is read
with `get_branch_scaling`.

**Sandwich norms** (OLMo 2 and 3, Gemma 2 and 3, GLM-4): a block computes h + norm(branch(h)). A β on the
projection would be undone by the norm after it, so the branch's last module is that norm and β multiplies its
output: h + β·norm(branch(h)), the paper's branch scale on the branch these models add to the stream.

**Function-preserving mode** (``preserve_function=True``, for pretrained checkpoints): the weight and bias of
each branch's output module are divided by β, so the output of the model is unchanged at the moment of the
call, but the gradient of those weights is multiplied by β (and their effective update by β²): training
dynamics change. For a post-branch norm, the 1/β goes into its gain: weight/β for a gain ``weight``, and
``(1 + weight)/β - 1`` for Gemma's gain ``1 + weight`` (found by evaluating the norm, not from its class name);
the gradient of that weight is again multiplied by β. A checkpoint saved in that state holds the 1/β in its
weights: loading it without calling `apply_branch_scaling` gives a different function.

**Supported families** (checked by tests/test_residual.py: β = 0 makes every block the identity, β = 1 changes
nothing, function-preserving mode, save/load): GPT-2, GPT-NeoX, Llama, Mistral, Mixtral, Qwen2, Gemma, Phi, ViT, T5
(branch ends at an output projection), OLMo 2, OLMo 3, Gemma 2, Gemma 3 (text and multimodal), GLM-4 (branch ends at
a post-branch norm). Other pre-LN models go through the same rule with a warning, or take ``branches=``. Refused:
post-LN models (BERT, RoBERTa, ...) and Gemma 3n (AltUp / LAuReL blocks).

Call it on the bare model, before DDP / FSDP wrapping, `torch.compile` or PEFT adapters (a LoRA adapter added
to an output projection afterwards is not scaled by its hook).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_fsf.layout import BlocksArg, find_blocks, unwrap_model

RECORD_KEY = "hf_fsf_branch_scaling"
FORM = "per_branch"

BetaSpec = str | float | Callable[[int, int], float]

# Last name of a branch's output projection in most families (o_proj/down_proj: Llama-like; c_proj: GPT-2;
# out_proj: GPT-Neo, CLIP; dense_4h_to_h: GPT-NeoX; fc2: ViT, Phi; o/wo: T5; w2: Mixtral-style experts).
OUTPUT_NAMES = ("o_proj", "out_proj", "down_proj", "c_proj", "dense_4h_to_h", "fc2", "wo", "o", "w2")

# Families whose output projections have names too ambiguous for the rule above ("dense").
FAMILY_OUTPUT_MODULES: dict[str, tuple[str, ...]] = {
    "gpt_neox": ("attention.dense",),
    "phi": ("self_attn.dense",),
    "vit": ("attention.output.dense", "output.dense"),  # transformers 4.x names (5.x: o_proj / fc2)
}

# Families checked by tests/test_residual.py (β = 0 makes every block the identity): no warning for them.
VERIFIED_FAMILIES = frozenset(
    {"gpt2", "gpt_neox", "llama", "mistral", "mixtral", "qwen2", "gemma", "phi", "vit", "t5"}
    | {"olmo2", "olmo3", "gemma2", "gemma3", "gemma3_text", "glm4"}
)

# Post-LN: a block computes norm(h + branch(h)), so β = 0 does not make it the identity and the per-branch
# multiplier is not the parametrization this function promises.
POST_LN_FAMILIES = frozenset(
    {
        "albert", "bart", "bert", "big_bird", "camembert", "convbert", "data2vec-text", "deberta", "deberta-v2",
        "distilbert", "electra", "ernie", "funnel", "layoutlm", "marian", "mobilebert", "mpnet", "nezha",
        "openai-gpt", "roberta", "roformer", "squeezebert", "xlm-roberta", "xlnet",
    }
)  # fmt: skip

# Sandwich norm: h + norm(branch(h)); a β on the projection would be undone by the norm after it, so the branch's
# last module is that norm. (In Llama-like blocks `post_attention_layernorm` is the MLP's input norm: by family.)
_GEMMA_OLMO_POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")
SANDWICH_OUTPUT_MODULES: dict[str, tuple[str, ...]] = {
    "olmo2": _GEMMA_OLMO_POST_NORMS,
    "olmo3": _GEMMA_OLMO_POST_NORMS,
    "gemma2": _GEMMA_OLMO_POST_NORMS,
    "gemma3": _GEMMA_OLMO_POST_NORMS,  # multimodal: the blocks are its language model's
    "gemma3_text": _GEMMA_OLMO_POST_NORMS,
    "glm4": ("post_self_attn_layernorm", "post_mlp_layernorm"),
}
# Names that only post-branch norms carry: the generic rule refuses blocks that have one.
_SANDWICH_NORM_NAMES = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_self_attn_layernorm")

# AltUp / LAuReL blocks: the stream is a set of predictions mixed by learned weights, not h + branch(h).
ALTUP_FAMILIES = frozenset({"gemma3n", "gemma3n_text"})

HOW_TO_PASS_BRANCHES = (
    "Pass the branch output modules explicitly, relative to each block, e.g. "
    "apply_branch_scaling(model, beta, branches=['self_attn.o_proj', 'mlp.down_proj']) (the same names in every "
    "block) or branches={'model.layers.0': [...], ...}; each must be the last module of a branch whose output is "
    "added to the residual stream (h + branch(h)), with nothing but dropout in between."
)


@dataclass
class BranchScaling:
    """What `apply_branch_scaling` did to a model; stored as a dict in ``model.config.hf_fsf_branch_scaling``.

    ``weight_scale[block]`` is the factor already multiplied into the weights (and biases) of that block's branch
    output modules: 1/β after a function-preserving call on an unscaled model, 1 in the fresh mode.
    """

    beta: dict[str, float]  # block name -> β, for every branch of the block
    branches: dict[str, list[str]]  # block name -> branch output modules, relative to the block
    weight_scale: dict[str, float] = field(default_factory=dict)
    form: str = FORM

    @property
    def absorbed(self) -> bool:
        """True when the weights carry 1/β: the model computes the function of the unscaled model."""
        return all(math.isclose(self.beta[b] * self.weight_scale.get(b, 1.0), 1.0) for b in self.beta)

    def to_dict(self) -> dict:
        return {
            "form": self.form,
            "beta": dict(self.beta),
            "branches": {b: list(v) for b, v in self.branches.items()},
            "weight_scale": dict(self.weight_scale),
            "absorbed": self.absorbed,
        }

    @classmethod
    def from_dict(cls, record: Mapping) -> BranchScaling:
        if record.get("form", FORM) != FORM:
            raise ValueError(
                f"{RECORD_KEY}: unknown form {record.get('form')!r}; this version knows {FORM!r}."
            )
        return cls(
            beta={b: float(v) for b, v in record["beta"].items()},
            branches={b: list(v) for b, v in record["branches"].items()},
            weight_scale={b: float(v) for b, v in record.get("weight_scale", {}).items()},
        )


class BranchMultiplier:
    """Forward hook multiplying a branch output module's output by β (the first element of a tuple output)."""

    def __init__(self, beta: float, block: str, branch: str):
        self.beta = beta
        self.block = block
        self.branch = branch

    def __call__(self, module: nn.Module, args: tuple, output: object) -> object:
        if isinstance(output, torch.Tensor):
            return output * self.beta
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (output[0] * self.beta, *output[1:])
        raise TypeError(
            f"BranchMultiplier on {self.block}.{self.branch}: the module returned {type(output).__name__}, "
            "expected a tensor. " + HOW_TO_PASS_BRANCHES
        )

    def __repr__(self) -> str:
        return f"BranchMultiplier(beta={self.beta:g}, branch={self.block}.{self.branch!s})"


def get_branch_scaling(model: nn.Module) -> BranchScaling | None:
    """The branch scaling recorded on the model (its config, else the module), or None."""
    model = unwrap_model(model)
    holder = model.config if getattr(model, "config", None) is not None else model
    record = getattr(holder, RECORD_KEY, None)
    return BranchScaling.from_dict(record) if record else None


def apply_branch_scaling(
    model: nn.Module,
    beta: BetaSpec | None = None,
    preserve_function: bool = False,
    *,
    branches: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    blocks: BlocksArg = None,
) -> BranchScaling:
    """Give every residual branch of the model the multiplier β: h <- h + β·branch(h), per branch.

    beta: ``"1/sqrt(L)"`` (or ``"1/L"``), a number, or ``beta(layer_index, L) -> float``, where L is the number
        of blocks of the stack and layer_index counts from 0 within it. An encoder-decoder has two stacks
        (encoder, decoder), each with its own L. None: restore the β recorded in ``model.config`` (after
        ``from_pretrained``); weights are never touched then.
    preserve_function: divide the weight and bias of each branch's output module by β so that the model's
        output is unchanged by this call (pretrained checkpoints). Calling again replaces β (multipliers never
        stack); with preserve_function=True the weights are rescaled by β_old/β_new, so 1/β is never absorbed
        twice, also after a save/load round trip.
    branches: branch output modules relative to each block (a list used for every block, or a dict by block
        name), for models the automatic rule does not know.
    blocks: the blocks, for models where `find_blocks` cannot find them: block names, or a BlockLayout.

    Raises ValueError for post-LN families (BERT, RoBERTa, ...: a block is norm(h + branch(h)), not
    h + branch(h)), for Gemma 3n (AltUp blocks), and when no branch output module is found.
    """
    model = unwrap_model(model)
    previous, hooked = _previous_scaling(model)
    if beta is None:
        if previous is None:
            raise ValueError(
                f"apply_branch_scaling: beta=None restores the β recorded in model.config.{RECORD_KEY}, but the "
                "model has none. Pass beta='1/sqrt(L)', a number, or a callable beta(layer_index, L)."
            )
        if branches is not None or blocks is not None:
            raise ValueError("apply_branch_scaling: branches= and blocks= need an explicit beta.")
        target = previous
    else:
        target = _new_scaling(model, beta, branches, blocks, previous)
        if preserve_function:
            _absorb_into_weights(model, target, previous.beta if previous is not None else {})
    _install(model, target, hooked)
    return target


def _previous_scaling(model: nn.Module) -> tuple[BranchScaling | None, list[tuple[nn.Module, int]]]:
    """The scaling recorded on the model (block names mapped onto this model), and its registered hooks."""
    previous = get_branch_scaling(model)
    hooked = _registered_multipliers(model)
    if hooked and previous is None:
        raise RuntimeError(
            f"{RECORD_KEY}: the model carries BranchMultiplier hooks but no record in its config (was "
            f"model.config.{RECORD_KEY} deleted?). Remove the hooks, or restore the record."
        )
    return (None if previous is None else _rename_to_model(model, previous)), hooked


def _new_scaling(
    model: nn.Module,
    beta: BetaSpec,
    branches: Sequence[str] | Mapping[str, Sequence[str]] | None,
    blocks: BlocksArg,
    previous: BranchScaling | None,
) -> BranchScaling:
    """The scaling asked for, on the branches already scaled if any (weight_scale carried over from them)."""
    layout = _layout(model, branches, blocks, previous)
    target = BranchScaling(beta=_betas(beta, layout), branches={b: v for s in layout for b, v in s})
    if previous is not None and target.branches != previous.branches:
        raise ValueError(
            "apply_branch_scaling: the model already carries branch scaling on other modules "
            f"({_summary(previous.branches)}) than those asked for now ({_summary(target.branches)}). "
            "Omit branches=/blocks= to keep the recorded ones."
        )
    target.weight_scale = dict(previous.weight_scale) if previous is not None else {}
    return target


def _absorb_into_weights(model: nn.Module, target: BranchScaling, current: Mapping[str, float]) -> None:
    """Multiply each branch's output weights (or a post-branch norm's gain) by β_current/β_target (updating
    target.weight_scale), so that the model computes the same function under the new multipliers. Every module
    is checked before any weight changes."""
    zero = [b for b, v in target.beta.items() if v == 0.0]
    if zero:
        raise ValueError(
            f"apply_branch_scaling: preserve_function=True needs β != 0 (1/β goes into the weights), got "
            f"β = 0 for {zero[:3]}. Use preserve_function=False to switch branches off."
        )
    off = [b for b, v in current.items() if v == 0.0 and b in target.beta]
    if off:
        raise ValueError(
            f"apply_branch_scaling: blocks {off[:3]} currently have β = 0; preserving that function "
            "would set their branch weights to 0. Use preserve_function=False to switch them back on."
        )
    named = dict(model.named_modules())
    rescale = []
    for block, rels in target.branches.items():
        ratio = current.get(block, 1.0) / target.beta[block]
        if ratio == 1.0:
            continue  # exactly nothing to do: keeps a repeated call bit-identical
        for rel in rels:
            rescale += [
                (p, c, ratio) for p, c in _absorbing_params(named[f"{block}.{rel}"], f"{block}.{rel}")
            ]
        target.weight_scale[block] = target.weight_scale.get(block, 1.0) * ratio
    with torch.no_grad():
        for param, offset, ratio in rescale:
            if offset == 0.0:
                param.mul_(ratio)
            else:  # a gain offset + weight: the gain is multiplied, computed in at least float32
                wide = param.to(torch.promote_types(param.dtype, torch.float32))
                param.copy_((wide + offset) * ratio - offset)


def _install(model: nn.Module, target: BranchScaling, hooked: list[tuple[nn.Module, int]]) -> None:
    """Replace the model's multiplier hooks by those of `target` and record it in the config."""
    for handle_owner, key in hooked:
        del handle_owner._forward_hooks[key]
    named = dict(model.named_modules())
    for block, rels in target.branches.items():
        for rel in rels:
            named[f"{block}.{rel}"].register_forward_hook(BranchMultiplier(target.beta[block], block, rel))
    holder = model.config if getattr(model, "config", None) is not None else model
    setattr(holder, RECORD_KEY, target.to_dict())


# ---------------------------------------------------------------------------------------------------------------
# Finding blocks and branches


def _stacks(model: nn.Module, blocks: BlocksArg) -> list[list[tuple[str, nn.Module]]]:
    """The chains of blocks: one for a decoder or encoder, two (encoder, decoder) for an encoder-decoder."""
    if blocks is not None:
        return [find_blocks(model, blocks, trace=False).blocks]
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        parts = [model.get_encoder(), model.get_decoder()]
        names = {id(m): n for n, m in model.named_modules()}
        if all(p is not model and id(p) in names for p in parts) and parts[0] is not parts[1]:
            stacks = []
            for part in parts:
                prefix = names[id(part)]
                stacks.append([(f"{prefix}.{n}", m) for n, m in find_blocks(part, trace=False).blocks])
            return stacks
    return [find_blocks(model, trace=False).blocks]  # trace=False: the block list suffices, no dry forward


def _check_family(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in POST_LN_FAMILIES or getattr(config, "do_layer_norm_before", True) is False:
        raise ValueError(
            f"apply_branch_scaling: {model_type!r} is a post-LN architecture: its blocks compute "
            "norm(h + branch(h)), so a branch multiplier β does not give h + β·branch(h) and β = 0 does not make "
            "a block the identity. Branch scaling is defined here for pre-LN residual blocks only (GPT-2, Llama, "
            "T5, ViT, ...)."
        )
    if getattr(config, "apply_residual_connection_post_layernorm", False):
        raise ValueError(
            f"apply_branch_scaling: {model_type!r} has apply_residual_connection_post_layernorm=True: the residual "
            "stream is the normed input, not h, so blocks are not h + branch(h)."
        )
    if model_type in ALTUP_FAMILIES:
        raise ValueError(
            f"apply_branch_scaling: {model_type!r} blocks (AltUp, LAuReL) mix several predictions of the stream with "
            "learned weights; they are not h + branch(h), so there is no branch multiplier with β = 0 giving the "
            "identity. Gemma 2 and Gemma 3 are supported."
        )
    return model_type


def _branch_outputs(block: nn.Module, model_type: str | None) -> list[str]:
    """Branch output modules of a block, relative to it: the post-branch norms of a sandwich-norm family, else
    modules named like an output projection, or modules holding fused expert weights (3-D parameters named like
    one); outermost matches only."""
    if model_type in SANDWICH_OUTPUT_MODULES:
        return list(SANDWICH_OUTPUT_MODULES[model_type])
    extra = FAMILY_OUTPUT_MODULES.get(model_type or "", ())
    found = []
    for rel, module in block.named_modules():
        if not rel:
            continue
        if any(n in _SANDWICH_NORM_NAMES for n in rel.split(".")):
            raise ValueError(
                f"apply_branch_scaling: the block has a post-branch norm {rel!r} (h + norm(branch(h))); a "
                "multiplier on the projection would be undone by it, so β goes on the norms that end the branches: "
                "pass them, e.g. branches=['post_attention_layernorm', 'post_feedforward_layernorm'] if those "
                "are the norms applied to the attention and MLP outputs."
            )
        own = dict(module.named_parameters(recurse=False))
        projection = (rel.rsplit(".", 1)[-1] in OUTPUT_NAMES or rel in extra) and "weight" in own
        experts = any(n in OUTPUT_NAMES and p.ndim == 3 for n, p in own.items())
        if projection or experts:
            found.append(rel)
    return [r for r in found if not any(r.startswith(o + ".") for o in found)]


def _layout(
    model: nn.Module,
    branches: Sequence[str] | Mapping[str, Sequence[str]] | None,
    blocks: BlocksArg,
    previous: BranchScaling | None,
) -> list[list[tuple[str, list[str]]]]:
    """Per stack, (block name, branch output modules) in chain order."""
    model_type = _check_family(model)
    if previous is not None and branches is None and blocks is None:
        stacks = _recorded_stacks(model, previous)
    else:
        stacks = _stacks(model, blocks)
    named = dict(model.named_modules())
    if isinstance(branches, str):
        raise TypeError("branches= takes a list of module names (or a dict by block), not a single string.")
    layout = []
    for stack in stacks:
        entries = []
        for name, block in stack:
            if previous is not None and branches is None and blocks is None:
                rels = list(previous.branches[name])
            elif branches is None:
                rels = _branch_outputs(block, model_type)
            elif isinstance(branches, Mapping):
                if name not in branches:
                    raise ValueError(f"apply_branch_scaling: branches= has no entry for block {name!r}.")
                rels = list(branches[name])
            else:
                rels = list(branches)
            if not rels:
                raise ValueError(
                    f"apply_branch_scaling: found no branch output module in block {name!r} "
                    f"({type(block).__name__}, model_type={model_type!r}). " + HOW_TO_PASS_BRANCHES
                )
            for rel in rels:
                if f"{name}.{rel}" not in named:
                    raise ValueError(f"apply_branch_scaling: block {name!r} has no submodule {rel!r}.")
            entries.append((name, rels))
        layout.append(entries)
    if branches is None and previous is None and model_type not in VERIFIED_FAMILIES:
        warnings.warn(
            f"apply_branch_scaling: model_type {model_type!r} is not among the verified families "
            f"({', '.join(sorted(VERIFIED_FAMILIES))}); using the generic rule, which found "
            f"{_summary({b: r for s in layout for b, r in s})}. Check that each block computes h + branch(h) "
            "with these as the branches' last modules (β = 0 must make every block the identity); otherwise "
            + HOW_TO_PASS_BRANCHES,
            stacklevel=3,
        )
    return layout


def _recorded_stacks(model: nn.Module, record: BranchScaling) -> list[list[tuple[str, nn.Module]]]:
    """The blocks of the record, grouped into stacks by their parent container (encoder / decoder)."""
    named = dict(model.named_modules())
    stacks: dict[str, list[tuple[str, nn.Module]]] = {}
    for block in record.branches:
        stacks.setdefault(block.rsplit(".", 1)[0] if "." in block else "", []).append((block, named[block]))
    return list(stacks.values())


def _rename_to_model(model: nn.Module, record: BranchScaling) -> BranchScaling:
    """Map recorded block names onto this model: a checkpoint saved from the model with a head can be loaded
    into the base model, or the reverse, which adds or drops the `base_model_prefix`."""
    named = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""

    def resolve(block: str) -> str:
        options = [block]
        if prefix:
            options += [block.removeprefix(prefix + "."), f"{prefix}.{block}"]
        for option in options:
            if option in named and all(f"{option}.{rel}" in named for rel in record.branches[block]):
                return option
        raise ValueError(
            f"{RECORD_KEY}: block {block!r} recorded in the config is not in this model "
            f"({type(model).__name__}). Was the config copied from another architecture?"
        )

    mapping = {b: resolve(b) for b in record.beta}
    return BranchScaling(
        beta={mapping[b]: v for b, v in record.beta.items()},
        branches={mapping[b]: v for b, v in record.branches.items()},
        weight_scale={mapping[b]: v for b, v in record.weight_scale.items()},
    )


# ---------------------------------------------------------------------------------------------------------------
# β values, weights, hooks


def _beta_function(beta: BetaSpec) -> Callable[[int, int], float]:
    if isinstance(beta, str):
        spec = beta.replace(" ", "").lower()
        if spec == "1/sqrt(l)":
            return lambda i, n: 1.0 / math.sqrt(n)
        if spec == "1/l":
            return lambda i, n: 1.0 / n
        raise ValueError(
            f"apply_branch_scaling: unknown beta {beta!r}; use '1/sqrt(L)', '1/L', a number, or a callable "
            "beta(layer_index, L) -> float."
        )
    if isinstance(beta, (int, float)) and not isinstance(beta, bool):
        return lambda i, n: float(beta)
    if callable(beta):
        return beta
    raise TypeError(
        f"apply_branch_scaling: beta must be a string, a number or a callable, got {type(beta).__name__}."
    )


def _betas(beta: BetaSpec, layout: list[list[tuple[str, list[str]]]]) -> dict[str, float]:
    fn = _beta_function(beta)
    values = {}
    for stack in layout:
        for index, (name, _) in enumerate(stack):
            value = float(fn(index, len(stack)))
            if not math.isfinite(value):
                raise ValueError(
                    f"apply_branch_scaling: beta for block {name!r} is {value}; it must be finite."
                )
            values[name] = value
    return values


def _absorbing_params(module: nn.Module, name: str) -> list[tuple[nn.Parameter, float]]:
    """The parameters of a branch output module in which its output is homogeneous of degree 1, each with the
    offset c such that the output scales with c + parameter: 1 for the weight of a norm with gain 1 + weight."""
    own = dict(module.named_parameters(recurse=False))
    linear_like = isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and own.get("weight") is not None and own["weight"].ndim == 2
    )
    if linear_like:
        params = [(p, 0.0) for p in (own.get("weight"), own.get("bias")) if p is not None]
    elif _is_norm(module):
        params = [(own["weight"], _gain_offset(module, name))]
        params += [(own["bias"], 0.0)] if own.get("bias") is not None else []
    else:
        names = [n for n, p in own.items() if n in OUTPUT_NAMES and p.ndim == 3]
        params = [(own[n], 0.0) for n in names] + [
            (own[f"{n}_bias"], 0.0) for n in names if f"{n}_bias" in own
        ]
        if any("Norm" in type(m).__name__ for m in module.modules()):
            params = []  # a norm after the experts' down projection (post_expert_norm) would undo 1/β
    if not params:
        raise ValueError(
            f"apply_branch_scaling: cannot put 1/β into the weights of {name!r} ({type(module).__name__}): "
            "preserve_function=True supports nn.Linear, Conv1D, norms with an elementwise gain (LayerNorm, "
            "RMSNorm) and fused-experts modules, whose output scales with their weights. Use "
            "preserve_function=False, or name a linear output projection."
        )
    return params


def _is_norm(module: nn.Module) -> bool:
    """A normalization with an elementwise gain `weight` (nn.LayerNorm, nn.RMSNorm, the families' RMSNorms)."""
    weight = getattr(module, "weight", None)
    return "Norm" in type(module).__name__ and isinstance(weight, nn.Parameter) and weight.ndim >= 1


def _gain_offset(norm: nn.Module, name: str) -> float:
    """c such that the norm's gain is c + weight: 0 (LayerNorm, Llama's RMSNorm) or 1 (Gemma's RMSNorm, whose
    weight starts at 0). The convention is in no attribute, so a float64 copy of the norm is evaluated: the right
    c is the one for which the weight (c + weight)·2 - c (and the bias doubled) doubles the output."""
    probe = copy.deepcopy(norm).to(torch.float64)
    probe._forward_hooks.clear()
    weight = probe.weight.detach().clone()
    x = torch.randn(4, *weight.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = {}
    with torch.no_grad():
        reference = probe(x.to(weight.device))
        if isinstance(getattr(probe, "bias", None), torch.Tensor):
            probe.bias.mul_(2.0)
        for offset in (0.0, 1.0):
            probe.weight.copy_((weight + offset) * 2.0 - offset)
            errors[offset] = float((probe(x.to(weight.device)) - 2.0 * reference).abs().max())
    offset = min(errors, key=errors.get)
    # 1e-4: the families' norms compute in float32 whatever the dtype of the model
    if not errors[offset] <= 1e-4 * float(reference.abs().max()):
        raise ValueError(
            f"apply_branch_scaling: cannot put 1/β into the gain of the norm {name!r} ({type(norm).__name__}): "
            "its output is proportional neither to weight nor to 1 + weight. Use preserve_function=False."
        )
    return offset


def _registered_multipliers(model: nn.Module) -> list[tuple[nn.Module, int]]:
    return [
        (module, key)
        for module in model.modules()
        for key, hook in module._forward_hooks.items()
        if isinstance(hook, BranchMultiplier)
    ]


def _summary(branches: Mapping[str, Sequence[str]]) -> str:
    names = sorted({rel for rels in branches.values() for rel in rels})
    return f"{len(branches)} blocks with branches {names}"
