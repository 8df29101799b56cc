"""Which of the four desiderata of PAPER.md §6 (SP, FL, LD, BC) a scaling satisfies, measured with the probe.

For each scaling preset of models.py ("ntk", "mfmup", "fsc"), width m and depth L, one ReLU MLP (all L layers
trainable) takes one GD step at init with the preset's per-layer rates (master step × η, `param_groups`), on a
batch of dense inputs with the targets of paper.py (each initial residual ±1, so ‖∂loss/∂out‖ is fixed). The
probe gives, per step:

- SP   forward_rms of f_{L−1}, the deepest hidden block (a drifting signal is largest there);
- FL   ‖δf_{L−1}‖_rms = relative_speed × forward_rms of f_{L−1} (measured by re-forward);
- LD   the total first-order loss decrease of the step (stem + blocks + head contributions);
- BC   two ratios, both Θ(1) when every layer contributes the same order (≈ 1/L of the total):
       `bc_spread` = max / min of the hidden blocks' contributions, and
       `bc_ends`   = (stem + head contribution) / (2 × mean hidden contribution).

A quantity is Θ(1) when its exponents in width and in depth are both small: log q = a + s_m log m + s_L log L is
fitted by least squares over the grid (log q averaged over seeds: finite-width fluctuations are log-normal), and
the property holds when |s_m| and |s_L| are below `threshold` for each of its quantities.

Which grid points enter the fit: the desiderata are statements about the wide limit (width → ∞ before or faster
than depth). A deep ReLU MLP at L ≳ m is in another regime (the forward gain fluctuates log-normally with
variance ∝ L/m, and the signal of a narrow 128-layer net collapses), so points with L/m > `max_aspect` are
measured and plotted but left out of the fit (None: fit everything). All quantities are linear in the master step to first order, so its value
only sets how first-order the step is, not the exponents.
"""

from __future__ import annotations

import csv
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from hf_fsf.experiments.paper import ReproConfig, one_step
from hf_fsf.models import ReLUMLP
from hf_fsf.stats import StepStats

# quantity -> the desideratum it belongs to
QUANTITIES = {"sp": "SP", "fl": "FL", "ld": "LD", "bc_spread": "BC", "bc_ends": "BC"}
PROPERTIES = ("SP", "FL", "LD", "BC")
SCALINGS = ("ntk", "mfmup", "fsc")


@dataclass
class DesiderataConfig:
    """The measurement grid. `full()` is issue 5's grid; `quick()` a smaller one (well under a minute)."""

    widths: tuple[int, ...] = (64, 128, 256, 512, 1024)
    depths: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    scalings: tuple[str, ...] = SCALINGS
    n_inputs: int = 64
    seeds: int = 2
    input_dim: int = 10
    output_dim: int = 1
    master_lr: float = 1e-3
    # |exponent| below this counts as Θ(1): halfway between 0 and the ±1/2 of the predicted failures (PAPER.md §6)
    threshold: float = 0.25
    max_aspect: float | None = 0.25  # fit only points with depth / width ≤ this (None: all)
    threads: int | None = 1  # torch threads while measuring; None leaves the setting alone

    @classmethod
    def full(cls, seeds: int = 2) -> DesiderataConfig:
        return cls(seeds=seeds)

    @classmethod
    def quick(cls, seeds: int = 3) -> DesiderataConfig:
        return cls(widths=(64, 128, 256), depths=(4, 8, 16, 32), n_inputs=16, seeds=seeds)

    def __post_init__(self) -> None:
        unknown = [s for s in self.scalings if s not in SCALINGS]
        if unknown:
            raise ValueError(f"unknown scaling(s) {unknown}: choose from {SCALINGS}")
        if len(set(self.widths)) < 2 or len(set(self.depths)) < 2:
            raise ValueError(
                "fitting an exponent needs at least two distinct widths and two distinct depths, got "
                f"widths={self.widths}, depths={self.depths}"
            )
        if min(self.depths) < 4:
            raise ValueError(
                f"depths must be ≥ 4 (got {min(self.depths)}): BC compares at least two hidden blocks (L − 2 ≥ 2)."
            )
        if self.seeds < 1 or self.n_inputs < 1:
            raise ValueError(
                f"seeds and n_inputs must be ≥ 1, got seeds={self.seeds}, n_inputs={self.n_inputs}"
            )
        if (
            self.max_aspect is not None
            and sum(L <= self.max_aspect * m for m in self.widths for L in self.depths) < 3
        ):
            raise ValueError(
                f"max_aspect={self.max_aspect} leaves fewer than 3 grid points with depth/width ≤ max_aspect to fit "
                "two exponents: use wider widths, smaller depths, a larger max_aspect, or None."
            )
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")


@dataclass
class DesiderataPoint:
    """The quantities of one step (one scaling, width, depth, seed); fl and ld divided by the master step."""

    scaling: str
    width: int
    depth: int
    seed: int
    sp: float
    fl: float
    ld: float
    bc_spread: float
    bc_ends: float


@dataclass
class Exponents:
    """Fitted exponents of one quantity under one scaling: q ∝ m^width · L^depth."""

    scaling: str
    quantity: str
    width: float
    depth: float


@dataclass
class DesiderataResult:
    points: list[DesiderataPoint] = field(default_factory=list)
    exponents: list[Exponents] = field(default_factory=list)
    verdicts: dict[str, dict[str, bool]] = field(default_factory=dict)  # scaling -> property -> holds
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def quantities(stats: StepStats) -> dict[str, float]:
    """SP, FL, LD and the two BC ratios of one measured step (see the module docstring)."""
    if not stats.angle or len(stats.blocks) < 2:
        raise ValueError(
            "quantities: need a step measured with angle=True on a model with ≥ 2 hidden blocks."
        )
    last = stats.blocks[-1]
    hidden = [b.contribution for b in stats.blocks]
    mean_hidden = sum(hidden) / len(hidden)
    return {
        "sp": last.forward_rms,
        "fl": last.relative_speed * last.forward_rms,
        "ld": stats.total_loss_decrease,
        "bc_spread": max(hidden) / min(hidden),
        "bc_ends": (stats.stem_contribution + stats.head_contribution) / (2 * mean_hidden),
    }


def measure_point(scaling: str, width: int, depth: int, seed: int, cfg: DesiderataConfig) -> DesiderataPoint:
    """One GD step at init of a float64 ReLU MLP with the preset's rates, measured by the probe."""
    torch.manual_seed(seed)
    model = ReLUMLP(cfg.input_dim, width, depth, cfg.output_dim, scaling=scaling).double()
    step_cfg = ReproConfig(input_dim=cfg.input_dim, output_dim=cfg.output_dim, master_lr=cfg.master_lr)
    q = quantities(one_step(model, cfg.n_inputs, seed, step_cfg))
    # FL and LD are proportional to the master step (to first order): report them per unit step.
    q["fl"] /= cfg.master_lr
    q["ld"] /= cfg.master_lr
    return DesiderataPoint(scaling, width, depth, seed, **q)


def fit_exponents(
    points: list[DesiderataPoint], scaling: str, quantity: str, max_aspect: float | None = None
) -> Exponents:
    """Least-squares fit of log q = a + s_m log m + s_L log L over the grid points with L/m ≤ max_aspect (None:
    all), log q averaged over seeds first."""
    groups = defaultdict(list)
    for p in points:
        if p.scaling == scaling and (max_aspect is None or p.depth <= max_aspect * p.width):
            q = getattr(p, quantity)
            if not (q > 0 and math.isfinite(q)):
                raise ValueError(
                    f"{scaling} {quantity} at width {p.width}, depth {p.depth}, seed {p.seed} is {q}: cannot take "
                    "its logarithm."
                )
            groups[(p.width, p.depth)].append(math.log(q))
    if len(groups) < 3:
        raise ValueError(
            f"fit_exponents: {len(groups)} grid point(s) for {scaling}; need ≥ 3 to fit two exponents."
        )
    rows, values = [], []
    for (m, L), logs in groups.items():
        rows.append([1.0, math.log(m), math.log(L)])
        values.append([sum(logs) / len(logs)])
    coef = torch.linalg.lstsq(
        torch.tensor(rows, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
    )
    _, s_m, s_L = coef.solution.flatten().tolist()
    return Exponents(scaling, quantity, s_m, s_L)


def verdicts(exponents: list[Exponents], threshold: float) -> dict[str, dict[str, bool]]:
    """scaling -> property -> holds (every quantity of the property has |exponent| < threshold in m and L)."""
    out: dict[str, dict[str, bool]] = defaultdict(lambda: {p: True for p in PROPERTIES})
    for e in exponents:
        ok = abs(e.width) < threshold and abs(e.depth) < threshold
        out[e.scaling][QUANTITIES[e.quantity]] &= ok
    return dict(out)


def run_desiderata(
    cfg: DesiderataConfig, out_dir: str | Path | None = None, progress: bool = True
) -> DesiderataResult:
    """Measures the grid, fits the exponents, decides; writes CSVs, table and plots under out_dir if given."""
    from tqdm.auto import tqdm

    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)  # small matrices on a shared CPU: one thread is fastest
    result = DesiderataResult()
    start = time.perf_counter()
    jobs = [
        (s, m, L, seed)
        for s in cfg.scalings
        for L in cfg.depths
        for m in cfg.widths
        for seed in range(cfg.seeds)
    ]
    try:
        for job in tqdm(jobs, desc="desiderata", disable=not progress, unit="step"):
            result.points.append(measure_point(*job, cfg))
    finally:
        torch.set_num_threads(threads)
    result.exponents = [
        fit_exponents(result.points, s, q, cfg.max_aspect) for s in cfg.scalings for q in QUANTITIES
    ]
    result.verdicts = verdicts(result.exponents, cfg.threshold)
    result.seconds = time.perf_counter() - start
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.files.append(_write_csv(out / "desiderata_points.csv", result.points))
        result.files.append(_write_csv(out / "desiderata_exponents.csv", result.exponents))
        (out / "desiderata.md").write_text(markdown_table(result, cfg) + "\n")
        result.files.append(out / "desiderata.md")
        result.files += plot(result, cfg, out)
    return result


def _write_csv(path: Path, records: list) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(records[0])])
        writer.writeheader()
        writer.writerows(asdict(r) for r in records)
    return path


def markdown_table(result: DesiderataResult, cfg: DesiderataConfig) -> str:
    """Exponents (width, depth) of each quantity per scaling, and the verdict of each property."""
    names = {"ntk": "NTK", "mfmup": "MF+μP", "fsc": "FSC"}
    by_key = {(e.scaling, e.quantity): e for e in result.exponents}
    header = "| quantity (property) | " + " | ".join(f"{names[s]}: s_m, s_L" for s in cfg.scalings) + " |"
    lines = [header, "|---" * (len(cfg.scalings) + 1) + "|"]
    for q, prop in QUANTITIES.items():
        cells = []
        for s in cfg.scalings:
            e = by_key[(s, q)]
            ok = abs(e.width) < cfg.threshold and abs(e.depth) < cfg.threshold
            cells.append(f"{e.width:+.2f}, {e.depth:+.2f}{'' if ok else ' ✗'}")
        lines.append(f"| {q} ({prop}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| property | " + " | ".join(names[s] for s in cfg.scalings) + " |")
    lines.append("|---" * (len(cfg.scalings) + 1) + "|")
    for prop in PROPERTIES:
        cells = ["holds" if result.verdicts[s][prop] else "**fails**" for s in cfg.scalings]
        lines.append(f"| {prop} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Exponents s_m, s_L of q ∝ m^s_m · L^s_L (least squares over widths {list(cfg.widths)} × depths "
        f"{list(cfg.depths)}"
        f"{'' if cfg.max_aspect is None else f' with L/m ≤ {cfg.max_aspect:g}'}, {cfg.seeds} seed(s), "
        f"{cfg.n_inputs} input(s), master step {cfg.master_lr:g}); "
        f"✗: |s| ≥ {cfg.threshold:g}, so the quantity is not Θ(1)."
    )
    return "\n".join(lines)


def plot(result: DesiderataResult, cfg: DesiderataConfig, out: Path) -> list[Path]:
    """One PNG per scaling: each quantity vs width (a line per depth) and vs depth (a line per width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = defaultdict(list)  # (scaling, quantity, width, depth) -> log q over seeds
    for p in result.points:
        for q in QUANTITIES:
            logs[(p.scaling, q, p.width, p.depth)].append(math.log(getattr(p, q)))

    def geometric_mean(s: str, q: str, m: int, L: int) -> float:
        return math.exp(sum(logs[(s, q, m, L)]) / len(logs[(s, q, m, L)]))

    files = []
    for s in cfg.scalings:
        fig, axes = plt.subplots(2, len(QUANTITIES), figsize=(3.0 * len(QUANTITIES), 5.2), squeeze=False)
        for col, q in enumerate(QUANTITIES):
            top, bottom = axes[0][col], axes[1][col]
            for L in cfg.depths:
                top.plot(cfg.widths, [geometric_mean(s, q, m, L) for m in cfg.widths], marker="o", ms=3, lw=1,
                         label=f"L={L}")  # fmt: skip
            for m in cfg.widths:
                bottom.plot(cfg.depths, [geometric_mean(s, q, m, L) for L in cfg.depths], marker="o", ms=3, lw=1,
                            label=f"m={m}")  # fmt: skip
            for ax, xlabel in ((top, "width m"), (bottom, "depth L")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.set_title(f"{q} ({QUANTITIES[q]})", fontsize=9)
                ax.tick_params(labelsize=7)
        axes[0][0].legend(fontsize=6)
        axes[1][0].legend(fontsize=6)
        fig.suptitle(f"{s}: desiderata quantities at init (one GD step)", fontsize=10)
        fig.tight_layout()
        path = out / f"desiderata_{s}.png"
        fig.savefig(path, dpi=70)
        plt.close(fig)
        files.append(path)
    return files
