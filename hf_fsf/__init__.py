"""hf_fsf: the Feature Speed Formula (Chizat & Netrapalli, NeurIPS 2024) for PyTorch and Hugging Face."""

import importlib

from hf_fsf.layout import BlockLayout, find_blocks
from hf_fsf.probe import BlockStats, FeatureSpeedProbe, StepStats

__version__ = "0.1.0"

# Names that need transformers (or are heavier) are imported on first use, so the core needs only torch.
_LAZY = {
    "FeatureSpeedCallback": "hf_fsf.callback",
    "apply_branch_scaling": "hf_fsf.residual",
    "get_branch_scaling": "hf_fsf.residual",
    "BranchScaling": "hf_fsf.residual",
    "FSCOptimizer": "hf_fsf.fsc",
    "FSCOptimizerFactory": "hf_fsf.fsc",
    "calibrate_output_scale": "hf_fsf.output_scale",
    "set_output_scale": "hf_fsf.output_scale",
    "get_output_scale": "hf_fsf.output_scale",
}

__all__ = ["BlockLayout", "BlockStats", "FeatureSpeedProbe", "StepStats", "find_blocks", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_fsf' has no attribute {name!r}")
