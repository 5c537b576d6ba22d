"""Weight-only quantised linear layers that keep a GGUF's own blocks (plain PyTorch, no Triton).

`QuantLinear` stores a frozen weight W (out, in) in one of four forms and computes x @ W.T:

  q4_0  GGUF Q4_0: blocks of 32 along `in`, w = d·(q - 8), q in 0..15, d f16
  q4_1  GGUF Q4_1: blocks of 32 along `in`, w = d·q + m, q in 0..15, d and m f16
  q8_0  GGUF Q8_0: blocks of 32 along `in`, w = d·q, q in -128..127, d f16
  int8  per output channel: w = s·q, q in -127..127, s fp32 (for bf16/fp32 checkpoints)

The 4-bit forms hold GGUF's own bytes: `qweight` (out, in/32, 16) uint8, byte j of a block carrying
element j in its low nibble and element j + 16 in its high one, beside `scales` (= d) and, for q4_1,
`mins` (= m), both (out, in/32) f16. `dequantize()` computes exactly what `mta.models.gguf.dequantize` does
(f16 -> fp32, then one fp32 rounding of d·q + m), so the fp32 weights are bit-identical to the
dequantised checkpoint's.

Matmuls use PyTorch's weight-only kernels where the build has them (probed once, `kernel_for`):
- 4-bit: `aten._weight_int4pack_mm_for_cpu` (CPU) and `aten._weight_int4pack_mm` (CUDA, bf16), group
  32. Their convention is w = s·(q - 8) + z with `scales_and_zeros` (in/32, out, 2) in the activations'
  dtype. Q4_0 maps to s = d, z = 0, and Q4_1 to s = d, z = m + 8d.
- int8: `aten._weight_int8pack_mm(x, q (out, in) int8, s (out,))` (CPU), scales in the activations' dtype.
Anything else (Q8_0's block scales have no torch kernel; shapes a kernel rejects, such as `out` not a
multiple of 16 for the CPU int4 kernel; a device without the op) falls back to dequantising W in row chunks
of about 1 MiB and one F.linear per chunk, so no full float copy of W is ever held.

Exactness of Q4_1 (w = d·q + m, an affine group quantisation with group 32):
- fp32 (torch's fp32 kernels, which `_pack` also serves; on CPU the fallback runs instead, exact too):
  s = d is exact (f16 -> fp32), and z = m + 8d is exact in fp32 whenever
  |m| and |8d| lie within 2^13 of each other (f16 has 11 significant bits, fp32 24; true for every block of
  SmolLM2, where m ≈ -8d). Then s·(q - 8) + z = d·q + m rounds once, as the GGUF reference does: the
  kernel sees bit-identical weights and only the GEMM's summation order differs.
- bf16 activations (CPU and CUDA kernels): scales_and_zeros must be bf16, so d and m + 8d are rounded to
  8 significant bits: a relative error of up to 2^-9 in each block's scale and zero. fp16 activations
  round them to f16 (d exactly, m + 8d with up to 2^-11).
- The fallback dequantises in fp32 exactly and rounds W once to the activations' dtype.
Q4_0 (z = 0) and int8 have the same statement with z = 0 exact.

Which path runs (measured on 1 core of an AVX-512 EPYC, torch 2.13, W 576 x 1536, batch 1; F.linear fp32
66 us, bf16 81 us): the CPU kernels are vectorised for bf16 only (Q4_1 60 us, int8 57 us). Their fp32
and fp16 versions are scalar (Q4_1 1.5 ms, int8 0.74 ms) and slower than the chunked fallback (Q4_1 1.2 ms,
int8 0.30 ms, Q8_0 0.32 ms), so on CPU the kernels serve bf16 activations and fp32 takes the fallback.
For speed, load the model in bf16 (`load_llm(..., dtype=torch.bfloat16, quant="q4")`) or run it under bf16
autocast, which the layer follows as F.linear does (the profile's `bf16`, `mta.precision`).

Backward: W is frozen; the gradient with respect to x is grad @ W through the same chunked dequantisation
(torch's kernels have no derivative), so LoRA trains on a quantised base.

NF4 (`nf4_quantize`, `nf4_dequantize`, `nf4_roundtrip`) is bitsandbytes' blockwise 4-bit NormalFloat, the base
the authors' evaluation scripts load: it serves as a round-trip of a float W at decode time
(`mta.peft.fusion.nf4_base`), not as a stored layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUP = 32
KINDS = ("q4_0", "q4_1", "q8_0", "int8")
GGUF_KINDS = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}
CHUNK_ELEMENTS = 1 << 18  # float elements of W dequantised at a time by the fallback (1 MiB in fp32)
CPU_KERNEL_DTYPES = (torch.bfloat16,)  # the dtypes torch's CPU kernels vectorise (fp32/fp16 ones are scalar)
_INNER_K_TILES = 2


def _op(name: str):
    return getattr(torch.ops.aten, name, None)


def kernel_for(kind: str, device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> str | None:
    """Which torch kernel computes this layer's matmul: "int4pack", "int8pack" or None (chunked fallback)."""
    if kind in ("q4_0", "q4_1"):
        if in_features % GROUP:
            return None
        if device.type == "cpu" and _op("_weight_int4pack_mm_for_cpu") is not None and out_features % 16 == 0:
            return "int4pack" if dtype in CPU_KERNEL_DTYPES else None
        if device.type == "cuda" and _op("_weight_int4pack_mm") is not None and out_features % 8 == 0:
            return "int4pack" if dtype == torch.bfloat16 else None  # not run on this project's CPU machines
        return None
    if kind == "int8" and device.type == "cpu" and _op("_weight_int8pack_mm") is not None:
        return "int8pack" if dtype in CPU_KERNEL_DTYPES else None
    return None


def _unpack_nibbles(qweight: Tensor) -> Tensor:
    """(rows, in/32, 16) uint8 GGUF nibbles -> (rows, in) uint8 values 0..15, in element order."""
    return torch.cat([qweight & 0x0F, qweight >> 4], dim=-1).flatten(1)


class _QuantMatmul(torch.autograd.Function):
    """x (..., in) -> x @ W.T (..., out); backward gives grad_x = grad @ W (W frozen, never a gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantLinear) -> Tensor:
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        layer = ctx.layer
        g = grad.reshape(-1, layer.out_features)  # (rows, out)
        gx = g.new_zeros(g.shape[0], layer.in_features)  # (rows, in)
        for r0, w in layer._chunks(g.dtype):  # w (chunk, in)
            gx += g[:, r0 : r0 + w.shape[0]] @ w
        return gx.view(*grad.shape[:-1], layer.in_features), None


class QuantLinear(nn.Module):
    """A frozen linear layer y = x @ W.T (+ bias) with W (out_features, in_features) held quantised.

    `dtype` is the activations' dtype the layer was built for (what `dequantize()` returns by default and
    what a LoRA on top computes in). Build with `from_gguf` (GGUF's bytes, kept) or `from_float`.
    """

    def __init__(self, kind: str, qweight: Tensor, scales: Tensor, mins: Tensor | None = None,
                 bias: Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"QuantLinear: kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
        if (mins is not None) != (kind == "q4_1"):
            raise ValueError(f"QuantLinear: mins are given exactly for q4_1, not {kind!r}")
        self.kind, self.dtype = kind, dtype
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] if kind == "int8" else qweight.shape[1] * GROUP
        # q4_0 / q4_1: (out, in/32, 16) uint8; q8_0: (out, in/32, 32) int8; int8: (out, in) int8
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)  # (out, in/32) f16, or (out,) fp32 for int8
        self.register_buffer("mins", mins)  # (out, in/32) f16 for q4_1, else None
        self.register_buffer("bias", bias)  # (out,) in `dtype`, or None
        self._packed: dict = {}  # (device, dtype) -> the kernel's own operands, built on first use

    # ---- construction ----

    @classmethod
    def from_gguf(cls, raw: Tensor, ttype: str, shape: tuple[int, int], dtype: torch.dtype = torch.float32,
                  bias: Tensor | None = None) -> QuantLinear:
        """GGUF tensor bytes (uint8, rows of blocks) of type Q4_0 / Q4_1 / Q8_0 and row-major `shape`."""
        if ttype not in GGUF_KINDS:
            raise ValueError(f"QuantLinear.from_gguf: GGML type {ttype} has no block form here ({sorted(GGUF_KINDS)})")
        out, inp = shape
        nbytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[ttype]
        b = raw.reshape(out, inp // GROUP, nbytes)
        d = b[..., 0:2].contiguous().view(torch.float16).squeeze(-1)  # (out, in/32)
        if ttype == "Q8_0":
            return cls("q8_0", b[..., 2:].contiguous().view(torch.int8), d, bias=bias, dtype=dtype)
        if ttype == "Q4_0":
            return cls("q4_0", b[..., 2:].contiguous(), d, bias=bias, dtype=dtype)
        m = b[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
        return cls("q4_1", b[..., 4:].contiguous(), d, m, bias=bias, dtype=dtype)

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: Tensor, kind: str, bias: Tensor | None = None,
                   dtype: torch.dtype | None = None) -> QuantLinear:
        """Quantise a float weight (out, in): per-channel int8 (symmetric, s = max|w| / 127), or a GGUF
        block form as llama.cpp's reference quantiser does it (Q4_1: d = (max - min) / 15, m = min per block,
        q from the f16-rounded d and m; Q4_0: d = signed absmax / -8; Q8_0: d = absmax / 127)."""
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        w = weight.detach().float()
        out, inp = w.shape
        if kind == "int8":
            s = w.abs().amax(1).clamp(min=1e-30) / 127  # (out,)
            q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
            return cls("int8", q, s, bias=bias, dtype=dtype)
        if inp % GROUP:
            raise ValueError(f"QuantLinear.from_float: in_features {inp} is not a multiple of {GROUP}")
        g = w.view(out, inp // GROUP, GROUP)
        if kind == "q8_0":
            d = (g.abs().amax(-1) / 127).half()
            q = torch.round(g / _safe(d)[..., None]).clamp(-128, 127).to(torch.int8)
            return cls("q8_0", q, d, bias=bias, dtype=dtype)
        if kind == "q4_1":
            lo, hi = g.amin(-1), g.amax(-1)
            d, m = ((hi - lo) / 15).half(), lo.half()
            q = torch.round((g - m.float()[..., None]) / _safe(d)[..., None]).clamp(0, 15)
            mins = m
        elif kind == "q4_0":
            idx = g.abs().argmax(-1, keepdim=True)
            d = (g.gather(-1, idx).squeeze(-1) / -8).half()
            q = (torch.round(g / _safe(d)[..., None]) + 8).clamp(0, 15)
            mins = None
        else:
            raise ValueError(f"QuantLinear.from_float: kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
        q = q.to(torch.uint8)
        return cls(kind, q[..., :16] | (q[..., 16:] << 4), d, mins, bias=bias, dtype=dtype)

    # ---- the weight ----

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def _dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype) -> Tensor:
        """Rows r0:r1 of W as (r1 - r0, in) in `dtype`: exact in fp32 (as gguf.dequantize), one rounding after."""
        q = self.qweight[r0:r1]
        if self.kind == "int8":
            return (q.float() * self.scales[r0:r1, None]).to(dtype)
        d = self.scales[r0:r1].float()[..., None]  # (rows, in/32, 1)
        if self.kind == "q8_0":
            w = q.float() * d
        else:
            v = _unpack_nibbles(q).view(r1 - r0, -1, GROUP).float()
            w = (v - 8) * d if self.kind == "q4_0" else v * d + self.mins[r0:r1].float()[..., None]
        return w.view(r1 - r0, self.in_features).to(dtype)

    def _chunks(self, dtype: torch.dtype):
        """(first row, W[rows] in `dtype`) over row chunks of about CHUNK_ELEMENTS elements."""
        rows = max(1, CHUNK_ELEMENTS // self.in_features)
        for r0 in range(0, self.out_features, rows):
            yield r0, self._dequantize_rows(r0, min(r0 + rows, self.out_features), dtype)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """W (out, in) in `dtype` (default: the layer's)."""
        return self._dequantize_rows(0, self.out_features, dtype or self.dtype)

    # ---- kernels ----

    def _kernel_operands(self, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        if key not in self._packed:
            with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable later by autograd
                self._packed[key] = self._pack(device, dtype)
        return self._packed[key]

    def _pack(self, device: torch.device, dtype: torch.dtype):
        if self.kind == "int8":
            return self.qweight, self.scales.to(dtype)  # (out, in) int8, (out,)
        q = _unpack_nibbles(self.qweight).to(torch.int32)  # (out, in) 0..15
        d = self.scales.float()
        z = torch.zeros_like(d) if self.kind == "q4_0" else self.mins.float() + 8 * d  # w = d·(q - 8) + z
        scales_and_zeros = torch.stack([d, z], -1).transpose(0, 1).contiguous().to(dtype)  # (in/32, out, 2)
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)
        else:  # CUDA takes (out, in/2) uint8, the even element in the high nibble
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, _INNER_K_TILES)
        return packed, scales_and_zeros

    def _matmul(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out), no bias."""
        x2 = x.reshape(-1, self.in_features)  # (rows, in)
        kernel = kernel_for(self.kind, x.device, x.dtype, self.out_features, self.in_features)
        if kernel == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), *self._kernel_operands(x.device, x.dtype))
        elif kernel == "int4pack":
            packed, sz = self._kernel_operands(x.device, x.dtype)
            cpu = x.device.type == "cpu"
            op = torch.ops.aten._weight_int4pack_mm_for_cpu if cpu else torch.ops.aten._weight_int4pack_mm
            y = op(x2.contiguous(), packed, GROUP, sz)
        else:
            y = x2.new_empty(x2.shape[0], self.out_features)
            for r0, w in self._chunks(x.dtype):
                y[:, r0 : r0 + w.shape[0]] = F.linear(x2, w)
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):  # as F.linear does under autocast: compute in its dtype
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = _QuantMatmul.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else self._matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        """.to(device) moves the codes and scales as they are; .to(dtype) / .bfloat16() change only `dtype`
        (and the bias), never the stored f16 scales, which a float cast of every buffer would round."""
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        for name in ("qweight", "scales", "mins"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(probe.device))
        if self.bias is not None:
            self.bias = self.bias.to(probe.device, probe.dtype)
        self.dtype, self._packed = probe.dtype, {}  # a move or cast invalidates the kernel operands
        return self

    def nbytes(self) -> int:
        """Bytes of the stored quantised weight (codes, scales, mins), which a matmul reads per token."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins) if t is not None)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


def _safe(d: Tensor) -> Tensor:
    """f16 scales -> fp32 divisors, 1 where the scale is 0 (an all-zero block; its codes do not matter)."""
    d = d.float()
    return torch.where(d == 0, torch.ones_like(d), d)


# QLoRA's NormalFloat4 code (bitsandbytes `get_4bit_type("nf4")`, the table its kernels hard-code).
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
NF4_BLOCK = 64  # bitsandbytes' default blocksize for 4-bit weights


def nf4_quantize(weight: Tensor, blocksize: int = NF4_BLOCK) -> tuple[Tensor, Tensor]:
    """bitsandbytes' blockwise NF4 (`quantize_4bit(quant_type="nf4")`, no double quantisation): the weight
    flattened row-major in blocks of `blocksize`, each scaled by 1/absmax (fp32) and mapped to the code of the
    nearest NF4 value, a value on a midpoint going to the lower one (the kernel's `x > midpoint` tree).
    Returns codes (numel,) uint8 in 0..15 and absmax (blocks,) fp32."""
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % blocksize)).view(-1, blocksize)  # (blocks, blocksize), zeros pad the last
    absmax = blocks.abs().amax(1)  # (blocks,)
    scaled = blocks * torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)[:, None]
    code = torch.tensor(NF4_CODE, dtype=torch.float64)
    midpoints = ((code[1:] + code[:-1]) / 2).float().to(weight.device)  # (15,)
    codes = torch.bucketize(scaled, midpoints)  # number of midpoints below each value: `x > m` goes up
    return codes.reshape(-1)[:n].to(torch.uint8), absmax


def nf4_dequantize(codes: Tensor, absmax: Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
                   blocksize: int = NF4_BLOCK) -> Tensor:
    """bitsandbytes' `dequantize_4bit`: NF4 value times its block's absmax in fp32, rounded once to `dtype`."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=codes.device)
    n = codes.numel()
    values = code[F.pad(codes.long(), (0, -n % blocksize)).view(-1, blocksize)] * absmax[:, None]
    return values.reshape(-1)[:n].reshape(shape).to(dtype)


def nf4_roundtrip(weight: Tensor) -> Tensor:
    """The weight a bitsandbytes NF4 layer (blocks of 64, no double quantisation) multiplies by: dequantise(
    quantise(W)) in W's dtype. Its error per element is at most the block's absmax times half the widest gap
    of the code (0.152, between -1 and -0.696), plus the rounding to the dtype."""
    return nf4_dequantize(*nf4_quantize(weight), weight.shape, weight.dtype)


def linear_dtype_device(layer: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The compute dtype and the device of a frozen base layer, an nn.Linear or a QuantLinear."""
    if isinstance(layer, QuantLinear):
        return layer.dtype, layer.device
    return layer.weight.dtype, layer.weight.device


def quantize_model_linears(model: nn.Module, kind: str, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace every nn.Linear (but `skip`) by QuantLinear.from_float(weight, kind); returns the paths."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] not in skip]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        lin = getattr(owner, child)
        bias = None if lin.bias is None else lin.bias.detach()
        setattr(owner, child, QuantLinear.from_float(lin.weight, kind, bias=bias, dtype=lin.weight.dtype))
    return names


__all__ = ["GGUF_KINDS", "GROUP", "KINDS", "NF4_BLOCK", "NF4_CODE", "QuantLinear", "kernel_for", "linear_dtype_device",
           "nf4_dequantize", "nf4_quantize", "nf4_roundtrip", "quantize_model_linears"]
