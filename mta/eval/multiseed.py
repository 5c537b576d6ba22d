"""Several seeds of one run: every method's metrics as mean and standard deviation across seeds, and MTA
against every other method paired over (seed, query), its interval resampling (seed, user), as the ACL
version reports three seeds.

    runs/<task>/<profile>-seeds<a>-<b>-<c>/summary.json, summary.md
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mta.data.lamp import get_task
from mta.eval import report
from mta.files import atomic_path, write_json
from mta.methods import label


def summarize(results: Sequence[dict], seeds: Sequence[int]) -> dict:
    """results: one results.json per seed, same task and profile. The pooled comparison pairs each seed's
    users with themselves; the same user under three seeds is not three independent users, so read its
    interval as a summary of the seeds, not as a test over 3n users."""
    task = get_task(results[0]["task"])
    metric, _ = report.primary_metric(task)
    methods = [m for m in results[0]["methods"] if all(m in r["methods"] for r in results)]
    table = {}
    for m in methods:
        values = {n: [r["methods"][m]["metrics"][n] for r in results] for n in results[0]["metric_names"]}
        table[m] = {n: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                        "per_seed": v} for n, v in values.items()}
    pooled = {}
    if "mta" in methods:
        per_example = [report.score_methods(r["task"], {m: {u: r["per_user"][u][m] for u in r["users"]}
                                                        for m in methods}, r["users"]) for r in results]
        mta = np.concatenate([s["mta"].per_example[metric] for s in per_example])
        offsets = np.cumsum([0] + [len(r["users"]) for r in results])[:-1]
        groups = np.concatenate([s["mta"].groups + k for s, k in zip(per_example, offsets, strict=True)])
        for m in methods:
            if m != "mta":
                other = np.concatenate([s[m].per_example[metric] for s in per_example])
                pooled[m] = report.paired(mta, other, groups=groups)
    return {"task": task.name, "seeds": list(seeds), "metric": metric, "metric_names": results[0]["metric_names"],
            "users_per_seed": [len(r["users"]) for r in results], "methods": table, "mta_vs_pooled": pooled}


def render_markdown(summary: dict) -> str:
    names = summary["metric_names"]
    out = [f"# {summary['task']}: {len(summary['seeds'])} seeds ({', '.join(map(str, summary['seeds']))}), "
           f"{', '.join(map(str, summary['users_per_seed']))} users", "",
           "| Method | " + " | ".join(f"{n} (mean ± sd)" for n in names) + " |", "|" + "---|" * (len(names) + 1)]
    for m, row in summary["methods"].items():
        out.append(f"| {label(m)} | " + " | ".join(f"{row[n]['mean']:.4f} ± {row[n]['std']:.4f}" for n in names) + " |")
    if summary["mta_vs_pooled"]:
        out += ["", f"MTA against every method on {summary['metric']}, paired over (seed, query) pooled across seeds, "
                f"interval over (seed, user):",
                "", "| Method | MTA − method (95% CI) | t | p |", "|---|---|---|---|"]
        for m, r in summary["mta_vs_pooled"].items():
            out.append(f"| {label(m)} | {r['diff']:+.4f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | "
                       f"{r['t']:.2f} | {r['p']:.3f} |")
    return "\n".join(out) + "\n"


def write_summary(folder: Path, results: Sequence[dict], seeds: Sequence[int]) -> dict:
    summary = summarize(results, seeds)
    write_json(folder / "summary.json", summary)
    with atomic_path(folder / "summary.md") as tmp:
        tmp.write_text(render_markdown(summary))
    return summary
