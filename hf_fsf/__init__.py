"""hf_fsf: the Feature Speed Formula (Chizat & Netrapalli, NeurIPS 2024) for PyTorch and Hugging Face."""

import importlib

__version__ = "0.1.0"

# Every name is imported on first use: the core needs only torch, names from callback.py need transformers, and
# `hf-fsf COMMAND --help` (hf_fsf/cli.py) answers without loading either.
_LAZY = {
    "BlockLayout": "hf_fsf.layout",
    "find_blocks": "hf_fsf.layout",
    "BlockStats": "hf_fsf.probe",
    "FeatureSpeedProbe": "hf_fsf.probe",
    "StepStats": "hf_fsf.probe",
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

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:  # `hf_fsf.probe` and the other modules stay reachable as attributes after `import hf_fsf`
        return importlib.import_module(f"hf_fsf.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"hf_fsf.{name}":
            raise
    raise AttributeError(f"module 'hf_fsf' has no attribute {name!r}")
