"""FSCOptimizer inside the HF Trainer: how TrainingArguments map onto it, and where its loss comes from.

The Trainer builds an optimizer from `optimizer_cls_and_kwargs` inside `Trainer.create_optimizer` and calls
`optimizer.train()` at the start of every training step (the schedule-free hook), so FSCOptimizer finds the
Trainer that is calling it on the stack both times; nothing needs to be registered.

The mapping, when the Trainer builds FSCOptimizer (`FSCOptimizer.trainer_args` / `FSCOptimizerFactory`):
- `learning_rate` → FSC's `rate` (the scheduled rate, which the Trainer logs as `learning_rate`) when rate= is not
  given and learning_rate was set (not TrainingArguments' default 5e-5, an AdamW step size); else rate= or FSC's
  default. A set learning_rate that differs from an explicit rate= is ignored, with a warning.
- `adam_beta1/2` → the base's `betas`, `adam_epsilon` → `eps`, `weight_decay` → `weight_decay` on the parameters
  the Trainer decays (`Trainer.get_decay_parameter_names`: not biases, not norms) and 0 on the others; each only
  where the base takes that keyword and FSC was not given it (an explicit base keyword wins). A set value that the
  base cannot take or that an explicit keyword overrides is ignored, with a warning.
- `optim` / `optim_args` (the Trainer's own optimizer: FSC's base is `base=`) are ignored, with a warning when set;
  `max_grad_norm` > 0 clips the gradients before FSC measures them, with a warning (see below).

The loss: once attached, FSC's step loss is the loss the Trainer back-propagates, summed over the step's micro-batches
(the number the Trainer logs as `loss`), whatever computed it: the model's `.loss`, label smoothing,
`compute_loss_func`, or a subclass's `compute_loss`.
"""

from __future__ import annotations

import inspect
import sys
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

from hf_fsf.step_loss import StepLossTracker

_FRAMES = (
    8  # how far up the stack the Trainer's method is: create_optimizer / training_step call FSC directly or
)
# through one or two wrappers (FSCOptimizerFactory.__call__, accelerate's AcceleratedOptimizer.train)


def calling_trainer(method: str) -> Any | None:
    """The transformers.Trainer whose method `method` (e.g. "create_optimizer") is on the stack within a few frames,
    None otherwise (an optimizer built elsewhere during training, e.g. by a callback, is not the Trainer's)."""
    transformers = sys.modules.get("transformers")
    trainer_cls = getattr(transformers, "Trainer", None) if transformers is not None else None
    if trainer_cls is None:
        return None
    frame = sys._getframe(1)
    for _ in range(_FRAMES):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, trainer_cls):
            return owner if frame.f_code.co_name == method else None
        frame = frame.f_back
    return None


def _default(name: str) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments.__dataclass_fields__[name].default


def _is_set(args: Any, name: str) -> bool:
    return getattr(args, name) != _default(name)


def _accepts(base: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(base).parameters
    except (TypeError, ValueError):
        return False


def trainer_rate(args: Any, rate: float | None, default: float) -> float:
    """FSC's rate inside the Trainer: rate= if given, else a learning_rate that was set, else `default`."""
    if rate is None:
        return float(args.learning_rate) if _is_set(args, "learning_rate") else default
    if _is_set(args, "learning_rate") and args.learning_rate != rate:
        warnings.warn(
            f"FSCOptimizer: TrainingArguments.learning_rate={args.learning_rate:g} is ignored: FSC's rate={rate:g} "
            "(given as rate=) is the rate the Trainer schedules and logs as learning_rate. Drop one of them.",
            stacklevel=4,
        )
    return float(rate)


def trainer_base_settings(
    trainer: Any, model: nn.Module, base: Callable, base_kwargs: dict[str, Any]
) -> tuple[dict[str, Any], list[tuple[list, dict]] | None]:
    """(base keyword arguments, (params, options) of the Trainer's decay / no-decay split or None) for a base built
    inside `trainer`, with a warning for every set TrainingArguments value that is ignored."""
    args = trainer.args
    kwargs = dict(base_kwargs)
    ignored = []
    mapped = {
        "betas": (("adam_beta1", "adam_beta2"), (args.adam_beta1, args.adam_beta2)),
        "eps": (("adam_epsilon",), args.adam_epsilon),
    }
    for key, (fields, value) in mapped.items():
        set_fields = [f for f in fields if _is_set(args, f)]
        if key in kwargs:
            given = tuple(kwargs[key]) if key == "betas" else kwargs[key]
            ignored += set_fields if given != value else []
        elif _accepts(base, key):
            kwargs[key] = value
        else:
            ignored += set_fields
    options = None
    if _accepts(base, "weight_decay"):
        decay = float(kwargs.pop("weight_decay", args.weight_decay))
        if _is_set(args, "weight_decay") and decay != args.weight_decay:
            ignored.append("weight_decay")
        names = set(trainer.get_decay_parameter_names(model))
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        options = [
            ([p for n, p in params if n in names], {"weight_decay": decay}),
            ([p for n, p in params if n not in names], {"weight_decay": 0.0}),
        ]
    elif _is_set(args, "weight_decay"):
        ignored.append("weight_decay")
    if str(getattr(args.optim, "value", args.optim)) not in ("adamw_torch", "adamw_torch_fused"):
        ignored.append("optim")
    if args.optim_args is not None:
        ignored.append("optim_args")
    if ignored:
        values = ", ".join(f"{f}={getattr(args, f)!r}" for f in ignored)
        warnings.warn(
            f"FSCOptimizer: TrainingArguments {values} ignored: FSC's base is {getattr(base, '__name__', base)!r} "
            "with the keywords given to FSC (base=, and base keywords such as betas=, eps=, weight_decay=).",
            stacklevel=4,
        )
    if args.max_grad_norm and args.max_grad_norm > 0:
        warnings.warn(
            f"FSCOptimizer: max_grad_norm={args.max_grad_norm:g} clips the gradients before FSC measures each "
            "group's first-order loss decrease: a clipped step's realized decrease exceeds FSC's target by the "
            "clipping factor. Set max_grad_norm=0 (FSC's divergence guard backs off a too-high rate).",
            stacklevel=4,
        )
    return kwargs, options


def attach_loss_route(trainer: Any, tracker: StepLossTracker) -> None:
    """Feed `tracker` the loss `trainer` back-propagates (its accelerator's backward, wrapped once per tracker).

    The wrapper holds the tracker weakly: an optimizer that is gone leaves a pass-through behind.
    """
    accelerator = trainer.accelerator
    current = accelerator.backward
    if getattr(current, "fsc_tracker", None) is not None and current.fsc_tracker() is tracker:
        return
    original = getattr(current, "fsc_original", current)
    ref = weakref.ref(tracker)

    def backward(loss, **kwargs):
        observer = ref()
        if observer is not None:
            observer.observe_backward(loss, window=trainer.state.global_step)
        return original(loss, **kwargs)

    backward.fsc_tracker = ref
    backward.fsc_original = original
    accelerator.backward = backward


__all__ = ["attach_loss_route", "calling_trainer", "trainer_base_settings", "trainer_rate"]
