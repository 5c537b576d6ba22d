"""`mta serve`: a finished run as an HTTP JSON service. POST a user's history and queries to /personalize, get
the answers, the anchors and alpha, and seconds per phase; requests that arrive together are answered as one group
through the batched engine (mta.run.gather). FastAPI and uvicorn are the `serve` extra, imported by `app`,
`server` and `main` only.

    mta serve --run-dir runs/news_headline/cpu-seed0 [--port 8000] [--keep 0] [--max-wait-ms 200]

The body is read and checked here, not by pydantic models, so that every refusal is {"error": "<field>: ..."} with
the request's own field names (`queries[0]`, `history`), a malformed body 400 and an oversized one 413 before it is
parsed. FastAPI reads the handlers' annotations, so this module does without `from __future__ import annotations`.
SIGTERM or SIGINT: new requests get 503 and /ready 503, uvicorn stops accepting connections and answers the requests
in flight, then the lifespan's shutdown drains the queue and stops the worker. `main` runs uvicorn on a thread and
the worker, which runs the engine, on the main thread (`mta.run.gather.Gatherer`)."""

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mta.data.lamp import LampDataError, get_task
from mta.errors import InputError
from mta.run.gather import Crashed, Draining, Expired, Full, GatherConfig, Gatherer, Outcome
from mta.run.personalizer import Personalizer, Request

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

INSTALL = 'mta serve needs FastAPI and uvicorn: pip install -e ".[serve]"'
FIELDS = ("user_id", "history", "queries", "method", "task")
STATUS = {Full: 429, Draining: 503, Expired: 504, Crashed: 500}


@dataclass(frozen=True)
class ServeConfig:
    """Where the run is, where to listen, how many personalised adapters `main` has the Personalizer keep (0: none,
    nothing is kept per user), the largest body accepted, and how requests are gathered (`group_size` None: the
    run profile's, which is also the most)."""

    run_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000  # 0: a free port the system picks
    keep: int = 0
    max_body_bytes: int = 8 * 2**20
    gather: GatherConfig = field(default_factory=GatherConfig)

    def __post_init__(self):
        if not self.host:
            raise ValueError("host: empty; an address to listen on, e.g. 127.0.0.1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port}; 0 to 65535 (0: a free port)")
        if self.keep < 0:
            raise ValueError(f"keep: {self.keep} adapters; 0 or more")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes: {self.max_body_bytes}; 1 or more")


class Refused(Exception):
    """A request refused before it is queued: its HTTP status and the message naming the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def parse(body: bytes, personalizer: Personalizer) -> Request:
    """The body as a checked Request (`Personalizer.check`, which only reads the run's task spec), or Refused."""
    try:
        data = json.loads(body)
    except ValueError as e:
        raise Refused(400, f"body: not JSON: {e}") from None
    if not isinstance(data, dict):
        raise Refused(422, f"body: {kind(data)}, not a JSON object with fields {', '.join(FIELDS)}")
    if unknown := [k for k in data if k not in FIELDS]:
        raise Refused(422, f"{unknown[0]}: unknown field; the fields are {', '.join(FIELDS)}")
    for name in ("history", "queries"):
        if name not in data:
            raise Refused(422, f"{name}: missing")
        if not isinstance(data[name], list):
            raise Refused(422, f"{name}: {kind(data[name])}, not an array")
        if not data[name]:
            raise Refused(422, f"{name}: empty")
    for name in ("user_id", "method", "task"):
        if name in data and not isinstance(data[name], str):
            raise Refused(422, f"{name}: {kind(data[name])}, not a string")
    for i, item in enumerate(data["history"]):
        if not isinstance(item, dict):
            raise Refused(422, f"history[{i}]: {kind(item)}, not an object")
    for i, query in enumerate(data["queries"]):
        if not isinstance(query, str):
            raise Refused(422, f"queries[{i}]: {kind(query)}, not a string")
    spec = personalizer.run.task_spec
    if "task" in data:
        try:
            asked = get_task(data["task"])
        except LampDataError as e:
            raise Refused(422, f"task: {e}") from None
        if asked.name != spec.name:
            raise Refused(422, f"task: {data['task']!r} is {asked.name}; this run serves {spec.name} "
                               f"({personalizer.run.task!r})")
    request = Request(data["history"], data["queries"], data.get("method", "mta"), data.get("user_id", "new-user"))
    try:
        personalizer.check(request)
    except InputError as e:
        raise Refused(422, str(e)) from None
    return request


def answer(outcome: Outcome) -> dict:
    done = outcome.result
    p = done.personalized
    return {"user_id": p.user_id, "method": p.method, "answers": done.answers, "anchors": p.anchors,
            "alpha": p.alpha, "kept": done.kept, "group": done.group,
            "seconds": {**p.seconds, "queued": outcome.queued_s, "total": outcome.total_s}}


async def read_body(request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` bytes (Content-Length, or while read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"body: {int(declared):,} bytes, more than max_body_bytes = {limit:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Refused(413, f"body: more than max_body_bytes = {limit:,} bytes")
    return bytes(body)


def app(personalizer: Personalizer, config: ServeConfig, start_worker: bool = True) -> "FastAPI":
    """The service: GET /health, GET /ready, POST /personalize. Its lifespan makes the gatherer (`api.state.gatherer`,
    whose worker owns `personalizer`: on a thread of its own, or with `start_worker` False on whichever thread
    calls its `work`) and drains it at shutdown."""
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    most = personalizer.run.profile.group_size  # answer_many splits a larger group
    if config.gather.group_size is not None and config.gather.group_size > most:
        raise ValueError(f"group_size: {config.gather.group_size}; at most the run profile's group_size, {most}")
    gather = dataclasses.replace(config.gather, group_size=config.gather.group_size or most)

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        api.state.gatherer = Gatherer(personalizer.answer_many, gather, start=start_worker)
        yield
        await asyncio.to_thread(api.state.gatherer.drain)

    api = FastAPI(title="mta serve", lifespan=lifespan)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @api.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, e: HTTPException) -> JSONResponse:
        return error(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    @api.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready() -> JSONResponse:
        gatherer: Gatherer = api.state.gatherer  # made by the lifespan's startup, before any request
        if gatherer.closed:
            return error(503, "draining")
        return JSONResponse({"status": "ready", "task": personalizer.run.task_spec.name,
                             "group_size": gather.group_size, "queued": gatherer.queued()})

    @api.post("/personalize")
    async def personalize(request: HTTPRequest) -> JSONResponse:
        gatherer: Gatherer = api.state.gatherer
        try:
            if gatherer.closed:
                raise Draining("draining: the server is shutting down and takes no new requests")
            body = await read_body(request, config.max_body_bytes)
            future = gatherer.submit(await asyncio.to_thread(parse, body, personalizer))
            outcome = await asyncio.wait_for(asyncio.wrap_future(future), gather.timeout_s)
        except Refused as e:
            return error(e.status, str(e))
        except (Full, Draining, Expired, Crashed) as e:
            return error(STATUS[type(e)], str(e))
        except TimeoutError:
            where = "queued, skipped" if future.cancelled() else "in flight, its answer dropped"
            return error(504, f"timeout: no answer within timeout_s = {gather.timeout_s:g} s ({where})")
        if isinstance(outcome.result, InputError):
            return error(422, str(outcome.result))
        return JSONResponse(answer(outcome))

    return api


def server(api: "FastAPI", config: ServeConfig) -> "uvicorn.Server":
    """A uvicorn server of `api` whose SIGTERM or SIGINT first closes the gatherer (new requests and /ready get
    503), then stops as uvicorn does: no new connections, the requests in flight answered, then the lifespan's
    drain."""
    import uvicorn

    serving = uvicorn.Server(uvicorn.Config(api, host=config.host, port=config.port, lifespan="on"))
    stop = serving.handle_exit

    def handle_exit(sig, frame) -> None:
        if (gatherer := getattr(api.state, "gatherer", None)) is not None:
            gatherer.close()
        stop(sig, frame)

    serving.handle_exit = handle_exit
    return serving


def parser(prog: str | None) -> argparse.ArgumentParser:
    d = GatherConfig()
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True, help="a finished run: runs/<task>/<profile>-seed<k>")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="default 8000; 0: a free port")
    ap.add_argument("--keep", type=int, default=0,
                    help="personalised adapters kept in memory, least recently used out (default 0: none)")
    ap.add_argument("--max-body-bytes", type=int, default=8 * 2**20, help="largest request body (default 8 MiB)")
    ap.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                    help=f"how long a request waits for others to join its group (default {d.max_wait_ms:g})")
    ap.add_argument("--queue-size", type=int, default=d.queue_size,
                    help=f"requests waiting before new ones get 429 (default {d.queue_size})")
    ap.add_argument("--timeout-s", type=float, default=d.timeout_s,
                    help=f"per request, arrival to answer, else 504 (default {d.timeout_s:g})")
    ap.add_argument("--group-size", type=int, default=None,
                    help="users answered together (default and most: the run profile's group_size)")
    return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = parser(prog).parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        sys.exit(INSTALL)
    try:
        config = ServeConfig(args.run_dir, args.host, args.port, args.keep, args.max_body_bytes,
                             GatherConfig(args.max_wait_ms, args.queue_size, args.timeout_s, args.group_size))
        api = app(Personalizer.from_run(config.run_dir, keep=config.keep), config, start_worker=False)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    serving = server(api, config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, serving.handle_exit)
    http = threading.Thread(target=serving.run, name="uvicorn")  # its own event loop; no signal handlers there
    http.start()
    while http.is_alive() and getattr(api.state, "gatherer", None) is None:
        time.sleep(0.05)
    if http.is_alive():
        api.state.gatherer.work()  # the engine's work on the main thread, until SIGTERM has drained the queue
    http.join()
