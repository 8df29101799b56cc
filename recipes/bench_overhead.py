"""Recipe: what FeatureSpeedCallback costs — step time and peak memory of Trainer steps, per setting.

    python recipes/bench_overhead.py                 # GPT-2-small shape at 2048 and 256 tokens/step, and tiny
    python recipes/bench_overhead.py --quick         # tiny model only, few steps (a smoke test)
    python recipes/bench_overhead.py --sizes gpt2-small:4x512 --steps 8

Settings, all in one process, on the same freshly seeded model: no callback; cheap stats every step
(angle_every=0); the angle every step; the angle every 50 steps. Step time: wall time from one on_step_end
to the next (a separate timing callback, see StepTimer), synchronized on GPU; medians over `--steps` steps
after `--warmup` steps. The mean is printed too. With angle every 50 steps the angle falls on step 1 (a warm-up
step), so unless more than 50 steps are timed, that row measures the steps between two angles.
Peak memory: on CUDA, torch.cuda.max_memory_allocated during the timed steps (reset after warm-up); on CPU, the
process's peak resident set size (VmHWM in /proc/self/status, reset through /proc/self/clear_refs after
malloc_trim) during the timed steps, minus the RSS at their start: the extra memory the steps touched (a rough
measure: the CPU allocator caches memory between steps).
Ratios are to the no-callback run. CUDA uses bf16 mixed precision when supported; CPU float32.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from hf_fsf.callback import FeatureSpeedCallback

# name -> (layers, width, heads)
SHAPES = {"gpt2-small": (12, 768, 12), "tiny": (2, 64, 2)}
# setting -> FeatureSpeedCallback kwargs (None: no callback)
SETTINGS = {
    "none": None,
    "cheap every step": {"every": 1, "angle_every": 0},
    "angle every step": {"every": 1, "angle_every": 1},
    "angle every 50": {"every": 1, "angle_every": 50},
}
VOCAB = 256  # the project's byte-level vocabulary


@dataclass
class Measurement:
    size: str
    setting: str
    median_s: float
    mean_s: float
    peak_bytes: int


class RandomTokens(Dataset):
    """Fixed random byte sequences: the cost of a step does not depend on the text."""

    def __init__(self, n: int, length: int):
        self.ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS delta is then a lower bound
        pass


class _PeakMemory:
    """Peak memory over a window: CUDA allocator peak, or on CPU the peak RSS above the window's start."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.start = 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        gc.collect()
        _malloc_trim()  # hand freed heap back to the OS, so memory touched again shows up in the RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
        self.start = self._status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM") - self.start

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status: CPU peak memory needs Linux.")


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, from one on_step_end to the next.

    End to end rather than on_step_begin -> on_step_end: FeatureSpeedCallback moves itself to the front of the
    callback list, so its on_step_begin would run before a timer's and escape it. The interval holds everything
    the Trainer does per step (data, forward, backward, optimizer, every callback), the same for all settings.
    The memory peak is reset at the end of the last warm-up step.
    """

    def __init__(self, warmup: int, memory: _PeakMemory):
        self.warmup, self.memory = warmup, memory
        self.times: list[float] = []
        self.peak = 0
        self._last = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._last)
            self.peak = max(self.peak, self.memory.peak())
        elif state.global_step == self.warmup:
            self.memory.reset()
        self._last = time.perf_counter()


def measure(size: str, batch: int, length: int, setting: str, steps: int, warmup: int) -> Measurement:
    layers, width, heads = SHAPES[size]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_positions=length,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    use_gpu = torch.cuda.is_available()
    timer = StepTimer(warmup, _PeakMemory())
    callbacks: list[TrainerCallback] = []
    if SETTINGS[setting] is not None:
        callbacks.append(FeatureSpeedCallback(**SETTINGS[setting], figures=False))
    callbacks.append(timer)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=warmup + steps,
            per_device_train_batch_size=batch,
            learning_rate=1e-4,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=not use_gpu,
            bf16=use_gpu and torch.cuda.is_bf16_supported(),
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=RandomTokens(batch * 4, length), callbacks=callbacks
        )
        trainer.train()
    del trainer, model
    if use_gpu:
        torch.cuda.empty_cache()
    return Measurement(
        f"{size} {batch}x{length}",
        setting,
        statistics.median(timer.times),
        statistics.mean(timer.times),
        timer.peak,
    )


def table(results: list[Measurement]) -> str:
    lines = [
        "| model, batch×length | setting | median step (s) | time ratio (median) | time ratio (mean) | peak memory ratio |",
        "|---|---|---|---|---|---|",
    ]
    base = {r.size: r for r in results if r.setting == "none"}
    for r in results:
        b = base[r.size]
        memory = f"{r.peak_bytes / b.peak_bytes:.3f}" if b.peak_bytes > 0 else "n/a"
        lines.append(
            f"| {r.size} | {r.setting} | {r.median_s:.4f} | {r.median_s / b.median_s:.3f} | "
            f"{r.mean_s / b.mean_s:.3f} | {memory} |"
        )
    return "\n".join(lines)


def parse_size(spec: str) -> tuple[str, int, int]:
    """'gpt2-small:4x512' -> ('gpt2-small', 4, 512)."""
    try:
        name, shape = spec.split(":")
        batch, length = (int(v) for v in shape.split("x"))
    except ValueError:
        raise ValueError(f"--sizes entry {spec!r}: write NAME:BATCHxLENGTH, e.g. gpt2-small:4x512.") from None
    if name not in SHAPES:
        raise ValueError(f"--sizes entry {spec!r}: unknown model {name!r}; known: {', '.join(SHAPES)}.")
    return name, batch, length


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny model (2x64 tokens) only, 5 steps after 1 warm-up step"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting (median over them)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["gpt2-small:4x512", "gpt2-small:1x256", "tiny:4x128"],
        help="NAME:BATCHxLENGTH entries; NAME in " + ", ".join(SHAPES),
    )
    args = parser.parse_args(argv)
    sizes = ["tiny:2x64"] if args.quick else args.sizes
    steps, warmup = (5, 1) if args.quick else (args.steps, args.warmup)
    if steps < 1 or warmup < 1:
        raise ValueError("--steps and --warmup must be at least 1.")
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    results = []
    for spec in sizes:
        name, batch, length = parse_size(spec)
        for setting in SETTINGS:
            results.append(measure(name, batch, length, setting, steps, warmup))
            r = results[-1]
            print(
                f"# {r.size} / {setting}: median {r.median_s:.4f} s, peak {r.peak_bytes / 2**20:.1f} MiB",
                flush=True,
            )
    memory = (
        "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "peak RSS above the start (VmHWM)"
    )
    print(f"\ndevice: {device}; {steps} timed steps after {warmup} warm-up; peak memory: {memory}\n")
    print(table(results))


if __name__ == "__main__":
    main()
