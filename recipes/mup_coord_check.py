"""Recipe: the μP coordinate check of the transfer benchmark's μP baselines, as the `mup` package prescribes.

μP's promise is that every activation, and every activation's change under training, keeps its size as the width
grows. The `mup` package tells its users to check this before trusting a μP model: train each width a few steps
(same batch, `mup.coord_check.get_coord_data`) and look at the mean |coordinate| of every module's output against
width. Under μP the curves are flat at every step; under the standard parametrization some grow with width after
the first update. This recipe runs that check on the exact models `recipes/transfer.py` trains (its builders and
base shapes), for `mup` and, as the contrast, `standard`:

    python recipes/mup_coord_check.py --out reports/mup_coord_check          # a few minutes on 2 cores

For every (task, parametrization, lr) it fits the slope of log mean|coordinate| against log width per module type
at every step after the first update and reports the steepest growth. μP passes when no module type grows faster
than width^--tolerance (default 0.25: 1.19× per doubling; the standard parametrization grows like width^1 to
width^4 here); shrinking is reported, not failed (μP's readout output vanishes with width at init). The lr is each parametrization's optimum at the base width in
docs/transfer.md times --lr-scales: 0.1 (the benchmark's first steps run in its 5 % warm-up, at about a tenth of
it; the verdict) and 1 (the optimum on an untrained model, without warm-up). Outputs: coord_check.csv (mup's data
frame), coord_check.md (the slopes), one figure per case (one panel per step, one line per module type).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer  # noqa: E402  (the benchmark's own builders: what is checked is what it trains)


class _RegressionLoss(nn.Module):
    """The teacher ResNet with its MSE loss as a dict output, mup's `dict_in_out` convention."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.model(x), y)}


def _config(
    task: str, parametrization: str, width: int, base_width: int, depth: int, lr: float
) -> transfer.RunConfig:
    return transfer.RunConfig(
        task, "width", parametrization, width, depth, lr, 0, 10, 16, base_width, depth, 64, 16, "constant"
    )  # fmt: skip


def _gpt2_case(parametrization: str, widths: list[int], depth: int, lr: float):
    """(lazy models by width, one batch, optimizer factory) for the benchmark's GPT-2 byte LM."""
    from hf_fsf.data import load_text_dataset

    splits = load_text_dataset("stdlib", 64, max_bytes=300_000)
    ids = torch.stack([splits.train[i]["input_ids"] for i in range(16)])
    models = {
        w: (lambda w=w: transfer.build_gpt2(_config("gpt2", parametrization, w, widths[0], depth, lr)))
        for w in widths
    }
    return models, {"input_ids": ids, "labels": ids}


def _teacher_case(parametrization: str, widths: list[int], depth: int, lr: float):
    """(lazy models by width, one batch) for the benchmark's teacher ResNet."""
    from hf_fsf.data import TeacherStream

    x, y = TeacherStream(32, 4, noise=0.3, seed=0).sample(64, torch.Generator().manual_seed(0))

    def build(w: int) -> nn.Module:
        return _RegressionLoss(
            transfer._resnet(_config("teacher", parametrization, w, widths[0], depth, lr), 32, 4)
        )

    return {w: (lambda w=w: build(w)) for w in widths}, {"x": x, "y": y}


def _tensor_modules(model: nn.Module) -> set[str]:
    """The modules the check records: those with parameters of their own (embeddings, linears, norms, readouts),
    whose outputs are tensors (containers return caches and model outputs, which mup's hook cannot read)."""
    return {
        name for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))
    }


def _module_type(name: str) -> str:
    """A module's name without its block index (transformer.h.3.mlp.c_fc -> transformer.h.*.mlp.c_fc)."""
    return re.sub(r"\.\d+(\.|$)", r".*\1", name)


def slopes(frame, step: int) -> dict[str, float]:
    """{module type: slope of log mean l1 against log width} at one step."""
    at = frame[frame["t"] == step].copy()
    at["type"] = at["module"].map(_module_type)
    means = at.groupby(["type", "width"])["l1"].mean().reset_index()
    result = {}
    for kind, rows in means.groupby("type"):
        rows = rows[rows["l1"] > 0]
        if len(rows) < 2:
            continue
        x = [math.log(w) for w in rows["width"]]
        y = [math.log(v) for v in rows["l1"]]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        sxx = sum((a - mx) ** 2 for a in x)
        result[kind] = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    return result


def _plot(frame, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(frame["t"].unique())
    fig, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps), 3.2), sharey=True)
    frame = frame.assign(type=frame["module"].map(_module_type))
    for ax, step in zip(axes, steps):
        means = frame[frame["t"] == step].groupby(["type", "width"])["l1"].mean().reset_index()
        for kind, rows in means.groupby("type"):
            ax.plot(rows["width"], rows["l1"], marker="o", linewidth=1, label=kind)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"step {step}")
        ax.set_xlabel("width")
    axes[0].set_ylabel("mean |coordinate| of module output")
    axes[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="reports/mup_coord_check", help="output folder")
    parser.add_argument("--tasks", default="gpt2,teacher", help="comma-separated subset of gpt2, teacher")
    parser.add_argument("--gpt2-widths", default="64,128,256", help="GPT-2 widths (the first is μP's base)")
    parser.add_argument("--teacher-widths", default="64,128,256,512,1024", help="ResNet widths (first: base)")
    parser.add_argument("--steps", type=int, default=4, help="training steps on the fixed batch")
    parser.add_argument("--seeds", type=int, default=1, help="repeats averaged by mup")
    parser.add_argument("--tolerance", type=float, default=0.25, help="|slope| that still counts as flat")
    parser.add_argument(
        "--lr-scales",
        default="0.1,1",
        help="multiples of the optimal lr to check at (the verdict: the first)",
    )
    args = parser.parse_args(argv)
    from mup.coord_check import get_coord_data

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The benchmark's settings: depth at the width sweeps' fixed depth; lr: each parametrization's optimal lr at
    # the base width in docs/transfer.md, times --lr-scales (the benchmark warms up over its first 5 % of steps,
    # so its first steps run at ~1/10 of it; 1 shows what the optimum alone does to an untrained model).
    cases = {
        "gpt2": (_gpt2_case, [int(w) for w in args.gpt2_widths.split(",")], 2, {"mup": 0.0035, "standard": 0.0028}),
        "teacher": (
            _teacher_case, [int(w) for w in args.teacher_widths.split(",")], 8, {"mup": 0.06, "standard": 0.04}
        ),
    }  # fmt: skip
    lines = [
        "| task | parametrization | lr | fastest-growing module type (step) | width exponent | verdict |",
        "|---|---|---|---|---|---|",
    ]
    frames, verdict = [], True
    scales = [float(v) for v in args.lr_scales.split(",")]
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        build, widths, depth, optima = cases[task]
        for parametrization, scale in [(p, s) for p in ("mup", "standard") for s in scales]:
            lr = optima[parametrization] * scale
            models, batch = build(parametrization, widths, depth, lr)
            frame = get_coord_data(
                models, [batch], optimizer="adamw", lr=lr, mup=parametrization == "mup",
                nsteps=args.steps, dict_in_out=True, cuda=False, nseeds=args.seeds, show_progress=False,
                filter_module_by_name=_tensor_modules(models[widths[0]]()).__contains__,
            )  # fmt: skip
            frame["task"], frame["parametrization"], frame["lr"] = task, parametrization, lr
            frames.append(frame)
            # The steepest growth over the steps after the first update (SP blows up at step 2 and may settle).
            fitted = {
                (step, kind): v
                for step in range(2, args.steps + 1)
                for kind, v in slopes(frame, step).items()
            }
            (step, kind), slope = max(fitted.items(), key=lambda item: item[1])
            flat = abs(slope) <= args.tolerance
            grows = slope > args.tolerance
            if parametrization == "mup" and scale == scales[0]:
                verdict &= not grows
            lines.append(
                f"| {task} | {parametrization} | {lr:.3g} | `{kind}` (step {step}) | {slope:+.3f} | "
                f"{'flat' if flat else 'grows' if slope > 0 else 'shrinks'} |"
            )
            title = f"{task}, {parametrization}, AdamW lr {lr:.3g}: coordinate check"
            _plot(frame, title, out / f"coord_{task}_{parametrization}_lr{lr:.3g}.png")
            print(lines[-1], flush=True)
    import pandas as pd

    pd.concat(frames).to_csv(out / "coord_check.csv", index=False)
    (out / "coord_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(
        f"\nμP coordinate check at {scales[0]:g}x the optimal lr: {'PASS' if verdict else 'FAIL'} "
        f"(no μP module type grows faster than width^{args.tolerance}; a shrinking output is μP's vanishing "
        "readout at init)"
    )
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
