"""The FSC rules as things you can train with (a re-export: the code lives in one file per concept).

- `hf_fsf.fsc`: FSCOptimizer, the per-block step sizes of rule C (contributions, PAPER.md §6 Eq. 8).
- `hf_fsf.step_loss`: where FSCOptimizer's step loss comes from (closure, step(loss=), the forward hook, the
  Trainer's loss shares, data parallelism).
- `hf_fsf.output_scale`: the output multiplier of rule S (sensitivities, Eq. 7) and its calibration.

Every name of the FSC API that user code imports from `hf_fsf.control` is importable from here.
"""

from hf_fsf.fsc import BALANCES, TIED_GROUP, FSCOptimizer, FSCOptimizerFactory, FSCStepRecord, GroupStep
from hf_fsf.layout import HEAD, STEM
from hf_fsf.output_scale import (
    CONFIG_KEY,
    CONFIG_READOUT_KEY,
    OutputScale,
    OutputScaleCalibration,
    calibrate_output_scale,
    default_probe_optimizer,
    find_readout,
    get_output_scale,
    measure_output_kappa,
    set_output_scale,
)

__all__ = [
    "BALANCES",
    "CONFIG_KEY",
    "CONFIG_READOUT_KEY",
    "HEAD",
    "STEM",
    "TIED_GROUP",
    "FSCOptimizer",
    "FSCOptimizerFactory",
    "FSCStepRecord",
    "GroupStep",
    "OutputScale",
    "OutputScaleCalibration",
    "calibrate_output_scale",
    "default_probe_optimizer",
    "find_readout",
    "get_output_scale",
    "measure_output_kappa",
    "set_output_scale",
]
