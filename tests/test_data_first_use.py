"""Data on first use (mta.run.download): `mta reproduce` on the project's own data folder and `make data`
fetch the official LaMP files and the authors' test users from a loopback HTTP server serving fixtures in
the official layout. No real network: every URL points at 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import socket
import threading
from pathlib import Path

import pytest

from mta.data import lamp, lamp_release
from mta.files import sha256_file
from mta.run import download
from mta.run.commands import run_command
from mta.run.pipeline import Run
from tests.test_lamp_release import write_release

MAX_REQUESTS = 16  # per test: 5 files, a HEAD and a GET or two each
TRAIN_QUESTIONS = "/LaMP_4/train/train_questions.json"
AUTHORS_PATH = "/authors/news_headline/test_100/test_100.json"


class Stop(Exception):
    """Raised once the run's inputs are checked, so that no stage starts."""


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serve_fixtures(tmp_path: Path) -> tuple[dict[str, bytes], list[str]]:
    """(URL path -> bytes, the authors' test user ids): a tiny LaMP-4 release (12 users with 12 items,
    3 with 10) and, as the authors' test_100.json, 2 of those 3 in the processed layout (a seeded draw
    would take all 3)."""
    raw = write_release(tmp_path / "src", "lamp4", n_users=12, n_items=12, n_test=3)
    files = {
        f"/LaMP_4/{split}/{split}_{kind}.json": lamp_release.raw_path(raw, "lamp4", split, kind).read_bytes()
        for split in ("train", "dev")
        for kind in ("questions", "outputs")
    }
    test = [u for u in lamp_release.read_release("lamp4", raw) if len(u["profile"]) == 10][:2]
    files[AUTHORS_PATH] = json.dumps(test, indent=2).encode()
    return files, [u["user_id"] for u in test]


class Server:
    """http.server on 127.0.0.1 in a thread: serves `files` (URL path -> bytes), answers HEAD and
    `Range: bytes=N-`, closes the connection halfway through the first GET of each path in `cut`,
    logs each request as (method, path, Range header) and answers 503 after MAX_REQUESTS."""

    def __init__(self, files: dict[str, bytes], cut: set[str] = frozenset()):
        self.files, self.cut, self.log = files, set(cut), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                server.log.append((self.command, self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if len(server.log) > MAX_REQUESTS or data is None:
                    self.send_error(503 if data is not None else 404)
                    return
                start = int(self.headers["Range"][len("bytes="):].rstrip("-")) if self.headers["Range"] else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not body:
                    return
                if self.command == "GET" and self.path in server.cut:
                    server.cut.discard(self.path)
                    self.wfile.write(data[: len(data) // 2])  # then the connection closes
                    return
                self.wfile.write(data[start:])

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def point_at(monkeypatch, url: str, authors_sha: str, data_dir: Path) -> None:
    """Every download URL at `url`, the pinned sha256 of the fixture test file, the project's data
    folder at `data_dir`, short timeouts."""
    monkeypatch.setattr(lamp_release, "BASE_URL", url)
    monkeypatch.setattr(lamp_release, "TIMEOUT_S", 5.0)
    monkeypatch.setattr(download, "AUTHORS_FILES", f"{url}/authors")
    monkeypatch.setattr(download, "AUTHORS_TEST_USERS", {"news_headline": authors_sha})
    monkeypatch.setattr(lamp, "DATA_DIR", data_dir)
    monkeypatch.delenv("LAMP_DIR", raising=False)


def stop_after_checks(monkeypatch) -> None:
    checked = Run.check_inputs

    def check_then_stop(run):
        checked(run)
        raise Stop

    monkeypatch.setattr(Run, "check_inputs", check_then_stop)


def reproduce(tmp_path: Path, *extra: str) -> None:
    run_command("reproduce", ["--task", "lamp4", "--profile", "cpu", "--runs", str(tmp_path / "runs"),
                              "--no-progress", *extra])


def test_reproduce_fetches_and_converts_on_first_use(tmp_path, monkeypatch, capsys):
    files, test_ids = serve_fixtures(tmp_path)
    data = tmp_path / "data" / "lamp"
    stop_after_checks(monkeypatch)
    with Server(files) as server:
        point_at(monkeypatch, server.url, _sha(files[AUTHORS_PATH]), data)
        with pytest.raises(Stop):  # the data was made, then the run's inputs checked
            reproduce(tmp_path)
        out = capsys.readouterr().out
        # the sizes, before any download; then one GET per file
        assert "news_headline: 5 files to download" in out
        assert f"{len(files[TRAIN_QUESTIONS]) / 1e3:.1f} kB  {server.url}{TRAIN_QUESTIONS}" in out
        assert [m for m, _, _ in server.log] == ["HEAD"] * 5 + ["GET"] * 5
        assert {p for _, p, _ in server.log} == set(files)
        assert [u.user_id for u in lamp.load_test_users(data, "lamp4")] == test_ids
        candidates = lamp.load_candidates(data, "lamp4")
        assert len(candidates) == 13 and not {u.user_id for u in candidates} & set(test_ids)
        sums = json.loads((data / "raw" / "checksums.json").read_text())
        assert sums["authors/news_headline/test_100.json"]["sha256"] == _sha(files[AUTHORS_PATH])
        assert {v["sha256"] for v in sums.values()} == {_sha(b) for b in files.values()}

        # present: nothing fetched or converted again, the official files no longer needed; another
        # LAMP_DIR is used as it is, never filled
        shutil.rmtree(data / "raw")
        with pytest.raises(Stop):
            reproduce(tmp_path)
        with pytest.raises(SystemExit, match="file not found"):
            reproduce(tmp_path, "--lamp-dir", str(tmp_path / "other"))
        assert len(server.log) == 10 and not (tmp_path / "other").exists()


def test_interrupted_download_resumes_with_a_range_request(tmp_path, monkeypatch):
    files, test_ids = serve_fixtures(tmp_path)
    out = tmp_path / "lamp"
    argv = ["--tasks", "lamp4", "--out", str(out), "--authors-test-users"]  # make data TASK=lamp4
    with Server(files, cut={TRAIN_QUESTIONS}) as server:
        point_at(monkeypatch, server.url, _sha(files[AUTHORS_PATH]), tmp_path / "unused")
        final = out / "raw" / "LaMP_4" / "train_questions.json"
        part = final.with_name(final.name + ".part")
        half = len(files[TRAIN_QUESTIONS]) // 2
        with pytest.raises(SystemExit, match=f"connection closed after {half} of .*rerun to resume"):
            download.main(argv)
        assert part.stat().st_size == half and not final.exists()
        assert not (out / "news_headline").exists()

        download.main(argv)
        ranges = [r for m, p, r in server.log if m == "GET" and p == TRAIN_QUESTIONS]
        assert ranges == [None, f"bytes={half}-"]  # resumed where it stopped
        assert sha256_file(final) == _sha(files[TRAIN_QUESTIONS]) and not part.exists()
        sums = json.loads((out / "raw" / "checksums.json").read_text())
        assert sums["LaMP_4/train_questions.json"]["sha256"] == _sha(files[TRAIN_QUESTIONS])
        assert [u.user_id for u in lamp.load_test_users(out, "lamp4")] == test_ids
        assert len(server.log) <= MAX_REQUESTS


def test_wrong_checksum_is_refused_and_nothing_written(tmp_path, monkeypatch):
    files, _ = serve_fixtures(tmp_path)
    out = tmp_path / "lamp"
    argv = ["--tasks", "lamp4", "--out", str(out), "--authors-test-users"]
    with Server(files) as server:
        point_at(monkeypatch, server.url, "0" * 64, tmp_path / "unused")
        with pytest.raises(SystemExit, match=f"sha256 {_sha(files[AUTHORS_PATH])} is not the pinned 0{{64}}"):
            download.main(argv)
        assert _files(out) == []  # no .part, no file under its final name, no checksums, no layout

        # the same file put there by hand is refused too, and nothing is converted
        by_hand = out / "raw" / "authors" / "news_headline" / "test_100.json"
        by_hand.parent.mkdir(parents=True, exist_ok=True)  # the refused download left its folder
        by_hand.write_bytes(files[AUTHORS_PATH])
        with pytest.raises(SystemExit, match=r"differs from the pinned 0{64}"):
            download.main(argv)
        assert not (out / "news_headline").exists()
        assert len(server.log) <= MAX_REQUESTS


def test_offline_fails_in_one_line_naming_files_and_lamp_dir(tmp_path, monkeypatch):
    files, test_ids = serve_fixtures(tmp_path)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    data = tmp_path / "data" / "lamp"
    point_at(monkeypatch, closed, _sha(files[AUTHORS_PATH]), data)
    with pytest.raises(SystemExit) as e:
        reproduce(tmp_path)
    message = str(e.value.code)
    assert "\n" not in message and message.startswith("error: cannot reach")
    raw = data / "raw"
    where = {AUTHORS_PATH: raw / "authors" / "news_headline" / "test_100.json"}
    where |= {f"/LaMP_4/{s}/{s}_{k}.json": raw / "LaMP_4" / f"{s}_{k}.json"
              for s in ("train", "dev") for k in ("questions", "outputs")}
    for url_path, path in where.items():
        assert f"{closed}{url_path} at {path}" in message
    assert "set LAMP_DIR to a directory that already holds news_headline/user_anchor_candidate.json" in message
    assert not _files(tmp_path / "data")

    # the files put where the message says: the run goes on without a network
    for url_path, path in where.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[url_path])
    stop_after_checks(monkeypatch)
    with pytest.raises(Stop):
        reproduce(tmp_path)
    assert [u.user_id for u in lamp.load_test_users(data, "lamp4")] == test_ids
