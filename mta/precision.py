"""bf16 autocast where the hardware computes it natively (CUDA bf16, or a CPU with AVX512-BF16 / AMX).

Autocast keeps the parameters, the optimizer state and the loss in fp32 and runs the matrix products in
bf16 with fp32 accumulation. A profile's `bf16 = "auto"` is settled once per run (`mta.run.calibrate`:
measured on a CPU with native bf16) and recorded in the run's config.json; the library functions take a bool.

Autocast caches the bf16 copy of a trainable weight for the length of its context, but casts a frozen one
again at every call: with a frozen base that is a copy of every weight per forward, and per decode step the
largest cost there is. `bf16_weights` makes those copies once for a whole training run or decode.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def bf16_supported(device: torch.device | str) -> bool:
    """Whether bf16 autocast runs natively: CUDA with bf16, or a CPU with AVX512-BF16 / AMX (oneDNN)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def check_bf16(bf16: bool | str, device: torch.device | str) -> None:
    """A profile's `bf16 = True` on a device without native bf16 is an error, raised before any work ("auto" is
    settled at the start of a run, `mta.run.calibrate`)."""
    if bf16 is True and not bf16_supported(device):
        raise ValueError(f"profile field bf16 is True, but {device} has no native bf16 (needs CUDA bf16, "
                         f"AVX512-BF16 or AMX); use bf16='auto' (measured) or False")


def gemm_input(x: torch.Tensor) -> torch.Tensor:
    """x in autocast's compute dtype while autocast is on (else x itself): for an activation that only matrix
    products read, the cast each of them would make of it, made once. Forward values are unchanged; in the
    backward the readers' input gradients are summed in that dtype before the one cast back."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


@contextlib.contextmanager
def autocast(device: torch.device | str, bf16: bool, model: nn.Module | None = None):
    """bf16 autocast on `device` when `bf16` (an error where the hardware lacks it); a no-op otherwise. With
    `model`, its frozen weights are also bf16 copies for the context (`bf16_weights`): for a context that runs
    many forwards, such as a decode."""
    device = torch.device(device)
    if bf16 and not bf16_supported(device):
        raise ValueError(f"bf16 autocast is not supported on {device} (needs CUDA bf16, AVX512-BF16 or AMX)")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), \
            (bf16_weights(model, bf16) if model is not None else contextlib.nullcontext()):
        yield


@contextlib.contextmanager
def bf16_weights(model: nn.Module, enabled: bool = True):
    """For the duration, every frozen fp32 nn.Linear weight of `model` is replaced by its bf16 copy, made once.

    Under bf16 autocast a linear layer casts its fp32 weight to bf16 on every call; this gives it the same
    bf16 values from the start, so outputs are bit-identical, without the per-call copy. Only for code that
    runs under `autocast(device, True)` and does not change the weights; the fp32 weights (the same
    Parameter objects, so tied weights stay tied) are put back on exit. A no-op when not `enabled`.
    """
    saved = []
    if enabled:
        for m in model.modules():
            w = m.weight if type(m) is nn.Linear else None
            if w is not None and w.dtype == torch.float32 and not w.requires_grad:
                saved.append((m, w))
                m.weight = nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
    try:
        yield
    finally:
        for m, w in saved:
            m.weight = w
