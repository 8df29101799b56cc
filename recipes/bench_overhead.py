"""Recipe: what monitoring and FSC cost — step time and peak memory of Trainer steps, per setting.

    python recipes/bench_overhead.py                      # CPU: tiny GPT-2 and Llama shapes; CUDA: GPT-2 124M, Llama 1B
    python recipes/bench_overhead.py --quick              # tiny shapes, few steps (a smoke test)
    python recipes/bench_overhead.py --sizes gpt2-small:4x512 --steps 5 --warmup 1   # the README's CPU row
    python recipes/bench_overhead.py --sizes gpt2-small:8x1024 llama-1b:8x1024 --vocab real   # the GPU table

Settings, all in one process, each on the same freshly seeded model: AdamW alone (the baseline); the callback with
cheap stats every step (angle_every=0); with the angle every step; with the angle every 50 steps; FSCOptimizer over
the same AdamW; FSCOptimizer with the cheap stats. Models: GPT-2 (`hf_fsf.models.small_gpt2`) and Llama
(`transformers.LlamaForCausalLM`) shapes, with the byte vocabulary (256) or the real one (`--vocab real`: 50257 for
GPT-2, 128256 for Llama 3). AdamW is fused on CUDA, as the Trainer's default.

Step time: wall time from one on_step_end to the next (everything the Trainer does per step), after
torch.cuda.synchronize() on CUDA; medians over `--steps` steps after `--warmup` steps (the mean is printed too).
With the angle every 50 steps the angle falls on step 1 (a warm-up step), so unless more than 50 steps are timed,
that row measures the steps between two angles. Peak memory: on CUDA, torch.cuda.max_memory_allocated during the
timed steps (reset after warm-up); on CPU, the process's peak resident set size (VmHWM in /proc/self/status, reset
through /proc/self/clear_refs after malloc_trim) during the timed steps, minus the RSS at their start: the extra
memory the steps touched (rough: the CPU allocator caches memory between steps). Ratios are to AdamW alone measured
in the same run. CUDA uses bf16 mixed precision when supported; CPU float32. `--compile`: torch.compile via the
Trainer (torch_compile=True).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_fsf.callback import FeatureSpeedCallback
from hf_fsf.fsc import FSCOptimizer
from hf_fsf.models import small_gpt2


@dataclass(frozen=True)
class Shape:
    family: str  # "gpt2" or "llama"
    layers: int
    width: int
    heads: int
    kv_heads: int = 0  # Llama: grouped-query attention
    intermediate: int = 0  # Llama: MLP width


SHAPES = {
    "tiny": Shape("gpt2", 2, 64, 2),
    "gpt2-small": Shape("gpt2", 12, 768, 12),  # GPT-2 124M with the real vocabulary
    "llama-tiny": Shape("llama", 2, 64, 2, 1, 172),
    "llama-small": Shape("llama", 8, 512, 8, 2, 1376),
    "llama-1b": Shape("llama", 16, 2048, 32, 8, 8192),  # Llama 3.2 1B's shape
}
VOCAB = {"bytes": {"gpt2": 256, "llama": 256}, "real": {"gpt2": 50257, "llama": 128256}}
# label -> (FeatureSpeedCallback kwargs or None, optimizer)
SETTINGS = {
    "AdamW alone": (None, "adamw"),
    "cheap stats every step": ({"every": 1, "angle_every": 0}, "adamw"),
    "angle every step": ({"every": 1, "angle_every": 1}, "adamw"),
    "angle every 50": ({"every": 1, "angle_every": 50}, "adamw"),
    "FSCOptimizer": (None, "fsc"),
    "FSC + cheap stats": ({"every": 1, "angle_every": 0}, "fsc"),
}
BASELINE = "AdamW alone"
LR = 1e-4


@dataclass
class Measurement:
    size: str
    setting: str
    median_s: float
    mean_s: float
    peak_bytes: int


class RandomTokens(Dataset):
    """Fixed random token sequences: the cost of a step does not depend on the text."""

    def __init__(self, n: int, length: int, vocab: int):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model(shape: Shape, vocab: int, length: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if shape.family == "gpt2":
        return small_gpt2(shape.layers, shape.width, heads=shape.heads, block_size=length, vocab_size=vocab)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.width,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=length,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config)


def build_optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    fused = {"fused": True} if torch.cuda.is_available() else {}
    if kind == "fsc":
        return FSCOptimizer(model, base=torch.optim.AdamW, lr=LR, **fused)
    return torch.optim.AdamW(model.parameters(), lr=LR, **fused)


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


def measure(spec: str, setting: str, vocab_kind: str, steps: int, warmup: int, compile_: bool) -> Measurement:
    name, batch, length = parse_size(spec)
    shape = SHAPES[name]
    vocab = VOCAB[vocab_kind][shape.family]
    model = build_model(shape, vocab, length)
    callback_kwargs, optimizer_kind = SETTINGS[setting]
    use_gpu = torch.cuda.is_available()
    if use_gpu:
        model.cuda()
    timer = StepTimer(warmup, _PeakMemory())
    callbacks: list[TrainerCallback] = [timer]
    if callback_kwargs is not None:
        callbacks.insert(0, FeatureSpeedCallback(**callback_kwargs, figures=False))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=warmup + steps,
            per_device_train_batch_size=batch,
            learning_rate=LR,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=not use_gpu,
            bf16=use_gpu and torch.cuda.is_bf16_supported(),
            torch_compile=compile_,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=RandomTokens(batch * 4, length, vocab),
            callbacks=callbacks,
            optimizers=(build_optimizer(optimizer_kind, model), None),
        )
        trainer.train()
    del trainer, model
    gc.collect()
    if use_gpu:
        torch.cuda.empty_cache()
    label = f"{name} {batch}x{length}" + (f", vocab {vocab}" if vocab_kind == "real" else "")
    return Measurement(
        label, setting, statistics.median(timer.times), statistics.mean(timer.times), timer.peak
    )


def table(results: list[Measurement]) -> str:
    lines = [
        "| model, batch×length | setting | median step (ms) | time ratio (median) | time ratio (mean) "
        "| peak memory ratio |",
        "|---|---|---|---|---|---|",
    ]
    base = {r.size: r for r in results if r.setting == BASELINE}
    for r in results:
        b = base.get(r.size)
        time_ratio = f"{r.median_s / b.median_s:.3f}" if b else "n/a"
        mean_ratio = f"{r.mean_s / b.mean_s:.3f}" if b else "n/a"
        memory = f"{r.peak_bytes / b.peak_bytes:.3f}" if b and b.peak_bytes > 0 else "n/a"
        lines.append(
            f"| {r.size} | {r.setting} | {1e3 * r.median_s:.1f} | {time_ratio} | {mean_ratio} | {memory} |"
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
    if batch < 1 or length < 2:
        raise ValueError(f"--sizes entry {spec!r}: batch must be >= 1 and length >= 2.")
    return name, batch, length


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes (2x64 tokens), 5 steps after 1 warm-up"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting (median over them)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["gpt2-small:8x1024", "llama-1b:8x1024"] if cuda else ["tiny:4x128", "llama-tiny:4x128"],
        help="NAME:BATCHxLENGTH entries; NAME in " + ", ".join(SHAPES),
    )
    parser.add_argument(
        "--vocab", choices=list(VOCAB), default="real" if cuda else "bytes", help="vocabulary sizes"
    )
    parser.add_argument(
        "--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), help="settings to run"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model (Trainer torch_compile)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.steps, args.warmup = ["tiny:2x64", "llama-tiny:2x64"], 5, 1
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1.")
    if BASELINE not in args.settings:
        args.settings.insert(0, BASELINE)  # every ratio is to the baseline of the same run
    for spec in args.sizes:
        try:
            parse_size(spec)
        except ValueError as error:
            parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    results = []
    for spec in args.sizes:
        for setting in args.settings:
            r = measure(spec, setting, args.vocab, args.steps, args.warmup, args.compile)
            results.append(r)
            print(f"# {r.size} / {setting}: median {1e3 * r.median_s:.1f} ms, peak {r.peak_bytes / 2**20:.1f} MiB",
                  flush=True)  # fmt: skip
    memory = "torch.cuda.max_memory_allocated" if cuda else "peak RSS above the start (VmHWM)"
    precision = "bf16 autocast" if cuda and torch.cuda.is_bf16_supported() else "float32"
    compiled = ", torch.compile" if args.compile else ""
    print(f"\ncommand: python recipes/bench_overhead.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"device: {device}; {precision}{compiled}; {args.steps} timed steps after {args.warmup} warm-up; "
        f"peak memory: {memory}\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
