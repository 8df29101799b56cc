"""Recipe: μTransfer-style benchmark. Does the best learning rate stay put when the model grows?

For each task, sweep (width at fixed depth, depth at fixed width) and parametrization, train every size over a
geometric grid of learning rates (FSC: of its `rate`) with several seeds, and measure the held-out loss:

    python recipes/transfer.py --quick                       # small grid, ~30 s on 2 cores
    python recipes/transfer.py --tasks teacher --sweeps width,depth --steps 300 --seeds 2 --workers 2

The grids (sizes, steps, batch sizes, learning-rate centres, seeds) are in configs/transfer.yaml (`--config`);
the flags below override them.

Tasks: "teacher" (ResNet on a TeacherStream: fresh samples every step, a held-out set from the same distribution,
a loss floor of noise²), "gpt2" (GPT-2-style byte LM on the stdlib corpus, less than one epoch), "digits"
(scikit-learn's digits, real data; it memorizes quickly, so its test *accuracy* is the number to read).

Every run has a 5 % linear warm-up and a linear decay to 0 (--schedule constant: none); for FSC it scales `rate`.

Parametrizations:
  standard   AdamW, one learning rate, PyTorch/He init; ResNet branch β = 1/√2 (constant), GPT-2 as in HF.
  mup        μP through the `mup` package: MuReadout (GPT-2: tied MuSharedReadout, attention scale 1/head_dim,
             hidden weights re-initialized with variance ∝ 1/width), set_base_shapes, MuAdamW. Base width: the
             smallest width of the sweep.
  depth-mup  μP with branch β = 1/√L, and hidden (block) learning rates × √(L_base/L), the Adam rule of depth-μP
             (Yang et al. 2023, Tensor Programs VI); L_base is the smallest depth of the sweep.
  fsc        hf_fsf.FSCOptimizer over AdamW (base lr 1e-3), β = 1/√L; the swept setting is FSC's `rate`.
  fsc-stages the same with balance="stages" (FSC's default): ends (stem + head) and trunk 2 : 1 of the target.

Outputs in --out-dir: transfer_runs.csv (every run), transfer_summary.csv (columns
task,sweep,parametrization,size,optimal_lr,best_loss,drift,regret), transfer_summary.md (with digits' test
accuracy), and one loss-vs-learning-rate figure per task and sweep (one panel per parametrization, one curve per
size). Every loss is a held-out loss averaged over the seeds; a diverged run counts as +inf.
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import os
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import yaml
from torch import nn

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "transfer.yaml"
SWEEPS = ("width", "depth")
SCHEDULES = ("linear", "constant")
SUMMARY_COLUMNS = ("task", "sweep", "parametrization", "size", "optimal_lr", "best_loss", "drift", "regret")
STANDARD_BETA = 1 / math.sqrt(2)  # the constant branch of standard / μP ResNets: f <- (f + W φ(f))/√2
FSC_BASE_LR = 1e-3  # the base AdamW's own lr under FSC: only the reference step (FSC rescales it every step)


@dataclass(frozen=True)
class Parametrization:
    depth_branch: bool  # branch β = 1/√L (ResNet and GPT-2); else ResNet β = 1/√2 and GPT-2 as in HF
    mup: bool  # μP readout and init, set_base_shapes, MuAdamW
    depth_lr: bool  # depth-μP: block learning rates × √(L_base/L)
    fsc_balance: str | None  # FSCOptimizer over AdamW with this balance; None: no FSC


PARAMETRIZATIONS = {
    "standard": Parametrization(depth_branch=False, mup=False, depth_lr=False, fsc_balance=None),
    "mup": Parametrization(depth_branch=False, mup=True, depth_lr=False, fsc_balance=None),
    "depth-mup": Parametrization(depth_branch=True, mup=True, depth_lr=True, fsc_balance=None),
    "fsc": Parametrization(depth_branch=True, mup=False, depth_lr=False, fsc_balance="blocks"),
    "fsc-stages": Parametrization(depth_branch=True, mup=False, depth_lr=False, fsc_balance="stages"),
}


@dataclass(frozen=True)
class Grid:
    """One task's grid (a task entry of configs/transfer.yaml)."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    fixed_width: int
    fixed_depth: int
    steps: int
    batch_size: int
    centers: dict  # parametrization -> center of the geometric lr grid
    block_size: int = 64  # gpt2 only
    eval_size: int = 2048  # held-out samples (teacher) or blocks (gpt2)


@dataclass(frozen=True)
class RunConfig:
    task: str
    sweep: str
    parametrization: str
    width: int
    depth: int
    lr: float
    seed: int
    steps: int
    batch_size: int
    base_width: int  # μP base shapes
    base_depth: int  # depth-μP's reference depth
    block_size: int = 64
    eval_size: int = 2048
    schedule: str = "linear"

    @property
    def size(self) -> int:
        return self.width if self.sweep == "width" else self.depth


@dataclass
class RunResult:
    task: str
    sweep: str
    parametrization: str
    size: int
    lr: float
    seed: int
    loss: float  # held-out loss at the end of training (+inf when training diverged)
    accuracy: float  # held-out accuracy (digits), nan otherwise
    train_loss_first: float
    train_loss_last: float
    seconds: float
    steps: int = 0  # training steps and schedule of the run (0 / "": unknown, from an older runs file)
    schedule: str = ""


@dataclass
class SummaryRow:
    task: str
    sweep: str
    parametrization: str
    size: int
    optimal_lr: float
    best_loss: float
    drift: float  # max / min optimal setting over the sizes of the sweep
    regret: float  # loss at the largest size with the smallest size's optimum / best loss at the largest size

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task, self.sweep, self.parametrization)


# ----------------------------------------------------------------------------------------------------------------
# Models and optimizers
# ----------------------------------------------------------------------------------------------------------------


def build_resnet(parametrization: str, width: int, depth: int, d_in: int, d_out: int) -> nn.Module:
    """The hf_fsf ResNet for a parametrization (μP variants get a MuReadout; base shapes are set by the caller)."""
    from hf_fsf.models import ResNet

    p = PARAMETRIZATIONS[parametrization]
    beta = "1/sqrt(L)" if p.depth_branch else STANDARD_BETA
    model = ResNet(d_in, width, depth, d_out, beta=beta, scaling="fsc" if p.fsc_balance else "standard")
    if p.mup:
        from mup import MuReadout

        readout = MuReadout(width, d_out, bias=False, readout_zero_init=False)
        with torch.no_grad():
            readout.weight.copy_(model.readout.weight)  # σ = 1/√m; set_base_shapes rescales it to μP
        model.readout = readout
    return model


def build_gpt2(cfg: RunConfig, width: int | None = None, shapes: bool = True) -> nn.Module:
    """GPT-2-style byte LM (4 heads, no dropout, tied embeddings) for a parametrization."""
    from hf_fsf.models import small_gpt2
    from hf_fsf.residual import apply_branch_scaling

    p = PARAMETRIZATIONS[cfg.parametrization]
    width = cfg.width if width is None else width
    model = small_gpt2(
        cfg.depth, width, heads=4, block_size=cfg.block_size, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    if p.depth_branch:
        apply_branch_scaling(model, "1/sqrt(L)")
    if p.mup:
        from mup import MuSharedReadout

        # hidden matrices: variance ∝ 1/width, equal to HF's 0.02² at the base width
        std = model.config.initializer_range * math.sqrt(cfg.base_width / width)
        for block in model.transformer.h:
            block.attn.scaling = 1.0 / block.attn.head_dim  # μP attention: 1/d_head, not 1/√d_head
            with torch.no_grad():
                for module in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                    module.weight.normal_(0.0, std)
        model.lm_head = MuSharedReadout(model.transformer.wte.weight, bias=False)
        if shapes:
            # rescale_params=False: the tied embedding is an input weight and must not be rescaled as a readout.
            _set_mup_shapes(
                model, lambda w: build_gpt2(cfg, width=w, shapes=False), cfg.base_width, rescale_params=False
            )
    return model


def _set_mup_shapes(model: nn.Module, build: Callable[[int], nn.Module], base_width: int, **kw) -> None:
    """set_base_shapes against the base width (and 2x it as the delta that marks which dims grow)."""
    from mup import set_base_shapes

    set_base_shapes(model, build(base_width), delta=build(2 * base_width), **kw)


def make_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (standard), MuAdamW (μP; depth-μP with block lrs × √(L_base/L)), or FSCOptimizer over AdamW."""
    p = PARAMETRIZATIONS[cfg.parametrization]
    if p.fsc_balance:
        from hf_fsf.control import FSCOptimizer

        return FSCOptimizer(
            model,
            base=torch.optim.AdamW,
            rate=cfg.lr,
            balance=p.fsc_balance,
            lr=FSC_BASE_LR,
            weight_decay=0.0,
        )
    if not p.mup:
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    from mup import MuAdamW

    factor = math.sqrt(cfg.base_depth / cfg.depth) if p.depth_lr else 1.0
    blocks = model.transformer.h if hasattr(model, "transformer") else model.blocks
    inside = {id(q) for q in blocks.parameters()}
    params = [q for q in model.parameters() if q.requires_grad]
    groups = [
        {"params": [q for q in params if id(q) in inside], "lr": cfg.lr * factor},
        {"params": [q for q in params if id(q) not in inside], "lr": cfg.lr},
    ]
    return MuAdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Tasks: each builds its model, its training batches, its loss and its held-out evaluation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Task:
    model: nn.Module
    batches: Iterable  # one batch per training step
    loss_fn: Callable[[nn.Module, object], torch.Tensor]
    # held-out (loss, accuracy); accuracy is nan when the task is not a classification
    evaluate: Callable[[nn.Module], tuple[float, float]]


def _mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _cross_entropy(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def _resnet(cfg: RunConfig, d_in: int, d_out: int) -> nn.Module:
    def build(width: int) -> nn.Module:
        return build_resnet(cfg.parametrization, width, cfg.depth, d_in, d_out)

    model = build(cfg.width)
    if PARAMETRIZATIONS[cfg.parametrization].mup:
        _set_mup_shapes(model, build, cfg.base_width)
    return model


def teacher_task(cfg: RunConfig, gen: torch.Generator) -> Task:
    """Regression on a TeacherStream (32 inputs, 4 outputs, noise 0.3): fresh samples every step."""
    from hf_fsf.data import TeacherStream

    stream = TeacherStream(32, 4, noise=0.3, seed=0)
    batches = (stream.sample(cfg.batch_size, gen) for _ in range(cfg.steps))
    x, y = stream.sample(cfg.eval_size, torch.Generator().manual_seed(12345))
    model = _resnet(cfg, 32, 4)
    return Task(model, batches, _mse, lambda m: (float(_mse(m, (x, y))), math.nan))


def digits_task(cfg: RunConfig, gen: torch.Generator) -> Task:
    """scikit-learn's digits (64 pixels, 10 classes): batches drawn with replacement, scored on the test split."""
    from hf_fsf.data import load_digits_tensors

    data = load_digits_tensors()
    n = data.x_train.shape[0]
    idx = (torch.randint(n, (cfg.batch_size,), generator=gen) for _ in range(cfg.steps))
    batches = ((data.x_train[i], data.y_train[i]) for i in idx)

    def evaluate(model):
        out = model(data.x_test)
        accuracy = (out.argmax(1) == data.y_test).float().mean()
        return float(nn.functional.cross_entropy(out, data.y_test)), float(accuracy)

    return Task(_resnet(cfg, 64, 10), batches, _cross_entropy, evaluate)


_LM_CACHE: dict = {}


def gpt2_task(cfg: RunConfig, gen: torch.Generator) -> Task:
    """Byte-level LM on the stdlib corpus: distinct training blocks (less than one epoch), held-out blocks."""
    if cfg.block_size not in _LM_CACHE:
        from hf_fsf.data import load_text_dataset

        _LM_CACHE[cfg.block_size] = load_text_dataset("stdlib", cfg.block_size, max_bytes=3_000_000)
    splits = _LM_CACHE[cfg.block_size]
    need = cfg.steps * cfg.batch_size
    if need > len(splits.train):
        raise ValueError(
            f"gpt2: {cfg.steps} steps x {cfg.batch_size} blocks exceed one epoch ({len(splits.train)} blocks); "
            "lower --steps or raise the corpus size."
        )
    order = torch.randperm(len(splits.train), generator=gen)[:need].view(cfg.steps, cfg.batch_size)
    batches = (torch.stack([splits.train[int(j)]["input_ids"] for j in row]) for row in order)
    held_out = torch.stack([splits.validation[j]["input_ids"] for j in range(cfg.eval_size)])
    return Task(build_gpt2(cfg), batches, _lm_loss, lambda m: (float(_lm_loss(m, held_out)), math.nan))


TASKS = {"teacher": teacher_task, "gpt2": gpt2_task, "digits": digits_task}


# ----------------------------------------------------------------------------------------------------------------
# Training one configuration
# ----------------------------------------------------------------------------------------------------------------


def _optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    from hf_fsf.control import FSCOptimizer

    if isinstance(optimizer, FSCOptimizer):
        optimizer.step(loss=loss.detach())
    else:
        optimizer.step()


def schedule_factor(schedule: str, step: int, steps: int) -> float:
    """The multiplier of every learning rate (FSC: of `rate`) at `step` (0-based) of `steps`.

    "constant": 1. "linear": linear warm-up over the first 5 % of the steps, then linear decay to 0 at the end,
    so that the final loss measures progress rather than the noise level a constant step size settles at.
    """
    if schedule == "constant":
        return 1.0
    warmup = max(1, round(0.05 * steps))
    if step < warmup:
        return (step + 1) / warmup
    return (steps - step) / max(1, steps - warmup)


def _train_loop(
    model, optimizer, batches: Iterable, loss_fn, schedule: str, steps: int
) -> tuple[float, float, bool]:
    """Train over the batches; returns (first, last train loss, diverged)."""
    first = last = math.nan
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: schedule_factor(schedule, t, steps))
    for i, batch in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        value = loss.item()
        if not math.isfinite(value) or (i > 0 and value > 1e3 * max(first, 1e-8)):
            return first, value, True
        first = value if i == 0 else first
        last = value
        loss.backward()
        _optimizer_step(optimizer, loss)
        scheduler.step()
    return first, last, False


def run_one(cfg: RunConfig) -> RunResult:
    """Train one (task, parametrization, size, lr, seed) and measure its held-out loss."""
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*FSCOptimizer.*")  # skipped steps are counted as divergence
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    task = TASKS[cfg.task](cfg, torch.Generator().manual_seed(1000 + cfg.seed))
    task.model.train()
    optimizer = make_optimizer(cfg, task.model)
    first, last, diverged = _train_loop(
        task.model, optimizer, task.batches, task.loss_fn, cfg.schedule, cfg.steps
    )
    task.model.eval()
    with torch.no_grad():
        loss, accuracy = task.evaluate(task.model)
    if diverged or not math.isfinite(loss):
        loss = math.inf
    if hasattr(optimizer, "close"):
        optimizer.close()
    return RunResult(
        cfg.task, cfg.sweep, cfg.parametrization, cfg.size, cfg.lr, cfg.seed, loss, accuracy, first, last,
        time.perf_counter() - start, cfg.steps, cfg.schedule,
    )  # fmt: skip


def run_all(
    configs: Sequence[RunConfig], workers: int, log: Callable[[str], None] = print
) -> list[RunResult]:
    if workers <= 1:
        return [_logged(run_one(c), log) for c in configs]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return [_logged(r, log) for r in pool.imap(run_one, configs)]


def _logged(r: RunResult, log: Callable[[str], None]) -> RunResult:
    log(
        f"{r.task:7s} {r.sweep:5s} {r.parametrization:9s} size={r.size:<5d} lr={r.lr:.3g} seed={r.seed} "
        f"held-out={r.loss:.4g} train {r.train_loss_first:.3g}->{r.train_loss_last:.3g} ({r.seconds:.1f}s)"
    )
    return r


# ----------------------------------------------------------------------------------------------------------------
# Grid and summary
# ----------------------------------------------------------------------------------------------------------------


def lr_grid(center: float, points: int, factor: float) -> list[float]:
    """`points` learning rates center·factor^k, k centered on 0."""
    half = (points - 1) / 2
    return [center * factor ** (k - half) for k in range(points)]


def build_configs(
    tasks: Sequence[str],
    sweeps: Sequence[str],
    parametrizations: Sequence[str],
    grids: dict[str, Grid],
    seeds: int,
    lr_points: int,
    lr_factor: float,
    steps: int | None = None,
    schedule: str = "linear",
) -> list[RunConfig]:
    configs = []
    for task in tasks:
        grid = grids[task]
        for sweep in sweeps:
            sizes = grid.widths if sweep == "width" else grid.depths
            for param in parametrizations:
                for size in sizes:
                    width, depth = (size, grid.fixed_depth) if sweep == "width" else (grid.fixed_width, size)
                    for lr in lr_grid(grid.centers[param], lr_points, lr_factor):
                        for seed in range(seeds):
                            configs.append(
                                RunConfig(
                                    task, sweep, param, width, depth, lr, seed, steps or grid.steps,
                                    grid.batch_size, base_width=min(grid.widths[0], grid.fixed_width),
                                    base_depth=min(grid.depths[0], grid.fixed_depth),
                                    block_size=grid.block_size, eval_size=grid.eval_size, schedule=schedule,
                                )
                            )  # fmt: skip
    return configs


def mean_losses(results: Iterable[RunResult]) -> dict[tuple, dict[int, dict[float, float]]]:
    """{(task, sweep, parametrization): {size: {lr: held-out loss averaged over seeds}}} (any inf -> inf)."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in results:
        acc[(r.task, r.sweep, r.parametrization, r.size, r.lr)].append(r.loss)
    table: dict[tuple, dict[int, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for (task, sweep, param, size, lr), losses in acc.items():
        table[(task, sweep, param)][size][lr] = sum(losses) / len(losses)
    return table


def summarize(table: dict[tuple, dict[int, dict[float, float]]]) -> list[SummaryRow]:
    """Optimal lr and best loss per size, and per (task, sweep, parametrization) the drift and the regret.

    drift = max/min over sizes of the optimal lr; regret = loss at the largest size with the smallest size's
    optimal lr / best loss at the largest size (inf when that setting diverged there, nan when it was not run).
    """
    rows = []
    for (task, sweep, param), by_size in table.items():
        sizes = sorted(by_size)
        optimum = {s: min(by_size[s], key=lambda lr: (by_size[s][lr], lr)) for s in sizes}
        best = {s: by_size[s][optimum[s]] for s in sizes}
        finite = [optimum[s] for s in sizes if math.isfinite(best[s])]
        drift = max(finite) / min(finite) if finite else math.nan
        small, large = sizes[0], sizes[-1]
        transferred = by_size[large].get(optimum[small], math.nan)
        regret = transferred / best[large] if math.isfinite(best[large]) and best[large] > 0 else math.nan
        for s in sizes:
            rows.append(SummaryRow(task, sweep, param, s, optimum[s], best[s], drift, regret))
    return rows


def seed_regrets(results: Iterable[RunResult]) -> dict[tuple, list[float]]:
    """{(task, sweep, parametrization): the regret computed on each seed's own runs}: its spread says whether
    regrets that differ in the third decimal can be ranked."""
    by_seed: dict[int, list[RunResult]] = defaultdict(list)
    for r in results:
        by_seed[r.seed].append(r)
    spread: dict[tuple, list[float]] = defaultdict(list)
    for runs in by_seed.values():
        rows = summarize(mean_losses(runs))
        largest = {row.key: max(r.size for r in rows if r.key == row.key) for row in rows}
        for row in rows:
            if row.size == largest[row.key]:
                spread[row.key].append(row.regret)
    return spread


def cliff(by_lr: dict[float, float], factor: float = 2.0) -> float:
    """Held-out loss at `factor` × the optimal lr over the best loss (nan when that lr is not on the grid)."""
    optimum = min(by_lr, key=lambda lr: (by_lr[lr], lr))
    above = [lr for lr in by_lr if math.isclose(lr, factor * optimum, rel_tol=1e-6)]
    return by_lr[above[0]] / by_lr[optimum] if above else math.nan


def write_csv(path: Path, rows: Sequence, columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def read_runs(paths: Sequence[str]) -> list[RunResult]:
    """RunResults from earlier transfer_runs.csv files, e.g. to summarize a grid extended by a second run.

    A run (task, sweep, parametrization, size, lr, seed) present in several files is taken from the last one.
    Runs of one task with different steps or schedules are refused: their losses are not comparable.
    """
    runs: dict[tuple, RunResult] = {}
    settings: dict[str, tuple[tuple[int, str], str]] = {}
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                lr = float(f"{float(row['lr']):.12g}")  # one grid point, whichever grid's arithmetic made it
                r = RunResult(
                    row["task"], row["sweep"], row["parametrization"], int(row["size"]), lr,
                    int(row["seed"]), float(row["loss"]), float(row["accuracy"]), float(row["train_loss_first"]),
                    float(row["train_loss_last"]), float(row["seconds"]), int(row.get("steps") or 0),
                    row.get("schedule") or "",
                )  # fmt: skip
                if r.steps:  # older files carry no settings: nothing to check them against
                    seen, where = settings.setdefault(r.task, ((r.steps, r.schedule), str(path)))
                    if seen != (r.steps, r.schedule):
                        raise SystemExit(
                            f"--from-runs: {r.task} runs in {where} have steps/schedule {seen}, those in {path} "
                            f"{(r.steps, r.schedule)}; merge only runs trained the same way."
                        )
                runs[(r.task, r.sweep, r.parametrization, r.size, r.lr, r.seed)] = r
    return list(runs.values())


def plot_sweeps(table: dict, out_dir: Path) -> list[Path]:
    """One figure per (task, sweep): a panel per parametrization, a curve per size (mean held-out loss vs lr)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    paths = []
    for task, sweep in sorted({(t, s) for t, s, _ in table}):
        params = [p for p in PARAMETRIZATIONS if (task, sweep, p) in table]
        fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.4), squeeze=False)
        for ax, param in zip(axes[0], params):
            by_size = table[(task, sweep, param)]
            for size in sorted(by_size):
                lrs = sorted(by_size[size])
                ax.plot(lrs, [by_size[size][lr] for lr in lrs], marker="o", ms=3, label=f"{sweep} {size}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a short decade
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
            ax.set_xlabel("FSC rate" if PARAMETRIZATIONS[param].fsc_balance else "learning rate")
            ax.set_title(param)
        axes[0][0].set_ylabel("held-out loss")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{task}: {sweep} sweep")
        fig.tight_layout()
        path = out_dir / f"transfer_{task}_{sweep}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def markdown_summary(rows: Sequence[SummaryRow], results: Sequence[RunResult], command: str) -> str:
    """The summary as a markdown table: the regret's spread over seeds (each seed's own regret, min-max), the loss
    at 2× the optimal lr over the best (the cliff past the optimum), digits' mean test accuracy at the optimal lr."""
    results = list(results)
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in results:
        acc[(r.task, r.sweep, r.parametrization, r.size, r.lr)].append(r.accuracy)
    table, spread = mean_losses(results), seed_regrets(results)
    lines = [
        f"Command: `{command}`",
        "",
        "| task | sweep | parametrization | size | optimal lr | best loss | loss at 2× lr / best | drift | regret | "
        "regret per seed | test acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        a = acc.get((row.task, row.sweep, row.parametrization, row.size, row.optimal_lr), [math.nan])
        mean_acc = sum(a) / len(a)
        seeds = spread.get(row.key, [])
        per_seed = f"{_fmt(min(seeds))}–{_fmt(max(seeds))}" if len(seeds) > 1 else ""
        lines.append(
            f"| {row.task} | {row.sweep} | {row.parametrization} | {row.size} | {_fmt(row.optimal_lr)} | "
            f"{_fmt(row.best_loss)} | {_fmt(cliff(table[row.key][row.size]))} | {_fmt(row.drift)} | "
            f"{_fmt(row.regret)} | {per_seed} | {'' if math.isnan(mean_acc) else f'{mean_acc:.3f}'} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Settings: configs/transfer.yaml, then the command line
# ----------------------------------------------------------------------------------------------------------------


def load_config(path: str | Path, quick: bool) -> dict:
    """The YAML's settings with the `full` or `quick` section's lr grid and per-task `Grid`s."""
    with open(path) as f:
        config = yaml.safe_load(f)
    section = config["quick" if quick else "full"]
    grids = {}
    for task, entry in section["tasks"].items():
        if task not in TASKS:
            raise SystemExit(f"{path}: unknown task {task!r}; the recipe knows {list(TASKS)}")
        try:
            grid = Grid(**entry)
        except TypeError as error:
            keys = [f.name for f in fields(Grid)]
            raise SystemExit(f"{path}: task {task!r}: {error}; the keys are {keys}") from None
        centers = {name: float(value) for name, value in grid.centers.items()}
        grids[task] = replace(grid, widths=tuple(grid.widths), depths=tuple(grid.depths), centers=centers)
    return {
        "parametrizations": config["parametrizations"],
        "seeds": config["seeds"],
        "schedule": config["schedule"],
        "lr_points": section["lr_points"],
        "lr_factor": float(section["lr_factor"]),
        "grids": grids,
    }


def _csv_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(
            f"--{what}: unknown {bad or text!r}; choose a comma-separated subset of {list(allowed)}"
        )
    return items


def _int_list(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(t) for t in text.split(","))


def _centers(text: str | None) -> dict[str, float]:
    centers = {}
    for item in (text or "").split(","):
        if item.strip():
            name, _, value = item.partition("=")
            if name.strip() not in PARAMETRIZATIONS or not value:
                raise SystemExit(
                    f"--centers: {item!r} is not parametrization=value with one of {tuple(PARAMETRIZATIONS)}"
                )
            centers[name.strip()] = float(value)
    return centers


def _grid(grids: dict[str, Grid], task: str, params: Sequence[str], args: argparse.Namespace) -> Grid:
    """The config's grid of `task` with the command line's sizes and centres in place of its own."""
    if task not in grids:
        raise SystemExit(
            f"{args.config} has no grid for task {task!r} in its {'quick' if args.quick else 'full'} section"
        )
    grid = grids[task]
    grid = replace(
        grid,
        widths=_int_list(args.widths) or grid.widths,
        depths=_int_list(args.depths) or grid.depths,
        fixed_width=args.fixed_width or grid.fixed_width,
        fixed_depth=args.fixed_depth or grid.fixed_depth,
        centers={**grid.centers, **_centers(args.centers)},
    )
    missing = [p for p in params if p not in grid.centers]
    if missing:
        raise SystemExit(
            f"{task}: no learning-rate centre for {missing}; add them to {args.config} or --centers"
        )
    return grid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(CONFIG), help="grids (default: configs/transfer.yaml)")
    p.add_argument(
        "--quick", action="store_true", help="the config's quick grid (sizes x2-4 apart, 3 lrs x4)"
    )
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {tuple(TASKS)}")
    p.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated subset of {SWEEPS}")
    p.add_argument(
        "--parametrizations", default=None, help=f"comma-separated subset of {tuple(PARAMETRIZATIONS)}"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: per task)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration (>= 2 for the summary)")
    p.add_argument("--widths", default=None, help="override the width sweep, e.g. 64,128,256")
    p.add_argument("--depths", default=None, help="override the depth sweep, e.g. 4,8,16")
    p.add_argument("--fixed-width", type=int, default=None, help="width of the depth sweep")
    p.add_argument("--fixed-depth", type=int, default=None, help="depth of the width sweep")
    p.add_argument("--centers", default=None, help="lr grid centers, e.g. standard=3e-3,fsc=0.04")
    p.add_argument("--lr-points", type=int, default=None, help="grid size (default 13 full, 3 quick)")
    p.add_argument("--lr-factor", type=float, default=None, help="grid ratio (default √2 full, 4 quick)")
    p.add_argument(
        "--schedule", choices=SCHEDULES, default=None,
        help="lr schedule of every run: linear (5%% warm-up, decay to 0; default) or constant",
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="processes (each with one torch thread)")
    p.add_argument("--out-dir", default="transfer_out")
    p.add_argument(
        "--from-runs", nargs="+", metavar="CSV", default=None,
        help="train nothing: summarize and plot the runs of earlier transfer_runs.csv files (grids merged)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if (args.seeds is not None and args.seeds < 1) or (args.steps is not None and args.steps < 1):
        raise SystemExit("--seeds and --steps must be positive integers")
    return args


def main(argv: Sequence[str] | None = None) -> list[SummaryRow]:
    args = parse_args(argv)
    config = load_config(args.config, args.quick)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_runs:
        results = read_runs(args.from_runs)
        print(f"{len(results)} runs read from {', '.join(args.from_runs)} -> {out}", flush=True)
    else:
        tasks = _csv_list(args.tasks, TASKS, "tasks")
        sweeps = _csv_list(args.sweeps, SWEEPS, "sweeps")
        params = _csv_list(args.parametrizations or ",".join(config["parametrizations"]), PARAMETRIZATIONS,
                           "parametrizations")  # fmt: skip
        grids = {task: _grid(config["grids"], task, params, args) for task in tasks}
        configs = build_configs(
            tasks, sweeps, params, grids, args.seeds or config["seeds"], args.lr_points or config["lr_points"],
            args.lr_factor or config["lr_factor"], args.steps, args.schedule or config["schedule"],
        )  # fmt: skip
        print(f"{len(configs)} runs, {args.workers} worker(s) -> {out}", flush=True)
        results = run_all(configs, args.workers, log=lambda s: print(s, flush=True))
    write_csv(out / "transfer_runs.csv", results, [f.name for f in fields(RunResult)])
    table = mean_losses(results)
    rows = summarize(table)
    write_csv(out / "transfer_summary.csv", rows, SUMMARY_COLUMNS)
    command = "python recipes/transfer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "transfer_summary.md").write_text(markdown_summary(rows, results, command))
    plot_sweeps(table, out)
    for row in rows:
        lrs = table[(row.task, row.sweep, row.parametrization)][row.size]
        if row.optimal_lr in (min(lrs), max(lrs)) and math.isfinite(row.best_loss):
            print(
                f"warning: {row.task}/{row.sweep}/{row.parametrization} size {row.size}: optimum at the grid edge"
            )
    print((out / "transfer_summary.md").read_text())
    return rows


if __name__ == "__main__":
    main()
