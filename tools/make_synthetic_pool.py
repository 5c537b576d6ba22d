"""A synthetic LaMP-4 folder at the official scale, in the processed layout (`LAMP_DIR=<out>`), for timing stage 1a
and planning runs without the official files.

Users: the official LaMP-4 user-based train and dev questions (12,527 + 1,925; each question is one user) less the
100 test users, as bank candidates, plus 100 test users with 10 items each (Appendix B). History lengths follow
Table 3 (min 7, max 945, mean 31.2): a lognormal of spread `--sigma` (Table 3 gives none) clipped to [7, 945],
its median set so the mean is 31.2, one user at each bound. Item texts and titles draw their word counts from the
items of `--source` (a LaMP-4 folder in the processed layout) and their words from its vocabulary, so lengths
are realistic and the content is not. Seeded: the same arguments write the same files.

    python tools/make_synthetic_pool.py --source /work/shared/lamp --out /tmp/lamp-synth
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mta.data.lamp import load_candidates
from mta.files import write_json

TASK = "news_headline"
MIN_ITEMS, MAX_ITEMS, MEAN_ITEMS = 7, 945, 31.2  # Table 3, LaMP-4
OFFICIAL_USERS = 12_527 + 1_925  # LaMP-4 user-based train and dev questions


def history_lengths(n: int, sigma: float, rng: np.random.Generator, table3: tuple[int, int, float] = (
        MIN_ITEMS, MAX_ITEMS, MEAN_ITEMS), pinned: tuple[int, ...] = ()) -> np.ndarray:
    """`n` lengths in Table 3's [min, max] with its mean (to within 0.05 where `n` allows), one at each bound and
    one at each of `pinned`, the others a clipped lognormal of log-spread `sigma`; shuffled."""
    low, high, mean = table3
    fixed = (low, high, *pinned)
    z = rng.standard_normal(n)
    lo, hi = 0.0, np.log(high)
    for _ in range(60):  # bisect the log-median: the clipped mean grows with it
        mu = (lo + hi) / 2
        lengths = np.clip(np.rint(np.exp(mu + sigma * z)), low, high).astype(int)
        lengths[:len(fixed)] = fixed
        lo, hi = (mu, hi) if lengths.mean() < mean else (lo, mu)
    return rng.permutation(lengths)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True, help="a LAMP_DIR holding news_headline (the word source)")
    ap.add_argument("--out", type=Path, required=True, help="the LAMP_DIR to write")
    ap.add_argument("--candidates", type=int, default=OFFICIAL_USERS - 100)
    ap.add_argument("--test-users", type=int, default=100)
    ap.add_argument("--sigma", type=float, default=1.0, help="spread of log history length")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    items = [it for u in load_candidates(args.source, TASK) for it in u.history]
    text_words = np.array([len(it["text"].split()) for it in items])
    title_words = np.array([len(it["title"].split()) for it in items])
    vocab = np.array([w for it in items for w in it["text"].split()])

    def words(counts: np.ndarray) -> str:
        return " ".join(vocab[rng.integers(len(vocab), size=int(rng.choice(counts)))])

    def profile(uid: str, n: int) -> list[dict]:
        return [{"text": words(text_words), "title": words(title_words), "id": f"{uid}-{j}"} for j in range(n)]

    lengths = history_lengths(args.candidates, args.sigma, rng)
    candidates = [{"user_id": f"synth-{i}", "profile": profile(f"synth-{i}", int(n))} for i, n in enumerate(lengths)]
    test = [{"user_id": f"synth-t{i}", "profile": profile(f"synth-t{i}", 10),
             "query": [{"id": f"synth-t{i}-q", "input": f"Generate a headline for the following article: "
                                                       f"{words(text_words)}", "gold": words(title_words)}]}
            for i in range(args.test_users)]
    write_json(args.out / TASK / "user_anchor_candidate.json", candidates)
    write_json(args.out / TASK / "test_100" / "test_100.json", test)
    print(json.dumps({"candidates": len(candidates), "items": int(lengths.sum()), "mean": round(lengths.mean(), 2),
                      "median": int(np.median(lengths)), "min": int(lengths.min()), "max": int(lengths.max()),
                      "out": str(args.out / TASK)}))


if __name__ == "__main__":
    main()
