"""The reproduction on a tiny grid: files with the exact columns, and the qualitative shapes of Fig. 1, Fig. 2 (both
settings, MLP and ResNet) and of the backward speed law."""

import csv
from pathlib import Path

import pytest

from hf_fsf.cli import main as hf_fsf_main
from hf_fsf.experiments import paper, reproduce
from hf_fsf.experiments.paper import (
    ReproConfig,
    local_slopes,
    log_slope,
    mean_backward_angle,
    mean_last_layer_angle,
    mean_sensitivity,
    run_reproduction,
)


def _tiny(seeds: int = 1) -> ReproConfig:
    return ReproConfig(
        width=64,
        sensitivity_width=64,
        depths=(4, 32),
        layer_depth=32,
        c_depths=(32,),
        c_values=(1.0, 2.0),
        n_inputs=(1, 8),
        backward_depth=24,
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
    assert header == ["arch", "setting", "scaling", "width", "depth", "seed", "n_inputs", "sensitivity"]
    # 2 archs × 3 scalings × 2 depths × (paper with one input + probe with 1 and 8)
    assert len(rows) == 2 * 3 * 2 * 3
    assert {(r[0], r[1]) for r in rows} == {(a, s) for a in ("mlp", "resnet") for s in ("paper", "probe")}
    assert all(float(r[-1]) > 0 for r in rows)
    header, rows = _read(out / "backward_vs_depth.csv")
    assert header == ["arch", "width", "depth", "layer", "seed", "cos_theta_backward", "bsf_ratio"]
    assert len(rows) == 2 * (24 - 2)
    for name in ("fig1_angles.png", "fig2_sensitivity.png", "backward_vs_depth.png", "summary.md"):
        assert (out / name).stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "√L·cos MLP" in summary and "Local slope" in summary and "Fig. 2 (b)" in summary
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
    for setting, n in (("paper", 1), ("probe", 1), ("probe", 8)):
        mlp = {(sc, d): s[("mlp", setting, sc, d, n)] for sc in ("ntk", "mfmup", "fsc") for d in (4, 32)}
        assert mlp[("ntk", 32)] < mlp[("fsc", 32)] < mlp[("mfmup", 32)]
        assert mlp[("mfmup", 32)] / mlp[("mfmup", 4)] > 2.0  # ∝ √L: ×2.8 from L = 4 to 32
        # MLP: MF+μP has FSC's σ_L × L^{-1/2} and the same split of the decrease between layers: S is FSC's × √L
        ratio = (mlp[("mfmup", 32)] / mlp[("fsc", 32)]) / (mlp[("mfmup", 4)] / mlp[("fsc", 4)])
        assert ratio == pytest.approx((32 / 4) ** 0.5, rel=0.03)
        # ResNet β = 1/√L: MF+μP's rates are FSC's times one common factor L^{-1/2}, so S is the same
        assert s[("resnet", setting, "mfmup", 32, n)] == pytest.approx(
            s[("resnet", setting, "fsc", 32, n)], rel=0.02
        )
        assert s[("resnet", setting, "ntk", 32, n)] < 0.3 * s[("resnet", setting, "fsc", 32, n)]
    # the paper's setting divides by the total loss change, readout included: S is smaller than the probe's
    assert s[("mlp", "paper", "fsc", 4, 1)] < 0.7 * s[("mlp", "probe", "fsc", 4, 1)]


def test_backward_law_and_identity(tiny_run):
    result, _ = tiny_run
    assert result.backward_first_order_error < 1e-3
    mlp, resnet = (
        mean_backward_angle(result.backward_rows, "mlp"),
        mean_backward_angle(result.backward_rows, "resnet"),
    )
    assert 0.5 < mlp[1] < 0.9  # ‖φ(h)‖/‖h‖ at v = L − 1
    assert resnet[1] == pytest.approx(1.0, abs=1e-6)  # linear readout: δb_{L−1} ∝ f_{L−1}
    assert mlp[22] < 0.5 * mlp[1]  # the MLP's angle degenerates with L − v
    assert resnet[22] > mlp[22]


def test_slopes():
    assert log_slope([1.0, 2.0, 4.0], [1.0, 0.5, 0.25]) == pytest.approx(-1.0)
    angles = {("resnet", "c/sqrt(L)", c, 800, 1): c**-0.5 for c in (1.0, 4.0, 16.0)}
    assert [round(s, 12) for _, _, s in local_slopes(angles, 800, 1)] == [-0.5, -0.5]


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
        reproduce.cli_main(["--out", str(tmp_path), "--seeds", "0"])
    with pytest.raises(SystemExit):
        reproduce.cli_main([])
    with pytest.raises(ValueError, match="depths must be ≥ 4"):
        ReproConfig(depths=(3, 8))
    with pytest.raises(ValueError, match="depths must be ≥ 4"):
        ReproConfig(c_depths=(2,))
