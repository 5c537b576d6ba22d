"""`mta serve` and its gatherer: the gatherer against a fake `answer_many`, the service on 127.0.0.1 against a fake
personalizer (timeouts, a full queue, crashes, drain) and against the tiny finished run (answers, groups, bad
requests, the LRU). Every HTTP call has a timeout."""

import contextlib
import http.client
import json
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from mta.data.lamp import get_task, load_test_users
from mta.run.gather import Crashed, Draining, Expired, Full, GatherConfig, Gatherer
from mta.run.personalizer import Answered, Personalized, Personalizer, Request
from tests.test_personalizer import run_outputs

HEADLINE = "Generate a headline for the following article: "
HISTORY = [{"text": "an article", "title": "its headline"}, {"text": "another article", "title": "another one"}]


def answered(requests):
    return [Answered(Personalized(r.user_id, r.method, r.history, anchors=["anchor"], alpha=[1.0],
                                  seconds={"adapt": 0.0}),
                     [{"query": q, "output": "o", "prediction": "o", "prompt_cut": False} for q in r.queries],
                     group=len(requests)) for r in requests]


class Fake:
    """`answer_many` that records its groups, waits for `gate` once `started` is set, and raises for user "boom"."""

    def __init__(self, blocking=False):
        self.groups, self.started, self.gate = [], threading.Event(), threading.Event()
        if not blocking:
            self.gate.set()

    def __call__(self, requests):
        self.groups.append([(r.user_id, r.method) for r in requests])
        self.started.set()
        assert self.gate.wait(30)
        if any(r.user_id == "boom" for r in requests):
            raise RuntimeError("the engine broke")
        return answered(requests)


def request(user="u", method="mta"):
    return Request(HISTORY, [HEADLINE + "x"], method, user)


@contextmanager
def gatherer(fake, **config):
    g = Gatherer(fake, GatherConfig(**{"group_size": 8, **config}))
    try:
        yield g
    finally:
        fake.gate.set()
        assert g.drain(30)


def test_requests_that_arrive_together_are_one_group_of_one_method_and_one_request_per_user():
    fake = Fake()
    with gatherer(fake, max_wait_ms=500) as g:
        futures = [g.submit(request(u, m)) for u, m in [("a", "mta"), ("c", "rag1"), ("b", "mta"), ("a", "mta")]]
        outcomes = [f.result(10) for f in futures]
    assert fake.groups == [[("a", "mta"), ("b", "mta")], [("c", "rag1")], [("a", "mta")]]
    assert [o.result.group for o in outcomes] == [2, 1, 2, 1]
    assert all(0 <= o.queued_s <= o.total_s for o in outcomes) and outcomes[0].queued_s >= 0.4  # waited for others


def test_a_group_is_at_most_group_size_and_a_full_group_does_not_wait():
    fake = Fake()
    with gatherer(fake, max_wait_ms=60_000, group_size=2) as g:
        futures = [g.submit(request(f"u{i}")) for i in range(4)]
        assert [f.result(10).result.group for f in futures] == [2, 2, 2, 2]
    assert [len(group) for group in fake.groups] == [2, 2]


def test_a_full_queue_refuses_and_the_queued_requests_are_answered():
    fake = Fake(blocking=True)
    with gatherer(fake, max_wait_ms=0, queue_size=2) as g:
        first = g.submit(request("a"))
        assert fake.started.wait(10)  # in flight: not counted in the queue
        queued = [g.submit(request("b")), g.submit(request("c"))]
        with pytest.raises(Full, match="queue_size = 2"):
            g.submit(request("d"))
        fake.gate.set()
        assert all(f.result(10).result.answers for f in [first, *queued])


def test_a_request_that_times_out_in_the_queue_is_skipped():
    fake = Fake(blocking=True)
    with gatherer(fake, max_wait_ms=0, timeout_s=0.3) as g:
        first = g.submit(request("a"))
        assert fake.started.wait(10)
        late, cancelled = g.submit(request("late")), g.submit(request("cancelled"))
        assert cancelled.cancel()
        time.sleep(0.5)
        fake.gate.set()
        assert first.result(10).result.answers
        with pytest.raises(Expired, match=r"timeout_s = 0\.3"):
            late.result(10)
    assert fake.groups == [[("a", "mta")]]


def test_a_crash_fails_its_group_only_and_the_worker_goes_on():
    fake = Fake()
    with gatherer(fake, max_wait_ms=0, group_size=1) as g:
        boom, after = g.submit(request("boom")), g.submit(request("after"))
        with pytest.raises(Crashed, match="RuntimeError: the engine broke"):
            boom.result(10)
        assert after.result(10).result.answers[0]["output"] == "o"


def test_drain_answers_the_queued_and_in_flight_requests_and_refuses_new_ones():
    fake = Fake(blocking=True)
    g = Gatherer(fake, GatherConfig(max_wait_ms=0, group_size=1))
    in_flight = g.submit(request("a"))
    assert fake.started.wait(10)
    queued = g.submit(request("b"))
    drained = []
    stopper = threading.Thread(target=lambda: drained.append(g.drain(30)))
    stopper.start()
    time.sleep(0.1)
    with pytest.raises(Draining):
        g.submit(request("c"))
    assert stopper.is_alive()  # waiting for the worker
    fake.gate.set()
    stopper.join(30)
    assert drained == [True] and g.stopped.is_set()
    assert in_flight.result(0).result.answers and queued.result(0).result.answers


@pytest.mark.parametrize(("field", "value"), [("max_wait_ms", -1), ("queue_size", 0), ("timeout_s", 0),
                                              ("group_size", 0)])
def test_a_bad_gather_setting_is_named(field, value):
    with pytest.raises(ValueError, match=f"{field}: "):
        GatherConfig(**{field: value})


# ----------------------------------------------------------------------------- the service


def call(port, method, path, body=None, timeout=60):
    """(status, JSON body) of one request on a fresh connection; `body` a dict, or bytes sent as they are."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@contextmanager
def serving(personalizer, **changes):
    """The service on a free port of 127.0.0.1 in a thread: (uvicorn server, its FastAPI app, port)."""
    from mta.run import serve

    gather = GatherConfig(**changes.pop("gather", {}))
    config = serve.ServeConfig(Path("unused"), port=0, gather=gather, **changes)
    api = serve.app(personalizer, config)
    server = serve.server(api, config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    until(lambda: server.started, 30)
    try:
        yield server, api, server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


class SlowPersonalizer(Personalizer):
    """The Personalizer's own checks on LaMP-4, with `Fake`'s answers instead of a model."""

    def __init__(self, fake):
        self.run = SimpleNamespace(task="lamp4", task_spec=get_task("lamp4"), profile=SimpleNamespace(group_size=4))
        self.answer_many = fake


def body(user="u", method="mta", **more):
    return {"user_id": user, "history": HISTORY, "queries": [HEADLINE + "x"], "method": method, **more}


def until(condition, seconds=20):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "waited too long"
        time.sleep(0.02)


def post_in_thread(port, payload, out):
    thread = threading.Thread(target=lambda: out.append(call(port, "POST", "/personalize", payload)))
    thread.start()
    return thread


def in_flight_and_queued(port, fake, out):
    """Request "a" taken by the blocked `fake`, then request "b" behind it: their threads."""
    threads = [post_in_thread(port, body("a"), out)]
    assert fake.started.wait(10)
    threads.append(post_in_thread(port, body("b"), out))
    return threads


def test_a_full_queue_is_429_a_crash_500_and_the_server_goes_on():
    fake = Fake(blocking=True)
    with serving(SlowPersonalizer(fake), gather={"max_wait_ms": 0, "queue_size": 1, "group_size": 1}) as (_, api, port):
        out = []
        threads = in_flight_and_queued(port, fake, out)
        until(lambda: api.state.gatherer.queued() == 1)
        status, refused = call(port, "POST", "/personalize", body("c"))
        assert status == 429 and "queue_size = 1" in refused["error"]
        fake.gate.set()
        for t in threads:
            t.join(30)
        assert sorted(s for s, _ in out) == [200, 200]
        status, crashed = call(port, "POST", "/personalize", body("boom"))
        assert status == 500 and "the engine broke" in crashed["error"]
        status, ok = call(port, "POST", "/personalize", body("d"))
        assert status == 200 and ok["answers"][0]["output"] == "o" and set(ok["seconds"]) == {"adapt", "queued",
                                                                                               "total"}


def test_a_request_past_its_timeout_is_504_in_flight_or_queued():
    fake = Fake(blocking=True)
    with serving(SlowPersonalizer(fake), gather={"max_wait_ms": 0, "group_size": 1, "timeout_s": 0.5}) as (_, _, port):
        out = []
        threads = in_flight_and_queued(port, fake, out)
        for t in threads:
            t.join(30)
        fake.gate.set()
        assert sorted((s, e["error"].split("(")[1]) for s, e in out) == \
            [(504, "in flight, its answer dropped)"), (504, "queued, skipped)")]
    assert fake.groups == [[("a", "mta")]]


def test_sigterm_answers_the_requests_in_flight_and_queued_and_refuses_new_ones():
    fake = Fake(blocking=True)
    with serving(SlowPersonalizer(fake), gather={"max_wait_ms": 0, "group_size": 1}) as (server, api, port):
        assert call(port, "GET", "/ready", timeout=10)[0] == 200
        out = []
        threads = in_flight_and_queued(port, fake, out)
        gatherer = api.state.gatherer
        until(lambda: gatherer.queued() == 1)
        server.handle_exit(signal.SIGTERM, None)
        assert gatherer.closed
        with pytest.raises(Draining):
            gatherer.submit(request("c"))
        with contextlib.suppress(ConnectionError):  # uvicorn closes its socket within 0.1 s: refused either way
            assert call(port, "POST", "/personalize", body("c"), timeout=10)[0] == 503
        fake.gate.set()
        for t in threads:
            t.join(30)
        assert [s for s, _ in out] == [200, 200]
    assert gatherer.stopped.is_set() and [g[0][0] for g in fake.groups] == ["a", "b"]


def test_while_draining_ready_and_personalize_are_503_and_health_200():
    with serving(SlowPersonalizer(Fake())) as (_, api, port):
        assert call(port, "GET", "/health", timeout=10) == (200, {"status": "ok"})
        status, ready = call(port, "GET", "/ready", timeout=10)
        assert status == 200 and ready["task"] == "news_headline" and ready["group_size"] == 4
        api.state.gatherer.close()
        assert call(port, "GET", "/ready", timeout=10) == (503, {"error": "draining"})
        status, refused = call(port, "POST", "/personalize", body(), timeout=10)
        assert status == 503 and "draining" in refused["error"]
        assert call(port, "GET", "/health", timeout=10) == (200, {"status": "ok"})


def test_a_body_over_max_body_bytes_is_413_with_or_without_its_length():
    payload = json.dumps(body()).encode()
    with serving(SlowPersonalizer(Fake()), max_body_bytes=len(payload) - 1) as (_, _, port):
        status, refused = call(port, "POST", "/personalize", payload, timeout=10)
        assert status == 413 and refused["error"] == f"body: {len(payload):,} bytes, more than max_body_bytes = " \
                                                     f"{len(payload) - 1:,}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("POST", "/personalize", body=iter([payload[:100], payload[100:]]), encode_chunked=True)
            response = conn.getresponse()
            assert response.status == 413 and "more than max_body_bytes" in json.loads(response.read())["error"]
        finally:
            conn.close()
        assert call(port, "POST", "/personalize", {**body(), "history": HISTORY[:1] * 2}, timeout=10)[0] == 200


def test_without_fastapi_mta_serve_says_how_to_install_it(monkeypatch, tmp_path):
    from mta.run.commands import run_command

    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(SystemExit) as stop:
        run_command("serve", ["--run-dir", str(tmp_path)])
    assert stop.value.code == 'mta serve needs FastAPI and uvicorn: pip install -e ".[serve]"'


def test_a_bad_serve_setting_is_named():
    from mta.run.serve import ServeConfig

    for field, value in [("port", 70000), ("keep", -1), ("max_body_bytes", 0), ("host", "")]:
        with pytest.raises(ValueError, match=f"{field}: "):
            ServeConfig(Path("run"), **{field: value})


# ----------------------------------------------------------------------------- on the tiny finished run


@pytest.fixture(scope="module")
def users(tiny_run):
    lamp = json.loads((tiny_run[0] / "config.json").read_text())["lamp_dir"]
    return load_test_users(lamp, "news_headline")[:2]


@pytest.fixture(scope="module")
def port(tiny_run):
    personalizer = Personalizer.from_run(tiny_run[0], keep=1)
    with serving(personalizer, gather={"max_wait_ms": 1500, "group_size": 2}) as (_, _, port):
        yield port


def user_body(user, method="mta", user_id=None):
    return {"user_id": user_id or user.user_id, "history": user.history, "queries": [q.input for q in user.query],
            "method": method, "task": "LaMP-4"}


def test_a_test_users_answers_are_the_runs(tiny_run, users, port):
    status, done = call(port, "POST", "/personalize", user_body(users[0]))
    assert status == 200, done
    assert [a["output"] for a in done["answers"]] == run_outputs(tiny_run[2], users[0].user_id, "mta")
    assert done["user_id"] == users[0].user_id and done["method"] == "mta" and not done["kept"]
    assert len(done["anchors"]) == len(done["alpha"]) > 0 and {"adapt", "queued", "total"} <= set(done["seconds"])


def test_requests_that_arrive_together_are_answered_as_one_group(users, port):
    out = []
    threads = [post_in_thread(port, user_body(u, user_id=f"together-{i}"), out) for i, u in enumerate(users)]
    for t in threads:
        t.join(120)
    assert [(s, d["group"], d["kept"]) for s, d in out] == [(200, 2, False)] * 2


def test_a_returning_user_is_answered_by_the_kept_adapter(users, port):
    first = call(port, "POST", "/personalize", user_body(users[1], user_id="returning"))
    again = call(port, "POST", "/personalize", user_body(users[1], user_id="returning"))
    assert first[0] == again[0] == 200 and not first[1]["kept"] and again[1]["kept"]
    assert again[1]["answers"] == first[1]["answers"] and "adapt" not in again[1]["seconds"]


BIG = [{"text": "x" * 10_000_000, "title": "t"}]


BAD = [  # (body, status, what the error says)
    (b"{not json", 400, "body: not JSON"),
    (b"[1, 2]", 422, "body: an array, not a JSON object"),
    ({"queries": [HEADLINE + "x"]}, 422, "history: missing"),
    ({"history": HISTORY, "queries": HEADLINE}, 422, "queries: a string, not an array"),
    ({"history": HISTORY, "queries": [3]}, 422, r"queries[0]: a number, not a string"),
    ({"history": [], "queries": [HEADLINE + "x"]}, 422, "history: empty"),
    ({"history": ["an item"], "queries": [HEADLINE + "x"]}, 422, "history[0]: a string, not an object"),
    ({"history": [{"text": "a"}], "queries": [HEADLINE + "x"], "method": "rag1"}, 422, "history[0].title: missing"),
    ({"history": HISTORY[:1], "queries": [HEADLINE + "x"]}, 422, "history: fewer than 2 items"),
    ({"history": BIG, "queries": [HEADLINE + "x"]}, 413, "bytes, more than max_body_bytes = 8,388,608"),
    ({**body(), "task": "LaMP-5"}, 422, "task: 'LaMP-5' is scholarly_title"),
    ({**body(), "task": "lamp9"}, 422, "task: unknown LaMP task 'lamp9'"),
    ({**body(), "method": "nope"}, 422, "method: unknown method 'nope'"),
    ({**body(), "method": 3}, 422, "method: a number, not a string"),
    ({**body(), "query": "q"}, 422, "query: unknown field"),
]


def test_each_bad_request_is_refused_naming_the_field_and_the_server_goes_on(users, port):
    for payload, status, named in BAD:
        got, refused = call(port, "POST", "/personalize", payload)
        assert (got, list(refused)) == (status, ["error"]) and named in refused["error"], (payload, refused)
    got, done = call(port, "POST", "/personalize", user_body(users[0], "rag1"))
    assert got == 200 and len(done["answers"]) == len(users[0].query)


def test_health_ready_and_an_unknown_route_on_the_run(port):
    assert call(port, "GET", "/health", timeout=10) == (200, {"status": "ok"})
    assert call(port, "GET", "/ready", timeout=10)[0] == 200
    status, missing = call(port, "GET", "/personalise", timeout=10)
    assert status == 404 and "/personalise" in missing["error"]


def test_mta_serve_refuses_a_group_size_over_the_run_profiles(tiny_run):
    from mta.run.commands import run_command

    with pytest.raises(SystemExit, match=r"error: group_size: 99; at most the run profile's group_size, \d+$"):
        run_command("serve", ["--run-dir", str(tiny_run[0]), "--group-size", "99"])


def test_mta_serve_answers_then_stops_on_sigterm(tiny_run, users):
    """The command as a process: it listens, answers, and on SIGTERM shuts down cleanly."""
    import re
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "mta", "serve", "--run-dir", str(tiny_run[0]), "--port", "0",
                             "--max-wait-ms", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not (found := re.search(r"running on http://127\.0\.0\.1:(\d+)", "".join(lines))):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        port = int(found.group(1))
        status, done = call(port, "POST", "/personalize", user_body(users[0], "rag1"))
        assert status == 200 and [a["output"] for a in done["answers"]] == \
            run_outputs(tiny_run[2], users[0].user_id, "rag1")
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[1]
        assert "Application shutdown complete" in rest and proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_mta_serve_runs_the_engine_on_the_main_thread_and_drains_on_sigterm(monkeypatch):
    """torch's element-wise kernels run about twice as slow from a second thread: the engine's work is the main
    thread's, uvicorn's the other's."""
    import os
    import socket

    from mta.run import serve

    threads = []

    def answer_many(requests):
        threads.append(threading.current_thread() is threading.main_thread())
        return answered(requests)

    monkeypatch.setattr(serve.Personalizer, "from_run", lambda *a, **k: SlowPersonalizer(answer_many))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = []

    def ready() -> bool:
        try:
            return call(port, "GET", "/ready", timeout=2)[0] == 200
        except OSError:
            return False

    def client():
        try:
            until(ready, 30)
            out.append(call(port, "POST", "/personalize", body("a"), timeout=30))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # whatever happened, main returns

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=client)
    thread.start()
    try:
        serve.main(["--run-dir", "unused", "--port", str(port), "--max-wait-ms", "0"])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        thread.join(30)
    assert [status for status, _ in out] == [200] and threads == [True]
