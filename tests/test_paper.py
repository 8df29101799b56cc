"""The reproduction on a tiny grid: files with the exact columns, and the qualitative shapes of Fig. 1 and 2."""

import csv
from pathlib import Path

import pytest

from hf_fsf.cli import main as hf_fsf_main
from hf_fsf.experiments import paper
from hf_fsf.experiments.paper import ReproConfig, mean_last_layer_angle, mean_sensitivity, run_reproduction


def _tiny(seeds: int = 1) -> ReproConfig:
    return ReproConfig(
        width=64,
        sensitivity_width=64,
        depths=(4, 32),
        layer_depth=32,
        c_depth=32,
        c_values=(1.0, 2.0),
        n_inputs=(1, 8),
        seeds=seeds,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    return run_reproduction(_tiny(), out, progress=False), out


def _read(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_writes_both_csvs_with_exact_columns(tiny_run):
    result, out = tiny_run
    header, rows = _read(out / "angle_vs_depth.csv")
    assert header == ["arch", "beta_rule", "c", "width", "depth", "layer", "seed", "n_inputs", "cos_theta"]
    # one row per hidden layer ℓ = 2..L−1 of every run: 4 archs × depths (4, 32) + 2 values of c at L = 32
    runs_layers = 4 * (2 + 30) + 2 * 30
    assert len(rows) == runs_layers * 2  # two batch sizes, one seed
    header, rows = _read(out / "sensitivity_vs_depth.csv")
    assert header == ["arch", "scaling", "width", "depth", "seed", "n_inputs", "sensitivity"]
    assert len(rows) == 3 * 2 * 2
    assert all(float(r[-1]) > 0 for r in rows)
    for name in ("fig1_angles.png", "fig2_sensitivity.png", "summary.md"):
        assert (out / name).stat().st_size > 0
    assert "√L·cos MLP" in (out / "summary.md").read_text()
    assert (
        result.first_order_error_last < 1e-2
    )  # the master step 1e-3 is small enough for the angle to be first-order


def test_angles_have_the_papers_shapes(tiny_run):
    result, _ = tiny_run
    cos = mean_last_layer_angle(result.angle_rows)
    for n in (1, 8):
        mlp4, mlp32 = cos[("mlp", "none", "", 4, n)], cos[("mlp", "none", "", 32, n)]
        assert mlp32 < 0.6 * mlp4  # the MLP angle degenerates with depth
        assert cos[("resnet", "1/L", "", 32, n)] > 0.8 > mlp32  # β = 1/L: cos θ → 1
        assert cos[("resnet", "1/sqrt(L)", "", 32, n)] > 0.3  # β = 1/√L: Θ(1)
        assert cos[("resnet", "1", "", 32, n)] < 0.6 * cos[("resnet", "1", "", 4, n)]  # constant β falls
        assert cos[("resnet", "c/sqrt(L)", 2.0, 32, n)] < cos[("resnet", "c/sqrt(L)", 1.0, 32, n)]
    # c = 1 of the c/√L rule is the 1/√L rule: same seeds, same numbers
    assert cos[("resnet", "c/sqrt(L)", 1.0, 32, 1)] == pytest.approx(cos[("resnet", "1/sqrt(L)", "", 32, 1)])


def test_sensitivity_has_the_papers_shapes(tiny_run):
    result, _ = tiny_run
    s = mean_sensitivity(result.sensitivity_rows)
    for n in (1, 8):
        assert s[("ntk", 32, n)] < s[("fsc", 32, n)] < s[("mfmup", 32, n)]
        assert s[("mfmup", 32, n)] / s[("mfmup", 4, n)] > 2.0  # ∝ √L: ×2.8 from L = 4 to 32
        assert 0.5 < s[("fsc", 32, n)] / s[("fsc", 4, n)] < 2.0  # Θ(1)


def test_cli_runs_and_validates(tmp_path, monkeypatch):
    seen = []

    def fake_run(cfg, out):
        seen.append(cfg)
        (Path(out) / "summary.md").write_text("stub")
        return paper.Reproduction()

    monkeypatch.setattr(paper.ReproConfig, "quick", classmethod(lambda cls: _tiny(seeds=2)))
    monkeypatch.setattr(paper, "run_reproduction", fake_run)
    assert hf_fsf_main(["reproduce", "--out", str(tmp_path), "--quick", "--seeds", "1"]) == 0
    assert seen[0].seeds == 1 and seen[0].depths == (4, 32)
    with pytest.raises(SystemExit):
        paper.cli_main(["--out", str(tmp_path), "--seeds", "0"])
    with pytest.raises(SystemExit):
        paper.cli_main([])
    with pytest.raises(ValueError, match="depths must be ≥ 4"):
        ReproConfig(depths=(3, 8))
