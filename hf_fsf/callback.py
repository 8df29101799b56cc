"""FeatureSpeedCallback: the probe in a transformers.Trainer run, in one line.

    trainer = Trainer(..., callbacks=[FeatureSpeedCallback(every=1, angle_every=50)])

A thin adapter: the Trainer's events drive the probe's begin / before-step / after-step calls; the stats go to
`output_dir/fsf_stats.jsonl` (one line per measured step), to the Trainer's own logs (averaged between logging
steps, so every `report_to` backend and `state.log_history` receive them), and to figures at the end of training.

Ordering: the Trainer calls user callbacks after its reporting integrations, and records a log entry before any
`on_log` runs. So at train begin this callback moves itself to the front of the Trainer's callback list; its
`on_log` then adds the `fsf/...` keys to the entry before TensorBoard, W&B, ... see it. The console printer is
told to show only the summary keys.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections import defaultdict

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, PrinterCallback, ProgressCallback

from hf_fsf.probe import FeatureSpeedProbe
from hf_fsf.stats import STATS_FILE, StepStats

PREFIX = "fsf"
# Keys shown on the console (all keys still reach the trackers and log_history).
CONSOLE_KEYS = (
    "cos_theta_min",
    "cos_theta_mean",
    "relative_speed_mean",
    "total_loss_decrease",
    "fsf_ratio_max_error",
)


def _real_optimizer(optimizer):
    """accelerate wraps the optimizer; the real one is `.optimizer`."""
    return getattr(optimizer, "optimizer", optimizer)


class _Averages:
    """Running means of the flat stats between two logging steps (angle fields only over angle steps)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, flat: dict[str, float]) -> None:
        for key, value in flat.items():
            if value is not None and math.isfinite(value):
                self.sums[key] += value
                self.counts[key] += 1

    def pop(self) -> dict[str, float]:
        means = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}
        self.sums.clear()
        self.counts.clear()
        return means


def _quiet_console(printer: TrainerCallback) -> None:
    """Makes the console printer show only the summary fsf/ keys (its type and place are left unchanged)."""
    if getattr(printer, "_fsf_quiet", False):
        return
    original = printer.on_log

    def on_log(args, state, control, logs=None, **kwargs):
        if logs:
            logs = {
                k: v
                for k, v in logs.items()
                if not k.startswith(PREFIX + "/") or k.split("/", 1)[1] in CONSOLE_KEYS
            }
        return original(args, state, control, logs=logs, **kwargs)

    printer.on_log = on_log
    printer._fsf_quiet = True


class FeatureSpeedCallback(TrainerCallback):
    """Per-block feature speed, angle, sensitivity and contribution in every Trainer run.

    every: cheap stats (no re-forward) every `every` optimizer steps. angle_every: the angle (one extra no-grad
    forward over the step's micro-batches, random state replayed) every `angle_every` steps; 0 disables it.
    blocks: as in FeatureSpeedProbe (None: auto-detect). figures: write the report at train end.
    """

    def __init__(self, every: int = 1, angle_every: int = 50, blocks=None, figures: bool = True) -> None:
        if every < 1 or angle_every < 0:
            raise ValueError("FeatureSpeedCallback: every must be >= 1 and angle_every >= 0 (0 = never).")
        self.every, self.angle_every, self.blocks, self.figures = every, angle_every, blocks, figures
        self.probe: FeatureSpeedProbe | None = None
        self.averages = _Averages()
        self.last: StepStats | None = None
        self._measuring = False
        self._jsonl: str | None = None

    # --- Trainer events ------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._move_to_front()
        try:
            self.probe = FeatureSpeedProbe(model, blocks=self.blocks, strict=False)
        except Exception as error:  # a model we cannot read must not stop training
            warnings.warn(f"FeatureSpeedCallback disabled: {error}", stacklevel=2)
            self.probe = None
            return
        if getattr(args, "fp16", False):
            warnings.warn(
                "FeatureSpeedCallback: fp16 training scales the loss (GradScaler), so backward norms, contributions and "
                "sensitivities are off by the loss scale; use bf16, or read only cos θ and relative speed.",
                stacklevel=2,
            )
        self._jsonl = os.path.join(args.output_dir, STATS_FILE)
        if state.is_world_process_zero:
            self._truncate_after(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step  # steps done so far; this step will be number step + 1
        angle = self.angle_every > 0 and step % self.angle_every == 0
        self._measuring = self.probe is not None and (step % self.every == 0 or angle)
        if self._measuring:
            self._guard(self.probe.begin_step, angle=angle)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._measuring:
            self._measuring = self._guard(self.probe.before_optimizer_step) is not False

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self._measuring:
            return
        self._measuring = False
        stats = self._guard(self.probe.after_optimizer_step)
        if not isinstance(stats, StepStats):
            return
        stats.step = state.global_step + 1
        scales = getattr(_real_optimizer(optimizer), "last_scales", None)
        record = stats.to_record()
        if scales:
            record["scales"] = dict(scales)
        self.last = stats
        if stats.valid:
            flat = stats.to_dict(PREFIX)
            flat.update({f"{PREFIX}/{name}/scale": float(s) for name, s in (scales or {}).items()})
            self.averages.add(flat)
        if state.is_world_process_zero and self._jsonl:
            os.makedirs(os.path.dirname(self._jsonl) or ".", exist_ok=True)
            with open(self._jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return  # evaluation and end-of-training summaries
        means = self.averages.pop()
        logs.update(means)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(means)  # the entry was recorded before on_log ran

    def on_train_end(self, args, state, control, **kwargs):
        if self.probe is not None:
            self.probe.close()
            self.probe = None
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

    def _move_to_front(self) -> None:
        """Reorders the Trainer's callbacks (see the module docstring). The handler is the caller's `self`."""
        frame = sys._getframe(1)
        while frame is not None and not isinstance(frame.f_locals.get("self"), CallbackHandler):
            frame = frame.f_back
        if frame is None:
            warnings.warn(
                "FeatureSpeedCallback: Trainer callback list not found; fsf/ keys reach log_history only.",
                stacklevel=3,
            )
            return
        callbacks = frame.f_locals["self"].callbacks
        # Removing at index i and inserting at 0 keeps the running iteration over the list intact.
        callbacks.remove(self)
        callbacks.insert(0, self)
        for callback in callbacks:
            if isinstance(callback, (ProgressCallback, PrinterCallback)):
                _quiet_console(callback)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records of steps after the checkpoint: they are measured again."""
        if not os.path.exists(self._jsonl):
            return
        kept = []
        with open(self._jsonl) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut short when a run was killed
        tmp = self._jsonl + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self._jsonl)
