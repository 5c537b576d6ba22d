"""Fused LoRA merge kernels (plain torch GEMMs)."""
from mta.ops.merge import MODES, bf16_factors, check_weights, combine_factors, fold_, uses_workspace

__all__ = ["MODES", "bf16_factors", "check_weights", "combine_factors", "fold_", "uses_workspace"]
