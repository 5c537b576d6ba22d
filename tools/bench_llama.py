"""Benchmark mta.models.llama against transformers on SmolLM2-135M: same weights, threads and prompts, one run.

Prints, per dtype (fp32, the dequantized GGUF values, and bf16, those values rounded once; both sides
always hold the same tensors): greedy decode tokens/s (batch 1 and 8, 64 new tokens; ours eager and with
the decode step compiled), prefill tokens/s, the ratios ours/transformers and peak RSS. Targets: >= 1.5x
for batch-1 decode, >= 1.0x elsewhere. Batch-1 decode streams every weight once per token, so the time
of exactly that (one F.linear per weight matrix, nothing else) is printed as its roofline. Then the
quantised bases (--quants q4,q8): decode at batch 1 and 8 against transformers fp32 (target >= 3x at
batch 1), bytes read per token, peak RSS, and one LoRA training step against our fp32. Then attention alone
(--attention: only that): forward and backward of a causal pass at SmolLM2's heads, ours under bf16 autocast
(`mta.ops.attention`, per-row bf16 GEMMs) against PyTorch's SDPA in fp32 (its flash kernel) and in bf16 (what
autocast gives transformers).
transformers runs eager, its default; the first compiled run pays the compile (minutes on a CPU), which
the warm-up absorbs. Runs are interleaved (ours, theirs, ours, ...) and the best of --repeats is kept,
so load from other processes hits both sides alike.
"""

from __future__ import annotations

import argparse
import functools
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mta.models.checkpoint import load_llm
from mta.models.generation import generate
from tools.hf_twin import hf_twin

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling in a quiet park.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "Summarize the plot of Romeo and Juliet for a ten-year-old.",
    "What are the main differences between a virus and a bacterium? Answer briefly.",
    "Translate 'good morning, how are you today?' into Spanish and German.",
    "Give me a title for a blog post about learning to bake bread at home during winter.",
]


def reference_model(ours):
    """A transformers.LlamaForCausalLM holding exactly our weights, in our dtype, with no stop or pad token."""
    ref = hf_twin(ours)
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    return ref


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_streaming_floor(model, repeats: int) -> float:
    """Best seconds of one batch-1 F.linear per weight matrix (lm_head included): the bytes a decode step reads."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = {w.shape[1]: torch.ones(1, w.shape[1], dtype=w.dtype) for w in weights}

    @torch.inference_mode()
    def stream():
        for w in weights:
            torch.nn.functional.linear(x[w.shape[1]], w)

    stream()
    return min(timed(stream) for _ in range(repeats))


def bench(args, dtype: torch.dtype) -> None:
    ours, tok = load_llm(args.model)
    ours.to(dtype)
    rss_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ref = reference_model(ours)
    n = args.new_tokens

    def batch(size):
        return tok.pad([tok.chat_prompt(p) for p in PROMPTS[:size]], side="left")

    def ours_decode(ids, mask, compile=False):
        out = generate(ours, ids, attention_mask=mask, max_new_tokens=n, compile=compile)
        assert out.shape[1] == n

    def ours_decode_compiled(ids, mask):
        ours_decode(ids, mask, compile=True)

    def ref_decode(ids, mask):
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out.shape[1] == ids.shape[1] + n

    @torch.inference_mode()
    def ours_prefill(ids, mask):
        ours.lm_head(ours.hidden_states(ids, mask)[:, -1])

    @torch.inference_mode()
    def ref_prefill(ids, mask):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ref(ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)

    long_prompts = [tok.encode(" ".join(PROMPTS[i:] + PROMPTS[:i]) * 2)[:128] for i in range(8)]
    prefill_ids, prefill_mask = tok.pad(long_prompts, side="left")
    print(f"\nmodel {args.model}, {dtype}, {args.threads} threads, best of {args.repeats} interleaved runs")
    print(f"{'':16s} {'ours tok/s':>11s} {'transformers':>13s} {'ratio':>7s}", flush=True)
    rates = {}
    for label, (ours_fn, ref_fn), (ids, mask), tokens in [
        ("decode batch 1", (ours_decode, ref_decode), batch(1), n),
        ("  compiled", (ours_decode_compiled, ref_decode), batch(1), n),
        ("decode batch 8", (ours_decode, ref_decode), batch(8), 8 * n),
        ("  compiled", (ours_decode_compiled, ref_decode), batch(8), 8 * n),
        ("prefill 8x128", (ours_prefill, ref_prefill), (prefill_ids, prefill_mask), int(prefill_mask.sum())),
    ]:
        ours_fn(ids, mask)  # warm-up
        ref_fn(ids, mask)
        t_ours, t_ref = [], []
        for _ in range(args.repeats):
            t_ours.append(timed(functools.partial(ours_fn, ids, mask)))
            t_ref.append(timed(functools.partial(ref_fn, ids, mask)))
        a, b = rates[label] = tokens / min(t_ours), tokens / min(t_ref)
        print(f"{label:16s} {a:11.1f} {b:13.1f} {a / b:6.2f}x", flush=True)
    roof = 1 / weight_streaming_floor(ours, args.repeats)
    a, b = rates["decode batch 1"]
    print(f"{'batch-1 roofline':16s} {roof:11.1f} {'':13s} {roof / b:6.2f}x  (weights streamed once per token; "
          f"ours eager at {a / roof:.0%} of it)", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the process so far: {rss_ours:.0f} MiB after loading ours, {rss:.0f} MiB with both models")


def weight_bytes(model) -> int:
    """Bytes a batch-1 decode step reads: every parameter and buffer once (shared storage counted once)."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def bench_quant(args) -> None:
    """The quantised bases (q4, q8) beside our fp32 and transformers fp32: greedy decode at batch 1 and 8,
    one LoRA training step, bytes read per decoded token, peak RSS after each load."""
    from mta.peft.lora import LLAMA_TARGETS, LoRAConfig, inject_lora
    from mta.training.train import TrainConfig, train

    dtype = getattr(torch, args.quant_dtype)  # of our models' activations and float weights
    fp32, tok = load_llm(args.model)
    models, rss = {"fp32": fp32}, {"fp32": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if dtype != torch.float32:
        models[args.quant_dtype] = load_llm(args.model, dtype=dtype)[0]
        rss[args.quant_dtype] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for q in args.quants.split(","):
        models[q] = load_llm(args.model, dtype=dtype, quant=q)[0]
        rss[q] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ref = reference_model(fp32)
    n = args.new_tokens

    def decode(model, ids, mask):
        if model is ref:
            ref.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        else:
            generate(model, ids, attention_mask=mask, max_new_tokens=n)

    print(f"\nmodel {args.model}: quantised bases in {args.quant_dtype} (transformers in fp32), "
          f"{args.threads} threads, best of {args.repeats} interleaved runs")
    print(f"{'decode tok/s':16s} {'transformers':>13s}" + "".join(f"{'ours ' + k:>15s}" for k in models)
          + f"  ours {'/'.join(models)} / transformers")
    for size in (1, 8):
        ids, mask = tok.pad([tok.chat_prompt(p) for p in PROMPTS[:size]], side="left")
        sides = [ref, *models.values()]
        for m in sides:
            decode(m, ids, mask)  # warm-up
        best = [float("inf")] * len(sides)
        for _ in range(args.repeats):
            for i, m in enumerate(sides):
                best[i] = min(best[i], timed(functools.partial(decode, m, ids, mask)))
        rates = [size * n / t for t in best]
        print(f"{'batch ' + str(size):16s} {rates[0]:13.1f}" + "".join(f"{r:15.1f}" for r in rates[1:])
              + "  " + " / ".join(f"{r / rates[0]:.2f}x" for r in rates[1:]), flush=True)
    print(f"{'MB per token':16s} {weight_bytes(fp32) / 1e6:13.0f}"
          + "".join(f"{weight_bytes(m) / 1e6:15.0f}" for m in models.values()) + "  (weights read once per token)")
    print(f"{'peak RSS, MiB':16s} {'':13s}" + "".join(f"{rss[k]:15.0f}" for k in models) + "  (after each load)")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(3, 1000, (112,), generator=g).tolist(), torch.randint(3, 1000, (16,), generator=g).tolist())
            for _ in range(8)]
    rates = {}
    for k, m in models.items():
        torch.manual_seed(0)
        inject_lora(m, LoRAConfig(r=8, alpha=16.0, target_modules=LLAMA_TARGETS))
        rates[k] = max(train(m, data, TrainConfig(lr=1e-4, batch_size=4, progress=False)).tokens_per_second
                       for _ in range(2))
    print(f"{'LoRA train tok/s':16s} {'':13s}" + "".join(f"{rates[k]:15.1f}" for k in models)
          + "  (rank 8 on every linear, batch 4 x 128 tokens, best of 2 epochs of 2 steps)")


def attention_step(fn, dtype: torch.dtype, qkv: list[torch.Tensor], grad: torch.Tensor) -> None:
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in qkv)
    fn(q, k, v).backward(grad.to(dtype))


def bench_attention(args) -> None:
    """Forward + backward of causal attention, 8 rows, 9 query heads sharing 3 kv heads of dim 64 (SmolLM2), by
    sequence length: best of --repeats, interleaved."""
    import torch.nn.functional as F

    from mta.ops.attention import gemm_attention
    from mta.precision import bf16_supported

    if not bf16_supported("cpu"):
        print("attention: this CPU has no native bf16; fp32 runs SDPA, so there is nothing to compare")
        return
    sdpa = functools.partial(F.scaled_dot_product_attention, is_causal=True, enable_gqa=True)
    ways = {"ours, bf16 GEMMs": (gemm_attention, torch.bfloat16), "SDPA fp32 (flash)": (sdpa, torch.float32),
            "SDPA bf16": (sdpa, torch.bfloat16)}
    print(f"\n{'attention fwd+bwd':18s}" + "".join(f"{name:>20s}" for name in ways) + "   ours vs fp32 flash")
    for T in (128, 256, 384):
        g = torch.Generator().manual_seed(T)
        base = [torch.randn(8, h, T, 64, generator=g) for h in (9, 3, 3)]
        grad = torch.randn(8, 9, T, 64, generator=g)

        best = {name: float("inf") for name in ways}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, (fn, dtype) in ways.items():
                best[name] = min(best[name], timed(functools.partial(attention_step, fn, dtype, base, grad)))
        ratio = best["SDPA fp32 (flash)"] / best["ours, bf16 GEMMs"]
        print(f"{f'T = {T}':18s}" + "".join(f"{1e3 * t:17.1f} ms" for t in best.values()) + f"   {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    parser.add_argument("--quants", default="q4,q8", help="quantised bases to compare ('' for none)")
    parser.add_argument("--quant-dtype", default="float32",
                        help="our models' dtype beside the quantised bases (bfloat16: torch's int4/int8 CPU kernels)")
    parser.add_argument("--attention", action="store_true", help="only the attention figure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.attention:
        return bench_attention(args)
    for dtype in filter(None, args.dtypes.split(",")):
        bench(args, getattr(torch, dtype))
    if args.quants:
        bench_quant(args)
    bench_attention(args)


if __name__ == "__main__":
    main()
