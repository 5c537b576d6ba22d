"""Results: per-user method outputs ─► results.json and results.md (Table 1 and Table 2 layouts)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mta.data.lamp import TaskSpec, get_task
from mta.eval.metrics import TaskScores, bootstrap_ci, paired_t_test, score_outputs
from mta.files import read_json
from mta.methods import label, table

TABLE1, TABLE2, CONTROLS = table("table1"), table("table2"), table("controls")
PAPER_RESULTS = Path(__file__).with_name("paper_results.json")  # package data (setup.py)

# For paired tests: the per-example metric that stands for the task (lower is better for MAE).
PRIMARY = {"classification": "accuracy", "rating": "mae", "generation": "rouge-1"}


def primary_metric(spec: TaskSpec) -> tuple[str, bool]:
    """(metric name, higher is better)."""
    return PRIMARY[spec.metric], spec.metric != "rating"


def score_methods(task: str, rows: dict[str, dict[str, dict]], users: Sequence[str]) -> dict[str, TaskScores]:
    """Score every method on the users that every method finished (so comparisons are paired)."""
    return {
        method: score_outputs(task, [by_user[u]["output"] for u in users], [by_user[u]["gold"] for u in users])
        for method, by_user in rows.items()
    }


def build_results(task: str, rows: dict[str, dict[str, dict]], meta: dict, n_boot: int = 1000) -> dict:
    """rows: method -> user_id -> per-user result (as run_experiment writes it)."""
    spec = get_task(task)
    failed = {m: {u: r["error"] for u, r in by_user.items() if r.get("error")} for m, by_user in rows.items()}
    ok = {m: {u: r for u, r in by_user.items() if not r.get("error")} for m, by_user in rows.items()}
    users = sorted(set.intersection(*(set(v) for v in ok.values()))) if ok else []
    scores = score_methods(spec.name, ok, users) if users else {}
    metric, higher = primary_metric(spec)
    methods = {}
    for m, s in scores.items():
        methods[m] = {
            "label": label(m),
            "n": s.n,
            "n_unparsable": s.n_unparsable,
            "metrics": s.summary,
            "ci95": {k: s.ci(k, n=n_boot) for k in s.summary},
        }
    comparisons = compare_with_mta(scores, ok, users, metric, n_boot) if "mta" in scores and len(users) >= 2 else {}
    significance = None
    baselines = [m for m in dict.fromkeys(TABLE1 + TABLE2) if m in comparisons]
    if baselines:
        best = (max if higher else min)(baselines, key=lambda m: scores[m].summary[metric])
        significance = {"metric": metric, "best_baseline": best, "t": comparisons[best]["t"],
                        "p": comparisons[best]["p"], "mta": scores["mta"].summary[metric],
                        "baseline": scores[best].summary[metric]}
    per_user = {
        u: {m: {k: ok[m][u][k] for k in ("output", "prediction", "gold", "seconds") if k in ok[m][u]}
            for m in ok}
        for u in users
    }
    return {"task": spec.name, "meta": meta, "metric_names": list(spec.metric_names), "users": users,
            "methods": methods, "significance": significance, "mta_vs": comparisons, "failures": failed,
            "per_user": per_user}


def paired(a: Sequence[float], b: Sequence[float], n_boot: int = 1000) -> dict:
    """mean(a - b) over paired examples, its 95% bootstrap interval, and a paired two-sided t-test."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    t, p = paired_t_test(a, b) if len(a) >= 2 else (float("nan"), float("nan"))
    return {"diff": float((a - b).mean()), "ci95": bootstrap_ci(a - b, n=n_boot), "t": t, "p": p}


def compare_with_mta(scores: dict[str, TaskScores], rows: dict[str, dict[str, dict]], users: Sequence[str],
                     metric: str, n_boot: int) -> dict[str, dict]:
    """MTA against every other method on the same users (`paired`, MTA - method), and for how many
    users the outputs differ."""
    return {m: {**paired(scores["mta"].per_example[metric], s.per_example[metric], n_boot),
                "outputs_differ": sum(rows["mta"][u]["output"] != rows[m][u]["output"] for u in users)}
            for m, s in scores.items() if m != "mta"}


def cross_check(a: dict, b: dict) -> dict:
    """Two runs' results.json on the same task: the primary metric, the shared users, and method by method
    each run's score and interval, whether each score lies inside the other's interval, and on how many
    shared users the outputs are equal."""
    if a["task"] != b["task"]:
        raise ValueError(f"cross_check: the runs are on different tasks ({a['task']} and {b['task']})")
    metric, _ = primary_metric(get_task(a["task"]))
    in_b = set(b["users"])
    users = [u for u in a["users"] if u in in_b]
    methods = {}
    for m in [m for m in a["methods"] if m in b["methods"]]:
        (sa, (alo, ahi)), (sb, (blo, bhi)) = ((r["methods"][m]["metrics"][metric], r["methods"][m]["ci95"][metric])
                                              for r in (a, b))
        methods[m] = {"a": sa, "a_ci95": [alo, ahi], "b": sb, "b_ci95": [blo, bhi],
                      "a_inside_b": blo <= sa <= bhi, "b_inside_a": alo <= sb <= ahi,
                      "identical": sum(a["per_user"][u][m]["output"] == b["per_user"][u][m]["output"] for u in users)}
    return {"metric": metric, "users": len(users), "methods": methods}


def paper_results() -> dict:
    return read_json(PAPER_RESULTS)


def paper_numbers(task: str) -> dict:
    """method -> metric -> value of the paper's Table 1 and Table 2 for one task (Llama-3-8B-Instruct)."""
    return paper_results().get("tasks", {}).get(get_task(task).name, {})


def _cell(result: dict, method: str, metric: str) -> str:
    r = result["methods"].get(method)
    if r is None:
        return "not run"
    lo, hi = r["ci95"][metric]
    return f"{r['metrics'][metric]:.4f} [{lo:.3f}, {hi:.3f}]"


def _table(result: dict, methods: Sequence[str], paper: dict) -> list[str]:
    """Our value with its interval beside the paper's, metric by metric; a method only the paper ran
    (or only we did) gets its row all the same."""
    names = result["metric_names"]
    head = ["Method"] + [f"{n} {side}" for n in names for side in ("(ours, 95% CI)", "(paper)")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        if m not in result["methods"] and m not in paper:
            continue
        cells = [c for n in names for c in (_cell(result, m, n), _fmt(paper.get(m, {}).get(n)))]
        lines.append("| " + " | ".join([label(m), *cells]) + " |")
    return lines


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def ranking_lines(result: dict, spec: TaskSpec) -> list[str]:
    """The paper's order of the methods beside ours, on the paper's first metric, over the methods both ran."""
    paper = paper_numbers(spec.name)
    metric = next((n for n in result["metric_names"] if any(n in v for v in paper.values())), None)
    shared = [m for m in paper if m in result["methods"]]
    if metric is None or len(shared) < 2:
        return []
    reverse = spec.metric != "rating"

    def order(value) -> str:
        return " > ".join(label(m) for m in sorted(shared, key=value, reverse=reverse))

    return ["", f"Ranking on {metric} ({'higher' if reverse else 'lower'} is better), over the {len(shared)} "
                f"methods both ran:", "",
            f"- paper: {order(lambda m: paper[m][metric])}",
            f"- ours:  {order(lambda m: result['methods'][m]['metrics'][metric])}"]


def _comparison_table(result: dict, spec: TaskSpec) -> list[str]:
    rows = result.get("mta_vs", {})
    if not rows:
        return []
    metric, higher = primary_metric(spec)
    lines = ["", f"## MTA against every other method ({metric}, paired over the same users)", "",
             "| Method | MTA − method (95% CI) | t | p | at 0.05 | users whose output differs |",
             "|---|---|---|---|---|---|"]
    for m in [m for m in dict.fromkeys(TABLE1 + TABLE2 + CONTROLS) if m in rows]:
        r = rows[m]
        better = (r["diff"] > 0) == higher
        verdict = "within noise" if not r["p"] < 0.05 else ("MTA better" if better else "MTA worse")
        lines.append(f"| {label(m)} | {r['diff']:+.4f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | "
                     f"{r['t']:.2f} | {r['p']:.3f} | {verdict} | {r['outputs_differ']} of {len(result['users'])} |")
    return lines


def render_markdown(result: dict) -> str:
    spec = get_task(result["task"])
    paper = paper_numbers(spec.name)
    meta = result["meta"]
    out = [f"# {spec.lamp_id} ({spec.name}): {meta.get('profile', '')} profile, seed {meta.get('seed', '')}", ""]
    out += [f"{len(result['users'])} test users scored on every method. Metrics: "
            + ", ".join(result["metric_names"])
            + (" (`_stem`: with the Porter stemmer, as the authors' evaluation; without: LaMP's convention)"
               if spec.metric == "generation" else "")
            + ". Intervals: 95% percentile bootstrap over users.", ""]
    for note in meta.get("notes", []):
        out.append(f"- {note}")
    setup = paper_results().get("setup")
    if setup:
        out += ["", f"**Not the paper's setup.** The paper: {setup} Here: the `{meta.get('profile', '')}` profile "
                    f"({meta.get('llm', '')}) on {len(result['users'])} users, so the paper column is a reference "
                    f"point, not a value this run should match."]
    out += ["", "## Table 1: comparison with baselines", ""] + _table(result, TABLE1, paper)
    out += ["", "## Table 2: ablation", ""] + _table(result, TABLE2, paper)
    out += ranking_lines(result, spec)
    if any(m in result["methods"] for m in CONTROLS):
        out += ["", "## Controls: which anchors are merged", ""]
        out += _table(result, ("merged_only", "mta", *CONTROLS), paper)
    sig = result["significance"]
    if sig:
        verdict = "significant at 0.05" if sig["p"] < 0.05 else "not significant at 0.05"
        out += ["", f"MTA vs the best baseline ({label(sig['best_baseline'])}) on {sig['metric']}: "
                    f"{sig['mta']:.4f} vs {sig['baseline']:.4f}, paired two-sided t-test t = {sig['t']:.3f}, "
                    f"p = {sig['p']:.4f} ({verdict})."]
    out += _comparison_table(result, spec)
    timing = meta.get("mta_latency_median_s")
    if timing is not None:
        out += ["", f"Median per-user MTA latency (match + fuse + adapt + generate): {timing:.1f} s."]
    if meta.get("stage_seconds"):
        out += ["", "## Wall time", "", "| stage | seconds |", "|---|---:|"]
        out += [f"| {k} | {v:.0f} |" for k, v in meta["stage_seconds"].items()]
        out += ["", "Stage 3 by method (sum over users of each unit's own phases):", "",
                "| method | seconds |", "|---|---:|"]
        out += [f"| {label(m)} | {v:.0f} |" for m, v in meta.get("method_seconds", {}).items()]
    out += ["", "## Bank", "", f"{len(meta.get('anchors', []))} anchors."]
    rules = Counter(meta.get("anchor_rules", {}).values())
    out += [f"- {n} chosen as the {rule}" for rule, n in sorted(rules.items()) if rule]
    out += [f"- cluster {c['cluster']} ({c['size']} users) has no anchor: {c['reason']}"
            for c in meta.get("clusters_without_anchor", [])]
    out += [f"- the bank has no adapter for anchor {a}" for a in meta.get("bank_missing", [])]
    failures = {m: f for m, f in result["failures"].items() if f}
    if failures:
        out += ["", "## Failures", ""]
        for m, by_user in failures.items():
            for u, err in by_user.items():
                out.append(f"- {label(m)}, user {u}: {err}")
    source = paper_results().get("source", "")
    out += ["", f"Paper column: {source}", ""]
    return "\n".join(out)


def median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if len(values) else None
