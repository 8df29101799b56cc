"""hf_fsf.report: JSONL stats -> figures and markdown tables whose numbers match the input."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest

from hf_fsf.report import cli_main, contribution_shares, load_run, shorten_names, write_report
from hf_fsf.stats import BlockStats, StepStats

BLOCKS = [f"transformer.h.{i}" for i in range(4)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_records(seed: int, num_steps: int = 12, angle_every: int = 3) -> list[dict]:
    """Records with known random values: cheap steps carry nulls, one step is invalid, one has a NaN."""
    rng = random.Random(seed)
    records = []
    for step in range(num_steps):
        angle = step % angle_every == 0
        blocks = []
        for name in BLOCKS:
            blocks.append(
                {
                    "name": name,
                    "forward_rms": rng.uniform(0.5, 2.0),
                    "backward_norm": rng.uniform(0.01, 0.1),
                    "contribution": rng.uniform(0.001, 0.01),
                    "loss_decrease": None,
                    "aligned_speed": None,
                    "update_norm": rng.uniform(0.1, 1) if angle else None,
                    "relative_speed": 10 ** rng.uniform(-4, -1) if angle else None,
                    "cos_theta": rng.uniform(0.05, 0.9) if angle else None,
                    "sensitivity": rng.uniform(1, 50) if angle else None,
                    "fsf_ratio": 1.0 if angle else None,
                }
            )
        records.append(
            {
                "step": step * 10,
                "loss": 3.0 - 0.1 * step,
                "valid": step != 4,  # one step whose measurement was skipped
                "angle": angle,
                "stem_contribution": rng.uniform(0.001, 0.01),
                "head_contribution": rng.uniform(0.001, 0.01),
                "blocks": blocks,
            }
        )
    if num_steps > 6:
        records[6]["blocks"][2]["cos_theta"] = float("nan")  # NaN: must not enter the mean
    return records


def write_jsonl(path: Path, records: list[dict], truncated_tail: bool = False) -> Path:
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        if truncated_tail:
            handle.write('{"step": 999, "loss": 1.')  # a run killed mid-write
    return path


def expected_means(records: list[dict]) -> dict[str, dict[str, tuple[float, int]]]:
    """Independent computation of the run averages: plain Python over the valid records."""
    valid = [r for r in records if r["valid"]]
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for i, name in enumerate(BLOCKS):
        out[name] = {}
        for key in ("cos_theta", "relative_speed", "sensitivity"):
            vals = [r["blocks"][i][key] for r in valid]
            vals = [v for v in vals if v is not None and math.isfinite(v)]
            out[name][key] = (sum(vals) / len(vals), len(vals))
    shares: dict[str, list[float]] = {n: [] for n in ["stem", *BLOCKS, "head"]}
    for r in valid:
        total = r["stem_contribution"] + r["head_contribution"] + sum(b["contribution"] for b in r["blocks"])
        shares["stem"].append(r["stem_contribution"] / total)
        shares["head"].append(r["head_contribution"] / total)
        for i, name in enumerate(BLOCKS):
            shares[name].append(r["blocks"][i]["contribution"] / total)
    for name, vals in shares.items():
        out.setdefault(name, {})["share"] = (sum(vals) / len(vals), len(vals))
    return out


def parse_summary_table(markdown: str, run_name: str) -> dict[str, list[str]]:
    """The per-block table of one run's section: {block name: cells after the name}."""
    section = markdown.split(f"## Run `{run_name}`", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"^\| `([^`]+)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [c.strip() for c in match.group(2).split("|")]
    return rows


def test_summary_table_numbers_equal_independent_means(tmp_path):
    records = make_records(seed=1)
    path = write_jsonl(tmp_path / "fsf_stats.jsonl", records, truncated_tail=True)
    report = write_report({"base": path}, tmp_path / "out")
    text = report.read_text()
    for suffix in ("heatmap_cos_theta", "heatmap_relative_speed", "heatmap_share", "curves", "profile"):
        figure = tmp_path / "out" / f"base_{suffix}.png"
        assert figure.read_bytes()[:8] == PNG_MAGIC, figure
        assert f"]({figure.name})" in text  # the markdown links it
    assert "1 step(s) marked invalid" in text
    assert "1 line(s) that are not a JSON stats record" in text

    table = parse_summary_table(text, "base")
    expected = expected_means(records)
    assert list(table) == ["stem", *BLOCKS, "head"]
    columns = ("cos_theta", "relative_speed", "sensitivity", "share")
    for name, cells in table.items():
        for c, key in enumerate(columns):
            value, count = cells[2 * c], int(cells[2 * c + 1])
            if key in expected[name]:
                mean, n = expected[name][key]
                assert count == n, (name, key)
                assert float(value) == pytest.approx(mean, rel=6e-4), (name, key)  # printed with 4 digits
            else:  # stem and head have no angle quantities
                assert (value, count) == ("–", 0)
    # the NaN cos θ of block 2 is left out: one angle step fewer than the others
    assert int(table[BLOCKS[2]][1]) == int(table[BLOCKS[0]][1]) - 1


def test_contribution_shares_sum_to_one_per_step(tmp_path):
    records = make_records(seed=2)
    run = load_run(write_jsonl(tmp_path / "a.jsonl", records))
    shares = contribution_shares(run)
    valid = [r for r in records if r["valid"]]
    assert shares.shape == (len(BLOCKS) + 2, len(valid))
    np.testing.assert_allclose(shares.sum(axis=0), 1.0, rtol=1e-12)
    total = valid[0]["stem_contribution"] + valid[0]["head_contribution"]
    total += sum(b["contribution"] for b in valid[0]["blocks"])
    assert shares[0, 0] == pytest.approx(valid[0]["stem_contribution"] / total, rel=1e-12)
    assert shares[-1, 0] == pytest.approx(valid[0]["head_contribution"] / total, rel=1e-12)


def test_missing_and_negative_contributions(tmp_path):
    records = make_records(seed=3, num_steps=3)
    records[0]["stem_contribution"] = None  # no stem: left out of the total, share NaN
    records[1]["head_contribution"] = -1.0  # the step raised the loss to first order: no share
    run = load_run(write_jsonl(tmp_path / "a.jsonl", records))
    shares = contribution_shares(run)
    assert math.isnan(shares[0, 0]) and np.nansum(shares[:, 0]) == pytest.approx(1.0, rel=1e-12)
    assert np.isnan(shares[:, 1]).all()
    assert np.nansum(shares[:, 2]) == pytest.approx(1.0, rel=1e-12)


def test_several_runs_compare_side_by_side(tmp_path):
    records_a, records_b = make_records(seed=4), make_records(seed=5)
    runs = {
        "a": write_jsonl(tmp_path / "a.jsonl", records_a),
        "b": write_jsonl(tmp_path / "b.jsonl", records_b),
    }
    text = write_report(runs, tmp_path / "out").read_text()
    assert (tmp_path / "out" / "loss_comparison.png").read_bytes()[:8] == PNG_MAGIC
    section = text.split("### mean cos θ per block", 1)[1].split("###", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith(f"| `{BLOCKS[1]}`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) == pytest.approx(expected_means(records_a)[BLOCKS[1]]["cos_theta"][0], rel=6e-4)
    assert float(cells[2]) == pytest.approx(expected_means(records_b)[BLOCKS[1]]["cos_theta"][0], rel=6e-4)


def test_cheap_only_single_step_and_empty_runs_do_not_crash(tmp_path):
    cheap = [r for r in make_records(seed=6) if not r["angle"]]
    single = make_records(seed=7)[:1]
    empty = [dict(make_records(seed=8)[0], valid=False)]
    runs = {
        "cheap": write_jsonl(tmp_path / "cheap.jsonl", cheap),
        "single": write_jsonl(tmp_path / "single.jsonl", single),
        "empty": write_jsonl(tmp_path / "empty.jsonl", empty),
    }
    text = write_report(runs, tmp_path / "out").read_text()
    out = tmp_path / "out"
    assert not (out / "cheap_heatmap_cos_theta.png").exists()  # nothing to draw, no empty figure
    assert (out / "cheap_heatmap_share.png").exists() and (out / "cheap_curves.png").exists()
    assert "No step was measured with the angle" in text
    assert (out / "single_heatmap_cos_theta.png").exists()
    assert "No valid measured steps" in text
    cheap_table = parse_summary_table(text, "cheap")
    assert cheap_table[BLOCKS[0]][:2] == ["–", "0"]
    single_table = parse_summary_table(text, "single")
    assert float(single_table[BLOCKS[3]][0]) == pytest.approx(single[0]["blocks"][3]["cos_theta"], rel=6e-4)


def test_cli_reads_run_directories_and_names(tmp_path, capsys):
    for name, seed in (("run_a", 9), ("run_b", 10)):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "fsf_stats.jsonl", make_records(seed))
    out = tmp_path / "report"
    assert cli_main([str(tmp_path / "run_a"), f"scaled={tmp_path / 'run_b'}", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Run `run_a`" in text and "## Run `scaled`" in text
    assert "report.md" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main([str(tmp_path / "missing"), "--out", str(out)])
    assert "does not exist" in capsys.readouterr().err


def test_shorten_names():
    assert shorten_names(["transformer.h.0", "transformer.h.1", "transformer.h.10"]) == ["h.0", "h.1", "h.10"]
    assert shorten_names(["encoder.layer.0.attn", "encoder.layer.0.mlp"]) == ["attn", "mlp"]
    assert shorten_names(["blocks.0"]) == ["blocks.0"]
    long = [f"model.{'x' * 40}.{i}" for i in range(3)]
    assert all(len(label) <= 28 for label in shorten_names(long))


def test_step_stats_from_record_inverts_to_record_and_tolerates_junk():
    stats = StepStats(
        loss=2.5,
        blocks=[
            BlockStats(name="h.0", forward_rms=1.0, contribution=0.01, cos_theta=0.4),
            BlockStats(name="h.1"),
        ],
        stem_contribution=0.002,
        head_contribution=0.003,
        grad_scale=0.5,
        group_grad_norms={"stem": 1.5, "h.0": 2.0},
        angle=True,
        valid=True,
        step=7,
    )
    assert StepStats.from_record(json.loads(json.dumps(stats.to_record()))) == stats
    junk = {
        "step": "x",
        "loss": None,
        "blocks": [{"name": "h.0", "cos_theta": "0.3", "contribution": True}, {"cos_theta": 1.0}, 3],
        "scales": {"h.0": 0.5},
    }
    read = StepStats.from_record(junk)
    assert read.step is None and read.loss is None and read.valid and not read.angle
    assert [b.name for b in read.blocks] == ["h.0"]
    assert read.blocks[0].cos_theta is None and read.blocks[0].contribution is None
    assert math.isnan(read.stem_contribution) and math.isnan(read.grad_scale)
    for bad in ([], {"blocks": {"h.0": {}}}):
        with pytest.raises(ValueError, match="blocks"):
            StepStats.from_record(bad)
