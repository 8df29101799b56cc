"""`hf-fsf scan`: the coord check over widths and depths of an HF config (hf_fsf/experiments/scan.py)."""

from __future__ import annotations

import json

import pytest

from hf_fsf.experiments.scan import base_config, fit_exponents, scan, variant_config

# SGD at a small step: the setting of PAPER.md §5's predictions. 2 seeds, 2 steps, angle on both.
GRID = dict(widths=(32, 64), depths=(2, 4, 8), steps=2, seeds=2, optimizer="sgd", lr=0.05, angle_every=1)


def test_gpt2_depth_exponents_follow_the_branch_scale(tmp_path):
    """PAPER.md §5: with β = 1 alignment degenerates with depth (cos θ = Θ(L^-1/2) for the paper's ResNet) and the
    residual stream grows; with β = 1/√L cos θ and the relative speed of the last block are Θ(1) in depth.
    Measured here: cos θ s_L = -0.21 (β = 1) vs -0.01 (β = 1/√L); relative speed s_L = +0.79 vs +0.06; forward
    rms (SP) s_L = +0.22 vs -0.04 (3 seeds, 3 steps: -0.22 / -0.01, +0.65 / +0.03, +0.30 / -0.03)."""
    plain = scan("gpt2", beta="1", progress=False, **GRID)
    scaled = scan("gpt2", beta="1/sqrt(L)", progress=False, out=tmp_path, **GRID)

    _, cos_plain = plain.block_exponents[("cos_theta", "last")]
    _, cos_scaled = scaled.block_exponents[("cos_theta", "last")]
    _, speed_plain = plain.block_exponents[("relative_speed", "last")]
    _, speed_scaled = scaled.block_exponents[("relative_speed", "last")]
    assert cos_plain < -0.12 and abs(cos_scaled) < 0.08
    assert speed_plain > 0.3 and abs(speed_scaled) < 0.15
    sp_plain, sp_scaled = plain.desiderata_exponents["sp"][1], scaled.desiderata_exponents["sp"][1]
    assert sp_plain > sp_scaled + 0.15 and scaled.verdicts["SP"] is True

    # What the scan writes: the table (exponents, verdicts, every block at the widest width), the figure, the data.
    table = (tmp_path / "scan.md").read_text()
    assert "β = 1/sqrt(L)" in table and "| SP | FL | LD | BC |" in table
    assert sum(line.startswith("| 8 | ") for line in table.splitlines()) == 8  # the 8 blocks of depth 8
    assert (tmp_path / "scan.png").stat().st_size > 10_000
    record = json.loads((tmp_path / "scan.json").read_text())
    assert len(record["points"]) == 2 * 3 * 2 and record["verdicts"]["SP"] is True


def test_scan_of_a_local_llama_config_json(tmp_path):
    """Another family, from a config.json on disk: the variants have the requested shape, the scan runs and
    β = 1/√L keeps the residual stream Θ(1) in depth (SP holds, forward rms s_L ≈ 0)."""
    folder = tmp_path / "my_llama"
    base_config("llama").save_pretrained(folder)
    variant = variant_config(base_config(folder), 128, 6)
    assert (variant.model_type, variant.hidden_size, variant.num_hidden_layers) == ("llama", 128, 6)
    assert (variant.num_attention_heads, variant.intermediate_size) == (
        4,
        352,
    )  # head size 32 kept, MLP 2.75×

    result = scan(folder / "config.json", beta="1/sqrt(L)", progress=False, **GRID)
    assert result.config == f"llama ({folder / 'config.json'})"
    assert result.verdicts["SP"] is True and abs(result.desiderata_exponents["sp"][1]) < 0.1
    assert [len(p.blocks) for p in result.points] == [2] * 4 + [4] * 4 + [8] * 4


def test_fit_exponents_recovers_a_power_law_and_refuses_what_it_cannot_fit():
    table = {
        (m, L): [3.0 * m**0.5 * L**-1.0 * f for f in (0.9, 1 / 0.9)] for m in (32, 64, 128) for L in (2, 8)
    }
    s_m, s_L = fit_exponents(table)
    assert s_m == pytest.approx(0.5, abs=1e-9) and s_L == pytest.approx(-1.0, abs=1e-9)
    assert fit_exponents({(32, 2): [1.0], (64, 2): [2.0]}) == (pytest.approx(1.0), None)  # one depth: no s_L
    assert fit_exponents({(32, 2): [1.0], (64, 2): [-2.0]}) == (None, None)  # q ≤ 0: no logarithm


def test_bad_arguments_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="neither a bundled family"):
        scan(tmp_path / "missing.json", progress=False)
    with pytest.raises(ValueError, match="two widths or two depths"):
        scan("gpt2", widths=(32,), depths=(4,), progress=False)
    with pytest.raises(ValueError, match="not a multiple of the config's head size 32"):
        scan("gpt2", widths=(32, 48), depths=(2,), progress=False)
    with pytest.raises(ValueError, match="beta must be"):
        scan("gpt2", beta="sqrt", progress=False)
