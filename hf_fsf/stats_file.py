"""Writing `fsf_stats.jsonl` during training: one strict-JSON record per measured step, resume-safe.

hf_fsf/report.py reads it back (nulls included).
"""

from __future__ import annotations

import json
import math
import os


def _strict(value):
    """NaN and ±inf (in a step marked invalid) become null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def append_record(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(_strict(record), allow_nan=False) + "\n")


def truncate_after(path: str, step: int) -> None:
    """On resume, drop the records of steps after the checkpoint: they are measured again."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short when a run was killed
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
