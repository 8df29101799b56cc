"""The probe against independent float64 computations (PAPER.md §2-§3).

The independent side re-runs the model's `features` method through torch.func with the random state replayed: f_ℓ
and b_ℓ from autograd, δf from a second call with the post-step parameters, and the first-order δf as a
Jacobian-vector product in the direction of the update the optimizer actually applied.
"""

from __future__ import annotations

import copy

import pytest
import torch
from chain_models import make_case
from torch.func import functional_call, jvp

from hf_fsf import FeatureSpeedProbe
from hf_fsf.stats import BLOCK_FIELDS

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=1e-4),
    "momentum": lambda p: torch.optim.SGD(p, lr=1e-4, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-6),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-6, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-6),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-5),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-6),
    "nesterov_wd": lambda p: torch.optim.SGD(p, lr=1e-4, momentum=0.9, nesterov=True, weight_decay=0.01),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-6),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-6),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1e-3),
}
CASES = ["mlp", "resnet", "tied", "dropout", "conv"]


class _Features(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.features(x)


def features_at(model, params, x, rng_state):
    """(output, [f_ℓ]) with the given parameters (names of model.named_parameters(); ties follow)."""
    torch.set_rng_state(rng_state)
    return functional_call(_Features(model), {f"model.{k}": v for k, v in params.items()}, (x,))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def warm_up(model, opt, x, y, steps=2):
    """Plain steps first, so momentum and Adam state are not trivial at the measured step."""
    for _ in range(steps):
        opt.zero_grad()
        model.loss(model(x), y).backward()
        opt.step()


def independent(model, before, after, x, y, rng):
    leaves = {k: v.clone().requires_grad_(True) for k, v in before.items()}
    out, fs = features_at(model, leaves, x, rng)
    loss = model.loss(out, y)
    grads = torch.autograd.grad(loss, [*fs, *leaves.values()])
    bs, param_grads = grads[: len(fs)], dict(zip(leaves, grads[len(fs) :]))
    with torch.no_grad():
        _, fs_after = features_at(model, after, x, rng)
    delta = {k: after[k] - before[k] for k in before}
    _, tangents = jvp(lambda p: tuple(features_at(model, p, x, rng)[1]), (before,), (delta,))
    total = -sum(float((param_grads[k] * delta[k]).sum()) for k in before)
    return {
        "f": [f.detach() for f in fs],
        "b": list(bs),
        "f_after": list(fs_after),
        "jvp": list(tangents),
        "loss": float(loss.detach()),
        "total_decrease": total,
    }


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_probe_matches_independent_computation(case, opt_name):
    model, x, y = make_case(case)
    opt = OPTIMIZERS[opt_name](model.parameters())
    warm_up(model, opt, x, y)
    before, rng = snapshot(model), torch.get_rng_state()
    with FeatureSpeedProbe(model) as probe:
        stats = probe.measure_step(lambda: model.loss(model(x), y), opt, angle=True)
    ref = independent(model, before, snapshot(model), x, y, rng)

    assert stats.valid and stats.angle
    assert len(stats.blocks) == len(ref["f"])
    assert rel(stats.loss, ref["loss"]) < 1e-12
    assert rel(stats.total_loss_decrease, ref["total_decrease"]) < 1e-6
    for block, f, b, f_after, tangent in zip(stats.blocks, ref["f"], ref["b"], ref["f_after"], ref["jvp"]):
        delta = f_after - f
        # ΔL_{≤ℓ} is exactly the first-order change of f_ℓ along the applied update, seen by b_ℓ.
        assert rel(block.loss_decrease, -float((tangent * b).sum())) < 1e-6, block.name
        assert abs(block.fsf_ratio - 1) < 1e-4, (block.name, block.fsf_ratio)
        assert rel(block.forward_rms, float(f.norm()) / f.numel() ** 0.5) < 1e-10
        assert rel(block.backward_norm, float(b.norm())) < 1e-10
        assert rel(block.update_norm, float(delta.norm())) < 1e-8
        cos = -float((delta * b).sum()) / float(delta.norm() * b.norm())
        assert abs(block.cos_theta - cos) < 1e-8
        assert rel(block.relative_speed, float(delta.norm() / f.norm())) < 1e-8
        assert rel(block.sensitivity, float(delta.norm()) / f.numel() ** 0.5 / block.loss_decrease) < 1e-8


def test_cheap_path_matches_angle_path_without_reforward():
    model, x, y = make_case("tied")
    twin = copy.deepcopy(model)
    stats = {}
    for name, m, angle in (("cheap", model, False), ("angle", twin, True)):
        opt = torch.optim.Adam(m.parameters(), lr=1e-5)
        torch.manual_seed(3)
        with FeatureSpeedProbe(m) as probe:
            stats[name] = probe.measure_step(lambda m=m: m.loss(m(x), y), opt, angle=angle)
    cheap, full = stats["cheap"], stats["angle"]
    assert rel(cheap.stem_contribution, full.stem_contribution) < 1e-10
    assert rel(cheap.head_contribution, full.head_contribution) < 1e-10
    for a, b in zip(cheap.blocks, full.blocks):
        assert a.cos_theta is None and a.update_norm is None and b.cos_theta is not None
        for field in ("forward_rms", "backward_norm", "contribution", "loss_decrease", "aligned_speed"):
            assert rel(getattr(a, field), getattr(b, field)) < 1e-10, field
        # aligned speed = ‖δf‖ cos θ, measured with the re-forward on the other side
        assert rel(a.aligned_speed, b.update_norm * b.cos_theta) < 1e-3


@pytest.mark.parametrize("case", ["resnet", "tied"])
def test_gradient_accumulation_equals_one_batch(case):
    model, x, y = make_case(case)
    if case == "tied":
        for block in model.blocks:
            block.drop.p = 0.0  # the same samples must see the same masks in both runs
    twin = copy.deepcopy(model)
    opt_one = torch.optim.AdamW(model.parameters(), lr=1e-5)
    opt_acc = torch.optim.AdamW(twin.parameters(), lr=1e-5)
    with FeatureSpeedProbe(model) as probe:
        one = probe.measure_step(lambda: model.loss(model(x), y), opt_one, angle=True)
    with FeatureSpeedProbe(twin) as probe:
        probe.begin_step(angle=True)
        for xs, ys in zip(x.chunk(4), y.chunk(4)):
            loss = twin.loss(twin(xs), ys) / 4  # the mean over the whole batch, in four parts
            probe.record_loss(loss)
            loss.backward()
        probe.before_optimizer_step()
        opt_acc.step()
        acc = probe.after_optimizer_step()
    assert rel(acc.loss, one.loss) < 1e-12
    assert rel(acc.stem_contribution, one.stem_contribution) < 1e-8
    assert rel(acc.head_contribution, one.head_contribution) < 1e-8
    for a, b in zip(acc.blocks, one.blocks):
        for field in BLOCK_FIELDS:
            assert rel(getattr(a, field), getattr(b, field)) < 1e-8, (a.name, field)


def test_clipped_gradients_count_the_true_gradient_and_the_applied_update():
    model, x, y = make_case("dropout")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.5)
    warm_up(model, opt, x, y)
    before, rng = snapshot(model), torch.get_rng_state()
    with FeatureSpeedProbe(model) as probe:
        opt.zero_grad()
        probe.begin_step(angle=True)
        with probe.micro_batch(replay=lambda: model(x)):
            loss = model.loss(model(x), y)
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3 * float(norm))
        probe.before_optimizer_step()
        opt.step()
        stats = probe.after_optimizer_step()
    ref = independent(model, before, snapshot(model), x, y, rng)
    assert abs(stats.grad_scale - 0.3) < 1e-6
    assert rel(stats.total_loss_decrease, ref["total_decrease"]) < 1e-6
    for block, b, tangent in zip(stats.blocks, ref["b"], ref["jvp"]):
        assert rel(block.loss_decrease, -float((tangent * b).sum())) < 1e-6
        assert abs(block.fsf_ratio - 1) < 1e-4


def test_batchnorm_statistics_untouched_by_the_reforward():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)) for _ in range(3)
    )
    model = _Chain(blocks).double()
    twin = copy.deepcopy(model)
    x = torch.randn(32, 4, dtype=torch.float64)
    for m, angle in ((model, True), (twin, False)):
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        with FeatureSpeedProbe(m) as probe:
            probe.measure_step(lambda m=m: m(x).square().mean(), opt, angle=angle)
    for a, b in zip(model.buffers(), twin.buffers()):
        assert torch.equal(a, b)


class _Chain(torch.nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.inp = torch.nn.Linear(4, 8)
        self.blocks = blocks
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(torch.relu(h))
        return self.out(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_stats(reentrant):
    model, x, y = make_case("resnet")
    twin = copy.deepcopy(model)

    def checkpointed_features(
        x, m=twin
    ):  # as HF does: the block's __call__ (and its hooks) inside checkpoint
        h, feats = m.inp(x), []
        for block in m.blocks:
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=reentrant)
            feats.append(h)
        return m.out(torch.relu(h)), feats

    twin.features = checkpointed_features
    results = []
    for m in (model, twin):
        opt = torch.optim.Adam(m.parameters(), lr=1e-5)
        with FeatureSpeedProbe(m) as probe:
            results.append(probe.measure_step(lambda m=m: m.loss(m(x), y), opt, angle=True))
    plain, checkpointed = results
    for a, b in zip(plain.blocks, checkpointed.blocks):
        for field in ("forward_rms", "backward_norm", "contribution", "update_norm", "cos_theta"):
            assert rel(getattr(b, field), getattr(a, field)) < 1e-10, (field, reentrant)
