"""The backward speed formula (Prop. 6.1 of the paper), measured in discrete time on one optimizer step.

If the part of the network f_v -> f_L (block v's output to the network's output) is positively 1-homogeneous in
f_v (ReLU MLPs and ResNets without biases or normalization), Euler's identity gives ⟨b_v, f_v⟩ = ⟨∇loss(f_L), f_L⟩
for b_v = ∂loss/∂f_v. Differentiating both sides along a step, with ⟨∇loss, ḟ_L⟩ = −(total loss decrease) and
⟨b_v, ḟ_v⟩ = −ΔL_{≤v}:

    −⟨ḃ_v, f_v⟩ = −f_L^T ∇²loss[f_L] ḟ_L + ΔL_{>v},   so   ‖ḃ_v‖ = (−f_L^T ∇²loss ḟ_L + ΔL_{>v}) / (‖f_v‖ cos θ̃_v)

with θ̃_v the angle between f_v and −ḃ_v and ΔL_{>v} the first-order loss decrease due to the parameters downstream
of f_v (Σ_{ℓ>v} η_ℓ‖∇_ℓ loss‖² for GD; −Σ ⟨∇_p loss, δw_p⟩ for any update). For a ReLU MLP with a linear loss
(∇²loss = 0) the paper finds cos θ̃_v = Θ((L − v)^{-1/2}).

Discrete time, as the probe measures the forward formula: δb_v = b_v(w + δw) − b_v(w) from a second forward and
backward at the new parameters on the same inputs (random state replayed), δf_L = f_L(w + δw) − f_L(w). The two
sides agree to first order in the step: `bsf_ratio` = (−f_L^T ∇²loss δf_L + ΔL_{>v}) / (−⟨δb_v, f_v⟩) → 1.
With ReLUs, b is piecewise constant in the gates: a step that switches a gate makes b jump by O(1) in the entries
it gates, a term the continuous-time ḃ does not have, which inflates ‖δb‖ (like √step, not like the step) and moves
bsf_ratio away from 1. `sign_flips` counts, per block, the entries of f_v that changed sign: read cos θ̃_v and
bsf_ratio as first-order quantities where it is 0 (a smaller step makes switches rarer).

This costs a second forward and backward and copies of the features, the backward passes and the parameters, so it
lives here, apart from FeatureSpeedProbe: nothing else pays for it. Hooks exist only inside `measure_step`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_fsf.distributed import cuda_rng_devices
from hf_fsf.layout import HEAD, STEM, BlockLayout, BlocksArg, block_output, find_blocks, unwrap_model

# --- the math, on floats ----------------------------------------------------------------------------------------


def cos_backward_angle(
    backward_update_dot_forward: float, backward_update_norm: float, forward_norm: float
) -> float:
    """cos θ̃_v = −⟨δb_v, f_v⟩ / (‖δb_v‖ ‖f_v‖): the angle between f_v and −δb_v (nan when nothing moved)."""
    den = backward_update_norm * forward_norm
    return -backward_update_dot_forward / den if den > 0 else math.nan


def backward_speed(
    curvature_term: float, downstream_decrease: float, forward_norm: float, cos_theta: float
) -> float:
    """The backward speed formula: ‖δb_v‖ = (−f_L^T ∇²loss δf_L + ΔL_{>v}) / (‖f_v‖ cos θ̃_v)."""
    return (curvature_term + downstream_decrease) / (forward_norm * cos_theta)


def bsf_ratio(curvature_term: float, downstream_decrease: float, backward_update_dot_forward: float) -> float:
    """(−f_L^T ∇²loss δf_L + ΔL_{>v}) / (−⟨δb_v, f_v⟩): 1 to first order in the step."""
    den = -backward_update_dot_forward
    num = curvature_term + downstream_decrease
    return num / den if den != 0 else (math.copysign(math.inf, num) if num != 0 else math.nan)


# --- records --------------------------------------------------------------------------------------------------


@dataclass
class BackwardBlockStats:
    """Block v, one step. Norms are over the whole batch, flattened; dot products in float64."""

    name: str
    forward_norm: float  # ‖f_v‖ before the step
    backward_norm: float  # ‖b_v‖ before the step
    update_norm: float  # ‖δf_v‖ (free: the second forward runs at the new parameters)
    sign_flips: int  # entries of f_v whose sign changed: where a ReLU reading f_v switched, b jumps by O(1)
    backward_update_norm: float  # ‖δb_v‖
    relative_backward_speed: float  # ‖δb_v‖ / ‖b_v‖
    cos_theta_backward: float  # cos θ̃_v
    contribution: float  # −⟨∇_{w_v} loss, δw_v⟩ of the block's own parameters
    downstream_decrease: float  # ΔL_{>v}: blocks after v and the head
    euler_gap: float  # |⟨b_v, f_v⟩ − ⟨∇loss, f_L⟩| / (‖b_v‖ ‖f_v‖): 0 for a 1-homogeneous f_v -> f_L
    homogeneous: bool  # euler_gap within the tolerance: the hypothesis of Prop. 6.1 holds
    bsf_ratio: float | None  # None where f_v -> f_L is not homogeneous (the formula does not apply)


@dataclass
class BackwardStepStats:
    loss: float  # before the step
    loss_after: float  # at the new parameters, same inputs (the second forward)
    curvature_term: float  # −f_L^T ∇²loss[f_L] δf_L (0 for a linear loss)
    stem_contribution: float
    head_contribution: float
    blocks: list[BackwardBlockStats] = field(default_factory=list)

    @property
    def total_decrease(self) -> float:
        """First-order loss decrease of the step: stem + blocks + head contributions."""
        return self.stem_contribution + self.head_contribution + sum(b.contribution for b in self.blocks)


# --- the measurement ------------------------------------------------------------------------------------------


@dataclass
class _Pass:
    """One forward + backward: the output, the loss, and per block f_v and b_v (detached, float64)."""

    output: torch.Tensor
    loss: torch.Tensor
    features: list[torch.Tensor]
    backwards: list[torch.Tensor]
    dtype: torch.dtype  # the features' own dtype: its precision sets the homogeneity tolerance


class BackwardSpeedProbe:
    """Measures the backward speed formula per block on one optimizer step (`measure_step`).

    model / blocks: as for FeatureSpeedProbe (a BlockLayout is taken as it is). The parameters must split into
    upstream and downstream of every block: a parameter tied between the stem and the head is an error.
    homogeneity_rtol: largest relative Euler gap for which f_v -> f_L counts as 1-homogeneous (None: √eps of the
    features' dtype); beyond it the block's bsf_ratio is None and a warning names the cause.
    """

    def __init__(self, model: nn.Module, blocks: BlocksArg = None, *, homogeneity_rtol: float | None = None):
        self.model = unwrap_model(model)
        self.layout: BlockLayout = find_blocks(self.model, blocks)
        tied = [t.stem_name for t in self.layout.tied if t.param.requires_grad]
        if tied:
            raise ValueError(
                f"BackwardSpeedProbe: {tied} are tied between the stem and the head, so they sit upstream and "
                "downstream of every block and ΔL_{>v} is not defined by parameter ownership. Untie them or freeze "
                "them (requires_grad_(False))."
            )
        self.homogeneity_rtol = homogeneity_rtol
        self._groups = self.layout.parameter_groups()
        self._cuda_devices = cuda_rng_devices(self.model)

    def measure_step(
        self,
        forward: Callable[[], torch.Tensor],
        loss_of_output: Callable[[torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
    ) -> BackwardStepStats:
        """Zero-grad, forward() -> f_L, loss_of_output(f_L) -> loss, backward, optimizer.step(), then a second
        forward and backward at the new parameters. forward() is called twice and must read the same inputs."""
        self.model.zero_grad(set_to_none=True)
        optimizer.zero_grad(set_to_none=True)
        rng = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self._cuda_devices]
        before = self._pass(forward, loss_of_output, rng=None, params=True)
        params = [
            (g, p) for g, ps in self._groups.items() for p in ps if p.requires_grad and p.grad is not None
        ]
        old = [(p.detach().clone(), p.grad.detach().clone()) for _, p in params]
        optimizer.step()
        contributions: dict[str, float] = dict.fromkeys(self._groups, 0.0)
        with torch.no_grad():
            for (group, p), (w, g) in zip(params, old):
                contributions[group] -= float((g.double() * (p.detach().double() - w.double())).sum())
        after = self._pass(forward, loss_of_output, rng=rng, params=False)
        return self._stats(before, after, contributions, loss_of_output)

    def _pass(self, forward, loss_of_output, rng, params: bool) -> _Pass:
        """forward + loss + backward with each block's output captured; rng: replay this random state (dropout).
        params=True back-propagates into the parameters' .grad (the training step); False touches no .grad."""
        captured: dict[int, torch.Tensor] = {}

        def hook(index: int):
            def keep(module, args, output):
                captured.setdefault(index, block_output(output))

            return keep

        handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(self.layout.blocks)]
        try:
            with contextlib.ExitStack() as stack:
                if rng is not None:
                    stack.enter_context(torch.random.fork_rng(devices=self._cuda_devices))
                    torch.set_rng_state(rng[0])
                    for device, state in zip(self._cuda_devices, rng[1]):
                        torch.cuda.set_rng_state(state, device)
                output = forward()
        finally:
            for h in handles:
                h.remove()
        loss = loss_of_output(output)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                "BackwardSpeedProbe: loss_of_output must return a scalar tensor; reduce it (.mean())."
            )
        features = [captured.get(i) for i in range(len(self.layout.blocks))]
        missing = [self.layout.names[i] for i, f in enumerate(features) if f is None or not f.requires_grad]
        if missing:
            raise ValueError(
                f"BackwardSpeedProbe: blocks {missing} did not run or their output does not require grad (everything "
                "up to them frozen): b_v is undefined there. Pass only blocks the loss back-propagates through."
            )
        backwards = torch.autograd.grad(loss, features, retain_graph=params)
        if params:
            loss.backward()
        return _Pass(
            output.detach().double(),
            loss.detach(),
            [f.detach().double() for f in features],
            [b.detach().double() for b in backwards],
            features[0].dtype if features else output.dtype,
        )

    def _stats(
        self, before: _Pass, after: _Pass, contributions: dict[str, float], loss_of_output
    ) -> BackwardStepStats:
        grad_out, hess_delta = _output_derivatives(
            loss_of_output, before.output, after.output - before.output
        )
        curvature = -float((before.output * hess_delta).sum())
        euler_output = float((grad_out * before.output).sum())  # ⟨∇loss, f_L⟩
        rtol = self.homogeneity_rtol
        if rtol is None:
            rtol = math.sqrt(torch.finfo(before.dtype).eps)
        names = self.layout.names
        stats = BackwardStepStats(
            loss=float(before.loss),
            loss_after=float(after.loss),
            curvature_term=curvature,
            stem_contribution=contributions[STEM],
            head_contribution=contributions[HEAD],
        )
        inhomogeneous = []
        for v, name in enumerate(names):
            f, b = before.features[v], before.backwards[v]
            db, df = after.backwards[v] - b, after.features[v] - f
            f_norm, b_norm, db_norm = float(f.norm()), float(b.norm()), float(db.norm())
            dot = float((db * f).sum())
            downstream = sum(contributions[n] for n in names[v + 1 :]) + contributions[HEAD]
            gap = abs(float((b * f).sum()) - euler_output) / max(
                b_norm * f_norm, torch.finfo(torch.float64).tiny
            )
            homogeneous = gap <= rtol
            if not homogeneous:
                inhomogeneous.append(name)
            stats.blocks.append(
                BackwardBlockStats(
                    name=name,
                    forward_norm=f_norm,
                    backward_norm=b_norm,
                    update_norm=float(df.norm()),
                    sign_flips=int(((f > 0) != (after.features[v] > 0)).sum()),
                    backward_update_norm=db_norm,
                    relative_backward_speed=db_norm / b_norm if b_norm > 0 else math.nan,
                    cos_theta_backward=cos_backward_angle(dot, db_norm, f_norm),
                    contribution=contributions[name],
                    downstream_decrease=downstream,
                    euler_gap=gap,
                    homogeneous=homogeneous,
                    bsf_ratio=bsf_ratio(curvature, downstream, dot) if homogeneous else None,
                )
            )
        if inhomogeneous:
            warnings.warn(
                f"BackwardSpeedProbe: f_v -> output is not positively 1-homogeneous for {inhomogeneous[:3]}"
                f"{' ...' if len(inhomogeneous) > 3 else ''} (⟨b_v, f_v⟩ ≠ ⟨∇loss, f_L⟩: biases, normalization or "
                "a non-homogeneous activation downstream), so Prop. 6.1 does not apply: bsf_ratio is None there. "
                "Remove biases / normalization downstream of those blocks, or read cos_theta_backward only.",
                stacklevel=3,
            )
        return stats


def _output_derivatives(
    loss_of_output: Callable[[torch.Tensor], torch.Tensor], output: torch.Tensor, delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """∇loss(f_L) and ∇²loss(f_L) δf_L (a Hessian-vector product by double backward; zeros for a linear loss)."""
    x = output.clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss_of_output(x), x, create_graph=True)
        if not grad.requires_grad:  # the gradient does not depend on f_L: ∇²loss = 0
            return grad.detach(), torch.zeros_like(x)
        (hv,) = torch.autograd.grad(grad, x, grad_outputs=delta, allow_unused=True)
    return grad.detach(), torch.zeros_like(x) if hv is None else hv.detach()
