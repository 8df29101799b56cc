"""fsf_stats.jsonl -> figures and markdown tables.

Input: one or more runs, each a JSONL file with one record per measured optimizer step (written by
the Trainer callback; see ``StepStats.to_record``)::

    {"step": 10, "loss": 2.3, "valid": true, "angle": true,
     "stem_contribution": 0.01, "head_contribution": 0.02,
     "blocks": [{"name": "transformer.h.0", "cos_theta": 0.4, "relative_speed": 0.01, ...}, ...],
     "scales": {"transformer.h.0": 0.25}}          # optional

Any field may be null (cos θ and the other angle fields are null on cheap steps). Steps with
``"valid": false`` and lines that are not JSON (a run killed mid-write) are skipped with a note.

Output (``write_report``): ``report.md`` plus PNG figures in one directory. Per run: block × step
heatmaps of cos θ, relative speed and contribution share, curves over steps, a depth profile, and
a per-block summary table of run averages. With several runs: all loss curves on one plot and
per-block comparison tables. Plots use matplotlib's object API (no pyplot, no global backend).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hf_fsf.stats import BLOCK_FIELDS, HEAD, STEM, StepStats  # torch-free: `hf-fsf report --help` stays fast
from hf_fsf.stats import STATS_FILE as STATS_FILENAME

# Quantities averaged in the summary tables: (key, column title).
SUMMARY_COLUMNS = (
    ("cos_theta", "mean cos θ"),
    ("relative_speed", "mean relative speed"),
    ("sensitivity", "mean sensitivity"),
    ("share", "mean contribution share"),
)

_MISSING = "–"
_MAX_CURVES = 12  # most blocks drawn as separate lines in one panel


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """One run's valid steps as arrays. Matrices are (blocks, steps); NaN marks a missing value."""

    name: str
    path: Path
    steps: np.ndarray  # (T,) int
    loss: np.ndarray  # (T,)
    angle: np.ndarray  # (T,) bool: the step was measured with the re-forward
    block_names: list[str]
    values: dict[str, np.ndarray]  # BLOCK_FIELDS -> (B, T)
    stem_contribution: np.ndarray  # (T,)
    head_contribution: np.ndarray  # (T,)
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # block -> (T,)
    notes: list[str] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return len(self.steps)


def _float(value) -> float:
    """JSON value -> float; null, strings and other junk become NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def find_stats_files(path: str | Path) -> list[Path]:
    """The stats files a user means by ``path``: the file itself, or ``fsf_stats.jsonl`` in a run directory.

    A directory without its own ``fsf_stats.jsonl`` is searched recursively (sorted results).
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        if (path / STATS_FILENAME).is_file():
            return [path / STATS_FILENAME]
        found = sorted(path.rglob(STATS_FILENAME))
        if found:
            return found
        raise FileNotFoundError(
            f"no {STATS_FILENAME} in {path} or below; pass the run's output directory or the file."
        )
    raise FileNotFoundError(f"{path} does not exist; pass a run directory or an {STATS_FILENAME} file.")


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Read one run. ``path`` is a JSONL file, or a directory holding exactly one ``fsf_stats.jsonl``."""
    files = find_stats_files(path)
    if len(files) > 1:
        listing = ", ".join(str(f) for f in files[:5])
        raise ValueError(f"{path} holds {len(files)} stats files ({listing}, ...); pass one of them.")
    file = files[0]
    notes: list[str] = []
    records: dict[int, tuple[StepStats, dict]] = {}  # step -> (stats, scales); a resumed run keeps the last
    invalid = bad_lines = repeated = 0
    with file.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                stats = StepStats.from_record(record)
            except (json.JSONDecodeError, ValueError):
                bad_lines += 1
                continue
            if not stats.valid:
                invalid += 1
                continue
            step = stats.step if stats.step is not None else line_no
            repeated += step in records
            scales = record.get("scales")
            records[step] = (stats, scales if isinstance(scales, dict) else {})
    if bad_lines:
        notes.append(f"{bad_lines} line(s) that are not a JSON stats record were skipped.")
    if invalid:
        notes.append(f"{invalid} step(s) marked invalid (measurement skipped during training) were left out.")
    if repeated:
        notes.append(
            f"{repeated} repeated step number(s) (a resumed run?): the last record of each was kept."
        )
    ordered = [records[s] for s in sorted(records)]
    return _run_data(name or default_run_name(file), file, sorted(records), ordered, notes)


def _run_data(
    name: str, file: Path, steps: list[int], ordered: list[tuple[StepStats, dict]], notes: list[str]
) -> RunData:
    """The arrays of one run from its valid steps in order."""
    block_names = list(dict.fromkeys(b.name for stats, _ in ordered for b in stats.blocks))
    index = {n: i for i, n in enumerate(block_names)}
    values = {f: np.full((len(block_names), len(ordered)), np.nan) for f in BLOCK_FIELDS}
    scales: dict[str, np.ndarray] = {}
    for t, (stats, step_scales) in enumerate(ordered):
        for block in stats.blocks:
            for f in BLOCK_FIELDS:
                values[f][index[block.name], t] = _float(getattr(block, f))
        for block_name, scale in step_scales.items():
            scales.setdefault(str(block_name), np.full(len(ordered), np.nan))[t] = _float(scale)
    return RunData(
        name=name,
        path=file,
        steps=np.array(steps, dtype=np.int64),
        loss=np.array([_float(stats.loss) for stats, _ in ordered]),
        angle=np.array([stats.angle for stats, _ in ordered], dtype=bool),
        block_names=block_names,
        values=values,
        stem_contribution=np.array([stats.stem_contribution for stats, _ in ordered]),
        head_contribution=np.array([stats.head_contribution for stats, _ in ordered]),
        scales=scales,
        notes=notes,
    )


def default_run_name(file: Path) -> str:
    """A run's name from its file: the directory of an ``fsf_stats.jsonl``, else the file's stem."""
    if file.name == STATS_FILENAME:
        return file.parent.name or "run"
    return file.stem


# --------------------------------------------------------------------------------------------
# Derived numbers
# --------------------------------------------------------------------------------------------


def contribution_shares(run: RunData) -> np.ndarray:
    """Each part's share of the step's first-order loss decrease, shape (B + 2, T).

    Rows: stem, the blocks in order, head; column t is C / (C_stem + Σ C_blocks + C_head) at step t.
    A missing (null or NaN) contribution is left out of the total and has a NaN share, so the
    finite shares of a step sum to 1. A step whose total is not positive (the step raised the loss
    to first order) has no meaningful share: its column is NaN.
    """
    parts = np.vstack([run.stem_contribution, run.values["contribution"], run.head_contribution])
    finite = np.isfinite(parts)
    total = np.where(finite, parts, 0.0).sum(axis=0)
    ok = (total > 0) & np.isfinite(total)
    if run.block_names:  # a step where no block reported its contribution has no meaningful split
        ok &= finite[1:-1].any(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = parts / np.where(ok, total, np.nan)
    return shares


@dataclass
class SummaryRow:
    """Run averages for one row of the summary table: means over the steps with a finite value."""

    name: str
    means: dict[str, float]  # SUMMARY_COLUMNS key -> mean
    counts: dict[str, int]  # SUMMARY_COLUMNS key -> number of steps averaged
    last_scale: float = math.nan


def _mean_count(values: np.ndarray) -> tuple[float, int]:
    finite = values[np.isfinite(values)]
    return (float(finite.mean()) if finite.size else math.nan), int(finite.size)


def summarize_run(run: RunData) -> list[SummaryRow]:
    """Rows for stem, each block and head (stem and head carry only the contribution share)."""
    shares = contribution_shares(run)
    rows = []
    for r, label in enumerate([STEM, *run.block_names, HEAD]):
        means: dict[str, float] = {}
        counts: dict[str, int] = {}
        for key, _ in SUMMARY_COLUMNS:
            if key == "share":
                series = shares[r]
            elif label in (STEM, HEAD):
                series = np.full(run.num_steps, np.nan)
            else:
                series = run.values[key][r - 1]
            means[key], counts[key] = _mean_count(series)
        last_scale = math.nan
        if label in run.scales:
            finite = run.scales[label][np.isfinite(run.scales[label])]
            last_scale = float(finite[-1]) if finite.size else math.nan
        rows.append(SummaryRow(label, means, counts, last_scale))
    return rows


def shorten_names(names: Sequence[str], max_len: int = 28) -> list[str]:
    """Drop the dotted prefix that all names share ("transformer.h.3" -> "h.3"), keeping unique labels.

    The last shared component is kept when the remainder would start with a bare index ("h.3",
    not "3"); long labels are cut in the middle.
    """
    if not names:
        return []
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    if len(names) == 1:
        common = max(0, len(parts[0]) - 2)
    elif common and any(p[common].isdigit() for p in parts):
        common -= 1
    labels = [".".join(p[common:]) or n for p, n in zip(parts, names)]
    labels = [
        lab if len(lab) <= max_len else lab[: max_len // 2 - 1] + "…" + lab[-(max_len // 2) :]
        for lab in labels
    ]
    return labels if len(set(labels)) == len(labels) else list(names)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _spans_decades(values: np.ndarray, decades: float = 1.0) -> bool:
    finite = values[np.isfinite(values)]
    return bool(finite.size and (finite > 0).all() and finite.max() / finite.min() >= 10**decades)


def _color_scale(values: np.ndarray):
    """(norm, colormap) for a heatmap: log when positive values span decades, diverging around 0
    when there are values of both signs of comparable size, linear over the data range otherwise."""
    from matplotlib.colors import LogNorm, Normalize

    finite = values[np.isfinite(values)]
    lo, hi = float(finite.min()), float(finite.max())
    if _spans_decades(finite):
        return LogNorm(lo, hi), "viridis"
    if lo < 0 < hi and -lo >= 0.2 * hi:  # both signs matter: white at 0
        bound = max(-lo, hi)
        return Normalize(-bound, bound), "RdBu_r"
    if lo == hi:
        pad = abs(lo) * 0.05 or 0.05
        lo, hi = lo - pad, hi + pad
    return Normalize(lo, hi), "viridis"


def _label_log_axis(axis, values: np.ndarray) -> None:
    """Plain-number ticks on a log axis; 1-2-5 ticks when it spans less than two decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    finite = values[np.isfinite(values) & (values > 0)]
    if finite.size and finite.max() / finite.min() < 100:
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_formatter(NullFormatter())


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    """Column edges halfway between measured steps, so irregular step spacing is drawn to scale."""
    steps = steps.astype(float)
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mids = (steps[:-1] + steps[1:]) / 2
    return np.concatenate([[steps[0] - (mids[0] - steps[0])], mids, [steps[-1] + (steps[-1] - mids[-1])]])


def _set_row_labels(ax, labels: Sequence[str], max_labels: int = 40) -> None:
    every = max(1, math.ceil(len(labels) / max_labels))
    ticks = list(range(0, len(labels), every))
    ax.set_yticks(ticks)
    ax.set_yticklabels([labels[i] for i in ticks], fontsize=8 if len(labels) <= 24 else 7)


def plot_heatmap(
    matrix: np.ndarray,
    steps: np.ndarray,
    row_labels: Sequence[str],
    title: str,
    colorbar_label: str,
    path: Path,
) -> bool:
    """Draw a rows × steps heatmap (steps without any finite value dropped). False if nothing to draw."""
    from matplotlib.colors import LogNorm

    keep = np.isfinite(matrix).any(axis=0)
    if not keep.any():
        return False
    matrix, steps = matrix[:, keep], steps[keep]
    norm, cmap = _color_scale(matrix)
    shown = np.where(matrix > 0, matrix, np.nan) if isinstance(norm, LogNorm) else matrix
    fig = _new_figure(9.0, min(10.0, max(2.8, 0.24 * len(row_labels) + 1.6)))
    ax = fig.add_subplot()
    import matplotlib

    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#d9d9d9")  # missing: grey, off the scale
    y_edges = np.arange(len(row_labels) + 1) - 0.5
    mesh = ax.pcolormesh(_cell_edges(steps), y_edges, np.ma.masked_invalid(shown), norm=norm, cmap=colormap)
    ax.set_ylim(len(row_labels) - 0.5, -0.5)  # first block on top, like a network drawn input-first
    _set_row_labels(ax, row_labels)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("block")
    ax.set_title(title, fontsize=11)
    colorbar = fig.colorbar(
        mesh, ax=ax, label=colorbar_label + (" (log scale)" if isinstance(norm, LogNorm) else "")
    )
    if isinstance(norm, LogNorm):
        _label_log_axis(colorbar.ax.yaxis, matrix)
    if len(steps) <= 20:  # few columns: one tick under each
        ax.set_xticks(steps)
    else:
        _integer_steps(ax)
    fig.savefig(path)
    return True


def _depth_colormap():
    """viridis without its palest yellow, which is hard to see on white."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    return ListedColormap(matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, 256)))


def _plot_per_block(ax, fig, run: RunData, key: str, ylabel: str, labels: Sequence[str]) -> None:
    """One line per block over the steps where it has values; legend for few blocks, colorbar for many."""
    matrix = run.values[key]
    cols = np.isfinite(matrix).any(axis=0)
    if not cols.any():
        ax.text(
            0.5,
            0.5,
            f"no {ylabel} in this run\n(needs steps measured with the angle)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="grey",
        )
        ax.set_ylabel(ylabel)
        return
    cmap = _depth_colormap()
    # Past a dozen blocks the lines merge into a band: draw evenly spaced blocks, first and last included.
    shown = np.unique(np.linspace(0, len(labels) - 1, min(len(labels), _MAX_CURVES)).round().astype(int))
    marker = "o" if cols.sum() <= 30 else None
    for r in shown:
        ax.plot(
            run.steps[cols],
            matrix[r, cols],
            color=cmap(r / max(1, len(labels) - 1)),
            marker=marker,
            markersize=3,
            lw=1.2,
            label=labels[r],
        )
    if _spans_decades(matrix):
        ax.set_yscale("log")
        _label_log_axis(ax.yaxis, matrix)
    if len(shown) < len(labels):
        ax.set_title(f"{len(shown)} of {len(labels)} blocks, evenly spaced in depth", fontsize=8, loc="right")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(labels) <= 10:
        ax.legend(fontsize=7, ncol=2 if len(labels) > 5 else 1, loc="best")
    else:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        mappable = ScalarMappable(Normalize(0, len(labels) - 1), _depth_colormap())
        fig.colorbar(mappable, ax=ax, label="block index (depth)", pad=0.01)


def plot_curves(run: RunData, labels: Sequence[str], path: Path) -> None:
    """Loss, cos θ per block and relative speed per block over the steps (three stacked panels)."""
    fig = _new_figure(9.0, 9.0)
    axes = fig.subplots(3, 1, sharex=True)
    finite = np.isfinite(run.loss)
    if finite.any():
        axes[0].plot(
            run.steps[finite],
            run.loss[finite],
            color="black",
            lw=1.2,
            marker="o" if finite.sum() <= 30 else None,
            markersize=3,
        )
        if _spans_decades(run.loss):
            axes[0].set_yscale("log")
            _label_log_axis(axes[0].yaxis, run.loss)
    axes[0].set_ylabel("training loss")
    axes[0].grid(alpha=0.3)
    axes[0].set_title(f"{run.name}: loss and per-block feature learning", fontsize=11)
    _plot_per_block(axes[1], fig, run, "cos_theta", "cos θ (backward-feature angle)", labels)
    _plot_per_block(axes[2], fig, run, "relative_speed", "relative speed ‖δf‖/‖f‖", labels)
    axes[2].set_xlabel("optimizer step")
    _integer_steps(axes[2])
    fig.savefig(path)


def plot_profiles(profiles: Sequence[tuple[str, Sequence[SummaryRow]]], path: Path, title: str) -> None:
    """Run averages against depth (cos θ, relative speed, contribution share), one line per run."""
    fig = _new_figure(12.0, 3.9)
    axes = fig.subplots(1, 3)
    panels = [SUMMARY_COLUMNS[0], SUMMARY_COLUMNS[1], SUMMARY_COLUMNS[3]]
    longest: list[str] = []
    for run_name, rows in profiles:
        blocks = [r for r in rows if r.name not in (STEM, HEAD)]
        longest = max(longest, [r.name for r in blocks], key=len)
        for ax, (key, _) in zip(axes, panels):
            y = np.array([r.means[key] for r in blocks])
            ax.plot(np.arange(len(blocks)), y, marker="o", markersize=3, lw=1.2, label=run_name)
    labels = shorten_names(longest)
    for ax, (_, panel_title) in zip(axes, panels):
        values = np.concatenate([line.get_ydata() for line in ax.get_lines()] or [np.array([np.nan])])
        if not np.isfinite(values).any():
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif _spans_decades(values):
            ax.set_yscale("log")
            _label_log_axis(ax.yaxis, values)
        elif np.nanmin(values) >= 0:
            ax.set_ylim(bottom=0)  # shares and speeds from 0, so small differences do not look large
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
        if 0 < len(labels) <= 16:
            ax.set_xticks(np.arange(len(labels)))
            ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    if len(profiles) > 1:
        axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path)


def plot_loss_comparison(runs: Sequence[RunData], path: Path) -> None:
    """The loss curves of all runs on one plot."""
    fig = _new_figure(9.0, 4.5)
    ax = fig.add_subplot()
    spans = False
    for run in runs:
        finite = np.isfinite(run.loss)
        if finite.any():
            ax.plot(
                run.steps[finite],
                run.loss[finite],
                lw=1.3,
                label=run.name,
                marker="o" if finite.sum() <= 30 else None,
                markersize=3,
            )
            spans |= _spans_decades(run.loss)
    if spans:
        ax.set_yscale("log")
        _label_log_axis(ax.yaxis, np.concatenate([run.loss for run in runs]))
    ax.set_xlabel("optimizer step")
    _integer_steps(ax)
    ax.set_ylabel("training loss")
    ax.set_title("training loss of all runs", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return _MISSING if not math.isfinite(value) else f"{value:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def summary_table(rows: Sequence[SummaryRow], with_scales: bool = False) -> list[str]:
    """Markdown lines of a run's per-block table: each mean followed by the number of steps it averaged."""
    header = ["block"]
    for _, title in SUMMARY_COLUMNS:
        header += [title, "n"]
    if with_scales:
        header.append("last scale")
    body = []
    for row in rows:
        cells = [f"`{row.name}`"]
        for key, _ in SUMMARY_COLUMNS:
            cells += [_fmt(row.means[key]), str(row.counts[key])]
        if with_scales:
            cells.append(_fmt(row.last_scale))
        body.append(cells)
    return _table(header, body)


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


def _run_section(run: RunData, slug: str, out_dir: Path) -> tuple[list[str], list[SummaryRow]]:
    lines = [f"## Run `{run.name}`", "", f"Source: `{run.path}`", ""]
    if run.num_steps == 0:
        lines += ["No valid measured steps: nothing to plot.", ""]
        lines += [f"- {note}" for note in run.notes] + ([""] if run.notes else [])
        return lines, []
    angle_steps = int(run.angle.sum())
    lines.append(
        f"{run.num_steps} valid measured step(s), from step {run.steps[0]} to {run.steps[-1]}, "
        f"{angle_steps} of them with the angle (re-forward)."
    )
    notes = list(run.notes)
    if not run.block_names:
        notes.append("The records name no blocks: only the stem and head contributions are shown.")
    if angle_steps == 0:
        notes.append(
            "No step was measured with the angle: cos θ, relative speed and sensitivity are missing."
        )
    shares = contribution_shares(run)
    no_share = int((~np.isfinite(shares).any(axis=0)).sum())
    if no_share:
        notes.append(
            f"{no_share} step(s) with a non-positive total first-order loss decrease have no contribution share."
        )
    lines += [""] + [f"- {note}" for note in notes] + ([""] if notes else [])

    labels = shorten_names(run.block_names)
    figures = []
    heatmaps = [
        ("cos_theta", run.values["cos_theta"], labels, "cos θ (alignment of δf with −b)", "cos θ"),
        ("relative_speed", run.values["relative_speed"], labels, "relative speed ‖δf‖/‖f‖", "relative speed"),
        (
            "share",
            shares,
            [STEM, *labels, HEAD],
            "contribution share C / ΣC (stem, blocks, head)",
            "share of ΔL",
        ),
    ]
    for key, matrix, row_labels, title, cbar in heatmaps:
        if len(row_labels) == 0:
            continue
        file = f"{slug}_heatmap_{key}.png"
        if plot_heatmap(matrix, run.steps, row_labels, f"{run.name}: {title}", cbar, out_dir / file):
            figures.append((title, file))
    if run.block_names:
        plot_curves(run, labels, out_dir / f"{slug}_curves.png")
        figures.append(("loss, cos θ and relative speed over steps", f"{slug}_curves.png"))
    rows = summarize_run(run)
    if run.block_names:
        plot_profiles(
            [(run.name, rows)], out_dir / f"{slug}_profile.png", f"{run.name}: run averages per block"
        )
        figures.append(("run averages per block", f"{slug}_profile.png"))
    for title, file in figures:
        lines += [f"![{run.name}: {title}]({file})", ""]
    lines += [
        "Per-block averages over the run: each mean is over the steps where the quantity is finite "
        "(cos θ, relative speed and sensitivity exist on angle steps only); `n` is that number of steps. "
        "The contribution share is C_ℓ / (C_stem + Σ C_blocks + C_head) per step, then averaged.",
        "",
    ]
    lines += summary_table(rows, with_scales=bool(run.scales)) + [""]
    return lines, rows


def _comparison_section(runs: Sequence[RunData], summaries: Sequence[list[SummaryRow]]) -> list[str]:
    lines = ["## Comparison", "", "![training loss of all runs](loss_comparison.png)", ""]
    if any(rows for rows in summaries):
        lines += ["![run averages per block, all runs](profile_comparison.png)", ""]
    header = ["run", "valid steps", "angle steps", "final loss", "min loss"]
    body = []
    for run in runs:
        finite = run.loss[np.isfinite(run.loss)]
        body.append(
            [
                f"`{run.name}`",
                str(run.num_steps),
                str(int(run.angle.sum())),
                _fmt(float(finite[-1])) if finite.size else _MISSING,
                _fmt(float(finite.min())) if finite.size else _MISSING,
            ]
        )
    lines += _table(header, body) + [""]
    names: list[str] = []
    for rows in summaries:
        names += [r.name for r in rows if r.name not in names]
    by_run = [{r.name: r for r in rows} for rows in summaries]
    for key, title in SUMMARY_COLUMNS:
        lines += [f"### {title} per block", ""]
        table_rows = []
        for name in names:
            if key != "share" and name in (STEM, HEAD):
                continue
            cells = [f"`{name}`"]
            for lookup in by_run:
                cells.append(_fmt(lookup[name].means[key]) if name in lookup else _MISSING)
            table_rows.append(cells)
        lines += _table(["block", *[f"`{run.name}`" for run in runs]], table_rows) + [""]
    return lines


def write_report(runs: Mapping[str, str | Path], out_dir: str | Path) -> Path:
    """Write figures and ``report.md`` for the named runs into ``out_dir``; return the markdown path.

    ``runs`` maps a run name to its ``fsf_stats.jsonl`` file (or a directory holding exactly one).
    """
    if not runs:
        raise ValueError("write_report needs at least one run: {name: path to fsf_stats.jsonl}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = [load_run(path, name=str(name)) for name, path in runs.items()]
    taken: set[str] = set()
    lines = ["# Feature speed report", ""]
    lines += [
        "Quantities of the feature speed formula (Chizat & Netrapalli, 2024) per block: cos θ is the angle "
        "between the feature update δf and −b (the backward pass), relative speed is ‖δf‖/‖f‖, sensitivity is "
        "(‖δf‖/√m)/ΔL, and the contribution share is each part's share of the step's first-order loss decrease.",
        "",
    ]
    sections, summaries = [], []
    for run in loaded:
        section, rows = _run_section(run, _slug(run.name, taken), out)
        sections += section
        summaries.append(rows)
    if len(loaded) > 1:
        plot_loss_comparison(loaded, out / "loss_comparison.png")
        if any(rows for rows in summaries):
            profiles = [(run.name, rows) for run, rows in zip(loaded, summaries) if rows]
            plot_profiles(profiles, out / "profile_comparison.png", "run averages per block, all runs")
        lines += _comparison_section(loaded, summaries)
    lines += sections
    report = out / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return report


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _runs_from_arguments(items: Sequence[str]) -> dict[str, Path]:
    """``[NAME=]PATH`` arguments -> {unique name: stats file}; a directory with several runs gives several."""
    runs: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or Path(item).exists():
            name, path = "", item
        files = find_stats_files(path)
        for file in files:
            base = (
                name
                if name and len(files) == 1
                else (f"{name}/{default_run_name(file)}" if name else default_run_name(file))
            )
            unique, i = base, 2
            while unique in runs:
                unique, i = f"{base}-{i}", i + 1
            runs[unique] = file
    return runs


def cli_main(argv: list[str]) -> int:
    """`hf-fsf report RUN_DIR_OR_JSONL... --out DIR`."""
    parser = argparse.ArgumentParser(
        prog="hf-fsf report", description="Turn fsf_stats.jsonl files into figures and a markdown report."
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="[NAME=]RUN_DIR_OR_JSONL",
        help=f"a run directory (holding {STATS_FILENAME}, searched recursively) or a JSONL file; "
        "prefix NAME= to name the run",
    )
    parser.add_argument("--out", default="fsf_report", help="output directory (default: fsf_report)")
    args = parser.parse_args(argv)
    try:
        runs = _runs_from_arguments(args.runs)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    report = write_report(runs, args.out)
    print(f"wrote {report} ({len(runs)} run(s))")
    return 0
