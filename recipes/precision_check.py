"""Recipe: is the angle exact when a float32 model trains under bf16 autocast at fine-tuning learning rates?

    python recipes/precision_check.py [--lrs 1e-5 2e-5 1e-4] [--families gpt2 llama] [--steps 3]

Each run: a small float32 GPT-2 or Llama (4 blocks, width 64, no dropout), AdamW, bf16 autocast wrapped around the
model's forward as the Trainer's `bf16=True` does it (accelerate), a few warm-up steps, then `--steps` steps measured
by the probe with the angle on. Each measured step is recomputed independently in float64: a float64 copy of the
model before the step and one after it (the update the optimizer actually applied), run without autocast: f_ℓ
before and after, b_ℓ from the float64 backward of the same loss, so true cos θ_ℓ = −⟨δf, b⟩ / (‖δf‖ ‖b‖).
Prints, per family and learning rate, the largest |cos θ − true| over blocks and steps, the largest |fsf_ratio − 1|
(the probe's), and the range of the true cos θ.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from hf_fsf import FeatureSpeedProbe
from hf_fsf.models import small_gpt2

VOCAB = 256


@dataclass(frozen=True)
class Shape:
    layers: int = 4
    width: int = 64
    batch: int = 8
    length: int = 32


def build(family: str, shape: Shape, seed: int = 0) -> torch.nn.Module:
    if family == "gpt2":
        return small_gpt2(
            shape.layers, shape.width, heads=2, block_size=shape.length, vocab_size=VOCAB, seed=seed
        )
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=shape.width,
        intermediate_size=shape.width * 8 // 3,
        num_hidden_layers=shape.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=shape.length,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def autocast_forward(model: torch.nn.Module, device: str) -> None:
    """What accelerate does for mixed_precision='bf16': the model's own forward runs under autocast."""
    model.forward = torch.autocast(device, dtype=torch.bfloat16)(model.forward)


def _output(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def float64_reference(model: torch.nn.Module, names: list[str], batch: torch.Tensor, backward: bool):
    """Block outputs (and their gradients of the loss) of a float64 model, no autocast."""
    modules = dict(model.named_modules())
    features = {}

    def keep(name, module, args, out):
        features[name] = _output(out)
        if backward:
            features[name].retain_grad()

    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: keep(n, m, a, o)) for n in names]
    try:
        with torch.set_grad_enabled(backward):
            loss = model(input_ids=batch, labels=batch).loss
        if backward:
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return [features[n].detach() for n in names], [features[n].grad for n in names] if backward else None


def true_cosines(before, after, names, batch) -> list[float]:
    f_before, b = float64_reference(before, names, batch, backward=True)
    f_after, _ = float64_reference(after, names, batch, backward=False)
    cosines = []
    for f0, f1, g in zip(f_before, f_after, b):
        delta = f1 - f0
        cosines.append(float(-(delta * g).sum() / (delta.norm() * g.norm())))
    return cosines


def float64_copy(family: str, shape: Shape, model: torch.nn.Module) -> torch.nn.Module:
    """A fresh float64 model with `model`'s parameters: no hooks, no autocast wrapper."""
    copied = build(family, shape).double().to(next(model.parameters()).device)
    copied.load_state_dict(model.state_dict())
    return copied.train()


def check(
    family: str,
    lr: float,
    steps: int,
    warmup: int = 3,
    device: str = "cpu",
    shape: Shape = Shape(),
    around_call: bool = False,
) -> dict:
    """Largest |cos θ − true| and |fsf_ratio − 1| over blocks and measured steps, and the true cos θ range.

    around_call: autocast around the model call (a plain loop's `with torch.autocast(...)`) instead of inside the
    model's forward (the Trainer's way)."""
    model = build(family, shape).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    batches = torch.randint(0, VOCAB, (warmup + steps, shape.batch, shape.length), generator=g).to(device)
    with FeatureSpeedProbe(model) as probe:  # the probe is built on the float32 model, before autocast
        names = probe.block_names
        if not around_call:
            autocast_forward(model, device)

        def loss_of(batch):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=around_call):
                return model(input_ids=batch, labels=batch).loss

        for batch in batches[:warmup]:
            optimizer.zero_grad(set_to_none=True)
            loss_of(batch).backward()
            optimizer.step()
        cos_gap, ratio_gap, true_range = 0.0, 0.0, [1.0, -1.0]
        for batch in batches[warmup:]:
            before = float64_copy(family, shape, model)
            stats = probe.measure_step(lambda b=batch: loss_of(b), optimizer, angle=True)
            true = true_cosines(before, float64_copy(family, shape, model), names, batch)
            assert stats.valid, f"{family} lr {lr}: the probe marked the step invalid"
            for block, t in zip(stats.blocks, true):
                cos_gap = max(cos_gap, abs(block.cos_theta - t))
                ratio_gap = max(ratio_gap, abs(block.fsf_ratio - 1))
                true_range = [min(true_range[0], t), max(true_range[1], t)]
    return {"cos_gap": cos_gap, "ratio_gap": ratio_gap, "true_min": true_range[0], "true_max": true_range[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 2e-5, 1e-4])
    parser.add_argument("--families", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"| model | lr | max abs(cos θ − true) | max abs(fsf_ratio − 1) | true cos θ |  ({args.device})")
    print("|---|---|---|---|---|")
    for family in args.families:
        for lr in args.lrs:
            r = check(family, lr, args.steps, device=args.device)
            print(
                f"| {family} | {lr:g} | {r['cos_gap']:.4f} | {r['ratio_gap']:.4f} | "
                f"{r['true_min']:.2f} – {r['true_max']:.2f} |"
            )


if __name__ == "__main__":
    main()
