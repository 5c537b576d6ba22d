"""Many users at once against one at a time: per-row adapters (mta.multi_lora) vs a loop over users.

For U users, each with a fused K=2 bank LoRA (Eq. 5) and a stacked LoRA on top (Eq. 7), on a random Llama
of a chosen shape:

  forward   one batched forward of U rows (one per user) vs U forwards of one row through per-user
            models already folded (the fold itself not timed, which favours the loop)
  train     one optimizer step of U adapters (train_many) vs U steps of train() on the folded models
  decode    one batched greedy decode of U prompts vs U decodes

run: python tools/bench_multi.py [--users 8] [--hidden 64] [--layers 2] [--seq 32] [--device cpu] [--repeat 5]
(the default shape is the tests' tiny model; --hidden 576 --layers 30 is SmolLM2-135M's width and depth)
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mta.adapter import Adapter, set_adapter
from mta.fusion import stack_lora
from mta.llama import LlamaConfig, LlamaForCausalLM
from mta.lora import LLAMA_TARGETS, LoRAConfig, find_targets
from mta.multi_lora import generate_many, rows, set_slot, stack_many
from mta.train import TrainConfig, train
from mta.train_many import train_many


def random_adapter(model, config, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    a = Adapter(config)
    for m in find_targets(model, config.target_modules):
        lin = model.get_submodule(m)
        a.A[m] = torch.randn(config.r, lin.in_features, generator=g) * std
        a.B[m] = torch.randn(lin.out_features, config.r, generator=g) * std
    return a


def timed(fn, repeat, sync):
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    heads = max(1, args.hidden // 64) * 2
    cfg = LlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                      max_position_embeddings=4 * args.seq + args.new_tokens)
    model = LlamaForCausalLM(cfg).eval()
    U = args.users
    bank_cfg = LoRAConfig(r=8, alpha=16.0, target_modules=LLAMA_TARGETS)
    stack_cfg = LoRAConfig(r=4, alpha=8.0, target_modules=LLAMA_TARGETS)
    bank = [random_adapter(model, bank_cfg, s) for s in range(4)]
    fused = [[bank[u % 4], bank[(u + 1) % 4]] for u in range(U)]
    weights = [[0.6, 0.4]] * U
    stacked = [random_adapter(model, stack_cfg, 100 + u) for u in range(U)]

    loop = []
    for u in range(U):
        m = copy.deepcopy(model)
        stack_lora(m, fused[u], weights[u], stack_cfg, "param")
        set_adapter(m, stacked[u])
        loop.append(m.to(device))
    many = copy.deepcopy(model)
    stack_many(many, fused, weights, stack_cfg, "param", list(range(U)))
    for u in range(U):
        set_slot(many, u, stacked[u])
    many.to(device)
    ids = torch.randint(3, cfg.vocab_size, (U, args.seq), generator=torch.Generator().manual_seed(1)).to(device)
    slots = list(range(U))

    print(f"{U} users, hidden {args.hidden}, {args.layers} layers, {args.seq} tokens, {device}, "
          f"{torch.get_num_threads()} threads; best of {args.repeat}")
    results = {}
    with torch.no_grad():
        def batched_forward():
            with rows(many, slots):
                many(ids)
        results["forward"] = (timed(lambda: [m(ids[u: u + 1]) for u, m in enumerate(loop)], args.repeat, sync),
                              timed(batched_forward, args.repeat, sync))

    examples = [[(ids[u, : args.seq // 2].tolist(), ids[u, args.seq // 2:].tolist())] * 2 for u in range(U)]
    tc = TrainConfig(lr=1e-4, batch_size=2, max_steps=1, progress=False)
    results["train step"] = (timed(lambda: [train(m, examples[u], tc) for u, m in enumerate(loop)], args.repeat, sync),
                             timed(lambda: train_many(many, examples, tc), args.repeat, sync))
    kw = dict(max_new_tokens=args.new_tokens)
    loop_decode = lambda: [m.generate(ids[u: u + 1], **kw) for u, m in enumerate(loop)]  # noqa: E731
    results["decode"] = (timed(loop_decode, args.repeat, sync),
                         timed(lambda: generate_many(many, ids, None, slots, **kw), args.repeat, sync))
    print(f"{'':12}{'loop (s)':>12}{'batched (s)':>14}{'speed-up':>10}")
    for name, (a, b) in results.items():
        print(f"{name:12}{a:12.4f}{b:14.4f}{a / b:10.1f}x")


if __name__ == "__main__":
    main()
