"""`hf-fsf demo` end to end on a tiny setting: three runs, their stats, the comparison report."""

from __future__ import annotations

import json

from hf_fsf.cli import main


def test_demo_runs_three_parametrizations_and_writes_the_report(tmp_path, capsys):
    args = [
        "demo",
        "--out",
        str(tmp_path),
        "--steps",
        "3",
        "--layers",
        "2",
        "--width",
        "32",
        "--block-size",
        "32",
        "--batch-size",
        "4",
        "--max-bytes",
        "200000",
        "--eval-blocks",
        "4",
        "--angle-every",
        "2",
    ]
    assert main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["run"] for r in results] == ["standard", "beta_1_sqrt_L", "fsc_1_sqrt_L"]
    for r in results:
        records = [json.loads(line) for line in open(r["stats"])]
        assert [rec["step"] for rec in records] == [1, 2, 3]
        assert (
            records[2]["angle"] and records[2]["blocks"][0]["cos_theta"] is not None
        )  # steps 1 and 3 (every 2)
    report = tmp_path / "report" / "report.md"
    assert report.exists() and "fsc_1_sqrt_L" in report.read_text()
    assert str(report.resolve()) in capsys.readouterr().out
