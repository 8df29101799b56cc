"""The FSC rules as things you can train with: a per-block step-size optimizer and the output scale.

**C**ontributions (PAPER.md §6, Eq. 8): `FSCOptimizer` wraps any torch optimizer (the *base*) and, every step,
rescales the base's update of each parameter group (stem, each block, head) so that every group decreases the loss
by the same first-order amount and the amounts add up to a target (`rate` × loss by default).

**S**ensitivities (Eq. 7): `calibrate_output_scale` measures θ_{L−1} with the probe on a copy of the model and sets a
scalar multiplier on the readout's input (`set_output_scale`) so that κ := ‖b_{L−1}‖_rms · m · cos θ_{L−1} equals
a target constant (default 1).
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from hf_fsf.distributed import world_size
from hf_fsf.layout import find_blocks, unwrap_model

# ----------------------------------------------------------------------------------------------------------------
# FSCOptimizer
# ----------------------------------------------------------------------------------------------------------------

STEM, HEAD = "stem", "head"
BALANCES = ("blocks", "stages")
TIED_GROUP = STEM  # parameters shared by stem and head (tied embeddings) are optimized in the stem group


@dataclass
class GroupStep:
    """What FSCOptimizer did to one parameter group in one step."""

    unit_contribution: float  # u_g = −⟨∇_g loss, δw_g⟩ of the base optimizer's own step (scale 1)
    smoothed_unit: float | None  # the (EMA) estimate of u_g the scale was computed from; None when inactive
    target: float  # the first-order loss decrease FSC aimed at for this group
    scale: float  # s_g: the applied update is s_g × the base update
    contribution: float  # s_g × u_g: the first-order loss decrease actually applied
    active: bool  # False: zero/non-descent base update, excluded from the count, not moved (scale 0)
    clipped: bool  # True when max_scale bounded the scale


@dataclass
class FSCStepRecord:
    """One FSCOptimizer step: the loss it targeted, and per group the scale it chose. `skipped` names why not."""

    step: int
    loss: float | None
    target: float  # total first-order loss decrease aimed at (sum of the group targets)
    groups: dict[str, GroupStep] = field(default_factory=dict)
    skipped: str | None = None

    def to_dict(self, prefix: str = "fsc") -> dict[str, float]:
        """Flat {key: float} for loggers: fsc/<group>/{scale,target,contribution,unit_contribution}."""
        out = {f"{prefix}/target": self.target, f"{prefix}/skipped": float(self.skipped is not None)}
        for name, g in self.groups.items():
            out[f"{prefix}/{name}/scale"] = g.scale
            out[f"{prefix}/{name}/target"] = g.target
            out[f"{prefix}/{name}/contribution"] = g.contribution
            out[f"{prefix}/{name}/unit_contribution"] = g.unit_contribution
        return out


class _LossCapture:
    """Forward hook on the model: keeps `output.loss` of training forwards for the optimizer's target.

    Holds weak references so that a hook copied along with the model (copy.deepcopy) stays inert.
    """

    def __init__(self, optimizer: FSCOptimizer, model: nn.Module) -> None:
        self.optimizer = weakref.ref(optimizer)
        self.model = weakref.ref(model)

    def __call__(self, module: nn.Module, args: Any, kwargs: dict, output: Any) -> None:
        optimizer = self.optimizer()
        if (
            optimizer is None
            or module is not self.model()
            or not module.training
            or not torch.is_grad_enabled()
        ):
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # With num_items_in_batch (HF Trainer), each micro-batch's loss is its share of the step's mean.
            num_items = kwargs.get("num_items_in_batch")
            if num_items is None:
                optimizer.observe_loss(loss)
            else:
                optimizer._observe_share(loss, num_items, kwargs.get("labels"))


def _group_parameters(
    model: nn.Module, blocks: Sequence[str] | Sequence[nn.Module] | None
) -> list[tuple[str, list]]:
    """[(group name, trainable parameters)]: stem (+ tied), each block by its module name, head. Empty groups dropped."""
    layout = find_blocks(model, blocks)
    groups = [(STEM, [p for _, p in layout.stem_params] + [t.param for t in layout.tied])]
    groups += [
        (name, [p for _, p in params]) for (name, _), params in zip(layout.blocks, layout.block_params)
    ]
    groups.append((HEAD, [p for _, p in layout.head_params]))
    seen: set[int] = set()
    out = []
    for name, params in groups:
        kept = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                kept.append(p)
        if kept:
            out.append((name, kept))
    return out


def _split_options(params: Iterable) -> list[tuple[list, dict]]:
    """Incoming params (tensors or param-group dicts, e.g. the Trainer's decay / no-decay split) as (params, options)."""
    items = list(params)
    if items and isinstance(items[0], Mapping):
        return [(list(g["params"]), {k: v for k, v in g.items() if k != "params"}) for g in items]
    return [(items, {})]


class FSCOptimizer(torch.optim.Optimizer):
    """Balanced per-block step sizes on top of any torch optimizer (PAPER.md §6, rule C).

    Each step: the base optimizer takes its own step; for every group g (stem, each block, head) FSC measures the
    applied update δw_g and its first-order loss decrease u_g = −⟨∇_g loss, δw_g⟩, then moves the group to
    w_before + s_g·δw_g with s_g = t_g / u_g, where the group targets t_g = lr_g · loss / n are equal
    (balanced contributions, BC) and add up to `rate` × loss (loss decay, LD); n counts the *active* groups.
    (balance="stages" splits the target in three equal parts instead, stem / all blocks / head; see below.)

    Why measure instead of computing the direction in closed form: the measured δw is, by definition, what the base
    would do with its current state (momentum, Adam moments, Adafactor factors, weight decay, clipping inside the
    optimizer), so any base works without being re-implemented. The base state is never touched by the rescale:
    moments are functions of the gradients, not of the step taken, so they stay exactly what the base computed.
    Bases whose state stores parameter values (schedule-free, lookahead, SWA) are not supported. Cost: a copy of
    every parameter that has a gradient, held during step() only (+1× trainable parameter memory at peak), and
    one inner product per parameter.

    Arguments:
      model_or_params: the model (usual), or parameters / parameter groups together with `model=` (the groups'
        options, e.g. weight_decay, are passed on to the base; FSC's grouping still comes from the model).
      base: an optimizer class or any callable(param_groups, **base_kwargs) -> Optimizer. Its own lr sets the
        reference step that `max_scale` bounds; the direction does not depend on it for the usual bases.
      rate: FSC's learning rate, stored as every group's "lr" (so LR schedulers scale it): the target
        first-order loss decrease per step is lr × loss (target="loss") or lr (target="absolute").
      blocks: passed to hf_fsf.find_blocks (None: auto-detect).
      balance: how the target is split. "blocks" (default, the paper's rule C): every active group (stem, each
        block, head) gets the same share, target/n. "stages": the stem, the trunk (all blocks together) and the
        head each get the same share, and the trunk's share is split equally over its blocks; so the stem and
        head keep a depth-independent share, as under depth-μP, instead of 1/(n+2) each for n blocks. On the
        transfer benchmark's teacher ResNet (recipes/transfer.py, docs/transfer.md) the best held-out loss
        degrades with depth under "blocks" (+10 % from depth 8 to 64) and not under "stages", whose optimal rate
        is the same at depths 4-64. Caveat: a head that is only a final norm (GPT-2 with tied embeddings) then
        gets a third of the target on its own.
      ema_beta: smoothing of u_g across steps (0 = off: exact balance at every step). The scale uses the
        bias-corrected EMA of u_g, so the applied contribution is t_g × u_g/EMA(u_g): balanced on average. On by
        default: exact per-step balance divides by a noisy u_g (mini-batches, Adam's early steps), so a batch
        whose u_g happens to be small gets a very large step. (Every measurement in docs/transfer.md and
        recipes/check_fsc.py uses the default 0.9.)
      max_scale: bound on s_g, i.e. on the FSC step relative to the base optimizer's own step (None = off, the
        default, since its meaning depends on the base lr). With a base lr you would train with, e.g. 10 is a
        safety net against such outsized steps; a bounded group is flagged `clipped` and
        then contributes less than its target (the shortfall is not moved to other groups).
      warmup_steps: the target ramps linearly from 1/warmup_steps to 1 over the first steps (0 = off, the
        default; an LR scheduler with warm-up does the same through lr).
      capture_loss: register a forward hook on the model that records `output.loss` of training forwards (HF
        models), so that step() needs no argument inside the Trainer.

    Where the loss comes from, first available wins: step(closure) → step(loss=...) → the mean of the losses seen
    since the last step (the hook or observe_loss) → the previous step's loss (with a warning).

    Groups: "stem" (parameters before the blocks, plus tied stem/head parameters, whose gradient then carries both
    paths), one group per block named by its module name, "head". A group is *inactive* for a step, excluded from
    n and left where it was (scale 0), when its base update does not decrease the loss to first order (u_g ≤ 0),
    which covers zero gradients; frozen parameters (requires_grad=False) are in no group. A step whose loss or
    gradients are not finite is skipped with a warning: no parameter and no base or FSC state changes.
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable,
        base: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
        rate: float = 0.01,
        *,
        model: nn.Module | None = None,
        blocks: Sequence[str] | Sequence[nn.Module] | None = None,
        target: Literal["loss", "absolute"] = "loss",
        balance: Literal["blocks", "stages"] = "blocks",
        ema_beta: float = 0.9,
        max_scale: float | None = None,
        warmup_steps: int = 0,
        capture_loss: bool = True,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(model_or_params, nn.Module):
            if model is not None and model is not model_or_params:
                raise ValueError("FSCOptimizer: got two different models (positional and model=); pass one.")
            model, options = model_or_params, None
        elif model is None:
            raise TypeError(
                "FSCOptimizer needs the model to find its blocks, but got parameters only. Pass the model: "
                "FSCOptimizer(model, ...), or with the HF Trainer optimizers=(FSCOptimizer(model, ...), None) or "
                "optimizer_cls_and_kwargs=FSCOptimizer.trainer_args(model, ...) or (FSCOptimizerFactory, {...})."
            )
        else:
            options = _split_options(model_or_params)
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"FSCOptimizer: rate must be a finite number >= 0, got {rate}.")
        if target not in ("loss", "absolute"):
            raise ValueError(f"FSCOptimizer: target must be 'loss' or 'absolute', got {target!r}.")
        if balance not in BALANCES:
            raise ValueError(f"FSCOptimizer: balance must be one of {BALANCES}, got {balance!r}.")
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

        model = unwrap_model(model)
        groups = _group_parameters(model, blocks)
        if options is not None:  # keep only the parameters the caller handed over
            wanted = {id(p) for ps, _ in options for p in ps}
            groups = [(n, [p for p in ps if id(p) in wanted]) for n, ps in groups]
            groups = [(n, ps) for n, ps in groups if ps]
        if not groups:
            raise ValueError(
                "FSCOptimizer: the model has no trainable parameter (all have requires_grad=False)."
            )

        self.target_mode = target
        self.balance = balance
        self.ema_beta = float(ema_beta)
        self.max_scale = None if max_scale is None else float(max_scale)
        self.warmup_steps = int(warmup_steps)
        self.group_names = [n for n, _ in groups]
        self._building = True
        super().__init__([{"params": ps, "name": n} for n, ps in groups], {"lr": float(rate)})
        self._building = False

        # The base sees one param group per (FSC group x caller's option group), so per-group options survive.
        option_of = {id(p): i for i, (ps, _) in enumerate(options or []) for p in ps}
        base_groups = []
        for _, ps in groups:
            by_option: dict[int, list] = {}
            for p in ps:
                by_option.setdefault(option_of.get(id(p), -1), []).append(p)
            for i, sub in by_option.items():
                base_groups.append({"params": sub, **(options[i][1] if i >= 0 else {})})
        self.base = base(base_groups, **base_kwargs)
        if not isinstance(self.base, torch.optim.Optimizer):
            raise TypeError(
                f"FSCOptimizer: base must build a torch.optim.Optimizer, got {type(self.base).__name__}."
            )

        self.fsc_state: dict[str, Any] = {
            "step": 0,
            "skipped": 0,
            "last_loss": None,
            "ema": {},
            "ema_count": {},
        }
        self.last_step: FSCStepRecord | None = None
        self._pending: list[torch.Tensor] = []
        self._pending_shares = False
        self._clear_items()
        self._warned_stale = False
        hook = _LossCapture(self, model)
        self._hook = model.register_forward_hook(hook, with_kwargs=True) if capture_loss else None

    # -- Trainer integration ---------------------------------------------------------------------------------

    @classmethod
    def trainer_args(cls, model: nn.Module, **kwargs: Any) -> tuple[type[FSCOptimizer], dict[str, Any]]:
        """`optimizer_cls_and_kwargs` for transformers.Trainer, with the model bound.

        The Trainer pops "model" from the kwargs and calls FSCOptimizer(model, **rest) (the path it has for
        optimizers that need the model), so this works in every Trainer version that has optimizer_cls_and_kwargs.
        """
        return cls, {"model": model, **kwargs}

    # -- loss bookkeeping --------------------------------------------------------------------------------------

    def observe_loss(self, loss: torch.Tensor | float, share: bool = False) -> None:
        """Record the loss of a forward pass that feeds the next step (call once per micro-batch).

        share=False: the step's loss is the mean of the recorded ones; share=True: their sum (each is a share of
        the step's mean, as when HF models get num_items_in_batch).
        """
        self._pending.append(
            loss.detach().reshape(()) if isinstance(loss, torch.Tensor) else torch.tensor(loss)
        )
        self._pending_shares = self._pending_shares or share

    def _observe_share(self, loss: torch.Tensor, num_items: Any, labels: Any) -> None:
        """A micro-batch loss that is a share of the step's mean (HF Trainer: num_items_in_batch passed).

        The Trainer makes one count per step, passed to each of its micro-batches: shares of an earlier count
        belong to a step that never reached step() (fp16 overflow skips it) and are dropped. Under data
        parallelism the rank also counts its labelled tokens, which tells _reduce_over_ranks whether the count
        was summed over ranks (average_tokens_across_devices=True) or is this rank's own.
        """
        stale = self._pending_items is not None and num_items is not self._pending_items
        if isinstance(num_items, torch.Tensor) and stale:
            self._pending.clear()
            self._clear_items()
        self.observe_loss(loss, share=True)
        self._pending_items = num_items
        if world_size() > 1:  # single-process training pays nothing for the count
            if isinstance(labels, torch.Tensor):
                self._pending_labels = self._pending_labels + (labels != -100).sum()
            else:
                self._labels_known = False

    def _clear_items(self) -> None:
        self._pending_items: torch.Tensor | int | None = None
        self._pending_labels: torch.Tensor | int = 0
        self._labels_known = True

    def _resolve_loss(self, loss: torch.Tensor | float | None) -> float | None:
        """This step's loss (see the class docstring for the order), identical on every rank."""
        shares = False
        if loss is not None:
            value = loss.detach().reshape(()) if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        elif self._pending:
            device = self._pending[0].device
            stacked = torch.stack([x.to(device, torch.float64) for x in self._pending])
            shares = self._pending_shares
            value = stacked.sum() if shares else stacked.mean()
        else:
            value = None
        self._pending.clear()
        self._pending_shares = False
        if value is None:
            self._clear_items()
        else:
            reduced = self._reduce_over_ranks(value.to(torch.float64), shares)
            if self.target_mode == "loss" and math.isfinite(reduced) and reduced < 0:
                raise ValueError(
                    f"FSCOptimizer: loss {reduced} < 0, so rate x loss is not a loss decrease. Use target='absolute'."
                )
            return reduced
        if self.target_mode == "absolute":
            return None
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
                stacklevel=3,
            )
            self._warned_stale = True
        return self.fsc_state["last_loss"]

    def _reduce_over_ranks(self, value: torch.Tensor, shares: bool) -> float:
        """The loss every rank uses, so that all ranks take the same step.

        Plain losses: the mean over ranks. Shares (num_items_in_batch): the sum over ranks when num_items_in_batch
        counted every rank's tokens (the Trainer's default average_tokens_across_devices=True), else the mean
        (False: each rank's shares add up to its own mean). Which one is read off the count: a rank's own
        labelled tokens are never fewer than a count of its own, and fewer than a count over all ranks; without
        labels the Trainer's default is assumed.
        """
        items, labels, known = self._pending_items, self._pending_labels, self._labels_known
        self._clear_items()
        dist = torch.distributed
        if world_size() == 1:
            return float(value)
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else value.device
        )
        own_count = shares and known and items is not None and float(items) <= float(labels)
        global_count = 1.0 if shares and not own_count else 0.0
        both = torch.stack(
            [value.to(device, torch.float64), torch.tensor(global_count, device=device).double()]
        )
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        total, votes = float(both[0]), float(both[1])
        return total if shares and votes > 0 else total / dist.get_world_size()

    # -- the step ----------------------------------------------------------------------------------------------

    def _skip(self, loss: float | None, reason: str) -> None:
        warnings.warn(
            f"FSCOptimizer: step skipped, {reason}. Parameters and optimizer state unchanged.", stacklevel=3
        )
        self.fsc_state["skipped"] += 1
        self.last_step = FSCStepRecord(self.fsc_state["step"], loss, 0.0, skipped=reason)

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
        loss_value = self._resolve_loss(loss)

        entries = [
            (gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"] if p.grad is not None
        ]
        if loss_value is not None and not math.isfinite(loss_value):
            self._skip(loss_value, f"the loss is {loss_value}")
            return closure_loss
        if any(p.grad.is_sparse for _, p in entries):
            raise NotImplementedError(
                "FSCOptimizer: sparse gradients are not supported (use a dense embedding)."
            )
        if not entries:
            self._skip(loss_value, "no parameter has a gradient (call loss.backward() before step())")
            return closure_loss
        finite = torch.stack(
            [torch.isfinite(p.grad).all().to(entries[0][1].device) for _, p in entries]
        ).all()
        if entries and not bool(finite):
            bad = [self.group_names[gi] for gi, p in entries if not bool(torch.isfinite(p.grad).all())]
            self._skip(loss_value, f"non-finite gradients in {sorted(set(bad))}")
            return closure_loss

        before = [p.detach().clone() for _, p in entries]
        self.base.step()

        # u_g = −⟨g, δw⟩ per group, accumulated in float32 at least (float64 for float64 parameters).
        dots = []
        for (_, p), b in zip(entries, before):
            acc = torch.float64 if p.dtype == torch.float64 else torch.float32
            delta = (p.detach() - b).reshape(-1).to(acc)
            dots.append(torch.dot(p.grad.reshape(-1).to(acc), delta).to(entries[0][1].device, torch.float64))
        values = torch.stack(dots).tolist() if dots else []
        unit = [0.0] * len(self.param_groups)
        for (gi, _), v in zip(entries, values):
            unit[gi] -= v

        self.fsc_state["step"] += 1
        k = self.fsc_state["step"]
        self.fsc_state["last_loss"] = loss_value
        active = [gi for gi, u in enumerate(unit) if math.isfinite(u) and u > 0.0]
        warm = min(1.0, k / self.warmup_steps) if self.warmup_steps else 1.0
        total = (loss_value if self.target_mode == "loss" else 1.0) * warm
        fractions = self._fractions(active)

        record = FSCStepRecord(k, loss_value, 0.0)
        scales = [0.0] * len(self.param_groups)
        for gi, group in enumerate(self.param_groups):
            name, u = self.group_names[gi], unit[gi]
            if gi not in active:
                record.groups[name] = GroupStep(u, None, 0.0, 0.0, 0.0, False, False)
                continue
            smoothed = self._smooth(name, u)
            target = group["lr"] * total * fractions[gi]
            scale = target / smoothed
            clipped = self.max_scale is not None and scale > self.max_scale
            scales[gi] = min(scale, self.max_scale) if clipped else scale
            record.groups[name] = GroupStep(u, smoothed, target, scales[gi], scales[gi] * u, True, clipped)
            record.target += target

        # w ← w_before + s·(w_base − w_before), in place through the copy (lerp extrapolates for s > 1).
        for (gi, p), b in zip(entries, before):
            if scales[gi] != 1.0:
                p.copy_(b.lerp_(p, scales[gi]))
        self.last_step = record
        return closure_loss

    def _fractions(self, active: list[int]) -> dict[int, float]:
        """{group index: its fraction of the target} over the active groups (they add up to 1)."""
        if self.balance == "blocks" or not active:
            return {gi: 1.0 / max(len(active), 1) for gi in active}
        stages: dict[str, list[int]] = {}
        for gi in active:
            name = self.group_names[gi]
            stages.setdefault(name if name in (STEM, HEAD) else "trunk", []).append(gi)
        return {gi: 1.0 / (len(stages) * len(members)) for members in stages.values() for gi in members}

    def _smooth(self, name: str, u: float) -> float:
        """Bias-corrected EMA of the group's unit contribution (u itself when ema_beta = 0)."""
        if self.ema_beta == 0.0:
            return u
        ema, count = self.fsc_state["ema"], self.fsc_state["ema_count"]
        ema[name] = self.ema_beta * ema.get(name, 0.0) + (1.0 - self.ema_beta) * u
        count[name] = count.get(name, 0) + 1
        return ema[name] / (1.0 - self.ema_beta ** count[name])

    # -- what the callback reads -------------------------------------------------------------------------------

    @property
    def last_scales(self) -> dict[str, float]:
        """{group name: s_g} of the last step ({} before the first step; all 0 for a skipped step)."""
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
        fsc = {
            "step": self.fsc_state["step"],
            "skipped": self.fsc_state["skipped"],
            "last_loss": self.fsc_state["last_loss"],
            "ema": dict(self.fsc_state["ema"]),
            "ema_count": dict(self.fsc_state["ema_count"]),
        }
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
            "ema": dict(fsc["ema"]),
            "ema_count": dict(fsc["ema_count"]),
        }

    def close(self) -> None:
        """Remove the loss-capture hook from the model."""
        if self._hook is not None:
            self._hook.remove()
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


# ----------------------------------------------------------------------------------------------------------------
# Output ("backward") normalization
# ----------------------------------------------------------------------------------------------------------------

CONFIG_KEY = "fsf_output_scale"  # model.config attribute that persists the scale through save/load
CONFIG_READOUT_KEY = "fsf_output_readout"


class OutputScale:
    """Forward pre-hook that multiplies the readout's input by `scale` (the FSC output multiplier)."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        if args and isinstance(args[0], torch.Tensor):
            return (args[0] * self.scale, *args[1:])
        return None


def find_readout(model: nn.Module, readout: str | nn.Module | None = None) -> tuple[str, nn.Module]:
    """The module whose input gets the output scale: `readout` if given; else the HF output embeddings (LM head);
    else the module that owns the model's last head parameter (e.g. the final Linear of an MLP)."""
    model = unwrap_model(model)
    named = dict(model.named_modules())
    if isinstance(readout, str):
        if readout not in named:
            raise ValueError(
                f"find_readout: no module named {readout!r} in the model (see model.named_modules())."
            )
        return readout, named[readout]
    if isinstance(readout, nn.Module):
        name = next((n for n, m in named.items() if m is readout), None)
        if name is None:
            raise ValueError("find_readout: the readout module is not part of the model.")
        return name, readout
    get_output = getattr(model, "get_output_embeddings", None)
    module = get_output() if callable(get_output) else None
    if isinstance(module, nn.Module):
        return next(n for n, m in named.items() if m is module), module
    head = find_blocks(model).head_params
    if not head:
        raise ValueError(
            f"find_readout: {type(model).__name__} has no parameters after its blocks, so there is no readout to "
            "scale. Pass readout='<module name>'."
        )
    owner = head[-1][0].rsplit(".", 1)[0] if "." in head[-1][0] else ""
    return owner, named[owner]


def _find_hook(module: nn.Module) -> OutputScale | None:
    return next((h for h in module._forward_pre_hooks.values() if isinstance(h, OutputScale)), None)


def get_output_scale(model: nn.Module, readout: str | nn.Module | None = None) -> float | None:
    """The installed output scale, or None when there is none."""
    hook = _find_hook(find_readout(model, readout)[1])
    return None if hook is None else hook.scale


def set_output_scale(
    model: nn.Module, scale: float | None = None, readout: str | nn.Module | None = None
) -> float:
    """Install (or change) the multiplier on the readout's input; returns it.

    For HF models the scale is also written to model.config (`fsf_output_scale`), so it is saved with the model;
    after `from_pretrained`, call set_output_scale(model) (scale=None) to re-install the stored scale (hooks are
    not saved). Non-HF models keep it on the hook only.
    """
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    if scale is None:
        scale = getattr(config, CONFIG_KEY, None)
        if scale is None:
            raise ValueError(
                "set_output_scale: no scale given and none stored in model.config.fsf_output_scale."
            )
        readout = readout if readout is not None else getattr(config, CONFIG_READOUT_KEY, None)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"set_output_scale: the scale must be a finite number > 0, got {scale}.")
    name, module = find_readout(inner, readout)
    hook = _find_hook(module)
    if hook is None:
        module.register_forward_pre_hook(OutputScale(scale))
    else:
        hook.scale = float(scale)
    if config is not None and hasattr(config, "to_dict"):
        setattr(config, CONFIG_KEY, float(scale))
        setattr(config, CONFIG_READOUT_KEY, name)
    return float(scale)


@dataclass
class OutputScaleCalibration:
    """Result of calibrate_output_scale: the tried scales and the κ measured at each."""

    scale: float  # the calibrated multiplier (installed on the model when apply=True)
    target: float  # the κ aimed at
    scales: list[float]  # scales at which κ was measured, in order
    kappas: list[float]  # κ = ‖b_{L−1}‖_rms · m · cos θ_{L−1} measured at each
    converged: bool  # the last measurement was within rtol of the target


def default_probe_optimizer(model: nn.Module, blocks: Sequence[str] | None = None) -> FSCOptimizer:
    """The calibration's probe step: the paper's setting, one small GD step with balanced per-block rates (exact
    balance, no stabilizers), decreasing the loss by 0.1% to first order."""
    return FSCOptimizer(
        model, base=torch.optim.SGD, rate=1e-3, lr=1e-3, blocks=blocks, ema_beta=0.0, capture_loss=False
    )


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(
            "calibrate_output_scale: batch is not a dict, so pass loss_fn=lambda model, batch: <loss>."
        )
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ValueError(
            "calibrate_output_scale: the model returned no .loss; put labels in the batch or pass loss_fn."
        )
    return loss


def measure_output_kappa(
    model: nn.Module,
    batch: Any,
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    blocks: Sequence[str] | Sequence[nn.Module] | None = None,
    scale: float | None = None,
    readout: str | nn.Module | None = None,
) -> float:
    """κ = ‖b_{L−1}‖_rms · m · cos θ_{L−1} = cos θ · ‖b‖ · √m = 1/(S_{L−1} · fsf_ratio) of one probe step on a
    copy of the model, with output scale `scale` on the copy if given (the model is not changed; the global RNG
    is restored)."""
    from hf_fsf.probe import FeatureSpeedProbe  # the probe sits upstream of control in the data flow

    loss_fn = loss_fn or _default_loss
    # Modules of the model are not modules of its copy: refer to blocks and readout by name.
    names = find_blocks(model, blocks).names
    readout = find_readout(model, readout)[0] if scale is not None else None
    params = list(model.parameters())
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        work = copy.deepcopy(unwrap_model(model))
        if scale is not None:
            set_output_scale(work, scale, readout)
        optimizer = make_optimizer(work) if make_optimizer else default_probe_optimizer(work, names)

        def step_loss() -> torch.Tensor:
            loss = loss_fn(work, batch)
            if isinstance(optimizer, FSCOptimizer) and torch.is_grad_enabled():
                optimizer.observe_loss(loss)
            return loss

        with FeatureSpeedProbe(work, blocks=names) as probe:
            stats = probe.measure_step(step_loss, optimizer, angle=True)
        if isinstance(optimizer, FSCOptimizer):
            optimizer.close()
    last = stats.blocks[-1]
    if last.sensitivity is None or last.fsf_ratio is None or last.cos_theta is None:
        raise RuntimeError(
            f"calibrate_output_scale: the probe step measured no angle at block {last.name!r}."
        )
    # S·fsf_ratio = (‖δf‖/√m)/(−⟨δf,b⟩) = 1/(cos θ ‖b‖ √m) exactly, whatever the step's non-linearity.
    kappa = 1.0 / (last.sensitivity * last.fsf_ratio)
    if not math.isfinite(kappa) or kappa <= 0 or last.cos_theta <= 0:
        raise RuntimeError(
            f"calibrate_output_scale: cos θ_(L-1) = {last.cos_theta} at block {last.name!r}, so the probe step did "
            "not move the last features against the backward pass; try a smaller probe step (make_optimizer=)."
        )
    return kappa


def _log_slope(scales: list[float], kappas: list[float]) -> float:
    """d log κ / d log α from the last two measurements; 1 (κ ∝ α) when unknown or implausible."""
    if len(scales) < 2 or scales[-1] == scales[-2]:
        return 1.0
    slope = math.log(kappas[-1] / kappas[-2]) / math.log(scales[-1] / scales[-2])
    return slope if math.isfinite(slope) and 0.2 <= slope <= 5.0 else 1.0


def calibrate_output_scale(
    model: nn.Module,
    batch: Any,
    *,
    target: float = 1.0,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    blocks: Sequence[str] | Sequence[nn.Module] | None = None,
    readout: str | nn.Module | None = None,
    max_iters: int = 4,
    rtol: float = 0.02,
    apply: bool = True,
) -> OutputScaleCalibration:
    """Choose the output scale α so that PAPER.md Eq. (7) holds with the constant `target`:

        κ := ‖b_{L−1}‖_rms · m · cos θ_{L−1} = target,   ‖b‖_rms = ‖b‖/√m,  m = entries of f_{L−1} in the batch,

    f_{L−1} being the output of the last block (the readout's input side). κ is 1/S_{L−1} (the inverse
    sensitivity), and by the feature speed formula ‖δf_{L−1}‖_rms = ΔL_{≤L−1} / κ: with target 1 the last
    features move, in rms, by the first-order loss decrease of the parameters upstream of them (the paper's FSC
    point, S ≈ 1). Each iteration measures κ with one probe step (angle=True) on a copy of the model and updates
    α ← α · (target / κ)^(1/p), p = d log κ / d log α: 1 at first (κ ∝ α while the outputs are small), then the
    secant slope of the last two measurements; it stops when |κ/target − 1| ≤ rtol.

    batch: a dict for HF models (loss = model(**batch).loss), else anything `loss_fn(model, batch)` accepts.
    make_optimizer(model) builds the probe step's optimizer; it should resemble training (default:
    `default_probe_optimizer`, FSC over SGD, the paper's setting). The model's weights are never changed; with apply=True its output scale is
    set to the result. Memory: one deep copy of the model per iteration.
    """
    if not math.isfinite(target) or target <= 0:
        raise ValueError(f"calibrate_output_scale: target must be a finite number > 0, got {target}.")
    if max_iters < 1:
        raise ValueError(f"calibrate_output_scale: max_iters must be >= 1, got {max_iters}.")
    readout = find_readout(model, readout)[0]
    scale = get_output_scale(model, readout) or 1.0
    result = OutputScaleCalibration(scale, target, [], [], False)
    for _ in range(max_iters):
        kappa = measure_output_kappa(
            model,
            batch,
            loss_fn=loss_fn,
            make_optimizer=make_optimizer,
            blocks=blocks,
            scale=scale,
            readout=readout,
        )
        result.scales.append(scale)
        result.kappas.append(kappa)
        if abs(kappa / target - 1.0) <= rtol:
            result.converged = True
            break
        scale = scale * (target / kappa) ** (1.0 / _log_slope(result.scales, result.kappas))
    result.scale = scale
    if apply:
        set_output_scale(model, scale, readout)
    if not result.converged:
        warnings.warn(
            f"calibrate_output_scale: κ = {result.kappas[-1]:.4g} after {max_iters} iterations (target {target}); "
            "the last scale was not measured. Raise max_iters or rtol.",
            stacklevel=2,
        )
    return result
