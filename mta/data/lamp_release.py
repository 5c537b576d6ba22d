"""The official LaMP release -> the processed layout the MTA code reads (`mta.data.lamp`).

Official release, per task and split (user-based split; LaMP-2: the re-released
movie tagging under LaMP_2/new/):
    <raw>/LaMP_<n>/<split>_questions.json
        [{"id", "input", "profile": [item, ...]}, ...]
    <raw>/LaMP_<n>/<split>_outputs.json
        {"task": "LaMP_<n>", "golds": [{"id", "output"}, ...]}
Processed layout (what `mta.data.lamp.load_candidates` / `load_test_users` read):
    <out>/<task>/user_anchor_candidate.json
        bank candidates: [{"user_id", "profile", "query"}] (the query: the population LoRAs' example)
    <out>/<task>/test_100/test_100.json
        test users: [{"user_id", "profile", "query": [{"id", "input", "gold"}]}]

Every official question is one user: its profile and one query with the gold
(user_id = question id; the authors' test users each ask one question too).
Appendix B: `n_test` users drawn (seeded) among those with exactly 10 (LaMP-2/4),
50 (LaMP-1/5) or 100 (LaMP-3) history items become test users; every other user
is a bank candidate. Bank and test users are disjoint (main text, "Datasets"):
by user id and question id, checked before writing; and a candidate whose
history holds a test query's item with its gold (the same real user asking
another question, as in LaMP-2) is dropped from the bank.

LaMP-1: the release's profile items are papers {id, title, abstract}; the paper's
code reads {title, citation} items (a cited paper's title), which the release
lacks. A `citation` field is passed through when the items carry one; otherwise
`citation_from="abstract"` builds an explicit stand-in (see `read_release`).

Nothing is written until every input file has been read and validated; bad input
raises `LampDataError` naming the file, the question (or gold) id and the field.
Both outputs are written under temporary names, then renamed together
(`mta.files.atomic_path`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mta.data.lamp import (
    CANDIDATES_FILE,
    TEST_FILE,
    LampDataError,
    TaskSpec,
    get_task,
    select_test_users,
    validate_user,
)
from mta.files import atomic_path, read_json, sha256_file, write_json

BASE_URL = "https://ciir.cs.umass.edu/downloads/LaMP"
LAMP_NUMBER = {
    "citation": 1,
    "movie_tagging": 2,
    "product_rating": 3,
    "news_headline": 4,
    "scholarly_title": 5,
}
DEFAULT_SPLITS = ("train", "dev")  # the official splits with public outputs
# release fields `citation_from` may copy into LaMP-1's missing `citation`
CITATION_SOURCES = ("abstract",)
TIMEOUT_S = 60.0  # seconds without an answer before a request fails


class FetchError(RuntimeError):
    """A file to fetch is missing, cannot be downloaded, or fails its checksum."""


# ------------------------------------------------------------------ release files


def official_url(task: str, split: str, kind: str) -> str:
    """URL of an official user-based-split file (LaMP-2 lives under LaMP_2/new/)."""
    n = LAMP_NUMBER[get_task(task).name]
    sub = "new/" if n == 2 else ""
    return f"{BASE_URL}/LaMP_{n}/{sub}{split}/{split}_{kind}.json"


def raw_path(raw_dir: str | os.PathLike, task: str, split: str, kind: str) -> Path:
    """<raw_dir>/LaMP_<n>/<split>_<kind>.json, kind 'questions' or 'outputs'."""
    return (
        Path(raw_dir)
        / f"LaMP_{LAMP_NUMBER[get_task(task).name]}"
        / f"{split}_{kind}.json"
    )


@dataclass(frozen=True)
class Remote:
    """A file to fetch: its URL, where it goes, and its sha256 where it is published
    (pinned); without one, the sha256 seen first is recorded and checked later."""

    url: str
    path: Path
    sha256: str | None = None


def release_files(
    task: str, splits: Sequence[str], raw_dir: str | os.PathLike
) -> list[Remote]:
    """The official question and output files of `task`'s `splits`."""
    return [
        Remote(official_url(task, split, kind), raw_path(raw_dir, task, split, kind))
        for split in splits
        for kind in ("questions", "outputs")
    ]


def remote_size(url: str) -> int | None:
    """Bytes of `url` from an HTTP HEAD request's Content-Length (None: not given)."""
    req = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
        length = resp.headers.get("Content-Length")
    return int(length) if length else None


def by_hand(files: Sequence[Remote], task: str) -> str:
    """One line: where to put `files` by hand, or which LAMP_DIR to set instead."""
    where = "; ".join(f"{f.url} at {f.path}" for f in files)
    name = get_task(task).name
    return (
        f"put {where}, then rerun; or set LAMP_DIR to a directory that already holds "
        f"{name}/{CANDIDATES_FILE} and {name}/{TEST_FILE}"
    )


def download(url: str, dest: Path, expected: str | None = None) -> None:
    """Fetch `url` to `dest` through `<dest>.part`, resuming a previous `.part` with an
    HTTP Range request. A transfer cut short keeps the `.part` for the next try; a
    file whose sha256 is not `expected` is deleted. Only a whole (and, with
    `expected`, verified) file is renamed to `dest`."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(
        url, headers={"Range": f"bytes={have}-"} if have else {}
    )
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
        if have and resp.status != 206:  # server ignored the range: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = int(length) + have if length else None
        with (
            open(part, "ab" if have else "wb") as f,
            tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=dest.name
            ) as bar,
        ):
            try:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:
                raise FetchError(
                    f"{url}: download interrupted ({e!r}); rerun to resume it from {part}"
                ) from None
    got = part.stat().st_size
    if total is not None and got != total:
        raise FetchError(
            f"{url}: connection closed after {got} of {total} bytes; rerun to resume "
            f"it from {part}"
        )
    if expected is not None:
        digest = sha256_file(part)
        if digest != expected:
            part.unlink()
            raise FetchError(
                f"{url}: sha256 {digest} is not the pinned {expected}; nothing was "
                f"written to {dest}"
            )
    os.replace(part, dest)


def fetch(
    files: Sequence[Remote],
    raw_dir: str | os.PathLike,
    task: str,
    offline: bool = False,
) -> dict:
    """Make sure every one of `files` (of `task`) is under `raw_dir` and matches its
    pinned sha256, or the one in <raw_dir>/checksums.json (recorded on first sight,
    after each file); returns those records."""
    raw_dir = Path(raw_dir)
    sums_path = raw_dir / "checksums.json"
    sums = read_json(sums_path) if sums_path.exists() else {}
    for i, f in enumerate(files):
        key = f.path.relative_to(raw_dir).as_posix()
        if not f.path.exists():
            missing = [g for g in files[i:] if not g.path.exists()]
            if offline:
                raise FetchError(f"{f.path}: missing; {by_hand(missing, task)}")
            try:
                download(f.url, f.path, f.sha256)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                raise FetchError(
                    f"cannot download {f.url} ({getattr(e, 'reason', e)}); "
                    f"{by_hand(missing, task)}"
                ) from None
        digest = sha256_file(f.path)
        want = f.sha256 or sums.get(key, {}).get("sha256")
        if want is not None and want != digest:
            raise FetchError(
                f"{f.path}: sha256 {digest} differs from the "
                f"{'pinned' if f.sha256 else 'recorded'} {want}; delete it to download again"
            )
        sums[key] = {"url": f.url, "sha256": digest, "bytes": f.path.stat().st_size}
        write_json(sums_path, sums)
    return sums


# ----------------------------------------------------------- reading + validation


def load_json(path: str | os.PathLike, what: str = "entry") -> object:
    """A JSON file via `mta.files.read_json`. A missing or malformed file raises
    LampDataError naming the file and, for malformed JSON, the position, the id of
    the enclosing `what` (e.g. 'question') and the field path where parsing stopped."""
    path = Path(path)
    try:
        return read_json(path)
    except FileNotFoundError:
        raise LampDataError(f"{path}: file not found") from None
    except ValueError:
        pass
    try:  # only on error: parse again for the decoder's position
        text = path.read_text(encoding="utf-8")
        json.loads(text)
    except UnicodeDecodeError as e:
        raise LampDataError(f"{path}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        owner, fld = json_context(text, e.pos)
        where = f"{what} id {owner}" if owner is not None else f"no {what} yet"
        raise LampDataError(
            f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}), "
            f"in {where}, field {fld or '<top level>'!r}"
        ) from None
    # read_json failed but a second parse did not
    raise LampDataError(f"{path}: cannot be read as JSON")


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def json_context(text: str, pos: int) -> tuple[str | None, str]:
    """(id of the outermost object with an "id" around `pos`, field path to `pos`),
    e.g. ('4003', '[3].profile[2].text'): a scan of `text[:pos]` for strings,
    brackets, keys and commas."""
    stack: list[dict] = []  # {"kind": "{" | "[", "key", "index", "id", "want_key"}
    i, end = 0, min(pos, len(text))
    while i < end:
        c = text[i]
        top = stack[-1] if stack else None
        if c == '"':
            j = i + 1
            while j < end and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            s = text[i + 1 : j]
            if top is not None and top["kind"] == "{":
                if top["want_key"]:
                    top["key"], top["want_key"] = s, False
                elif top["key"] == "id" and top["id"] is None:
                    top["id"] = s
            i = j + 1
            continue
        if c in "{[":
            stack.append(
                {"kind": c, "key": None, "index": 0, "id": None, "want_key": c == "{"}
            )
        elif c in "}]":
            if stack:
                stack.pop()
        elif c == "," and top is not None:
            if top["kind"] == "[":
                top["index"] += 1
            else:
                top["want_key"] = True
        elif (
            top is not None
            and top["kind"] == "{"
            and top["key"] == "id"
            and top["id"] is None
            and not top["want_key"]
        ):
            m = _NUMBER.match(text, i, end)
            if m:
                top["id"] = m.group(0)
                i = m.end()
                continue
        i += 1
    owner = next(
        (f["id"] for f in stack if f["kind"] == "{" and f["id"] is not None), None
    )
    path = ""
    for f in stack:
        if f["kind"] == "[":
            path += f"[{f['index']}]"
        elif f["key"] is not None and not f["want_key"]:
            path += ("." if path else "") + f["key"]
    return owner, path


def read_golds(path: Path, spec: TaskSpec) -> dict[str, str]:
    """question id -> gold output of one `<split>_outputs.json`."""
    data = load_json(path, "gold")
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise LampDataError(
            f"{path}: expected an object with field 'golds' (a list of {{id, output}})"
        )
    task = data.get("task")
    n = LAMP_NUMBER[spec.name]
    if task is not None and not re.fullmatch(rf"LaMP_{n}[A-Za-z]*", str(task)):
        raise LampDataError(
            f"{path}: field 'task' is {task!r}, expected 'LaMP_{n}' for {spec.name}"
        )
    golds: dict[str, str] = {}
    for k, g in enumerate(data["golds"]):
        if not isinstance(g, dict) or g.get("id") in (None, ""):
            raise LampDataError(f"{path}: golds[{k}] missing field 'id'")
        gid = str(g["id"])
        out = g.get("output")
        if out is None or str(out).strip() == "":
            raise LampDataError(
                f"{path}: gold id {gid}: missing or empty field 'output'"
            )
        out = str(out)
        if spec.labels is not None and out not in spec.labels:
            raise LampDataError(
                f"{path}: gold id {gid}: field 'output' is {out!r}, not one of the "
                f"{spec.lamp_id} labels {list(spec.labels)}"
            )
        if gid in golds:
            raise LampDataError(f"{path}: gold id {gid}: field 'id' repeated")
        golds[gid] = out
    return golds


def _fill_citation(item: dict, citation_from: str) -> dict:
    return {**item, "citation": item.get(citation_from)}


def read_questions(
    qpath: Path,
    golds: dict[str, str],
    spec: TaskSpec,
    opath: Path,
    citation_from: str | None = None,
) -> list[dict]:
    """One processed user per question of `<split>_questions.json`, its gold from
    `golds` (read from `opath`); every field is checked, and errors name the file,
    the question id and the field."""
    data = load_json(qpath, "question")
    if not isinstance(data, list):
        raise LampDataError(f"{qpath}: expected a JSON list of questions")
    users, seen = [], set()
    for k, q in enumerate(data):
        if not isinstance(q, dict) or q.get("id") in (None, ""):
            raise LampDataError(f"{qpath}: question #{k}: missing field 'id'")
        qid = str(q["id"])
        where = f"{qpath}: question id {qid}"
        if qid in seen:
            raise LampDataError(f"{where}: field 'id' repeated")
        seen.add(qid)
        if not isinstance(q.get("input"), str) or not q["input"].strip():
            raise LampDataError(f"{where}: missing or empty field 'input'")
        profile = q.get("profile")
        if not isinstance(profile, list) or not profile:
            raise LampDataError(f"{where}: missing or empty field 'profile'")
        if qid not in golds:
            raise LampDataError(
                f"{opath}: no gold for question id {qid} of {qpath.name} "
                f"(field 'golds')"
            )
        if citation_from is not None:
            for j, item in enumerate(profile):
                if not isinstance(item, dict) or item.get(citation_from) in (None, ""):
                    raise LampDataError(
                        f"{where}: profile[{j}] missing field {citation_from!r} "
                        f"(citation_from={citation_from!r})"
                    )
            profile = [_fill_citation(item, citation_from) for item in profile]
        user = {
            "user_id": qid,
            "profile": profile,
            "query": [{"id": qid, "input": q["input"], "gold": golds[qid]}],
        }
        try:
            validate_user(user, spec, with_query=True, source=str(qpath))
        except LampDataError as e:
            msg = str(e).replace(f"{qpath}: user {qid}:", f"{where}:", 1)
            if (
                spec.name == "citation"
                and "'citation'" in msg
                and citation_from is None
            ):
                msg += (
                    ". The release's LaMP-1 items are papers {id, title, abstract}; "
                    "the paper's code reads a 'citation' field (a cited paper's "
                    "title) the release does not have: pass citation_from='abstract' "
                    "(--lamp1-citation-from abstract) for a stand-in"
                )
            raise LampDataError(msg) from None
        users.append(user)
    extra = sorted(set(golds) - seen)
    if extra:
        raise LampDataError(
            f"{opath}: gold id {extra[0]} has no question in {qpath.name} "
            f"(field 'id'; {len(extra)} such golds)"
        )
    return users


def read_release(
    task: str,
    raw_dir: str | os.PathLike,
    splits: Sequence[str] = DEFAULT_SPLITS,
    citation_from: str | None = None,
) -> list[dict]:
    """Every official question of `splits` as a processed test-style user
    {user_id, profile, query: [{id, input, gold}]}, in file order, all validated.

    citation_from (LaMP-1 only): None keeps the items as released, so they must
    already carry 'citation' (e.g. a copy enriched from the authors' processed
    data); 'abstract' copies each item's abstract into 'citation' (replacing any
    there): a stand-in that lets the pipeline run on the release, but not the
    paper's LaMP-1 data, so its results are not comparable to Table 1."""
    spec = get_task(task)
    if citation_from is not None and (
        spec.name != "citation" or citation_from not in CITATION_SOURCES
    ):
        raise LampDataError(
            f"citation_from={citation_from!r}: only for LaMP-1 (citation), "
            f"one of {CITATION_SOURCES}"
        )
    raw_dir = Path(raw_dir)
    users, first_seen = [], {}
    for split in splits:
        qpath, opath = (
            raw_path(raw_dir, spec.name, split, "questions"),
            raw_path(raw_dir, spec.name, split, "outputs"),
        )
        for u in read_questions(
            qpath, read_golds(opath, spec), spec, opath, citation_from
        ):
            qid = u["user_id"]
            if qid in first_seen:
                raise LampDataError(
                    f"{qpath}: question id {qid}: field 'id' also in {first_seen[qid]}"
                )
            first_seen[qid] = qpath
            users.append(u)
    return users


# -------------------------------------------------------------------------- split


def _norm(text: object) -> str:
    return " ".join(str(text).split())


def held_out_items(test: Iterable[dict], spec: TaskSpec) -> set[tuple[str, str]]:
    """(input, label) of every test query as a profile item would hold it; empty
    for LaMP-1, whose answer ([1]/[2]) is no item field."""
    if spec.name == "citation":
        return set()
    keys = set()
    for u in test:
        for q in u["query"]:
            keys.add(
                (
                    _norm(spec.query_fields(q["input"])[spec.input_field]),
                    _norm(q["gold"]),
                )
            )
    return keys


def leaking_candidates(
    candidates: Sequence[dict], test: Sequence[dict], spec: TaskSpec | str
) -> list[int]:
    """Indices of candidates whose history holds a test query's item with its gold
    label: the bank would train on a test answer (in LaMP-2 one real user asks many
    questions, each question's profile being that user's other items)."""
    spec = get_task(spec)
    keys = held_out_items(test, spec)
    if not keys:
        return []
    return [
        i
        for i, u in enumerate(candidates)
        if any(
            (_norm(it.get(spec.input_field, "")), _norm(it.get(spec.label_field, "")))
            in keys
            for it in u["profile"]
        )
    ]


def check_disjoint(
    candidates: Sequence[dict],
    test: Sequence[dict],
    spec: TaskSpec | str,
    candidate_question_ids: Iterable[str] = (),
    check_leaks: bool = True,
) -> None:
    """Raise LampDataError unless bank candidates and test users are disjoint: no
    shared user id, no test query id among the candidates' user ids or question ids,
    and (check_leaks) no test answer in a candidate's history (`leaking_candidates`).
    """
    spec = get_task(spec)
    cand_ids = {str(u["user_id"]) for u in candidates}
    same_user = sorted(cand_ids & {str(u["user_id"]) for u in test})
    if same_user:
        raise LampDataError(
            f"{spec.name}: user id {same_user[0]} is both a bank candidate and a "
            f"test user (field 'user_id'; {len(same_user)} such users)"
        )
    cand_questions = cand_ids | {str(q) for q in candidate_question_ids}
    for u in test:
        for q in u["query"]:
            if str(q["id"]) in cand_questions:
                raise LampDataError(
                    f"{spec.name}: test user {u['user_id']}: query id {q['id']} is "
                    f"also a bank candidate's question (field 'query.id')"
                )
    leaks = leaking_candidates(candidates, test, spec) if check_leaks else []
    if leaks:
        raise LampDataError(
            f"{spec.name}: bank candidate {candidates[leaks[0]]['user_id']}: field "
            f"'profile' holds a test query's item with its gold "
            f"({len(leaks)} such candidates)"
        )


@dataclass
class Split:
    candidates: list[dict]  # [{user_id, profile, query}]
    test: list[dict]  # [{user_id, profile, query}]
    # ids of the candidates dropped for holding a test answer
    dropped: list[str] = field(default_factory=list)


def split_users(
    users: Sequence[dict],
    task: str,
    n_test: int = 100,
    seed: int = 0,
    test_file: str | os.PathLike | None = None,
    history_len: int | None = None,
    drop_leaks: bool = True,
) -> Split:
    """Appendix B: test users drawn by `mta.data.lamp.select_test_users` among users with
    exactly `history_len` items (default: the task's, 10/50/100), or taken from
    `test_file` (the authors' test_100.json, matched to official questions by
    question id); all other users are bank candidates, minus (drop_leaks) those
    whose history holds a test answer."""
    spec = get_task(task)
    if test_file is None:
        sel = (
            spec
            if history_len is None
            else dataclasses.replace(spec, test_history_len=history_len)
        )
        candidates, test = select_test_users(list(users), sel, n_test=n_test, seed=seed)
    else:
        test_file = Path(test_file)
        test = load_json(test_file, "user")
        if not isinstance(test, list):
            raise LampDataError(f"{test_file}: expected a JSON list of users")
        held = set()
        for i, u in enumerate(test):
            held |= {
                q.id
                for q in validate_user(
                    u, spec, with_query=True, source=f"{test_file}: user #{i}"
                ).query
            }
        candidates = [u for u in users if u["query"][0]["id"] not in held]
    dropped = []
    if drop_leaks:
        leaks = set(leaking_candidates(candidates, test, spec))
        dropped = [str(candidates[i]["user_id"]) for i in sorted(leaks)]
        candidates = [u for i, u in enumerate(candidates) if i not in leaks]
    return Split(
        [{"user_id": u["user_id"], "profile": u["profile"], "query": u["query"]} for u in candidates],
        list(test),
        dropped,
    )


# ------------------------------------------------------------------------ writing


def write_layout(
    out_dir: str | os.PathLike,
    task: str,
    candidates: Sequence[dict],
    test: Sequence[dict],
    candidate_question_ids: Iterable[str] = (),
    check_leaks: bool = True,
) -> tuple[Path, Path]:
    """Validate both user lists and their disjointness, then write
    <out>/<task>/user_anchor_candidate.json and <out>/<task>/test_100/test_100.json,
    each to a temporary sibling, both renamed at the end. The JSON is streamed to
    disk (no second copy of the users as text) and ASCII (\\u escapes), so that a
    loader's decoded text takes one byte a character (docs/data.md, "Converter
    memory")."""
    spec = get_task(task)
    for i, u in enumerate(candidates):
        validate_user(
            u, spec, with_query=False, source=f"{spec.name} candidates: user #{i}"
        )
    for i, u in enumerate(test):
        validate_user(
            u, spec, with_query=True, source=f"{spec.name} test users: user #{i}"
        )
    check_disjoint(candidates, test, spec, candidate_question_ids, check_leaks)
    cand_path, test_path = (
        Path(out_dir) / spec.name / CANDIDATES_FILE,
        Path(out_dir) / spec.name / TEST_FILE,
    )
    # renamed on leaving the block, only once both were written
    with contextlib.ExitStack() as stack:
        for path, rows in zip((cand_path, test_path), (candidates, test), strict=True):
            with open(stack.enter_context(atomic_path(path)), "w", encoding="utf-8") as f:
                json.dump(list(rows), f, indent=2)
                f.write("\n")
    return cand_path, test_path


@dataclass
class Converted:
    task: str
    candidates_path: Path
    test_path: Path
    n_candidates: int
    n_test: int
    dropped: list[str]  # candidate ids dropped for holding a test answer
    n_requested: int  # test users asked for; more than n_test when fewer were eligible

    def summary(self) -> str:
        extra = (
            f", {len(self.dropped)} candidates dropped (history holds a test answer)"
            if self.dropped
            else ""
        )
        short = (
            f" (fewer than the {self.n_requested} requested: only {self.n_test} eligible)"
            if self.n_test < self.n_requested
            else ""
        )
        return (
            f"{self.task}: {self.n_candidates} candidates, {self.n_test} test users"
            f"{short}{extra} -> {self.candidates_path.parent}"
        )


def convert(
    task: str,
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    splits: Sequence[str] = DEFAULT_SPLITS,
    n_test: int = 100,
    seed: int = 0,
    test_file: str | os.PathLike | None = None,
    history_len: int | None = None,
    citation_from: str | None = None,
    drop_leaks: bool = True,
) -> Converted:
    """Official files of `task` under `raw_dir` -> the processed layout under
    `out_dir`. See `read_release` (citation_from) and `split_users` (n_test, seed,
    test_file, history_len, drop_leaks)."""
    spec = get_task(task)
    users = read_release(spec.name, raw_dir, splits, citation_from)
    split = split_users(
        users,
        spec.name,
        n_test=n_test,
        seed=seed,
        test_file=test_file,
        history_len=history_len,
        drop_leaks=drop_leaks,
    )
    cand_path, test_path = write_layout(
        out_dir, spec.name, split.candidates, split.test, check_leaks=drop_leaks
    )
    return Converted(
        spec.name,
        cand_path,
        test_path,
        len(split.candidates),
        len(split.test),
        split.dropped,
        n_test if test_file is None else len(split.test),
    )
