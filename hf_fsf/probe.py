"""FeatureSpeedProbe: hooks that measure, per block and per optimizer step, the quantities of PAPER.md §3.

One optimizer step is measured in three calls, around whatever loop owns the forward, backward and step:

    probe.begin_step(angle=True)        # start capturing
    ... forward + backward, once per micro-batch (each model call is recorded for the re-forward) ...
    probe.before_optimizer_step()       # grads are final (accumulated, all-reduced, clipped): ⟨g, w⟩ per block
    optimizer.step()
    stats = probe.after_optimizer_step()  # ⟨g, w⟩ again -> contributions; angle: re-forward -> δf

`measure_step(loss_fn, optimizer)` does all of it for one batch. The cheap path (angle=False) costs one fused pass
over the parameters and gradients before and after the step, and a squared norm of each block's output and
gradient; it copies no parameter. The angle path keeps f_ℓ and b_ℓ of the step and runs one extra no-grad
forward per micro-batch with the random state of the training forward replayed (dropout), stopped after the last
block.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from hf_fsf.distributed import world_size
from hf_fsf.formula import BlockSums, block_fields
from hf_fsf.layout import BlockLayout, block_output, find_blocks, unwrap_model
from hf_fsf.stats import BlockStats, StepStats

__all__ = ["BlockStats", "FeatureSpeedProbe", "StepStats"]

# Fields accumulated per block, per step (rows of the accumulator).
_FWD, _BWD, _UPD, _DOT = range(4)
# A clipping coefficient this close to 1 is rounding, not clipping.
_SCALE_ATOL = 1e-6
# Parameters whose gradients are also captured in the backward pass, to detect clipping (elements in total).
_REFERENCE_NUMEL = 1 << 16


def _guarded(hook):
    """Hooks run inside the user's forward and backward: with strict=False a fault there is a warning and an
    invalid step, never an exception in the training loop."""

    @functools.wraps(hook)
    def wrapper(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except Exception as error:
            if self.strict:
                raise
            if self._step is not None:
                self._step.failed = f"{type(error).__name__}: {error}"
            warnings.warn(f"FeatureSpeedProbe: hook failed ({type(error).__name__}: {error}).", stacklevel=2)

    return wrapper


class _StopForward(BaseException):
    """Raised after the last block in a re-forward: the head is not needed. BaseException so `except Exception`
    in user code does not swallow it."""


@dataclass
class _MicroBatch:
    replay: Callable[[], object] | None
    cpu_rng: torch.Tensor | None
    cuda_rng: list[torch.Tensor]
    autocast: list[tuple[str, torch.dtype]]
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # f_ℓ before the step (angle only)
    backwards: dict[int, torch.Tensor] = field(default_factory=dict)  # b_ℓ (angle only)
    seen: set[int] = field(default_factory=set)  # blocks captured (gradient checkpointing re-runs them)
    hooked: set[int] = field(default_factory=set)  # blocks whose output gradient is being captured
    tied: dict[int, tuple[tuple, dict, torch.Tensor]] = field(
        default_factory=dict
    )  # inputs, output of tied stem
    tied_backwards: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Step:
    angle: bool
    acc: torch.Tensor  # [4, L] float64: ‖f‖², ‖b‖², ‖δf‖², ⟨δf, b⟩ (local to this rank)
    numel: list[int]
    micro: list[_MicroBatch] = field(default_factory=list)
    current: _MicroBatch | None = None
    manual: bool = False  # inside a micro_batch() context: the model's own calls are not recorded
    loss_terms: list[torch.Tensor] = field(default_factory=list)
    reference: list[torch.Tensor | None] = field(default_factory=list)  # ∇ of reference params, from backward
    dots_before: torch.Tensor | None = None  # ⟨g, w⟩ per parameter group
    grad_sq: torch.Tensor | None = None
    grad_scale: float = 1.0
    phase: str = "capture"  # capture -> stepped -> done
    failed: str | None = None  # a hook's error message (strict=False)


def _rng_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    state = []
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            state.append((device_type, torch.get_autocast_dtype(device_type)))
    return state


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """At least float32: δf and inner products of low-precision tensors lose everything in bf16."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _sum_sq(t: torch.Tensor) -> torch.Tensor:
    return _as_float(t).square().sum(dtype=torch.float64)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_as_float(a) * _as_float(b)).sum(dtype=torch.float64)


# Largest piece of a parameter multiplied at once: bounds the temporary of the products (64 MiB in float32).
_DOT_CHUNK = 1 << 24


def _grad_dots(
    params: list[nn.Parameter], device: torch.device, with_norms: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(⟨g, w⟩, ‖g‖²) of a parameter group, with float64 accumulation.

    The contribution is the difference of ⟨g, w⟩ before and after the step, so the sums are float64 (products of
    float32 numbers rounded once, then summed without further loss): the difference keeps its digits even when
    δw ≪ w. One multiply-and-reduce per parameter (in chunks for huge ones): the temporary stays small and reused,
    which is much faster on CPU than one multiply over the whole group (a group-sized temporary) followed by the sums.
    """
    dots, squares = [], []
    for p in params:
        if p.grad is None or p.grad.is_sparse:
            continue
        # Chunks of the original tensors, upcast one at a time: no full-size float32 copy of a bf16 gradient.
        for gc, wc in zip(p.grad.reshape(-1).split(_DOT_CHUNK), p.detach().reshape(-1).split(_DOT_CHUNK)):
            gc = _as_float(gc)
            dots.append(torch.mul(gc, _as_float(wc)).sum(dtype=torch.float64).to(device))
            if with_norms:  # a norm is not a cancelling difference: float32 accumulation is enough
                squares.append(torch.linalg.vector_norm(gc).to(device=device, dtype=torch.float64).square())
    zero = torch.zeros((), dtype=torch.float64, device=device)
    if not dots:
        return zero, (zero.clone() if with_norms else None)
    return torch.stack(dots).sum(), (torch.stack(squares).sum() if with_norms else None)


def _flat_float64(
    tensors: list[torch.Tensor | None], like: list[nn.Parameter], device: torch.device
) -> torch.Tensor:
    """One float64 vector of `tensors`, with zeros (of the matching parameter's size) where a tensor is None."""
    parts = [
        (t if t is not None else torch.zeros_like(p)).detach().double().flatten().to(device)
        for t, p in zip(tensors, like)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)


class FeatureSpeedProbe:
    """Measures the feature speed formula on a chain of blocks.

    model: any nn.Module (DDP / accelerate wrappers are unwrapped). blocks: None (auto-detect, see
    `find_blocks`), module names, or modules. strict: raise on user errors (a non-scalar loss, an optimizer that
    changed nothing); False (used inside training) warns and marks the step invalid instead.
    grad_average: under torch.distributed, gradients are averaged over ranks (DDP), so the backward pass of the
    global loss on this rank's slice is b / world_size. example_inputs / trace: how `find_blocks` orders the
    parameters outside the blocks (one forward pass on example or dummy inputs; trace=False: registration order).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[str] | Sequence[nn.Module] | None = None,
        *,
        strict: bool = True,
        grad_average: bool = True,
        example_inputs: object = None,
        trace: bool = True,
    ) -> None:
        self.model = unwrap_model(model)
        self.layout: BlockLayout = find_blocks(self.model, blocks, example_inputs=example_inputs, trace=trace)
        self.strict = strict
        self.grad_average = grad_average
        self._step: _Step | None = None
        self._reforwarding = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        first = next(self.model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self._cuda_devices = _rng_devices(self.model)
        self._groups = self._parameter_groups()
        self._reference = self._reference_parameters()
        self._install_hooks()

    # --- public API ---------------------------------------------------------------------------------------

    @property
    def block_names(self) -> list[str]:
        return self.layout.names

    def measure_step(
        self, loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, angle: bool = True
    ) -> StepStats:
        """Zero-grad, loss_fn() + backward, optimizer.step(), and (angle) the re-forward: the stats of that step."""
        self.model.zero_grad(set_to_none=True)
        optimizer.zero_grad(set_to_none=True)
        self.begin_step(angle=angle)
        try:
            with self.micro_batch(replay=loss_fn):
                loss = loss_fn()
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError(
                        f"measure_step: loss_fn must return a scalar tensor, got {type(loss).__name__}"
                        f"{'' if not isinstance(loss, torch.Tensor) else f' of shape {tuple(loss.shape)}'}. "
                        "Reduce it (e.g. .mean()) inside loss_fn."
                    )
                if not loss.requires_grad:
                    raise ValueError(
                        "measure_step: the loss does not require grad; no parameter of the model is trainable."
                    )
                self.record_loss(loss)
                loss.backward()
        except BaseException:
            self._step = None
            raise
        self.before_optimizer_step()
        optimizer.step()
        return self.after_optimizer_step()

    def begin_step(self, angle: bool = False) -> None:
        """Start measuring one optimizer step; every model call until before_optimizer_step() is a micro-batch."""
        if self._step is not None and self._step.phase != "done":
            warnings.warn(
                "FeatureSpeedProbe.begin_step: the previous step was not finished; it is discarded.",
                stacklevel=2,
            )
        n = len(self.layout.blocks)
        self._step = _Step(
            angle=angle,
            acc=torch.zeros(4, n, dtype=torch.float64, device=self.device),
            numel=[0] * n,
            reference=[None] * len(self._reference),
        )

    @contextlib.contextmanager
    def micro_batch(self, replay: Callable[[], object] | None = None):
        """Marks one micro-batch explicitly, for loops that do not call the model directly.

        replay: called under no_grad with the random state at entry replayed, to re-run this micro-batch's forward
        after the step (angle). Model calls inside the context are not recorded separately.
        """
        step = self._require_step("micro_batch")
        micro = self._new_micro_batch(replay)
        step.manual, step.current = True, micro
        try:
            yield micro
        finally:
            step.manual = False

    def record_loss(self, loss: torch.Tensor) -> None:
        """Adds the back-propagated loss of a micro-batch (the model's own `.loss` is recorded automatically)."""
        step = self._require_step("record_loss")
        step.loss_terms.append(loss.detach().reshape(()).to(torch.float64))

    def before_optimizer_step(self) -> None:
        """Call when the gradients are final (after accumulation, all-reduce and clipping), before the step."""
        step = self._require_step("before_optimizer_step")
        if step.phase != "capture":
            raise RuntimeError("before_optimizer_step was already called for this step.")
        step.grad_scale = self._gradient_scale(step)
        dots, sqs = zip(*(_grad_dots(group, self.device) for group in self._groups.values()))
        step.dots_before = torch.stack(dots)
        step.grad_sq = torch.stack(sqs)
        step.phase = "stepped"

    def after_optimizer_step(self) -> StepStats:
        """Call right after optimizer.step(): returns the step's stats (valid=False with a warning on NaN/inf)."""
        step = self._require_step("after_optimizer_step")
        if step.phase != "stepped":
            raise RuntimeError("after_optimizer_step needs before_optimizer_step() first.")
        try:
            dots_after = torch.stack(
                [_grad_dots(g, self.device, with_norms=False)[0] for g in self._groups.values()]
            )
            tied_stem = self._tied_stem_dots(step)
            if step.angle:
                self._reforward(step)
            return self._finish(step, dots_after, tied_stem)
        finally:
            step.phase = "done"
            self._step = None

    def abort_step(self) -> None:
        """Discards the step being measured (e.g. after an error in the training loop)."""
        self._step = None

    def close(self) -> None:
        """Removes every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._step = None

    def __enter__(self) -> FeatureSpeedProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- set-up ---------------------------------------------------------------------------------------------

    def _parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """stem, each block, head, and each tied parameter alone (its stem share is measured separately)."""
        layout = self.layout
        groups = {"stem": [p for _, p in layout.stem_params]}
        for (name, _), params in zip(layout.blocks, layout.block_params):
            groups[name] = [p for _, p in params]
        groups["head"] = [p for _, p in layout.head_params]
        for i, tied in enumerate(layout.tied):
            groups[f"tied:{i}"] = [tied.param]
        return groups

    def _reference_parameters(self) -> list[nn.Parameter]:
        """A few small parameters whose gradients are also taken in the backward pass, before any clipping."""
        chosen, total = [], 0
        for param in sorted((p for p in self.model.parameters() if p.requires_grad), key=lambda p: p.numel()):
            if total + param.numel() > _REFERENCE_NUMEL and chosen:
                break
            chosen.append(param)
            total += param.numel()
        return chosen

    def _install_hooks(self) -> None:
        model = self.model
        self._handles.append(model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._on_model_output))
        for index, (_, module) in enumerate(self.layout.blocks):
            self._handles.append(
                module.register_forward_hook(functools.partial(self._on_block_output, index))
            )
        for index, tied in enumerate(self.layout.tied):
            hook = functools.partial(self._on_tied_stem_output, index)
            self._handles.append(tied.stem_module.register_forward_hook(hook, with_kwargs=True))
        for index, param in enumerate(self._reference):
            self._handles.append(param.register_hook(functools.partial(self._on_reference_grad, index)))

    # --- hooks ----------------------------------------------------------------------------------------------

    def _new_micro_batch(self, replay: Callable[[], object] | None) -> _MicroBatch:
        step = self._step
        # The random state is only needed to replay the forward (angle steps); the cheap path skips the copy.
        micro = _MicroBatch(
            replay=replay,
            cpu_rng=torch.get_rng_state() if step.angle else None,
            cuda_rng=[torch.cuda.get_rng_state(d) for d in self._cuda_devices] if step.angle else [],
            autocast=_autocast_state(),
        )
        step.micro.append(micro)
        return micro

    def _capturing(self) -> _Step | None:
        step = self._step
        if step is None or step.phase != "capture" or self._reforwarding:
            return None
        return step

    @_guarded
    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        step = self._capturing()
        if step is None or step.manual or not torch.is_grad_enabled():
            return
        replay = functools.partial(module, *args, **kwargs) if step.angle else None
        step.current = self._new_micro_batch(replay)

    @_guarded
    def _on_model_output(self, module: nn.Module, args: tuple, output: object) -> None:
        step = self._capturing()
        if step is None or step.manual:
            return
        loss = getattr(output, "loss", None) if not isinstance(output, dict) else output.get("loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad:
            # The gradient reaching the model's loss is the factor the training loop applied to it
            # (1/accumulation steps, ...), so loss * grad is exactly what was back-propagated.
            value = loss.detach().reshape(()).to(torch.float64)
            loss.register_hook(
                lambda g, v=value, s=step: s.loss_terms.append(v * g.detach().reshape(()).double())
            )

    @_guarded
    def _on_block_output(self, index: int, module: nn.Module, args: tuple, output: object) -> None:
        if self._reforwarding:
            self._on_block_reforward(index, output)
            return
        step = self._capturing()
        if step is None or step.current is None:
            return
        micro = step.current
        features = block_output(output)
        if features is None:
            return
        if index not in micro.seen:  # gradient checkpointing re-runs blocks in the backward pass: count once
            micro.seen.add(index)
            with torch.no_grad():
                step.acc[_FWD, index] += _sum_sq(features.detach()).to(self.device)
                step.numel[index] += features.numel()
                if step.angle:
                    micro.features[index] = features.detach().clone()
        # With reentrant checkpointing the first run is under no_grad: the re-run's output carries the gradient.
        if index not in micro.hooked and features.requires_grad and torch.is_grad_enabled():
            micro.hooked.add(index)
            features.register_hook(functools.partial(self._on_block_backward, step, micro, index))

    @_guarded
    def _on_block_backward(self, step: _Step, micro: _MicroBatch, index: int, grad: torch.Tensor) -> None:
        with torch.no_grad():
            step.acc[_BWD, index] += _sum_sq(grad).to(self.device)
            if step.angle:
                micro.backwards[index] = grad.detach().clone()

    def _on_block_reforward(self, index: int, output: object) -> None:
        step, micro = self._step, self._step.current
        after = block_output(output)
        before, backward = micro.features.get(index), micro.backwards.get(index)
        if after is not None and before is not None and after.shape == before.shape:
            delta = _as_float(after) - _as_float(before)
            step.acc[_UPD, index] += _sum_sq(delta).to(self.device)
            if backward is not None:  # None when nothing upstream of the block is trainable
                step.acc[_DOT, index] += _dot(delta, backward).to(self.device)
            micro.seen.add(index)
        if index == len(self.layout.blocks) - 1:
            raise _StopForward

    @_guarded
    def _on_tied_stem_output(
        self, index: int, module: nn.Module, args: tuple, kwargs: dict, output: object
    ) -> None:
        step = self._capturing()
        if step is None or step.current is None or index in step.current.tied:
            return
        out = block_output(output)
        if out is None:
            return
        micro = step.current
        micro.tied[index] = (args, kwargs, out.detach().clone())
        if out.requires_grad and torch.is_grad_enabled():

            def keep(grad: torch.Tensor, micro=micro, index=index) -> None:
                previous = micro.tied_backwards.get(index)
                micro.tied_backwards[index] = (
                    grad.detach().clone() if previous is None else previous + grad.detach()
                )

            out.register_hook(keep)

    @_guarded
    def _on_reference_grad(self, index: int, grad: torch.Tensor) -> None:
        step = self._capturing()
        if step is None:
            return
        held = step.reference[index]
        step.reference[index] = grad.detach().clone() if held is None else held + grad.detach()

    # --- measurement ---------------------------------------------------------------------------------------

    def _require_step(self, what: str) -> _Step:
        if self._step is None:
            raise RuntimeError(f"FeatureSpeedProbe.{what}: call begin_step() first.")
        return self._step

    def _gradient_scale(self, step: _Step) -> float:
        """The factor between the gradients in .grad and those of the backward pass (clipping), from a few small
        reference parameters whose backward gradients were kept. 1.0 when nothing rescaled the gradients."""
        # Every rank reduces the same fixed-length buffer (zeros where a reference got no gradient locally), so
        # the collective matches even when some parameter is unused on one rank.
        seen = _flat_float64(step.reference, self._reference, self.device)
        final = _flat_float64([p.grad for p in self._reference], self._reference, self.device)
        world = world_size()
        if world > 1:
            dist.all_reduce(seen)
            if self.grad_average:
                seen /= world
        norm_sq = float(seen @ seen)
        if norm_sq == 0.0 or not math.isfinite(norm_sq):
            return 1.0
        scale = float(final @ seen) / norm_sq
        residual = float((final - scale * seen).norm()) / max(float(final.norm()), 1e-300)
        if residual > 1e-3:
            warnings.warn(
                "FeatureSpeedProbe: the gradients were changed between the backward pass and the optimizer step in a "
                "way that is not a global rescaling (clipping by value? per-parameter clipping?); contributions use the "
                "gradients as they are in .grad.",
                stacklevel=3,
            )
            return 1.0
        return 1.0 if abs(scale - 1.0) < _SCALE_ATOL else scale

    def _tied_stem_dots(self, step: _Step) -> torch.Tensor:
        """⟨δ(stem output), b⟩ of each tied parameter's stem module, re-run on its recorded inputs after the step.

        An embedding's output is linear in its weight, so this is exactly ⟨G_stem, δW⟩: the stem path's share.
        """
        out = torch.zeros(len(self.layout.tied), dtype=torch.float64, device=self.device)
        if not self.layout.tied:
            return out
        self._reforwarding = True
        try:
            with torch.no_grad():
                for index, tied in enumerate(self.layout.tied):
                    for micro in step.micro:
                        if index not in micro.tied or index not in micro.tied_backwards:
                            continue
                        args, kwargs, before = micro.tied[index]
                        after = block_output(tied.stem_module(*args, **kwargs))
                        out[index] += _dot(
                            _as_float(after) - _as_float(before), micro.tied_backwards[index]
                        ).to(self.device)
        finally:
            self._reforwarding = False
        return out

    def _reforward(self, step: _Step) -> None:
        """Re-runs each recorded micro-batch after the step, with its random state and autocast replayed."""
        runnable = [m for m in step.micro if m.replay is not None]
        if len(runnable) < len(step.micro) or not runnable:
            self._problem(
                "the angle needs each micro-batch's forward to be replayable; this step's was not recorded"
            )
            step.angle = False
            return
        buffers = self._batchnorm_buffers()
        self._reforwarding = True
        try:
            for micro in runnable:
                step.current = micro
                micro.seen = set()
                with contextlib.ExitStack() as stack:
                    stack.enter_context(torch.random.fork_rng(devices=self._cuda_devices))
                    torch.set_rng_state(micro.cpu_rng)
                    for device, state in zip(self._cuda_devices, micro.cuda_rng):
                        torch.cuda.set_rng_state(state, device)
                    for device_type, dtype in micro.autocast:
                        stack.enter_context(torch.autocast(device_type, dtype=dtype))
                    stack.enter_context(torch.no_grad())
                    try:
                        micro.replay()
                    except _StopForward:
                        pass
                if len(micro.seen) < len(self.layout.blocks):
                    self._problem("the re-forward did not run every block (did the model's input change?)")
                    step.angle = False
                    return
        finally:
            self._reforwarding = False
            with torch.no_grad():
                for buf, saved in buffers:
                    buf.copy_(saved)

    def _batchnorm_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Running statistics a training-mode re-forward would update: saved so the re-forward leaves no trace."""
        saved = []
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                saved += [(b, b.clone()) for b in module.buffers()]
        return saved

    def _problem(self, message: str) -> None:
        if self.strict:
            raise RuntimeError(f"FeatureSpeedProbe: {message}.")
        warnings.warn(f"FeatureSpeedProbe: {message}; measurement skipped.", stacklevel=3)

    def _finish(self, step: _Step, dots_after: torch.Tensor, tied_stem: torch.Tensor) -> StepStats:
        world = world_size()
        b_scale = 1.0 / world if (world > 1 and self.grad_average) else 1.0
        loss = (
            torch.stack(step.loss_terms).sum()
            if step.loss_terms
            else torch.full((), math.nan, dtype=torch.float64)
        )
        # Per-rank sums of activations are summed over ranks; gradient inner products are already global.
        local = torch.cat([step.acc.flatten(), tied_stem, loss.reshape(1).to(self.device)])
        if world > 1:
            dist.all_reduce(local)
        n = len(self.layout.blocks)
        acc = local[: 4 * n].view(4, n)
        acc[_BWD] *= b_scale**2
        acc[_DOT] *= b_scale
        tied_stem = local[4 * n : 4 * n + len(self.layout.tied)] * b_scale
        loss_value = float(local[-1]) / world if step.loss_terms else None
        numel = torch.tensor(step.numel, dtype=torch.float64, device=self.device)
        if world > 1:
            dist.all_reduce(numel)

        scale = step.grad_scale
        contributions = (-(dots_after - step.dots_before) / scale).tolist()
        names = list(self._groups)
        by_group = dict(zip(names, contributions))
        stem = by_group["stem"]
        head = by_group["head"]
        for index in range(len(self.layout.tied)):
            stem_share = -float(tied_stem[index])
            stem += stem_share
            head += by_group[f"tied:{index}"] - stem_share
        grad_norms = {k: math.sqrt(max(v, 0.0)) / abs(scale) for k, v in zip(names, step.grad_sq.tolist())}

        # An optimizer that moved nothing (lr = 0 at the start of a warm-up, a step skipped by a loss scaler) gives
        # no feature update to measure: an error when measuring by hand, an invalid record inside training.
        nothing_moved = not any(c != 0.0 for c in contributions) and any(v > 0 for v in grad_norms.values())
        if nothing_moved and self.strict:
            raise RuntimeError(
                "FeatureSpeedProbe: optimizer.step() changed no parameter that has a gradient (lr = 0? a skipped "
                "step?); there is no update to measure. Check the optimizer's learning rate and parameters."
            )

        acc_list = acc.tolist()
        numel_list = numel.tolist()
        blocks = []
        loss_decrease = stem
        for index, name in enumerate(self.layout.names):
            contribution = by_group[name]
            loss_decrease += contribution
            sums = BlockSums(
                numel=int(numel_list[index]),
                forward_sq=acc_list[_FWD][index],
                backward_sq=acc_list[_BWD][index],
                update_sq=acc_list[_UPD][index] if step.angle else None,
                update_dot_backward=acc_list[_DOT][index] if step.angle else None,
            )
            blocks.append(BlockStats(name=name, **block_fields(sums, contribution, loss_decrease)))

        raw = [*contributions, stem, head, *acc_list[_FWD], *acc_list[_BWD]]
        if step.angle:
            raw += acc_list[_UPD] + acc_list[_DOT]
        if loss_value is not None:
            raw.append(loss_value)
        valid = (
            all(math.isfinite(v) for v in raw)
            and math.isfinite(scale)
            and step.failed is None
            and not nothing_moved
        )
        if step.failed is not None:
            warnings.warn(
                f"FeatureSpeedProbe: stats of this step marked invalid ({step.failed}).", stacklevel=3
            )
        elif not valid and not nothing_moved:
            warnings.warn(
                "FeatureSpeedProbe: NaN or inf in this step's loss, gradients or features; stats marked invalid.",
                stacklevel=3,
            )
        return StepStats(
            loss=loss_value,
            blocks=blocks,
            stem_contribution=stem,
            head_contribution=head,
            grad_scale=scale,
            group_grad_norms={k: v for k, v in grad_norms.items() if not k.startswith("tied:")},
            angle=step.angle,
            valid=valid,
        )
