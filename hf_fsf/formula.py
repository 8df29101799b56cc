"""The math of PAPER.md §3-§6 on floats and tensors: no hooks, no modules.

Every per-block quantity is derived from a handful of sums that the probe accumulates over micro-batches and
ranks (squared norms and inner products), so the same functions serve one batch, gradient accumulation and
data parallelism alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing; ±inf/nan are kept so invalid steps stay visible."""
    if num is None or den is None:
        return None
    if den == 0.0:
        return math.copysign(math.inf, num) if num != 0.0 else math.nan
    return num / den


@dataclass
class BlockSums:
    """What the probe accumulates for one block over one optimizer step (all micro-batches, all ranks).

    `update_sq` and `update_dot_backward` are None when the step was measured without the angle (no re-forward).
    """

    numel: int  # m_ℓ, entries of f_ℓ over the whole step's batch
    forward_sq: float  # ‖f_ℓ‖²
    backward_sq: float  # ‖b_ℓ‖²
    update_sq: float | None = None  # ‖δf_ℓ‖² (measured, re-forward)
    update_dot_backward: float | None = None  # ⟨δf_ℓ, b_ℓ⟩


def block_fields(sums: BlockSums, contribution: float, loss_decrease: float) -> dict[str, float | None]:
    """The per-block fields of PAPER.md §3 from the accumulated sums.

    contribution: −⟨∇_{w_ℓ} loss, δw_ℓ⟩ of the block's own parameters; loss_decrease: ΔL_{≤ℓ} (stem included).
    """
    forward_norm = math.sqrt(sums.forward_sq)
    backward_norm = math.sqrt(sums.backward_sq)
    # No backward pass reached f_ℓ (everything up to it frozen): angle-type fields are undefined, not NaN.
    no_backward = sums.backward_sq == 0.0
    fields: dict[str, float | None] = {
        "forward_rms": forward_norm / math.sqrt(sums.numel) if sums.numel else None,
        "backward_norm": backward_norm,
        "contribution": contribution,
        "loss_decrease": loss_decrease,
        "aligned_speed": None if no_backward else _ratio(loss_decrease, backward_norm),
        "update_norm": None,
        "relative_speed": None,
        "cos_theta": None,
        "sensitivity": None,
        "fsf_ratio": None,
    }
    if sums.update_sq is not None and sums.update_dot_backward is not None:
        update_norm = math.sqrt(sums.update_sq)
        first_order = -sums.update_dot_backward  # −⟨δf, b⟩, equal to ΔL_{≤ℓ} to first order
        fields["update_norm"] = update_norm
        fields["relative_speed"] = _ratio(update_norm, forward_norm)
        fields["cos_theta"] = _ratio(first_order, update_norm * backward_norm)
        fields["sensitivity"] = (
            _ratio(update_norm / math.sqrt(sums.numel), loss_decrease) if sums.numel else None
        )
        fields["fsf_ratio"] = _ratio(loss_decrease, first_order)
    return fields


# --- the Backward-to-Feature Kernel (PAPER.md §4) on its spectrum ---------------------------------------------


def bfk_moments(eigenvalues: torch.Tensor, p: int) -> float:
    """M_p = (1/m) Σ_i λ_i^p over all m eigenvalues of K_ℓ (zeros included: they are part of the average)."""
    lam = eigenvalues.double().clamp_min(0.0)
    return float((lam**p).mean())


def bfk_cos_prediction(eigenvalues: torch.Tensor) -> float:
    """Large-width prediction cos θ → M₁/√M₂ for b Gaussian and independent of K."""
    return bfk_moments(eigenvalues, 1) / math.sqrt(bfk_moments(eigenvalues, 2))


def bfk_cos_bound(eigenvalues: torch.Tensor, rtol: float = 1e-10) -> float:
    """Worst-case lower bound λ_min/λ_max on cos θ.

    K_ℓ is rank-deficient whenever m_ℓ exceeds the number of parameters upstream; the bound then only applies to b
    in the range of K, so λ_min is taken over eigenvalues above rtol·λ_max.
    """
    lam = eigenvalues.double()
    top = float(lam.max())
    if top <= 0:
        return math.nan
    nonzero = lam[lam > rtol * top]
    return float(nonzero.min()) / top


def bfk_cos(kernel: torch.Tensor, backward: torch.Tensor) -> float:
    """cos θ = ⟨b, K b⟩ / (‖K b‖ ‖b‖), since δf = −K b."""
    b = backward.double().flatten()
    kb = kernel.double() @ b
    return float((b @ kb) / (kb.norm() * b.norm()))


# --- scalings of PAPER.md §6, Table 1 (ReLU MLPs, dense setting ‖x‖ = √d, k outputs) --------------------------


@dataclass(frozen=True)
class Scaling:
    """Init standard deviations and learning rates of the input, hidden and output layers."""

    sigma_in: float
    sigma_hidden: float
    sigma_out: float
    lr_in: float
    lr_hidden: float
    lr_out: float


SCALINGS = ("ntk", "mfmup", "fsc")


def scaling_table(name: str, width: int, depth: int, d_in: int, d_out: int = 1) -> Scaling:
    """Row `name` of the paper's Table 1 for width m, depth L, input dim d and k outputs."""
    m, L, d, k = float(width), float(depth), float(d_in), float(d_out)
    if name == "ntk":
        return Scaling(
            1 / math.sqrt(d), math.sqrt(2 / m), math.sqrt(k / m), 1 / (d * L), 1 / (m * L), k / (m * L)
        )
    if name == "mfmup":
        return Scaling(
            1 / math.sqrt(d), math.sqrt(2 / m), math.sqrt(k) / m, m * L**-1.5 / d, L**-1.5, k * L**-1.5 / m
        )
    if name == "fsc":
        return Scaling(
            1 / math.sqrt(d), math.sqrt(2 / m), math.sqrt(k * L) / m, m / (d * L**2), 1 / L**2, k / (m * L)
        )
    raise ValueError(f"unknown scaling {name!r}: choose one of {SCALINGS}")
