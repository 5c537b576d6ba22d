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
# What made a stage-3 unit fail: an InputError (bad or missing input), or any other exception or a lost worker.
FAILURE_KINDS = {"input": "bad input", "crash": "crash"}


def primary_metric(spec: TaskSpec) -> tuple[str, bool]:
    """(metric name, higher is better)."""
    return PRIMARY[spec.metric], spec.metric != "rating"


def queries(result: dict) -> list[dict]:
    """The query rows of one (user, method) result; a result without them (written when only a user's first
    query was scored) is refused, so old and new results never mix."""
    if "queries" not in result:
        raise ValueError(f"user {result.get('user_id', '?')}, {result.get('method', '?')}: a result without "
                         f"'queries' (from before every query was scored); delete it and rerun stage 3")
    return result["queries"]


def outputs(result: dict) -> list[str]:
    return [q["output"] for q in queries(result)]


def score_methods(task: str, rows: dict[str, dict[str, dict]], users: Sequence[str]) -> dict[str, TaskScores]:
    """Score every method over every query of the users that every method finished (so comparisons are
    paired); the intervals resample users."""
    out = {}
    for method, by_user in rows.items():
        flat = [(n, q) for n, u in enumerate(users) for q in queries(by_user[u])]
        out[method] = score_outputs(task, [q["output"] for _, q in flat], [q["gold"] for _, q in flat],
                                    groups=[n for n, _ in flat])
    return out


def check_same_queries(rows: dict[str, dict[str, dict]], users: Sequence[str]) -> None:
    """Every method answered the same queries of each user, in the same order (so scores pair query by query)."""
    for u in users:
        ids = {m: [q["query_id"] for q in queries(by_user[u])] for m, by_user in rows.items()}
        if len({tuple(v) for v in ids.values()}) > 1:
            raise ValueError(f"user {u}: the methods answered different queries: {ids}")


def build_results(task: str, rows: dict[str, dict[str, dict]], meta: dict, n_boot: int = 1000,
                  missing: dict[str, dict[str, dict]] | None = None) -> dict:
    """rows: method -> user_id -> per-user result (as stage 3 writes it, a row per query in `queries`).
    missing: method -> user_id -> why the user has no result (`mta.run.pipeline.missing`). The users asked are
    every user of either; a user without a result from some method and no reason given is "not run". Scores are
    over the users every method has (so comparisons pair), and `missing` names every other (method, user)."""
    spec = get_task(task)
    missing = {m: {**(missing or {}).get(m, {})} for m in rows}
    asked = sorted(set().union(*rows.values(), *missing.values()))
    for m in rows:
        missing[m].update({u: {"reason": "not run"} for u in asked if u not in rows[m] and u not in missing[m]})
    users = [u for u in asked if all(u in by_user for by_user in rows.values())]
    check_same_queries(rows, users)
    scores = score_methods(spec.name, rows, users) if users else {}
    metric, higher = primary_metric(spec)
    methods = {}
    for m, s in scores.items():
        methods[m] = {
            "label": label(m),
            "n": s.n,
            "n_users": len(users),
            "n_unparsable": s.n_unparsable,
            "prompts_cut": sum(q["prompt_cut"] for u in users for q in queries(rows[m][u])),
            "metrics": s.summary,
            "ci95": {k: s.ci(k, n=n_boot) for k in s.summary},
        }
    comparisons = compare_with_mta(scores, rows, users, metric, n_boot) if "mta" in scores and len(users) >= 2 else {}
    significance = None
    baselines = [m for m in dict.fromkeys(TABLE1 + TABLE2) if m in comparisons]
    if baselines:
        best = (max if higher else min)(baselines, key=lambda m: scores[m].summary[metric])
        significance = {"metric": metric, "best_baseline": best, "t": comparisons[best]["t"],
                        "p": comparisons[best]["p"], "mta": scores["mta"].summary[metric],
                        "baseline": scores[best].summary[metric]}
    per_user = {
        u: {m: {k: rows[m][u][k] for k in ("queries", "seconds") if k in rows[m][u]} for m in rows}
        for u in users
    }
    n_queries = next(iter(scores.values())).n if scores else 0
    failures = {m: {u: r["error"] for u, r in by_user.items() if "error" in r} for m, by_user in missing.items()}
    return {"task": spec.name, "meta": meta, "metric_names": metric_names(spec), "users": users,
            "n_users": len(users), "n_users_asked": len(asked), "n_queries": n_queries, "methods": methods,
            "significance": significance, "mta_vs": comparisons, "missing": missing, "failures": failures,
            "per_user": per_user}


def metric_names(spec: TaskSpec) -> list[str]:
    """The task's LaMP metrics, then the paper-style ones (`mta.eval.metrics.paper_style`)."""
    return list(spec.metric_names) + [f"{n}_paper" for n in spec.metric_names if spec.metric != "generation"]


def paired(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, groups: Sequence[int] | None = None) -> dict:
    """mean(a - b) over paired examples, its 95% bootstrap interval (resampling `groups`, the users, where
    given), and a paired two-sided t-test over the examples."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    t, p = paired_t_test(a, b) if len(a) >= 2 else (float("nan"), float("nan"))
    return {"diff": float((a - b).mean()), "ci95": bootstrap_ci(a - b, n=n_boot, groups=groups), "t": t, "p": p}


def compare_with_mta(scores: dict[str, TaskScores], rows: dict[str, dict[str, dict]], users: Sequence[str],
                     metric: str, n_boot: int) -> dict[str, dict]:
    """MTA against every other method on the same queries (`paired`, MTA - method; the interval resamples
    users), and for how many queries the outputs differ."""
    return {m: {**paired(scores["mta"].per_example[metric], s.per_example[metric], n_boot, s.groups),
                "outputs_differ": sum(x != y for u in users
                                      for x, y in zip(outputs(rows["mta"][u]), outputs(rows[m][u]), strict=True))}
            for m, s in scores.items() if m != "mta"}


def cross_check(a: dict, b: dict) -> dict:
    """Two runs' results.json on the same task: the primary metric, the shared users, and method by method
    each run's score and interval, whether each score lies inside the other's interval, and on how many
    queries of the shared users the outputs are equal. A results.json from before every query was scored
    (per-user `output`, its first query's) compares where each shared user has one query, and fails naming the
    user where not."""
    if a["task"] != b["task"]:
        raise ValueError(f"cross_check: the runs are on different tasks ({a['task']} and {b['task']})")
    metric, _ = primary_metric(get_task(a["task"]))
    in_b = set(b["users"])
    users = [u for u in a["users"] if u in in_b]
    methods = {}
    for m in [m for m in a["methods"] if m in b["methods"]]:
        (sa, (alo, ahi)), (sb, (blo, bhi)) = ((r["methods"][m]["metrics"][metric], r["methods"][m]["ci95"][metric])
                                              for r in (a, b))
        same = []
        for u in users:
            x, y = (r["per_user"][u][m] for r in (a, b))
            x, y = ([row["output"]] if "queries" not in row else outputs(row) for row in (x, y))
            if len(x) != len(y):
                raise ValueError(f"cross_check: user {u}, {m}: {len(x)} and {len(y)} scored queries")
            same += [p == q for p, q in zip(x, y, strict=True)]
        methods[m] = {"a": sa, "a_ci95": [alo, ahi], "b": sb, "b_ci95": [blo, bhi],
                      "a_inside_b": blo <= sa <= bhi, "b_inside_a": alo <= sb <= ahi, "identical": sum(same)}
        queries_compared = len(same)
    return {"metric": metric, "users": len(users), "queries": queries_compared if methods else 0, "methods": methods}


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


def paper_match(spec: TaskSpec) -> dict[str, str]:
    """Our metric -> the paper's published metric scored the same way (the paper-style scoring:
    `accuracy_paper` for the paper's accuracy, ...; LaMP-4/5: the stemmed ROUGE)."""
    keys = paper_results().get("metric_keys", {}).get(spec.name, [])
    return {(k if spec.metric == "generation" else f"{k}_paper"): k for k in keys}


def _table(result: dict, methods: Sequence[str], paper: dict) -> list[str]:
    """Our value with its interval, metric by metric, and the paper's published value beside the metric that
    scores as the paper did (`paper_match`); a method only the paper ran (or only we did) gets its row all
    the same."""
    names, match = result["metric_names"], paper_match(get_task(result["task"]))
    head = ["Method"] + [c for n in names for c in (f"{n} (ours, 95% CI)", *([f"{n} (paper)"] if n in match else []))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        if m not in result["methods"] and m not in paper:
            continue
        cells = [c for n in names
                 for c in (_cell(result, m, n), *([_fmt(paper.get(m, {}).get(match[n]))] if n in match else []))]
        lines.append("| " + " | ".join([label(m), *cells]) + " |")
    return lines


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def ranking_lines(result: dict, spec: TaskSpec) -> list[str]:
    """The paper's order of the methods beside ours, on the paper's first metric, over the methods both ran."""
    paper = paper_numbers(spec.name)
    metric, key = next(((n, k) for n, k in paper_match(spec).items() if any(k in v for v in paper.values())),
                       (None, None))
    shared = [m for m in paper if m in result["methods"]]
    if metric is None or len(shared) < 2:
        return []
    reverse = spec.metric != "rating"

    def order(value) -> str:
        return " > ".join(label(m) for m in sorted(shared, key=value, reverse=reverse))

    return ["", f"Ranking on {metric} ({'higher' if reverse else 'lower'} is better), over the {len(shared)} "
                f"methods both ran:", "",
            f"- paper: {order(lambda m: paper[m][key])}",
            f"- ours:  {order(lambda m: result['methods'][m]['metrics'][metric])}"]


def _comparison_table(result: dict, spec: TaskSpec) -> list[str]:
    rows = result.get("mta_vs", {})
    if not rows:
        return []
    metric, higher = primary_metric(spec)
    lines = ["", f"## MTA against every other method ({metric}, paired over the same queries; t-test over "
                 f"queries, interval over users)", "",
             "| Method | MTA − method (95% CI) | t | p | at 0.05 | queries whose output differs |",
             "|---|---|---|---|---|---|"]
    for m in [m for m in dict.fromkeys(TABLE1 + TABLE2 + CONTROLS) if m in rows]:
        r = rows[m]
        better = (r["diff"] > 0) == higher
        verdict = "within noise" if not r["p"] < 0.05 else ("MTA better" if better else "MTA worse")
        lines.append(f"| {label(m)} | {r['diff']:+.4f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | "
                     f"{r['t']:.2f} | {r['p']:.3f} | {verdict} | {r['outputs_differ']} of {result['n_queries']} |")
    return lines


def render_markdown(result: dict) -> str:
    spec = get_task(result["task"])
    paper = paper_numbers(spec.name)
    meta = result["meta"]
    out = [f"# {spec.lamp_id} ({spec.name}): {meta.get('profile', '')} profile, seed {meta.get('seed', '')}", ""]
    out += [f"{result['n_queries']} queries of {_scored(result)} scored on every method, pooled over queries"
            + _missing_count(result) + ". Metrics: " + ", ".join(result["metric_names"])
            + (" (`_stem`: with the Porter stemmer, as the authors' evaluation; without: LaMP's convention)"
               if spec.metric == "generation" else
               " (`_paper`: the authors' scoring of the raw output, aggregate_results.py and their eval scripts; "
               "without: LaMP's official evaluation of the parsed output)")
            + ". The paper's published values stand beside the metric scored as the paper did. "
              "Intervals: 95% percentile bootstrap over users (each with all its queries).", ""]
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
    out += ["", "## Prompts cut by the test-time cap", "", "| Method | prompts cut |", "|---|---:|"]
    out += [f"| {label(m)} | {r['prompts_cut']} of {r['n']} |" for m, r in result["methods"].items()]
    timing = meta.get("mta_latency_median_s")
    if timing is not None:
        out += ["", f"Median per-user MTA latency (match + fuse + adapt + generate): {timing:.1f} s."]
    if meta.get("stage_seconds"):
        out += ["", "## Wall time", ""] + _wall_time(meta["stage_seconds"], meta.get("plan"))
        out += ["", "Stage 3 by method (sum over users of each unit's own phases):", "",
                "| method | seconds |", "|---|---:|"]
        out += [f"| {label(m)} | {v:.0f} |" for m, v in meta.get("method_seconds", {}).items()]
    out += ["", "## Bank", "", f"{len(meta.get('anchors', []))} anchors."]
    rules = Counter(meta.get("anchor_rules", {}).values())
    out += [f"- {n} chosen as the {rule}" for rule, n in sorted(rules.items()) if rule]
    out += [f"- cluster {c['cluster']} ({c['size']} users) has no anchor: {c['reason']}"
            for c in meta.get("clusters_without_anchor", [])]
    out += [f"- the bank has no adapter for anchor {a}" for a in meta.get("bank_missing", [])]
    out += _missing_section(result)
    source = paper_results().get("source", "")
    out += ["", f"Paper column: {source}", ""]
    return "\n".join(out)


def _wall_time(measured: dict, plan: dict | None) -> list[str]:
    """Each stage's wall time; with the run's plan (`mta plan`, plan.json), its estimate beside it."""
    if not plan:
        return ["| stage | seconds |", "|---|---:|"] + [f"| {k} | {v:.0f} |" for k, v in measured.items()]
    out = [f"The plan's estimate (`plan.json`; rates {plan['rates']['source']}) beside the measured time.", "",
           "| stage | estimated s | measured s | measured / estimated |", "|---|---:|---:|---:|"]

    def row(name: str, est: float | None, seconds: float) -> str:
        ratio = f"{seconds / est:.2f}" if est else "—"
        return f"| {name} | {'—' if est is None else f'{est:.0f}'} | {seconds:.0f} | {ratio} |"

    out += [row(k, plan["stages"].get(k, {}).get("seconds"), v) for k, v in measured.items()]
    return out + [row("total", plan["total_seconds"], sum(measured.values()))]


def _scored(result: dict) -> str:
    n, asked = result["n_users"], result["n_users_asked"]
    return f"{n} test users" if n == asked else f"{n} of {asked} test users"


def _missing_count(result: dict) -> str:
    """"; 2 missing (MTA: 2, ...), see below", or nothing when every user asked is scored."""
    gaps = {m: len(by_user) for m, by_user in result["missing"].items() if by_user}
    if not gaps:
        return ""
    n = result["n_users_asked"] - result["n_users"]
    return (f"; {n} missing from at least one method ({', '.join(f'{label(m)}: {k}' for m, k in gaps.items())}), "
            f"left out of every method's score and listed under \"Missing users\" below")


def _why(r: dict) -> str:
    """One missing (method, user): failed (with its kind, attempts and whether the next run retries it), or not run
    yet."""
    if r["reason"] == "not run":
        return "not run yet"
    kind = FAILURE_KINDS[r["kind"]]
    if r["attempts"] < r["max_attempts"]:
        return f"failed ({kind}), attempt {r['attempts']} of {r['max_attempts']}, retried by the next run: {r['error']}"
    return f"failed {r['attempts']} times ({kind}), not retried, delete {r['record']} to try again: {r['error']}"


def _missing_section(result: dict) -> list[str]:
    gaps = {m: by_user for m, by_user in result["missing"].items() if by_user}
    if not gaps:
        return []
    out = ["", "## Missing users", "",
           f"Every method is scored over the {result['n_users']} test users that every method has; these "
           f"(method, user) pairs have no result:", ""]
    for m, by_user in gaps.items():
        out.append(f"- {label(m)}: {len(by_user)} of {result['n_users_asked']} test users missing")
        out += [f"  - user {u}: {_why(r)}" for u, r in sorted(by_user.items())]
    return out


def median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if len(values) else None


def lamp_files(result: dict) -> dict[str, dict]:
    """LaMP's official output format for its evaluation script (LaMP-Benchmark/LaMP eval/eval_task.py):
    file name -> {"task": "LaMP_<n>", "golds": [{"id": query id, "output": text}]}, one file per method with
    its parsed predictions (what the official metric here scores; unparsable: "") and `golds.json` with the
    golds, over the queries of the users scored on every method."""
    task = get_task(result["task"]).lamp_id.replace("-", "_")
    rows = {m: [q for u in result["users"] for q in queries(result["per_user"][u][m])] for m in result["methods"]}

    def file(pairs) -> dict:
        return {"task": task, "golds": [{"id": str(i), "output": "" if o is None else str(o)} for i, o in pairs]}

    files = {f"{m}.json": file((q["query_id"], q["prediction"]) for q in qs) for m, qs in rows.items()}
    if rows:
        files["golds.json"] = file((q["query_id"], q["gold"]) for q in next(iter(rows.values())))
    return files
