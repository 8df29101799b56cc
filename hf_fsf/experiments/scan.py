"""`hf-fsf scan`: a coord check on your own architecture, with the quantities of the feature speed formula.

mup's coord check plots activation sizes over widths. This one takes an HF config (a bundled family shape such
as "gpt2" or "llama", or your local config.json), builds it at every width × depth of a grid (no download),
trains each variant a few steps with the probe on (angles on some steps), and reports per block the relative
feature speed ‖δf‖/‖f‖, cos θ, the contribution share C_ℓ / ΔL and the sensitivity S_ℓ (PAPER.md §3), their
fitted exponents q ∝ m^s_m · L^s_L, and which desiderata SP / FL / LD / BC of PAPER.md §6 hold (the quantities,
thresholds and verdict rule of `hf_fsf.experiments.desiderata`).

How a variant is built from the config: width m sets the hidden size with the head size of the config kept
(heads = m / head size, the ratio of query to key/value heads kept, the MLP's size scaled with m); depth L sets
the number of blocks. β (optional) is the residual branch scale of `hf_fsf.residual.apply_branch_scaling`.

Data: token sequences of a random sparse Markov chain drawn from a seeded generator (each token has 4 possible
successors), the same for every variant of a seed: learnable, any vocabulary, no download.

Exponents: per quantity, log q is averaged over seeds, then over the other axis, and fitted by least squares
against log m (resp. log L) with `numpy.polyfit`; on a full grid this is the joint fit of desiderata.py. The
per-block quantities are read at three positions of the chain — the first block, the middle one (index L // 2)
and the last — so that depths can be compared. A value is the mean over the steps measured with the angle.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Per-block quantities reported (BlockStats fields, and the share contribution / total_loss_decrease).
BLOCK_QUANTITIES = {
    "relative_speed": "relative speed ‖δf‖/‖f‖",
    "cos_theta": "cos θ",
    "share": "contribution share",
    "sensitivity": "sensitivity S",
}
POSITIONS = ("first", "middle", "last")
HEAD_SIZE = 32  # of every bundled shape: widths are multiples of 32
SUCCESSORS = 4  # of each token in the Markov chain of the data

# Family shapes built from transformers' own config classes, tiny (width 64, 2 blocks, 256 tokens); the width
# and depth of the scan replace hidden size and block count. GPT-2 comes from models.small_gpt2.
FAMILIES: dict[str, dict] = {
    "gpt2": {},
    "llama": dict(intermediate_size=176, num_key_value_heads=2),
    "mistral": dict(intermediate_size=224, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(intermediate_size=176, num_key_value_heads=2),
    "gemma": dict(intermediate_size=256, num_key_value_heads=2),
    "gpt_neox": dict(intermediate_size=256),
    "phi": dict(intermediate_size=256, num_key_value_heads=2),
}


@dataclass
class ScanPoint:
    """One trained variant (width, depth, seed): per-block quantities and the desiderata quantities, each the mean
    over the steps measured with the angle."""

    width: int
    depth: int
    seed: int
    blocks: list[dict[str, float]]  # per block: BLOCK_QUANTITIES
    desiderata: dict[str, float]  # desiderata.QUANTITIES
    loss_first: float
    loss_last: float


@dataclass
class ScanResult:
    config: str
    beta: str
    widths: list[int]
    depths: list[int]
    settings: dict
    points: list[ScanPoint] = field(default_factory=list)
    # (quantity, position) -> (s_m, s_L); an exponent is None when its axis was not scanned or q ≤ 0 somewhere
    block_exponents: dict[tuple[str, str], tuple[float | None, float | None]] = field(default_factory=dict)
    desiderata_exponents: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    verdicts: dict[str, bool | None] = field(default_factory=dict)  # property -> holds (None: not decidable)
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def mean(self, width: int, depth: int, quantity: str, position: str | int) -> float:
        """Mean over seeds of a per-block quantity (position: 'first' / 'middle' / 'last' or a block index)."""
        values = [p.blocks[_index(position, depth)][quantity] for p in self._points(width, depth)]
        return sum(values) / len(values)

    def _points(self, width: int, depth: int) -> list[ScanPoint]:
        return [p for p in self.points if p.width == width and p.depth == depth]


def _index(position: str | int, depth: int) -> int:
    if isinstance(position, int):
        return position
    return {"first": 0, "middle": depth // 2, "last": depth - 1}[position]


# ---------------------------------------------------------------------------------------------------------------
# Configs


def base_config(spec: str | Path):
    """The config to scan: a bundled family name (FAMILIES) or a local config.json (file or its folder)."""
    from transformers import AutoConfig

    if str(spec) in FAMILIES:
        if spec == "gpt2":
            from hf_fsf.models import small_gpt2

            return small_gpt2(layers=2, width=64, block_size=256).config
        return AutoConfig.for_model(
            str(spec),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=64 // HEAD_SIZE,
            head_dim=HEAD_SIZE,
            vocab_size=256,
            max_position_embeddings=256,
            **FAMILIES[str(spec)],
        )
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"scan: {spec!r} is neither a bundled family shape ({', '.join(FAMILIES)}) nor a config.json file or "
            "a folder holding one."
        )
    record = json.loads(path.read_text())
    if "model_type" not in record:
        raise ValueError(f"scan: {path} has no 'model_type': is it a transformers config.json?")
    return AutoConfig.for_model(record.pop("model_type"), **record)


def variant_config(base, width: int, depth: int):
    """`base` at hidden size `width` and `depth` blocks, head size and head-count ratio kept, MLP size scaled."""
    head_size = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
    if width % head_size:
        raise ValueError(f"scan: width {width} is not a multiple of the config's head size {head_size}.")
    heads = width // head_size
    record = copy.deepcopy(base.to_diff_dict())  # values the class would set itself are left to it
    updates = {"num_hidden_layers": depth, "num_attention_heads": heads, "hidden_size": width}
    kv = getattr(base, "num_key_value_heads", None)
    if kv:
        group = base.num_attention_heads // kv
        if heads % group:
            raise ValueError(
                f"scan: width {width} gives {heads} heads, not a multiple of the config's {group} query heads "
                "per key/value head."
            )
        updates["num_key_value_heads"] = heads // group
    if getattr(base, "head_dim", None):
        updates["head_dim"] = head_size
    for name in ("intermediate_size", "n_inner"):
        if getattr(base, name, None):
            updates[name] = round(getattr(base, name) * width / base.hidden_size)
    pattern = getattr(base, "layer_types", None)
    if pattern:  # per-layer pattern (sliding / full attention): repeated to the new depth
        updates["layer_types"] = [pattern[i % len(pattern)] for i in range(depth)]
    for name, value in updates.items():
        record[base.attribute_map.get(name, name)] = value
    record.pop("model_type", None)
    return type(base)(**record)


# ---------------------------------------------------------------------------------------------------------------
# Measuring one variant


def markov_batches(vocab_size: int, batch_size: int, seq_len: int, seed: int):
    """An endless stream of [batch, seq] token ids from a random sparse Markov chain (seeded)."""
    import torch

    gen = torch.Generator().manual_seed(20_000 + seed)
    successors = torch.randint(0, vocab_size, (vocab_size, SUCCESSORS), generator=gen)
    while True:
        tokens = [torch.randint(0, vocab_size, (batch_size,), generator=gen)]
        for _ in range(seq_len - 1):
            choice = torch.randint(0, SUCCESSORS, (batch_size,), generator=gen)
            tokens.append(successors[tokens[-1], choice])
        yield torch.stack(tokens, dim=1)


def _step_values(stats) -> tuple[list[dict[str, float]], dict[str, float]]:
    from hf_fsf.experiments.desiderata import quantities  # SP, FL, LD, BC of one step

    total = stats.total_loss_decrease
    blocks = [
        {
            "relative_speed": b.relative_speed,
            "cos_theta": b.cos_theta,
            "share": b.contribution / total,
            "sensitivity": b.sensitivity,
        }
        for b in stats.blocks
    ]
    return blocks, quantities(stats)


def measure_variant(base, width: int, depth: int, seed: int, settings: dict) -> ScanPoint:
    """Trains one variant `settings['steps']` steps and averages its quantities over the angle steps."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_fsf.experiments.desiderata import QUANTITIES
    from hf_fsf.probe import FeatureSpeedProbe
    from hf_fsf.residual import apply_branch_scaling

    config = variant_config(base, width, depth)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(settings["device"]).train()
    if settings["beta"] != "1":
        apply_branch_scaling(model, beta=_beta_value(settings["beta"]))
    if settings["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"])
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.0)
    batches = markov_batches(config.vocab_size, settings["batch_size"], settings["seq_len"], seed)
    measured, losses = [], []
    with FeatureSpeedProbe(model) as probe:
        for step in range(settings["steps"]):
            ids = next(batches).to(settings["device"])
            angle = step % settings["angle_every"] == 0 or step == settings["steps"] - 1
            stats = probe.measure_step(
                lambda ids=ids: model(input_ids=ids, labels=ids).loss, optimizer, angle
            )
            losses.append(stats.loss)
            if angle and stats.valid:
                measured.append(_step_values(stats))
            elif angle:
                warnings.warn(
                    f"scan: step {step} of width {width}, depth {depth}, seed {seed} was not measurable (see the "
                    "probe's warning); it is left out of the means.",
                    stacklevel=2,
                )
    if not measured:
        raise RuntimeError(f"scan: no valid angle step for width {width}, depth {depth}, seed {seed}.")
    blocks = [{q: _mean([m[0][i][q] for m in measured]) for q in BLOCK_QUANTITIES} for i in range(depth)]
    desiderata = {q: _mean([m[1][q] for m in measured]) for q in QUANTITIES}
    return ScanPoint(width, depth, seed, blocks, desiderata, losses[0], losses[-1])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _beta_value(beta: str) -> str | float:
    return beta if beta in ("1/sqrt(L)", "1/L") else float(beta)


# ---------------------------------------------------------------------------------------------------------------
# Exponents and verdicts


def fit_exponents(table: dict[tuple[int, int], list[float]]) -> tuple[float | None, float | None]:
    """(s_m, s_L) of q ∝ m^s_m · L^s_L from {(width, depth): values over seeds}: log q averaged over seeds, then
    over the other axis, fitted with numpy.polyfit. None for an axis with one value, or when some q ≤ 0."""
    if any(not (v > 0 and math.isfinite(v)) for values in table.values() for v in values):
        return None, None
    logs = {key: float(np.mean(np.log(values))) for key, values in table.items()}
    widths = sorted({m for m, _ in logs})
    depths = sorted({L for _, L in logs})

    def slope(axis: list[int], mean_at) -> float | None:
        if len(axis) < 2:
            return None
        return float(np.polyfit(np.log(axis), [mean_at(a) for a in axis], 1)[0])

    s_m = slope(widths, lambda m: np.mean([logs[(m, L)] for L in depths]))
    s_L = slope(depths, lambda L: np.mean([logs[(m, L)] for m in widths]))
    return s_m, s_L


def _fit_all(result: ScanResult, threshold: float) -> None:
    from hf_fsf.experiments.desiderata import PROPERTIES, QUANTITIES, Exponents, verdicts

    def table(value) -> dict[tuple[int, int], list[float]]:
        out: dict[tuple[int, int], list[float]] = {}
        for p in result.points:
            out.setdefault((p.width, p.depth), []).append(value(p))
        return out

    for q in BLOCK_QUANTITIES:
        for pos in POSITIONS:
            result.block_exponents[(q, pos)] = fit_exponents(
                table(lambda p, q=q, pos=pos: p.blocks[_index(pos, p.depth)][q])
            )
    for q in QUANTITIES:
        result.desiderata_exponents[q] = fit_exponents(table(lambda p, q=q: p.desiderata[q]))
    # An axis that was not scanned contributes no evidence: exponent 0 for the verdict, "—" in the table.
    fitted = [
        Exponents(result.beta, q, s_m or 0.0, s_L or 0.0)
        for q, (s_m, s_L) in result.desiderata_exponents.items()
        if (s_m, s_L) != (None, None)
    ]
    held = verdicts(fitted, threshold).get(result.beta, {})
    unfitted = {QUANTITIES[q] for q, e in result.desiderata_exponents.items() if e == (None, None)}
    result.verdicts = {prop: (None if prop in unfitted else held.get(prop)) for prop in PROPERTIES}


# ---------------------------------------------------------------------------------------------------------------
# The scan


def scan(
    config: str | Path,
    widths: Sequence[int] = (32, 64, 128),
    depths: Sequence[int] = (2, 4, 8),
    *,
    steps: int = 6,
    beta: str | float = "1",
    seeds: int = 2,
    optimizer: str = "adamw",
    lr: float = 1e-3,
    batch_size: int = 8,
    seq_len: int = 32,
    angle_every: int = 2,
    threshold: float | None = None,
    device: str | None = None,
    threads: int | None = 1,
    out: str | Path | None = None,
    progress: bool = True,
) -> ScanResult:
    """Trains `config` at every width × depth (× seed) for `steps` steps and fits the exponents (module docstring).

    config: a bundled family shape (FAMILIES) or a local config.json (file or folder). beta: residual branch scale,
    "1" (none), "1/sqrt(L)", "1/L" or a number. angle_every: the angle is measured on steps 0, angle_every, ...
    and the last step. threshold: |exponent| below it counts as Θ(1) (None: DesiderataConfig.threshold). out: folder for
    scan.md, scan.json and scan.png (None: nothing written). threads: torch CPU threads while measuring (tiny
    models: one is fastest); None leaves the setting alone.
    """
    import torch
    from tqdm.auto import tqdm

    from hf_fsf.experiments.desiderata import DesiderataConfig

    threshold = DesiderataConfig.threshold if threshold is None else threshold
    widths, depths, beta = sorted(set(widths)), sorted(set(depths)), str(beta)
    _check_arguments(widths, depths, steps, seeds, optimizer, lr, angle_every, beta)
    base = base_config(config)
    settings = dict(
        steps=steps, beta=beta, seeds=seeds, optimizer=optimizer, lr=lr, batch_size=batch_size,
        seq_len=seq_len, angle_every=angle_every, threshold=threshold,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )  # fmt: skip
    name = str(config) if str(config) in FAMILIES else f"{base.model_type} ({config})"
    result = ScanResult(name, beta, widths, depths, settings)
    start = time.perf_counter()
    jobs = [(m, L, s) for L in depths for m in widths for s in range(seeds)]
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for m, L, s in tqdm(jobs, desc=f"scan {name}", disable=not progress, unit="run"):
            result.points.append(measure_variant(base, m, L, s, settings))
    finally:
        torch.set_num_threads(previous_threads)
    _fit_all(result, threshold)
    result.seconds = time.perf_counter() - start
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "scan.md").write_text(markdown_table(result) + "\n")
        (folder / "scan.json").write_text(json.dumps(_to_json(result), indent=1))
        result.files = [folder / "scan.md", folder / "scan.json", plot(result, folder / "scan.png")]
    return result


def _check_arguments(widths, depths, steps, seeds, optimizer, lr, angle_every, beta) -> None:
    if len(widths) < 2 and len(depths) < 2:
        raise ValueError(
            f"scan: an exponent needs two widths or two depths, got widths={widths}, depths={depths}."
        )
    if min(depths) < 2 or min(widths) < 1:
        raise ValueError(
            f"scan: depths must be ≥ 2 (BC compares blocks) and widths ≥ 1, got {depths}, {widths}."
        )
    if steps < 1 or seeds < 1 or angle_every < 1 or not lr > 0:
        raise ValueError(
            f"scan: steps, seeds and angle_every must be ≥ 1 and lr > 0, got steps={steps}, seeds={seeds}, "
            f"angle_every={angle_every}, lr={lr}."
        )
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"scan: optimizer must be 'adamw' or 'sgd', got {optimizer!r}.")
    if beta not in ("1", "1/sqrt(L)", "1/L"):
        try:
            float(beta)
        except ValueError:
            raise ValueError(
                f"scan: beta must be '1', '1/sqrt(L)', '1/L' or a number, got {beta!r}."
            ) from None


def _to_json(result: ScanResult) -> dict:
    return {
        "config": result.config,
        "beta": result.beta,
        "widths": result.widths,
        "depths": result.depths,
        "settings": result.settings,
        "points": [p.__dict__ for p in result.points],
        "block_exponents": {f"{q}/{pos}": e for (q, pos), e in result.block_exponents.items()},
        "desiderata_exponents": result.desiderata_exponents,
        "verdicts": result.verdicts,
        "seconds": result.seconds,
    }


# ---------------------------------------------------------------------------------------------------------------
# Table and figure


def _exponent_cell(e: tuple[float | None, float | None], threshold: float | None = None) -> str:
    cells = ["—" if s is None else f"{s:+.2f}" for s in e]
    flag = threshold is not None and any(s is not None and abs(s) >= threshold for s in e)
    if e == (None, None):
        return "n/a (q ≤ 0)"
    return ", ".join(cells) + (" ✗" if flag else "")


def markdown_table(result: ScanResult) -> str:
    """Exponents of the per-block quantities, desiderata verdicts, and every block's values at the widest width."""
    from hf_fsf.experiments.desiderata import PROPERTIES, QUANTITIES

    s = result.settings
    thr = s["threshold"]
    lines = [
        f"## hf-fsf scan: {result.config}, β = {result.beta}",
        "",
        f"widths {result.widths} × depths {result.depths}, {s['seeds']} seed(s), {s['steps']} {s['optimizer']} "
        f"steps at lr {s['lr']:g}, batch {s['batch_size']} × {s['seq_len']} tokens; values: mean over the steps "
        f"measured with the angle (every {s['angle_every']} and the last). Exponents s_m, s_L of "
        "q ∝ m^s_m · L^s_L (— : axis not scanned).",
        "",
        "| quantity | first block: s_m, s_L | middle block: s_m, s_L | last block: s_m, s_L |",
        "|---|---|---|---|",
    ]
    for q, label in BLOCK_QUANTITIES.items():
        cells = [_exponent_cell(result.block_exponents[(q, pos)]) for pos in POSITIONS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| desiderata quantity (PAPER.md §6) | s_m, s_L |", "|---|---|"]
    for q, prop in QUANTITIES.items():
        lines.append(f"| {q} ({prop}) | {_exponent_cell(result.desiderata_exponents[q], thr)} |")
    verdict = {True: "holds", False: "**fails**", None: "n/a"}
    lines += ["", "| " + " | ".join(PROPERTIES) + " |", "|---" * len(PROPERTIES) + "|"]
    lines.append("| " + " | ".join(verdict[result.verdicts[p]] for p in PROPERTIES) + " |")
    lines.append(
        f"\n✗: |s| ≥ {thr:g}, the quantity is not Θ(1); a property holds when none of its quantities has ✗."
    )
    width = result.widths[-1]
    lines += [
        "",
        f"Per block at width {width} (mean over seeds):",
        "",
        "| depth | block | " + " | ".join(BLOCK_QUANTITIES.values()) + " |",
        "|---" * (2 + len(BLOCK_QUANTITIES)) + "|",
    ]
    for L in result.depths:
        for i in range(L):
            values = " | ".join(f"{result.mean(width, L, q, i):.3g}" for q in BLOCK_QUANTITIES)
            lines.append(f"| {L} | {i} | {values} |")
    return "\n".join(lines)


def plot(result: ScanResult, path: Path) -> Path:
    """Rows: the per-block quantities. Columns: profile over blocks (widest width, a line per depth); last block
    vs width (a line per depth); last block vs depth (a line per width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = result.widths[-1]
    fig, axes = plt.subplots(
        len(BLOCK_QUANTITIES), 3, figsize=(10, 2.3 * len(BLOCK_QUANTITIES)), squeeze=False
    )
    for row, (q, label) in enumerate(BLOCK_QUANTITIES.items()):
        profile, by_width, by_depth = axes[row]
        for L in result.depths:
            profile.plot([(i + 1) / L for i in range(L)], [result.mean(width, L, q, i) for i in range(L)],
                         marker="o", ms=3, lw=1, label=f"L={L}")  # fmt: skip
            by_width.plot(result.widths, [result.mean(m, L, q, "last") for m in result.widths],
                          marker="o", ms=3, lw=1, label=f"L={L}")  # fmt: skip
        for m in result.widths:
            by_depth.plot(result.depths, [result.mean(m, L, q, "last") for L in result.depths],
                          marker="o", ms=3, lw=1, label=f"m={m}")  # fmt: skip
        profile.set_ylabel(label, fontsize=8)
        for ax, xlabel in ((profile, f"block ℓ/L (m={width})"), (by_width, "width m"), (by_depth, "depth L")):
            values = [y for line in ax.get_lines() for y in line.get_ydata()]
            if all(v > 0 for v in values):
                ax.set_yscale("log")
            if ax is not profile:
                ax.set_xscale("log", base=2)
                ax.set_title(f"last block vs {xlabel}", fontsize=8)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    axes[0][2].legend(fontsize=6)
    fig.suptitle(f"hf-fsf scan: {result.config}, β = {result.beta}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Command line


def cli_main(argv: list[str]) -> int:
    """`hf-fsf scan CONFIG --widths ... --depths ... --out DIR`."""
    parser = argparse.ArgumentParser(
        prog="hf-fsf scan",
        description=__doc__.split("\n\n")[0] + " Writes scan.md, scan.json and scan.png to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "config",
        help=f"a bundled family shape ({', '.join(FAMILIES)}; head size {HEAD_SIZE}, 256 tokens) or a local "
        "config.json (file or folder)",
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128], help="hidden sizes")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8], help="numbers of blocks (≥ 2)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per variant")
    parser.add_argument(
        "--beta", default="1", help="residual branch scale: 1 (none), 1/sqrt(L), 1/L or a number"
    )
    parser.add_argument("--seeds", type=int, default=2, help="seeds per variant (weights and data)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="optimizer")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    parser.add_argument(
        "--angle-every", type=int, default=2, help="measure the angle on steps 0, N, 2N, ... and the last"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="|exponent| below which a quantity counts as Θ(1); None: the desiderata check's (0.25)",
    )
    parser.add_argument("--device", default=None, help="torch device; None: cuda if available, else cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)"
    )
    parser.add_argument("--out", default="reports/scan", help="output folder")
    args = parser.parse_args(argv)
    try:
        result = scan(
            args.config, args.widths, args.depths, steps=args.steps, beta=args.beta, seeds=args.seeds,
            optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
            angle_every=args.angle_every, threshold=args.threshold, device=args.device, threads=args.threads,
            out=args.out,
        )  # fmt: skip
    except ValueError as err:
        parser.error(str(err))
    print(markdown_table(result).split("\n\nPer block")[0])
    print(f"\nwrote {', '.join(str(f) for f in result.files)} in {result.seconds:.0f} s")
    return 0
