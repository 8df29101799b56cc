"""FSDP2 (fully_shard on each block and the root) on 1 and 2 gloo processes gives the unsharded run's stats; DeepSpeed
is refused with a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from hf_fsf import FeatureSpeedProbe
from hf_fsf.stats import BLOCK_FIELDS

WORKER = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
MODELS = ("gpt2", "chain")


def _run(out, processes: int | None) -> dict[str, list[dict]]:
    """{model: its two measured steps (angle, clipping)}; processes=None: one plain process without FSDP."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable]
    if processes is not None:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    out.mkdir()
    args = [WORKER, str(out), "plain" if processes is None else "fsdp"]
    done = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = {}
    for model in MODELS:
        with open(out / f"{model}.json") as f:
            runs[model] = json.load(f)
    return runs


@pytest.mark.slow
def test_fsdp2_matches_the_unsharded_run(tmp_path):
    """A tied GPT-2 and a residual chain, fully_shard on each block and the root, every field to 1e-6."""
    plain = _run(tmp_path / "plain", None)
    for processes in (1, 2):
        sharded = _run(tmp_path / f"fsdp{processes}", processes)
        for model in MODELS:
            assert len(sharded[model]) == len(plain[model]) == 2
            for a, b in zip(plain[model], sharded[model]):
                _assert_same_step(a, b, (model, processes))


def _assert_same_step(a: dict, b: dict, where: tuple) -> None:
    assert a["valid"] and b["valid"] and a["angle"] and b["angle"], where
    assert a["grad_scale"] < 1.0  # clipping is part of the comparison
    for key in ("grad_scale", "stem_contribution", "head_contribution"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-12), (*where, key)
    for x, y in zip(a["blocks"], b["blocks"]):
        for field in BLOCK_FIELDS:
            assert y[field] == pytest.approx(x[field], rel=1e-6), (*where, x["name"], field)


def _tiny_model():
    return torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3)))


def test_a_deepspeed_engine_is_refused():
    engine_type = type("DeepSpeedEngine", (torch.nn.Module,), {"__module__": "deepspeed.runtime.engine"})
    engine = engine_type()
    engine.module = _tiny_model()
    with pytest.raises(ValueError, match="DeepSpeed is not supported"):
        FeatureSpeedProbe(engine, blocks=["1"], trace=False)


def test_an_accelerate_deepspeed_plugin_is_refused(monkeypatch):
    import accelerate.state

    class _State:
        _shared_state = {"distributed_type": "DEEPSPEED"}
        deepspeed_plugin = types.SimpleNamespace(zero_stage=3)

    monkeypatch.setattr(accelerate.state, "AcceleratorState", _State)
    with pytest.raises(ValueError, match="DeepSpeed is not supported.*FSDP2"):
        FeatureSpeedProbe(_tiny_model(), blocks=["1"], trace=False)
