"""Many users at once against one at a time: per-row adapters (mta.peft.multi_lora) vs a loop over users.

For U users, each with a fused K=2 bank LoRA (Eq. 5) and a stacked LoRA on top (Eq. 7), on a random Llama
of a chosen shape:

  forward   one batched forward of U rows (one per user) vs U forwards of one row through per-user
            models already folded (the fold itself not timed, which favours the loop)
  train     one optimizer step of U adapters (train_many) vs U steps of train() on the folded models
  decode    one batched greedy decode of U prompts vs U decodes

run: python tools/bench_multi.py [--users 8] [--hidden 64] [--layers 2] [--seq 32] [--device cpu] [--repeat 5]
(the default shape is the tests' tiny model; --hidden 576 --layers 30 is SmolLM2-135M's width and depth)

With --llm (e.g. smollm2-135m, real weights), the decode figure instead: U users' MTA adapters, 32 new
tokens each, ours in one batch vs ours one user at a time (fold, then a batch-1 decode; the fold not timed)
vs PEFT's mixed-adapter batch (`generate(..., adapter_names=...)`, one rank-12 adapter per user holding
the fused and the stacked factors), with each side's agreement with ours one at a time and peak RSS;
and the bank figure: 8 fresh rank-8 meta-LoRAs, 4 items of --seq + 16 tokens each (2 steps at batch 2),
trained one at a time (train) vs together (train_many, 8 rows per pass), with their losses compared, and
together in bf16 where the CPU has it; each with its model FLOPs utilisation (tools/model_flops.py).

With --stage3 RUN_DIR (a finished `make reproduce` directory), stage 3 of the pipeline itself: every method for
the first --users test users on that run's bank and stage-1/2 artifacts, four ways, each in a fresh process
(so each peak RSS is its own): one user at a time in fp32 (`group_size=1`, the reference), in groups in fp32, in
groups in bf16 where the CPU has it natively, and those bf16 groups over 2 one-thread worker processes
(`--executor processes`); users per minute, the speed-up of each lever, and the share of (user, method) outputs
identical to the reference. The group size and rows per pass of the groups are the run's own (its config.json,
as the calibration chose them); the peak RSS is the driver's.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import multiprocessing
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mta.models.generation import generate
from mta.models.llama import LlamaConfig, LlamaForCausalLM
from mta.peft.adapter import Adapter, set_adapter
from mta.peft.fusion import stack_lora
from mta.peft.lora import LLAMA_TARGETS, LoRAConfig, find_targets, inject_lora
from mta.peft.multi_lora import generate_many, row_layers, rows, set_slot, stack_many
from mta.precision import bf16_supported
from mta.training.train import TrainConfig, train
from mta.training.train_many import train_many
from tools.model_flops import linear_params, peak_gemm_flops


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
    ap.add_argument("--llm", default=None, help="real weights: the decode figure against PEFT (see above)")
    ap.add_argument("--stage3", type=Path, default=None, help="a finished run directory: stage 3 timed (see above)")
    args = ap.parse_args()
    if args.stage3:
        return stage3_against_one_at_a_time(args.stage3, args.users)
    if args.llm:
        return decode_against_peft(args)
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
    loop_decode = lambda: [generate(m, ids[u: u + 1], **kw) for u, m in enumerate(loop)]  # noqa: E731
    results["decode"] = (timed(loop_decode, args.repeat, sync),
                         timed(lambda: generate_many(many, ids, None, slots, **kw), args.repeat, sync))
    print(f"{'':12}{'loop (s)':>12}{'batched (s)':>14}{'speed-up':>10}")
    for name, (a, b) in results.items():
        print(f"{name:12}{a:12.4f}{b:14.4f}{a / b:10.1f}x")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peft_twin(model, many, users: int):
    """transformers + PEFT holding our weights and one adapter per user: slot u's fused pair (scaling
    inside B) and stacked pair (times its scaling) concatenated into one rank-(r_f + r) LoRA, alpha = rank."""
    from bench_llama import reference_model

    peft = importlib.import_module("peft")
    layers = row_layers(many)
    some = next(iter(layers.values()))
    rank = some.fused_A.shape[1] + some.r
    cfg = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(LLAMA_TARGETS))
    hf = peft.get_peft_model(reference_model(model), cfg, adapter_name="u0")
    for u in range(1, users):
        hf.add_adapter(f"u{u}", cfg)
    with torch.no_grad():
        for name, layer in layers.items():
            target = hf.base_model.model.get_submodule(name)
            for u in range(users):
                target.lora_A[f"u{u}"].weight.copy_(torch.cat([layer.fused_A[u], layer.lora_A[u]], 0))
                target.lora_B[f"u{u}"].weight.copy_(torch.cat([layer.fused_B[u], layer.scaling * layer.lora_B[u]], 1))
    return hf.eval()


def decode_against_peft(args) -> None:
    from mta.models.checkpoint import load_llm

    U, new = args.users, 32
    model, _ = load_llm(args.llm)
    rss_model = peak_rss_mib()
    bank_cfg = LoRAConfig(r=8, alpha=16.0, target_modules=LLAMA_TARGETS)
    stack_cfg = LoRAConfig(r=4, alpha=8.0, target_modules=LLAMA_TARGETS)
    bank = [random_adapter(model, bank_cfg, s, std=0.01) for s in range(4)]
    fused = [[bank[u % 4], bank[(u + 1) % 4]] for u in range(U)]
    weights = [[0.6, 0.4]] * U
    stacked = [random_adapter(model, stack_cfg, 100 + u, std=0.01) for u in range(U)]
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.seq // 2, args.seq + 1, (U,), generator=g).tolist()
    T = max(lengths)
    ids, mask = torch.zeros(U, T, dtype=torch.long), torch.zeros(U, T, dtype=torch.long)
    for n, n_tok in enumerate(lengths):  # left padding
        ids[n, T - n_tok:] = torch.randint(3, model.config.vocab_size, (n_tok,), generator=g)
        mask[n, T - n_tok:] = 1

    alone, seconds = [], 0.0
    with torch.no_grad():
        for u in range(U):
            m = copy.deepcopy(model)
            stack_lora(m, fused[u], weights[u], stack_cfg, "param")
            set_adapter(m, stacked[u])
            prompt = ids[u: u + 1, T - lengths[u]:]
            t = time.perf_counter()
            alone.append(generate(m, prompt, max_new_tokens=new)[0, -new:])
            seconds += time.perf_counter() - t
            del m
        rss_alone = peak_rss_mib()
        many = copy.deepcopy(model)
        stack_many(many, fused, weights, stack_cfg, "param", list(range(U)))
        for u in range(U):
            set_slot(many, u, stacked[u])
        slots = list(range(U))
        t = time.perf_counter()
        ours = generate_many(many, ids, mask, slots, max_new_tokens=new)
        batched = time.perf_counter() - t
        rss_ours = peak_rss_mib()
        hf = peft_twin(model, many, U)
        t = time.perf_counter()
        ref = hf.generate(input_ids=ids, attention_mask=mask, adapter_names=[f"u{u}" for u in slots],
                          max_new_tokens=new, do_sample=False)[:, -new:]
        peft_s = time.perf_counter() - t
    rss_peft = peak_rss_mib()
    same = lambda out: sum(torch.equal(out[u], alone[u]) for u in range(U))  # noqa: E731
    print(f"{args.llm}: {U} users, prompts of {args.seq // 2}..{args.seq} tokens, {new} new tokens, "
          f"{torch.get_num_threads()} threads, one run each")
    print(f"{'':24}{'seconds':>9}{'tok/s':>8}{'rows = one at a time':>22}{'peak RSS so far (MiB)':>23}")
    for name, sec, out, rss in (("ours, one at a time", seconds, None, rss_alone), ("ours, one batch", batched, ours,
                                rss_ours), ("PEFT mixed-adapter batch", peft_s, ref, rss_peft)):
        agree = f"{U}/{U}" if out is None else f"{same(out)}/{U}"
        print(f"{name:24}{sec:9.2f}{U * new / sec:8.1f}{agree:>22}{rss:23.0f}")
    print(f"speed-up of ours batched: {seconds / batched:.1f}x over one at a time (target >= 3x), "
          f"{peft_s / batched:.1f}x over PEFT (target >= 1.5x); RSS after loading the model {rss_model:.0f} MiB")
    bank_against_loop(model, bank_cfg, args.seq)


def bank_against_loop(model, config: LoRAConfig, seq: int, anchors: int = 8) -> None:
    g = torch.Generator().manual_seed(2)
    vocab = model.config.vocab_size
    item = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    data = [[(item(seq), item(16)) for _ in range(4)] for _ in range(anchors)]
    tc = TrainConfig(lr=1e-4, batch_size=2, progress=False)
    device = next(model.parameters()).device
    native = bf16_supported(device)
    peak = {bf16: peak_gemm_flops(torch.bfloat16 if bf16 else torch.float32) for bf16 in (False, True)[: 1 + native]}
    linear = linear_params(model)
    loop, tokens, t = [], 0, time.perf_counter()
    for a in range(anchors):
        m = copy.deepcopy(model)
        torch.manual_seed(a)
        inject_lora(m, config)
        log = train(m, data[a], tc)
        loop.append(log.losses)
        tokens += log.tokens
        del m
    alone = time.perf_counter() - t
    mfu = lambda seconds, bf16: 4 * linear * tokens / seconds / peak[bf16]  # noqa: E731 (forward, backward to x)
    print(f"bank, {anchors} meta-LoRAs x 2 steps, one at a time in fp32: {alone:.1f} s, MFU {mfu(alone, False):.0%} "
          f"(peak GEMM " + ", ".join(f"{'bf16' if k else 'fp32'} {v / 1e12:.2f}" for k, v in peak.items())
          + " TFLOP/s; target: together >= 1.5x)")
    for bf16 in (False, True)[: 1 + native]:
        many = copy.deepcopy(model)
        stack_many(many, [[]] * anchors, [[]] * anchors, config, "param", list(range(anchors)))
        t = time.perf_counter()
        logs = train_many(many, data, dataclasses.replace(tc, bf16=bf16), rows_per_pass=8)
        together = time.perf_counter() - t
        worst = max(abs(a - b) / abs(b) for log, ref in zip(logs, loop, strict=True)
                    for a, b in zip(log.losses, ref, strict=True))
        print(f"  together in {'bf16' if bf16 else 'fp32'}: {together:.1f} s, {alone / together:.2f}x, MFU "
              f"{mfu(together, bf16):.0%}; largest relative loss difference from one at a time {worst:.1e}")


# (name, group size (None: the run's own), bf16, worker processes (0: this process))
STAGE3_WAYS = (("one at a time, fp32", 1, False, 0), ("groups, fp32", None, False, 0), ("groups, bf16", None, True, 0),
               ("groups, bf16, 2 workers", None, True, 2))


def stage3_way(run_dir: Path, users: int, group_size: int | None, bf16: bool | None,
               executor=None) -> tuple[float, float, dict]:
    """Stage 3 of `run_dir`'s run for its first `users` test users under (group size, bf16) and `executor` (the
    local one by default), in a scratch directory that shares the run's artifacts: (seconds, the driver's
    peak RSS in MiB, (user, method) -> output). The run's recipes, rows per pass and group size (unless
    `group_size` names one) are its own: those its config.json records, as the calibration chose them."""
    from mta.files import read_json
    from mta.methods import DEFAULT
    from mta.run.executor import Executor
    from mta.run.pipeline import Run, collect, stage3_run, stored_profile
    from mta.run.rundir import RunDir

    config = read_json(run_dir / "config.json")
    profile = stored_profile(run_dir / "config.json")
    profile = profile.replace(bf16=bf16, group_size=group_size or profile.group_size)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(task=config["task"], profile=profile, lamp_dir=Path(config["lamp_dir"]), seed=config["seed"],
                  n_users=users, methods=DEFAULT, progress=False, run_dir=RunDir(Path(tmp), shared=run_dir),
                  executor=executor or Executor())
        if run.executor.kind == "local":
            run.engine  # noqa: B018 (the model loads outside the timed part; Ray workers load theirs inside it)
        t = time.perf_counter()
        stage3_run(run)
        seconds = time.perf_counter() - t
        rows = collect(run)
    outputs = {(uid, m): tuple(q["output"] for q in r["queries"]) if "queries" in r else r.get("error")
               for m, per in rows.items() for uid, r in per.items()}
    return seconds, peak_rss_mib(), outputs


def stage3_in_fresh_process(run_dir: Path, users: int, group_size: int | None, bf16: bool | None,
                            executor=None) -> tuple[float, float, dict]:
    """`stage3_way` in a new process, so that no way inherits another's allocator, caches or threads."""
    if not (run_dir / "config.json").exists():
        raise SystemExit(f"--stage3: {run_dir} has no config.json (give a finished run directory)")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(stage3_way, run_dir, users, group_size, bf16, executor).result()


def stage3_against_one_at_a_time(run_dir: Path, users: int) -> None:
    from mta.run.executor import Executor

    ways = [w for w in STAGE3_WAYS if not w[2] or bf16_supported("cpu")]
    results = {}
    for name, group_size, bf16, workers in ways:
        executor = Executor("processes", workers=workers, threads=max(1, torch.get_num_threads() // workers)) \
            if workers else None
        results[name] = stage3_in_fresh_process(run_dir, users, group_size, bf16, executor)
        print(f"  {name}: {results[name][0]:.0f} s", flush=True)
    ref_s, _, ref = results[STAGE3_WAYS[0][0]]
    methods = sorted({m for _, m in ref})
    print(f"stage 3, {users} users x {len(methods)} methods, {torch.get_num_threads()} threads, on {run_dir}")
    print(f"{'':22}{'seconds':>9}{'users/min':>11}{'speed-up':>10}{'peak RSS (MiB)':>16}   identical to one at a time")
    for name, (sec, rss, out) in results.items():
        same = sum(out.get(k) == v for k, v in ref.items())
        by_method = ", ".join(f"{m} {sum(out.get(k) == v for k, v in ref.items() if k[1] == m)}"
                              for m in methods)
        print(f"{name:22}{sec:9.0f}{60 * users / sec:11.2f}{ref_s / sec:9.2f}x{rss:16.0f}   "
              f"{same}/{len(ref)} ({by_method})")
    print("target: groups >= 2x one at a time (users per minute)")


if __name__ == "__main__":
    main()
