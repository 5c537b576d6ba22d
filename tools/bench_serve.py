"""`mta serve` under load against the same users personalised one at a time in one process.

On a finished LaMP run (default: runs/news_headline/cpu-seed0, SmolLM2 with its LaMP-4 bank), each request is
one test user of the run's data file as a new user (their history and query, a fresh user id per request, so
nothing is reused):

  reference    the first --reference users, `Personalizer.answer_many([one])` one after another in this process
  clients      a server (`python -m mta serve`, 127.0.0.1 only, nothing kept per user) answers --requests
               requests at each level of concurrent clients (default 1, 4, 16); users per minute, p50/p95
               latency, the group sizes it formed, and the server's peak RSS after the first level and after all
  kept         a second server with --keep: --hits users answered once, then again (the LRU hit path)
  floor        the peak bf16/fp32 GEMM rate measured here, and the training FLOPs of a user's stacked LoRA
               (4 x linear parameters x tokens: forward, and backward to the activations): the least time the
               adapt phase can take on this machine, its model FLOPs utilisation (MFU) one at a time and in
               groups, and two bounds on what grouping can gain: one at a time's seconds per user over that floor
               (training at the GEMM peak), and over the training seconds per user measured in the largest groups
               (what grouping gains if decoding and matching cost nothing)

run: python tools/bench_serve.py [--run-dir DIR] [--method mta] [--clients 1,4,16] [--requests 16,48,144]
     [--reference 16] [--hits 16] [--json out.json]
Every HTTP call has a timeout; a server that is not ready in --start-timeout seconds stops the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mta.run.personalizer import Personalizer, Request
from tools.model_flops import linear_params, peak_gemm_flops


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float) -> dict:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A /proc/<pid>/status memory field (VmRSS: resident now, VmHWM: peak resident), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


class Server:
    """`python -m mta serve` on a free 127.0.0.1 port, up until `stop` (SIGTERM, then wait)."""

    def __init__(self, run_dir: Path, keep: int, start_timeout: float, max_wait_ms: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "mta", "serve", "--run-dir", str(run_dir), "--port",
                                      str(self.port), "--keep", str(keep), "--max-wait-ms", str(max_wait_ms)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tic = time.perf_counter()
        while time.perf_counter() - tic < start_timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mta serve exited with {self.proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"{self.url}/ready", timeout=2) as r:
                    if r.status == 200:
                        self.load_s = time.perf_counter() - tic
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mta serve was not ready within {start_timeout:g} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(url: str, bodies: list[dict], clients: int, timeout: float, pid: int) -> dict:
    """`bodies` answered by `clients` threads, each posting its next body when its last one is answered; the
    server's resident set after each answer."""
    latencies, groups, adapt, errors, rss, lock = [], [], [], [], [], threading.Lock()
    todo = iter(bodies)

    def client() -> None:
        while True:
            with lock:
                body = next(todo, None)
            if body is None:
                return
            tic = time.perf_counter()
            try:
                out = post(f"{url}/personalize", body, timeout)
            except (urllib.error.URLError, OSError) as e:
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                latencies.append(time.perf_counter() - tic)
                groups.append(out["group"])
                adapt.append(out["seconds"].get("adapt", 0.0))
                rss.append(rss_mb(pid))

    tic = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(bodies)} requests failed, first: {errors[0]}")
    return {"clients": clients, "requests": len(bodies), "seconds": wall, "users_per_min": 60 * len(bodies) / wall,
            "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 95),
            "mean_group": statistics.fmean(groups), "adapt_s": statistics.fmean(adapt), "rss_mb": rss}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/news_headline/cpu-seed0"))
    ap.add_argument("--method", default="mta")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", default="16,48,144", help="requests at each --clients level")
    ap.add_argument("--reference", type=int, default=16, help="users one at a time in this process")
    ap.add_argument("--hits", type=int, default=16, help="users answered twice by a server with --keep")
    ap.add_argument("--max-wait-ms", type=float, default=200)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per HTTP request")
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    counts = [int(c) for c in args.requests.split(",")]
    if len(clients) != len(counts):
        ap.error("--clients and --requests need as many values")
    personalizer = Personalizer.from_run(args.run_dir)
    users = personalizer.run.test_users

    def body(n: int) -> dict:
        u = users[n % (len(users) - 1)]  # the last user warms up
        return {"user_id": f"{u.user_id}#{n}", "history": u.history, "queries": [q.input for q in u.query],
                "method": args.method}

    print(f"# bench_serve: {cpu_name()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; run {args.run_dir}, method {args.method}")
    out: dict = {"cpu": cpu_name(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "run_dir": str(args.run_dir), "method": args.method}

    bf16 = personalizer.run.profile.bf16
    peak = peak_gemm_flops(torch.bfloat16 if bf16 else torch.float32)
    n_lin = linear_params(personalizer.engine.model)
    personalizer.answer_many([Request(users[-1].history, [q.input for q in users[-1].query], args.method,
                                      "warm-up")])  # first-call costs (kernel set-up) are not a user's
    tic, adapt, tokens = time.perf_counter(), [], []
    for n in range(args.reference):
        b = body(n)
        [done] = personalizer.answer_many([Request(b["history"], b["queries"], b["method"], b["user_id"])])
        adapt.append(done.personalized.seconds.get("adapt", 0.0))
        tokens.append((done.personalized.train or {}).get("tokens", 0))
    ref_s = (time.perf_counter() - tic) / args.reference
    floor = 4 * n_lin * statistics.fmean(tokens) / peak
    out["reference"] = {"users": args.reference, "seconds_per_user": ref_s, "users_per_min": 60 / ref_s,
                        "adapt_s": statistics.fmean(adapt), "train_tokens": statistics.fmean(tokens)}
    out["floor"] = {"peak_gemm_tflops": peak / 1e12, "dtype": "bf16" if bf16 else "fp32",
                    "linear_params": n_lin, "adapt_floor_s": floor,
                    "adapt_mfu": floor / statistics.fmean(adapt) if statistics.fmean(adapt) else None}
    print(f"one at a time, in process: {ref_s:.2f} s/user ({60 / ref_s:.1f} users/min), adapt "
          f"{statistics.fmean(adapt):.2f} s on {statistics.fmean(tokens):.0f} tokens")
    print(f"peak {'bf16' if bf16 else 'fp32'} GEMM {peak / 1e12:.2f} TFLOP/s: the adapt phase needs at least "
          f"{floor:.2f} s/user here (MFU {out['floor']['adapt_mfu']:.0%} one at a time), so no grouping can answer "
          f"more than {ref_s / floor:.2f}x the users a minute of one at a time")
    out["floor"]["most_speedup"] = ref_s / floor
    del personalizer

    server = Server(args.run_dir, 0, args.start_timeout, args.max_wait_ms)
    levels, sent = [], 0
    try:
        out["server_load_s"] = server.load_s
        load(server.url, [body(-1)], 1, args.timeout, server.proc.pid)  # warm-up
        for c, count in zip(clients, counts, strict=True):
            level = load(server.url, [body(sent + n) for n in range(count)], c, args.timeout, server.proc.pid)
            sent += count
            level["speedup"] = level["users_per_min"] / out["reference"]["users_per_min"]
            level["server_peak_rss_mb"] = rss_mb(server.proc.pid, "VmHWM")
            level["adapt_mfu"] = out["floor"]["adapt_floor_s"] / level["adapt_s"] if level["adapt_s"] else None
            levels.append(level)
            print(f"{c:3d} clients: {count} requests in {level['seconds']:.0f} s, {level['users_per_min']:.1f} "
                  f"users/min ({level['speedup']:.2f}x one at a time), p50 {level['p50_s']:.1f} s, p95 "
                  f"{level['p95_s']:.1f} s, groups of {level['mean_group']:.1f}, adapt {level['adapt_s']:.2f} s/user "
                  f"(MFU {level['adapt_mfu']:.0%}); server RSS after its first "
                  f"{c} answers {max(level['rss_mb'][:c]):.0f} MiB, at most {max(level['rss_mb']):.0f} MiB over "
                  f"{count}, peak {level['server_peak_rss_mb']:.0f} MiB after {sent + 1} requests")
    finally:
        server.stop()
    out["levels"] = levels
    top = levels[-1]
    out["grouping_bound"] = ref_s / top["adapt_s"] if top["adapt_s"] else None
    print(f"training a user takes {out['reference']['adapt_s']:.2f} s alone and {top['adapt_s']:.2f} s in groups of "
          f"{top['mean_group']:.0f}: with decoding and matching free, grouping could answer at most "
          f"{out['grouping_bound']:.2f}x the users a minute of one at a time here")

    if args.hits:
        server = Server(args.run_dir, args.hits, args.start_timeout, args.max_wait_ms)
        try:
            bodies = [body(10_000 + n) for n in range(args.hits)]
            first = load(server.url, bodies, min(args.hits, max(clients)), args.timeout, server.proc.pid)
            again = load(server.url, bodies, min(args.hits, max(clients)), args.timeout, server.proc.pid)
        finally:
            server.stop()
        out["kept"] = {"first": first, "again": again}
        print(f"kept adapters (--keep {args.hits}): first {first['users_per_min']:.1f} users/min p50 "
              f"{first['p50_s']:.1f} s; returning {again['users_per_min']:.1f} users/min p50 {again['p50_s']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
