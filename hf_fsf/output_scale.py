"""The output ("backward") scale: rule S of the FSC (PAPER.md §6, Eq. 7) as a multiplier on the readout's input.

`calibrate_output_scale` measures θ_{L−1} with the probe on a copy of the model and sets a scalar multiplier on
the readout's input (`set_output_scale`) so that κ := ‖b_{L−1}‖_rms · m · cos θ_{L−1} equals a target constant
(default 1). The multiplier is a forward pre-hook (`OutputScale`); for HF models it is also stored in
model.config, so it survives save_pretrained / from_pretrained.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_fsf.distributed import cuda_rng_devices
from hf_fsf.fsc import FSCOptimizer
from hf_fsf.layout import BlocksArg, find_blocks, unwrap_model
from hf_fsf.probe import FeatureSpeedProbe

CONFIG_KEY = "fsf_output_scale"  # model.config attribute that persists the scale through save/load
CONFIG_READOUT_KEY = "fsf_output_readout"


class OutputScale:
    """Forward pre-hook that multiplies the readout's input by `scale` (the FSC output multiplier)."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        if args and isinstance(args[0], torch.Tensor):
            return (args[0] * self.scale, *args[1:])
        return None


def find_readout(model: nn.Module, readout: str | nn.Module | None = None) -> tuple[str, nn.Module]:
    """The module whose input gets the output scale: `readout` if given; else the HF output embeddings (LM head);
    else the module that owns the model's last head parameter (e.g. the final Linear of an MLP)."""
    model = unwrap_model(model)
    named = dict(model.named_modules())
    if isinstance(readout, str):
        if readout not in named:
            raise ValueError(
                f"find_readout: no module named {readout!r} in the model (see model.named_modules())."
            )
        return readout, named[readout]
    if isinstance(readout, nn.Module):
        name = next((n for n, m in named.items() if m is readout), None)
        if name is None:
            raise ValueError("find_readout: the readout module is not part of the model.")
        return name, readout
    get_output = getattr(model, "get_output_embeddings", None)
    module = get_output() if callable(get_output) else None
    if isinstance(module, nn.Module):
        return next(n for n, m in named.items() if m is module), module
    head = find_blocks(model).head_params
    if not head:
        raise ValueError(
            f"find_readout: {type(model).__name__} has no parameters after its blocks, so there is no readout to "
            "scale. Pass readout='<module name>'."
        )
    owner = head[-1][0].rsplit(".", 1)[0] if "." in head[-1][0] else ""
    return owner, named[owner]


def _find_hook(module: nn.Module) -> OutputScale | None:
    return next((h for h in module._forward_pre_hooks.values() if isinstance(h, OutputScale)), None)


def get_output_scale(model: nn.Module, readout: str | nn.Module | None = None) -> float | None:
    """The installed output scale, or None when there is none."""
    hook = _find_hook(find_readout(model, readout)[1])
    return None if hook is None else hook.scale


def set_output_scale(
    model: nn.Module, scale: float | None = None, readout: str | nn.Module | None = None
) -> float:
    """Install (or change) the multiplier on the readout's input; returns it.

    For HF models the scale is also written to model.config (`fsf_output_scale`), so it is saved with the model;
    after `from_pretrained`, call set_output_scale(model) (scale=None) to re-install the stored scale (hooks are
    not saved). Non-HF models keep it on the hook only.
    """
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    if scale is None:
        scale = getattr(config, CONFIG_KEY, None)
        if scale is None:
            raise ValueError(
                "set_output_scale: no scale given and none stored in model.config.fsf_output_scale."
            )
        readout = readout if readout is not None else getattr(config, CONFIG_READOUT_KEY, None)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"set_output_scale: the scale must be a finite number > 0, got {scale}.")
    name, module = find_readout(inner, readout)
    hook = _find_hook(module)
    if hook is None:
        module.register_forward_pre_hook(OutputScale(scale))
    else:
        hook.scale = float(scale)
    if config is not None and hasattr(config, "to_dict"):
        setattr(config, CONFIG_KEY, float(scale))
        setattr(config, CONFIG_READOUT_KEY, name)
    return float(scale)


@dataclass
class OutputScaleCalibration:
    """Result of calibrate_output_scale: the tried scales and the κ measured at each."""

    scale: float  # the calibrated multiplier (installed on the model when apply=True)
    target: float  # the κ aimed at
    scales: list[float]  # scales at which κ was measured, in order
    kappas: list[float]  # κ = ‖b_{L−1}‖_rms · m · cos θ_{L−1} measured at each
    converged: bool  # the last measurement was within rtol of the target


def default_probe_optimizer(model: nn.Module, blocks: BlocksArg = None) -> FSCOptimizer:
    """The calibration's probe step: the paper's setting, one small GD step with balanced per-block rates (exact
    balance, no stabilizers), decreasing the loss by 0.1% to first order."""
    return FSCOptimizer(
        model,
        base=torch.optim.SGD,
        rate=1e-3,
        lr=1e-3,
        blocks=blocks,
        balance="blocks",
        ema_beta=0.0,
        capture_loss=False,
    )


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(
            "calibrate_output_scale: batch is not a dict, so pass loss_fn=lambda model, batch: <loss>."
        )
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ValueError(
            "calibrate_output_scale: the model returned no .loss; put labels in the batch or pass loss_fn."
        )
    return loss


def measure_output_kappa(
    model: nn.Module,
    batch: Any,
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    blocks: BlocksArg = None,
    scale: float | None = None,
    readout: str | nn.Module | None = None,
) -> float:
    """κ = ‖b_{L−1}‖_rms · m · cos θ_{L−1} = cos θ · ‖b‖ · √m = 1/(S_{L−1} · fsf_ratio) of one probe step on a
    copy of the model, with output scale `scale` on the copy if given (the model is not changed; the global RNG
    is restored)."""
    loss_fn = loss_fn or _default_loss
    # Modules of the model are not modules of its copy: refer to blocks and readout by name.
    names = find_blocks(model, blocks).names
    readout = find_readout(model, readout)[0] if scale is not None else None
    with torch.random.fork_rng(devices=cuda_rng_devices(model)):
        work = copy.deepcopy(unwrap_model(model))
        if scale is not None:
            set_output_scale(work, scale, readout)
        optimizer = make_optimizer(work) if make_optimizer else default_probe_optimizer(work, names)

        def step_loss() -> torch.Tensor:
            loss = loss_fn(work, batch)
            if isinstance(optimizer, FSCOptimizer) and torch.is_grad_enabled():
                optimizer.observe_loss(loss)
            return loss

        with FeatureSpeedProbe(work, blocks=names) as probe:
            stats = probe.measure_step(step_loss, optimizer, angle=True)
        if isinstance(optimizer, FSCOptimizer):
            optimizer.close()
    last = stats.blocks[-1]
    if last.sensitivity is None or last.fsf_ratio is None or last.cos_theta is None:
        raise RuntimeError(
            f"calibrate_output_scale: the probe step measured no angle at block {last.name!r}."
        )
    # S·fsf_ratio = (‖δf‖/√m)/(−⟨δf,b⟩) = 1/(cos θ ‖b‖ √m) exactly, whatever the step's non-linearity.
    kappa = 1.0 / (last.sensitivity * last.fsf_ratio)
    if not math.isfinite(kappa) or kappa <= 0 or last.cos_theta <= 0:
        raise RuntimeError(
            f"calibrate_output_scale: cos θ_(L-1) = {last.cos_theta} at block {last.name!r}, so the probe step did "
            "not move the last features against the backward pass; try a smaller probe step (make_optimizer=)."
        )
    return kappa


def _log_slope(scales: list[float], kappas: list[float]) -> float:
    """d log κ / d log α from the last two measurements; 1 (κ ∝ α) when unknown or implausible."""
    if len(scales) < 2 or scales[-1] == scales[-2]:
        return 1.0
    slope = math.log(kappas[-1] / kappas[-2]) / math.log(scales[-1] / scales[-2])
    return slope if math.isfinite(slope) and 0.2 <= slope <= 5.0 else 1.0


def calibrate_output_scale(
    model: nn.Module,
    batch: Any,
    *,
    target: float = 1.0,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    blocks: BlocksArg = None,
    readout: str | nn.Module | None = None,
    max_iters: int = 4,
    rtol: float = 0.02,
    apply: bool = True,
) -> OutputScaleCalibration:
    """Choose the output scale α so that PAPER.md Eq. (7) holds with the constant `target`:

        κ := ‖b_{L−1}‖_rms · m · cos θ_{L−1} = target,   ‖b‖_rms = ‖b‖/√m,  m = entries of f_{L−1} in the batch,

    f_{L−1} being the output of the last block (the readout's input side). κ is 1/S_{L−1} (the inverse
    sensitivity), and by the feature speed formula ‖δf_{L−1}‖_rms = ΔL_{≤L−1} / κ: with target 1 the last
    features move, in rms, by the first-order loss decrease of the parameters upstream of them (the paper's FSC
    point, S ≈ 1). Each iteration measures κ with one probe step (angle=True) on a copy of the model and updates
    α ← α · (target / κ)^(1/p), p = d log κ / d log α: 1 at first (κ ∝ α while the outputs are small), then the
    secant slope of the last two measurements; it stops when |κ/target − 1| ≤ rtol.

    batch: a dict for HF models (loss = model(**batch).loss), else anything `loss_fn(model, batch)` accepts.
    blocks: as for `find_blocks`: None (auto-detect), block names or modules, or a BlockLayout found once.
    make_optimizer(model) builds the probe step's optimizer; it should resemble training (default:
    `default_probe_optimizer`, FSC over SGD, the paper's setting). The model's weights are never changed; with
    apply=True its output scale is set to the result. Memory: one deep copy of the model per iteration.
    """
    if not math.isfinite(target) or target <= 0:
        raise ValueError(f"calibrate_output_scale: target must be a finite number > 0, got {target}.")
    if max_iters < 1:
        raise ValueError(f"calibrate_output_scale: max_iters must be >= 1, got {max_iters}.")
    readout = find_readout(model, readout)[0]
    scale = get_output_scale(model, readout) or 1.0
    result = OutputScaleCalibration(scale, target, [], [], False)
    for _ in range(max_iters):
        kappa = measure_output_kappa(
            model,
            batch,
            loss_fn=loss_fn,
            make_optimizer=make_optimizer,
            blocks=blocks,
            scale=scale,
            readout=readout,
        )
        result.scales.append(scale)
        result.kappas.append(kappa)
        if abs(kappa / target - 1.0) <= rtol:
            result.converged = True
            break
        scale = scale * (target / kappa) ** (1.0 / _log_slope(result.scales, result.kappas))
    result.scale = scale
    if apply:
        set_output_scale(model, scale, readout)
    if not result.converged:
        warnings.warn(
            f"calibrate_output_scale: κ = {result.kappas[-1]:.4g} after {max_iters} iterations (target {target}); "
            "the last scale was not measured. Raise max_iters or rtol.",
            stacklevel=2,
        )
    return result
