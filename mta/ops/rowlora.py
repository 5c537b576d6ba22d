"""Per-row LoRA: one linear layer whose batch rows belong to different adapters (plain PyTorch GEMMs).

A batch of N rows (one sequence each) passes through a frozen W0 shared by all rows; row n also gets
the LoRA terms of its own adapter u = index[n], gathered from factor banks A (U, r, in), B (U, out, r):

    y_n = W0 x_n + Σ_terms  s_term · B_term[u] (A_term[u] x_n)

Each term is one `index_select` of the bank rows and two `torch.bmm` (no loop over rows or adapters);
a `RowLoRALinear` concatenates its two terms into one pair of banks (rank rf + r, the stacked scaling
folded into its A), so a layer costs one gather and two GEMMs, the second adding W0 x in place (baddbmm):

  fused    the merged bank LoRA of Eq. 5, applied unmerged, as frozen buffers with its scaling already
           inside B (`mta.peft.fusion.merged_factors` returns ΔW = B @ A). merge_space=param gives one rank-r
           pair per user; delta gives the K pairs concatenated, which is one pair of rank Σ r_i. Users
           whose fused rank is smaller, or who have none (Adapt-only), are zero-padded: a zero factor
           adds exact zeros.
  stacked  the trainable LoRA of Eq. 7 on top (U, r, in) / (U, out, r), scaling alpha / r, PEFT's init
           per adapter (kaiming-uniform A, zero B).

Why this equals fold-then-stack. Eq. 7 (`mta.peft.fusion.stack_lora`) computes for user u

    (W0 + B_f A_f) x + s · B_u (A_u x)

with W0 + B_f A_f folded into the weight first. By distributivity this is W0 x + B_f (A_f x) + s B_u (A_u x),
which is what a row computes: the same function of x and of the stacked factors, so the same outputs,
the same loss and the same gradients for A_u, B_u (W0 and the fused factors are constants in both). Only
rounding differs: the fold rounds W0 + ΔW into the weight's dtype once (for bf16 weights, a bf16 ulp of
W0), while the unmerged term is computed in the adapters' dtype (fp32 for half-precision bases, as
LoRALinear does) and added to W0 x; the GEMMs also have different shapes. For fp32 weights both agree
to a few fp32 ulps of the layer's output.

Rows are independent through the rest of a Llama (attention, RMSNorm and MLP act within a row), so a
batch of rows of different adapters computes for every row what that adapter's model alone would.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mta.ops.quant import QuantLinear, linear_dtype_device


def row_lora(x: Tensor, index: Tensor | None, A: Tensor, B: Tensor, scaling: float = 1.0,
             y: Tensor | None = None) -> Tensor:
    """y[n] + scaling · B[index[n]] @ A[index[n]] @ x[n] for every row n, as two batched GEMMs.

    x (N, T, in), index (N,) long (None: row n is slot n, N = U), A (U, r, in), B (U, out, r),
    y (N, T, out) or None -> (N, T, out) in A's dtype (under autocast, its dtype). With y of A's dtype, or under
    autocast, the addition happens inside the second GEMM (baddbmm).
    """
    a = A if index is None else A.index_select(0, index)  # (N, r, in)
    b = B if index is None else B.index_select(0, index)  # (N, out, r)
    autocasting = torch.is_autocast_enabled(x.device.type)  # then bmm casts every operand itself
    h = torch.bmm(x if autocasting else x.to(a.dtype), a.transpose(1, 2))  # (N, T, r)
    if scaling != 1.0:
        h = h * scaling  # scale the narrow side, as LoRALinear does
    if y is None:
        return torch.bmm(h, b.transpose(1, 2))  # (N, T, out)
    if y.dtype == b.dtype or autocasting:
        return torch.baddbmm(y, h, b.transpose(1, 2))  # (N, T, out)
    return y + torch.bmm(h, b.transpose(1, 2))


class RowLoRALinear(nn.Module):
    """A frozen nn.Linear (or a quantised mta.ops.quant.QuantLinear) plus, per batch row, a fused LoRA (frozen,
    unmerged) and a stacked trainable LoRA.

    `n_adapters` slots; `r` (0: no stacked term) and `alpha` are the stacked LoRA's. Fused factors are set
    with `set_fused` (rank rf, may be 0). The row -> slot index of the current batch is set with
    `set_rows(index)` (`mta.peft.multi_lora.set_rows` sets it on every layer of a model). Half-precision bases
    get fp32 adapters, as LoRALinear does.
    """

    def __init__(self, base: nn.Linear | QuantLinear, n_adapters: int, r: int = 0, alpha: float = 1.0,
                 dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if n_adapters < 1 or r < 0:
            raise ValueError(f"RowLoRALinear: need n_adapters >= 1 and r >= 0, got {n_adapters}, {r}")
        self.base = base.requires_grad_(False)
        base_dtype, device = linear_dtype_device(base)
        dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
        kw = dict(device=device, dtype=dtype)
        U, n_in, n_out = n_adapters, base.in_features, base.out_features
        self.n_adapters, self.r = U, r
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r) if r else 0.0
        self.lora_A = nn.Parameter(torch.empty(U, r, n_in, **kw), requires_grad=r > 0)  # (U, r, in)
        self.lora_B = nn.Parameter(torch.zeros(U, n_out, r, **kw), requires_grad=r > 0)  # (U, out, r)
        for u in range(U if r else 0):  # PEFT's init, per slot
            nn.init.kaiming_uniform_(self.lora_A.data[u], a=math.sqrt(5))
        self.register_buffer("fused_A", torch.zeros(U, 0, n_in, **kw))  # (U, rf, in)
        self.register_buffer("fused_B", torch.zeros(U, n_out, 0, **kw))  # (U, out, rf), scaling inside
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rows: Tensor | None = None  # (N,) slot of each batch row
        self._rows_are_slots = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def set_rows(self, index: Tensor | None) -> None:
        """The adapter slot of each row of the next batches: (N,) integers in [0, n_adapters)."""
        self.rows = None if index is None else index.to(device=self.lora_A.device, dtype=torch.long)
        # Row n is slot n (one row per user, in slot order): the banks are used as they are, no gather.
        self._rows_are_slots = index is not None and index.numel() == self.n_adapters and bool(
            torch.equal(index.cpu(), torch.arange(self.n_adapters)))

    @torch.no_grad()
    def set_fused(self, A: Tensor, B: Tensor) -> None:
        """Fused factors for every slot: A (U, rf, in), B (U, out, rf) with ΔW_u = B[u] @ A[u]."""
        U, n_in, n_out = self.n_adapters, self.in_features, self.out_features
        if A.ndim != 3 or B.ndim != 3 or A.shape[0] != U or B.shape[0] != U or A.shape[2] != n_in \
                or B.shape[1] != n_out or A.shape[1] != B.shape[2]:
            raise ValueError(f"set_fused: A {tuple(A.shape)}, B {tuple(B.shape)} for {U} slots of "
                             f"a ({n_out}, {n_in}) layer")
        self.fused_A = A.to(self.fused_A)
        self.fused_B = B.to(self.fused_B)

    def factors(self) -> tuple[Tensor, Tensor]:
        """Both terms as one pair of banks: A (U, rf + r, in) with the stacked scaling folded in, B (U, out, rf + r).

        Without autograd (generation) the pair is kept until a factor changes: in place (their version
        counters; a change through `.data` is not seen) or replaced (`set_fused`, `.to()`); under autocast it
        is kept in autocast's dtype, the cast each GEMM would otherwise make again at every step."""
        key = None
        if not torch.is_grad_enabled():
            device = self.fused_A.device.type
            cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            key = (self.fused_A, self.fused_A._version, self.lora_A._version, self.lora_B._version, self.scaling,
                   cast)
            cached = getattr(self, "_factors", None)
            if cached is not None and cached[0][0] is key[0] and cached[0][1:] == key[1:]:
                return cached[1]
        A, B = self.fused_A, self.fused_B
        if self.r:
            A = torch.cat([A, self.lora_A * self.scaling], 1) if A.shape[1] else self.lora_A * self.scaling
            B = torch.cat([B, self.lora_B], 2) if B.shape[2] else self.lora_B
        if key is not None:
            if cast is not None:
                A, B = A.to(cast), B.to(cast)
            self._factors = (key, (A, B))
        return A, B

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (N, ..., out)
        if self.rows is None:
            raise RuntimeError("RowLoRALinear: set the batch rows' adapter slots first (set_rows)")
        N = x.shape[0]
        if self.rows.shape != (N,):
            raise ValueError(f"RowLoRALinear: {self.rows.numel()} row slots for a batch of {N} rows")
        if not self.fused_A.shape[1] and not self.r:
            return y
        xs = x.reshape(N, -1, x.shape[-1])  # (N, T, in)
        ys = y.reshape(N, -1, y.shape[-1])  # (N, T, out)
        if self.r and self.training and isinstance(self.dropout, nn.Dropout):  # dropout on the stacked term only
            if self.fused_A.shape[1]:
                ys = row_lora(xs, self.rows, self.fused_A, self.fused_B, y=ys)
            out = row_lora(self.dropout(xs.to(self.lora_A.dtype)), self.rows, self.lora_A, self.lora_B,
                           self.scaling, y=ys)
        else:  # one pair of GEMMs for both terms
            A, B = self.factors()
            out = row_lora(xs, None if self._rows_are_slots else self.rows, A, B, y=ys)  # (N, T, out)
        return out.view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"n_adapters={self.n_adapters}, r={self.r}, fused_rank={self.fused_A.shape[1]}"
