"""hf_fsf: the Feature Speed Formula (Chizat & Netrapalli, NeurIPS 2024) for PyTorch and Hugging Face."""

from hf_fsf.layout import BlockLayout, find_blocks
from hf_fsf.probe import BlockStats, FeatureSpeedProbe, StepStats

__all__ = ["BlockLayout", "BlockStats", "FeatureSpeedProbe", "StepStats", "find_blocks"]
__version__ = "0.1.0"
