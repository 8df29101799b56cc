"""Which of the four desiderata of PAPER.md §6 (SP, FL, LD, BC) a scaling satisfies, measured with the probe.

For each scaling preset of models.py ("ntk", "mfmup", "fsc"), width m and depth L, one ReLU MLP (all L layers
trainable) takes one GD step at init with the preset's per-layer rates (master step × η, `param_groups`), on a
batch of dense inputs with the targets of paper.py (each initial residual ±1, so ‖∂loss/∂out‖ is fixed). The
probe gives, per step:

- SP   forward_rms of f_{L−1}, the deepest hidden block (a drifting signal is largest there);
- FL   ‖δf_{L−1}‖_rms = relative_speed × forward_rms of f_{L−1} (measured by re-forward);
- LD   the total first-order loss decrease of the step (stem + blocks + head contributions);
- BC   what the paper's BC says (every layer's contribution of the same order as m → ∞): the input layer's and the
       output layer's contributions against the mean hidden one, `bc_input` = stem / mean hidden and
       `bc_output` = head / mean hidden, and the profile over the hidden blocks, `bc_hidden` = mean contribution
       of the deeper half / mean of the shallower half. `bc_spread` = max / min over the hidden blocks is reported
       but not decided on: a per-step max over L − 2 random draws measures finite-width fluctuations, identical
       under the three presets (they share σ and the hidden rates' proportions).

Beside them (`DesiderataConfig.stability`), the stability desiderata of §6.1 and our reading of Thm 6.3:

- FS   forward stability: max over hidden blocks of ‖δf_ℓ‖ / ‖f_ℓ‖ is O(1);
- BS   backward stability: max over hidden blocks of ‖ḃ_ℓ‖ / ‖b_ℓ‖ is O(1), ḃ_ℓ the first-order change of the
       backward pass along the step with the ReLU gates fixed (`backward_stability`: the continuous-time ḃ; a
       finite difference would measure the gates the step switches, whose jumps grow like √step);
- Thm 6.3 (as PAPER.md §6 restates it, with Eq. 7): (i) the input + hidden decrease ΔL_{≤L−1} is Θ(1), (ii) the
       output layer's contribution is O(1), (iii) the sensitivity S_{L−1} is Θ(1). (i) and (iii) give FL through
       the feature speed formula, (i) and (ii) give LD; the per-layer split of BC is not needed.

A quantity is Θ(1) when its exponents in width and in depth are both small: log q = a + s_m log m + s_L log L is
fitted by least squares over the grid (log q averaged over seeds: finite-width fluctuations are log-normal), and
the property holds when |s_m| and |s_L| are below `threshold` for each of its quantities (for an O(1) quantity, FS,
BS and Thm 6.3 (ii), when s_m and s_L are below it: only growth fails).

Which grid points enter the fit: the desiderata are statements about the wide limit (width → ∞ before or faster
than depth). A deep ReLU MLP at L ≳ m is in another regime (the forward gain fluctuates log-normally with
variance ∝ L/m, and the signal of a narrow 128-layer net collapses), so points with L/m > `max_aspect` are
measured and plotted but left out of the fit (None: fit everything). All quantities are linear in the master step to first order, so its value
only sets how first-order the step is, not the exponents.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from hf_fsf.experiments.paper import ReproConfig, inputs_and_signs, one_step
from hf_fsf.models import ReLUMLP
from hf_fsf.stats import StepStats

# quantity -> the desideratum it belongs to (from one probe step: `quantities`)
QUANTITIES = {"sp": "SP", "fl": "FL", "ld": "LD", "bc_input": "BC", "bc_output": "BC", "bc_hidden": "BC"}
PROPERTIES = ("SP", "FL", "LD", "BC")
# §6.1 stability and Thm 6.3's conditions (measured with `DesiderataConfig.stability`)
STABILITY = {"fs": "FS", "bs": "BS"}
THEOREM_6_3 = {
    "t63_decrease": "(i) ΔL_{≤L−1} = Θ(1)",
    "t63_output": "(ii) output contribution = O(1)",
    "t63_sensitivity": "(iii) S_{L−1} = Θ(1) (Eq. 7)",
}
THM = "Thm 6.3"
PROPERTY_OF = {**QUANTITIES, **STABILITY, **dict.fromkeys(THEOREM_6_3, THM)}
UPPER_BOUNDS = ("fs", "bs", "t63_output")  # O(1): only a positive exponent fails
DIAGNOSTICS = ("bc_spread",)  # measured and fitted, not decided on
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
    stability: bool = True  # also FS, BS (a second, backward-speed step per point) and Thm 6.3's conditions
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
    bc_input: float
    bc_output: float
    bc_hidden: float
    bc_spread: float
    # with DesiderataConfig.stability (nan otherwise); fs and bs per unit master step
    fs: float = math.nan
    bs: float = math.nan
    t63_decrease: float = math.nan
    t63_output: float = math.nan
    t63_sensitivity: float = math.nan


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
    """SP, FL, LD, the BC ratios, and the probe-side stability quantities of one measured step (module docstring).

    fs is not divided by the master step here; t63_* are the raw ΔL_{≤L−1}, head contribution and S_{L−1}."""
    if not stats.angle or len(stats.blocks) < 2:
        raise ValueError(
            "quantities: need a step measured with angle=True on a model with ≥ 2 hidden blocks."
        )
    last = stats.blocks[-1]
    hidden = [b.contribution for b in stats.blocks]
    mean_hidden = sum(hidden) / len(hidden)
    half = len(hidden) // 2
    shallow, deep = hidden[:half], hidden[len(hidden) - half :]
    return {
        "sp": last.forward_rms,
        "fl": last.relative_speed * last.forward_rms,
        "ld": stats.total_loss_decrease,
        "bc_input": stats.stem_contribution / mean_hidden,
        "bc_output": stats.head_contribution / mean_hidden,
        "bc_hidden": (sum(deep) / len(deep)) / (sum(shallow) / len(shallow)),
        "bc_spread": max(hidden) / min(hidden),
        "fs": max(b.relative_speed for b in stats.blocks),
        "t63_decrease": last.loss_decrease,
        "t63_output": stats.head_contribution,
        "t63_sensitivity": last.sensitivity,
    }


def backward_stability(model: ReLUMLP, n_inputs: int, seed: int, step: ReproConfig) -> float:
    """BS of one GD step, per unit master step: max over hidden blocks of ‖ḃ_ℓ‖ / ‖b_ℓ‖, with the inputs, targets
    and rates of `one_step`.

    ḃ_ℓ is the first-order change of b_ℓ along the step with the ReLU gates D_ℓ = φ'(h_ℓ) held fixed, i.e. the
    continuous-time ḃ of the paper. A discrete step of a wide, deep net switches some gates, and each switch makes
    b jump by O(1) in the entries it gates: ‖δb‖ then grows like √(step), not like the step, and a finite-difference
    BS measures the switches, not ḃ (see `hf_fsf.backward_speed`, `sign_flips`). For the MLP of models.py
    (h_1 = W_1 x, h_ℓ = W_ℓ φ(h_{ℓ−1}), out = W_L φ(h_{L−1})), with row vectors and g = ∂loss/∂out:
    b_{L−1} = D (g W_L), b_{ℓ−1} = D (b_ℓ W_ℓ), and their first-order changes follow by the product rule.
    """
    x, sign = inputs_and_signs(n_inputs, seed, step)
    weights = [
        model.input_layer.weight,
        *(b.linear.weight for b in model.blocks),
        model.readout.linear.weight,
    ]
    with torch.no_grad():
        y = model(x) + sign
    loss = 0.5 * (model(x) - y).pow(2).sum(dim=1).mean()
    trainable = [w for w in weights if w.requires_grad]
    grads = dict(zip(map(id, trainable), torch.autograd.grad(loss, trainable)))
    rates = {id(p): g["lr"] for g in model.param_groups(1.0) for p in g["params"]}
    deltas = [-rates[id(w)] * grads[id(w)] if id(w) in grads else torch.zeros_like(w) for w in weights]
    with torch.no_grad():
        hs, dhs = [x @ weights[0].T], [x @ deltas[0].T]  # h_ℓ and its first-order change δh_ℓ
        for w, dw in zip(weights[1:], deltas[1:]):
            hs.append(torch.relu(hs[-1]) @ w.T)
            dhs.append(torch.relu(hs[-2]) @ dw.T + ((hs[-2] > 0) * dhs[-1]) @ w.T)
        out, dout = hs.pop(), dhs.pop()
        g, dg = (out - y) / len(x), dout / len(x)  # ∇loss and ∇²loss δout for ½·mean‖out − y‖²
        ratios = []
        for ell in range(
            len(weights) - 1, 1, -1
        ):  # b_{ell−1}, the output of block ell − 2, from layer ell's W
            gate = hs[ell - 1] > 0
            g, dg = gate * (g @ weights[ell]), gate * (dg @ weights[ell] + g @ deltas[ell])
            ratios.append(float(dg.norm() / g.norm()))
    return max(ratios)


def measure_point(scaling: str, width: int, depth: int, seed: int, cfg: DesiderataConfig) -> DesiderataPoint:
    """One GD step at init of a float64 ReLU MLP with the preset's rates, measured by the probe."""
    torch.manual_seed(seed)
    model = ReLUMLP(cfg.input_dim, width, depth, cfg.output_dim, scaling=scaling).double()
    twin = copy.deepcopy(model) if cfg.stability else None  # the weights before the probe's step
    step_cfg = ReproConfig(input_dim=cfg.input_dim, output_dim=cfg.output_dim, master_lr=cfg.master_lr)
    q = quantities(one_step(model, cfg.n_inputs, seed, step_cfg))
    # FL, LD, FS, BS and the decreases are proportional to the master step (to first order): per unit step.
    for name in ("fl", "ld", "fs", "t63_decrease", "t63_output"):
        q[name] /= cfg.master_lr
    if twin is None:
        q = {k: v for k, v in q.items() if k not in STABILITY and k not in THEOREM_6_3}
    else:
        q["bs"] = backward_stability(twin, cfg.n_inputs, seed, step_cfg)
    return DesiderataPoint(scaling, width, depth, seed, **q)


def fitted_quantities(cfg: DesiderataConfig) -> list[str]:
    """The quantities fitted for `cfg`: the desiderata's, the diagnostics, and (stability) FS, BS, Thm 6.3."""
    names = [*QUANTITIES, *DIAGNOSTICS]
    return names + ([*STABILITY, *THEOREM_6_3] if cfg.stability else [])


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


def holds(e: Exponents, threshold: float) -> bool:
    """Θ(1): both exponents below the threshold in absolute value; O(1) (UPPER_BOUNDS): both below it."""
    if e.quantity in UPPER_BOUNDS:
        return e.width < threshold and e.depth < threshold
    return abs(e.width) < threshold and abs(e.depth) < threshold


def verdicts(exponents: list[Exponents], threshold: float) -> dict[str, dict[str, bool]]:
    """scaling -> property -> holds (every quantity of the property `holds`); diagnostics are not decided on, and
    a property appears only when one of its quantities was fitted."""
    out: dict[str, dict[str, bool]] = defaultdict(dict)
    for e in exponents:
        prop = PROPERTY_OF.get(e.quantity)
        if prop is not None:
            out[e.scaling][prop] = out[e.scaling].get(prop, True) and holds(e, threshold)
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
        fit_exponents(result.points, s, q, cfg.max_aspect)
        for s in cfg.scalings
        for q in fitted_quantities(cfg)
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
    for q in fitted_quantities(cfg):
        cells = []
        for s in cfg.scalings:
            e = by_key[(s, q)]
            mark = "" if q in DIAGNOSTICS or holds(e, cfg.threshold) else " ✗"
            cells.append(f"{e.width:+.2f}, {e.depth:+.2f}{mark}")
        label = THEOREM_6_3.get(q, PROPERTY_OF.get(q, "diagnostic"))
        lines.append(f"| {q} ({label}{', O(1)' if q in UPPER_BOUNDS else ''}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| property | " + " | ".join(names[s] for s in cfg.scalings) + " |")
    lines.append("|---" * (len(cfg.scalings) + 1) + "|")
    properties = [*PROPERTIES, *STABILITY.values(), THM] if cfg.stability else PROPERTIES
    for prop in properties:
        cells = ["holds" if result.verdicts[s][prop] else "**fails**" for s in cfg.scalings]
        lines.append(f"| {prop} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Exponents s_m, s_L of q ∝ m^s_m · L^s_L (least squares over widths {list(cfg.widths)} × depths "
        f"{list(cfg.depths)}"
        f"{'' if cfg.max_aspect is None else f' with L/m ≤ {cfg.max_aspect:g}'}, {cfg.seeds} seed(s), "
        f"{cfg.n_inputs} input(s), master step {cfg.master_lr:g}); "
        f"✗: |s| ≥ {cfg.threshold:g}, so the quantity is not Θ(1) (O(1) quantities: s ≥ {cfg.threshold:g}); "
        "diagnostics are not decided on."
    )
    return "\n".join(lines)


def plot(result: DesiderataResult, cfg: DesiderataConfig, out: Path) -> list[Path]:
    """One PNG per scaling: each quantity vs width (a line per depth) and vs depth (a line per width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = fitted_quantities(cfg)
    logs = defaultdict(list)  # (scaling, quantity, width, depth) -> log q over seeds
    for p in result.points:
        for q in names:
            logs[(p.scaling, q, p.width, p.depth)].append(math.log(getattr(p, q)))

    def geometric_mean(s: str, q: str, m: int, L: int) -> float:
        return math.exp(sum(logs[(s, q, m, L)]) / len(logs[(s, q, m, L)]))

    files = []
    for s in cfg.scalings:
        fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 5.2), squeeze=False)
        for col, q in enumerate(names):
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
                ax.set_title(f"{q} ({PROPERTY_OF.get(q, 'diagnostic')})", fontsize=9)
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
