"""The batched engine at paper scale on one GPU, without weights: a randomly initialised Llama-3-8B-shaped
model in bf16 (32 layers, 4096 wide, GQA 32/8 heads, 14,336 FFN, 128,256 tokens).

  bank     8 meta-LoRAs (rank 8, every linear) trained together in one pass (`mta.training.train_many`)
  users    32 users, each fusing 2 of those meta-LoRAs (Eq. 5, unmerged) under a fresh rank-4 stacked LoRA
           (Eq. 7), all trained together in one pass
  decode   one batched greedy decode of those 32 users (`mta.peft.multi_lora.generate_many`)

Each reports wall time and peak GPU memory; then the CUDA test subset (`pytest -m cuda`) runs.
run: python tools/gpu_check.py            (on a CUDA machine; about 5 minutes on one H200)
     python tools/gpu_check.py --shape tiny --device cpu --no-tests   (the same steps on a tiny model)
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mta.models.llama import LlamaConfig, LlamaForCausalLM
from mta.peft.lora import LLAMA_TARGETS, LoRAConfig
from mta.peft.multi_lora import generate_many, get_row_adapter, stack_many, unload_row_lora
from mta.training.train import TrainConfig
from mta.training.train_many import train_many

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                             max_position_embeddings=8192),
    "tiny": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
}
BANK = LoRAConfig(r=8, alpha=16.0, target_modules=LLAMA_TARGETS)  # the paper profile's meta-LoRA
STACK = LoRAConfig(r=4, alpha=8.0, target_modules=LLAMA_TARGETS)  # Table 4's stacked LoRA


def examples(n_users: int, n_items: int, prompt: int, response: int, vocab: int, seed: int) -> list[list]:
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randint(3, vocab, (prompt,), generator=g).tolist(),
              torch.randint(3, vocab, (response,), generator=g).tolist()) for _ in range(n_items)]
            for _ in range(n_users)]


def measured(name: str, device: torch.device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB peak"
    else:
        peak = "peak n/a on CPU"
    print(f"{name:8} {time.perf_counter() - t:8.1f} s   {peak}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--items", type=int, default=4, help="training items per anchor and per user")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens per item")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rows-per-pass", type=int, default=4, help="as the paper profile")
    ap.add_argument("--no-tests", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; on a CPU run --shape tiny --device cpu")
    cfg, bf16 = SHAPES[args.shape], device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    print(f"{args.shape} on {device} ({torch.cuda.get_device_name(device) if bf16 else 'cpu'}), {dtype}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters; {args.items} items of "
          f"{args.prompt}+16 tokens per adapter, {args.rows_per_pass} rows per pass", flush=True)
    recipe = TrainConfig(lr=1e-4, batch_size=2, progress=False, bf16=bf16)
    vocab = cfg.vocab_size

    def bank():
        stack_many(model, [[]] * 8, [[]] * 8, BANK, "param", seeds=list(range(8)))
        train_many(model, examples(8, args.items, args.prompt, 16, vocab, 1), recipe,
                   rows_per_pass=args.rows_per_pass)
        adapters = [get_row_adapter(model, u, BANK) for u in range(8)]
        unload_row_lora(model)
        return adapters

    adapters = measured("bank", device, bank)
    users = 32
    fused = [[adapters[u % 8], adapters[(u + 3) % 8]] for u in range(users)]
    weights = [[0.55, 0.45]] * users

    def stack_and_train():
        stack_many(model, fused, weights, STACK, "param", seeds=list(range(100, 100 + users)))
        train_many(model, examples(users, args.items, args.prompt, 16, vocab, 2), recipe,
                   rows_per_pass=args.rows_per_pass)

    measured("users", device, stack_and_train)
    prompts = torch.randint(3, vocab, (users, args.prompt), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        out = measured("decode", device, lambda: generate_many(model, prompts, None, list(range(users)), bf16=bf16,
                                                               max_new_tokens=args.new_tokens))
    assert out.shape == (users, args.new_tokens), out.shape
    if not args.no_tests:
        sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "cuda", str(ROOT / "tests")], cwd=ROOT))


if __name__ == "__main__":
    main()
