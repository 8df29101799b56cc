"""The μTransfer benchmark recipe: summary arithmetic on a synthetic table, every parametrization trains, CSV."""

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("transfer_recipe", ROOT / "recipes" / "transfer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


transfer = _load()
QUICK = transfer.load_config(transfer.CONFIG, quick=True)["grids"]


def _result(size, lr, seed, loss, param="mup"):
    return transfer.RunResult("teacher", "width", param, size, lr, seed, loss, math.nan, 1.0, loss, 0.0)


def test_summary_drift_and_regret_from_a_synthetic_table():
    lrs = [0.001, 0.002, 0.004, 0.008]
    # Per size, loss per lr for two seeds; the seed mean picks the optimum, not one seed.
    losses = {
        64: {0.001: (0.5, 0.7), 0.002: (0.2, 0.4), 0.004: (0.1, 0.9), 0.008: (0.8, 0.8)},  # means .6 .3 .5 .8
        256: {
            0.001: (0.9, 0.9),
            0.002: (0.5, 0.5),
            0.004: (0.4, 0.2),
            0.008: (math.inf, 0.1),
        },  # .9 .5 .3 inf
        1024: {0.001: (1.0, 1.0), 0.002: (0.44, 0.44), 0.004: (0.6, 0.6), 0.008: (0.4, 0.4)},  # 1 .44 .6 .4
    }
    results = [
        _result(size, lr, seed, losses[size][lr][seed]) for size in losses for lr in lrs for seed in (0, 1)
    ]
    rows = transfer.summarize(transfer.mean_losses(results))
    by_size = {r.size: r for r in rows}
    assert [r.size for r in rows] == [64, 256, 1024]
    assert by_size[64].optimal_lr == 0.002 and by_size[64].best_loss == pytest.approx(0.3)
    assert by_size[256].optimal_lr == 0.004 and by_size[256].best_loss == pytest.approx(0.3)
    assert by_size[1024].optimal_lr == 0.008 and by_size[1024].best_loss == pytest.approx(0.4)
    for r in rows:  # drift = 0.008 / 0.002; regret = loss(1024, lr*(64)) / best(1024) = 0.44 / 0.4
        assert r.drift == pytest.approx(4.0)
        assert r.regret == pytest.approx(1.1)


def test_summary_diverged_transfer_is_infinite_regret():
    results = [_result(8, 0.1, s, 0.2) for s in (0, 1)] + [_result(8, 0.2, s, 0.5) for s in (0, 1)]
    results += [_result(32, 0.1, 0, math.inf), _result(32, 0.1, 1, 0.1)]
    results += [_result(32, 0.2, s, 0.25) for s in (0, 1)]
    rows = transfer.summarize(transfer.mean_losses(results))
    assert all(r.regret == math.inf for r in rows)
    assert all(r.drift == pytest.approx(2.0) for r in rows)


def test_runs_from_two_grids_merge_on_shared_points(tmp_path):
    """A grid extended by a second run: the shared point (made by different arithmetic) is one point, taken from
    the later file, and the summary sees the union."""
    low, high = transfer.lr_grid(0.0025, 5, math.sqrt(2)), transfer.lr_grid(0.01, 5, math.sqrt(2))
    assert low[-1] == pytest.approx(high[0])
    columns = [f.name for f in transfer.fields(transfer.RunResult)]

    def results(grid, loss_of):
        return [
            transfer.RunResult("t", "width", "mup", size, lr, 0, loss_of(lr, size), math.nan, 1.0, 0.5, 1.0)
            for size in (64, 128)
            for lr in grid
        ]

    transfer.write_csv(tmp_path / "a.csv", results(high, lambda lr, s: 1.0 + lr), columns)
    transfer.write_csv(tmp_path / "b.csv", results(low, lambda lr, s: 2.0 - 100 * lr), columns)
    merged = transfer.read_runs([tmp_path / "a.csv", tmp_path / "b.csv"])
    assert len(merged) == 2 * 9
    table = transfer.mean_losses(merged)[("t", "width", "mup")]
    shared = [loss for lr, loss in table[64].items() if lr == pytest.approx(0.005)]
    assert shared == [pytest.approx(2.0 - 0.5)]  # one point, from the later file
    rows = transfer.summarize(transfer.mean_losses(merged))
    assert all(r.optimal_lr == pytest.approx(high[1]) for r in rows)  # 1 + 0.00707 beats 2 - 0.5


def test_runs_trained_differently_are_not_merged(tmp_path):
    columns = [f.name for f in transfer.fields(transfer.RunResult)]
    for name, steps in (("a.csv", 150), ("b.csv", 300)):
        run = transfer.RunResult(
            "t", "width", "fsc", 64, 0.1, 0, 1.0, math.nan, 2.0, 1.0, 1.0, steps, "linear"
        )
        transfer.write_csv(tmp_path / name, [run], columns)
    with pytest.raises(SystemExit, match="steps/schedule"):
        transfer.read_runs([tmp_path / "a.csv", tmp_path / "b.csv"])


def test_lr_grid_is_geometric_and_centered():
    grid = transfer.lr_grid(0.01, 5, math.sqrt(2))
    assert grid[2] == pytest.approx(0.01)
    assert all(b / a == pytest.approx(math.sqrt(2)) for a, b in zip(grid, grid[1:]))


def test_linear_schedule_warms_up_then_decays_to_zero():
    steps = 100
    factors = [transfer.schedule_factor("linear", t, steps) for t in range(steps)]
    assert factors[0] == pytest.approx(1 / 5) and factors[4] == pytest.approx(1.0)  # 5 % warm-up
    assert max(factors) == pytest.approx(1.0)
    assert all(b < a for a, b in zip(factors[5:], factors[6:]))
    assert factors[-1] == pytest.approx(1 / 95)  # the last step is small, not zero
    assert all(transfer.schedule_factor("constant", t, steps) == 1.0 for t in range(steps))


def test_the_schedule_drives_fsc_rate_and_every_group_lr(monkeypatch):
    """LambdaLR sets FSCOptimizer's group lr (its rate) exactly as it sets a plain optimizer's lr."""
    spec = QUICK["teacher"]
    cfg = transfer.RunConfig(
        "teacher", "width", "fsc", 16, 4, 0.2, 0, 10, 8, 16, 4, spec.block_size, spec.eval_size
    )
    model = transfer.build_resnet("fsc", 16, 4, 32, 4)
    opt = transfer.make_optimizer(cfg, model)
    seen, step = [], transfer._optimizer_step

    def recording_step(optimizer, loss):
        step(optimizer, loss)
        seen.append(optimizer.last_step.target / optimizer.last_step.loss)  # = this step's rate
        assert len({g["lr"] for g in optimizer.param_groups}) == 1

    monkeypatch.setattr(transfer, "_optimizer_step", recording_step)
    data = (torch.randn(8, 32), torch.randn(8, 4))
    transfer._train_loop(model, opt, [data] * 10, transfer._mse, "linear", 10)
    expected = [0.2 * transfer.schedule_factor("linear", t, 10) for t in range(10)]
    assert seen == pytest.approx(expected)


@pytest.mark.parametrize("task", ["teacher", "gpt2"])
@pytest.mark.parametrize("param", transfer.PARAMETRIZATIONS)
def test_every_parametrization_trains(task, param):
    spec = QUICK[task]
    steps = 40 if task == "teacher" else 12
    cfg = transfer.RunConfig(
        task, "width", param, 2 * spec.widths[0], spec.fixed_depth, spec.centers[param], 0, steps,
        spec.batch_size, spec.widths[0], spec.depths[0], spec.block_size, spec.eval_size,
    )  # fmt: skip
    r = transfer.run_one(cfg)
    assert math.isfinite(r.loss)
    assert r.train_loss_last < 0.9 * r.train_loss_first
    assert r.loss < 0.9 * r.train_loss_first  # the held-out loss moved too


def test_mup_gpt2_has_the_mup_pieces():
    from mup import MuSharedReadout

    spec = QUICK["gpt2"]
    cfg = transfer.RunConfig("gpt2", "width", "mup", 64, 2, 0.01, 0, 1, 2, 32, 2, spec.block_size, 4)
    model = transfer.build_gpt2(cfg)
    assert isinstance(model.lm_head, MuSharedReadout)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, and not rescaled
    assert model.lm_head.width_mult() == pytest.approx(2.0)
    attn = model.transformer.h[0].attn
    assert attn.scaling == pytest.approx(1 / attn.head_dim)
    std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2), rel=0.1)


def test_quick_run_writes_the_summary_csv(tmp_path):
    rows = transfer.main(
        [
            "--quick", "--tasks", "teacher,digits", "--sweeps", "width", "--parametrizations", "standard,fsc",
            "--steps", "8", "--seeds", "2", "--lr-points", "2", "--workers", "1", "--out-dir", str(tmp_path),
        ]
    )  # fmt: skip
    with open(tmp_path / "transfer_summary.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == transfer.SUMMARY_COLUMNS
        lines = list(reader)
    assert len(lines) == len(rows) == 2 * 2 * 2  # tasks x parametrizations x sizes
    assert {line["task"] for line in lines} == {"teacher", "digits"}
    assert (tmp_path / "transfer_teacher_width.png").exists()
    with open(tmp_path / "transfer_runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 2 * 2 * 2 * 2  # x lrs x seeds
    assert "test acc" in (tmp_path / "transfer_summary.md").read_text()


def test_the_config_has_a_grid_and_centres_for_every_task_and_parametrization():
    for quick in (False, True):
        config = transfer.load_config(transfer.CONFIG, quick)
        assert set(config["grids"]) == set(transfer.TASKS)
        assert set(config["parametrizations"]) <= set(transfer.PARAMETRIZATIONS)
        for grid in config["grids"].values():
            assert set(grid.centers) == set(transfer.PARAMETRIZATIONS)
            assert all(isinstance(c, float) for c in grid.centers.values())


def test_a_config_typo_is_refused_naming_the_keys_and_exponents_read_as_numbers(tmp_path):
    text = (transfer.CONFIG).read_text()
    path = tmp_path / "transfer.yaml"
    # YAML 1.1 reads 1e-2 (no dot) as a string: the loader must still give the number.
    path.write_text(text.replace("standard: 0.01,", "standard: 1e-2,"))
    assert transfer.load_config(path, quick=True)["grids"]["teacher"].centers["standard"] == 0.01
    path.write_text(text.replace("fixed_depth: 8", "fixed_dept: 8", 1))
    with pytest.raises(SystemExit, match="teacher.*fixed_dept.*'fixed_depth'"):
        transfer.load_config(path, quick=False)


def test_command_line_sizes_and_centres_replace_the_config():
    args = transfer.parse_args(["--quick", "--widths", "16,48", "--fixed-depth", "5", "--centers", "fsc=0.7"])
    config = transfer.load_config(args.config, args.quick)
    grid = transfer._grid(config["grids"], "teacher", ["standard", "fsc"], args)
    assert grid.widths == (16, 48) and grid.fixed_depth == 5 and grid.depths == QUICK["teacher"].depths
    assert grid.centers["fsc"] == 0.7 and grid.centers["standard"] == QUICK["teacher"].centers["standard"]
    del config["grids"]["teacher"].centers["mup"]
    with pytest.raises(SystemExit, match="no learning-rate centre for \\['mup'\\]"):
        transfer._grid(config["grids"], "teacher", ["mup"], args)


def test_the_summary_states_each_seeds_regret_and_the_loss_past_the_optimum():
    # Two seeds whose regrets differ (1.1 and 1.3), a √2 grid on which 2x the optimum is two points up.
    losses = {  # (seed, size): {lr: loss}
        (0, 64): {1.0: 1.2, 1.414: 1.0, 2.0: 1.1, 2.828: 1.5},
        (0, 256): {1.0: 1.5, 1.414: 1.1, 2.0: 1.0, 2.828: 1.4},
        (1, 64): {1.0: 1.2, 1.414: 1.0, 2.0: 1.1, 2.828: 1.5},
        (1, 256): {1.0: 1.5, 1.414: 1.3, 2.0: 1.0, 2.828: 1.6},
    }
    results = [
        transfer.RunResult(
            "gpt2", "width", "fsc-stages", size, lr, seed, loss, math.nan, 0.0, 0.0, 1.0, 10, "linear"
        )
        for (seed, size), curve in losses.items()
        for lr, loss in curve.items()
    ]
    spread = transfer.seed_regrets(results)
    assert sorted(spread[("gpt2", "width", "fsc-stages")]) == pytest.approx([1.1, 1.3])
    assert transfer.cliff({1.0: 1.2, 1.414: 1.0, 2.0: 1.1, 2.828: 1.5}) == pytest.approx(1.5)
    assert math.isnan(transfer.cliff({1.0: 1.0, 1.5: 2.0}))  # 2x the optimum is not on the grid
    rows = transfer.summarize(transfer.mean_losses(results))
    md = transfer.markdown_summary(rows, results, "cmd")
    assert "| 1.1–1.3 |" in md and "| 1.5 |" in md
