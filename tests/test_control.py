"""FSCOptimizer (balanced per-block contributions) and the output scale, checked against independent computations."""

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

from hf_fsf.control import (
    FSCOptimizer,
    FSCOptimizerFactory,
    calibrate_output_scale,
    get_output_scale,
    set_output_scale,
)
from hf_fsf.models import ReLUMLP, ResNet, dense_inputs, small_gpt2

RATE = 0.05
BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.1}),
}


def _adafactor(params, **kwargs):
    from transformers.optimization import Adafactor

    return Adafactor(params, **kwargs)


EXTRA_BASES = {"adafactor": (_adafactor, {"lr": 1e-3, "relative_step": False, "scale_parameter": False})}


def _resnet(seed: int = 0, **kw) -> ResNet:
    torch.manual_seed(seed)
    return ResNet(input_dim=6, width=16, depth=5, output_dim=2, **kw).double()


def _data(seed: int = 1, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dense_inputs(n, 6, generator=g, dtype=torch.float64), torch.randn(
        n, 2, generator=g, dtype=torch.float64
    )


def _groups_by_hand(model: ResNet) -> dict[str, list[nn.Parameter]]:
    """The expected grouping, written out from the model's structure (not from find_blocks)."""
    groups = {"stem": [model.input_layer.weight]}
    groups.update({f"blocks.{i}": list(b.parameters()) for i, b in enumerate(model.blocks)})
    groups["head"] = list(model.readout.parameters())
    return {
        n: [p for p in ps if p.requires_grad] for n, ps in groups.items() if any(p.requires_grad for p in ps)
    }


def _step_and_measure(model, opt, x, y) -> tuple[float, dict[str, float]]:
    """One step; returns the loss and each group's −⟨∇L, δw_applied⟩ recomputed from stored params and grads."""
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    groups = _groups_by_hand(model)
    before = {n: [p.detach().clone() for p in ps] for n, ps in groups.items()}
    grads = {n: [p.grad.clone() for p in ps] for n, ps in groups.items()}
    opt.step(loss=loss)
    contrib = {
        n: -sum(float((g * (p.detach() - b)).sum()) for p, b, g in zip(ps, before[n], grads[n]))
        for n, ps in groups.items()
    }
    return loss.item(), contrib


@pytest.mark.parametrize("base", list(BASES) + list(EXTRA_BASES))
def test_contributions_are_balanced_and_sum_to_rate_times_loss(base):
    cls, kwargs = {**BASES, **EXTRA_BASES}[base]
    model = _resnet()
    x, y = _data()
    # stabilizers off: exact balance
    opt = FSCOptimizer(
        model, base=cls, rate=RATE, balance="blocks", ema_beta=0.0, trust_region=False, **kwargs
    )
    assert opt.group_names == list(_groups_by_hand(model))
    for _ in range(3):  # later steps exercise the momentum / Adam state
        loss, contrib = _step_and_measure(model, opt, x, y)
        share = RATE * loss / len(contrib)
        for name, c in contrib.items():
            assert c == pytest.approx(share, rel=1e-6), name
        assert opt.last_targets == pytest.approx(dict.fromkeys(contrib, share), rel=1e-12)
        assert opt.last_contributions == pytest.approx(contrib, rel=1e-6)
        assert all(s > 0 for s in opt.last_scales.values())


@pytest.mark.parametrize("base", ["momentum", "adamw"])
@pytest.mark.parametrize("base_depth", [None, 4, 12])
def test_stage_shares_are_the_per_block_shares_at_the_base_depth(base, base_depth):
    """balance="stages" (the default): stem : trunk : head = 1 : n₀ : 1, the trunk split equally over its 5 blocks."""
    cls, kwargs = BASES[base]
    model = _resnet()
    x, y = _data()
    opt = FSCOptimizer(model, base=cls, rate=RATE, base_depth=base_depth, ema_beta=0.0, **kwargs)
    n0 = 1 if base_depth is None else base_depth  # the documented default
    n_blocks = len(model.blocks)
    for _ in range(3):
        loss, contrib = _step_and_measure(model, opt, x, y)
        end = RATE * loss / (n0 + 2)
        assert contrib["stem"] == pytest.approx(end, rel=1e-6)
        assert contrib["head"] == pytest.approx(end, rel=1e-6)
        for i in range(n_blocks):
            assert contrib[f"blocks.{i}"] == pytest.approx(n0 * end / n_blocks, rel=1e-6)
        assert sum(contrib.values()) == pytest.approx(RATE * loss, rel=1e-6)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"balance": "layers"}, "balance must be one of"),
        ({"base_depth": 0}, "base_depth must be an integer >= 1"),
        ({"base_depth": 2.5}, "base_depth must be an integer >= 1"),
        ({"base_depth": True}, "base_depth must be an integer >= 1"),
        ({"balance": "blocks", "base_depth": 4}, "base_depth sets the stage shares"),
        ({"rate": -1.0}, "rate must be a finite number"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        FSCOptimizer(_resnet(), **settings)


def test_frozen_and_zero_gradient_groups_are_excluded():
    model = _resnet(freeze_first_layer=True)
    x, y = _data()
    opt = FSCOptimizer(model, base=torch.optim.SGD, rate=RATE, lr=0.1, balance="blocks", ema_beta=0.0)
    assert "stem" not in opt.group_names  # the frozen input layer is the whole stem
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    model.blocks[1].linear.weight.grad.zero_()
    frozen_before = model.blocks[1].linear.weight.detach().clone()
    others = [n for n in opt.group_names if n != "blocks.1"]
    groups = _groups_by_hand(model)
    before = {n: [p.detach().clone() for p in groups[n]] for n in others}
    grads = {n: [p.grad.clone() for p in groups[n]] for n in others}
    opt.step(loss=loss)
    assert torch.equal(model.blocks[1].linear.weight, frozen_before)
    record = opt.last_step.groups["blocks.1"]
    assert not record.active and record.scale == 0.0
    for n in others:
        c = -sum(float((g * (p.detach() - b)).sum()) for p, b, g in zip(groups[n], before[n], grads[n]))
        assert c == pytest.approx(RATE * loss.item() / len(others), rel=1e-6), n


def test_a_block_layout_gives_the_groups_of_its_block_names():
    """blocks= takes a BlockLayout found once: the same groups as the names; tied embeddings in tied_group."""
    from hf_fsf import find_blocks

    model = _tiny_gpt2()
    names = ["transformer.h.0", "transformer.h.1"]
    by_names = FSCOptimizer(model, blocks=names, capture_loss=False)
    by_layout = FSCOptimizer(model, blocks=find_blocks(model, names), capture_loss=False)
    assert by_layout.group_names == by_names.group_names == ["stem", *names, "head"]
    assert [[id(p) for p in g["params"]] for g in by_layout.param_groups] == [
        [id(p) for p in g["params"]] for g in by_names.param_groups
    ]
    stem = {id(p) for p in by_layout.param_groups[0]["params"]}
    head = {id(p) for p in by_layout.param_groups[-1]["params"]}
    tied, position = id(model.transformer.wte.weight), id(model.transformer.wpe.weight)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert stem == {tied, position} and tied not in head  # tied_group="stem", the default
    readout = FSCOptimizer(model, blocks=find_blocks(model, names), capture_loss=False, tied_group="head")
    assert {id(p) for p in readout.param_groups[0]["params"]} == {position}  # what only the input reads
    assert tied in {id(p) for p in readout.param_groups[-1]["params"]}
    with pytest.raises(ValueError, match="tied_group must be"):
        FSCOptimizer(model, capture_loss=False, tied_group="trunk")


def test_parameter_groups_with_options_keep_their_options():
    """The Trainer's decay / no-decay split: FSC groups by block, the base keeps each parameter's weight decay."""
    model = _resnet()
    decay = [model.input_layer.weight, model.blocks[0].linear.weight]
    rest = [p for p in model.parameters() if all(p is not q for q in decay)]
    groups = [{"params": decay, "weight_decay": 0.5}, {"params": rest, "weight_decay": 0.0}]
    opt = FSCOptimizer(
        groups, model=model, base=torch.optim.AdamW, rate=RATE, lr=1e-3, balance="blocks", ema_beta=0.0
    )
    assert opt.group_names == list(_groups_by_hand(model))
    wd = {id(p): g["weight_decay"] for g in opt.base.param_groups for p in g["params"]}
    assert all(wd[id(p)] == 0.5 for p in decay) and all(wd[id(p)] == 0.0 for p in rest)
    loss, contrib = _step_and_measure(model, opt, *_data())
    assert list(contrib.values()) == pytest.approx([RATE * loss / len(contrib)] * len(contrib), rel=1e-6)


def test_scheduler_halves_the_target():
    model = _resnet()
    x, y = _data()
    opt = FSCOptimizer(model, base=torch.optim.Adam, rate=RATE, lr=1e-3, ema_beta=0.0)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    loss, contrib = _step_and_measure(model, opt, x, y)
    assert sum(contrib.values()) == pytest.approx(0.5 * RATE * loss, rel=1e-6)
    assert opt.last_step.target == pytest.approx(0.5 * RATE * loss, rel=1e-12)


def _run(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss)


def test_state_dict_round_trip_resumes_identically():
    batches = [_data(seed=s) for s in range(6)]
    settings = dict(base=torch.optim.AdamW, rate=RATE, lr=1e-3, ema_beta=0.9, max_scale=2.2, warmup_steps=4)
    model = _resnet()
    opt = FSCOptimizer(model, **settings)
    _run(model, opt, batches)

    first = _resnet()
    opt1 = FSCOptimizer(first, **settings)
    _run(first, opt1, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what the HF Trainer does on resume

    resumed = _resnet(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = FSCOptimizer(resumed, **settings)
    opt2.load_state_dict(saved["opt"])
    _run(resumed, opt2, batches[3:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt2.fsc_state["step"] == 6
    assert opt2.last_scales == opt.last_scales
    groups = opt.last_step.groups.values()  # the resumed steps went through smoothing and the bound
    assert any(g.clipped for g in groups) and not all(g.clipped for g in groups)
    assert all(g.smoothed_unit != g.unit_contribution for g in groups)


def test_non_finite_gradient_skips_the_step_without_touching_state():
    batches = [_data(seed=s) for s in range(3)]
    reference = _resnet()
    ref_opt = FSCOptimizer(reference, base=torch.optim.Adam, rate=RATE, lr=1e-3, ema_beta=0.5)
    _run(reference, ref_opt, [batches[0], batches[2]])

    model = _resnet()
    opt = FSCOptimizer(model, base=torch.optim.Adam, rate=RATE, lr=1e-3, ema_beta=0.5)
    _run(model, opt, [batches[0]])
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss = ((model(batches[1][0]) - batches[1][1]) ** 2).mean()
    loss.backward()
    model.blocks[2].linear.weight.grad[0, 0] = math.nan
    with pytest.warns(UserWarning, match="skipped.*blocks.2"):
        opt.step(loss=loss)
    assert opt.last_step.skipped is not None
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = opt.state_dict()
    assert after["fsc"]["step"] == state["fsc"]["step"] and after["fsc"]["ema"] == state["fsc"]["ema"]
    for key, value in state["base"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, after["base"]["state"][key][name]), name
    _run(model, opt, [batches[2]])
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_loss_sources_and_errors():
    model = _resnet()
    x, y = _data()
    opt = FSCOptimizer(model, base=torch.optim.SGD, rate=RATE, lr=0.1)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    with pytest.raises(RuntimeError, match="no loss is known"):
        opt.step()

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert opt.last_step.target == pytest.approx(RATE * loss.item(), rel=1e-12)
    opt.observe_loss(torch.tensor(2.0))
    opt.observe_loss(torch.tensor(4.0))
    opt.step()  # mean of the observed losses
    assert opt.last_step.loss == pytest.approx(3.0)
    with pytest.warns(UserWarning, match="reusing the previous"):
        opt.step()
    with pytest.raises(TypeError, match="needs the model"):
        FSCOptimizer(model.parameters())
    with pytest.raises(ValueError, match="ema_beta"):
        FSCOptimizer(model, ema_beta=1.0)


def test_max_scale_bounds_the_step_relative_to_the_base():
    model = _resnet()
    x, y = _data()
    opt = FSCOptimizer(model, base=torch.optim.SGD, rate=10.0, lr=1e-4, max_scale=2.0)
    loss, contrib = _step_and_measure(model, opt, x, y)
    assert all(s <= 2.0 for s in opt.last_scales.values())
    assert all(g.clipped for g in opt.last_step.groups.values())
    assert sum(contrib.values()) < 10.0 * loss


@pytest.mark.parametrize("base", ["momentum", "adamw"])
def test_short_training_run_decreases_the_loss(base):
    cls, kwargs = BASES[base]
    torch.manual_seed(0)
    model = ResNet(input_dim=6, width=32, depth=6, output_dim=1)
    g = torch.Generator().manual_seed(2)
    x = dense_inputs(128, 6, generator=g)
    y = torch.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2] * x[:, 2:3]  # a smooth non-linear teacher
    opt = FSCOptimizer(model, base=cls, rate=0.1, ema_beta=0.9, max_scale=10.0, **kwargs)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


# -- Hugging Face ---------------------------------------------------------------------------------------------------


def _tiny_gpt2(seed: int = 0):
    # GPT2Config's default dropout (0.1 everywhere, attention included)
    return small_gpt2(2, 16, heads=2, block_size=16, vocab_size=64, dropout=0.1, attn_pdrop=0.1, seed=seed)


def _token_batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (n, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def test_loss_shares_of_a_step_that_never_ran_are_dropped():
    """fp16 overflow makes the Trainer skip optimizer.step(): the next step's loss is its own shares only."""
    model = _tiny_gpt2()
    opt = FSCOptimizer(model, base=torch.optim.SGD, rate=RATE, lr=0.1, ema_beta=0.0)
    batches = [_token_batch(4, seed) for seed in range(4)]

    def window(pair):  # one accumulation window: one count, shared by its micro-batches (as the Trainer does)
        count = torch.tensor(float(sum(b["labels"][:, 1:].numel() for b in pair)))
        shares = []
        for b in pair:
            out = model(**b, num_items_in_batch=count)
            out.loss.backward()
            shares.append(out.loss.item())
        return sum(shares)

    window(batches[:2])  # no step(): skipped
    opt.zero_grad()
    loss = window(batches[2:])
    opt.step()
    assert opt.last_step.loss == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("how", ["trainer_args", "factory", "factory_instance", "optimizers"])
def test_trainer_accepts_the_optimizer(tmp_path, how):
    from transformers import Trainer, TrainingArguments

    model = _tiny_gpt2()
    data = [{k: v[i] for k, v in _token_batch(16).items()} for i in range(16)]
    settings = dict(base=torch.optim.AdamW, rate=0.05, lr=1e-3)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[], save_strategy="no",
        use_cpu=True, logging_steps=1, lr_scheduler_type="linear",
        gradient_accumulation_steps=2 if how == "factory" else 1,  # micro-batch losses are then summed shares
    )  # fmt: skip
    if how == "trainer_args":
        kw = {"optimizer_cls_and_kwargs": FSCOptimizer.trainer_args(model, **settings)}
    elif how == "factory":
        kw = {"optimizer_cls_and_kwargs": (FSCOptimizerFactory, settings)}
    elif how == "factory_instance":
        kw = {"optimizer_cls_and_kwargs": (FSCOptimizerFactory(), settings)}
    else:
        kw = {"optimizers": (FSCOptimizer(model, **settings), None)}
    trainer = Trainer(model=model, args=args, train_dataset=data, **kw)
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*reusing the previous")  # what a missing loss would warn
        trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, FSCOptimizer)
    assert opt.group_names == ["stem", "transformer.h.0", "transformer.h.1", "head"]
    assert opt.fsc_state["step"] == 3
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert opt.last_step.loss == pytest.approx(logged[-1], rel=1e-3)  # the loss came from the model's forward
    assert opt.param_groups[0]["lr"] < 0.05  # the linear schedule scaled the target down
    assert not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)


# -- output scale ---------------------------------------------------------------------------------------------------


def _kappa_by_hand(model, last_block, loss_fn) -> float:
    """κ = cos θ · ‖b‖ · √m at the last block for calibrate's default probe step, with plain hooks (no probe)."""
    work = copy.deepcopy(model)
    block = dict(work.named_modules())[last_block]
    captured = []
    handle = block.register_forward_hook(lambda mod, args, out: captured.append(out))
    opt = FSCOptimizer(
        work, base=torch.optim.SGD, rate=1e-3, lr=1e-3, balance="blocks", ema_beta=0.0, capture_loss=False
    )
    opt.zero_grad()
    loss = loss_fn(work)
    f = captured[-1]
    f.retain_grad()
    loss.backward()
    b = f.grad.detach().double()
    opt.step(loss=loss)
    with torch.no_grad():
        loss_fn(work)
    handle.remove()
    delta = (captured[-1] - f).detach().double()
    cos = float(-(delta * b).sum() / (delta.norm() * b.norm()))
    return cos * float(b.norm()) * math.sqrt(f.numel())


def test_output_scale_calibration_on_the_paper_mlp():
    torch.manual_seed(0)
    model = ReLUMLP(input_dim=8, width=32, depth=5, output_dim=1).double()
    g = torch.Generator().manual_seed(3)
    x, y = (
        dense_inputs(16, 8, generator=g, dtype=torch.float64),
        torch.randn(16, 1, generator=g, dtype=torch.float64),
    )

    def loss_fn(m, batch=(x, y)):
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    weights = [p.detach().clone() for p in model.parameters()]
    kappa0 = _kappa_by_hand(model, "blocks.2", loss_fn)
    target = kappa0 / 5  # far from where it starts, so the test fails if the scale is not applied
    result = calibrate_output_scale(model, (x, y), target=target, loss_fn=loss_fn, rtol=0.01, max_iters=6)
    assert result.converged
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # calibration did not train it
    assert get_output_scale(model) == result.scale
    assert _kappa_by_hand(model, "blocks.2", loss_fn) == pytest.approx(target, rel=0.02)


def test_output_scale_on_gpt2_calibrates_and_survives_save_load(tmp_path):
    from transformers import GPT2LMHeadModel

    model = _tiny_gpt2()
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    model.eval()  # dropout off: the logits comparisons below are exact
    batch = _token_batch()
    with torch.no_grad():
        plain = model(**batch).logits
    set_output_scale(model, 2.0)
    with torch.no_grad():
        assert torch.allclose(
            model(**batch).logits, 2.0 * plain, atol=1e-5
        )  # the LM head reads 2 × its input

    def loss_fn(m):
        return m(**batch).loss

    result = calibrate_output_scale(model, batch, target=0.5, rtol=0.01, max_iters=6)
    assert result.converged and result.kappas[0] != pytest.approx(0.5, rel=0.1)
    assert _kappa_by_hand(model, "transformer.h.1", loss_fn) == pytest.approx(0.5, rel=0.02)

    model.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert loaded.config.fsf_output_scale == pytest.approx(result.scale)
    assert set_output_scale(loaded) == pytest.approx(result.scale)  # re-installs the stored scale
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-6)
    with pytest.raises(ValueError, match="> 0"):
        set_output_scale(model, -1.0)
