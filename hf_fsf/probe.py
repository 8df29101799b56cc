"""FeatureSpeedProbe: hooks that measure, per block and per optimizer step, the quantities of PAPER.md §3.

One optimizer step is measured in three calls, around whatever loop owns the forward, backward and step:

    probe.begin_step(angle=True)        # start capturing
    ... forward + backward, once per micro-batch (each model call is recorded for the re-forward) ...
    probe.before_optimizer_step()       # grads are final (accumulated, all-reduced, clipped): ⟨g, w⟩ per block
    optimizer.step()
    stats = probe.after_optimizer_step()  # ⟨g, w⟩ again -> contributions; angle: re-forward -> δf

`measure_step(loss_fn, optimizer)` does all of it for one batch.

What a step costs. The cheap path (angle=False) makes one batched pass over the parameters and gradients before
and after the step (per chunk of parameters: one `torch._foreach_mul`, one concatenation, one row-wise float64 sum),
a norm of each block's output and of its gradient, and copies no parameter. Every number stays on the device as a 0-d tensor until after_optimizer_step, which scatters them
into one float64 vector (one index_add), sums it over ranks and reads it in one transfer: one host sync per step,
none in the hooks. The angle path keeps f_ℓ and b_ℓ of the step and runs one extra no-grad forward per
micro-batch with the random state of the training forward replayed (dropout), stopped after the last block.
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

from hf_fsf.distributed import cuda_rng_devices, world_size
from hf_fsf.formula import BlockSums, block_fields
from hf_fsf.layout import HEAD, STEM, BlockLayout, block_output, find_blocks, unwrap_model
from hf_fsf.sharding import (
    after_backward,
    fsdp_owner,
    is_sharded,
    local,
    refuse_deepspeed,
    registered_layout,
    unsharded,
)
from hf_fsf.stats import BlockStats, StepStats

__all__ = ["BlockStats", "FeatureSpeedProbe", "StepStats"]

# A clipping coefficient this close to 1 is rounding, not clipping.
_SCALE_ATOL = 1e-6
# Gradients that differ from a rescaling of the backward's by more than this (relative) were not just clipped.
_RESCALE_RTOL = 1e-3
# A few small parameters whose gradients are also captured in the backward pass, to detect clipping.
_REFERENCE_COUNT, _REFERENCE_NUMEL = 4, 1 << 16
# Most elements multiplied at once in the passes over parameters: bounds their temporaries (products, their rows,
# the rows in float64: 4 bytes x 4 per element). On a GPU, large (few launches); on a CPU, cache-sized (the passes
# are bound by memory traffic there).
_CHUNK_CUDA, _CHUNK_CPU = 1 << 24, 1 << 18
# The products of a chunk are laid out in rows of this many elements, each group's run padded with zeros to whole
# rows, so that one row-wise sum gives sums that each belong to one group.
_ROW = 1 << 12
# Patterns of slots kept as device index tensors (the pattern repeats step after step; a new one costs a copy).
_INDEX_CACHE = 16


def _guarded(hook):
    """Hooks run inside the user's forward and backward: with strict=False a fault there is a warning and an
    invalid step, never an exception in the training loop. Inside a torch.compile'd model they run eagerly
    (torch.compiler.disable: a graph break per call, and Dynamo neither traces the probe's Python nor guards on
    its state, so measuring or not never recompiles the model)."""

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

    return torch.compiler.disable(wrapper)


def _gated(probe: FeatureSpeedProbe, hook: Callable, tell_compiled: bool = False) -> Callable:
    """The module hook as registered. Dynamo traces this shim (not the hook, see _guarded): between measured steps
    it returns at once, so a compiled model has no graph break there (Dynamo guards on the plain bool: one compiled
    variant for measured steps, one for the others). tell_compiled: the hook learns whether the call is compiled."""

    def shim(*args):
        if not probe._hooks_live:
            return None
        if tell_compiled:
            return hook(*args, compiled=torch.compiler.is_compiling())
        return hook(*args)

    return shim


class _StopForward(BaseException):
    """Raised after the last block in a re-forward: the head is not needed. BaseException so `except Exception`
    in user code does not swallow it."""


class _Slots:
    """Where each number of a step sits in its float64 vector. The per-rank sums come first (summed over ranks
    under data parallelism); the sums over parameters follow (their gradients are already global).

    Per block: ‖f‖², ‖b‖², ‖δf‖², ⟨δf, b⟩, entries of f; per tied parameter: the stem's ⟨δ(stem output), b⟩; the
    loss. Per parameter group: ⟨g, w⟩ before and after the step, ‖g‖²; the Gram matrix of the reference gradients
    (backward, final). The per-group sums and the Gram matrix have a twin among the per-rank sums, for parameters
    sharded over ranks (FSDP2): sums over this rank's shards, summed over ranks, folded into the others (`fold`).
    """

    def __init__(self, blocks: int, tied: int, groups: int) -> None:
        self.forward, self.backward, self.update, self.dot = (i * blocks for i in range(4))
        self.tied = 4 * blocks
        self.loss = self.tied + tied
        self.numel = self.loss + 1
        self.sharded = self.numel + blocks
        self.local = self.sharded + 3 * groups + 4
        self.dot_before, self.dot_after, self.grad_sq = (self.local + i * groups for i in range(3))
        self.gram = self.local + 3 * groups
        self.size = self.gram + 4
        self.groups = groups

    def of(self, first: int, key: int) -> int:
        """The slot of group `key` among the per-group sums starting at `first` (dot_before, dot_after, grad_sq);
        key = groups + group: the sharded twin of that slot."""
        return first + key if key < self.groups else first - self.local + self.sharded + key - self.groups

    def fold(self, values: list[float]) -> None:
        """Adds the sharded twins into the per-group sums and the Gram matrix (host floats, after the reduction)."""
        for i in range(self.size - self.local):
            values[self.local + i] += values[self.sharded + i]


@dataclass
class _MicroBatch:
    replay: Callable[[], object] | None
    cpu_rng: torch.Tensor | None
    cuda_rng: list[torch.Tensor]
    autocast: list[tuple[str, torch.dtype]]
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # f_ℓ before the step (angle only)
    low_precision: bool = False  # a block ran under bf16/fp16 autocast: the angle's forwards run without it
    backwards: dict[int, torch.Tensor] = field(default_factory=dict)  # b_ℓ (angle only)
    seen: set[int] = field(default_factory=set)  # blocks captured (gradient checkpointing re-runs them)
    last: int = -1  # the last block captured: blocks run in the order of the layout
    hooked: set[int] = field(default_factory=set)  # blocks whose output gradient is being captured
    references_queued: bool = False  # FSDP2: the reference gradients are copied when the backward pass ends
    tied: dict[int, tuple[tuple, dict, torch.Tensor]] = field(
        default_factory=dict
    )  # inputs, output of tied stem
    tied_backwards: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Step:
    """One measured step. Its numbers are 0-d device tensors with their slots (see _Slots), added up at the end:
    `norms` are squared first, `sums` and `rows` are added as they are."""

    angle: bool
    device: torch.device
    numel: list[int]
    reference: list[torch.Tensor | None]  # ∇ of the reference parameters from the backward pass, float64
    micro: list[_MicroBatch] = field(default_factory=list)
    current: _MicroBatch | None = None
    manual: bool = False  # inside a micro_batch() context: the model's own calls are not recorded
    norms: list[torch.Tensor] = field(default_factory=list)
    norm_slots: list[int] = field(default_factory=list)
    sums: list[torch.Tensor] = field(default_factory=list)
    sum_slots: list[int] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)  # 1-d tensors of sums, one slot per element
    row_slots: list[int] = field(default_factory=list)
    has_loss: bool = False
    phase: str = "capture"  # capture -> stepped -> done
    failed: str | None = None  # a hook's error message (strict=False)
    caller_loss: bool = False  # measure_step records loss_fn's loss; the model's own .loss is not added
    compiled: bool = False  # a hook ran inside a region torch.compile compiled
    max_micro_batches: int | None = None  # model calls after which an unfinished step is dropped

    def add_norm(self, value: torch.Tensor, slot: int) -> None:
        self.norms.append(value if value.device == self.device else value.to(self.device))
        self.norm_slots.append(slot)

    def add_sum(self, value: torch.Tensor, slot: int) -> None:
        self.sums.append(value if value.device == self.device else value.to(self.device))
        self.sum_slots.append(slot)

    def add_rows(self, values: torch.Tensor, slots: list[int]) -> None:
        """Each element of the 1-d `values` into its slot."""
        self.rows.append(values.to(device=self.device, dtype=torch.float64, non_blocking=True))
        self.row_slots.extend(slots)


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    state = []
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            state.append((device_type, torch.get_autocast_dtype(device_type)))
    return state


_WIDE = (torch.float32, torch.float64)


def _low_precision_autocast() -> bool:
    return any(dtype not in _WIDE for _, dtype in _autocast_state())


@contextlib.contextmanager
def _without_autocast(stack: contextlib.ExitStack):
    """Autocast stays off inside, also where the model's own forward enters it (accelerate wraps the forward in
    it for mixed precision): at fine-tuning rates δf is below bf16's resolution of f, so the angle's forwards run
    in the parameters' precision. Patches autocast's __enter__ for the duration of a synchronous replay."""
    autocast = torch.amp.autocast_mode.autocast
    enter = autocast.__enter__

    def disabled(self):
        enabled, self._enabled = self._enabled, False
        try:
            return enter(self)
        finally:
            self._enabled = enabled

    for device_type, _ in _autocast_state():  # an autocast region around the replay
        stack.enter_context(torch.autocast(device_type, enabled=False))
    autocast.__enter__ = disabled
    try:
        yield
    finally:
        autocast.__enter__ = enter


def _draws_dropout(model: nn.Module) -> bool:
    """Whether a training forward draws dropout masks: a dropout module with p > 0, or a float attribute named
    like a dropout rate (HF attention passes it to the attention kernel), in a module in training mode."""
    for module in model.modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd):
            if module.p > 0:
                return True
            continue
        for name, value in vars(module).items():
            if isinstance(value, float) and value > 0 and ("dropout" in name or "pdrop" in name):
                return True
    return False


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """At least float32: δf and inner products of low-precision tensors lose everything in bf16."""
    return t if t.dtype in _WIDE else t.float()


def _widened(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in at least float32 (one batched copy for low-precision ones): products of bf16 numbers are
    exact in float32 and would be rounded in bf16."""
    if all(t.dtype in _WIDE for t in tensors):
        return tensors
    out = [torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in tensors]
    torch._foreach_copy_(out, tensors)
    return out


def _norm(t: torch.Tensor) -> torch.Tensor:
    """‖t‖ accumulated in float64: block sums are compared across micro-batch splits and ranks to 1e-9."""
    return torch.linalg.vector_norm(t.detach(), dtype=torch.float64)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_as_float(a) * _as_float(b)).sum(dtype=torch.float64)


def _gradient_scale(gram: list[float]) -> tuple[float, bool]:
    """(The factor between the gradients in .grad and those of the backward pass, whether .grad is something
    other than a rescaling of the backward's) from the Gram matrix of the reference gradients [backward, final].
    1.0 when nothing rescaled them, or when it cannot be told."""
    seen_sq, seen_final, final_sq = gram[0], gram[1], gram[3]
    if seen_sq == 0.0 or not math.isfinite(seen_sq):
        return 1.0, False
    scale = seen_final / seen_sq
    # ‖final − scale·seen‖² = ‖final‖² − ⟨final, seen⟩²/‖seen‖²; float64 leaves ~1e-8 of the relative residual.
    residual = math.sqrt(max(final_sq - seen_final * scale, 0.0)) / max(math.sqrt(final_sq), 1e-300)
    if residual > _RESCALE_RTOL:
        return 1.0, True
    return (1.0 if abs(scale - 1.0) < _SCALE_ATOL else scale), False


@dataclass
class _Chunk:
    """Pieces of parameters with a dense gradient, multiplied in one go. Each group's run of pieces is followed by
    zeros up to whole rows of _ROW elements: pads[i] zeros follow piece i; row_groups: the group of each row."""

    grads: list[torch.Tensor] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    pads: list[int] = field(default_factory=list)
    row_groups: list[int] = field(default_factory=list)
    size: int = 0
    run: int = 0  # elements of the last group's run so far

    def add(self, grad: torch.Tensor, param: torch.Tensor, group: int) -> None:
        if self.groups and self.groups[-1] != group:
            self.close_run()
        self.grads.append(grad)
        self.params.append(param)
        self.groups.append(group)
        self.pads.append(0)
        self.size += grad.numel()
        self.run += grad.numel()

    def close_run(self) -> None:
        pad = -self.run % _ROW
        self.pads[-1] = pad
        self.row_groups += [self.groups[-1]] * ((self.run + pad) // _ROW)
        self.size += pad
        self.run = 0


def _chunks(params: list[tuple[int, nn.Parameter]], limit: int) -> list[_Chunk]:
    """(group, parameter) pairs with a dense gradient, in chunks of about `limit` elements on one device; a
    parameter larger than `limit` is cut into flat pieces. A sharded parameter (DTensor) gives its local shard."""
    chunks, chunk = [], _Chunk()
    for group, param in params:
        grad = param.grad
        if grad is None or grad.is_sparse:
            continue
        grad, param = local(grad), local(param)
        pieces = [(grad, param)]
        if param.numel() > limit:
            pieces = list(zip(grad.reshape(-1).split(limit), param.reshape(-1).split(limit)))
        for g, w in pieces:
            if chunk.grads and (chunk.size + g.numel() > limit or g.device != chunk.grads[0].device):
                chunk.close_run()
                chunks.append(chunk)
                chunk = _Chunk()
            chunk.add(g, w, group)
    if chunk.grads:
        chunk.close_run()
        chunks.append(chunk)
    return chunks


class FeatureSpeedProbe:
    """Measures the feature speed formula on a chain of blocks.

    model: any nn.Module (DDP / accelerate wrappers are unwrapped). blocks: None (auto-detect, see
    `find_blocks`), module names, modules, or a BlockLayout. strict: raise on user errors (a non-scalar loss, an
    optimizer that changed nothing); False (used inside training) warns and marks the step invalid instead.
    grad_average: under torch.distributed, gradients are averaged over ranks (DDP), so the backward pass of the
    global loss on this rank's slice is b / world_size. example_inputs / trace: how `find_blocks` orders the
    parameters outside the blocks (one forward pass on example or dummy inputs; trace=False: registration order).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[str] | Sequence[nn.Module] | BlockLayout | None = None,
        *,
        strict: bool = True,
        grad_average: bool = True,
        example_inputs: object = None,
        trace: bool = True,
    ) -> None:
        refuse_deepspeed(model)
        self.model = unwrap_model(model)
        layout = find_blocks(self.model, blocks, example_inputs=example_inputs, trace=trace)
        self.layout: BlockLayout = registered_layout(self.model, layout)
        self.strict = strict
        self.grad_average = grad_average
        self._step: _Step | None = None
        self._reforwarding = False
        self._warned_nothing_moved = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.also_read_values: list[list[float]] = []  # see after_optimizer_step
        first = next(self.model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self._chunk = _CHUNK_CUDA if self.device.type == "cuda" else _CHUNK_CPU
        self._cuda_devices = cuda_rng_devices(self.model)
        self._groups = self.layout.parameter_groups(tied="own")
        # Sums over a sharded parameter go to the sharded twin of its group's slot (see _Slots.of).
        groups = len(self._groups)
        self._params = [
            (g + groups * is_sharded(p), p) for g, params in enumerate(self._groups.values()) for p in params
        ]
        self._sharded = any(key >= groups for key, _ in self._params)
        self._tied_owners = [
            fsdp_owner(tied.stem_module, self.model) if self._sharded else None for tied in self.layout.tied
        ]
        self._slots = _Slots(len(self.layout.blocks), len(self.layout.tied), len(self._groups))
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        self._zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self._zeros: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}  # padding of rows
        self._reference = self._reference_parameters()
        self._install_hooks()

    # --- public API ---------------------------------------------------------------------------------------

    @property
    def _step(self) -> _Step | None:
        """The step being measured, if any."""
        return self._current_step

    @_step.setter
    def _step(self, step: _Step | None) -> None:
        self._current_step = step
        self._hooks_live = step is not None  # what the module hooks check first (_gated)

    @property
    def block_names(self) -> list[str]:
        return self.layout.names

    def measure_step(
        self, loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, angle: bool = True
    ) -> StepStats:
        """Zero-grad, loss_fn() + backward, optimizer.step(), and (angle) the re-forward: the stats of that step.

        loss_fn() runs the forward pass and returns the scalar loss. It is called exactly once, so it may consume an
        iterator (`lambda: model(**next(batches)).loss`) or draw random numbers. The angle re-runs the calls of the
        probe's model that loss_fn made, with their recorded inputs and random state, not loss_fn: the blocks must
        run inside a call of the model. A loss_fn that runs them otherwise (calls a submodule directly) gets no
        angle (an error; with strict=False a warning and the stats without it). An optimizer with `observe_loss`
        (FSCOptimizer) is handed the loss before its step.
        """
        self.model.zero_grad(set_to_none=True)
        optimizer.zero_grad(set_to_none=True)
        self.begin_step(angle=angle)
        try:
            loss = self._forward_backward(loss_fn)
        except BaseException:
            self._step = None
            raise
        self.before_optimizer_step()
        if hasattr(optimizer, "observe_loss"):  # FSCOptimizer: its target is rate x this step's loss
            optimizer.observe_loss(loss.detach())
        optimizer.step()
        return self.after_optimizer_step()

    def _forward_backward(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """loss_fn() once, and its backward; each call of the model in it is a micro-batch, as in a training loop."""
        step = self._step
        step.caller_loss = True
        # Blocks run outside a call of the model land here: measured, but there is no call to replay.
        outside = step.current = _MicroBatch(replay=None, cpu_rng=None, cuda_rng=[], autocast=[])
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
        if outside.seen or outside.tied:
            step.micro.insert(0, outside)
            if step.angle:
                self._problem(
                    "loss_fn ran blocks outside a call of the probe's model (a submodule called directly?), and the "
                    "angle re-runs the model calls of the step, not loss_fn; call the model itself in loss_fn"
                )
                step.angle = False
        self.record_loss(loss)
        loss.backward()
        return loss

    def begin_step(self, angle: bool = False, max_micro_batches: int | None = None) -> None:
        """Start measuring one optimizer step; every model call until before_optimizer_step() is a micro-batch.

        .grad must be empty (optimizer.zero_grad(set_to_none=True) before): the step's gradients are what its
        backward passes put there. max_micro_batches: a step still capturing after this many model calls is
        dropped with a warning, so that a loop that died mid-step does not keep recording every later forward.
        """
        if max_micro_batches is not None and (
            isinstance(max_micro_batches, bool)
            or not isinstance(max_micro_batches, int)
            or max_micro_batches < 1
        ):
            raise ValueError(
                f"begin_step(max_micro_batches={max_micro_batches!r}): expected None or an int >= 1."
            )
        if self._step is not None and self._step.phase != "done":
            warnings.warn(
                "FeatureSpeedProbe.begin_step: the previous step was not finished; it is discarded.",
                stacklevel=2,
            )
        self._step = None
        stale = any(p.grad is not None for _, p in self._params)  # host-only: no op, no sync
        message = (
            "gradients were already in .grad at begin_step (zero_grad not called, or zero_grad(set_to_none=False)): "
            "the step's backward adds to them, so .grad is not this step's gradient. Call "
            "optimizer.zero_grad(set_to_none=True) before begin_step"
        )
        if stale and self.strict:
            raise RuntimeError(f"FeatureSpeedProbe: {message}.")
        self._step = _Step(
            angle=angle,
            device=self.device,
            numel=[0] * len(self.layout.blocks),
            reference=[None] * len(self._reference),
            max_micro_batches=max_micro_batches,
            failed=message if stale else None,
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
        step.add_sum(loss.detach().reshape(()), self._slots.loss)
        step.has_loss = True

    def before_optimizer_step(self) -> None:
        """Call when the gradients are final (after accumulation, all-reduce and clipping), before the step."""
        step = self._require_step("before_optimizer_step")
        if step.phase != "capture":
            raise RuntimeError("before_optimizer_step was already called for this step.")
        if step.angle and step.compiled and _draws_dropout(self.model):
            self._problem(
                "dropout > 0 under torch.compile: the compiled forward draws its dropout masks with its own random "
                "number generator (inductor), which the re-forward cannot replay, so no angle this step (the cheap "
                "stats stand). For the angle, set dropout to 0 on measured steps, or train eagerly"
            )
            step.angle = False
        self._reference_gram(step)
        self._inner_products(step, before=True)
        if step.angle and any(m.low_precision for m in step.micro):
            self._replay(step, before=True)
        step.phase = "stepped"

    def after_optimizer_step(self, also_read: Sequence[torch.Tensor] = ()) -> StepStats:
        """Call right after optimizer.step(): returns the step's stats (valid=False with a warning on NaN/inf).

        also_read: device tensors of the same step to bring to the host in the probe's one transfer (e.g.
        FSCOptimizer's `last_step.values`); afterwards `also_read_values` holds each one's values, flattened, as a
        list of floats.
        """
        step = self._require_step("after_optimizer_step")
        self.also_read_values = []
        if step.phase != "stepped":
            raise RuntimeError("after_optimizer_step needs before_optimizer_step() first.")
        try:
            self._inner_products(step, before=False)
            self._tied_stem_dots(step)
            if step.angle:
                self._replay(step)
            return self._finish(step, self._gather(step, also_read))
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

    def _reference_parameters(self) -> list[nn.Parameter]:
        """A few small parameters whose gradients are also taken in the backward pass, before any clipping."""
        chosen, total = [], 0
        # Under FSDP2 the gradients of sharded parameters are read at the end of the backward pass (see
        # _copy_sharded_references): the references are all sharded or all plain.
        candidates = [
            p for p in self.model.parameters() if p.requires_grad and is_sharded(p) == self._sharded
        ]
        for param in sorted(candidates, key=lambda p: p.numel()):
            if chosen and (total + param.numel() > _REFERENCE_NUMEL or len(chosen) == _REFERENCE_COUNT):
                break
            chosen.append(param)
            total += param.numel()
        return chosen

    def _install_hooks(self) -> None:
        model = self.model
        self._handles.append(
            model.register_forward_pre_hook(_gated(self, self._on_model_call, True), with_kwargs=True)
        )
        self._handles.append(model.register_forward_hook(_gated(self, self._on_model_output)))
        for index, (_, module) in enumerate(self.layout.blocks):
            hook = _gated(self, functools.partial(self._on_block_output, index), True)
            self._handles.append(module.register_forward_hook(hook))
        for index, tied in enumerate(self.layout.tied):
            hook = _gated(self, functools.partial(self._on_tied_stem_output, index))
            self._handles.append(tied.stem_module.register_forward_hook(hook, with_kwargs=True))
        for index, param in enumerate(self._reference):
            self._handles.append(param.register_hook(functools.partial(self._on_reference_grad, index)))

    # --- hooks: O(1) small device ops each, no host sync ------------------------------------------------------

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
    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict, compiled: bool = False) -> None:
        step = self._capturing()
        if step is None or step.manual or not torch.is_grad_enabled():
            return
        step.compiled = step.compiled or compiled
        if step.max_micro_batches is not None and len(step.micro) >= step.max_micro_batches:
            self._step = None  # what it holds (features, inputs to replay) goes with it
            warnings.warn(
                f"FeatureSpeedProbe: a step was begun and never finished after {len(step.micro)} model calls (the "
                "training loop stopped?); it is discarded. Call probe.close() to remove the hooks.",
                stacklevel=2,
            )
            return
        replay = functools.partial(module, *args, **kwargs) if step.angle else None
        step.current = self._new_micro_batch(replay)

    @_guarded
    def _on_model_output(self, module: nn.Module, args: tuple, output: object) -> None:
        step = self._capturing()
        if step is None or step.manual or step.caller_loss:
            return
        loss = getattr(output, "loss", None) if not isinstance(output, dict) else output.get("loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad:
            # The gradient reaching the model's loss is the factor the training loop applied to it
            # (1/accumulation steps, ...), so loss * grad is exactly what was back-propagated.
            loss.register_hook(functools.partial(self._on_loss_grad, step, loss.detach().reshape(())))

    @_guarded
    def _on_loss_grad(self, step: _Step, value: torch.Tensor, grad: torch.Tensor) -> None:
        # addcmul onto a float64 zero: the product in float64, in one op.
        zero = self._zero if self._zero.device == value.device else self._zero.to(value.device)
        step.add_sum(torch.addcmul(zero, value, grad.detach().reshape(())), self._slots.loss)
        step.has_loss = True

    @_guarded
    def _on_block_output(
        self, index: int, module: nn.Module, args: tuple, output: object, compiled: bool = False
    ) -> None:
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
        step.compiled = step.compiled or compiled
        if index not in micro.seen:  # gradient checkpointing re-runs blocks in the backward pass: count once
            if index < micro.last:
                self._refuse(step, self._order_problem(micro, index))
            micro.seen.add(index)
            micro.last = index
            step.add_norm(_norm(features), self._slots.forward + index)
            step.numel[index] += features.numel()
            if step.angle:
                micro.features[index] = features.detach().clone()
                micro.low_precision = micro.low_precision or _low_precision_autocast()
        elif (
            torch._C._current_graph_task_id() == -1
        ):  # a second run outside the backward pass (checkpointing's)
            self._refuse(step, self._repeat_problem(index))
        # With reentrant checkpointing the first run is under no_grad: the re-run's output carries the gradient.
        if index not in micro.hooked and features.requires_grad and torch.is_grad_enabled():
            micro.hooked.add(index)
            features.register_hook(functools.partial(self._on_block_backward, step, micro, index))

    def _refuse(self, step: _Step, message: str) -> None:
        """A step the probe cannot measure exactly: an error (strict), else the step is marked invalid."""
        if self.strict:
            raise RuntimeError(f"FeatureSpeedProbe: {message}.")
        if step.failed is None:
            step.failed = message

    def _repeat_problem(self, index: int) -> str:
        return (
            f"block {self.layout.names[index]!r} ran more than once in one forward (a layer shared across depth, as "
            "in ALBERT, a layer list that repeats a module, a weight-shared loop; or two model calls inside one "
            "micro_batch()), but the probe measures a chain in which each block runs once per model call. Measure a "
            "model whose blocks each run once (e.g. ALBERT with num_hidden_groups == num_hidden_layers), or pass "
            "blocks= that each run once per forward"
        )

    def _order_problem(self, micro: _MicroBatch, index: int) -> str:
        names = self.layout.names
        return (
            f"block {names[index]!r} ran after {names[micro.last]!r}, but the blocks are listed the other way round; "
            "list blocks= in the order the forward runs them (or leave blocks=None with trace=True so that "
            "find_blocks orders them)"
        )

    @_guarded
    def _on_block_backward(self, step: _Step, micro: _MicroBatch, index: int, grad: torch.Tensor) -> None:
        if self._sharded and not micro.references_queued:
            micro.references_queued = True
            after_backward(functools.partial(self._copy_sharded_references, step))
        step.add_norm(_norm(grad), self._slots.backward + index)
        if step.angle:
            micro.backwards[index] = grad.detach().clone()

    def _on_block_reforward(self, index: int, output: object) -> None:
        step, micro = self._step, self._step.current
        after = block_output(output)
        before, backward = micro.features.get(index), micro.backwards.get(index)
        if step.phase == "capture":  # the forward before the step, in the parameters' precision (_replay)
            if after is not None and before is not None and after.shape == before.shape:
                micro.features[index] = after.detach().clone()
                micro.seen.add(index)
        elif after is not None and before is not None and after.shape == before.shape:
            delta = _as_float(after) - _as_float(before)
            step.add_norm(_norm(delta), self._slots.update + index)
            if backward is not None:  # None when nothing upstream of the block is trainable
                step.add_sum(_dot(delta, backward), self._slots.dot + index)
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
        if held is None:  # a float64 copy: clipping later changes .grad in place
            step.reference[index] = grad.detach().to(torch.float64, copy=True)
        else:
            held.add_(grad.detach())

    # --- measurement ---------------------------------------------------------------------------------------

    def _require_step(self, what: str) -> _Step:
        if self._step is None:
            raise RuntimeError(f"FeatureSpeedProbe.{what}: call begin_step() first.")
        return self._step

    def _reference_gram(self, step: _Step) -> None:
        """Gram matrix of the reference gradients [from the backward pass, in .grad]: it tells whether and by how
        much the gradients were rescaled (clipping) between the backward pass and the step (_gradient_scale)."""
        if not self._reference:
            return
        if self._sharded:
            self._sharded_reference_gram(step)
            return
        # Every rank reduces the same fixed-length buffer (zeros where a reference got no gradient locally), so
        # the collective matches even when some parameter is unused on one rank.
        seen = [
            (t if t is not None else torch.zeros(p.shape, dtype=torch.float64, device=p.device)).reshape(-1)
            for t, p in zip(step.reference, self._reference)
        ]
        final = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self._reference]
        both = torch.cat([t.to(self.device) for t in (*seen, *final)]).to(torch.float64).view(2, -1)
        world = world_size()
        if world > 1:
            dist.all_reduce(both[0])
            if self.grad_average:
                both[0] /= world
        step.add_rows((both @ both.T).reshape(-1), list(range(self._slots.gram, self._slots.gram + 4)))

    def _sharded_reference_gram(self, step: _Step) -> None:
        """Under FSDP2 both sides are this rank's shards of reduced gradients (copied when the backward pass ended,
        and in .grad): the Gram matrix is the sum over ranks of the shards' Gram matrices."""
        seen = [
            (
                t if t is not None else torch.zeros(local(p).shape, dtype=torch.float64, device=self.device)
            ).reshape(-1)
            for t, p in zip(step.reference, self._reference)
        ]
        final = [
            (local(p.grad) if p.grad is not None else torch.zeros_like(local(p))).reshape(-1)
            for p in self._reference
        ]
        both = torch.cat([t.to(self.device, torch.float64) for t in (*seen, *final)]).view(2, -1)
        first = self._slots.gram - self._slots.local + self._slots.sharded
        step.add_rows((both @ both.T).reshape(-1), list(range(first, first + 4)))

    @_guarded
    def _copy_sharded_references(self, step: _Step) -> None:
        """At the end of a backward pass under FSDP2 (the hooks on sharded parameters never fire: FSDP computes with
        gathered copies and writes .grad itself): the reference gradients as reduced, before the loop clips them."""
        for index, param in enumerate(self._reference):
            if param.grad is not None:
                step.reference[index] = local(param.grad).detach().to(torch.float64, copy=True)

    @torch.no_grad()
    def _inner_products(self, step: _Step, before: bool) -> None:
        """⟨g, w⟩ per parameter group (and ‖g‖² before the step), a few batched ops per chunk of parameters.

        The contribution is the difference of ⟨g, w⟩ before and after the step, so the sums are float64 (products
        of float32 numbers rounded once, then summed without further loss): the difference keeps its digits even
        when δw ≪ w.
        """
        first = self._slots.dot_before if before else self._slots.dot_after
        for chunk in _chunks(self._params, self._chunk):
            if before:  # a norm is not a cancelling difference: float32 accumulation is enough
                dtype = None if all(g.dtype in _WIDE for g in chunk.grads) else torch.float32
                for norm, key in zip(torch._foreach_norm(chunk.grads, 2, dtype=dtype), chunk.groups):
                    step.add_norm(norm, self._slots.of(self._slots.grad_sq, key))
            products = torch._foreach_mul(_widened(chunk.grads), _widened(chunk.params))
            parts = []
            for product, pad in zip(products, chunk.pads):
                parts.append(product.reshape(-1))
                if pad:
                    parts.append(self._padding(pad, product.dtype, product.device))
            rows = (torch.cat(parts) if len(parts) > 1 else parts[0]).view(-1, _ROW)
            step.add_rows(
                rows.sum(1, dtype=torch.float64), [self._slots.of(first, k) for k in chunk.row_groups]
            )

    def _padding(self, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        zeros = self._zeros.get((dtype, device))
        if zeros is None:
            zeros = self._zeros[dtype, device] = torch.zeros(_ROW, dtype=dtype, device=device)
        return zeros[:size]

    @torch.no_grad()
    def _tied_stem_dots(self, step: _Step) -> None:
        """⟨δ(stem output), b⟩ of each tied parameter's stem module, re-run on its recorded inputs after the step.

        An embedding's output is linear in its weight, so this is exactly ⟨G_stem, δW⟩: the stem path's share.
        """
        if not self.layout.tied:
            return
        self._reforwarding = True
        try:
            for index, tied in enumerate(self.layout.tied):
                for micro in step.micro:
                    if index not in micro.tied or index not in micro.tied_backwards:
                        continue
                    args, kwargs, before = micro.tied[index]
                    with unsharded(self._tied_owners[index]):
                        after = block_output(tied.stem_module(*args, **kwargs))
                    delta = _as_float(after) - _as_float(before)
                    step.add_sum(_dot(delta, micro.tied_backwards[index]), self._slots.tied + index)
        finally:
            self._reforwarding = False

    def _replay(self, step: _Step, before: bool = False) -> None:
        """Re-runs each recorded micro-batch under no_grad, with its random state and autocast replayed: after the
        step for δf, or (before=True, micro-batches that ran under low-precision autocast) before it, for f_ℓ in
        the parameters' precision. Those micro-batches replay without autocast both times."""
        runnable = [m for m in step.micro if m.replay is not None]
        if len(runnable) < len(step.micro) or not runnable:
            self._problem(
                "the angle needs each micro-batch's forward to be replayable; this step's was not recorded"
            )
            step.angle = False
            return
        if before:
            runnable = [m for m in runnable if m.low_precision]
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
                    if micro.low_precision:
                        stack.enter_context(_without_autocast(stack))
                    else:
                        for device_type, dtype in micro.autocast:
                            stack.enter_context(torch.autocast(device_type, dtype=dtype))
                    stack.enter_context(torch.no_grad())
                    try:
                        micro.replay()
                    except _StopForward:
                        pass
                if len(micro.seen) < len(self.layout.blocks):
                    what = "forward before the step" if before else "re-forward"
                    self._problem(f"the {what} did not run every block (did the model's input change?)")
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

    @torch.no_grad()
    def _gather(self, step: _Step, also_read: Sequence[torch.Tensor] = ()) -> list[float]:
        """The step's numbers added into their slots (one index_add), summed over ranks, read in one transfer
        together with `also_read` (host copies in `also_read_values`)."""
        world = world_size()
        if world > 1:  # entries of f per block differ between ranks (sequence lengths)
            # From pinned memory without blocking: the copy does not wait for the device.
            cuda = self.device.type == "cuda"
            numel = torch.tensor(step.numel, dtype=torch.float64, pin_memory=cuda)
            step.add_rows(numel, list(range(self._slots.numel, self._slots.numel + len(step.numel))))
        parts = (
            [torch.stack(step.norms + step.sums)] if step.norms or step.sums else []
        )  # stack promotes to float64
        values = torch.cat(parts + step.rows).to(torch.float64)
        values[: len(step.norms)].square_()
        totals = torch.zeros(self._slots.size, dtype=torch.float64, device=self.device)
        totals.index_add_(0, self._index(step.norm_slots + step.sum_slots + step.row_slots), values)
        if world > 1:
            dist.all_reduce(totals[: self._slots.local])
        if not also_read:
            return totals.tolist()
        extra = [t.detach().reshape(-1).to(self.device, torch.float64) for t in also_read]
        host = torch.cat([totals, *extra]).tolist()  # one transfer for the probe's numbers and the caller's
        offset = self._slots.size
        for tensor in also_read:
            self.also_read_values.append(host[offset : offset + tensor.numel()])
            offset += tensor.numel()
        return host[: self._slots.size]

    def _index(self, slots: list[int]) -> torch.Tensor:
        """The slots as a device index tensor; cached, since a new one is a host-to-device copy (a sync on GPU)."""
        key = tuple(slots)
        index = self._indices.get(key)
        if index is None:
            if len(self._indices) >= _INDEX_CACHE:
                self._indices.clear()
            index = self._indices[key] = torch.tensor(slots, dtype=torch.long, device=self.device)
        return index

    def _group_sums(
        self, values: list[float], scale: float, b_scale: float
    ) -> tuple[dict[str, float], dict[str, float]]:
        """(−⟨∇loss, δw⟩, ‖∇loss‖) per parameter group, ∇loss being .grad / scale. The tied groups' contributions
        are also split into the stem's share (measured at the stem's output) and the head's (the rest)."""
        s = self._slots
        contributions, norms = {}, {}
        for g, name in enumerate(self._groups):
            contributions[name] = -(values[s.dot_after + g] - values[s.dot_before + g]) / scale
            norms[name] = math.sqrt(max(values[s.grad_sq + g], 0.0)) / abs(scale)
        for index in range(len(self.layout.tied)):
            stem_share = -values[s.tied + index] * b_scale
            contributions[STEM] += stem_share
            contributions[HEAD] += contributions[f"tied:{index}"] - stem_share
        return contributions, norms

    def _finish(self, step: _Step, values: list[float]) -> StepStats:
        """StepStats from the step's vector of sums (see _Slots); every check here is on host numbers."""
        s, n, world = self._slots, len(self.layout.blocks), world_size()
        b_scale = 1.0 / world if (world > 1 and self.grad_average) else 1.0
        if self._sharded:
            s.fold(values)
        scale, not_rescaling = _gradient_scale(values[s.gram : s.gram + 4])
        if not_rescaling:
            warnings.warn(
                "FeatureSpeedProbe: the gradients were changed between the backward pass and the optimizer step in a "
                "way that is not a global rescaling (clipping by value? per-parameter clipping?); contributions use the "
                "gradients as they are in .grad.",
                stacklevel=3,
            )
        by_group, grad_norms = self._group_sums(values, scale, b_scale)
        # An optimizer that moved nothing (lr = 0 at the start of a warm-up, a step skipped by a loss scaler) gives
        # no feature update to measure: an error when measuring by hand, an invalid record inside training.
        nothing_moved = not any(c != 0.0 for c in by_group.values()) and any(
            v > 0 for v in grad_norms.values()
        )
        if nothing_moved and self.strict:
            raise RuntimeError(
                "FeatureSpeedProbe: optimizer.step() changed no parameter that has a gradient (lr = 0? a skipped "
                "step?); there is no update to measure. Check the optimizer's learning rate and parameters."
            )
        numel = values[s.numel : s.numel + n] if world > 1 else step.numel
        blocks, loss_decrease = [], by_group[STEM]
        for index, name in enumerate(self.layout.names):
            loss_decrease += by_group[name]
            sums = BlockSums(
                numel=int(numel[index]),
                forward_sq=values[s.forward + index],
                backward_sq=values[s.backward + index] * b_scale**2,
                update_sq=values[s.update + index] if step.angle else None,
                update_dot_backward=values[s.dot + index] * b_scale if step.angle else None,
            )
            blocks.append(BlockStats(name=name, **block_fields(sums, by_group[name], loss_decrease)))
        loss = values[s.loss] / world if step.has_loss else None
        checked = [
            *by_group.values(),
            *values[s.forward : s.forward + n],
            *values[s.backward : s.backward + n],
        ]
        checked += values[s.update : s.update + n] + values[s.dot : s.dot + n] if step.angle else []
        checked += [loss] if loss is not None else []
        valid = self._valid(step, checked, scale, nothing_moved)
        return StepStats(
            loss=loss,
            blocks=blocks,
            stem_contribution=by_group[STEM],
            head_contribution=by_group[HEAD],
            grad_scale=scale,
            group_grad_norms={k: v for k, v in grad_norms.items() if not k.startswith("tied:")},
            angle=step.angle,
            valid=valid,
        )

    def _valid(self, step: _Step, checked: list[float], scale: float, nothing_moved: bool) -> bool:
        """Whether the step's numbers can be trusted; a warning that says why not."""
        finite = all(math.isfinite(v) for v in checked) and math.isfinite(scale)
        if step.failed is not None:
            warnings.warn(
                f"FeatureSpeedProbe: stats of this step marked invalid ({step.failed}).", stacklevel=4
            )
        elif (
            nothing_moved and not self._warned_nothing_moved
        ):  # every step of a warm-up from 0 would repeat it
            self._warned_nothing_moved = True
            warnings.warn(
                "FeatureSpeedProbe: optimizer.step() changed no parameter that has a gradient (lr = 0, as at the "
                "start of a warm-up, or a step skipped by the loss scaler): no update to measure, stats marked "
                "invalid (said once per probe).",
                stacklevel=4,
            )
        elif not finite and not nothing_moved:
            warnings.warn(
                "FeatureSpeedProbe: NaN or inf in this step's loss, gradients or features; stats marked invalid.",
                stacklevel=4,
            )
        return finite and step.failed is None and not nothing_moved
