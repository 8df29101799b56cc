"""Reproduce Fig. 1 and Fig. 2 of the paper and the backward speed law (the command line: experiments/reproduce.py).

Setting (PAPER.md §5): input dim 10, one output, first layer frozen, one GD step at init, each layer's rate =
master step × its η (models.py), float64. Two settings, named in the CSVs (`setting`):

- "probe": master step 1e-3, ‖x‖ = √d, the block output f_{L−1} (the MLP's pre-activation h_{L−1}) and
  ΔL_{≤L−1} (the probe's first-order decrease up to block L−1) in S; one `FeatureSpeedProbe.measure_step` with
  angle=True, with one input and with a batch of 64.
- "paper" (Fig. 2 only): the paper's own — master step 0.01, inputs on the unit sphere, the feature the readout
  multiplies (the MLP's post-ReLU φ(h_{L−1}); the ResNet's f_{L−1}), and the total loss change of the step
  L(w) − L(w + δw) in the denominator; one input. Measured directly (two forwards around a plain SGD step).

- Fig. 1 (width 200): cos θ_ℓ over layers at depth 200 (a), cos θ_{L−1} over depth for the MLP and ResNets
  with β ∈ {1, 1/√L, 1/L} (b), cos θ_{L−1} over c for β = c/√L (c). The angles use the FSC scaling, but they
  do not depend on it: the first layer is frozen, every scaling gives the hidden layers one common rate, and
  the readout (downstream of f_{L−1}) only rescales b.
- Fig. 1 (c) is also measured at L = 800 (full run), where β = c/√L ≤ 0.28 stays in the small-β regime.
- Fig. 2 (width 400): sensitivity S_{L−1} over depth for the NTK, MF+μP and FSC scalings, (a) for the MLP and
  (b) for the ResNet with β = 1/√L, in both settings.
- Backward speed (Prop. 6.1, `hf_fsf.backward_speed`): cos θ̃_v between f_v and −δb_v over L − v for the MLP (the
  paper's Θ((L − v)^{-1/2})) and the ResNet β = 1/√L, linear loss, one input, and bsf_ratio, the ratio of the two
  sides of the identity. Master step 1e-4: a ReLU unit whose sign flips in the step makes b jump by O(1), which
  the continuous-time ḃ does not see (at 1e-3, L = 64, |bsf_ratio − 1| reached 4e-2 in one seed of three; ≤ 2e-5 at 1e-4).

Normalization. S = 1/(cos θ · √m · ‖b‖) is proportional to 1/‖∂loss/∂out‖, so "S_FSC ≈ 1" needs the output
gradient fixed. The targets are set to y = out_init + u with u = ±1, so every example starts with residual
∓1: the loss ½·mean‖out − y‖² has ‖∂loss/∂out_i‖ = 1/n and (with the mean over the batch) S does not depend on
the batch size n. Then, with cos θ_{L−1} ≈ a/√L: S_NTK ≈ √(2L/m)/a → 0 with width, S_MF+μP ≈ √(2L)/a grows
like √L, and S_FSC ≈ √2/a is Θ(1) (≈ 1 when a ≈ √2).
"""

from __future__ import annotations

import csv
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hf_fsf.backward_speed import BackwardSpeedProbe, BackwardStepStats
from hf_fsf.models import ReLUMLP, ResNet, dense_inputs
from hf_fsf.probe import FeatureSpeedProbe
from hf_fsf.stats import StepStats

ANGLE_COLUMNS = ("arch", "beta_rule", "c", "width", "depth", "layer", "seed", "n_inputs", "cos_theta")
SENSITIVITY_COLUMNS = ("arch", "setting", "scaling", "width", "depth", "seed", "n_inputs", "sensitivity")
BACKWARD_COLUMNS = ("arch", "width", "depth", "layer", "seed", "cos_theta_backward", "bsf_ratio")
# Fig. 1 (b): the MLP and three ResNet branch rules.
ANGLE_ARCHS = (("mlp", "none"), ("resnet", "1"), ("resnet", "1/sqrt(L)"), ("resnet", "1/L"))
SENSITIVITY_SCALINGS = ("ntk", "mfmup", "fsc")
# Fig. 2 (a) the MLP, (b) the ResNet with β = 1/√L; the backward law on the same two networks.
SENSITIVITY_ARCHS = (("mlp", "none"), ("resnet", "1/sqrt(L)"))
BACKWARD_ARCHS = SENSITIVITY_ARCHS
SETTINGS = ("paper", "probe")


@dataclass
class ReproConfig:
    """The grid of the reproduction. `full()` is the paper's; `quick()` is a smaller grid for a first look."""

    width: int = 200  # Fig. 1
    sensitivity_width: int = 400  # Fig. 2
    depths: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 200)
    layer_depth: int = 200  # Fig. 1 (a)
    c_depths: tuple[int, ...] = (
        200,
        800,
    )  # Fig. 1 (c): the paper's L = 200, and L = 800 where c/√L stays small
    c_values: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    n_inputs: tuple[int, ...] = (1, 64)
    # angle runs at depth ≥ this use one input only (the paper's setting): a batch of 64 at L = 800 costs minutes
    one_input_from_depth: int = 400
    seeds: int = 5
    input_dim: int = 10
    output_dim: int = 1
    master_lr: float = 1e-3  # the probe's setting
    paper_master_lr: float = 0.01  # Fig. 2 in the paper's setting
    backward_depth: int = 200  # the backward speed law
    backward_master_lr: float = 1e-4
    threads: int | None = 1  # torch threads while running; None leaves the setting alone

    @classmethod
    def full(cls, seeds: int = 5) -> ReproConfig:
        return cls(seeds=seeds)

    @classmethod
    def quick(cls, seeds: int = 2) -> ReproConfig:
        return cls(
            depths=(4, 8, 16, 32, 64),
            layer_depth=64,
            c_depths=(64,),
            c_values=(0.5, 1.0, 2.0, 4.0),
            backward_depth=64,
            seeds=seeds,
        )

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds must be ≥ 1, got {self.seeds}")
        if min(self.depths) < 4 or min((self.layer_depth, self.backward_depth, *self.c_depths)) < 4:
            raise ValueError(
                "reproduction depths must be ≥ 4: find_blocks needs at least two hidden blocks (L − 2 ≥ 2)."
            )


@dataclass
class Reproduction:
    """What a run produced: the CSV rows and the files written."""

    angle_rows: list[dict] = field(default_factory=list)
    sensitivity_rows: list[dict] = field(default_factory=list)
    backward_rows: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    # max |fsf_ratio − 1| over all steps: how linear the steps were, over all blocks and at the last one (L−1)
    first_order_error: float = 0.0
    first_order_error_last: float = 0.0
    backward_first_order_error: float = 0.0  # max |bsf_ratio − 1| over the backward runs
    # per backward run (arch, seed): (sign flips of the features in the step, max |bsf_ratio − 1|)
    backward_runs: dict[tuple[str, int], tuple[int, float]] = field(default_factory=dict)

    def _check_step(self, stats: StepStats) -> None:
        errors = [abs(b.fsf_ratio - 1.0) for b in stats.blocks if b.fsf_ratio is not None]
        if errors:
            self.first_order_error = max(self.first_order_error, *errors)
            self.first_order_error_last = max(self.first_order_error_last, errors[-1])


def inputs_and_signs(n_inputs: int, seed: int, cfg: ReproConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """n dense inputs (‖x‖ = √d) and residual signs u = ±1, from the seed."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    x = dense_inputs(n_inputs, cfg.input_dim, generator=gen, dtype=torch.float64)
    sign = torch.randint(0, 2, (n_inputs, cfg.output_dim), generator=gen, dtype=torch.float64) * 2 - 1
    return x, sign


def one_step(model: torch.nn.Module, n_inputs: int, seed: int, cfg: ReproConfig) -> StepStats:
    """One measured GD step at init on n dense inputs, with targets that make each initial residual ±1."""
    x, sign = inputs_and_signs(n_inputs, seed, cfg)
    with torch.no_grad():
        y = model(x) + sign

    def loss_fn() -> torch.Tensor:
        return 0.5 * (model(x) - y).pow(2).sum(dim=1).mean()

    optimizer = torch.optim.SGD(model.param_groups(cfg.master_lr))
    with FeatureSpeedProbe(model) as probe:
        return probe.measure_step(loss_fn, optimizer, angle=True)


def _readout_linear(model: nn.Module) -> nn.Linear:
    return model.readout if isinstance(model.readout, nn.Linear) else model.readout.linear


def paper_sensitivity(model: nn.Module, seed: int, cfg: ReproConfig) -> float:
    """S_{L−1} in the paper's setting: one input on the unit sphere, one GD step of master size paper_master_lr,
    ‖δφ‖_rms of the feature the readout multiplies over the total loss change L(w) − L(w + δw)."""
    x, sign = inputs_and_signs(1, seed, cfg)
    x = x / math.sqrt(cfg.input_dim)
    seen: list[torch.Tensor] = []
    handle = _readout_linear(model).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            y = model(x) + sign
        seen.clear()
        loss = 0.5 * (model(x) - y).pow(2).sum(dim=1).mean()
        loss.backward()
        torch.optim.SGD(model.param_groups(cfg.paper_master_lr)).step()
        with torch.no_grad():
            loss_after = 0.5 * (model(x) - y).pow(2).sum(dim=1).mean()
    finally:
        handle.remove()
    delta = seen[1] - seen[0]
    return float(delta.norm() / math.sqrt(delta.numel()) / (loss.detach() - loss_after))


def backward_step(model: nn.Module, seed: int, cfg: ReproConfig) -> BackwardStepStats:
    """One GD step (master size backward_master_lr) at init on one input with the linear loss −⟨u, out⟩, u = ±1,
    measured by BackwardSpeedProbe."""
    x, sign = inputs_and_signs(1, seed, cfg)

    def linear_loss(out: torch.Tensor) -> torch.Tensor:
        return -(out * sign).sum(dim=1).mean()

    optimizer = torch.optim.SGD(model.param_groups(cfg.backward_master_lr))
    return BackwardSpeedProbe(model).measure_step(lambda: model(x), linear_loss, optimizer)


def _make_model(arch: str, beta_rule: str, c: float, width: int, depth: int, scaling: str, seed: int, cfg):
    torch.manual_seed(seed)
    common = dict(output_dim=cfg.output_dim, scaling=scaling, freeze_first_layer=True)
    if arch == "mlp":
        model = ReLUMLP(cfg.input_dim, width, depth, **common)
    else:
        model = ResNet(cfg.input_dim, width, depth, beta=beta_rule, c=c, **common)
    return model.double()


def _angle_inputs(cfg: ReproConfig, depth: int) -> tuple[int, ...]:
    return (1,) if depth >= cfg.one_input_from_depth else cfg.n_inputs


def _angle_jobs(cfg: ReproConfig) -> list[tuple[str, str, float | None, int]]:
    jobs = []
    depths = sorted(set(cfg.depths) | {cfg.layer_depth})
    for arch, rule in ANGLE_ARCHS:
        jobs += [(arch, rule, None, depth) for depth in depths]
    for depth in cfg.c_depths:
        for c in cfg.c_values:
            if c / math.sqrt(depth) <= 1.0:  # β ≤ 1 for the √(1−β²) skip
                jobs.append(("resnet", "c/sqrt(L)", c, depth))
    return jobs


def _sensitivity_jobs(cfg: ReproConfig) -> list[tuple[str, str, str, str, int, int]]:
    """(setting, arch, rule, scaling, depth, n_inputs); the paper's setting has one input."""
    jobs = []
    for arch, rule in SENSITIVITY_ARCHS:
        for scaling in SENSITIVITY_SCALINGS:
            for depth in cfg.depths:
                jobs.append(("paper", arch, rule, scaling, depth, 1))
                jobs += [("probe", arch, rule, scaling, depth, n) for n in cfg.n_inputs]
    return jobs


def run_reproduction(cfg: ReproConfig, out_dir: str | Path, progress: bool = True) -> Reproduction:
    """Runs every measurement of `cfg`, writes the CSVs, figures and summary.md under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        # The matrices are small (≤ 400 × 400): one thread is faster, and much faster on a shared CPU, where
        # BLAS threads wait on each other.
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out, progress)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: ReproConfig, out: Path, progress: bool) -> Reproduction:
    from tqdm.auto import tqdm

    result = Reproduction()
    start = time.perf_counter()
    angle_jobs, sens_jobs = _angle_jobs(cfg), _sensitivity_jobs(cfg)
    angle_steps = sum(len(_angle_inputs(cfg, job[3])) for job in angle_jobs)
    total = (angle_steps + len(sens_jobs) + len(BACKWARD_ARCHS)) * cfg.seeds
    with tqdm(total=total, desc="reproduce", disable=not progress, unit="step") as bar:
        for job in angle_jobs:
            _run_angles(job, cfg, result, bar)
        for job in sens_jobs:
            _run_sensitivity(job, cfg, result, bar)
        for arch, rule in BACKWARD_ARCHS:
            _run_backward(arch, rule, cfg, result, bar)
    result.files.append(_write_csv(out / "angle_vs_depth.csv", ANGLE_COLUMNS, result.angle_rows))
    result.files.append(
        _write_csv(out / "sensitivity_vs_depth.csv", SENSITIVITY_COLUMNS, result.sensitivity_rows)
    )
    result.files.append(_write_csv(out / "backward_vs_depth.csv", BACKWARD_COLUMNS, result.backward_rows))
    result.seconds = time.perf_counter() - start
    result.files += _plot(result, cfg, out)
    result.files.append(_write_summary(result, cfg, out / "summary.md"))
    return result


def _run_angles(job: tuple, cfg: ReproConfig, result: Reproduction, bar) -> None:
    arch, rule, c, depth = job
    for n in _angle_inputs(cfg, depth):
        for seed in range(cfg.seeds):
            model = _make_model(arch, rule, c if c is not None else 1.0, cfg.width, depth, "fsc", seed, cfg)
            stats = one_step(model, n, seed, cfg)
            result._check_step(stats)
            for j, block in enumerate(stats.blocks):
                result.angle_rows.append(
                    dict(arch=arch, beta_rule=rule, c="" if c is None else c, width=cfg.width, depth=depth,
                         layer=j + 2, seed=seed, n_inputs=n, cos_theta=block.cos_theta)
                )  # fmt: skip
            bar.update()


def _run_sensitivity(job: tuple, cfg: ReproConfig, result: Reproduction, bar) -> None:
    setting, arch, rule, scaling, depth, n = job
    for seed in range(cfg.seeds):
        model = _make_model(arch, rule, 1.0, cfg.sensitivity_width, depth, scaling, seed, cfg)
        if setting == "paper":
            value = paper_sensitivity(model, seed, cfg)
        else:
            stats = one_step(model, n, seed, cfg)
            result._check_step(stats)
            value = stats.blocks[-1].sensitivity
        result.sensitivity_rows.append(
            dict(arch=arch, setting=setting, scaling=scaling, width=cfg.sensitivity_width, depth=depth, seed=seed,
                 n_inputs=n, sensitivity=value)
        )  # fmt: skip
        bar.update()


def _run_backward(arch: str, rule: str, cfg: ReproConfig, result: Reproduction, bar) -> None:
    for seed in range(cfg.seeds):
        model = _make_model(arch, rule, 1.0, cfg.width, cfg.backward_depth, "fsc", seed, cfg)
        stats = backward_step(model, seed, cfg)
        errors = [abs(b.bsf_ratio - 1.0) for b in stats.blocks if b.bsf_ratio is not None]
        result.backward_runs[(arch, seed)] = (
            sum(b.sign_flips for b in stats.blocks),
            max(errors, default=0.0),
        )
        for j, block in enumerate(stats.blocks):
            result.backward_rows.append(
                dict(arch=arch, width=cfg.width, depth=cfg.backward_depth, layer=j + 2, seed=seed,
                     cos_theta_backward=block.cos_theta_backward, bsf_ratio=block.bsf_ratio)
            )  # fmt: skip
            if block.bsf_ratio is not None:
                result.backward_first_order_error = max(
                    result.backward_first_order_error, abs(block.bsf_ratio - 1.0)
                )
        bar.update()


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


# --- aggregation over seeds --------------------------------------------------------------------------------


def mean_last_layer_angle(rows: list[dict]) -> dict[tuple, float]:
    """{(arch, beta_rule, c, depth, n_inputs): mean over seeds of cos θ_{L−1}} (layer L−1 = the last block)."""
    groups = defaultdict(list)
    for r in rows:
        if r["layer"] == r["depth"] - 1:
            groups[(r["arch"], r["beta_rule"], r["c"], r["depth"], r["n_inputs"])].append(r["cos_theta"])
    return {k: sum(v) / len(v) for k, v in groups.items()}


def mean_sensitivity(rows: list[dict]) -> dict[tuple, float]:
    """{(arch, setting, scaling, depth, n_inputs): mean over seeds of S_{L−1}}."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["arch"], r["setting"], r["scaling"], r["depth"], r["n_inputs"])].append(r["sensitivity"])
    return {k: sum(v) / len(v) for k, v in groups.items()}


def mean_backward_angle(rows: list[dict], arch: str) -> dict[int, float]:
    """{L − v: mean over seeds of cos θ̃_v} for one architecture."""
    groups = defaultdict(list)
    for r in rows:
        if r["arch"] == arch:
            groups[r["depth"] - r["layer"]].append(r["cos_theta_backward"])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def log_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def local_slopes(angles: dict[tuple, float], depth: int, n: int) -> list[tuple[float, float, float]]:
    """Fig. 1 (c): (c_i, c_{i+1}, d log cos θ_{L−1} / d log c) between neighbouring values of c at one depth."""
    cs = sorted(k[2] for k in angles if k[1] == "c/sqrt(L)" and k[3] == depth and k[4] == n)
    values = [angles[("resnet", "c/sqrt(L)", c, depth, n)] for c in cs]
    return [(a, b, log_slope([a, b], [u, v])) for a, b, u, v in zip(cs, cs[1:], values, values[1:])]


def _mean_layer_profile(rows: list[dict], arch: str, rule: str, depth: int, n: int) -> tuple[list, list]:
    groups = defaultdict(list)
    for r in rows:
        if (r["arch"], r["beta_rule"], r["c"], r["depth"], r["n_inputs"]) == (arch, rule, "", depth, n):
            groups[r["layer"]].append(r["cos_theta"])
    layers = sorted(groups)
    return layers, [sum(groups[ell]) / len(groups[ell]) for ell in layers]


def _label(arch: str, rule: str) -> str:
    return "MLP" if arch == "mlp" else f"ResNet β={rule.replace('sqrt(L)', '√L')}"


# --- figures and summary -----------------------------------------------------------------------------------


def _ticks(ax, values: list[float]) -> None:
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.set_xticks([], minor=True)


def _plot(result: Reproduction, cfg: ReproConfig, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for name, draw, size in (
        ("fig1_angles.png", _draw_fig1, (15, 4.2)),
        ("fig2_sensitivity.png", _draw_fig2, (12, 4.4)),
        ("backward_vs_depth.png", _draw_backward, (11, 4.2)),
    ):
        fig = plt.figure(figsize=size)
        draw(fig, result, cfg)
        for ax in fig.axes:
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files.append(out / name)
    return files


def _draw_fig1(fig, result: Reproduction, cfg: ReproConfig) -> None:
    axes = fig.subplots(1, 3)
    angles = mean_last_layer_angle(result.angle_rows)
    styles = {n: ("-" if i == 0 else "--") for i, n in enumerate(cfg.n_inputs)}
    depths = sorted(cfg.depths)
    colors = {}
    for arch, rule in ANGLE_ARCHS:
        for n in cfg.n_inputs:
            layers, cos = _mean_layer_profile(result.angle_rows, arch, rule, cfg.layer_depth, n)
            line = axes[0].plot(layers, cos, styles[n], color=colors.get((arch, rule)),
                                label=f"{_label(arch, rule)}, n={n}")  # fmt: skip
            colors[(arch, rule)] = line[0].get_color()
            if arch == "mlp" and n == cfg.n_inputs[0] and len(layers) > 1:  # the MLP's Θ(ℓ^{-1/2}) law
                ref = cos[-1] * math.sqrt(layers[-1])
                axes[0].plot(
                    layers, [ref / math.sqrt(ell) for ell in layers], ":", color="gray", label="∝ ℓ^{-1/2}"
                )
            axes[1].plot(depths, [angles[(arch, rule, "", d, n)] for d in depths], styles[n] + "o",
                         color=colors[(arch, rule)], label=f"{_label(arch, rule)}, n={n}")  # fmt: skip
    axes[0].set(title=f"(a) cos θ_ℓ over layers, L = {cfg.layer_depth}", xlabel="layer ℓ", ylabel="cos θ_ℓ",
                ylim=(0, 1.05))  # fmt: skip
    axes[1].set(title="(b) cos θ_{L−1} over depth", xlabel="depth L", ylabel="cos θ_{L−1}", xscale="log",
                yscale="log")  # fmt: skip
    all_cs = set()
    for depth, color in zip(cfg.c_depths, ("k", "tab:red", "tab:blue")):
        for n in _angle_inputs(cfg, depth):
            cs = sorted(k[2] for k in angles if k[1] == "c/sqrt(L)" and k[3] == depth and k[4] == n)
            all_cs |= set(cs)
            axes[2].plot(cs, [angles[("resnet", "c/sqrt(L)", c, depth, n)] for c in cs], styles[n] + "o",
                         color=color, label=f"L={depth}, n={n}")  # fmt: skip
    cs = sorted(all_cs)
    if cs:
        ref = angles[("resnet", "c/sqrt(L)", cs[0], cfg.c_depths[-1], cfg.n_inputs[0])]
        axes[2].plot(cs, [ref * (c / cs[0]) ** -0.5 for c in cs], ":", color="gray", label="∝ c^{-1/2}")
        axes[2].plot(cs, [ref * (c / cs[0]) ** -1 for c in cs], "-.", color="gray", label="∝ 1/c")
    axes[2].set(title="(c) β = c/√L", xlabel="c", ylabel="cos θ_{L−1}", xscale="log", yscale="log")
    _ticks(axes[2], cs)
    _ticks(axes[1], depths)


def _draw_fig2(fig, result: Reproduction, cfg: ReproConfig) -> None:
    sens = mean_sensitivity(result.sensitivity_rows)
    depths = sorted(cfg.depths)
    series = [("paper", 1, "-o")] + [
        ("probe", n, "--s" if i == 0 else ":^") for i, n in enumerate(cfg.n_inputs)
    ]
    for ax, (arch, _rule), title in zip(
        fig.subplots(1, 2), SENSITIVITY_ARCHS, ("(a) ReLU MLP", "(b) ResNet β=1/√L")
    ):
        for scaling in SENSITIVITY_SCALINGS:
            color = None
            for setting, n, style in series:
                line = ax.plot(depths, [sens[(arch, setting, scaling, d, n)] for d in depths], style, color=color,
                               ms=4, label=f"{scaling}, {setting} n={n}")  # fmt: skip
                color = line[0].get_color()
        ref = sens[(arch, "paper", "mfmup", depths[0], 1)]
        ax.plot(depths, [math.sqrt(d / depths[0]) * ref for d in depths], ":", color="gray", label="∝ √L")
        ax.set(title=f"{title}: S_{{L−1}}, width {cfg.sensitivity_width}", xlabel="depth L", ylabel="S_{L−1}",
               xscale="log", yscale="log")  # fmt: skip
        _ticks(ax, depths)


def _draw_backward(fig, result: Reproduction, cfg: ReproConfig) -> None:
    left, right = fig.subplots(1, 2)
    for arch, rule in BACKWARD_ARCHS:
        profile = mean_backward_angle(result.backward_rows, arch)
        gaps = list(profile)
        left.plot(gaps, list(profile.values()), "o-", ms=3, label=_label(arch, rule))
        errors = defaultdict(float)
        for r in result.backward_rows:
            if r["arch"] == arch and r["bsf_ratio"] is not None:
                gap = r["depth"] - r["layer"]
                errors[gap] = max(errors[gap], abs(r["bsf_ratio"] - 1.0))
        right.plot(sorted(errors), [max(errors[g], 1e-16) for g in sorted(errors)], "o-", ms=3,
                   label=_label(arch, rule))  # fmt: skip
    mlp = mean_backward_angle(result.backward_rows, "mlp")
    if mlp:
        ref = mlp[1]
        left.plot(list(mlp), [ref / math.sqrt(g) for g in mlp], ":", color="gray", label="∝ (L−v)^{-1/2}")
    left.set(title=f"cos θ̃_v (f_v vs −δb_v), L = {cfg.backward_depth}, width {cfg.width}", xlabel="L − v",
             ylabel="cos θ̃_v", xscale="log", yscale="log")  # fmt: skip
    right.set(title="max over seeds of |bsf_ratio − 1|", xlabel="L − v", ylabel="|bsf_ratio − 1|", xscale="log",
              yscale="log")  # fmt: skip


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _write_summary(result: Reproduction, cfg: ReproConfig, path: Path) -> Path:
    lines = [
        "# Reproduction of Fig. 1 and Fig. 2 (Chizat & Netrapalli) and of the backward speed law",
        "",
        f"One GD step at init, input dim {cfg.input_dim}, first layer frozen, float64, mean over {cfg.seeds} "
        f"seed(s); n = number of inputs in the step. Written by `hf-fsf reproduce` in {result.seconds:.0f} s. "
        f"Probe setting: master step {cfg.master_lr:g}, ‖x‖ = √d, first-order check max |fsf_ratio − 1| = "
        f"{result.first_order_error_last:.1e} at layer L−1, {result.first_order_error:.1e} over all layers (largest "
        "where cos θ_ℓ is small: the second-order part of δf_ℓ is not reduced by cos θ_ℓ). Paper setting (Fig. 2): "
        f"master step {cfg.paper_master_lr:g}, ‖x‖ = 1, one input, the readout's input feature, the total loss "
        "change.",
        "",
    ]
    lines += _angle_sections(result, cfg)
    lines += _sensitivity_sections(result, cfg)
    lines += _backward_section(result, cfg)
    path.write_text("\n".join(lines) + "\n")
    return path


def _angle_sections(result: Reproduction, cfg: ReproConfig) -> list[str]:
    angles = mean_last_layer_angle(result.angle_rows)
    lines = [
        f"## cos θ_{{L−1}} over depth (width {cfg.width}, probe setting); MLP column is √L·cos θ_{{L−1}}",
        "",
    ]
    header = ["L"] + [
        f"{'√L·cos MLP' if arch == 'mlp' else _label(arch, rule)} n={n}"
        for arch, rule in ANGLE_ARCHS
        for n in cfg.n_inputs
    ]
    rows = []
    for d in sorted(cfg.depths):
        cells = [str(d)]
        for arch, rule in ANGLE_ARCHS:
            for n in cfg.n_inputs:
                v = angles[(arch, rule, "", d, n)]
                cells.append(f"{math.sqrt(d) * v:.3f}" if arch == "mlp" else f"{v:.3f}")
        rows.append(cells)
    lines += _table(header, rows)
    for depth in cfg.c_depths:
        cs = sorted({k[2] for k in angles if k[1] == "c/sqrt(L)" and k[3] == depth})
        if not cs:
            continue
        lines += [
            "",
            f"## cos θ_{{L−1}} over c, β = c/√L, L = {depth} (β ≤ {max(cs) / math.sqrt(depth):.2f})",
            "",
        ]
        ns = _angle_inputs(cfg, depth)
        rows = [[f"{c:g}"] + [f"{angles[('resnet', 'c/sqrt(L)', c, depth, n)]:.3f}" for n in ns] for c in cs]
        lines += _table(["c"] + [f"n={n}" for n in ns], rows)
        lines += ["", "Local slope d log cos θ / d log c (c^{-1/2}: −0.5; 1/c: −1):", ""]
        slopes = {n: local_slopes(angles, depth, n) for n in ns}
        rows = [
            [f"{a:g} → {b:g}"] + [f"{slopes[n][i][2]:+.2f}" for n in ns]
            for i, (a, b, _) in enumerate(slopes[ns[0]])
        ]
        lines += _table(["c"] + [f"n={n}" for n in ns], rows)
    return lines + [""]


def _sensitivity_sections(result: Reproduction, cfg: ReproConfig) -> list[str]:
    sens = mean_sensitivity(result.sensitivity_rows)
    series = [("paper", 1)] + [("probe", n) for n in cfg.n_inputs]
    lines = []
    for (arch, _rule), title in zip(
        SENSITIVITY_ARCHS, ("(a) ReLU MLP", f"(b) {_label('resnet', '1/sqrt(L)')}")
    ):
        lines += [
            "",
            f"## Fig. 2 {title}: sensitivity S_{{L−1}} over depth (width {cfg.sensitivity_width})",
            "",
        ]
        header = ["L"] + [f"{s} {setting} n={n}" for s in SENSITIVITY_SCALINGS for setting, n in series]
        rows = [
            [str(d)]
            + [f"{sens[(arch, setting, s, d, n)]:.3g}" for s in SENSITIVITY_SCALINGS for setting, n in series]
            for d in sorted(cfg.depths)
        ]
        lines += _table(header, rows)
    lines += [
        "",
        "paper: ‖δφ(h_{L−1})‖_rms (ResNet: ‖δf_{L−1}‖_rms) / (L(w) − L(w + δw)), step "
        f"{cfg.paper_master_lr:g}, ‖x‖ = 1; probe: ‖δf_{{L−1}}‖_rms / ΔL_{{≤L−1}}, step {cfg.master_lr:g}, ‖x‖ = √d. "
        "Every initial residual is ±1 (‖∂loss/∂out‖ = 1 per example). Predicted for the MLP: NTK → 0 with width "
        "(Θ(√(L/m))), MF+μP ∝ √L, FSC = Θ(1).",
        "",
    ]
    return lines


def _backward_section(result: Reproduction, cfg: ReproConfig) -> list[str]:
    lines = [
        f"## Backward speed formula: cos θ̃_v over L − v (L = {cfg.backward_depth}, width {cfg.width}, one input, "
        f"linear loss, master step {cfg.backward_master_lr:g})",
        "",
    ]
    profiles = {arch: mean_backward_angle(result.backward_rows, arch) for arch, _ in BACKWARD_ARCHS}
    gaps = sorted(g for g in profiles["mlp"] if g & (g - 1) == 0 or g == max(profiles["mlp"]))
    header = ["L − v"] + [_label(a, r) for a, r in BACKWARD_ARCHS] + ["√(L−v)·cos MLP"]
    rows = [
        [str(g)]
        + [f"{profiles[a][g]:.3f}" for a, _ in BACKWARD_ARCHS]
        + [f"{math.sqrt(g) * profiles['mlp'][g]:.3f}"]
        for g in gaps
    ]
    lines += _table(header, rows)
    flipped = {k: v for k, v in result.backward_runs.items() if v[0] > 0}
    clean = [r for r in result.backward_rows if (r["arch"], r["seed"]) not in flipped]

    def exponents(rows: list[dict]) -> str:
        fits = {a: mean_backward_angle(rows, a) for a, _ in BACKWARD_ARCHS}
        return ", ".join(
            f"{_label(a, r)} {log_slope(list(fits[a])[1:], list(fits[a].values())[1:]):+.2f}"
            for a, r in BACKWARD_ARCHS
            if len(fits[a]) > 2
        )

    lines += [
        "",
        "Fitted exponent of cos θ̃_v in L − v (least squares over L − v ≥ 2, mean over seeds): all runs: "
        f"{exponents(result.backward_rows)}; runs without a sign switch: {exponents(clean) or '—'} (the paper: −1/2 "
        "for the MLP). Largest |bsf_ratio − 1| over all blocks and seeds: "
        f"{result.backward_first_order_error:.1e}.",
        "",
    ]
    if flipped:
        calm = [e for flips, e in result.backward_runs.values() if flips == 0]
        lines += [
            "Runs in which some feature entry changed sign in the step (a ReLU switched, so b jumped by O(1), which "
            "the continuous-time ḃ does not see): "
            + ", ".join(
                f"{a} seed {s}: {f} flip(s), max |bsf_ratio − 1| {e:.1e}"
                for (a, s), (f, e) in flipped.items()
            )
            + f"; the other runs: max |bsf_ratio − 1| {max(calm, default=0.0):.1e}.",
            "",
        ]
    return lines
