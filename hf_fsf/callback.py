"""FeatureSpeedCallback: the probe in a transformers.Trainer run, in one line.

    trainer = Trainer(..., callbacks=[FeatureSpeedCallback(every=1, angle_every=50)])

A thin adapter: the Trainer's events drive the probe's begin / before-step / after-step calls, and the stats go
- to `output_dir/fsf_stats.jsonl`, everything, one line per measured step;
- averaged between log entries, to the `report_to` trackers: every summary and the per-block fields `log_blocks`,
  plus block × step heatmaps every `heatmap_every` log entries (hf_fsf/tracker_images.py);
- to the console and `trainer_state.json`'s `log_history`: the summaries `log_summary` only, so the file grows by
  well under 1 KB per log entry at any depth (hf_fsf/logging_plan.py says what goes where and why);
- at train end, to the report `output_dir/fsf_report/`.

A wrong configuration (blocks not found, a bad argument) stops the run before its first step with a ValueError;
a fault during training is a warning and a skipped measurement. A run that died (Ctrl-C, OOM) never reached
`on_train_end`: the next run of the same callback closes its probe before it opens a new one.

Ordering: the Trainer calls user callbacks after its reporting integrations and gives a callback no handle on the
others, so at train begin this callback finds the Trainer's callback list (see `_trainer_callbacks`) and moves
itself to the front: its `on_log` then adds the `fsf/...` keys to the entry before TensorBoard, W&B, ... see it.
"""

from __future__ import annotations

import numbers
import os
import sys
import warnings

import torch
from torch import nn

try:
    import transformers  # noqa: F401  (the Trainer's callback API below)
except ImportError as err:
    raise ImportError(
        'hf_fsf.callback needs transformers: pip install "hf_fsf[hf]" (the probe, branch scaling and FSC '
        "optimizer work without it)."
    ) from err
from transformers import TrainerCallback
from transformers import __version__ as transformers_version
from transformers.trainer_callback import CallbackHandler, PrinterCallback, ProgressCallback

from hf_fsf import logging_plan, stats_file, tracker_images
from hf_fsf.layout import BlockLayout
from hf_fsf.logging_plan import PREFIX, Averages
from hf_fsf.probe import FeatureSpeedProbe
from hf_fsf.stats import STATS_FILE, StepStats


def _real_optimizer(optimizer):
    """accelerate wraps the optimizer; the real one is `.optimizer`."""
    return getattr(optimizer, "optimizer", optimizer)


def _whole_number(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"FeatureSpeedCallback({name}={value!r}): expected a whole number >= {minimum}.")
    return int(value)


def _checked_blocks(blocks):
    """The types FeatureSpeedProbe takes; whether the names exist is checked on the model at train begin."""
    if blocks is None or isinstance(blocks, (str, BlockLayout)):
        return blocks
    if isinstance(blocks, (list, tuple)) and all(isinstance(b, (str, nn.Module)) for b in blocks):
        return blocks
    raise ValueError(
        f"FeatureSpeedCallback(blocks={blocks!r}): expected None (auto-detect), the name of a block list, a list of "
        "module names or modules, or a BlockLayout."
    )


def _trainer_callbacks(callback: TrainerCallback) -> list | None:
    """The Trainer's callback list, read off the call stack; None if not found.

    No documented route exists: events pass the model, optimizer, scheduler and dataloaders but not the
    CallbackHandler, and the log entry is built inside Trainer._maybe_log_save_evaluate before any event can add
    to it. The handler is the `self` of CallbackHandler.call_event, which is calling us. If a transformers release
    changes that, tests/test_callback.py::test_fsf_keys_reach_a_tracker_registered_before_the_callback fails.
    """
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler) and callback in owner.callbacks:
            return owner.callbacks
        frame = frame.f_back
    return None


def _console_shows_the_history(printer: TrainerCallback) -> None:
    """The console printer shows only the fsf/ keys that log_history kept (its type and place stay unchanged)."""
    if getattr(printer, "_fsf_quiet", False):
        return
    original = printer.on_log

    def on_log(args, state, control, logs=None, **kwargs):
        if logs and state.log_history:
            kept = state.log_history[-1]
            logs = {k: v for k, v in logs.items() if not k.startswith(PREFIX + "/") or k in kept}
        return original(args, state, control, logs=logs, **kwargs)

    printer.on_log = on_log
    printer._fsf_quiet = True


class FeatureSpeedCallback(TrainerCallback):
    """Per-block feature speed, angle, sensitivity and contribution in every Trainer run.

    every: cheap stats (no re-forward) every `every` optimizer steps. angle_every: the angle (one extra no-grad
    forward over the step's micro-batches, random state replayed) every `angle_every` steps; 0 disables it.
    blocks: as in FeatureSpeedProbe (None: auto-detect). figures: write the report at train end.
    log_blocks: per-block fields sent to the trackers, from logging_plan.BLOCK_LOG_FIELDS (() for none).
    log_summary: summaries also shown on the console and kept in log_history, from logging_plan.SUMMARY_KEYS.
    heatmap_every: block × step heatmaps to TensorBoard / W&B every this many log entries (0: never).
    """

    def __init__(
        self,
        every: int = 1,
        angle_every: int = 50,
        blocks=None,
        figures: bool = True,
        log_blocks=logging_plan.DEFAULT_LOG_BLOCKS,
        log_summary=logging_plan.DEFAULT_LOG_SUMMARY,
        heatmap_every: int = 10,
    ) -> None:
        self.every = _whole_number("every", every, 1)
        self.angle_every = _whole_number("angle_every", angle_every, 0)
        self.heatmap_every = _whole_number("heatmap_every", heatmap_every, 0)
        if not isinstance(figures, bool):
            raise ValueError(f"FeatureSpeedCallback(figures={figures!r}): expected True or False.")
        self.blocks, self.figures = _checked_blocks(blocks), figures
        self.log_blocks = logging_plan.checked_names("log_blocks", log_blocks, logging_plan.BLOCK_LOG_FIELDS)
        self.log_summary = logging_plan.checked_names("log_summary", log_summary, logging_plan.SUMMARY_KEYS)
        self.probe: FeatureSpeedProbe | None = None
        self.last: StepStats | None = None
        self._start_run_state()

    def _start_run_state(self) -> None:
        """What one run accumulates; a new run starts from nothing."""
        self.averages = Averages()
        self._measuring = False
        self._jsonl: str | None = None
        self._callbacks: list = []
        self._heatmaps: tracker_images.HeatmapColumns | None = None
        self._logs_since_heatmap = 0

    # --- Trainer events ------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._close_probe()  # left open by a run that died before on_train_end
        self._start_run_state()
        self._take_the_front_seat()
        try:
            self.probe = FeatureSpeedProbe(model, blocks=self.blocks, strict=False)
        except (ValueError, TypeError) as error:  # the configuration: stop before the first step
            raise ValueError(f"FeatureSpeedCallback(blocks={self.blocks!r}): {error}") from error
        except Exception as error:  # a model we cannot read must not stop training
            warnings.warn(f"FeatureSpeedCallback disabled: {error}", stacklevel=2)
            return
        if getattr(args, "fp16", False):
            warnings.warn(
                "FeatureSpeedCallback: fp16 training scales the loss (GradScaler), so backward norms, contributions and "
                "sensitivities are off by the loss scale; use bf16, or read only cos θ and relative speed.",
                stacklevel=2,
            )
        self._heatmaps = tracker_images.HeatmapColumns(self.probe.block_names)
        self._jsonl = os.path.join(args.output_dir, STATS_FILE)
        if state.is_world_process_zero:
            stats_file.truncate_after(self._jsonl, state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step  # steps done so far; this step will be number step + 1
        angle = self.angle_every > 0 and step % self.angle_every == 0
        self._measuring = self.probe is not None and (step % self.every == 0 or angle)
        if self._measuring:
            # A run that dies mid-step never finishes it: after this many model calls the probe drops it.
            cap = 2 * args.gradient_accumulation_steps
            self._guard(self.probe.begin_step, angle=angle, max_micro_batches=cap)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._measuring:
            self._measuring = self._guard(self.probe.before_optimizer_step) is not False

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self._measuring:
            return
        self._measuring = False
        # FSCOptimizer's record of this step (its per-group scales) rides along in the probe's one host transfer.
        real = _real_optimizer(optimizer)
        record = getattr(real, "last_step", None)
        fsc_values = getattr(record, "values", None)
        also_read = (
            [fsc_values] if isinstance(fsc_values, torch.Tensor) and hasattr(record, "read_from") else []
        )
        stats = self._guard(
            self.probe.after_optimizer_step, **({"also_read": also_read} if also_read else {})
        )
        if not isinstance(stats, StepStats):
            return
        if also_read and self.probe.also_read_values:
            record.read_from(self.probe.also_read_values[0])
        stats.step = state.global_step + 1
        scales = getattr(real, "last_scales", None)
        record = stats.to_record()
        if scales:
            record["scales"] = dict(scales)
        self.last = stats
        if stats.valid:
            self.averages.add(logging_plan.flat_stats(stats, scales))
        if state.is_world_process_zero and self._jsonl:
            stats_file.append_record(self._jsonl, record)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return  # evaluation and end-of-training summaries
        means = self.averages.pop()
        logs.update(logging_plan.for_trackers(means, self.log_blocks))
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            # The entry was copied into log_history before on_log ran: add only what it should keep.
            state.log_history[-1].update(logging_plan.for_history(means, self.log_summary))
        if self._heatmaps is not None and state.is_world_process_zero and self.heatmap_every:
            self._heatmaps.add(state.global_step, means)
            self._logs_since_heatmap += 1
            if self._logs_since_heatmap >= self.heatmap_every:
                self._send_heatmaps(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self._logs_since_heatmap and state.is_world_process_zero:
            self._send_heatmaps(state.global_step)  # before the trackers close their writers
        self._close_probe()
        if self.figures and state.is_world_process_zero and self._jsonl and os.path.exists(self._jsonl):
            try:
                from hf_fsf.report import write_report

                write_report(
                    {os.path.basename(os.path.normpath(args.output_dir)): self._jsonl},
                    os.path.join(args.output_dir, "fsf_report"),
                )
            except Exception as error:
                warnings.warn(
                    f"FeatureSpeedCallback: the report could not be written ({error}).", stacklevel=2
                )

    # --- helpers ---------------------------------------------------------------------------------------------

    def _guard(self, fn, **kwargs):
        """Monitoring never stops training: a fault is a warning and a skipped measurement."""
        try:
            return fn(**kwargs)
        except Exception as error:
            warnings.warn(
                f"FeatureSpeedCallback: measurement skipped ({type(error).__name__}: {error}).", stacklevel=3
            )
            if self.probe is not None:
                self.probe.abort_step()
            return False

    def _close_probe(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None

    def _take_the_front_seat(self) -> None:
        """Moves this callback ahead of the trackers; the console printer shows what log_history keeps."""
        callbacks = _trainer_callbacks(self)
        if callbacks is None:
            warnings.warn(
                f"FeatureSpeedCallback: the Trainer's callback list was not found (transformers "
                f"{transformers_version}); fsf/ summaries reach log_history only, no tracker receives them.",
                stacklevel=3,
            )
            return
        # Removing at index i and inserting at 0 keeps the Trainer's running iteration over the list intact.
        callbacks.remove(self)
        callbacks.insert(0, self)
        for callback in callbacks:
            if isinstance(callback, (ProgressCallback, PrinterCallback)):
                _console_shows_the_history(callback)
        self._callbacks = callbacks

    def _send_heatmaps(self, step: int) -> None:
        self._logs_since_heatmap = 0
        receivers = tracker_images.trackers(self._callbacks)
        if not receivers or self._heatmaps is None:
            return
        try:
            tracker_images.send(self._heatmaps.images(), receivers, step)
        except Exception as error:
            warnings.warn(
                f"FeatureSpeedCallback: heatmaps not sent ({type(error).__name__}: {error}).", stacklevel=3
            )
