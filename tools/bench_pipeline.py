"""The pipeline end to end against an in-process transformers + peft peer: same recipe, users, machine and threads.

On the first --users LaMP-4 dev users (<LAMP_DIR>/news_headline), the `cpu` profile's recipe (V, K, caps, LoRA
recipes; printed) runs twice, each side in a fresh process so its resident memory and threads are its own:

  ours   `mta.run.pipeline.reproduce` on a cold run directory (methods base, merged_only, adapt_only, mta), the
         model loaded before the clock starts; bf16 as the profile resolves it (--ours-fp32: fp32).
  peer   the three stages as the authors' stack runs them, one adapter at a time, on a transformers
         LlamaForCausalLM holding our dequantised SmolLM2-135M weights (fp32; --peer-bf16: bf16 autocast):
         1a  anchors: ours' stage-1 selection, read from the run directory (clustering, no LLM compute).
         1b  bank: one PEFT LoRA per anchor (`get_peft_model`, the bank recipe) trained by a Trainer-style loop
             (torch AdamW, the recipe's schedule from transformers' `get_scheduler`, gradient accumulation and
             clipping, right-padded batches, loss on the response tokens only), then unloaded.
         2   matching: ours' stage-2 similarities (encoder, no LLM compute), top K and Eq. 6 weights as ours.
         3   per user: base (W0); merged_only (the K anchors' LoRAs loaded, PEFT `add_weighted_adapter`, folded
             by `merge_and_unload`); adapt_only (a rank-4 PEFT LoRA on W0 trained on the user's examples, folded);
             mta (the fused LoRA folded into W0, then a fresh rank-4 LoRA trained and folded); each decoded by
             `generate(do_sample=False)` one query at a time (batch 1, unpadded); W0 restored from a pristine
             copy after every method. Decoding on the folded weights is the faster of PEFT's two ways.
         Both sides see identical token ids (our `Engine`'s examples, tokenisation and test prompts), data order
         (`mta.training.train.step_batches` with the recipe's seed) and LoRA initialisation
         (`mta.peft.multi_lora.fresh_adapter`): they differ in the model compute only. --peer-fusion match (the
         default) picks the PEFT combination that computes ours' Eq. 5 in the profile's merge space: `param`,
         s (Σ w_i B_i)(Σ w_i A_i), is PEFT's `linear` with weights w_i² (equal ranks and scalings); `delta`,
         Σ w_i s_i B_i A_i, is PEFT's `cat` with weights w_i. --peer-fusion cat takes `cat` whatever the space.

Printed (and written with --json): wall seconds per stage for both sides and their ratio, the end-to-end ratio
(bank + stage 3) against the 3x target, model FLOPs utilisation of each training and decode phase (useful FLOPs:
4 x decoder linear parameters x tokens for a LoRA training pass, forward and backward to the activations; 2 x
decoder linear parameters x prompt and output tokens for decoding; lm_head and attention's own products left
out, a lower bound; over the phase's seconds times the peak GEMM rate of the side's arithmetic, the best of its
measurements here before and after the two sides ran), ROUGE-1 / ROUGE-L with user-bootstrap intervals per method
and side, how many users' outputs are identical strings, each adapter's first and last loss on both sides, CPU,
torch and threads.

run: python tools/bench_pipeline.py [--lamp-dir DIR] [--users 20] [--runs DIR] [--smoke] [--ours-fp32]
     [--peer-bf16] [--peer-fusion match|cat] [--json out.json]
     python tools/bench_pipeline.py --mfu RUN_DIR: the MFU of a finished run's bank and stage 3 only
--smoke: 2 users, V = 2 anchors of at most 4 items, stage 1a on 16 candidates of at most 8 items (minutes).
transformers and peft are the peer; only this benchmark imports them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mta.eval.metrics import bootstrap_ci, score_outputs
from mta.files import read_json, write_json
from mta.methods import get
from mta.models.checkpoint import load_llm
from mta.peft.multi_lora import fresh_adapter
from mta.precision import bf16_supported
from mta.profiles import CPU, LoRASpec, Profile
from mta.run.executor import Executor
from mta.run.pipeline import Run, reproduce, stored_profile, unit_failure, unit_result
from mta.seeding import derive_seed
from mta.stages.engine import Engine, fit_text
from mta.stages.matching import fused_anchors
from mta.stages.personalize import method_prompts
from mta.training.train import schedule_length, step_batches
from tools.hf_twin import hf_twin
from tools.model_flops import linear_params, peak_gemm_flops

TASK = "news_headline"
METHODS = ("base", "merged_only", "adapt_only", "mta")
SMOKE = dict(n_anchors=2, max_items_per_anchor=4, max_candidates=16, max_items_embedded=8)
SMOKE_USERS = 2
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}  # ours -> get_scheduler


def reference(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        sys.exit(f"bench_pipeline: the peer needs `{name}` (pip install -e '.[test]')")


def bench_profile(smoke: bool, ours_fp32: bool) -> Profile:
    """The `cpu` profile, with the smoke caps; with `ours_fp32` ours computes in fp32 (the peer reads recipes only)."""
    p = CPU.replace(name="cpu-smoke", **SMOKE) if smoke else CPU
    return p.replace(name=f"{p.name}-fp32", bf16=False) if ours_fp32 else p


def make_run(args) -> Run:
    return Run(task=TASK, profile=bench_profile(args.smoke, args.ours_fp32), lamp_dir=args.lamp_dir, runs=args.runs,
               n_users=args.users, methods=METHODS, progress=False)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def test_ids(engine: Engine, prompt: str) -> list[int]:
    """The token ids `Engine.generate` decodes `prompt` from (the test template, cut to the test cap)."""
    budget, tok = engine.test_budget(), engine.test_tok
    return tok.chat_prompt(prompt if budget is None else fit_text(tok, prompt, budget))


def max_new_tokens(engine: Engine) -> int:
    return engine.conditions.max_new_tokens or engine.profile.max_new_tokens


def decode_tokens(engine: Engine, prompt: str, output: str) -> int:
    """Useful tokens of one decode: the test prompt's and the output's (re-tokenised, plus its stop token, at most
    max_new_tokens), counted alike for both sides."""
    return len(test_ids(engine, prompt)) + min(len(engine.tok.encode(output)) + 1, max_new_tokens(engine))


def unit_row(engine: Engine, user, method: str, outputs: Sequence[str], seconds: dict, train: dict | None) -> dict:
    prompts = method_prompts(engine.task, user, get(method), engine.profile.prompt_style)
    return {"outputs": list(outputs), "golds": [q.gold for q in user.query], "seconds": seconds,
            "train": train, "decode_tokens": sum(decode_tokens(engine, p, o)
                                                 for p, o in zip(prompts, outputs, strict=True))}


def train_summary(losses: Sequence[float], tokens: int, seconds: float) -> dict:
    return {"losses": list(losses), "tokens": tokens, "seconds": seconds}


def side_facts(engine: Engine, bf16: bool) -> dict:
    return {"bf16": bf16, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "linear_params": linear_params(engine.model),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ------------------------------------------------------------------------------------------------------------ ours
def ours(args) -> dict:
    """`reproduce` on a cold run directory, as `mta reproduce` runs it, the model loaded first (not timed)."""
    run = make_run(args)
    run.check_inputs()
    with run.dir.lock():
        tic = time.perf_counter()
        run.write_config()  # settles the profile's measured fields (a calibration, unless cached) first
        engine = run.engine
        load = time.perf_counter() - tic
        reproduce(run)
    side = collect(run, engine, METHODS)
    side["stages"]["load"] = load
    return side


def collect(run: Run, engine: Engine, methods: Sequence[str]) -> dict:
    """A finished run directory's stage times, bank train logs and stage-3 units of `methods` (missing ones left
    out), in the form `phases` and `report` read."""
    p = run.profile
    timings = read_json(run.dir.timings)
    anchors = [a["user_id"] for a in read_json(run.dir.anchors)["anchors"]]
    bank, bank_train = {}, 0.0
    for a in anchors:
        log = read_json(run.dir.adapter(a) / "train_log.json")
        bank[a] = train_summary(log["losses"], log["tokens"], log["seconds"])
        bank_train += log["seconds"] / log.get("group", 1)  # a group's log holds the group's seconds: once a group
    users: dict[str, dict] = {m: {} for m in methods}
    for u in run.test_users:
        for m in methods:
            result = unit_result(run, u, m)
            if result is None:
                failed = unit_failure(run, u, m)
                users[m][u.user_id] = {"error": failed["error"] if failed else "no result"}
                continue
            train = result.get("train")
            users[m][u.user_id] = unit_row(
                engine, u, m, [q["output"] for q in result["queries"]],
                {k: v for k, v in result["seconds"].items() if k != "match"},  # stage 2's share, not stage 3's
                train_summary(train["losses"], train["tokens"], train["seconds"]) if train else None)
    stages = {**timings, "bank": timings["stage1b_bank"]}
    return {"side": "ours", "stages": stages, "bank": bank, "bank_train_s": bank_train, "users": users,
            "recipe": p.describe(), "group_size": p.group_size, "rows_per_pass": p.rows_per_pass,
            **side_facts(engine, p.bf16)}


# ------------------------------------------------------------------------------------------------------------ peer
def peft_config(spec: LoRASpec):
    peft = reference("peft")
    targets = "all-linear" if spec.targets == "all" else list(spec.targets)
    return peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets)


@torch.no_grad()
def set_factors(peft_model, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Adapter `name`'s (A, B) of every module, by our module path (PEFT's without `base_model.model.`)."""
    model = peft_model.base_model.model
    for module, (A, B) in factors.items():
        layer = model.get_submodule(module)
        layer.lora_A[name].weight.copy_(A)
        layer.lora_B[name].weight.copy_(B)


def get_factors(peft_model, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n.removeprefix("base_model.model."): (m.lora_A[name].weight.detach().clone(),
                                                  m.lora_B[name].weight.detach().clone())
            for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and name in m.lora_A}


class Peer:
    """transformers + peft, one adapter at a time, on our weights, tokens and data order."""

    def __init__(self, engine: Engine, bf16: bool, fusion: str):
        self.engine, self.p, self.bf16 = engine, engine.profile, bf16
        self.hf = hf_twin(engine.model, torch.float32)
        self.w0 = {n: m.weight.detach().clone() for n, m in self.hf.named_modules()
                   if isinstance(m, nn.Linear) and n != "lm_head"}  # the pristine W0 every method starts from
        self.combination = ("cat" if self.p.merge_space == "delta" else "linear") if fusion == "match" else "cat"
        if fusion == "match" and self.p.merge_space not in ("param", "delta"):
            raise ValueError(f"--peer-fusion match: PEFT has no combination for merge_space "
                             f"{self.p.merge_space!r}; use --peer-fusion cat")

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    @torch.no_grad()
    def restore(self) -> None:
        for n, m in self.hf.named_modules():
            if n in self.w0:
                m.weight.copy_(self.w0[n])

    def fresh(self, spec: LoRASpec, seed: int):
        """A PEFT LoRA of `spec` on the current weights, initialised as ours is under `seed`."""
        peft = reference("peft")
        config = spec.lora_config(self.p.llm)
        pm = peft.get_peft_model(self.hf, peft_config(spec), adapter_name="fresh")
        init = fresh_adapter(self.engine.model, config, seed)
        set_factors(pm, "fresh", {m: (init.A[m], init.B[m]) for m in init.A})
        return pm

    def train(self, pm, examples, spec: LoRASpec, seed: int) -> dict:
        """The Trainer-style loop: epochs of the recipe's order, right-padded micro-batches with an attention mask,
        loss summed over the step's response tokens / their number, gradient accumulation, clipping, torch AdamW and
        transformers' schedule (lr set for each step before it, as the Trainer's scheduler does)."""
        transformers = reference("transformers")
        config = spec.train_config(seed)
        total, warmup = schedule_length(config, len(examples))
        params = [q for q in pm.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                weight_decay=config.weight_decay)
        scheduler = transformers.get_scheduler(SCHEDULES[config.schedule], opt, num_warmup_steps=warmup,
                                               num_training_steps=total)
        pad = self.engine.tok.pad_token_id
        losses, tokens = [], 0
        pm.train()
        tic = time.perf_counter()
        for _, micro in zip(range(total), step_batches(examples, config), strict=False):
            n_targets = sum(len(r) for batch in micro for _, r in batch)
            step_loss = 0.0
            for batch in micro:
                width = max(len(p) + len(r) for p, r in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)  # (B, T) right-padded
                labels = torch.full((len(batch), width), -100, dtype=torch.long)  # (B, T) response tokens only
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for i, (p, r) in enumerate(batch):
                    ids[i, : len(p) + len(r)] = torch.tensor([*p, *r])
                    labels[i, len(p): len(p) + len(r)] = torch.tensor(r)
                    mask[i, : len(p) + len(r)] = 1
                    tokens += len(p) + len(r)
                with self.autocast():
                    logits = pm(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100, reduction="sum") / n_targets
                loss.backward()
                step_loss += loss.item()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
            opt.step()
            scheduler.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
        pm.eval()
        return train_summary(losses, tokens, time.perf_counter() - tic)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str]) -> list[str]:
        """Greedy outputs, one unpadded prompt at a time, on the current weights."""
        tok, out = self.engine.tok, []
        self.hf.eval()
        for prompt in prompts:
            ids = torch.tensor([test_ids(self.engine, prompt)])  # (1, T)
            with self.autocast():
                seq = self.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new_tokens(self.engine), eos_token_id=tok.eos_token_ids,
                                       pad_token_id=tok.pad_token_id,
                                       repetition_penalty=self.engine.conditions.repetition_penalty)
            out.append(tok.decode(seq[0, ids.shape[1]:].tolist()).strip())
        return out

    def fold_fused(self, bank: dict, anchors: Sequence[str], weights: Sequence[float]) -> None:
        """The anchors' LoRAs loaded as PEFT adapters, `add_weighted_adapter`, `merge_and_unload` into W."""
        peft = reference("peft")
        config = peft_config(self.p.bank)
        names = [f"anchor{i}" for i in range(len(anchors))]
        pm = peft.get_peft_model(self.hf, config, adapter_name=names[0])
        for name in names[1:]:
            pm.add_adapter(name, config)
        for name, a in zip(names, anchors, strict=True):
            set_factors(pm, name, bank[a])
        if self.combination == "linear":  # PEFT scales by sqrt(w s) on both sides: w^2 gives Eq. 5's w s
            if min(weights) < 0:
                raise ValueError(f"fusion weights {list(weights)}: PEFT's linear merge keeps no sign on B")
            weights = [w * w for w in weights]
        pm.add_weighted_adapter(names, list(weights), "fused", combination_type=self.combination)
        pm.set_adapter("fused")
        self.hf = pm.merge_and_unload()

    def train_fresh(self, spec: LoRASpec, examples, seed: int) -> dict:
        """A fresh LoRA on the current weights, trained and folded into W."""
        pm = self.fresh(spec, seed)
        log = self.train(pm, examples, spec, seed)
        self.hf = pm.merge_and_unload()
        return log


def peer(args) -> dict:
    run = make_run(args)
    p = stored_profile(run.dir.config)  # the recipe ours ran, as its run settled it
    tic = time.perf_counter()
    model, tok = load_llm(p.llm, dtype=torch.float32, device="cpu")
    engine = Engine(p, run.task_spec, model, tok)
    side = Peer(engine, args.peer_bf16, args.peer_fusion)
    load = time.perf_counter() - tic
    anchors = [a["user_id"] for a in read_json(run.dir.anchors)["anchors"]]  # stage 1a: ours'
    matches = read_json(run.dir.matches)  # stage 2: ours'
    by_id = {u.user_id: u for u in run.candidates}

    tic = time.perf_counter()
    bank_factors, bank = {}, {}
    for a in anchors:
        seed = derive_seed(run.seed, "bank", a)
        examples = engine.examples(by_id[a].history, seed, limit=p.max_items_per_anchor, bank=True)
        pm = side.fresh(p.bank, seed)
        bank[a] = side.train(pm, examples, p.bank, seed)
        bank_factors[a] = get_factors(pm, "fresh")
        side.hf = pm.unload()
    bank_s = time.perf_counter() - tic
    print(f"peer: bank of {len(anchors)} LoRAs in {bank_s:.0f} s", file=sys.stderr, flush=True)

    users: dict[str, dict] = {m: {} for m in METHODS}
    tic = time.perf_counter()
    for u in run.test_users:
        for m in METHODS:
            method = get(m)
            start, seconds, train = time.perf_counter(), {}, None
            unit_seed = derive_seed(run.seed, u.user_id, m)
            if method.anchors != "none":
                chosen, weights = fused_anchors(matches[u.user_id], p, method.anchors, unit_seed)
                side.fold_fused(bank_factors, chosen, weights)
                seconds["fuse"] = time.perf_counter() - start
            if method.recipe != "none":
                spec = getattr(p, method.recipe)
                examples = engine.examples(u.history, unit_seed, earlier_only=spec.earlier_only, recipe=spec)
                train = side.train_fresh(spec, examples, unit_seed)
                seconds["adapt"] = train["seconds"]
            prompts = method_prompts(engine.task, u, method, p.prompt_style)
            t = time.perf_counter()
            outputs = side.generate(prompts)
            seconds["generate"] = time.perf_counter() - t
            side.restore()
            seconds["total"] = time.perf_counter() - start
            users[m][u.user_id] = unit_row(engine, u, m, outputs, seconds, train)
        print(f"peer: stage 3, user {u.user_id} done at {time.perf_counter() - tic:.0f} s", file=sys.stderr,
              flush=True)
    stage3 = time.perf_counter() - tic
    return {"side": "peer", "stages": {"load": load, "bank": bank_s, "stage3": stage3}, "bank": bank,
            "bank_train_s": sum(b["seconds"] for b in bank.values()), "users": users,
            "combination": side.combination, **side_facts(engine, args.peer_bf16)}


# ---------------------------------------------------------------------------------------------------------- report
def method_seconds(rows: dict) -> float:
    """A method's stage-3 seconds: its units' totals (the peer) or the sum of their phases (ours)."""
    return sum(r["seconds"].get("total", sum(r["seconds"].values())) for r in rows.values() if "error" not in r)


def phases(side: dict, peak: float) -> dict[str, dict]:
    """Seconds, useful FLOPs and MFU of bank training, stage-3 training and decoding."""
    n_lin, rows = side["linear_params"], [r for per in side["users"].values() for r in per.values() if "error" not in r]
    out = {"bank training": (side["bank_train_s"], 4 * n_lin * sum(b["tokens"] for b in side["bank"].values())),
           "stage-3 training": (sum(r["seconds"].get("adapt", 0.0) for r in rows),
                                4 * n_lin * sum(r["train"]["tokens"] for r in rows if r["train"])),
           "decode": (sum(r["seconds"].get("generate", 0.0) for r in rows),
                      2 * n_lin * sum(r["decode_tokens"] for r in rows))}
    return {k: {"seconds": s, "tflop": f / 1e12, "mfu": f / (s * peak) if s else None} for k, (s, f) in out.items()}


def scores(rows: dict, users: Sequence[str]) -> dict:
    outputs = [o for u in users for o in rows[u]["outputs"]]
    golds = [g for u in users for g in rows[u]["golds"]]
    groups = [n for n, u in enumerate(users) for _ in rows[u]["outputs"]]
    s = score_outputs(TASK, outputs, golds, groups=groups)
    return {k: {"mean": s.summary[k], "ci95": bootstrap_ci(s.per_example[k], groups=groups)}
            for k in ("rouge-1", "rouge-L")}


def losses(ours_side: dict, peer_side: dict) -> list[dict]:
    """First and last loss of every adapter on both sides: the bank's, then each user's trained ones."""
    pairs = [(f"bank {a}", ours_side["bank"][a], peer_side["bank"][a]) for a in ours_side["bank"]]
    for m in METHODS:
        for u, row in ours_side["users"][m].items():
            if row.get("train") and peer_side["users"][m][u].get("train"):
                pairs.append((f"{m} {u}", row["train"], peer_side["users"][m][u]["train"]))
    return [{"adapter": name, "steps": [len(o["losses"]), len(q["losses"])], "ours": [o["losses"][0], o["losses"][-1]],
             "peer": [q["losses"][0], q["losses"][-1]],
             "max_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(o["losses"], q["losses"], strict=False))}
            for name, o, q in pairs]


def peaks() -> dict[str, float]:
    """Peak GEMM FLOP/s of fp32, and of bf16 where the CPU has it."""
    return {"fp32": peak_gemm_flops(torch.float32),
            **({"bf16": peak_gemm_flops(torch.bfloat16)} if bf16_supported("cpu") else {})}


def report(args, ours_side: dict, peer_side: dict, profile: Profile, before: dict[str, float]) -> dict:
    """The comparison; the peak GEMM rates are the best of `before` (measured before the sides ran) and now."""
    peaks_now = peaks()
    peak = {k: max(v, before.get(k, 0.0)) for k, v in peaks_now.items()}
    o_st, q_st = ours_side["stages"], peer_side["stages"]
    stages = [("stage 1a anchors (peer reuses ours')", o_st.get("stage1a_select"), None),
              ("stage 1b bank", o_st["bank"], q_st["bank"]),
              ("stage 2 matching (peer reuses ours')", o_st.get("stage2_match_anchors"), None),
              ("stage 3", o_st["stage3"], q_st["stage3"]),
              *((f"  stage 3, {m}", method_seconds(ours_side["users"][m]), method_seconds(peer_side["users"][m]))
                for m in METHODS),
              ("end to end (bank + stage 3)", o_st["bank"] + o_st["stage3"], q_st["bank"] + q_st["stage3"]),
              ("setup: settle, model load (not timed)", o_st["load"], q_st["load"])]
    end_to_end = stages[-2][2] / stages[-2][1]
    mfu = {s["side"]: phases(s, peak["bf16" if s["bf16"] else "fp32"]) for s in (ours_side, peer_side)}
    score, same = {}, {}
    for m in METHODS:
        o, q = ours_side["users"][m], peer_side["users"][m]
        both = [u for u in o if "error" not in o[u] and u in q]
        score[m] = {"ours": scores(o, both), "peer": scores(q, both), "users": len(both)}
        same[m] = {"identical": sum(o[u]["outputs"] == q[u]["outputs"] for u in both), "users": len(both)}
    out = {"cpu": cpu_name(), "torch": torch.__version__, "threads": ours_side["threads"],
           "peer_threads": peer_side["threads"], "users": args.users, "smoke": args.smoke,
           "profile": profile.name, "recipe": ours_side["recipe"], "ours_bf16": ours_side["bf16"],
           "ours_group_size": ours_side["group_size"], "ours_rows_per_pass": ours_side["rows_per_pass"],
           "peer_bf16": peer_side["bf16"], "peer_combination": peer_side["combination"],
           "peak_gemm_tflops": {k: v / 1e12 for k, v in peak.items()},
           "stages": [{"stage": n, "ours_s": a, "peer_s": b, "ratio": b / a if a and b and n != stages[-1][0] else None}
                      for n, a, b in stages],
           "end_to_end_ratio": end_to_end, "meets_3x": end_to_end >= 3, "mfu": mfu, "scores": score,
           "identical": same, "losses": losses(ours_side, peer_side),
           "peak_rss_mib": {"ours": ours_side["peak_rss_mib"], "peer": peer_side["peak_rss_mib"]}}
    print_report(out)
    return out


def print_report(r: dict) -> None:
    print(f"\n# bench_pipeline: {r['cpu']}, torch {r['torch']}, {r['threads']} threads (peer {r['peer_threads']}); "
          f"{r['users']} LaMP-4 dev users{' (smoke)' if r['smoke'] else ''}; profile {r['profile']}")
    print(f"recipe: {r['recipe']}")
    print(f"ours in {'bf16 autocast' if r['ours_bf16'] else 'fp32'}, groups of {r['ours_group_size']}, "
          f"{r['ours_rows_per_pass']} rows per pass; peer in "
          f"{'bf16 autocast' if r['peer_bf16'] else 'fp32'}, fusion by PEFT {r['peer_combination']!r}; peak GEMM "
          + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in r["peak_gemm_tflops"].items())
          + f"; peak RSS ours {r['peak_rss_mib']['ours']:.0f} MiB, peer {r['peak_rss_mib']['peer']:.0f} MiB")
    print(f"\n{'stage':40}{'ours s':>10}{'peer s':>10}{'ratio':>8}")
    for s in r["stages"]:
        cell = lambda v: f"{v:10.1f}" if v is not None else f"{'-':>10}"  # noqa: E731
        ratio = f"{s['ratio']:7.2f}x" if s["ratio"] else f"{'-':>8}"
        print(f"{s['stage']:40}{cell(s['ours_s'])}{cell(s['peer_s'])}{ratio}")
    print(f"end to end: peer / ours = {r['end_to_end_ratio']:.2f}x, target >= 3x: "
          f"{'met' if r['meets_3x'] else 'NOT met'}")
    print(f"\n{'MFU':20}{'side':>6}{'seconds':>10}{'TFLOP':>9}{'MFU':>8}")
    for side, by_phase in r["mfu"].items():
        for phase, v in by_phase.items():
            mfu = f"{v['mfu']:8.1%}" if v["mfu"] is not None else f"{'-':>8}"
            print(f"{phase:20}{side:>6}{v['seconds']:10.1f}{v['tflop']:9.2f}{mfu}")
    print(f"\n{'method':14}{'users':>6}{'ours ROUGE-1':>24}{'peer ROUGE-1':>24}{'ours ROUGE-L':>24}"
          f"{'peer ROUGE-L':>24}{'identical':>11}")
    for m, s in r["scores"].items():
        cells = "".join(f"{s[side][k]['mean']:8.4f} [{s[side][k]['ci95'][0]:.3f}, {s[side][k]['ci95'][1]:.3f}]"
                        .rjust(24) for k in ("rouge-1", "rouge-L") for side in ("ours", "peer"))
        print(f"{m:14}{s['users']:6d}{cells}{r['identical'][m]['identical']:>7d}/{r['identical'][m]['users']}")
    worst = max((x["max_rel_diff"] for x in r["losses"]), default=0.0)
    print(f"\nloss curves: {len(r['losses'])} adapters, largest relative step-loss difference ours vs peer {worst:.1e}")
    if r["smoke"]:
        print(f"{'adapter':50}{'steps':>6}{'ours first':>12}{'peer first':>12}{'ours last':>12}{'peer last':>12}")
        for x in r["losses"]:
            print(f"{x['adapter'][:50]:50}{'/'.join(map(str, x['steps'])):>6}{x['ours'][0]:12.4f}{x['peer'][0]:12.4f}"
                  f"{x['ours'][1]:12.4f}{x['peer'][1]:12.4f}")


def run_mfu(run_dir: Path) -> dict:
    """MFU of a finished run's bank training, stage-3 training and decoding (every method with results), against
    the peak GEMM rate of its arithmetic measured here now: for a cold `make reproduce` on this machine."""
    config = read_json(run_dir / "config.json")
    p = stored_profile(run_dir / "config.json")
    run = Run(task=config["task"], profile=p, lamp_dir=Path(config["lamp_dir"]), runs=run_dir.parents[1],
              seed=config["seed"], progress=False)
    if run.dir.root.resolve() != run_dir.resolve():
        raise SystemExit(f"--mfu: {run_dir} is not a run directory (<runs>/<task>/<profile>-seed<seed>)")
    executor = Executor(**read_json(run.dir.provenance)[-1].get("executor", {}))
    if executor.side_by_side:  # each job had one worker's threads: the peak is theirs
        torch.set_num_threads(executor.threads)
    side = collect(run, Engine(p, run.task_spec, *load_llm(p.llm, dtype=p.torch_dtype)), run.methods)
    peak = peak_gemm_flops(torch.bfloat16 if p.bf16 else torch.float32)
    out = {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(), "run_dir": str(run_dir),
           "bf16": p.bf16, "group_size": p.group_size, "rows_per_pass": p.rows_per_pass,
           "stages": read_json(run.dir.timings), "peak_gemm_tflops": peak / 1e12, "mfu": phases(side, peak)}
    print(f"# MFU of {run_dir}: {out['cpu']}, torch {out['torch']}, {out['threads']} threads; "
          f"{'bf16 autocast' if p.bf16 else 'fp32'}, groups of {p.group_size}, {p.rows_per_pass} rows per pass; "
          f"peak GEMM {out['peak_gemm_tflops']:.2f} TFLOP/s")
    print("stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in out["stages"].items()))
    for phase, v in out["mfu"].items():
        print(f"{phase:20}{v['seconds']:10.1f} s{v['tflop']:9.2f} TFLOP  MFU {v['mfu']:.1%}" if v["mfu"] is not None
              else f"{phase:20} -")
    return out


def side_command(args, side: str, out: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--out", str(out), "--lamp-dir",
           str(args.lamp_dir), "--users", str(args.users), "--runs", str(args.runs), "--peer-fusion", args.peer_fusion]
    return cmd + [flag for flag, on in (("--smoke", args.smoke), ("--ours-fp32", args.ours_fp32),
                                        ("--peer-bf16", args.peer_bf16)) if on]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lamp-dir", type=Path, default=os.environ.get("LAMP_DIR"))
    ap.add_argument("--users", type=int, default=None, help=f"test users (default 20; {SMOKE_USERS} with --smoke)")
    ap.add_argument("--runs", type=Path, default=None, help="an empty folder for ours' run (default: a new temp dir)")
    ap.add_argument("--smoke", action="store_true", help="a tiny setting to check the script end to end")
    ap.add_argument("--ours-fp32", action="store_true", help="ours in fp32 too (bf16=False), to compare losses")
    ap.add_argument("--peer-bf16", action="store_true", help="the peer under bf16 autocast (default fp32)")
    ap.add_argument("--peer-fusion", choices=("match", "cat"), default="match")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--mfu", type=Path, default=None, metavar="RUN_DIR",
                    help="only the MFU of a finished run directory's bank and stage 3 (e.g. a cold make reproduce)")
    ap.add_argument("--side", choices=("both", "ours", "peer"), default="both", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mfu:
        result = run_mfu(args.mfu)
        if args.json:
            write_json(args.json, result)
        return
    args.users = args.users or (SMOKE_USERS if args.smoke else 20)
    if args.users < 1:
        ap.error(f"--users must be at least 1; got {args.users}")
    if args.lamp_dir is None or not (args.lamp_dir / TASK).is_dir():
        ap.error(f"--lamp-dir: a LaMP data folder holding {TASK}/ (or set LAMP_DIR); got {args.lamp_dir}")
    if args.side != "both":
        write_json(args.out, ours(args) if args.side == "ours" else peer(args))
        return
    reference("transformers"), reference("peft")
    args.runs = args.runs or Path(tempfile.mkdtemp(prefix="bench_pipeline-"))
    profile = bench_profile(args.smoke, args.ours_fp32)
    run_dir = args.runs / TASK
    if run_dir.exists() and any(run_dir.iterdir()):
        ap.error(f"--runs: {args.runs} already holds a run of {TASK}; the benchmark times a cold run, give an "
                 f"empty folder")
    print(f"bench_pipeline: ours, then the peer, each in a fresh process; run directory under {args.runs}",
          flush=True)
    before = peaks()
    sides = {}
    for side in ("ours", "peer"):
        out = args.runs / f"bench-{side}.json"
        tic = time.perf_counter()
        subprocess.run(side_command(args, side, out), check=True)
        sides[side] = read_json(out)
        print(f"{side}: done in {time.perf_counter() - tic:.0f} s", flush=True)
    result = report(args, sides["ours"], sides["peer"], profile, before)
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
