"""FSCOptimizer with its defaults: balance over windows of steps, the measured stem:head split, invariance to each
group's base step size, the divergence guard (trust_region), the zero-initialised readout, and a hook that does not
outlive the optimizer (float64 where exact)."""

import gc
import math
import warnings

import pytest
import torch
from torch import nn

from hf_fsf.fsc import FSCOptimizer

DEPTH = 6


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(torch.tanh(self.fc1(self.norm(h)))) / math.sqrt(DEPTH)


class _ResidualMLP(nn.Module):
    """A 6-block pre-norm residual MLP regression network (not one of the library's models)."""

    def __init__(self, d: int = 5, width: int = 16, out: int = 2):
        super().__init__()
        self.embed = nn.Linear(d, width)
        self.layers = nn.ModuleList(_Block(width) for _ in range(DEPTH))
        self.out = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.layers:
            h = block(h)
        return self.out(h)


def _groups(model: _ResidualMLP) -> dict[str, list[nn.Parameter]]:
    groups = {"stem": list(model.embed.parameters())}
    groups.update({f"layers.{i}": list(b.parameters()) for i, b in enumerate(model.layers)})
    groups["head"] = list(model.out.parameters())
    return groups


def _regression(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 2, generator=g, dtype=torch.float64)
    return x, torch.sin(x @ w) + 0.1 * x[:, :2] ** 2


def _train(model, opt, x, y, steps: int) -> tuple[list[float], list[dict[str, float]]]:
    """Full-batch steps; each group's applied first-order decrease −⟨∇L, Δw⟩ recomputed from the parameters."""
    groups = _groups(model)
    losses, contributions = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        before = {n: [p.detach().clone() for p in ps] for n, ps in groups.items()}
        grads = {n: [p.grad.clone() for p in ps] for n, ps in groups.items()}
        opt.step(loss=loss)
        losses.append(loss.item())
        contributions.append(
            {
                n: -sum(float((g * (p.detach() - b)).sum()) for p, b, g in zip(ps, before[n], grads[n]))
                for n, ps in groups.items()
            }
        )
    return losses, contributions


BASES = {
    "momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3}),
}


@pytest.mark.parametrize("base", list(BASES))
def test_every_window_of_20_steps_keeps_the_shares_with_the_defaults(base):
    cls, kwargs = BASES[base]
    torch.manual_seed(0)
    model = _ResidualMLP().double()
    opt = FSCOptimizer(model, base=cls, **kwargs)  # every FSC default
    losses, contributions = _train(model, opt, *_regression(), steps=60)
    # The documented default: ends : trunk = 2 : 1, the trunk split equally over its 6 blocks, the ends split as
    # the base split stem and head over the 20 calibration steps; every window of steps 20-60 keeps those shares.
    shares = opt.group_shares
    trunk = [n for n in shares if n not in ("stem", "head")]
    assert sum(shares[n] for n in trunk) == pytest.approx(1 / 3) and len({shares[n] for n in trunk}) == 1
    assert shares["stem"] + shares["head"] == pytest.approx(2 / 3) and shares["stem"] != pytest.approx(1 / 3)
    worst = 1.0
    for start in range(20, 60 - 20 + 1):
        window = {n: sum(c[n] for c in contributions[start : start + 20]) for n in shares}
        total = sum(window.values())
        for n, share in shares.items():
            ratio = window[n] / total / share
            worst = max(worst, ratio, 1 / ratio)
    assert worst <= 1.2
    assert losses[-1] < 0.8 * losses[0]


def test_the_ends_split_is_the_bases_own_split_over_the_calibration_steps():
    torch.manual_seed(0)
    model = _ResidualMLP().double()
    opt = FSCOptimizer(model, base=torch.optim.AdamW, lr=1e-3, calibration_steps=5)
    x, y = _regression()
    units = {"stem": 0.0, "head": 0.0}
    for step in range(1, 8):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss)
        if step <= 5:
            for name in units:
                units[name] += max(opt.last_step.groups[name].unit_contribution, 0.0)
            if step < 5:
                assert opt.group_shares["stem"] == pytest.approx(1 / 3)  # equal ends until calibrated
    shares = opt.group_shares
    assert shares["stem"] / shares["head"] == pytest.approx(units["stem"] / units["head"], rel=1e-9)
    assert shares["stem"] + shares["head"] == pytest.approx(2 / 3)
    # calibration_steps=0: the shares stay 1 : n0 : 1.
    fixed = FSCOptimizer(_ResidualMLP().double(), calibration_steps=0)
    assert fixed.group_shares["stem"] == pytest.approx(1 / 3) == fixed.group_shares["head"]


def _rescaled_run(factors: dict[str, float], **settings) -> list[torch.Tensor]:
    """Parameters after 8 mini-batch steps when group g's base step is multiplied by factors[g]."""
    torch.manual_seed(0)
    model = _ResidualMLP().double()
    base_lr = 1e-3
    groups = [{"params": ps, "lr": base_lr * factors.get(n, 1.0)} for n, ps in _groups(model).items()]
    opt = FSCOptimizer(groups, model=model, base=torch.optim.AdamW, **settings)
    x, y = _regression()
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        idx = torch.randint(0, len(x), (32,), generator=g)
        opt.zero_grad()
        loss = ((model(x[idx]) - y[idx]) ** 2).mean()
        loss.backward()
        opt.step(loss=loss)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("settings", [{}, {"ema_beta": 0.0}], ids=["defaults", "exact"])
def test_rescaling_a_groups_base_step_changes_nothing(settings):
    """PAPER.md Prop. 6.2's invariance: FSC's step does not depend on the size of each group's base step."""
    reference = _rescaled_run({}, **settings)
    rescaled = _rescaled_run({"stem": 7.0, "layers.2": 0.05, "head": 3.0}, **settings)
    for a, b in zip(reference, rescaled):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


# -- the divergence guard (trust_region) ---------------------------------------------------------------------


def _linear_regression_run(rate: float, trust_region: bool, steps: int = 30):
    """SGD on a least-squares problem (a deep linear network) at a rate whose first-order target overshoots."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    y = x @ torch.randn(8, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 1)).double()
    opt = FSCOptimizer(model, base=torch.optim.SGD, rate=rate, lr=0.01, trust_region=trust_region)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step(loss=loss)
            losses.append(loss.item())
    return losses, [str(w.message) for w in caught], opt


def test_the_trust_region_backs_off_a_rising_loss_and_says_so():
    unguarded, _, _ = _linear_regression_run(5.0, trust_region=False)
    assert not unguarded[-1] < unguarded[0]  # the case: without the trust region this rate diverges
    losses, messages, opt = _linear_regression_run(5.0, trust_region=True, steps=60)
    assert all(math.isfinite(v) for v in losses)
    assert max(losses) < 10 * losses[0] and losses[-1] < 0.5 * losses[0]
    assert sum("backing off" in m for m in messages) == 1  # warned once
    assert opt.last_step.trust == opt.trust.factor


def test_the_trust_region_leaves_a_good_rate_alone():
    unguarded, _, _ = _linear_regression_run(0.2, trust_region=False)
    losses, messages, opt = _linear_regression_run(0.2, trust_region=True)
    assert losses == unguarded and not any("backing off" in m for m in messages)
    assert opt.trust.factor == 1.0


def _tiny_gpt2_run(rate: float, steps: int) -> tuple[list[float], list[float], bool]:
    """A tiny GPT-2 on mini-batches of bytes with every FSC default: (losses, trust factors, warned)."""
    from hf_fsf.data import stdlib_corpus
    from hf_fsf.models import small_gpt2

    train, _ = stdlib_corpus(max_bytes=100_000)
    ids = torch.frombuffer(bytearray(train), dtype=torch.uint8).long()
    model = small_gpt2(2, 32, block_size=16, seed=0)
    opt = FSCOptimizer(model, rate=rate)
    g = torch.Generator().manual_seed(0)
    losses, trust = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - 17, (8,), generator=g)
            batch = torch.stack([ids[s : s + 16] for s in starts])
            opt.zero_grad()
            model(
                input_ids=batch, labels=batch
            ).loss.backward()  # the loss reaches FSC through the model's output
            opt.step()
            losses.append(opt.last_step.loss)
            trust.append(opt.last_step.trust)
    return losses, trust, any("backing off" in str(w.message) for w in caught)


def test_a_tiny_gpt2_at_rate_one_does_not_diverge_silently():
    losses, trust, warned = _tiny_gpt2_run(1.0, steps=30)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0]  # back below the initial loss
    if max(losses) > 1.2 * losses[0]:  # a rise is allowed only when FSC said so and backed off
        assert warned and min(trust) < 0.5


def test_the_trust_region_leaves_noisy_healthy_training_alone():
    """Mini-batch noise at a good rate: the guard never backs off (the former trust region stalled such runs)."""
    losses, trust, warned = _tiny_gpt2_run(0.05, steps=60)
    assert not warned and set(trust) == {1.0}
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]


# -- zero-initialised readout, hook lifetime --------------------------------------------------------------------


def test_zero_init_head_gives_the_head_its_share_on_the_first_step():
    torch.manual_seed(0)
    model = _ResidualMLP().double()
    opt = FSCOptimizer(model, base=torch.optim.AdamW, rate=0.05, lr=1e-3, zero_init_head=True)
    assert torch.count_nonzero(model.out.weight) == 0
    x, y = _regression()
    losses, contributions = _train(model, opt, x, y, steps=2)
    first = contributions[0]
    assert first["head"] == pytest.approx(0.05 * losses[0] / 3, rel=1e-6)  # the head's own share, 1/(1+2)
    assert all(first[n] == 0.0 for n in first if n != "head")  # nothing upstream has a gradient yet
    assert all(contributions[1][n] > 0 for n in first)  # the readout moved: every group learns from step 2


def test_zero_init_head_refuses_a_readout_tied_to_the_input():
    from hf_fsf.models import small_gpt2

    with pytest.raises(ValueError, match="tied to the input embedding"):
        FSCOptimizer(small_gpt2(2, 32, vocab_size=64, block_size=16, seed=0), zero_init_head=True)


def test_a_dropped_optimizer_leaves_no_hook_on_the_model():
    model = _ResidualMLP()
    opt = FSCOptimizer(model)
    assert len(model._forward_hooks) == 1
    del opt
    gc.collect()
    assert len(model._forward_hooks) == 0
    closed = FSCOptimizer(model)
    closed.close()
    assert len(model._forward_hooks) == 0


def test_measure_step_hands_its_loss_to_fsc():
    """probe.measure_step(loss_fn, fsc) on a model without `.loss`: FSC targets rate × the loss the probe computed."""
    from hf_fsf import FeatureSpeedProbe

    torch.manual_seed(0)
    model = _ResidualMLP().double()
    x, y = _regression()
    opt = FSCOptimizer(model, base=torch.optim.AdamW, rate=0.05, lr=1e-3, ema_beta=0.0)
    with FeatureSpeedProbe(model) as probe:
        for _ in range(2):
            stats = probe.measure_step(lambda: ((model(x) - y) ** 2).mean(), opt, angle=False)
            assert opt.last_step.loss == pytest.approx(stats.loss, rel=1e-12)
            assert opt.last_step.target == pytest.approx(0.05 * stats.loss, rel=1e-9)
