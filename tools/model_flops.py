"""What the benchmarks' model FLOPs utilisation (MFU) divides by: the peak GEMM rate measured on this machine in
the same run, and the decoder's linear parameters that every token multiplies by.

Useful FLOPs: 4 x linear parameters x tokens for a LoRA training pass on a frozen base (forward, and backward to
the activations), 2 x linear parameters x tokens for a forward or a decoded token. The head and attention's own
products are left out, so MFU is a lower bound.
"""

from __future__ import annotations

import time

import torch
from torch import nn


def peak_gemm_flops(dtype: torch.dtype, n: int = 2048, repeat: int = 10) -> float:
    """FLOP/s of an (n, n) @ (n, n) matmul in `dtype` here, the best of `repeat` after a warm-up."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        tic = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best


def linear_params(model: nn.Module) -> int:
    """Weights of the decoder's linear layers (lm_head left out)."""
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.split(".")[-1] != "lm_head")
