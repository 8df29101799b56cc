"""Recipe: check FSCOptimizer where the test suite does not look.

    python recipes/check_fsc.py            # ~1 min on 2 cores
    python recipes/check_fsc.py --quick    # ~25 s: fewer bases, shorter training

1. Contributions, recomputed independently: tiny Llama and Qwen2 models (float64) with base optimizers the tests
   do not use (RMSprop with momentum, NAdam, Adagrad, RAdam with weight decay), both balances, smoothing off.
   For every group, −⟨∇L, δw⟩ is computed from gradients and parameters stored around step() and compared with
   the target share (rate × loss / n, or the stage split); prints the worst relative error.
2. Default settings: `FSCOptimizer(model)` with nothing else set, trained on deep ResNets (teacher stream) and on
   a small GPT-2 byte LM in the HF Trainer (`optimizer_cls_and_kwargs=(FSCOptimizerFactory, {})`, with
   FeatureSpeedCallback); prints first and last losses and whether a step was skipped or a warning raised.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import warnings

import torch
from torch import nn

from hf_fsf.control import FSCOptimizer, FSCOptimizerFactory
from hf_fsf.data import TeacherStream, load_text_dataset
from hf_fsf.fsc import DEFAULT_BASE_DEPTH
from hf_fsf.models import ResNet, small_gpt2

RATE = 0.03


def _hand_groups(model) -> dict[str, list[nn.Parameter]]:
    """Stem / each decoder layer / head of a Llama-style HF model, written out from its structure."""
    base = model.model
    groups = {"stem": list(base.embed_tokens.parameters())}
    groups.update({f"model.layers.{i}": list(layer.parameters()) for i, layer in enumerate(base.layers)})
    groups["head"] = list(base.norm.parameters()) + [model.lm_head.weight]
    return groups


def _expected_shares(names: list[str], balance: str) -> dict[str, float]:
    if balance == "blocks":
        return dict.fromkeys(names, 1 / len(names))
    blocks = [n for n in names if n not in ("stem", "head")]
    n0 = DEFAULT_BASE_DEPTH  # stem : trunk : head = 1 : n0 : 1
    return {n: 1 / (n0 + 2) if n in ("stem", "head") else n0 / ((n0 + 2) * len(blocks)) for n in names}


def check_contributions(quick: bool) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    bases = [
        (torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.5}),
        (torch.optim.NAdam, {"lr": 1e-3}),
        (torch.optim.Adagrad, {"lr": 1e-2}),
        (torch.optim.RAdam, {"lr": 1e-3, "weight_decay": 0.01}),
    ][: 2 if quick else 4]
    worst = 0.0
    print("| family | base | balance | max relative error of a group's contribution (3 steps) |")
    print("|---|---|---|---|")
    for family, config_cls, model_cls in (
        ("llama", LlamaConfig, LlamaForCausalLM),
        ("qwen2", Qwen2Config, Qwen2ForCausalLM),
    ):
        for base, kwargs in bases:
            for balance in ("blocks", "stages"):
                torch.manual_seed(0)
                config = config_cls(
                    vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                    tie_word_embeddings=False,
                )  # fmt: skip
                model = model_cls(config).double()
                opt = FSCOptimizer(model, base=base, rate=RATE, ema_beta=0.0, balance=balance, **kwargs)
                groups = _hand_groups(model)
                if opt.group_names != list(groups):
                    raise SystemExit(f"grouping differs: {opt.group_names} vs {list(groups)}")
                shares = _expected_shares(list(groups), balance)
                error = 0.0
                for _ in range(3):
                    ids = torch.randint(0, 50, (4, 16))
                    opt.zero_grad()
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    before = {n: [p.detach().clone() for p in ps] for n, ps in groups.items()}
                    grads = {n: [p.grad.clone() for p in ps] for n, ps in groups.items()}
                    opt.step()  # the loss comes from the model's output, as in the Trainer
                    for n, ps in groups.items():
                        c = -sum(
                            float((g * (p.detach() - b)).sum()) for p, b, g in zip(ps, before[n], grads[n])
                        )
                        error = max(error, abs(c / (RATE * loss.item() * shares[n]) - 1))
                opt.close()
                worst = max(worst, error)
                print(f"| {family} | {base.__name__} | {balance} | {error:.1e} |")
    return worst


def _train_resnet(depth: int, scaling: str, beta, steps: int) -> tuple[float, float, float, int]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    stream = TeacherStream(32, 4, noise=0.3, seed=0)
    x_test, y_test = stream.sample(2048, torch.Generator().manual_seed(5))
    model = ResNet(32, 128, depth, 4, beta=beta, scaling=scaling)
    opt = FSCOptimizer(model)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            x, y = stream.sample(64, gen)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step(loss=loss.detach())
            losses.append(loss.item())
    with torch.no_grad():
        held_out = nn.functional.mse_loss(model(x_test), y_test).item()
    return losses[0], sum(losses[-20:]) / 20, held_out, len(caught) + opt.fsc_state["skipped"]


def _train_gpt2(steps: int) -> tuple[float, float, float]:
    from transformers import Trainer, TrainingArguments

    from hf_fsf.callback import FeatureSpeedCallback

    splits = load_text_dataset(block_size=64)
    model = small_gpt2(6, 128, block_size=64, dropout=0.1, attn_pdrop=0.1, seed=0)  # GPT2Config's dropouts
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out, max_steps=steps, per_device_train_batch_size=16, logging_steps=max(1, steps // 6), report_to=[],
            use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=args, train_dataset=splits.train,
            eval_dataset=torch.utils.data.Subset(splits.validation, range(64)),
            optimizer_cls_and_kwargs=(FSCOptimizerFactory, {}),
            callbacks=[FeatureSpeedCallback(every=max(1, steps // 6), figures=False)],
        )  # fmt: skip
        trainer.train()
        logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        return logged[0], logged[-1], trainer.evaluate()["eval_loss"]


def check_defaults(quick: bool) -> bool:
    steps = 150 if quick else 400
    print(
        f"\n| model (FSCOptimizer defaults, {steps} steps) | train loss first → last 20 | held-out | warnings + skips |"
    )
    print("|---|---|---|---|")
    ok = True
    for depth, scaling, beta in (
        (64, "standard", "1/sqrt(L)"),
        (64, "fsc", "1/sqrt(L)"),
        (32, "standard", 2**-0.5),
    ):
        first, last, held_out, alarms = _train_resnet(depth, scaling, beta, steps)
        ok = ok and math.isfinite(held_out) and last < first and alarms == 0
        label = beta if isinstance(beta, str) else f"{beta:.3f}"
        print(f"| ResNet depth {depth}, width 128, {scaling} init, β = {label} | {first:.3f} → {last:.3f} | "
              f"{held_out:.4f} | {alarms} |")  # fmt: skip
    lm_steps = 60 if quick else 300
    first, last, eval_loss = _train_gpt2(lm_steps)
    ok = ok and math.isfinite(eval_loss) and last < first
    print(f"| GPT-2 6×128 byte LM, HF Trainer ({lm_steps} steps, logged means) | {first:.3f} → {last:.3f} | "
          f"{eval_loss:.4f} | - |")  # fmt: skip
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="two bases, shorter training")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    worst = check_contributions(args.quick)
    print(f"\nworst relative error: {worst:.1e}")
    trained = check_defaults(args.quick)
    passed = worst < 1e-6 and trained
    print("\nPASS" if passed else "\nFAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
