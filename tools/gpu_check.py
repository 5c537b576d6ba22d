"""The engine (groups of users through per-row adapters) at paper scale on one GPU, without weights: a randomly
initialised Llama-3-8B-shaped model in bf16 (32 layers, 4096 wide, GQA 32/8 heads, 14,336 FFN, 128,256 tokens).

  bank     8 meta-LoRAs (rank 8, every linear) trained together in one pass (`mta.training.train_many`)
  users    32 users, each fusing 2 of those meta-LoRAs (Eq. 5, unmerged) under a fresh rank-4 stacked LoRA
           (Eq. 7), all trained together in one pass
  decode   one batched greedy decode of those 32 users (`mta.peft.multi_lora.generate_many`)

Each reports wall time and peak GPU memory; then the CUDA test subset (`pytest -m cuda`) runs.

`--pipeline` instead runs the `paper` profile's stages (`mta.run.pipeline`, every Table 1 and 2 method) on a synthetic
LaMP-4 pool at Table 3's history statistics (`tools/make_synthetic_pool.py`, `--candidates` of them, the word
lengths of `--source`), with that model built in memory, a deberta-v3-large-shaped and a bge-small-shaped encoder of
random weights and a Llama-3-style tokenizer trained on the pool's words; it times each stage, takes its peak GPU
memory and extrapolates it to the official pool: seconds x (official count / count run) of the unit the stage's work
grows with. At llama3-8b the run is a slice of the official pool in its proportions (V = 2); stage 1b's time is
mostly the pool's 945-item user, always an anchor. `--set FIELD=VALUE` shortens a recipe to fit a device's time (the
estimate then holds for the recipe as changed). Not yet run on a GPU.

run: python tools/gpu_check.py            (on a CUDA machine; about 5 minutes on one H200)
     python tools/gpu_check.py --shape tiny --device cpu --no-tests   (the same steps on a tiny model)
     python tools/gpu_check.py --pipeline --source data/lamp          (on a CUDA machine)
     python tools/gpu_check.py --pipeline --shape tiny --device cpu   (the same stages on tiny models, about 2 min
                                                                      on 2 cores)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mta.data.lamp import default_lamp_dir, load_candidates
from mta.methods import DEFAULT
from mta.models.checkpoint import load_llm
from mta.models.llama import LlamaConfig, LlamaForCausalLM
from mta.peft.lora import LLAMA_TARGETS, LoRAConfig
from mta.peft.multi_lora import generate_many, get_row_adapter, stack_many, unload_row_lora
from mta.profiles import PAPER
from mta.run import pipeline
from mta.run.cli import override
from mta.training.train import TrainConfig
from mta.training.train_many import train_many
from tests.fixtures import make_bge, make_deberta, make_lamp, make_llama3
from tools.make_synthetic_pool import MAX_ITEMS, MEAN_ITEMS, MIN_ITEMS, OFFICIAL_USERS, history_lengths
from tools.make_synthetic_pool import main as make_pool

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                             max_position_embeddings=8192),
    "tiny": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
}
# The encoders' config.json sizes at each shape: deberta-v3-large's and bge-small-en-v1.5's; None: the tests' tiny ones.
ENCODER_SIZES = {
    "llama3-8b": {"deberta": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                              "num_hidden_layers": 24, "vocab_size": 128100},
                  "bge": {"hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 12,
                          "num_hidden_layers": 12, "vocab_size": 30522}},
    "tiny": None,
}
# Candidates, V and test users run. At llama3-8b, a slice of the official pool in its proportions (287 candidates
# and 2 test users per anchor), so that every count but the drawn items' grows by the same factor, 25.
PIPELINE_SIZES = {"llama3-8b": {"candidates": 574, "anchors": 2, "users": 4},
                  "tiny": {"candidates": 30, "anchors": 3, "users": 4}}
OFFICIAL_TEST_USERS, OFFICIAL_ANCHORS = 100, PAPER.n_anchors
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


def peak_memory(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB" if device.type == "cuda" else "n/a"


def sized_encoder(make, path: Path, sizes: dict | None) -> Path:
    """`make`'s tiny encoder directory, its config and random weights at `sizes` when given (its tokenizer kept)."""
    from safetensors.torch import save_file

    from mta.models.encoders.bert import BertConfig, BertModel
    from mta.models.encoders.deberta import DebertaV2Config, DebertaV2Model

    make(path)
    if sizes is None:
        return path
    config = {**json.loads((path / "config.json").read_text()), **sizes}
    (path / "config.json").write_text(json.dumps(config))
    if config["model_type"] == "bert":
        model = BertModel(BertConfig.from_hf_config(config), add_pooler=True)
    else:
        model = DebertaV2Model(DebertaV2Config.from_hf_config(config))
        (path / "pytorch_model.bin").unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return path


def official_counts(seed: int) -> dict[str, int]:
    """The official LaMP-4 pool's counts for the units of `UNITS`: its items (Table 3's lengths drawn as
    make_synthetic_pool does), the bank's examples (the most active user of each of V clusters, clusters drawn at
    random), its population examples (one per candidate) and its test users."""
    lengths = history_lengths(OFFICIAL_USERS - OFFICIAL_TEST_USERS, 1.0, np.random.default_rng(seed),
                              (MIN_ITEMS, MAX_ITEMS, MEAN_ITEMS))
    clusters = np.array_split(np.random.default_rng(seed).permutation(lengths), OFFICIAL_ANCHORS)
    return {"items": int(lengths.sum()), "anchor items": int(sum(c.max() for c in clusters)),
            "candidates": len(lengths), "anchors": OFFICIAL_ANCHORS, "test users": OFFICIAL_TEST_USERS}


def run_counts(run: pipeline.Run) -> dict[str, int]:
    by_id = {u.user_id: u for u in run.candidates}
    return {"items": sum(len(u.history) for u in run.candidates),
            "anchor items": sum(len(by_id[a].history) for a in run.anchor_ids),
            "candidates": len(run.candidates), "anchors": len(run.anchor_ids), "test users": len(run.test_users)}


# The units each stage's work grows with (the largest ratio of official to run counts is taken).
GROWS_WITH = {"stage1a_select": ("items",), "stage1b_bank": ("anchor items",), "stage1c_population": ("candidates",),
              "stage1c_perpcs": ("candidates", "anchors"), "stage1c_proper": ("candidates", "test users"),
              "stage2_match_anchors": ("test users",), "stage3": ("test users",)}


def check_pipeline(args, device: torch.device) -> None:
    """The `paper` profile's stages on a synthetic pool (module docstring), one table row per stage."""
    sizes = {k: getattr(args, k) or v for k, v in PIPELINE_SIZES[args.shape].items()}
    if args.shape == "tiny":
        torch.set_num_threads(1)  # a tiny model's steps are bound by per-op overhead, which more threads add to
    root = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    source = args.source if (args.source / "news_headline").is_dir() else make_lamp(root / "source")
    if source != args.source:
        print(f"no LaMP-4 data in {args.source}: the pool's words and lengths come from the tests' tiny data")
    make_pool(["--source", str(source), "--out", str(root / "pool"), "--candidates", str(sizes["candidates"]),
               "--test-users", str(sizes["users"])])
    words = [f"{it['text']} {it['title']}" for u in load_candidates(source, "news_headline") for it in u.history]
    llm_dir = make_llama3(root / "llama3", corpus=words, vocab_size=32000)
    encoders = ENCODER_SIZES[args.shape] or {}
    profile = PAPER.replace(llm=str(llm_dir), device=str(device), n_anchors=sizes["anchors"],
                            stage1_encoder=str(sized_encoder(make_deberta, root / "deberta", encoders.get("deberta"))),
                            stage2_encoder=str(sized_encoder(make_bge, root / "bge", encoders.get("bge"))))
    for assignment in args.set:
        profile = override(profile, assignment)
    run = pipeline.Run(task="lamp4", profile=profile, lamp_dir=root / "pool", runs=root / "runs", methods=DEFAULT,
                       progress=False)
    _, tok = load_llm(str(llm_dir))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(dataclasses.replace(SHAPES[args.shape], vocab_size=max(
            SHAPES[args.shape].vocab_size, tok.vocab_size))).to(profile.torch_dtype).eval()
    run.llm = model, tok  # in memory: no checkpoint to write and read back
    print(f"paper profile, {args.shape} on {device}: {len(run.candidates)} candidates, V = {sizes['anchors']}, "
          f"{len(run.test_users)} test users, methods {', '.join(DEFAULT)}; run directory {run.dir.root}", flush=True)
    with run.dir.lock():
        run.write_config()
        rows = []
        for name, stage in pipeline.STAGES:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            stage(run)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rows.append((name, time.perf_counter() - t, peak_memory(device)))
            print(f"{name:21} {rows[-1][1]:8.1f} s   peak {rows[-1][2]}", flush=True)
        result = pipeline.write_results(run)
    missing = {m: sorted(u) for m, u in result["missing"].items() if u}
    if missing:
        raise SystemExit(f"gpu_check --pipeline: users without a result: {missing}")
    ran, full = run_counts(run), official_counts(0)
    print(f"\nevery method scored for all {len(result['users'])} test users; extrapolated to the official LaMP-4 pool "
          f"({full['candidates']:,} candidates, {full['items']:,} items, V = {full['anchors']}, "
          f"{full['test users']} test users){'' if not args.set else ', for the recipes as changed by --set'}; "
          f"where a stage grows with two counts, the larger ratio (an upper bound):")
    print(f"{'stage':21} {'run s':>8} {'peak':>9}   {'grows with':26} {'run':>8} {'official':>9} {'est. s':>10}")
    total = 0.0
    for name, seconds, peak in rows:
        unit = max(GROWS_WITH[name], key=lambda u: full[u] / ran[u])
        estimate = seconds * full[unit] / ran[unit]
        total += estimate
        print(f"{name:21} {seconds:8.1f} {peak:>9}   {unit:26} {ran[unit]:8,} {full[unit]:9,} {estimate:10,.0f}")
    print(f"{'total':21} {sum(r[1] for r in rows):8.1f} {'':9}   {'':26} {'':8} {'':9} {total:10,.0f}"
          f"   ({total / 3600:.1f} h on this {'GPU' if device.type == 'cuda' else 'machine'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--pipeline", action="store_true", help="the paper profile's stages, timed and extrapolated")
    ap.add_argument("--source", type=Path, default=default_lamp_dir(),
                    help="a LAMP_DIR with news_headline whose word lengths the pool takes (default: the data folder)")
    ap.add_argument("--candidates", type=int, help="--pipeline: bank candidates in the pool")
    ap.add_argument("--anchors", type=int, help="--pipeline: V")
    ap.add_argument("--users", type=int, help="--pipeline: test users")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="--pipeline: change a field of the paper profile, as `mta reproduce --set` does")
    ap.add_argument("--items", type=int, default=4, help="training items per anchor and per user")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens per item")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rows-per-pass", type=int, default=4, help="as the paper profile")
    ap.add_argument("--no-tests", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; on a CPU run --shape tiny --device cpu")
    if args.pipeline:
        return check_pipeline(args, device)
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
