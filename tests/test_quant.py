"""Quantised base weights (mta.ops.quant): matmuls against the dequantised weight, GGUF blocks kept exactly,
LoRA on a quantised base, load_llm(quant=...), and the refusal to fold into quantised weights.

Bounds. A quantised matmul and F.linear over the dequantised weight see the same weights (bit for bit in
fp32: see mta.ops.quant) and differ only in summation order, so in fp32 |y - y_ref| <= 1e-5 · (|x| @ |W|ᵀ)
(K <= 1536 terms, 2^-24 each, with margin). With bf16 activations the kernels also round x, the scales and
zeros and y to bf16 (8 significant bits), so the bound is 2^-6 · (|x| @ |W|ᵀ).
"""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mta.models import checkpoint
from mta.models.checkpoint import load_llm, load_model, read_gguf
from mta.models.generation import generate
from mta.models.gguf import GGML_TYPES, GGUFFile, dequantize
from mta.ops import quant
from mta.ops.quant import QuantLinear, kernel_for
from mta.ops.rowlora import RowLoRALinear
from mta.peft.adapter import Adapter
from mta.peft.fusion import BaseWeights, fold_adapters
from mta.peft.lora import LoRAConfig, LoRALinear, inject_lora, merge_lora
from mta.profiles import BASE_QUANTS, PROFILES
from mta.run import pipeline
from mta.run.cli import main
from mta.run.rundir import RunDir
from tests.fixtures import SMOLLM_FILE, make_lamp, make_llm, make_profile, smollm_dir

FP32_BOUND, BF16_BOUND = 1e-5, 2.0**-6


def assert_within(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rel: float) -> float:
    """|y - x @ wᵀ| <= rel · (|x| @ |w|ᵀ) elementwise (reference in fp64); returns the worst ratio."""
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    ratio = ((y.double() - ref).abs() / scale.clamp(min=1e-30)).max().item()
    assert ratio <= rel, f"error {ratio:.2e} of |x||W| exceeds {rel:.1e}"
    return ratio


def random_q4_1_bytes(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """GGUF Q4_1 tensor bytes (rows, cols/32 · 20) with realistic blocks: d > 0, m ≈ -8d, random nibbles."""
    rng = np.random.default_rng(seed)
    n = rows * cols // 32
    d = rng.uniform(1e-3, 2e-2, n).astype(np.float16)
    m = (-8 * d.astype(np.float32) * rng.uniform(0.5, 1.5, n)).astype(np.float16)
    b = np.empty((n, 20), np.uint8)
    b[:, 0:2], b[:, 2:4] = d.view(np.uint8).reshape(n, 2), m.view(np.uint8).reshape(n, 2)
    b[:, 4:] = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    return b.reshape(rows, -1)


KINDS = ["q4_0", "q4_1", "q8_0", "int8"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 8])  # on CPU: fp32 takes the chunked fallback, bf16 the kernels
def test_quant_matmul_matches_dequantised_matmul(kind, rows):
    torch.manual_seed(0)
    w = torch.randn(96, 160) * 0.05  # out 96 (a multiple of 16), in 160 (5 blocks)
    layer = QuantLinear.from_float(w, kind)
    wq = layer.dequantize()  # (96, 160) fp32
    assert wq.shape == (96, 160) and layer.out_features == 96 and layer.in_features == 160
    x = torch.randn(2, rows, 160)
    assert_within(layer(x).flatten(0, 1), x.flatten(0, 1), wq, FP32_BOUND)
    bf16 = QuantLinear.from_float(w, kind).to(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.scales.dtype == layer.scales.dtype  # stored scales untouched
    assert torch.equal(bf16.dequantize(torch.float32), wq)
    y = bf16(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert_within(y.flatten(0, 1), x.bfloat16().flatten(0, 1), wq, BF16_BOUND)
    # quantisation error itself: 4-bit within half a step of its block, int8 / Q8_0 within half of 1/127
    step = (w.view(96, 5, 32).amax(-1) - w.view(96, 5, 32).amin(-1)).max().item()
    assert (wq - w).abs().max().item() <= (step / 15 if kind.startswith("q4") else w.abs().max().item() / 127)


def test_kernels_this_torch_offers():
    cpu = torch.device("cpu")
    bf16 = torch.bfloat16
    print("\nkernels (bf16):", {k: kernel_for(k, cpu, bf16, 96, 160) for k in KINDS},
          "| fp32:", {k: kernel_for(k, cpu, torch.float32, 96, 160) for k in KINDS})
    assert kernel_for("q4_1", cpu, bf16, 96, 160) == "int4pack" and kernel_for("int8", cpu, bf16, 96, 160) == "int8pack"
    assert kernel_for("q8_0", cpu, bf16, 96, 160) is None  # block-scaled int8: no torch kernel
    assert kernel_for("q4_1", cpu, bf16, 40, 160) is None  # the CPU int4 kernel needs out % 16 == 0
    layer = QuantLinear.from_float(torch.randn(40, 64), "q4_1")  # ... and then the fallback serves it
    x = torch.randn(3, 64)
    assert_within(layer(x), x, layer.dequantize(), FP32_BOUND)


def test_synthetic_q4_1_blocks_are_kept_exactly():
    rows, cols = 48, 256
    raw = random_q4_1_bytes(rows, cols)
    layer = QuantLinear.from_gguf(torch.from_numpy(raw), "Q4_1", (rows, cols))
    assert layer.kind == "q4_1" and layer.qweight.dtype == torch.uint8 and layer.scales.dtype == torch.float16
    assert layer.nbytes() == raw.size  # the GGUF's bytes, nothing added
    ref = torch.from_numpy(dequantize(raw.reshape(-1), "Q4_1", (rows, cols)))
    assert torch.equal(layer.dequantize(), ref)  # elementwise, same formula: bit-identical
    # The kernel's form w = s·(q - 8) + z with s = d, z = m + 8d: z exact in fp32, so the same weights.
    d, m = layer.scales.double(), layer.mins.double()
    assert torch.equal((layer.mins.float() + 8 * layer.scales.float()).double(), m + 8 * d)
    packed, sz = layer._pack(torch.device("cpu"), torch.float32)
    q = quant._unpack_nibbles(layer.qweight).float().view(rows, -1, 32)
    w_kernel = ((q - 8) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]).view(rows, cols)
    assert torch.equal(w_kernel, ref)
    x = torch.randn(1, cols)
    assert_within(layer(x), x, ref, FP32_BOUND)
    # torch's fp32 kernel on these operands (slower than the fallback on CPU, so not the default path)
    assert_within(torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz), x, ref, FP32_BOUND)


def test_smollm2_q4_1_layer_packed_equals_dequantised():
    gguf = GGUFFile(smollm_dir() / SMOLLM_FILE)
    config = checkpoint.config_from_gguf(gguf)
    dense = read_gguf(gguf, config)
    blocks = read_gguf(gguf, config, blocks=True)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        layer = blocks[name]
        assert isinstance(layer, QuantLinear) and layer.kind == "q4_1"
        assert torch.equal(layer.dequantize(), dense[name]), name  # q rows un-permuted as whole rows of blocks
        z = layer.mins.float() + 8 * layer.scales.float()
        assert torch.equal(z.double(), layer.mins.double() + 8 * layer.scales.double())  # exact for every block
        x = torch.randn(1, layer.in_features)
        fp32 = assert_within(layer(x), x, dense[name], FP32_BOUND)
        packed, sz = layer._pack(x.device, torch.float32)
        kernel = assert_within(torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz), x, dense[name],
                               FP32_BOUND)
        bf16 = assert_within(layer.to(torch.bfloat16)(x.bfloat16()), x.bfloat16(), dense[name], BF16_BOUND)
        print(f"\n{name}: error / (|x||W|) fp32 fallback {fp32:.1e}, fp32 kernel {kernel:.1e}, bf16 kernel {bf16:.1e}")
    assert not isinstance(blocks["model.embed_tokens.weight"], QuantLinear)  # embeddings stay float


@pytest.mark.parametrize("kind", ["q4_1", "int8"])
@pytest.mark.parametrize("rows", [1, 6])
def test_lora_gradients_through_quantised_base_equal_dequantised_base(kind, rows):
    torch.manual_seed(0)
    bases = [QuantLinear.from_float(torch.randn(64, 96) * 0.1, kind), QuantLinear.from_float(torch.randn(96, 64) * 0.1,
                                                                                             kind)]
    dense = []
    for q in bases:
        lin = nn.Linear(q.in_features, q.out_features, bias=False)
        lin.weight.data.copy_(q.dequantize())
        dense.append(lin)
    quantised = nn.Sequential(*[LoRALinear(b, r=4, alpha=8) for b in bases])
    reference = nn.Sequential(*[LoRALinear(b, r=4, alpha=8) for b in dense])
    for lq, lr in zip(quantised, reference, strict=True):
        nn.init.normal_(lq.lora_B.weight)  # nonzero B, so every factor gets a gradient
        lr.load_state_dict({k: v for k, v in lq.state_dict().items() if k.startswith("lora_")}, strict=False)
    x = torch.randn(rows, 96)
    xs = [x.clone().requires_grad_(True), x.clone().requires_grad_(True)]
    for model, xi in zip((quantised, reference), xs, strict=True):
        (model(xi) ** 2).sum().backward()
    grads = [[p.grad for p in m.parameters() if p.requires_grad] for m in (quantised, reference)]
    assert len(grads[0]) == 4 and not any(b.qweight.requires_grad for b in bases)
    for gq, gr in zip(*grads, strict=True):
        torch.testing.assert_close(gq, gr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)


def test_folding_into_a_quantised_base_is_refused_naming_the_module(tmp_path):
    model, _ = load_model(make_llm(tmp_path / "llm"), quant="q4")
    config = LoRAConfig(r=2, alpha=4, target_modules="all")
    names = inject_lora(model, config)
    assert "model.layers.0.self_attn.q_proj" in names  # LoRA wraps QuantLinear bases
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.self_attn\.q_proj': .*quantised \(q4_1\).*"
                                         r"applied unmerged"):
        merge_lora(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    adapter = Adapter(config, {n: m.lora_A.weight.detach() for n, m in layers.items()},
                      {n: m.lora_B.weight.detach() for n, m in layers.items()})
    from mta.peft.lora import unload_lora
    unload_lora(model)
    base = BaseWeights(model, targets="all")
    assert base.weights == {}  # quantised layers get no pristine copy: they are never folded into
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.\w+\.\w+_proj': the base weight is quantised"):
        fold_adapters(model, [adapter], [1.0], "param", base)


@pytest.mark.parametrize("quant", ["q8", "q4"])
def test_load_llm_quantised_safetensors(tmp_path, quant):
    directory = make_llm(tmp_path / "llm")
    dense, tok = load_llm(directory)
    model, _ = load_llm(directory, quant=quant)
    kinds = {m.kind for m in model.modules() if isinstance(m, QuantLinear)}
    assert kinds == {checkpoint.QUANT_KINDS[quant]}
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7 * model.config.num_hidden_layers
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    # the quantised model equals the float model with every decoder weight replaced by its dequantised form
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            dense.get_submodule(name).weight.data.copy_(m.dequantize())
    ids = torch.tensor([tok.encode("Generate a headline for the following article.")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense(ids), rtol=1e-4, atol=1e-4)
    # LoRA trains and generates on it, unmerged
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules="all"))
    loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert generate(model, ids, max_new_tokens=3).shape == (1, 3)


def test_base_quant_is_a_validated_profile_choice():
    assert BASE_QUANTS == checkpoint.QUANTS
    assert PROFILES["cpu"].base_quant == "none"
    assert PROFILES["cpu"].replace(base_quant="q4").base_quant == "q4"
    with pytest.raises(ValueError, match=r"base_quant must be one of 'none', 'q4', 'q8'; got 'q5'"):
        PROFILES["cpu"].replace(base_quant="q5")
    with pytest.raises(ValueError, match=r"quant must be one of"):
        load_model("unused", quant="int3")


@pytest.mark.slow
def test_smollm2_quantised_generation_against_fp32():
    dense, tok = load_llm("smollm2-135m")
    model, _ = load_llm("smollm2-135m", quant="q4")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 7 * 30 and {m.kind for m in layers} == {"q4_1"}  # every block kept as shipped
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, float
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.dequantize(), dense.get_submodule(name).weight), name
    ids = torch.tensor([tok.chat_prompt("Name three primary colors.")])
    ours = generate(model, ids, max_new_tokens=16, stop_token_ids=tok.eos_token_ids)[0].tolist()
    ref = generate(dense, ids, max_new_tokens=16, stop_token_ids=tok.eos_token_ids)[0].tolist()
    same = sum(a == b for a, b in zip(ours, ref, strict=False)) / max(len(ours), len(ref))
    print(f"\nq4 vs fp32-dequantised greedy: {same:.0%} of {len(ref)} tokens identical: {tok.decode(ours)!r}")
    assert len(ours) >= 3
    with torch.no_grad():  # a prefill pass (fallback path) agrees within fp32 summation order
        torch.testing.assert_close(model(ids), dense(ids), rtol=1e-3, atol=1e-3)


def test_gguf_block_sizes():
    assert {k: GGML_TYPES[k][1:] for k in quant.GGUF_KINDS} == {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34)}


def test_fallback_chunks_cover_every_row(monkeypatch):
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 3 * 64)  # 3 rows per chunk: 17 rows = 6 chunks, last partial
    layer = QuantLinear.from_float(torch.randn(17, 64), "q8_0")
    x = torch.randn(5, 64)
    assert_within(layer(x), x, layer.dequantize(), FP32_BOUND)
    assert torch.equal(torch.cat([w for _, w in layer._chunks(torch.float32)]), layer.dequantize())
    assert_within(F.linear(x, layer.dequantize()), x, layer.dequantize(), FP32_BOUND)


def test_row_lora_on_a_quantised_base_equals_the_dequantised_base():
    """Per-row adapters (the engine's layer) over a QuantLinear: the same outputs and gradients as
    over an nn.Linear holding the dequantised weight, with a fused and a stacked term in every row."""
    torch.manual_seed(0)
    q = QuantLinear.from_float(torch.randn(64, 96) * 0.05, "q4_1")
    dense = nn.Linear(96, 64, bias=False)
    dense.weight.data.copy_(q.dequantize())
    fused_A, fused_B = torch.randn(3, 2, 96) * 0.1, torch.randn(3, 64, 2) * 0.1
    stacked_B = torch.randn(3, 64, 4) * 0.1
    outs, grads = [], []
    for base in (q, dense):
        torch.manual_seed(1)
        layer = RowLoRALinear(base, 3, r=4, alpha=8)
        layer.lora_B.data.copy_(stacked_B)
        layer.set_fused(fused_A, fused_B)
        layer.set_rows(torch.tensor([2, 0, 2, 1]))
        x = torch.randn(4, 5, 96, generator=torch.Generator().manual_seed(2), requires_grad=True)
        y = layer(x)
        y.square().sum().backward()
        outs.append(y)
        grads.append((x.grad, layer.lora_A.grad, layer.lora_B.grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for gq, gd in zip(*grads, strict=True):
        torch.testing.assert_close(gq, gd, rtol=1e-4, atol=1e-5)


def test_quantised_layer_follows_bf16_autocast():
    """Under bf16 autocast a QuantLinear computes in bf16, as F.linear does (so the CPU kernels serve an
    fp32 model run with the profile's bf16), within the bf16 bound of the dequantised matmul."""
    torch.manual_seed(0)
    q = QuantLinear.from_float(torch.randn(64, 96) * 0.05, "q4_1")
    x = torch.randn(6, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = q(x), F.linear(x, q.dequantize())
    assert y.dtype == ref.dtype == torch.bfloat16
    assert_within(y, x, q.dequantize(), BF16_BOUND)
    assert q(x).dtype == torch.float32


def test_tiny_run_on_a_quantised_base_equals_the_run_on_its_dequantised_weights(tiny_run_inputs, tmp_path):
    """Every method a quantised base can take, end to end (the bank, OPPU and the stacked
    LoRAs train on it; Merged-only and MTA apply the fused LoRA unmerged): the same outputs as a run on a dense
    checkpoint of the q4 model's dequantised weights, and the same bank losses."""
    lamp, llm, bert = tiny_run_inputs
    q4, _ = load_model(llm, quant="q4")
    dense, _ = load_model(llm)
    for name, m in q4.named_modules():
        if isinstance(m, QuantLinear):
            dense.get_submodule(name).weight.data.copy_(m.dequantize())
    deq = tmp_path / "deq"
    shutil.copytree(llm, deq)
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(deq / "model.safetensors"))
    methods = "base,rag1,oppu,adapt_only,merged_only,mta"
    results, dirs = [], []
    for name, model, base_quant in (("q4", llm, "q4"), ("deq", deq, "none")):
        profile = make_profile(tmp_path / f"{name}.json", model, bert, base_quant=base_quant, name=name)
        argv = ["--profile", str(profile), "--lamp-dir", str(lamp), "--runs", str(tmp_path / name), "--users", "2",
                "--methods", methods, "--no-progress"]
        results.append(main("test", pipeline.reproduce, argv))
        dirs.append(tmp_path / name / "news_headline" / f"{name}-seed0")
    assert set(results[0]["methods"]) == set(methods.split(","))
    for uid, rows in results[1]["per_user"].items():
        for m, row in rows.items():
            assert results[0]["per_user"][uid][m]["queries"] == row["queries"], (uid, m)
    logs = sorted((dirs[0] / "bank").glob("*/train_log.json"))
    assert logs
    for log in logs:
        a, b = (json.loads((d / "bank" / log.parent.name / "train_log.json").read_text()) for d in dirs)
        assert a["last_loss"] == pytest.approx(b["last_loss"], rel=1e-4)


def test_a_quantised_base_refuses_a_fold_before_any_work(tiny_run_inputs, tmp_path):
    lamp, llm, bert = tiny_run_inputs
    profile = make_profile(tmp_path / "q4.json", llm, bert, base_quant="q4")
    argv = ["--profile", str(profile), "--lamp-dir", str(lamp), "--runs", str(tmp_path / "runs"), "--no-progress"]
    with pytest.raises(SystemExit, match=r"method perpcs: its 'perpcs' procedure folds a population LoRA into W0, "
                                         r"which a quantised base \(base_quant='q4'\) cannot take"):
        main("test", pipeline.reproduce, argv)
    assert not (tmp_path / "runs").exists()


def test_a_resume_with_one_user_left_on_a_quantised_base_finishes(tiny_run_inputs, tmp_path):
    """A resume that has one user left runs that user as a group of one through per-row adapters, as every other
    group, so a quantised base (which takes no fold) still serves it."""
    lamp, llm, bert = tiny_run_inputs
    profile = make_profile(tmp_path / "q4.json", llm, bert, base_quant="q4", name="q4")
    argv = ["--profile", str(profile), "--lamp-dir", str(lamp), "--runs", str(tmp_path / "runs"), "--users", "2",
            "--methods", "rag1,merged_only,mta", "--no-progress"]
    first = main("test", pipeline.reproduce, argv)
    users = tmp_path / "runs" / "news_headline" / "q4-seed0" / "users"
    for m in ("merged_only", "mta"):
        (next(users.iterdir()) / f"{m}.json").unlink()
    again = main("test", pipeline.reproduce, argv)
    assert not any(again["failures"].values())
    methods = [{u: set(rows) for u, rows in r["per_user"].items()} for r in (first, again)]
    assert methods[0] == methods[1]


# ---- NF4 (bitsandbytes' blockwise 4-bit NormalFloat, the authors' test-time base)

def _nf4_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' algorithm written out: blocks of 64 of the row-major flattened weight, absmax per block,
    each value times 1/absmax (fp32) to the nearest of the 16 code values, a tie to the lower one."""
    code = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float64)
    flat = weight.reshape(-1).float()
    codes, absmax = [], []
    for start in range(0, flat.numel(), 64):
        block = flat[start:start + 64]
        m = block.abs().max()
        absmax.append(m)
        scaled = (block * (1.0 / m)).double() if m > 0 else torch.zeros_like(block).double()
        codes += [int((code - x).abs().argmin()) for x in scaled]  # argmin: the first (lower) of a tie
    return torch.tensor(codes, dtype=torch.uint8), torch.stack(absmax)


@pytest.mark.parametrize("shape", [(48, 80), (7, 9)])  # whole blocks; one partial block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_matches_the_blockwise_reference(shape, dtype):
    torch.manual_seed(0)
    w = (torch.randn(shape) * torch.linspace(0.01, 2.0, shape[1])).to(dtype)  # scales differ along a row
    codes, absmax = quant.nf4_quantize(w)
    ref_codes, ref_absmax = _nf4_reference(w)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    back = quant.nf4_roundtrip(w)
    assert back.dtype == dtype and back.shape == w.shape
    code = torch.tensor(quant.NF4_CODE)
    expected = (code[ref_codes.long()] * ref_absmax.repeat_interleave(64)[: w.numel()]).to(dtype).reshape(shape)
    assert torch.equal(back, expected)
    # error bound: half the widest code gap (-1 .. -0.6962) of the block's absmax, plus the dtype's rounding
    bound = ref_absmax.repeat_interleave(64)[: w.numel()].reshape(shape) * (1 - 0.6961928009986877) / 2
    eps = torch.finfo(dtype).eps
    assert ((back.float() - w.float()).abs() <= bound * (1 + eps) + w.float().abs() * eps).all()


def test_nf4_code_values_are_exact_and_blocks_are_64():
    values = torch.tensor(quant.NF4_CODE)
    assert len(values) == 16 and values[7] == 0 and values[0] == -1 and values[-1] == 1
    w = torch.zeros(2, 64)
    w[0, :16] = values * 3.0  # block 0: every code value times absmax 3
    w[1, 0] = 0.5  # block 1 alone: its own absmax
    back = quant.nf4_roundtrip(w)
    assert torch.equal(back[0, :16], (values * 3.0).float()) and back[1, 0] == 0.5
    assert torch.equal(quant.nf4_quantize(w)[1], torch.tensor([3.0, 0.5]))
    # a value on a midpoint goes to the lower code, as the kernel's `x > 0.03979014977812767f` tree
    tie = torch.tensor([[1.0, 0.03979014977812767, -0.8480964004993439] + [0.0] * 61])
    assert quant.nf4_quantize(tie)[0][:3].tolist() == [15, 7, 0]


def test_a_quantised_run_whose_last_group_holds_one_user_finishes(tiny_run_inputs, tmp_path):
    """17 test users in groups of 16 on a q4 base: the 17th user, alone in its group, gets every result of every
    method a quantised base can take, as the 16 before it do."""
    from mta.methods import DEFAULT, get

    _, llm, bert = tiny_run_inputs
    lamp = make_lamp(tmp_path / "lamp", n_test=17)
    methods = [m for m in DEFAULT if get(m).procedure == "fuse_then_train"]
    profile = make_profile(tmp_path / "q4.json", llm, bert, base_quant="q4", name="q4", group_size=16)
    result = main("test", pipeline.reproduce, ["--profile", str(profile), "--lamp-dir", str(lamp), "--runs",
                                               str(tmp_path / "runs"), "--users", "17", "--methods", ",".join(methods),
                                               "--no-progress"])
    assert not any(result["failures"].values()), result["failures"]
    assert len(result["per_user"]) == 17
    for uid, rows in result["per_user"].items():
        assert set(rows) == set(methods), uid
        assert all(not row.get("error") and len(row["queries"]) == 1 for row in rows.values()), uid
    last = sorted(result["per_user"], key=lambda uid: int(uid.rpartition("t")[2]))[-1]
    run = RunDir(tmp_path / "runs" / "news_headline" / "q4-seed0")
    assert {json.loads(run.user_result(last, m).read_text())["group"] for m in methods} == {1}
