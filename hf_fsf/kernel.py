"""The Backward-to-Feature Kernel (PAPER.md §4) of a small model on a small batch, from exact Jacobians.

For plain gradient descent with a learning rate η_p per parameter, one step moves the features of block ℓ by

    δf_ℓ = −K_ℓ b_ℓ  (to first order),   K_ℓ = Σ_p η_p (∂f_ℓ/∂w_p)(∂f_ℓ/∂w_p)ᵀ,

where p runs over the trainable parameters upstream of f_ℓ and b_ℓ = ∂loss/∂f_ℓ. K_ℓ is m_ℓ × m_ℓ (m_ℓ = entries of
f_ℓ over the batch), so this module is for small models and batches: it is the reference against which the
probe's measured angle is checked, and the source of the spectral predictions of the angle.

Rank deficiency. K_ℓ has rank at most the number of upstream parameters, and its range can miss whole
directions of f_ℓ (e.g. features that pass through a dead ReLU). Only the part of b_ℓ in the range of K_ℓ
moves the features, so:

- the worst-case bound is taken on the range: with P the projector on range(K) and λ⁺_min the smallest
  nonzero eigenvalue, cos θ ≥ (λ⁺_min / λ_max) · ‖P b‖ / ‖b‖ (`lower_bound`). When K is full rank this is the
  paper's λ_min/λ_max; when it is not, λ_min = 0 would give the empty bound 0.
- the large-width prediction M₁/√M₂ averages over all m_ℓ eigenvalues, zeros included, which is what an
  isotropic b (spread over all m_ℓ directions) sees.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from hf_fsf.formula import bfk_cos, bfk_cos_bound, bfk_cos_prediction
from hf_fsf.layout import BlocksArg, block_output, find_blocks

MAX_KERNEL_SIZE = 8192  # m_ℓ above this makes the m×m kernel and its eigen-decomposition impractical


@dataclass
class BlockKernel:
    """K_ℓ, b_ℓ and f_ℓ of one block (flattened over the batch, float64)."""

    name: str
    kernel: torch.Tensor  # (m_ℓ, m_ℓ)
    backward: torch.Tensor  # b_ℓ, (m_ℓ,)
    output: torch.Tensor  # f_ℓ, (m_ℓ,)


@dataclass
class KernelStats:
    """Spectral summary of K_ℓ and the angles it predicts (cos_theta_measured from the probe, when run)."""

    name: str
    numel: int  # m_ℓ
    rank: int  # eigenvalues above rtol · λ_max
    lambda_max: float
    lambda_min_nonzero: float
    condition_bound: float  # λ⁺_min / λ_max
    range_fraction: float  # ‖P b‖ / ‖b‖, P = projector on range(K)
    lower_bound: float  # condition_bound · range_fraction ≤ cos θ
    moment_prediction: float  # M₁/√M₂
    cos_theta_kernel: float  # ⟨b, K b⟩ / (‖K b‖ ‖b‖)
    cos_theta_measured: float | None = None


def _learning_rates(
    model: nn.Module, learning_rates: torch.optim.Optimizer | Mapping[str, float] | float
) -> dict[int, tuple[nn.Parameter, float]]:
    """{id(param): (param, η)} for the trainable parameters with a nonzero rate."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(learning_rates, torch.optim.Optimizer):
        rates = {}
        for group in learning_rates.param_groups:
            for p in group["params"]:
                rates[id(p)] = float(group["lr"])
        out = {id(p): (p, rates[id(p)]) for _, p in trainable if id(p) in rates}
    elif isinstance(learning_rates, Mapping):
        names = {n for n, _ in trainable}
        unknown = sorted(set(learning_rates) - names)
        if unknown:
            raise ValueError(f"learning_rates names {unknown[:3]} are not trainable parameters of the model.")
        out = {id(p): (p, float(learning_rates[n])) for n, p in trainable if n in learning_rates}
    elif isinstance(learning_rates, (int, float)):
        out = {id(p): (p, float(learning_rates)) for _, p in trainable}
    else:
        raise TypeError("learning_rates must be an optimizer, a {parameter name: lr} mapping or a float.")
    out = {k: v for k, v in out.items() if v[1] != 0.0}
    if not out:
        raise ValueError("No trainable parameter has a nonzero learning rate: the kernel would be zero.")
    return out


def _jacobian(output: torch.Tensor, param: nn.Parameter) -> torch.Tensor | None:
    """∂output/∂param as an (output.numel(), param.numel()) matrix, or None if output does not depend on it."""
    m = output.numel()
    eye = torch.eye(m, dtype=output.dtype, device=output.device).view(m, *output.shape)
    try:
        (jac,) = torch.autograd.grad(
            output, param, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
        )
    except RuntimeError:  # an op without a batching rule: one backward per entry
        rows = []
        for i in range(m):
            (row,) = torch.autograd.grad(
                output, param, grad_outputs=eye[i], retain_graph=True, allow_unused=True
            )
            if row is None:
                return None
            rows.append(row.reshape(-1))
        return torch.stack(rows)
    return None if jac is None else jac.reshape(m, -1)


def backward_feature_kernel(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    learning_rates: torch.optim.Optimizer | Mapping[str, float] | float,
    blocks: BlocksArg = None,
) -> list[BlockKernel]:
    """K_ℓ, b_ℓ and f_ℓ for each block, at the current parameters (the model is not changed).

    loss_fn() runs a forward pass and returns the scalar loss, as for `FeatureSpeedProbe.measure_step`.
    learning_rates: the optimizer whose group lrs are the η_p (parameters outside it do not move), a
    {parameter name: lr} mapping, or one lr for every trainable parameter. blocks: as for `find_blocks` (names,
    modules, or a BlockLayout found once).
    Use a float64 model for exactness checks. Memory: m_ℓ × (largest parameter) per Jacobian.
    """
    layout = find_blocks(model, blocks)
    rates = _learning_rates(model, learning_rates)
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in layout.blocks:

        def hook(_module, _args, output, name=name):
            f = block_output(output)
            if f is not None:
                captured[name] = f

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            loss = loss_fn()
    finally:
        for h in hooks:
            h.remove()
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn() must return a scalar tensor (the loss that would be back-propagated).")
    result = []
    for name, _ in layout.blocks:
        if name not in captured:
            raise RuntimeError(
                f"block {name!r} did not return a tensor during loss_fn(); is it used in forward?"
            )
        f = captured[name]
        if f.numel() > MAX_KERNEL_SIZE:
            raise ValueError(
                f"block {name!r} has m = {f.numel()} feature entries; the {f.numel()}² kernel is too large. "
                "Use a smaller batch or width (this module is for small models)."
            )
        (b,) = torch.autograd.grad(loss, f, retain_graph=True)
        kernel = torch.zeros(f.numel(), f.numel(), dtype=torch.float64, device=f.device)
        for param, eta in rates.values():
            jac = _jacobian(f, param)
            if jac is not None:
                jac = jac.double()
                kernel += eta * (jac @ jac.T)
        result.append(BlockKernel(name, kernel, b.detach().double().flatten(), f.detach().double().flatten()))
    return result


def kernel_stats(block: BlockKernel, rtol: float = 1e-10) -> KernelStats:
    """Spectrum of K_ℓ, the range-restricted bound, M₁/√M₂ and the angle ⟨b, K b⟩ / (‖K b‖ ‖b‖)."""
    kernel = (block.kernel + block.kernel.T) / 2  # symmetric up to rounding
    eigenvalues, vectors = torch.linalg.eigh(kernel)
    top = float(eigenvalues.max())
    in_range = eigenvalues > rtol * top
    b = block.backward
    projected = vectors[:, in_range].T @ b
    b_norm = float(b.norm())
    range_fraction = float(projected.norm()) / b_norm if b_norm > 0 else math.nan
    condition = bfk_cos_bound(eigenvalues, rtol=rtol)
    return KernelStats(
        name=block.name,
        numel=b.numel(),
        rank=int(in_range.sum()),
        lambda_max=top,
        lambda_min_nonzero=float(eigenvalues[in_range].min()) if top > 0 else math.nan,
        condition_bound=condition,
        range_fraction=range_fraction,
        lower_bound=condition * range_fraction,
        moment_prediction=bfk_cos_prediction(eigenvalues),
        cos_theta_kernel=bfk_cos(kernel, b),
    )


def compare_with_probe(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    optimizer: torch.optim.SGD,
    blocks: BlocksArg = None,
) -> list[KernelStats]:
    """Kernel predictions next to the angle the probe measures on one real step. Takes the step.

    The kernel describes plain gradient descent, so the optimizer must be `torch.optim.SGD` without momentum
    or weight decay; each group's lr is the η of its parameters. blocks: as for `find_blocks` (names, modules,
    or a BlockLayout); the layout is found once and passed to the kernel and the probe.
    """
    # Imported here: the probe is only needed for the side-by-side comparison.
    from hf_fsf.probe import FeatureSpeedProbe

    if not isinstance(optimizer, torch.optim.SGD) or any(
        g.get("momentum", 0) or g.get("weight_decay", 0) for g in optimizer.param_groups
    ):
        raise ValueError(
            "compare_with_probe: K_ℓ describes plain gradient descent; pass torch.optim.SGD with momentum=0 and "
            "weight_decay=0 (use backward_feature_kernel + kernel_stats alone for other optimizers)."
        )
    layout = find_blocks(model, blocks)
    stats = [kernel_stats(k) for k in backward_feature_kernel(model, loss_fn, optimizer, layout)]
    with FeatureSpeedProbe(model, blocks=layout) as probe:
        measured = probe.measure_step(loss_fn, optimizer, angle=True)
    by_name = {b.name: b.cos_theta for b in measured.blocks}
    for s in stats:
        s.cos_theta_measured = by_name.get(s.name)
    return stats
