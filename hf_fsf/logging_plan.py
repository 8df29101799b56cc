"""Where each logged number goes during a Trainer run, sized so that `trainer_state.json` stays small at any depth.

Three destinations, three sizes (every key is `fsf/...`; per-block keys are `fsf/<block>/<field>`):

- the console and `trainer_state.json`'s `log_history`: a few summaries (`log_summary`, 5 by default, about
  50 bytes each in the JSON file), whatever the number of blocks;
- the trackers of `report_to` (TensorBoard, W&B, ...): every summary plus the per-block fields in `log_blocks`;
- `fsf_stats.jsonl`: everything, one record per measured step (written by the callback, unchanged).

The Trainer appends a copy of the log entry to `log_history` before it calls `on_log` with the entry itself, and
the trackers read that entry in their own `on_log`. So keys added to the entry reach the trackers only, and keys
that should also be kept are added to `log_history[-1]` as well.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

from hf_fsf.stats import BLOCK_FIELDS, StepStats

PREFIX = "fsf"

# Per-block fields a user can send to the trackers: the BlockStats fields, the block's gradient norm ‖∇_g L‖
# (StepStats.group_grad_norms) and the per-block scale of FSCOptimizer (`last_scales`).
BLOCK_LOG_FIELDS = (*BLOCK_FIELDS, "grad_norm", "scale")

# The step-level keys of StepStats.to_dict (its summary() plus the step's totals).
SUMMARY_KEYS = (
    "loss",
    "stem_contribution",
    "head_contribution",
    "grad_scale",
    "valid",
    "total_loss_decrease",
    "fsf_ratio_max_error",
    "contribution_share_min",
    "contribution_share_max",
    *(
        f"{name}_{stat}"
        for name in ("cos_theta", "relative_speed", "sensitivity")
        for stat in ("min", "mean", "max")
    ),
)

DEFAULT_LOG_BLOCKS = ("cos_theta", "relative_speed", "contribution", "scale")
DEFAULT_LOG_SUMMARY = (
    "cos_theta_min",
    "cos_theta_mean",
    "relative_speed_mean",
    "total_loss_decrease",
    "fsf_ratio_max_error",
)


def checked_names(argument: str, names: str | Iterable[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    """`names` as a tuple of known names (a single string is one name), or a ValueError naming the choices."""
    if isinstance(names, str):
        names = (names,)
    try:
        names = tuple(names)
    except TypeError:
        raise ValueError(
            f"FeatureSpeedCallback({argument}=...): expected names from {allowed}, got {type(names).__name__}."
        ) from None
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"FeatureSpeedCallback({argument}=...): unknown {unknown}; choose from {allowed}.")
    return names


def flat_stats(stats: StepStats, scales: dict[str, float] | None) -> dict[str, float]:
    """Every loggable key of one step: StepStats.to_dict plus the per-group gradient norms and FSC scales."""
    flat = stats.to_dict(PREFIX)
    flat.update({f"{PREFIX}/{group}/grad_norm": norm for group, norm in stats.group_grad_norms.items()})
    flat.update({f"{PREFIX}/{group}/scale": float(s) for group, s in (scales or {}).items()})
    return flat


class Averages:
    """Running means of the flat stats between two log entries (angle fields only over the angle steps)."""

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


def for_trackers(means: dict[str, float], log_blocks: tuple[str, ...]) -> dict[str, float]:
    """Every summary, and the per-block keys whose field is in `log_blocks`."""
    out = {}
    for key, value in means.items():
        parts = key.split("/")
        if len(parts) == 2 or parts[-1] in log_blocks:  # fsf/<summary> or fsf/<block>/<field>
            out[key] = value
    return out


def for_history(means: dict[str, float], log_summary: tuple[str, ...]) -> dict[str, float]:
    """The summaries kept in log_history and shown on the console."""
    return {f"{PREFIX}/{k}": means[f"{PREFIX}/{k}"] for k in log_summary if f"{PREFIX}/{k}" in means}
