"""Data parallelism: 2 CPU processes (gloo) under `accelerate launch` give the 1-process stats on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_fsf.stats import BLOCK_FIELDS

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
FIELDS = BLOCK_FIELDS


def _launch(cmd, out, mode="probe"):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*cmd, WORKER, str(out), mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _run(cmd, out):
    _launch(cmd, out)
    with open(out / "fsf_stats.jsonl") as f:
        return [json.loads(line) for line in f]


LAUNCH_TWO = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    one = _run([sys.executable], tmp_path / "one")
    two = _run(LAUNCH_TWO, tmp_path / "two")
    assert len(one) == len(two) == 1
    a, b = one[0], two[0]
    assert a["grad_scale"] < 1.0  # clipping is part of the comparison
    # The loss is float32 (HF's loss upcasts logits to float32, not float64): 1e-5 is the bound.
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    for key in ("grad_scale", "stem_contribution", "head_contribution"):
        assert abs(a[key] - b[key]) <= 1e-9 * abs(a[key]), key
    # Block stats are float64 sums over micro-batches and ranks: only the summation order differs.
    for x, y in zip(a["blocks"], b["blocks"]):
        for field in FIELDS:
            assert abs(x[field] - y[field]) <= 1e-9 * abs(x[field]), (x["name"], field)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsc-global", "fsc-local"])
def test_fsc_optimizer_two_processes_take_the_one_process_steps(tmp_path, mode):
    """Both ways the Trainer normalizes the loss over ranks (average_tokens_across_devices True / False): every
    rank targets rate x the global mean loss, and the parameters end where one process puts them."""
    _launch([sys.executable], tmp_path / "one", mode)
    _launch(LAUNCH_TWO, tmp_path / "two", mode)
    runs = {}
    for name, ranks in (("one", [0]), ("two", [0, 1])):
        runs[name] = []
        for rank in ranks:
            with open(tmp_path / name / f"fsc_rank{rank}.json") as f:
                runs[name].append(json.load(f))
    reference = runs["one"][0]
    assert len(reference["steps"]) == 2
    for rank_run in runs["two"]:
        for a, b in zip(reference["steps"], rank_run["steps"]):
            # HF computes the loss in float32: the ranks' sum and one process's mean agree to ~1e-7.
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
            assert b["target"] == pytest.approx(0.05 * b["loss"], rel=1e-12)  # twice that if summed wrongly
        assert rank_run["checksum"] == pytest.approx(reference["checksum"], rel=1e-8)
