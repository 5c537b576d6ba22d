"""Fused LoRA merge kernels (plain torch GEMMs)."""
from kernels.merge import MODES, check_weights, combine_factors, fold_

__all__ = ["MODES", "check_weights", "combine_factors", "fold_"]
