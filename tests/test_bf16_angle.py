"""The angle under bf16 autocast at a fine-tuning learning rate, against an independent float64 computation of the
step that was actually applied (recipes/precision_check.py): a float32 model, AdamW at lr 1e-5, autocast either
inside the model's forward (the Trainer's bf16=True, via accelerate) or around the model call (a plain loop)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "precision_check", Path(__file__).resolve().parent.parent / "recipes" / "precision_check.py"
)
precision_check = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = precision_check  # its dataclass looks its module up
_SPEC.loader.exec_module(precision_check)

TINY = precision_check.Shape(layers=2, width=32, batch=4, length=16)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("around_call", [False, True], ids=["in_forward", "around_call"])
def test_angle_under_bf16_autocast_matches_the_float64_step(family, around_call):
    result = precision_check.check(family, 1e-5, steps=1, warmup=2, shape=TINY, around_call=around_call)
    assert result["cos_gap"] <= 0.01, result
    assert result["ratio_gap"] <= 0.01, result
