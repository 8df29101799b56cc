"""Records of one measured optimizer step: per-block fields of PAPER.md §3 and the step's totals."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

# The names of the two groups around the chain; every block's group is named by its module name.
STEM, HEAD = "stem", "head"

# The file a training run writes, one StepStats.to_record() per line (callback), read by the report.
STATS_FILE = "fsf_stats.jsonl"

BLOCK_FIELDS = (
    "forward_rms",
    "backward_norm",
    "contribution",
    "loss_decrease",
    "aligned_speed",
    "update_norm",
    "relative_speed",
    "cos_theta",
    "sensitivity",
    "fsf_ratio",
)


@dataclass
class BlockStats:
    """One block, one step. Fields are None where they need the angle and the step was measured without it."""

    name: str
    forward_rms: float | None = None
    backward_norm: float | None = None
    contribution: float | None = None
    loss_decrease: float | None = None
    aligned_speed: float | None = None
    update_norm: float | None = None
    relative_speed: float | None = None
    cos_theta: float | None = None
    sensitivity: float | None = None
    fsf_ratio: float | None = None


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _number(value: object) -> float | None:
    """A JSON number as a float; null, booleans, strings and other junk as None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _float(value: object) -> float:
    """A JSON number as a float, anything else as NaN (a number that is missing, not zero)."""
    number = _number(value)
    return math.nan if number is None else number


def _finite_or_none(value: object) -> object:
    """NaN and ±inf (in a step marked invalid) as None, also inside a dict: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


@dataclass
class StepStats:
    """Everything measured for one optimizer step.

    loss: the loss that was back-propagated (summed over micro-batches, averaged over ranks), None if unknown.
    grad_scale: how the gradients were rescaled between the backward pass and the step (the clipping
    coefficient; 1.0 without clipping). Contributions use the unscaled gradient ∇loss and the applied update.
    group_grad_norms: ‖∇loss‖ of the parameters of the stem, of each block and of the head.
    """

    loss: float | None
    blocks: list[BlockStats]
    stem_contribution: float = 0.0
    head_contribution: float = 0.0
    grad_scale: float = 1.0
    group_grad_norms: dict[str, float] = field(default_factory=dict)
    angle: bool = False
    valid: bool = True
    step: int | None = None

    @property
    def total_loss_decrease(self) -> float:
        """First-order loss decrease of the whole step: stem + blocks + head contributions."""
        return (
            self.stem_contribution + self.head_contribution + sum(b.contribution or 0.0 for b in self.blocks)
        )

    def summary(self) -> dict[str, float]:
        """Scalars that summarize the blocks (min / mean / max over blocks), for dashboards."""
        out: dict[str, float] = {}
        for name in ("cos_theta", "relative_speed", "sensitivity"):
            vals = _finite(getattr(b, name) for b in self.blocks)
            if vals:
                out[f"{name}_min"] = min(vals)
                out[f"{name}_mean"] = sum(vals) / len(vals)
                out[f"{name}_max"] = max(vals)
        ratios = _finite(b.fsf_ratio for b in self.blocks)
        if ratios:
            out["fsf_ratio_max_error"] = max(abs(r - 1.0) for r in ratios)
        total = self.total_loss_decrease
        contribs = _finite(b.contribution for b in self.blocks)
        if contribs and total != 0 and math.isfinite(total):
            out["contribution_share_max"] = max(contribs) / total
            out["contribution_share_min"] = min(contribs) / total
        out["total_loss_decrease"] = total
        return out

    def to_dict(self, prefix: str = "fsf") -> dict[str, float]:
        """Flat {key: float} for loggers: `fsf/<block>/<field>` and summary keys such as `fsf/cos_theta_min`."""
        out: dict[str, float] = {}
        if self.loss is not None:
            out[f"{prefix}/loss"] = self.loss
        out[f"{prefix}/stem_contribution"] = self.stem_contribution
        out[f"{prefix}/head_contribution"] = self.head_contribution
        out[f"{prefix}/grad_scale"] = self.grad_scale
        out[f"{prefix}/valid"] = float(self.valid)
        for key, value in self.summary().items():
            out[f"{prefix}/{key}"] = value
        for block in self.blocks:
            for name in BLOCK_FIELDS:
                value = getattr(block, name)
                if value is not None:
                    out[f"{prefix}/{block.name}/{name}"] = value
        return out

    def to_record(self) -> dict:
        """Nested, JSON-ready record: one line of fsf_stats.jsonl."""
        record = {f.name: _finite_or_none(getattr(self, f.name)) for f in fields(self) if f.name != "blocks"}
        record["blocks"] = [{k: _finite_or_none(v) for k, v in asdict(b).items()} for b in self.blocks]
        return record

    @classmethod
    def from_record(cls, record: Mapping) -> StepStats:
        """The StepStats of one line of fsf_stats.jsonl (the inverse of to_record), read as leniently as a file
        written by an older version or cut off mid-run needs: a missing or non-numeric block field is None, a missing
        contribution, scale or norm NaN, a missing `valid` True; blocks without a name and unknown keys (such as the
        callback's "scales") are left out. Raises ValueError when the record is not a mapping with a list of blocks.
        """
        if not isinstance(record, Mapping) or not isinstance(record.get("blocks", []), list):
            raise ValueError("StepStats.from_record: expected a mapping with a list under 'blocks'.")
        blocks = [
            BlockStats(name=str(block["name"]), **{f: _number(block.get(f)) for f in BLOCK_FIELDS})
            for block in record.get("blocks") or []
            if isinstance(block, Mapping) and block.get("name") is not None
        ]
        step = _number(record.get("step"))
        norms = record.get("group_grad_norms")
        return cls(
            loss=_number(record.get("loss")),
            blocks=blocks,
            stem_contribution=_float(record.get("stem_contribution")),
            head_contribution=_float(record.get("head_contribution")),
            grad_scale=_float(record.get("grad_scale")),
            group_grad_norms={str(k): _float(v) for k, v in norms.items()}
            if isinstance(norms, Mapping)
            else {},
            angle=bool(record.get("angle")),
            valid=record.get("valid") is not False,
            step=int(step) if step is not None and math.isfinite(step) else None,
        )
