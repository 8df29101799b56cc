"""FSCOptimizer: balanced per-block step sizes on top of any torch optimizer (PAPER.md §6, rule C).

Every step the base optimizer takes its own step; FSC measures, per group of parameters (stem, each block, head),
the first-order loss decrease u_g of that step and rescales the group's update so that the groups decrease the
loss by prescribed amounts that add up to a target (`rate` × loss by default).

The step is written for accelerators, where a step is bound by how many kernels the host launches and how often it
waits for the device: work is batched per group (`torch._foreach_*`, one flattened reduction per group), the scales
are computed on the device for all groups at once, and the step reads the device once (the loss, whether every
gradient is finite, which decides whether the base may step at all, and the previous step's applied first-order
decrease, which the trust region compares with the loss change). The record of the step (`last_step`) stays
on the device until it is read.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn

from hf_fsf.fsc_trainer import attach_loss_route, calling_trainer, trainer_base_settings, trainer_rate
from hf_fsf.layout import HEAD, STEM, BlocksArg, find_blocks, unwrap_model
from hf_fsf.step_loss import LossCapture, StepLossTracker

BALANCES = ("blocks", "stages")
DEFAULT_RATE = 0.01
# balance="stages": the depth at which the stage shares are the paper's per-block shares (ends : trunk = 2 : n0).
# 1 measured best on recipes/transfer.py's quick depth sweeps (teacher ResNet; GPT-2 a tie) against 4.
DEFAULT_BASE_DEPTH = 1
# balance="stages": the steps over which the base's own split between stem and head is measured.
DEFAULT_CALIBRATION_STEPS = 20
# The default group of a parameter tied between input and readout (FSCOptimizer's tied_group).
TIED_GROUP = STEM

# Error feedback (ema_beta > 0): a group's target this step is its share plus what it fell short of before, between
# 0 and _CATCH_UP × its share; the shortfall carried over is bounded the same way (no wind-up).
_CATCH_UP = 3.0

# The divergence guard (trust region): the loss smoothed over ~10 steps against the lowest it has been. A rise
# beyond _RISE of that level and _NOISE_SIGMAS times the smoothed loss's own noise (healthy runs do not rise like
# that) halves the trust factor τ on every target (and more, in proportion to the rise, down to _MIN_SHRINK); each
# new lowest smoothed loss grows τ back by _GROWTH, up to 1.
# Before _SETTLE steps (no smoothed level yet) a loss up by _BLOWUP (a half) in one step backs off at once.
_LOSS_BETA = 0.9
_RISE = 0.1
_NOISE_SIGMAS = 4.0
_SHRINK = 0.5
_MIN_SHRINK = 0.05
_GROWTH = 1.05
_SETTLE = 5
_BLOWUP = 0.5


@dataclass
class GroupStep:
    """What FSCOptimizer did to one parameter group in one step."""

    unit_contribution: float  # u_g = −⟨∇_g loss, δw_g⟩ of the base optimizer's own step (scale 1)
    smoothed_unit: float | None  # the (EMA) estimate of u_g the scale was computed from; None when inactive
    target: float  # the rule's first-order loss decrease for this group: share × the step's target
    scale: float  # s_g: the applied update is s_g × the base update
    contribution: float  # s_g × u_g: the first-order loss decrease actually applied
    active: bool  # False: zero/non-descent base update, excluded from the count, not moved (scale 0)
    clipped: bool  # True when max_scale bounded the scale
    share: (
        float  # the group's fraction of the step's target (the balance rule; the active groups' add up to 1)
    )


# The rows of FSCStepRecord's device tensor, in GroupStep's field order.
_ROWS = ("unit", "smoothed", "target", "scale", "contribution", "active", "clipped", "share")


@dataclass(eq=False)  # compared by identity: the values are a tensor
class FSCStepRecord:
    """One FSCOptimizer step: the loss it targeted, and per group the scale it chose. `skipped` names why not.

    The per-group numbers stay on the device (one float64 tensor, a row per GroupStep field) until `groups` or
    `target` is first read, so that recording a step costs no host sync; the first read costs one.
    """

    step: int
    loss: float | None
    skipped: str | None = None
    trust: float = 1.0  # the trust region's factor on every target this step (1: the full rate)
    names: list[str] = field(default_factory=list, repr=False)
    values: torch.Tensor | None = field(default=None, repr=False)  # (len(_ROWS), len(names)), float64
    _groups: dict[str, GroupStep] | None = field(default=None, repr=False)

    def read_from(self, flat: list[float]) -> None:
        """Fill the groups from `values` already on the host (flattened in row order), e.g. read by the probe in
        its own transfer, so that reading them costs no second host sync."""
        n = len(self.names)
        self._fill([flat[i * n : (i + 1) * n] for i in range(len(_ROWS))])

    @property
    def groups(self) -> dict[str, GroupStep]:
        """{group name: GroupStep} ({} for a skipped step)."""
        if self._groups is None:
            self._fill(self.values.tolist() if self.values is not None else None)
        return self._groups

    def _fill(self, table: list[list[float]] | None) -> None:
        """The groups from the rows of `values` (None: a skipped step, no groups)."""
        self._groups = {}
        if table is None:
            return
        rows = dict(zip(_ROWS, table))
        for i, name in enumerate(self.names):
            active = rows["active"][i] > 0
            self._groups[name] = GroupStep(
                rows["unit"][i],
                rows["smoothed"][i] if active else None,
                rows["target"][i],
                rows["scale"][i],
                rows["contribution"][i],
                active,
                rows["clipped"][i] > 0,
                rows["share"][i],
            )

    @property
    def target(self) -> float:
        """The total first-order loss decrease aimed at (the sum of the group targets)."""
        return sum(g.target for g in self.groups.values())


@dataclass
class _Segment:
    """The parameters of one group that have a gradient and share a device and dtype: one flat buffer's worth."""

    group: int
    params: list[torch.Tensor]
    grads: list[torch.Tensor]


def _split_options(params: Iterable) -> list[tuple[list, dict]]:
    """Incoming params (tensors or param-group dicts, e.g. the Trainer's decay / no-decay split) as (params, options)."""
    items = list(params)
    if items and isinstance(items[0], Mapping):
        return [(list(g["params"]), {k: v for k, v in g.items() if k != "params"}) for g in items]
    return [(items, {})]


def _model_and_options(
    model_or_params: nn.Module | Iterable, model: nn.Module | None
) -> tuple[nn.Module, list[tuple[list, dict]] | None]:
    """The model FSC groups by, and the caller's (params, options) when parameters were passed."""
    if isinstance(model_or_params, nn.Module):
        if model is not None and model is not model_or_params:
            raise ValueError("FSCOptimizer: got two different models (positional and model=); pass one.")
        return unwrap_model(model_or_params), None
    if model is None:
        raise TypeError(
            "FSCOptimizer needs the model to find its blocks, but got parameters only. Pass the model: "
            "FSCOptimizer(model, ...), or with the HF Trainer optimizers=(FSCOptimizer(model, ...), None) or "
            "optimizer_cls_and_kwargs=FSCOptimizer.trainer_args(model, ...) or (FSCOptimizerFactory, {...})."
        )
    return unwrap_model(model), _split_options(model_or_params)


def _check_settings(
    rate: float | None,
    target: str,
    balance: str,
    base_depth: int | None,
    ema_beta: float,
    max_scale: float | None,
    warmup_steps: int,
    base_kwargs: Mapping[str, Any],
) -> None:
    if rate is not None and (not math.isfinite(rate) or rate < 0):
        raise ValueError(f"FSCOptimizer: rate must be a finite number >= 0, got {rate}.")
    if target not in ("loss", "absolute"):
        raise ValueError(f"FSCOptimizer: target must be 'loss' or 'absolute', got {target!r}.")
    if balance not in BALANCES:
        raise ValueError(f"FSCOptimizer: balance must be one of {BALANCES}, got {balance!r}.")
    if base_depth is not None:
        if balance != "stages":
            raise ValueError(
                "FSCOptimizer: base_depth sets the stage shares of balance='stages'; balance='blocks' gives every "
                "group the same share at any depth. Drop base_depth or use balance='stages'."
            )
        if isinstance(base_depth, bool) or not isinstance(base_depth, int) or base_depth < 1:
            raise ValueError(
                f"FSCOptimizer: base_depth must be an integer >= 1 (a number of blocks), got {base_depth!r}."
            )
    if not 0.0 <= ema_beta < 1.0:
        raise ValueError(f"FSCOptimizer: ema_beta must be in [0, 1) (0 = no smoothing), got {ema_beta}.")
    if max_scale is not None and not max_scale > 0:
        raise ValueError(f"FSCOptimizer: max_scale must be > 0 or None (no bound), got {max_scale}.")
    if warmup_steps < 0:
        raise ValueError(f"FSCOptimizer: warmup_steps must be >= 0 (0 = off), got {warmup_steps}.")
    if base_kwargs.get("maximize"):
        raise ValueError(
            "FSCOptimizer: maximize=True is not supported; minimize the negated objective instead."
        )


def _fsc_groups(
    model: nn.Module, blocks: BlocksArg, options: list[tuple[list, dict]] | None, tied_group: str = STEM
) -> list[tuple[str, list[nn.Parameter]]]:
    """[(group name, trainable parameters)] in chain order, tied parameters in `tied_group`, empty groups dropped.

    With `options` (parameters handed over by the caller) only those parameters are kept.
    """
    wanted = None if options is None else {id(p) for ps, _ in options for p in ps}
    layout = find_blocks(model, blocks)
    by_name = layout.parameter_groups(tied="stem" if tied_group == STEM else "own")
    tied = [p for name in list(by_name) if name.startswith("tied:") for p in by_name.pop(name)]
    by_name[HEAD] = by_name.pop(HEAD) + tied  # tied_group="head": the readout weight, also read by the stem
    groups = []
    for name, params in by_name.items():
        kept = [p for p in params if p.requires_grad and (wanted is None or id(p) in wanted)]
        if kept:
            groups.append((name, kept))
    if not groups:
        raise ValueError("FSCOptimizer: the model has no trainable parameter (all have requires_grad=False).")
    return groups


def _base_param_groups(
    groups: list[tuple[str, list[nn.Parameter]]], options: list[tuple[list, dict]] | None
) -> list[dict[str, Any]]:
    """The base's param groups: one per (FSC group × caller's option group), so per-group options survive."""
    option_of = {id(p): i for i, (ps, _) in enumerate(options or []) for p in ps}
    base_groups = []
    for _, params in groups:
        by_option: dict[int, list] = {}
        for p in params:
            by_option.setdefault(option_of.get(id(p), -1), []).append(p)
        for i, sub in by_option.items():
            base_groups.append({"params": sub, **(options[i][1] if i >= 0 else {})})
    return base_groups


def _zero_readout(model: nn.Module, head: list[nn.Parameter]) -> None:
    """zero_init_head: the readout's weight to 0, refused when it is not a head parameter or is tied."""
    from hf_fsf.output_scale import find_readout  # output_scale builds on this module

    name, readout = find_readout(model)
    weight = getattr(readout, "weight", None)
    if weight is not None and any(weight is t.param for t in find_blocks(model).tied):
        raise ValueError(
            f"FSCOptimizer: zero_init_head would zero {name!r}.weight, which is tied to the input embedding (the "
            "input would be 0 too). Untie the embeddings (tie_word_embeddings=False) or drop zero_init_head."
        )
    if not isinstance(weight, nn.Parameter) or all(weight is not p for p in head):
        raise ValueError(
            f"FSCOptimizer: zero_init_head needs a trainable readout weight in the head group; {name!r} has none."
        )
    with torch.no_grad():
        weight.zero_()


@dataclass
class _TrustRegion:
    """The divergence guard: the trust factor τ on every target, from the losses of the steps (host-side: it sees
    each step's loss when the step reads it, the step's one host sync, and sets τ before the step is taken)."""

    factor: float = 1.0
    mean: float = 0.0  # EMA of the loss (_LOSS_BETA), not bias-corrected
    count: int = 0  # losses in `mean`
    best: float | None = None  # the lowest smoothed loss since the last back-off
    # The variance of one loss value, from second differences of the loss (which a steady trend does not inflate:
    # var(L_k − 2 L_{k-1} + L_{k-2}) = 6σ² for independent noise), a running mean over ~20.
    noise: float = 0.0
    seen: int = 0
    previous_loss: float | None = None
    previous_change: float | None = None
    warned: bool = False

    def observe(self, loss: float) -> float | None:
        """One step's loss; returns the shrink factor when the guard backs off (None otherwise)."""
        previous, self.previous_loss = self.previous_loss, loss
        change = None if previous is None else loss - previous
        if change is not None and self.previous_change is not None:
            self.seen += 1
            self.noise += ((change - self.previous_change) ** 2 / 6.0 - self.noise) / min(self.seen, 20)
        self.previous_change = change
        self.count += 1
        self.mean = _LOSS_BETA * self.mean + (1.0 - _LOSS_BETA) * loss
        if self.count < _SETTLE:
            if change is not None and change > _BLOWUP * abs(previous):
                return self._shrink(abs(previous) / abs(loss))
            return None
        smoothed = self.mean / (1.0 - _LOSS_BETA**self.count)
        if self.best is None or smoothed <= self.best:
            self.best = smoothed
            self.factor = min(1.0, self.factor * _GROWTH)
            return None
        noise = math.sqrt(self.noise * (1.0 - _LOSS_BETA) / (1.0 + _LOSS_BETA))  # std of the smoothed loss
        if smoothed > self.best + _RISE * abs(self.best) + _NOISE_SIGMAS * noise:
            shrink = self._shrink(abs(self.best) / abs(smoothed))
            self.best = smoothed  # the next back-off needs a further rise
            return shrink
        return None

    def _shrink(self, fallen: float) -> float:
        """Halve τ, and more the further the loss rose (`fallen`: the loss it came from / the loss now)."""
        shrink = max(_MIN_SHRINK, _SHRINK * fallen)
        self.factor *= shrink
        return shrink


class FSCOptimizer(torch.optim.Optimizer):
    """Balanced per-block step sizes on top of any torch optimizer (PAPER.md §6, rule C).

    Each step: the base optimizer takes its own step; for every group g (stem, each block, head) FSC measures the
    applied update δw_g and its first-order loss decrease u_g = −⟨∇_g loss, δw_g⟩, then moves the group to
    w_before + s_g·δw_g with s_g = t_g / û_g (û_g: u_g, or its smoothed estimate), so that each group decreases the
    loss by its target t_g to first order. The targets add up to the step's target T = τ · lr · loss
    (target="loss"; τ · lr for target="absolute"; lr is `rate`, scaled by LR schedulers; τ ≤ 1 the trust factor).

    The rule (what the defaults do):
      - Shares, balance="stages" (default): the ends (stem and head together) and the trunk (all blocks) get
        2 : n₀ of T, n₀ = `base_depth` (default 1), i.e. the paper's per-block shares at depth n₀, held fixed at
        every depth; the trunk's share is split equally over its blocks. The ends' share is split equally for the
        first `calibration_steps` (20) steps, then as the base optimizer's own steps split their first-order
        decrease between stem and head over those steps (a head that is only a final norm, as in tied-embedding
        LMs, cannot carry half of it; calibration_steps=0 keeps 1 : n₀ : 1). balance="blocks" (the paper's rule C,
        Eq. 8): every group gets T/n for n groups, so the stem and head get 1/(n+2) of T at n blocks. A group
        without a descent step (u_g ≤ 0) is inactive: not moved (scale 0). A group without gradient (u_g = 0)
        gives its share to the others (within the trunk to its other blocks; a stage with no active group drops
        out); so does a group with u_g < 0 when ema_beta = 0, while with ema_beta > 0 it owes its share (below).
      - Smoothing (ema_beta > 0, default 0.9): s_g = t_g / EMA(u_g), the bias-corrected EMA of the group's u_g,
        so a batch whose u_g is small by chance gets no huge step. Error feedback: t_g is the group's share plus
        what it owes, within 0 ≤ t_g ≤ 3·share_g·T; a group owes its share of what the step applied in total (at
        most of T) minus what it applied, so the EMA's lag and a step's noisy u_g cannot move the split for long,
        while a step whose decrease collapses for every group together owes nothing (measured: every 20-step
        window within 1.2× of the shares). A group with u_g < 0 is not moved and owes its share. ema_beta = 0:
        t_g = share_g·T, s_g = t_g / u_g, exact at every step (measured to train worse: a noisy u_g sets the step).
      - Divergence guard (trust_region=True, the default): the loss smoothed over ~10 steps is compared with the
        lowest it has been. When it rose by more than 10 % of that and 4× its own noise (mini-batch noise and a
        plateau do not trip it), τ halves, times lowest/now (a loss twice as high: τ × 0.25; at least × 0.05); each
        new lowest smoothed loss grows it back by 5 %. In the first steps,
        before there is a smoothed level, a loss up by half in one step shrinks τ the same way at once. A warning says when it
        first backs off; `last_step.trust` is τ.
      - Tied parameters (tied embeddings: the input embedding is also the LM head's weight) are in the stem group
        (tied_group="stem", the default) or the head group ("head": the head stage is then the readout path, the
        stem what only the input reads, e.g. position embeddings). Measured on the demo's GPT-2 (held-out
        nats/byte at 300 steps): stem 2.466, head 2.610 at rate 0.03 (the position embeddings alone then carry
        the stem's share).

    Why measure instead of computing the direction in closed form: the measured δw is, by definition, what the base
    would do with its current state (momentum, Adam moments, Adafactor factors, weight decay, clipping inside the
    optimizer), so any base works without being re-implemented. The base state is never touched by the rescale:
    moments are functions of the gradients, not of the step taken, so they stay exactly what the base computed.
    Bases whose state stores parameter values (schedule-free, lookahead, SWA) are not supported. Cost: a copy of
    every parameter that has a gradient, held during step() only (+1× trainable parameter memory at peak), a
    flattened copy of one group's gradients at a time, and a few batched operations per group.

    Arguments:
      model_or_params: the model (usual), or parameters / parameter groups together with `model=` (the groups'
        options, e.g. weight_decay, are passed on to the base; FSC's grouping still comes from the model).
      base: an optimizer class or any callable(param_groups, **base_kwargs) -> Optimizer. Its own lr sets the
        reference step that `max_scale` bounds; the direction does not depend on it for the usual bases.
      rate: FSC's learning rate (default 0.01), stored as every group's "lr" (so LR schedulers scale it): the
        target first-order loss decrease per step is lr × loss (target="loss") or lr (target="absolute").
      blocks: as for `hf_fsf.find_blocks`: None (auto-detect), block names or modules, or a BlockLayout (find the
        layout once and pass it to every consumer).
      balance, base_depth, calibration_steps: the shares, above. base_depth only with balance="stages" (None: 1).
      ema_beta: smoothing of u_g across steps, above (0 = off: exact balance at every step; the EMA is
        bias-corrected). Exact per-step balance divides by a noisy u_g (mini-batches, Adam's early steps), so a
        batch whose u_g happens to be small gets a very large step.
      max_scale: bound on s_g, i.e. on the FSC step relative to the base optimizer's own step (None = off, the
        default, since its meaning depends on the base lr). A bounded group is flagged `clipped` and contributes
        less than its target (the shortfall is not moved to other groups, nor carried over).
      warmup_steps: the target ramps linearly from 1/warmup_steps to 1 over the first steps (0 = off, the
        default; an LR scheduler with warm-up does the same through lr).
      trust_region: the divergence guard above (it reads the step's loss: with target="absolute" only when a
        loss is passed or captured). False: no guard.
      tied_group: "stem" or "head", where a parameter tied between input and readout goes (above).
      zero_init_head: zero the readout weight at construction (the paper's App. B variant: the network's output is
        0 at init). Until the readout moves, nothing upstream has a gradient, so on the first step only the head is
        active: it gets its own share of T through its base step (s_head = t_head/u_head), not the whole of T.
        Refused for a readout tied to the input embedding (zeroing it would zero the input).
      capture_loss: register a forward hook on the model that records `output.loss` of training forwards (HF
        models), so that step() needs no argument in a plain loop; the hook goes when the optimizer is closed or
        garbage-collected.

    Where the loss comes from, first available wins: step(closure) → step(loss=...) → the losses seen since the
    last step (the HF Trainer's back-propagated loss, or else the forward hook or observe_loss) → the previous
    step's loss (with a warning). See hf_fsf.step_loss.

    Inside the HF Trainer (`trainer_args`, `FSCOptimizerFactory`): TrainingArguments map onto FSC as
    hf_fsf.fsc_trainer says (learning_rate → rate, the scheduled rate that the Trainer logs as `learning_rate`;
    adam_beta1/2, adam_epsilon, weight_decay → the base, with the Trainer's no-decay parameters), and the step's
    loss is the one the Trainer back-propagates (label smoothing and compute_loss_func included).

    A step whose loss or gradients are not finite is skipped with a warning: no parameter and no base or FSC state
    changes. Frozen parameters (requires_grad=False) are in no group.
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable,
        base: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
        rate: float | None = None,
        *,
        model: nn.Module | None = None,
        blocks: BlocksArg = None,
        target: Literal["loss", "absolute"] = "loss",
        balance: Literal["blocks", "stages"] = "stages",
        base_depth: int | None = None,
        ema_beta: float = 0.9,
        max_scale: float | None = None,
        warmup_steps: int = 0,
        trust_region: bool = True,
        tied_group: Literal["stem", "head"] = TIED_GROUP,
        calibration_steps: int = DEFAULT_CALIBRATION_STEPS,
        zero_init_head: bool = False,
        capture_loss: bool = True,
        **base_kwargs: Any,
    ) -> None:
        _check_settings(rate, target, balance, base_depth, ema_beta, max_scale, warmup_steps, base_kwargs)
        if tied_group not in (STEM, HEAD):  # before the model is searched: a typo fails at once
            raise ValueError(f"FSCOptimizer: tied_group must be {STEM!r} or {HEAD!r}, got {tied_group!r}.")
        if (
            isinstance(calibration_steps, bool)
            or not isinstance(calibration_steps, int)
            or calibration_steps < 0
        ):
            raise ValueError(
                f"FSCOptimizer: calibration_steps must be an integer >= 0 (0: stem and head get equal shares), "
                f"got {calibration_steps!r}."
            )
        model, options = _model_and_options(model_or_params, model)
        trainer = calling_trainer(
            "create_optimizer"
        )  # built by the HF Trainer: TrainingArguments fill in what is not given
        if trainer is not None and options is None:
            rate = trainer_rate(trainer.args, rate, DEFAULT_RATE)
            base_kwargs, options = trainer_base_settings(trainer, model, base, base_kwargs)
        groups = _fsc_groups(model, blocks, options, tied_group)
        self.target_mode = target
        self.balance = balance
        self.base_depth = (base_depth or DEFAULT_BASE_DEPTH) if balance == "stages" else None
        self.ema_beta = float(ema_beta)
        self.max_scale = None if max_scale is None else float(max_scale)
        self.warmup_steps = int(warmup_steps)
        self.trust_region = bool(trust_region)
        self.calibration_steps = calibration_steps if balance == "stages" else 0
        self.zero_init_head = bool(zero_init_head)
        self.group_names = [n for n, _ in groups]
        if zero_init_head:
            _zero_readout(model, [p for n, ps in groups if n == HEAD for p in ps])
        self._building = True
        super().__init__(
            [{"params": ps, "name": n} for n, ps in groups],
            {"lr": float(DEFAULT_RATE if rate is None else rate)},
        )
        self._building = False

        self.base = base(_base_param_groups(groups, options), **base_kwargs)
        if not isinstance(self.base, torch.optim.Optimizer):
            raise TypeError(
                f"FSCOptimizer: base must build a torch.optim.Optimizer, got {type(self.base).__name__}."
            )
        self.fsc_state: dict[str, Any] = {"step": 0, "skipped": 0, "last_loss": None}
        # Per group: the EMA of u_g and how many steps it averages (a row each), and the shortfall carried over,
        # float64 on the device.
        self._ema: torch.Tensor | None = None
        self._debt: torch.Tensor | None = None
        self._stages: tuple[torch.Tensor, torch.Tensor] | None = None  # (stage x group one-hot, stage shares)
        # balance="stages": the stem's and the head's u (base steps, scale 1) summed over the calibration steps.
        self._ends: torch.Tensor | None = None
        self.trust = _TrustRegion()
        self.last_step: FSCStepRecord | None = None
        self.loss_tracker = StepLossTracker()
        self._warned_stale = False
        capture = LossCapture(self.loss_tracker, model)
        self._hook = model.register_forward_hook(capture, with_kwargs=True) if capture_loss else None
        # A dropped optimizer takes its hook with it (close() does it at once).
        self._hook_finalizer = weakref.finalize(self, self._hook.remove) if self._hook is not None else None

    # -- Trainer integration ---------------------------------------------------------------------------------

    @classmethod
    def trainer_args(cls, model: nn.Module, **kwargs: Any) -> tuple[type[FSCOptimizer], dict[str, Any]]:
        """`optimizer_cls_and_kwargs` for transformers.Trainer, with the model bound.

        The Trainer pops "model" from the kwargs and calls FSCOptimizer(model, **rest) (the path it has for
        optimizers that need the model), so this works in every Trainer version that has optimizer_cls_and_kwargs.
        TrainingArguments fill in the settings not given here (see the class docstring and hf_fsf.fsc_trainer).
        """
        return cls, {"model": model, **kwargs}

    def train(self) -> None:
        """Called by the HF Trainer at the start of every training step (its hook for schedule-free optimizers):
        from then on this step's loss is the one the Trainer back-propagates. Outside a Trainer: nothing."""
        trainer = calling_trainer("training_step")
        if trainer is not None:
            attach_loss_route(trainer, self.loss_tracker)

    # -- the loss ----------------------------------------------------------------------------------------------

    def observe_loss(self, loss: torch.Tensor | float, share: bool = False) -> None:
        """Record the loss of a forward pass that feeds the next step (call once per micro-batch).

        share=False: the step's loss is the mean of the recorded ones; share=True: their sum (each is a share of
        the step's mean, as when HF models get num_items_in_batch).
        """
        self.loss_tracker.observe(loss, share)

    def _step_loss(self, loss: torch.Tensor | float | None) -> torch.Tensor | float | None:
        """This step's loss: a device tensor when new, the previous step's float when none is (with a warning)."""
        value = self.loss_tracker.take(loss)
        if value is not None or self.target_mode == "absolute":
            return value
        if self.fsc_state["last_loss"] is None:
            raise RuntimeError(
                "FSCOptimizer: the target is rate x loss but no loss is known. Pass step(loss=loss) or "
                "step(closure), call optimizer.observe_loss(loss) after each forward, return `.loss` from the "
                "model's forward (HF models do), or use target='absolute'."
            )
        if not self._warned_stale:
            warnings.warn(
                "FSCOptimizer: no new loss since the last step, reusing the previous one. Pass step(loss=loss) "
                "or step(closure), or call optimizer.observe_loss(loss).",
                stacklevel=4,
            )
            self._warned_stale = True
        return self.fsc_state["last_loss"]

    # -- the step ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(
        self, closure: Callable[[], Any] | None = None, *, loss: torch.Tensor | float | None = None
    ) -> Any:
        """One FSC step. closure: re-evaluates the model and returns the loss (torch convention); loss: this
        step's loss if known. Returns the closure's loss."""
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
            loss = closure_loss
        step_loss = self._step_loss(loss)
        segments = self._segments()
        loss_value, finite = self._read_step_inputs(step_loss, segments)
        if self.target_mode == "loss" and loss_value is not None and loss_value < 0:
            raise ValueError(
                f"FSCOptimizer: loss {loss_value} < 0, so rate x loss is not a loss decrease. Use target='absolute'."
            )
        if loss_value is not None and not math.isfinite(loss_value):
            self._skip(loss_value, f"the loss is {loss_value}")
        elif not segments:
            self._skip(loss_value, "no parameter has a gradient (call loss.backward() before step())")
        elif not finite:
            bad = {
                self.group_names[s.group] for s in segments if not all(g.isfinite().all() for g in s.grads)
            }
            self._skip(loss_value, f"non-finite gradients in {sorted(bad)}")
        else:
            if self.trust_region and isinstance(step_loss, torch.Tensor):  # a fresh loss, not a reused one
                self._back_off(self.trust.observe(loss_value), loss_value)
            self._rescaled_base_step(segments, loss_value)
        return closure_loss

    def _back_off(self, shrink: float | None, loss: float) -> None:
        if shrink is None or self.trust.warned:
            return
        self.trust.warned = True
        warnings.warn(
            f"FSCOptimizer: backing off (trust factor x{shrink:.2f}, now {self.trust.factor:.3g}) at step "
            f"{self.fsc_state['step'] + 1}: the loss ({loss:.4g}) rose well above the lowest it had been, beyond its "
            "noise. The rate is too high for this model and base; FSC keeps halving its targets on every such "
            "rise and growing them back as the loss falls (last_step.trust). Warned once; a lower rate= avoids it.",
            stacklevel=3,
        )

    def _segments(self) -> list[_Segment]:
        """The parameters that have a gradient, by group and then by (device, dtype)."""
        segments = []
        for gi, group in enumerate(self.param_groups):
            by_kind: dict[tuple, _Segment] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise NotImplementedError(
                        "FSCOptimizer: sparse gradients are not supported (use a dense embedding)."
                    )
                segment = by_kind.setdefault((p.device, p.dtype), _Segment(gi, [], []))
                segment.params.append(p)
                segment.grads.append(p.grad)
            segments += by_kind.values()
        return segments

    def _read_step_inputs(
        self, loss: torch.Tensor | float | None, segments: list[_Segment]
    ) -> tuple[float | None, bool]:
        """The step's loss and whether every gradient is finite, read from the device together: the step's one
        host sync (the base must not step on non-finite gradients, so this is read before it steps)."""
        parts = []
        if segments:
            grads = [g for s in segments for g in s.grads]
            # max |g| per tensor is non-finite exactly when the tensor has an inf or a nan, and cannot overflow.
            maxima = torch._foreach_norm(grads, math.inf)
            # One dtype and device to stack them: no copy at all when the gradients agree (the usual case).
            widest = functools.reduce(torch.promote_types, {m.dtype for m in maxima})
            maxima = [m.to(grads[0].device, widest) for m in maxima]
            parts.append(torch.stack(maxima).isfinite().all().to(torch.float64))
        if isinstance(loss, torch.Tensor):
            parts.append(loss.to(parts[0].device if parts else loss.device, torch.float64))
        values = torch.stack(parts).tolist() if parts else []
        finite = bool(values[0]) if segments else True
        loss_value = values[1 if segments else 0] if isinstance(loss, torch.Tensor) else loss
        return loss_value, finite

    def _skip(self, loss: float | None, reason: str) -> None:
        warnings.warn(
            f"FSCOptimizer: step skipped, {reason}. Parameters and optimizer state unchanged.", stacklevel=3
        )
        self.fsc_state["skipped"] += 1
        self.last_step = FSCStepRecord(self.fsc_state["step"], loss, skipped=reason)

    def _rescaled_base_step(self, segments: list[_Segment], loss_value: float | None) -> None:
        """The base's step, then every group moved to w_before + s_g·δw_g."""
        self.fsc_state["step"] += 1
        self.fsc_state["last_loss"] = loss_value
        flats, views = self._copy_parameters(segments)
        self.base.step()
        params = [p for s in segments for p in s.params]
        # views := w_before − w_base = −δw, in place: from here on w_before is w_base + views.
        torch._foreach_sub_(views, params)
        unit = self._unit_contributions(segments, flats)
        keep = 1.0 - self._scales(unit, loss_value)
        # w = w_base + (1 − s)(w_before − w_base) = w_before + s·δw, group by group through the flat buffers.
        for segment, flat in zip(segments, flats):
            flat.mul_(keep[segment.group].to(flat.device))
        torch._foreach_add_(params, views)

    @staticmethod
    def _copy_parameters(segments: list[_Segment]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """w_before: one flat buffer per segment, and its views shaped like the parameters (one batched copy)."""
        flats, views = [], []
        for segment in segments:
            sizes = [p.numel() for p in segment.params]
            first = segment.params[0]
            flat = torch.empty(sum(sizes), dtype=first.dtype, device=first.device)
            flats.append(flat)
            views += [v.view_as(p) for v, p in zip(flat.split(sizes), segment.params)]
        torch._foreach_copy_(views, [p for s in segments for p in s.params])
        return flats, views

    def _unit_contributions(self, segments: list[_Segment], minus_deltas: list[torch.Tensor]) -> torch.Tensor:
        """u_g = −⟨g, δw⟩ per group (0 for a group without gradients): float64, on the first segment's device.

        Per segment one flattened copy of the gradients, multiplied in place by −δw and summed: the products are
        exact in float32 for lower-precision parameters and the sum is accumulated in float32 at least (float64
        for float64 parameters); the group's segments add up in float64.
        """
        dots = []
        for segment, minus_delta in zip(segments, minus_deltas):
            products = torch.cat([g.reshape(-1) for g in segment.grads])
            if products.dtype not in (torch.float32, torch.float64):
                products = products.float()
            dots.append(products.mul_(minus_delta).sum())
        device = dots[0].device
        if len({(d.dtype, d.device) for d in dots}) == 1:
            dots = list(torch.stack(dots).to(torch.float64).unbind())  # one cast for all segments
        else:
            dots = [d.to(device, torch.float64) for d in dots]
        sums: dict[int, torch.Tensor] = {}
        for segment, dot in zip(segments, dots):
            sums[segment.group] = sums[segment.group] + dot if segment.group in sums else dot
        missing = [gi for gi in range(len(self.param_groups)) if gi not in sums]
        if missing:
            sums.update(dict.fromkeys(missing, torch.zeros((), dtype=torch.float64, device=device)))
        return torch.stack([sums[gi] for gi in range(len(self.param_groups))])

    def _scales(self, unit: torch.Tensor, loss_value: float | None) -> torch.Tensor:
        """s_g for every group (0 for inactive groups), on the device; records the step in `last_step`."""
        active = unit.isfinite() & (unit > 0)
        smoothed = self._smooth(unit, active)
        k = self.fsc_state["step"]
        warm = min(1.0, k / self.warmup_steps) if self.warmup_steps else 1.0
        total = (loss_value if self.target_mode == "loss" else 1.0) * warm * self.trust.factor
        lrs = [group["lr"] * total for group in self.param_groups]
        if len(set(lrs)) == 1:
            budget = lrs[0]  # the usual case: no per-group lr, no copy to the device
        else:
            budget = torch.tensor(lrs, dtype=torch.float64).to(unit.device, non_blocking=True)
        feedback = self.ema_beta > 0.0
        # With error feedback, a group whose base step is not a descent step (u_g < 0) keeps its share and owes
        # it (it catches up later); a group without gradient (u_g = 0) gives its share to the others.
        counted = active | (unit.isfinite() & (unit < 0)) if feedback else active
        self._calibrate(unit, active, k)
        # zero_init_head: the first step moves only the head, by its own share (upstream has no gradient yet).
        fraction = self._fractions(counted, renormalize=not (self.zero_init_head and k == 1))
        share = fraction * budget
        if feedback:
            # Error feedback: the target is the share plus what the group fell short of before (the EMA lags a
            # u_g that trends, and a step's u_g is noisy), so that every few steps' contributions keep the shares.
            if self._debt is None:
                self._debt = torch.zeros(len(self.param_groups), dtype=torch.float64, device=unit.device)
            debt = self._debt.to(unit.device)
            target = torch.minimum((share + debt).clamp(min=0.0), _CATCH_UP * share)
        else:
            target = share
        # Divided by the smoothed u_g, not this step's: a batch whose u_g is small by chance gets no huge step.
        scale = torch.where(active, target / smoothed, 0.0)
        clipped = (
            active & (scale > self.max_scale) if self.max_scale is not None else torch.zeros_like(active)
        )
        if self.max_scale is not None:
            scale = torch.where(clipped, self.max_scale, scale)
        contribution = torch.where(active, scale * unit, 0.0)
        if feedback:
            # A group owes its share of what the step applied in total, up to its share of the target: when every
            # group's u_g falls short together (the step's loss decrease collapses, e.g. near a sharp valley), the
            # balance is kept and nothing is owed; what is owed is the imbalance.
            achieved = torch.minimum(contribution.sum(), torch.where(counted, share, 0.0).sum())
            carried = torch.minimum(
                (debt + fraction * achieved - contribution).clamp(min=-share), (_CATCH_UP - 1.0) * share
            )
            self._debt = torch.where(counted & ~clipped, carried, debt)
        # Recorded: the rule's targets; with error feedback the applied contributions also make up shortfalls.
        rows = [unit, smoothed, share, scale, contribution, active, clipped, fraction]
        values = torch.stack([r.to(torch.float64) for r in rows])
        self.last_step = FSCStepRecord(
            k, loss_value, names=self.group_names, values=values, trust=self.trust.factor
        )
        return scale

    def _calibrate(self, unit: torch.Tensor, active: torch.Tensor, k: int) -> None:
        """balance="stages": sum the stem's and head's own u_g over the first calibration_steps steps; after the
        last one the stage shares split the ends' share by them (computed on the device: no host sync)."""
        if self.balance != "stages" or k > self.calibration_steps:
            return
        ends = [self.group_names.index(n) if n in self.group_names else None for n in (STEM, HEAD)]
        values = torch.where(active, unit, 0.0)
        zero = torch.zeros((), dtype=torch.float64, device=unit.device)
        step = torch.stack([values[i] if i is not None else zero for i in ends])
        self._ends = step if self._ends is None else self._ends.to(unit.device) + step
        if k == self.calibration_steps:
            self._stages = None  # recomputed with the measured split

    def _fractions(self, active: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
        """Each group's fraction of the target (0 for inactive groups; the active ones add up to 1, or with
        renormalize=False to their own shares: an inactive group's share goes to no one)."""
        if self._stages is None or self._stages[0].device != active.device:
            self._stages = tuple(t.to(active.device) for t in self._stage_shares())
        onehot, stage_share = self._stages
        per_stage = onehot @ active.to(torch.float64)  # active groups in each stage
        if renormalize:
            stage_share = (
                stage_share * (per_stage > 0) / (stage_share * (per_stage > 0)).sum().clamp(min=1e-300)
            )
        else:
            per_stage = onehot.sum(dim=1)  # every group of the stage, active or not
        return torch.where(active, (stage_share / per_stage.clamp(min=1.0)) @ onehot, 0.0)

    def _stage_shares(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(stage x group one-hot, each stage's share): balance="stages": stem, trunk, head with 1 : n₀ : 1;
        balance="blocks": every group a stage of its own, equal shares."""
        if self.balance == "blocks":
            n = len(self.group_names)
            return torch.eye(n, dtype=torch.float64), torch.full((n,), 1.0 / n, dtype=torch.float64)
        stage = [name if name in (STEM, HEAD) else "trunk" for name in self.group_names]
        onehot = torch.tensor(
            [[float(t == s) for t in stage] for s in (STEM, "trunk", HEAD)], dtype=torch.float64
        )
        n0 = float(self.base_depth)
        shares = torch.tensor([1.0, n0, 1.0], dtype=torch.float64) / (n0 + 2.0)
        if self._ends is not None and self.fsc_state["step"] >= self.calibration_steps:
            # The stem's and the head's own first-order decreases over the calibration steps split the two ends'
            # shares (equal when neither moved); on the device of the sums, without reading them.
            measured = self._ends
            total = measured.sum()
            ends = torch.where(total > 0, 2.0 * measured / total.clamp(min=1e-300), 1.0)
            shares = shares.to(measured.device) * torch.stack([ends[0], ends.new_tensor(1.0), ends[1]])
            onehot = onehot.to(measured.device)
        return onehot, shares

    @property
    def group_shares(self) -> dict[str, float]:
        """{group name: its share of the step's target when every group is active} (the balance rule's shares)."""
        device = self._stages[0].device if self._stages is not None else None
        fractions = self._fractions(torch.ones(len(self.group_names), dtype=torch.bool, device=device))
        return dict(zip(self.group_names, fractions.tolist()))

    def _smooth(self, unit: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Bias-corrected EMA of each active group's u_g (u_g itself when ema_beta = 0)."""
        if self.ema_beta == 0.0:
            return unit
        if self._ema is None:
            self._ema = torch.zeros(2, len(self.param_groups), dtype=torch.float64, device=unit.device)
        ema = self._ema.to(unit.device)
        mean = torch.where(active, self.ema_beta * ema[0] + (1.0 - self.ema_beta) * unit, ema[0])
        count = ema[1] + active.to(torch.float64)
        self._ema = torch.stack([mean, count])
        return mean / (1.0 - torch.pow(self.ema_beta, count))

    # -- what the callback reads -------------------------------------------------------------------------------

    @property
    def last_scales(self) -> dict[str, float]:
        """{group name: s_g} of the last step ({} before the first step and for a skipped step)."""
        return {n: g.scale for n, g in self.last_step.groups.items()} if self.last_step else {}

    @property
    def last_targets(self) -> dict[str, float]:
        """{group name: targeted first-order loss decrease} of the last step."""
        return {n: g.target for n, g in self.last_step.groups.items()} if self.last_step else {}

    @property
    def last_contributions(self) -> dict[str, float]:
        """{group name: applied first-order loss decrease s_g·u_g} of the last step."""
        return {n: g.contribution for n, g in self.last_step.groups.items()} if self.last_step else {}

    # -- torch.optim.Optimizer plumbing ------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_building", False):
            raise NotImplementedError(
                "FSCOptimizer: groups come from the model's blocks; to train more parameters, set requires_grad "
                "before building the optimizer and build a new one."
            )
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        fsc = {k: self.fsc_state[k] for k in ("step", "skipped", "last_loss")}
        fsc["ema"], fsc["ema_count"] = {}, {}
        if self._ema is not None:
            for name, mean, count in zip(self.group_names, *self._ema.tolist()):
                if count > 0:
                    fsc["ema"][name], fsc["ema_count"][name] = mean, int(count)
        fsc["debt"] = dict(zip(self.group_names, self._debt.tolist())) if self._debt is not None else {}
        fsc["trust"] = asdict(self.trust)
        fsc["ends"] = None if self._ends is None else self._ends.tolist()
        return {"state": {}, "param_groups": groups, "base": self.base.state_dict(), "fsc": fsc}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "base" not in state_dict or "fsc" not in state_dict:
            raise ValueError(
                "FSCOptimizer.load_state_dict: not an FSCOptimizer state dict (no 'base'/'fsc' entry)."
            )
        names = [g.get("name") for g in state_dict["param_groups"]]
        if names != self.group_names:
            raise ValueError(
                f"FSCOptimizer.load_state_dict: saved groups {names} differ from this optimizer's {self.group_names}; "
                "build the optimizer on the same model (same blocks, same trainable parameters)."
            )
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.base.load_state_dict(state_dict["base"])
        fsc = state_dict["fsc"]
        self.fsc_state = {
            "step": int(fsc["step"]),
            "skipped": int(fsc["skipped"]),
            "last_loss": fsc["last_loss"],
        }
        means = [float(fsc["ema"].get(n, 0.0)) for n in self.group_names]
        counts = [float(fsc["ema_count"].get(n, 0)) for n in self.group_names]
        # Moved to the device at the next step. State dicts from before error feedback and the trust region
        # resume with neither carried over.
        self._ema = torch.tensor([means, counts], dtype=torch.float64)
        debt = fsc.get("debt") or {}
        self._debt = torch.tensor([float(debt.get(n, 0.0)) for n in self.group_names], dtype=torch.float64)
        ends = fsc.get("ends")
        self._ends = None if ends is None else torch.tensor(ends, dtype=torch.float64)
        self._stages = None
        # Fields of a former trust region (before the divergence guard) are dropped: the guard starts afresh.
        known = {f.name for f in fields(_TrustRegion)}
        self.trust = _TrustRegion(**{k: v for k, v in (fsc.get("trust") or {}).items() if k in known})

    def close(self) -> None:
        """Remove the loss-capture hook from the model (garbage collection does it too)."""
        if self._hook_finalizer is not None:
            self._hook_finalizer()
        self._hook = None


class FSCOptimizerFactory:
    """FSCOptimizer for `optimizer_cls_and_kwargs` without binding the model first.

    Use `optimizer_cls_and_kwargs=(FSCOptimizerFactory, {"rate": ...})`. Not an Optimizer subclass on purpose:
    transformers' Trainer (5.x) then treats it as a factory and calls FSCOptimizerFactory()(model, **kwargs). An
    instance, FSCOptimizerFactory(), works too (called without a model it returns itself). Trainers without
    optimizer factories: use FSCOptimizer.trainer_args.
    """

    def __call__(self, model: nn.Module | None = None, **kwargs: Any) -> FSCOptimizer | FSCOptimizerFactory:
        if model is None:
            if kwargs:
                raise TypeError(
                    "FSCOptimizerFactory: got settings but no model; call it as factory(model, **settings)."
                )
            return self
        return FSCOptimizer(model, **kwargs)
