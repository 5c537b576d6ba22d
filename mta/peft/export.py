"""A user's MTA adapter (the fused bank LoRA, Eq. 5, under the stacked LoRA, Eq. 7) as one PEFT LoRA.

Per module the two parts are concatenated along the rank, each part's scaling folded into B:
A' = [A_f; A_s], B' = [B_f, s_s B_s], where B_f A_f is the merged update of `mta.peft.fusion.merged_factors`
(rank r for `param` and `linear`, K·r for `delta` and `cat`, the SVD rank for `svd`) and s_s the stacked
LoRA's scaling. With lora_alpha = r' (scaling 1, no rsLoRA), W0 + B'A' is fold-then-stack
(`mta.peft.fusion.stack_lora` with the stacked LoRA on top) up to rounding: PEFT on the plain base model decodes
with it what we decode (tests/test_export.py), and servers that read PEFT LoRA folders take the same files.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from mta.errors import InputError
from mta.models.checkpoint import hub_repo
from mta.peft.adapter import Adapter
from mta.peft.fusion import merged_factors
from mta.peft.lora import LoRAConfig


def export_adapter(merged: Sequence[Adapter], weights: Sequence[float], stacked: Adapter, mode: str,
                   base_model: str | None = None) -> Adapter:
    """One fp32 LoRA of rank r_f + r_s equal to `merged` fused at `weights` in merge mode `mode`, then `stacked`.

    No `merged` adapters (Adapt-only) exports the stacked LoRA alone. A module only one part targets gets zero
    rows and columns for the other, so the export targets the union of both parts' modules (named by their
    last path component, as PEFT's `target_modules`). `base_model` (a registry name, Hub id or path; default:
    the one the adapters record) is written as the Hub id it stands for where there is one
    (`mta.models.checkpoint.hub_repo`).
    """
    bases = {a.config.base_model_name_or_path for a in (*merged, stacked)} - {None, ""}
    if len(bases) > 1:
        raise InputError(f"export: adapters were trained on different base models: {sorted(bases)}")
    for a in merged:
        if set(a.A) != set(merged[0].A):
            m = sorted(set(a.A) ^ set(merged[0].A))[0]
            raise InputError(f"export: {a.source} and {merged[0].source} target different modules, e.g. {m!r}")
    first = merged[0] if merged else stacked
    for m in sorted(stacked.A.keys() & first.A.keys()):
        want, got = (first.B[m].shape[0], first.A[m].shape[1]), (stacked.B[m].shape[0], stacked.A[m].shape[1])
        if got != want:
            raise InputError(f"export: {stacked.source}: module {m!r} is {got}, in {first.source} it is {want}; "
                             "wrong base model?")
    fused = {m: merged_factors(merged, weights, m, mode) for m in first.A} if merged else {}  # m -> fp32 (B, A)
    r_f = max((B.shape[1] for B, _ in fused.values()), default=0)
    r = r_f + stacked.config.r
    name = base_model or next(iter(bases), None)
    targets = tuple(sorted({m.rpartition(".")[2] for m in {*fused, *stacked.A}}))
    config = LoRAConfig(r=r, alpha=float(r), target_modules=targets,
                        base_model_name_or_path=name and (hub_repo(name) or name))
    out = Adapter(config, source=f"export of {stacked.source}")
    for m in sorted({*fused, *stacked.A}):
        shape = first if m in first.A else stacked
        A, B = torch.zeros(r, shape.A[m].shape[1]), torch.zeros(shape.B[m].shape[0], r)
        if m in fused:
            B_f, A_f = fused[m]
            A[:A_f.shape[0]], B[:, :B_f.shape[1]] = A_f, B_f
        if m in stacked.A:
            A[r_f:], B[:, r_f:] = stacked.A[m], stacked.config.scaling * stacked.B[m].float()
        out.A[m], out.B[m] = A, B
    return out
