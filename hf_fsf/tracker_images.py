"""Block × step heatmaps sent to TensorBoard and W&B while a Trainer run goes on, not only in the final report.

One column per log entry: the per-block means the callback logged for it. Every `heatmap_every` log entries the
callback draws cos θ, relative speed and contribution share with the report's heatmap (`hf_fsf.report.plot_heatmap`)
and hands the pictures to the trackers' own objects, found among the Trainer's callbacks: TensorBoardCallback's
`tb_writer.add_image`, WandbCallback's `_wandb.log` (uncommitted, so W&B files it with the same log entry).
"""

from __future__ import annotations

import io

import numpy as np

from hf_fsf.layout import HEAD, STEM
from hf_fsf.logging_plan import PREFIX

# (tag suffix, title, colour-bar label), as in the report.
HEATMAPS = (
    ("cos_theta", "cos θ (alignment of δf with −b)", "cos θ"),
    ("relative_speed", "relative speed ‖δf‖/‖f‖", "relative speed"),
    ("contribution_share", "contribution share C / ΣC (stem, blocks, head)", "share of ΔL"),
)
MAX_COLUMNS = 256  # past this, every other column is dropped: the picture still spans the whole run


class HeatmapColumns:
    """The per-block values of each log entry, as columns of the heatmaps."""

    def __init__(self, block_names: list[str]) -> None:
        self.block_names = block_names
        self.steps: list[int] = []
        self.columns: dict[str, list[list[float]]] = {key: [] for key, _, _ in HEATMAPS}

    def add(self, step: int, means: dict[str, float]) -> None:
        def value(key: str) -> float:
            return means.get(f"{PREFIX}/{key}", np.nan)

        self.steps.append(step)
        for field in ("cos_theta", "relative_speed"):
            self.columns[field].append([value(f"{name}/{field}") for name in self.block_names])
        # Share of the window's mean total decrease, stem and head included (the report's rows).
        total = value("total_loss_decrease")
        parts = [value("stem_contribution")]
        parts += [value(f"{name}/contribution") for name in self.block_names]
        parts.append(value("head_contribution"))
        self.columns["contribution_share"].append([p / total if total > 0 else np.nan for p in parts])
        if len(self.steps) > MAX_COLUMNS:
            self.steps = self.steps[::2]
            self.columns = {key: column[::2] for key, column in self.columns.items()}

    def images(self) -> dict[str, np.ndarray]:
        """{tag: RGB uint8 image (H, W, 3)} for the heatmaps that have a finite value."""
        from hf_fsf.report import shorten_names

        labels = shorten_names(self.block_names)
        rows = {"contribution_share": [STEM, *labels, HEAD]}
        out = {}
        for key, title, label in HEATMAPS:
            matrix = np.array(self.columns[key], dtype=np.float64).T
            image = _render(matrix, np.array(self.steps), rows.get(key, labels), title, label)
            if image is not None:
                out[f"{PREFIX}/heatmap/{key}"] = image
        return out


def _render(matrix: np.ndarray, steps: np.ndarray, labels: list[str], title: str, label: str):
    """The report's heatmap as an RGB uint8 array, None when nothing is finite."""
    from matplotlib.image import imread

    from hf_fsf.report import plot_heatmap

    if matrix.size == 0 or not np.isfinite(matrix).any():
        return None
    png = io.BytesIO()
    plot_heatmap(matrix, steps, labels, title, label, png)  # savefig writes to any file object
    png.seek(0)
    rgba = imread(png, format="png")  # float32 in [0, 1]
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def trackers(callbacks: list) -> list:
    """The Trainer's tracker callbacks that can take an image now: a TensorBoard writer or a live W&B run."""
    found = []
    for callback in callbacks:
        if getattr(callback, "tb_writer", None) is not None:
            found.append(callback)
        elif getattr(getattr(callback, "_wandb", None), "run", None) is not None:
            found.append(callback)
    return found


def send(images: dict[str, np.ndarray], tracker_callbacks: list, step: int) -> None:
    for callback in tracker_callbacks:
        writer = getattr(callback, "tb_writer", None)
        if writer is not None:
            for tag, image in images.items():
                writer.add_image(tag, image, global_step=step, dataformats="HWC")
            continue
        wandb = callback._wandb
        wandb.log({tag: wandb.Image(image) for tag, image in images.items()}, commit=False)
