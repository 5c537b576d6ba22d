"""Synthetic LaMP-3 release files in the official layout (`<out>/LaMP_3/{train,dev}_{questions,outputs}.json`),
for measuring the release converter (`mta.data.lamp_release.convert`) without the official files.

Users: `--users` train and `--dev-users` dev questions (default an eighth as many, the official 20,000 : 2,500),
each one user. History lengths follow Table 3's LaMP-3 row (min 97, max 1,021, mean 202.52) as
`make_synthetic_pool.history_lengths` draws them, with `--test-eligible` users at exactly 100 items (Appendix B's
LaMP-3 test length) so that the converter finds its test users. Items are {"text", "score", "id"}: reviews of
`--review-chars` characters on average (a lognormal of log-spread 0.6) made of words of a seeded made-up
vocabulary, one in ten with a curly apostrophe (a character Python stores in 2 bytes a character, as about one
in ten LaMP-4 dev texts has), and a score of 1 to 5 as a string. Files are compact JSON with json's default
ASCII escapes, written one question at a time. Seeded: the same arguments write the same files.

    python tools/make_synthetic_official.py --users 3000 --out /tmp/lamp3-raw
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_synthetic_pool, when imported as a file

from make_synthetic_pool import history_lengths

from mta.data.lamp import get_task
from mta.data.lamp_release import LAMP_NUMBER, raw_path
from mta.files import atomic_path, write_json

TASK = "product_rating"
TABLE3 = (97, 1021, 202.52)  # LaMP-3: min, max, mean history items
VOCAB, APOSTROPHE_SHARE = 20_000, 0.1


def vocabulary(rng: np.random.Generator) -> list[str]:
    lengths = rng.integers(2, 10, size=VOCAB)
    letters = rng.integers(ord("a"), ord("z") + 1, size=int(lengths.sum())).astype(np.uint8).tobytes().decode()
    ends = np.cumsum(lengths)
    return [letters[e - n:e] for n, e in zip(lengths.tolist(), ends.tolist(), strict=True)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the raw folder to write (LaMP_3/ inside)")
    ap.add_argument("--users", type=int, required=True, help="train questions (official: 20,000)")
    ap.add_argument("--dev-users", type=int, help="dev questions (default: users / 8)")
    ap.add_argument("--test-eligible", type=int, default=100, help="users with exactly 100 items")
    ap.add_argument("--review-chars", type=float, default=750.0, help="mean characters of a review")
    ap.add_argument("--sigma", type=float, default=0.6, help="spread of log history length")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dev_users = args.users // 8 if args.dev_users is None else args.dev_users
    rng = np.random.default_rng(args.seed)
    vocab = vocabulary(rng)
    chars_per_word = np.mean([len(w) for w in vocab]) + 1
    n = LAMP_NUMBER[TASK]
    question = get_task(TASK).question
    lengths = history_lengths(args.users + dev_users, args.sigma, rng, TABLE3,
                              (get_task(TASK).test_history_len,) * args.test_eligible)

    def review() -> str:
        words = int(max(1, round(rng.lognormal(np.log(args.review_chars) - 0.18, 0.6) / chars_per_word)))
        text = " ".join([vocab[i] for i in rng.integers(VOCAB, size=words).tolist()]).capitalize()
        return text + " it\u2019s." if rng.random() < APOSTROPHE_SHARE else text + "."

    stats = {"items": 0, "review_chars": 0}
    for s, (split, users) in enumerate((("train", range(args.users)), ("dev", range(args.users, len(lengths))))):
        golds = []
        with atomic_path(raw_path(args.out, TASK, split, "questions")) as tmp, open(tmp, "w") as f:
            f.write("[")
            for k, u in enumerate(users):
                qid = f"{n}{s}{k:07d}"
                profile = [{"text": review(), "score": str(rng.integers(1, 6)), "id": f"{qid}{j:04d}"}
                           for j in range(int(lengths[u]))]
                stats["items"] += len(profile)
                stats["review_chars"] += sum(len(it["text"]) for it in profile)
                f.write(("," if k else "") + json.dumps({"id": qid, "input": question.format(text=review()),
                                                         "profile": profile}))
                golds.append({"id": qid, "output": str(rng.integers(1, 6))})
            f.write("]")
        write_json(raw_path(args.out, TASK, split, "outputs"), {"task": f"LaMP_{n}", "golds": golds})
        stats[f"{split}_questions_bytes"] = raw_path(args.out, TASK, split, "questions").stat().st_size
    print(json.dumps({"users": len(lengths), "items": stats["items"], "mean_items": round(lengths.mean(), 2),
                      "min": int(lengths.min()), "max": int(lengths.max()),
                      "mean_review_chars": round(stats["review_chars"] / stats["items"], 1),
                      **{k: v for k, v in stats.items() if k.endswith("_bytes")}, "out": str(args.out)}))


if __name__ == "__main__":
    main()
