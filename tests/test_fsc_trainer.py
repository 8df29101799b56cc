"""FSCOptimizer built by the HF Trainer: TrainingArguments mapped onto it, and every way the Trainer computes a loss."""

import warnings

import pytest
import torch
from trainer_setup import tiny_gpt2, token_data, training_args
from transformers import Trainer

from hf_fsf.fsc import FSCOptimizer, FSCOptimizerFactory


def _fsc(trainer: Trainer) -> FSCOptimizer:
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def _train(tmp_path, settings: dict, steps: int = 2, **overrides) -> tuple[Trainer, list[str]]:
    model = tiny_gpt2()
    args = training_args(tmp_path, max_steps=steps, **overrides)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=token_data(4 * steps),
        optimizer_cls_and_kwargs=(FSCOptimizerFactory, settings),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return trainer, [str(w.message) for w in caught if "FSCOptimizer" in str(w.message)]


def test_training_arguments_map_onto_fsc_and_its_base(tmp_path):
    trainer, messages = _train(
        tmp_path,
        {"base": torch.optim.AdamW},
        learning_rate=0.02,
        weight_decay=0.05,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
    )
    opt = _fsc(trainer)
    assert opt.defaults["lr"] == 0.02  # learning_rate is FSC's rate: what the Trainer schedules and logs
    logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert logged[0] == pytest.approx(0.02)
    decay_names = set(trainer.get_decay_parameter_names(trainer.model))
    name_of = {id(p): n for n, p in trainer.model.named_parameters()}
    seen = set()
    for group in opt.base.param_groups:
        assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
        for p in group["params"]:
            expected = 0.05 if name_of[id(p)] in decay_names else 0.0  # biases and norms are not decayed
            assert group["weight_decay"] == expected, name_of[id(p)]
            seen.add(name_of[id(p)])
    assert any(n.endswith("ln_f.weight") for n in seen) and "ln_f.weight" not in " ".join(decay_names)
    assert not any("ignored" in m for m in messages)


def test_ignored_training_arguments_are_named_in_a_warning(tmp_path):
    settings = {"base": torch.optim.SGD, "rate": 0.05, "lr": 0.1}
    _, messages = _train(tmp_path, settings, steps=1, learning_rate=0.3, adam_beta1=0.5, max_grad_norm=1.0)
    assert any("learning_rate=0.3 is ignored" in m and "rate=0.05" in m for m in messages)
    assert any("adam_beta1=0.5" in m and "ignored" in m for m in messages)  # SGD takes no betas
    assert any("max_grad_norm=1" in m for m in messages)


def test_explicit_rate_and_default_learning_rate_need_no_warning(tmp_path):
    trainer, messages = _train(tmp_path, {"rate": 0.05}, steps=1, learning_rate=5e-5)  # the Trainer's default
    assert _fsc(trainer).defaults["lr"] == 0.05
    assert messages == []


def _shifted_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
    )


@pytest.mark.parametrize("route", ["label_smoothing", "compute_loss_func"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_loss_computed_outside_the_model_reaches_fsc(tmp_path, route, accumulation):
    """The model gets no labels, so its output has no .loss: FSC takes the loss the Trainer back-propagates."""
    computed = []

    def loss_func(outputs, labels, num_items_in_batch=None):
        loss = 2.0 * _shifted_nll(outputs.logits, labels)  # not the model's own loss
        computed.append(loss.item())
        return loss

    extra = {"label_smoothing_factor": 0.1} if route == "label_smoothing" else {}
    model = tiny_gpt2()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=2, gradient_accumulation_steps=accumulation, **extra),
        train_dataset=token_data(8 * accumulation),
        optimizer_cls_and_kwargs=FSCOptimizer.trainer_args(model, rate=0.05),
        compute_loss_func=loss_func if route == "compute_loss_func" else None,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*reusing the previous")
        trainer.train()
    opt = _fsc(trainer)
    assert opt.fsc_state["step"] == 2 and opt.fsc_state["skipped"] == 0
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert opt.last_step.loss == pytest.approx(logged[-1], rel=1e-4)  # the loss the Trainer logs
    if route == "compute_loss_func":
        # The Trainer takes compute_loss_func's losses as already scaled for accumulation and sums them.
        assert opt.last_step.loss == pytest.approx(sum(computed[-accumulation:]), rel=1e-6)
