"""The paper's analyses as sweeps over the same stage functions (Figs. 2-6).

A sweep point is a run of its own under <run>/sweeps/<what>/<point>/, with the point's profile
changes. A point that changes nothing stage 1, the bank or stage 2 depend on reuses the main run's
artifacts; per-user results are cached like any run's, so a finished sweep recomputes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from mta.baselines import perpcs, proper
from mta.data.lamp import get_task
from mta.eval import report
from mta.files import atomic_path, read_json, write_json
from mta.log import log
from mta.methods import get, label
from mta.peft.adapter import load_adapter
from mta.profiles import Profile, profile_from_dict
from mta.run import inputs, pipeline
from mta.run.inputs import ARTIFACT_FIELDS
from mta.run.pipeline import Run
from mta.run.rundir import RunDir
from mta.stamps import stale


@dataclass(frozen=True)
class Sweep:
    figure: str
    x_label: str
    values: tuple
    change: Callable[[object], dict]  # value -> profile changes (profile_from_dict form)
    reference: Callable[[Profile], object]  # the value the main profile runs at
    methods: tuple[str, ...] = ("merged_only", "mta")
    parse: Callable[[str], object] = lambda text: _number(text)  # one --points value

    def label(self, value) -> str:
        if value is None:
            return "adaptive"
        if isinstance(value, tuple):
            return "lr{:g}-ep{:g}-bs{:g}".format(*value)
        return str(value)


def _number(text: str):
    if text == "adaptive":
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def _recipe(text: str) -> tuple:
    lr, epochs, batch = text.split(":")
    return float(lr), int(epochs), int(batch)


SWEEPS = {
    "alpha": Sweep("Fig. 3", "merging coefficient α (anchor 1)", (None, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                                                                  0.8, 0.9, 1.0),
                   lambda a: {"fixed_alpha": a}, lambda p: p.fixed_alpha),
    "k": Sweep("Fig. 4", "anchors merged K", (1, 2, 3, 4, 5, 6, 7, 8), lambda k: {"top_k": k}, lambda p: p.top_k),
    "rank": Sweep("Fig. 5", "stacked LoRA rank r (α = 2r)", (2, 4, 6, 8, 16),
                  lambda r: {"stack": {"rank": r, "alpha": 2.0 * r}}, lambda p: p.stack.rank, methods=("mta",)),
    "bank": Sweep("Fig. 6", "bank size V", (8, 16, 32, 64), lambda v: {"n_anchors": v}, lambda p: p.n_anchors),
    # The CPU profile's adaptation recipe (stacked LoRA, Adapt-only and OPPU alike), chosen on dev users:
    # (learning rate, epochs, batch size); the first point is Table 4.
    "adapt": Sweep("CPU profile", "adaptation recipe (lr, epochs, batch)",
                   ((1e-4, 3, 8), (1e-3, 1, 2), (3e-3, 1, 2)),
                   lambda r: {s: {"lr": r[0], "epochs": r[1], "batch_size": r[2]} for s in ("stack", "oppu")},
                   lambda p: (p.stack.lr, p.stack.epochs, p.stack.batch_size),
                   methods=("oppu", "adapt_only", "mta"), parse=_recipe),
}


def point_run(run: Run, what: str, value, methods: tuple[str, ...]) -> Run:
    """The run of one sweep point: the main run itself when the point changes nothing."""
    sweep = SWEEPS[what]
    base = _as_dict(run.profile)
    changes = {k: {**base[k], **v} if isinstance(v, dict) else v for k, v in sweep.change(value).items()}
    profile = profile_from_dict({**base, **changes}, f"sweep {what}={value}")
    if profile == run.profile:
        return dataclasses.replace(run, methods=methods)
    shares = all(getattr(profile, f) == getattr(run.profile, f) for f in ARTIFACT_FIELDS)
    root = run.dir.root / "sweeps" / what / sweep.label(value)
    return dataclasses.replace(run, profile=profile, methods=methods,
                               run_dir=RunDir(root, shared=run.dir.artifacts if shares else None))


def _as_dict(profile: Profile) -> dict:
    d = dataclasses.asdict(profile)
    d["base"] = "cpu"
    return d


def run_sweep(run: Run, what: str, values: tuple | None = None, methods: tuple[str, ...] | None = None) -> dict:
    """Every point of one sweep (for the sweep's methods, or `methods`), then <run>/sweeps/<what>.json and .png.
    The point the main profile runs at is the main run: its results are shared, its tables left as they are."""
    if what == "efficiency":
        return efficiency(run)
    if what not in SWEEPS:
        raise ValueError(f"unknown sweep {what!r}; choose from {', '.join(SWEEPS)} or efficiency")
    sweep = SWEEPS[what]
    values = values or sweep.values
    methods = methods or sweep.methods
    spec = get_task(run.task)
    metric, _ = report.primary_metric(spec)
    points = {}
    for value in values:
        point = point_run(run, what, value, methods)
        log(f"sweep {what}: point {sweep.label(value)}")
        if point.dir.root == run.dir.root:
            pipeline.stage3_run(point)
            points[sweep.label(value)] = pipeline.results(point)
            continue
        point.write_config()
        if point.dir.shared is None:
            _reuse_meta_loras(point, run)
            pipeline.stage1_bank(point, with_stage1c=True)
            pipeline.stage2_match_anchors(point)
        points[sweep.label(value)] = pipeline.run_and_report(point)
    ref = sweep.label(sweep.reference(run.profile))
    versus = {m: get(m).changed_versus for m in methods if get(m).changed_versus}
    main_rows = pipeline.collect(dataclasses.replace(run, methods=tuple(sorted(set(versus.values())))))
    out = {"what": what, "figure": sweep.figure, "x_label": sweep.x_label, "task": spec.name, "metric": metric,
           "reference_point": ref, "points": {}}
    for point_label, result in points.items():
        row = {}
        for m in methods:
            r = result["methods"].get(m)
            if r is None:
                continue
            row[m] = {"metrics": r["metrics"], "ci95": r["ci95"], "n": r["n"]}
            if m in versus:
                row[m]["changed"] = _changed(result, main_rows.get(versus[m], {}), m, versus[m])
            if point_label != ref and ref in points and m in points[ref]["methods"]:
                row[m]["vs_reference"] = _paired(result, points[ref], m, metric)
        out["points"][point_label] = row
    path = run.dir.root / "sweeps" / f"{what}.json"
    write_json(path, out)
    plot_sweep(out, path.with_suffix(".png"))
    return out


def _reuse_meta_loras(point: Run, run: Run) -> None:
    """Copy into the point's bank every meta-LoRA of its anchors that the main run, or another of its sweep
    points, made from the inputs the point's would be made from (`mta.run.inputs.adapter`: so it would come out
    equal)."""
    banks = [run.dir.artifacts / "bank", *sorted(p for p in (run.dir.root / "sweeps").glob("*/*/bank")
                                                  if p.parent != point.dir.root)]
    by_id = {u.user_id: u for u in point.candidates}
    for anchor in pipeline.stage1_select(point)["anchors"]:
        target, made_from = point.dir.adapter(anchor["user_id"]), inputs.adapter(point, by_id[anchor["user_id"]])
        source = next((b / target.name for b in banks if stale(b / target.name, made_from) is None), None)
        if source is not None and stale(target, made_from) is not None:
            with atomic_path(target, is_dir=True) as tmp:
                shutil.copytree(source, tmp, dirs_exist_ok=True)


def _changed(result: dict, untrained: dict[str, dict], method: str, versus: str) -> dict:
    """For how many queries training changed the output (vs the same prompt on the starting weights)."""
    users = [u for u in result["per_user"] if u in untrained and not untrained[u].get("error")]
    pairs = [(x, y) for u in users for x, y in zip(report.outputs(result["per_user"][u][method]),
                                                   report.outputs(untrained[u]), strict=True)]
    return {"versus": versus, "changed": sum(x != y for x, y in pairs), "of": len(pairs)}


def _paired(a: dict, b: dict, method: str, metric: str) -> dict:
    """One method between two sweep points, paired on the users both scored (`report.paired`)."""
    users = sorted(set(a["per_user"]) & set(b["per_user"]))
    x, y = (report.score_methods(r["task"], {method: {u: r["per_user"][u][method] for u in users}}, users)[method]
            for r in (a, b))
    out = report.paired(x.per_example[metric], y.per_example[metric], groups=x.groups)
    return {**out, "within_noise": not out["p"] < 0.05}


def plot_sweep(out: dict, path: Path) -> None:
    """One line per method with 95% intervals; the adaptive point (Fig. 3's Eq. 6) as a dashed level."""
    plt = _pyplot()
    if plt is None:
        return
    metric, points = out["metric"], out["points"]
    labels = [p for p in points if p != "adaptive"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in sorted({m for row in points.values() for m in row}):
        xs = [i for i, p in enumerate(labels) if m in points[p]]
        ys = [points[labels[i]][m]["metrics"][metric] for i in xs]
        lo = [y - points[labels[i]][m]["ci95"][metric][0] for i, y in zip(xs, ys, strict=True)]
        hi = [points[labels[i]][m]["ci95"][metric][1] - y for i, y in zip(xs, ys, strict=True)]
        line = ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label(m))
        if m in points.get("adaptive", {}):
            ax.axhline(points["adaptive"][m]["metrics"][metric], color=line[0].get_color(), linestyle="--",
                       label=f"{label(m)}, adaptive (Eq. 6)")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(out["x_label"])
    ax.set_ylabel(metric)
    ax.set_title(f"{out['figure']}: {out['task']} (95% bootstrap CI)")
    ax.legend(fontsize="small", loc="best")
    _save(fig, path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[plot]'): JSON written, no PNG")
        return None
    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    fig.clf()


# ----------------------------------------------------------------------------- Fig. 2


def lora_parameters(shapes: list[tuple[int, int]], rank: int) -> int:
    """Parameters of a rank-r LoRA on linear layers of (out, in) shapes."""
    return sum(rank * (o + i) for o, i in shapes)


def llama3_8b_shapes() -> list[tuple[int, int]]:
    """(out, in) of every linear LoRA targets in Llama-3-8B (32 layers, GQA 32/8 heads)."""
    h, kv, ff = 4096, 1024, 14336
    return [(h, h), (kv, h), (kv, h), (h, h), (ff, h), (ff, h), (h, ff)] * 32


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size


def _log_seconds(path: Path) -> float:
    return read_json(path / "train_log.json")["seconds"] if (path / "train_log.json").exists() else 0.0


def baseline_costs(run: Run, rows: dict) -> dict[str, dict]:
    """Per-Pcs's and PROPER's measured costs, where the run has them: training seconds and bytes stored once
    (population level) and per user, and what each stores."""
    out, task = {}, perpcs.task_path(run)
    perpcs_rows = [r for r in rows.get("perpcs", {}).values() if not r.get("error")]
    if perpcs_rows and task.exists():
        sharers = sorted(perpcs.sharers_dir(run).iterdir())
        gates = sorted(perpcs.gates_dir(run).glob("*.safetensors"))
        gate_seconds = 0.0
        for g in gates:
            with safe_open(str(g), "pt") as f:
                gate_seconds += json.loads(f.metadata()["train_log"])["seconds"]
        chosen = [sum(len(b["sharers"]) for batches in r["pieces"].values() for b in batches) for r in perpcs_rows]
        out["perpcs"] = {
            "once_seconds": _log_seconds(task) + sum(_log_seconds(s) for s in sharers) + gate_seconds,
            "once_bytes": _dir_bytes(task) + sum(map(_dir_bytes, sharers)) + sum(map(_dir_bytes, gates)),
            "seconds_per_user": sum(r["seconds"]["assemble"] for r in perpcs_rows) / len(perpcs_rows),
            "bytes_per_user": 8 * sum(chosen) / len(chosen),  # an int32 sharer index and an fp32 weight per piece
            "stores": {"once": "task LoRA, one LoRA and one gate vector per module per sharer",
                       "per_user": "per module and batch, the chosen sharers and their weights"}}
    proper_rows = [r for r in rows.get("proper", {}).values() if not r.get("error")]
    population, group = proper.population_path(run), proper.group_path(run)
    if proper_rows and (group / "mixture.safetensors").exists():
        p, per_user_params, embedding_bytes = run.profile, 0, 0
        with safe_open(str(group / "mixture.safetensors"), "pt") as f:
            names = f.keys()
            for key in names:
                shape = f.get_slice(key).get_shape()
                if key.endswith("user_embedding.weight"):  # a row per user: counted per user
                    embedding_bytes += 4 * shape[0] * shape[1]
                    per_user_params += shape[1] + p.proper_user.rank * shape[1]  # e_u and A_u
                elif key.endswith("router_l.weight"):  # W_l (E, out), trained per user, and B_u (out, r)
                    per_user_params += shape[0] * shape[1] + p.proper_user.rank * shape[1]
        out["proper"] = {
            "once_seconds": _log_seconds(population) + read_json(group / "train_log.json")["seconds"],
            "once_bytes": _dir_bytes(population) + _dir_bytes(group) - embedding_bytes,
            "seconds_per_user": sum(r["seconds"]["adapt"] for r in proper_rows) / len(proper_rows),
            "bytes_per_user": 4 * per_user_params,
            "stores": {"once": "population LoRA, the experts and the input and user-embedding routers",
                       "per_user": "user embedding, user LoRA (gate/up/down) and LoRA-aware router W_l, fp32"}}
    return out


def baseline_sizes_llama3_8b() -> dict:
    """Per-Pcs and PROPER at the paper's scale (bf16): what each stores once and per user."""
    shapes = llama3_8b_shapes()
    attention = [s for i, s in enumerate(shapes) if i % 7 < 4]
    ffn = [s for i, s in enumerate(shapes) if i % 7 >= 4]
    gates = sum(i for _, i in attention)
    return {"perpcs_once_bytes_bf16": (51 * lora_parameters(attention, 8) + 50 * gates) * 2,
            "proper_once_bytes_bf16": (lora_parameters(attention, 8) + 5 * lora_parameters(ffn, 4)
                                       + sum(5 * i * 2 for _, i in ffn)) * 2,
            "proper_bytes_per_user_bf16": (lora_parameters(ffn, 4) + sum(5 * o + i for o, i in ffn)) * 2,
            "baselines_note": "Per-Pcs: task LoRA + 50 sharer LoRAs (r 8, q/k/v/o) + gates; PROPER: population "
                              "LoRA (r 8, q/k/v/o), 5 experts (r 4) and 2 routers per FFN linear once, per user "
                              "an r-4 LoRA, W_l and an embedding row per FFN linear"}


def efficiency(run: Run) -> dict:
    """Fig. 2: training time and parameter storage against the number of users, MTA vs OPPU, and Per-Pcs and
    PROPER where the run has them."""
    rows = pipeline.collect(run)
    bank_logs = [read_json(d / "train_log.json") for d in sorted((run.dir.artifacts / "bank").iterdir())
                 if (d / "train_log.json").exists()]
    bank_files = [f for d in (run.dir.artifacts / "bank").iterdir() for f in d.glob("adapter_model.safetensors")]
    oppu = [r["seconds"]["adapt"] for r in rows.get("oppu", {}).values() if not r.get("error")]
    mta = [r["seconds"].get("adapt", 0) + r["seconds"].get("fuse", 0)
           for r in rows.get("mta", {}).values() if not r.get("error")]
    if not (bank_logs and oppu and mta):
        raise ValueError(f"{run.dir.root}: efficiency needs a finished bank and OPPU and MTA results; "
                         f"run reproduce first")
    any_anchor = load_adapter(bank_files[0].parent)
    engine_shapes = [(any_anchor.B[m].shape[0], any_anchor.A[m].shape[1]) for m in any_anchor.A]
    p = run.profile
    bytes_per = 4  # adapters are saved in fp32 here
    oppu_shapes = [(any_anchor.B[m].shape[0], any_anchor.A[m].shape[1]) for m in any_anchor.A
                   if p.oppu.targets == "all" or m.rsplit(".", 1)[-1] in p.oppu.targets]
    ours = {"oppu_adapter_bytes": lora_parameters(oppu_shapes, p.oppu.rank) * bytes_per,
            "stack_adapter_bytes": lora_parameters(engine_shapes, p.stack.rank) * bytes_per,
            "bank_bytes": sum(f.stat().st_size for f in bank_files),
            "bank_seconds": sum(log["seconds"] / log.get("group", 1) for log in bank_logs),  # a group's time, once
            "oppu_seconds_per_user": sum(oppu) / len(oppu), "mta_seconds_per_user": sum(mta) / len(mta)}
    shapes = llama3_8b_shapes()
    paper = {"oppu_adapter_bytes_bf16": lora_parameters([s for i, s in enumerate(shapes) if i % 7 in (0, 2)], 8) * 2,
             "stack_adapter_bytes_bf16": lora_parameters(shapes, 4) * 2,
             "bank_bytes_bf16": 50 * lora_parameters(shapes, 8) * 2,
             "note": "Llama-3-8B, bf16; V = 50 rank-8 meta-LoRAs and the rank-4 stacked LoRA on all linear layers, "
                     "OPPU's rank-8 user LoRA on q and v"}
    baselines = baseline_costs(run, rows)
    for name, cost in baselines.items():
        ours.update({f"{name}_{k}": v for k, v in cost.items() if k != "stores"})
    paper.update(baseline_sizes_llama3_8b())
    users = [1, 10, 50, 100, 500, 1000]
    curves = {
        "oppu_seconds": [n * ours["oppu_seconds_per_user"] for n in users],
        "mta_seconds": [ours["bank_seconds"] + n * ours["mta_seconds_per_user"] for n in users],
        "oppu_bytes": [n * ours["oppu_adapter_bytes"] for n in users],
        "mta_bytes": [ours["bank_bytes"] for _ in users],
        "mta_bytes_keeping_stacked": [ours["bank_bytes"] + n * ours["stack_adapter_bytes"] for n in users],
    }
    for name, cost in baselines.items():
        curves[f"{name}_seconds"] = [cost["once_seconds"] + n * cost["seconds_per_user"] for n in users]
        curves[f"{name}_bytes"] = [cost["once_bytes"] + n * cost["bytes_per_user"] for n in users]
    out = {"what": "efficiency", "figure": "Fig. 2", "users": users, "measured": ours, "curves": curves,
           "paper_setting": paper, "n_users_measured": len(mta),
           "stores": {name: cost["stores"] for name, cost in baselines.items()}}
    path = run.dir.root / "sweeps" / "efficiency.json"
    write_json(path, out)
    log(f"efficiency: OPPU {ours['oppu_seconds_per_user']:.1f} s and {ours['oppu_adapter_bytes'] / 2**20:.2f} MiB per "
        f"user; MTA bank {ours['bank_seconds']:.0f} s and {ours['bank_bytes'] / 2**20:.1f} MiB once, then "
        f"{ours['mta_seconds_per_user']:.1f} s per user. Llama-3-8B: OPPU "
        f"{paper['oppu_adapter_bytes_bf16'] / 2**20:.0f} MiB per user, bank {paper['bank_bytes_bf16'] / 2**20:.0f} MiB")
    plt = _pyplot()
    if plt is not None:
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        a.plot(users, [s / 3600 for s in curves["oppu_seconds"]], "o-", label="OPPU")
        a.plot(users, [s / 3600 for s in curves["mta_seconds"]], "o-", label="MTA (bank + per-user stack)")
        a.set(xscale="log", xlabel="users", ylabel="training time (h)", title="time")
        b.plot(users, [x / 2**20 for x in curves["oppu_bytes"]], "o-", label="OPPU")
        b.plot(users, [x / 2**20 for x in curves["mta_bytes"]], "o-", label="MTA (bank only)")
        b.plot(users, [x / 2**20 for x in curves["mta_bytes_keeping_stacked"]], "o--", label="MTA (+ stacked LoRAs)")
        for name in baselines:
            a.plot(users, [s / 3600 for s in curves[f"{name}_seconds"]], "s-", label=label(name))
            b.plot(users, [x / 2**20 for x in curves[f"{name}_bytes"]], "s-", label=label(name))
        b.set(xscale="log", yscale="log", xlabel="users", ylabel="storage (MiB)", title="storage")
        a.legend(), b.legend()
        _save(fig, path.with_suffix(".png"))
    return out
