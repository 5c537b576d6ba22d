"""Cross-check two runs of one task (for example groups of 16 in bf16 against one user at a time in fp32, or a
quantised base against fp32): per method, each run's primary score with its 95 % interval, whether each
lies inside the other's interval, and how many (user, method) outputs are identical on the shared users.

    mta compare-runs A/results-50-users.json B/results-50-users.json"""
from __future__ import annotations

import argparse
from pathlib import Path

from mta.eval.report import cross_check
from mta.files import read_json
from mta.methods import label


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    check = cross_check(read_json(args.a), read_json(args.b))
    rows, n, q = check["methods"], check["users"], check["queries"]
    if not rows:
        raise SystemExit(f"compare-runs: {args.a} and {args.b} share no method")
    print(f"A = {args.a}\nB = {args.b}\n{check['metric']}, {n} shared users, {q} of their queries\n")
    print("| method | A [95 % CI] | B [95 % CI] | A in B's CI | B in A's CI | identical outputs |")
    print("|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {label(m)} | {r['a']:.3f} [{r['a_ci95'][0]:.3f}, {r['a_ci95'][1]:.3f}] | "
              f"{r['b']:.3f} [{r['b_ci95'][0]:.3f}, {r['b_ci95'][1]:.3f}] | {'yes' if r['a_inside_b'] else 'NO'} | "
              f"{'yes' if r['b_inside_a'] else 'NO'} | {r['identical']} of {q} |")
    same = sum(r["identical"] for r in rows.values())
    inside = all(r["a_inside_b"] and r["b_inside_a"] for r in rows.values())
    print(f"\n{same} of {q * len(rows)} (query, method) outputs identical; "
          f"every score inside the other's interval: {'yes' if inside else 'no'}")
