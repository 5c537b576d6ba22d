"""The LaMP release converter (mta.data.lamp_release) and its CLI (tools/download_lamp.py).

`write_release` builds tiny, deterministic files in the official layout for any of
the five tasks;
`build_lamp` converts them into the processed layout (e.g. for an end-to-end run)."""

from __future__ import annotations

import importlib.util
import json
import random
import tracemalloc
from pathlib import Path

import pytest

from mta.data import lamp, lamp_release
from mta.data.lamp import CANDIDATES_FILE, MOVIE_TAGS, TEST_FILE, LampDataError

TASKS = list(
    lamp.TASKS
)  # citation, movie_tagging, product_rating, news_headline, scholarly_title
TAG_LIST = "[" + ", ".join(MOVIE_TAGS) + "]"
WORDS = (  # noqa: SIM905  (one string reads better than 49)
    "graph neural network protein folding market stocks rain valley robot mars "
    "detective baker battery kettle blanket sorting diffusion attention translation "
    "bayesian inference dropout segmentation residual learning tokyo listing flood "
    "storm election vaccine climate ocean river music guitar novel poetry chess "
    "football tennis garden coffee bread cheese train bridge tower"
).split()


def _sentence(rng: random.Random, topic: str, n: int) -> str:
    return " ".join([topic] + [rng.choice(WORDS) for _ in range(n - 1)]).capitalize()


def _question(task: str, rng: random.Random, topic: str) -> tuple[str, str]:
    """(official question input, gold output) in each task's release wording."""
    if task == "citation":
        title, cited, other = (_sentence(rng, topic, 6) for _ in range(3))
        gold = rng.choice(["[1]", "[2]"])
        o1, o2 = (cited, other) if gold == "[1]" else (other, cited)
        return (
            f'For an author who has written the paper with the title "{title}", which '
            "reference is related? Just answer with [1] or [2] without explanation. "
            f'[1]: "{o1}" [2]: "{o2}"',
            gold,
        )
    if task == "movie_tagging":
        description = _sentence(rng, topic, 15)
        return (
            "Which tag does this movie relate to among the following tags? Just answer "
            "with the tag name without further explanation. "
            f"tags: {TAG_LIST} description: {description}",
            rng.choice(MOVIE_TAGS),
        )
    if task == "product_rating":
        review = _sentence(rng, topic, 15)
        return (
            "What is the score of the following review on a scale of 1 to 5? just "
            "answer with 1, 2, 3, 4, or 5 without further explanation. "
            f"review: {review}",
            str(rng.randint(1, 5)),
        )
    if task == "news_headline":
        article = _sentence(rng, topic, 20)
        return (
            f"Generate a headline for the following article: {article}",
            _sentence(rng, topic, 6),
        )
    abstract = _sentence(rng, topic, 20)
    return (
        f"Generate a title for the following abstract of a paper: {abstract}",
        _sentence(rng, topic, 6),
    )


def _item(
    task: str, rng: random.Random, topic: str, item_id: str, lamp1_citations: bool
) -> dict:
    """One profile item with the release's field names."""
    if task == "citation":
        item = {
            "id": item_id,
            "title": _sentence(rng, topic, 6),
            "abstract": _sentence(rng, topic, 20),
        }
        if lamp1_citations:
            item["citation"] = _sentence(rng, topic, 6)
        return item
    if task == "movie_tagging":
        return {
            "id": item_id,
            "description": _sentence(rng, topic, 15),
            "tag": rng.choice(MOVIE_TAGS),
        }
    if task == "product_rating":
        return {
            "id": item_id,
            "text": _sentence(rng, topic, 15),
            "score": str(rng.randint(1, 5)),
        }
    if task == "news_headline":
        return {
            "id": item_id,
            "text": _sentence(rng, topic, 20),
            "title": _sentence(rng, topic, 6),
        }
    return {
        "id": item_id,
        "abstract": _sentence(rng, topic, 20),
        "title": _sentence(rng, topic, 6),
    }


def write_release(
    root: Path,
    task: str,
    n_users: int = 12,
    n_items: int = 12,
    n_test: int = 3,
    test_items: int | None = None,
    splits: tuple[str, ...] = ("train", "dev"),
    seed: int = 0,
    lamp1_citations: bool = False,
) -> Path:
    """Official-layout files <root>/raw/LaMP_<n>/<split>_{questions,outputs}.json for
    `task`; returns <root>/raw.

    `n_users` questions with `n_items` history items (the future bank candidates)
    and `n_test` with `test_items` (default: the task's Appendix B length, 10/50/100),
    so converting with n_test=`n_test` makes exactly those the test users. Questions
    alternate over `splits`, ids are unique, and the same arguments give the same
    bytes. LaMP-1 items are {id, title, abstract} as released, plus 'citation' with
    `lamp1_citations`; other tasks' items carry the release's field names."""
    spec = lamp.get_task(task)
    n = lamp_release.LAMP_NUMBER[spec.name]
    test_items = spec.test_history_len if test_items is None else test_items
    if n_test and n_items == test_items:
        raise ValueError(
            f"n_items == test_items == {n_items}: the candidates would be "
            "test-eligible too"
        )
    rng = random.Random(f"{spec.name}-{seed}")
    lengths = [n_items] * n_users + [test_items] * n_test
    # a fixed shuffle, so that test-eligible questions sit among the others
    order = sorted(range(len(lengths)), key=lambda k: (k * 7919) % (len(lengths) + 1))
    per_split: dict[str, tuple[list, list]] = {s: ([], []) for s in splits}
    for pos, k in enumerate(order):
        qid = f"{n}{pos:04d}"
        topic = WORDS[k % len(WORDS)]
        question, gold = _question(spec.name, rng, topic)
        profile = [
            _item(spec.name, rng, topic, f"{qid}{j:03d}", lamp1_citations)
            for j in range(lengths[k])
        ]
        questions, golds = per_split[splits[pos % len(splits)]]
        questions.append({"id": qid, "input": question, "profile": profile})
        golds.append({"id": qid, "output": gold})
    raw = root / "raw"
    for split, (questions, golds) in per_split.items():
        (raw / f"LaMP_{n}").mkdir(parents=True, exist_ok=True)
        lamp_release.raw_path(raw, spec.name, split, "questions").write_text(
            json.dumps(questions, indent=1)
        )
        lamp_release.raw_path(raw, spec.name, split, "outputs").write_text(
            json.dumps({"task": f"LaMP_{n}", "golds": golds}, indent=1)
        )
    return raw


def build_lamp(
    root: Path,
    task: str,
    n_users: int = 12,
    n_items: int = 12,
    n_test: int = 3,
    test_items: int | None = None,
    seed: int = 0,
) -> Path:
    """`write_release` converted into the processed layout; returns the LAMP_DIR
    (<root>/lamp). LaMP-1 uses the abstract stand-in for 'citation'; a `test_items`
    other than the task's Appendix B length selects test users with that many items
    instead."""
    raw = write_release(
        root,
        task,
        n_users=n_users,
        n_items=n_items,
        n_test=n_test,
        test_items=test_items,
        seed=seed,
    )
    out = root / "lamp"
    lamp_release.convert(
        task,
        raw,
        out,
        n_test=n_test,
        seed=seed,
        history_len=test_items,
        citation_from="abstract" if lamp.get_task(task).name == "citation" else None,
    )
    return out


def _release(raw: Path, task: str) -> dict[str, dict]:
    """question id -> {input, profile, gold} over all splits of a written release."""
    n = lamp_release.LAMP_NUMBER[lamp.get_task(task).name]
    out = {}
    for qpath in sorted((raw / f"LaMP_{n}").glob("*_questions.json")):
        golds = {
            g["id"]: g["output"]
            for g in json.loads(
                qpath.with_name(qpath.name.replace("questions", "outputs")).read_text()
            )["golds"]
        }
        for q in json.loads(qpath.read_text()):
            out[q["id"]] = {
                "input": q["input"],
                "profile": q["profile"],
                "gold": golds[q["id"]],
            }
    return out


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "download_lamp.py"
    spec = importlib.util.spec_from_file_location("download_lamp_cli", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("task", TASKS)
def test_round_trip_every_task(tmp_path, task):
    spec = lamp.get_task(task)
    raw = write_release(tmp_path, task)
    release = _release(raw, task)
    assert len(release) == 15
    out = tmp_path / "lamp"
    kw = {"citation_from": "abstract"} if task == "citation" else {}
    done = lamp_release.convert(task, raw, out, n_test=3, seed=0, **kw)
    assert (done.n_candidates, done.n_test, done.dropped) == (12, 3, [])
    assert (
        done.candidates_path == out / task / CANDIDATES_FILE
        and done.test_path == out / task / TEST_FILE
    )
    cands, test = lamp.load_candidates(out, task), lamp.load_test_users(out, task)
    assert len(cands) == 12 and len(test) == 3
    assert {u.user_id for u in cands} | {u.user_id for u in test} == set(release)
    assert not {u.user_id for u in cands} & {u.user_id for u in test}

    def expected_profile(qid):
        items = release[qid]["profile"]
        return (
            [{**it, "citation": it["abstract"]} for it in items]
            if task == "citation"
            else items
        )

    for u in test:
        assert len(u.history) == spec.test_history_len
        assert u.history == expected_profile(u.user_id)
        assert [(q.id, q.input, q.gold) for q in u.query] == [
            (u.user_id, release[u.user_id]["input"], release[u.user_id]["gold"])
        ]
        fields = spec.query_fields(u.query[0].input)  # the release wording, exactly
        assert spec.question.format(**fields) == u.query[0].input
        assert lamp.query_prompt(task, u.history, u.query[0]).startswith(
            "### User History:\n"
        )
    for u in cands:
        assert (
            [(q.id, q.input, q.gold) for q in u.query]
            == [(u.user_id, release[u.user_id]["input"], release[u.user_id]["gold"])]
            and len(u.history) == 12
            and u.history == expected_profile(u.user_id)
        )
    assert lamp.training_pairs(
        task, cands[0].history
    )  # the bank can be trained on them


def test_round_trip_keeps_golds_as_release_strings(tmp_path):
    raw = write_release(tmp_path, "lamp3")
    lamp_release.convert("lamp3", raw, tmp_path / "lamp", n_test=3)
    test = json.loads((tmp_path / "lamp" / "product_rating" / TEST_FILE).read_text())
    assert all(q["gold"] in lamp.RATING_LABELS for u in test for q in u["query"])
    assert all(set(u) == {"user_id", "profile", "query"} for u in test)
    cands = json.loads(
        (tmp_path / "lamp" / "product_rating" / CANDIDATES_FILE).read_text()
    )
    assert all(set(u) == {"user_id", "profile", "query"} for u in cands)  # the population example


def test_lamp1_items_with_citation_pass_through(tmp_path):
    raw = write_release(tmp_path, "lamp1", lamp1_citations=True)
    out = tmp_path / "lamp"
    lamp_release.convert("lamp1", raw, out, n_test=3)
    release = _release(raw, "lamp1")
    for u in lamp.load_candidates(out, "lamp1") + lamp.load_test_users(out, "lamp1"):
        assert u.history == release[u.user_id]["profile"]
        assert all(it["citation"] != it["abstract"] for it in u.history)


def test_lamp1_release_items_lack_citation(tmp_path):
    raw = write_release(tmp_path, "citation")
    out = tmp_path / "lamp"
    with pytest.raises(LampDataError) as err:
        lamp_release.convert("citation", raw, out, n_test=3)
    msg = str(err.value)
    assert (
        "train_questions.json: 12 problems:\n  user 10000: profile[0].citation: missing"
        in msg
    )
    assert "citation_from='abstract'" in msg
    assert _files(out) == []
    with pytest.raises(LampDataError, match="only for LaMP-1"):
        lamp_release.convert(
            "lamp4",
            write_release(tmp_path / "b", "lamp4"),
            out,
            n_test=3,
            citation_from="abstract",
        )


def test_write_release_is_deterministic(tmp_path):
    a, b = (
        write_release(tmp_path / "a", "lamp5"),
        write_release(tmp_path / "b", "lamp5"),
    )
    assert [p.read_bytes() for p in _files(a)] == [p.read_bytes() for p in _files(b)]
    assert len(_files(a)) == 4
    c = write_release(tmp_path / "c", "lamp5", seed=1)
    assert [p.read_bytes() for p in _files(a)] != [p.read_bytes() for p in _files(c)]
    with pytest.raises(ValueError, match="test-eligible"):
        write_release(tmp_path / "d", "lamp4", n_items=10)


def test_build_lamp_for_end_to_end(tmp_path):
    for task in ("lamp1", "lamp3", "lamp5"):
        out = build_lamp(tmp_path / task, task)
        assert (
            len(lamp.load_candidates(out, task)) == 12
            and len(lamp.load_test_users(out, task)) == 3
        )
    out = build_lamp(tmp_path / "short", "lamp3", test_items=6)
    assert [len(u.history) for u in lamp.load_test_users(out, "lamp3")] == [6, 6, 6]


# ----------------------------------------------------------------- Appendix B selection


def test_test_users_seeded_among_exact_history_length(tmp_path):
    raw = write_release(tmp_path, "lamp4", n_users=10, n_items=9, n_test=6)
    picks = set()
    for seed in range(6):
        out = tmp_path / f"out{seed}"
        lamp_release.convert("lamp4", raw, out, n_test=2, seed=seed)
        test, cands = (
            lamp.load_test_users(out, "lamp4"),
            lamp.load_candidates(out, "lamp4"),
        )
        assert [len(u.history) for u in test] == [10, 10] and len(cands) == 14
        picks.add(tuple(u.user_id for u in test))
    assert len(picks) > 1
    again = tmp_path / "again"
    lamp_release.convert("lamp4", raw, again, n_test=2, seed=0)
    assert (again / "news_headline" / TEST_FILE).read_bytes() == (
        tmp_path / "out0" / "news_headline" / TEST_FILE
    ).read_bytes()
    short = lamp_release.convert("lamp4", raw, tmp_path / "short", n_test=7)  # fewer eligible than asked: all
    assert short.n_test == 6 and short.n_requested == 7 and len(lamp.load_test_users(tmp_path / "short", "lamp4")) == 6
    assert "6 test users (fewer than the 7 requested: only 6 eligible)" in short.summary()
    assert "requested" not in lamp_release.convert("lamp4", raw, tmp_path / "six", n_test=6).summary()
    with pytest.raises(LampDataError, match="no user has exactly 8"):
        lamp_release.convert("lamp4", raw, tmp_path / "none", n_test=7, history_len=8)
    assert _files(tmp_path / "none") == []


# ---------------------------------------------------------------------------- bad input


def _qpath(raw: Path, task: str, split: str = "dev") -> Path:
    return lamp_release.raw_path(raw, task, split, "questions")


def _opath(raw: Path, task: str, split: str = "dev") -> Path:
    return lamp_release.raw_path(raw, task, split, "outputs")


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _convert_fails(tmp_path, raw, task) -> str:
    out = tmp_path / "lamp"
    kw = {"citation_from": "abstract"} if lamp.get_task(task).name == "citation" else {}
    with pytest.raises(LampDataError) as err:
        lamp_release.convert(task, raw, out, n_test=3, **kw)
    assert _files(out) == []  # nothing written, no temporary file left
    return str(err.value)


@pytest.mark.parametrize("task", TASKS)
def test_missing_gold_names_file_id_and_field(tmp_path, task):
    raw = write_release(tmp_path, task)
    qid = json.loads(_qpath(raw, task).read_text())[2]["id"]
    _edit(_opath(raw, task), lambda d: d["golds"].pop(2))
    msg = _convert_fails(tmp_path, raw, task)
    assert (
        str(_opath(raw, task)) in msg
        and f"question id {qid}" in msg
        and "field 'golds'" in msg
    )


@pytest.mark.parametrize("task", TASKS)
def test_profile_item_missing_field_names_file_id_and_field(tmp_path, task):
    spec = lamp.get_task(task)
    raw = write_release(tmp_path, task)
    qid = json.loads(_qpath(raw, task).read_text())[1]["id"]
    _edit(
        _qpath(raw, task),
        lambda d: d[1]["profile"][3].pop(
            spec.label_field if task != "citation" else "title"
        ),
    )
    msg = _convert_fails(tmp_path, raw, task)
    missing = spec.label_field if task != "citation" else "title"
    assert (
        f"{_qpath(raw, task)}: question id {qid}: profile[3].{missing}: missing"
        in msg
    )


@pytest.mark.parametrize("task", TASKS)
def test_malformed_questions_json_names_file_id_and_field(tmp_path, task):
    spec = lamp.get_task(task)
    raw = write_release(tmp_path, task)
    qpath = _qpath(raw, task)
    questions = json.loads(qpath.read_text())
    text = qpath.read_text()
    # cut the file inside question #2's fourth item, in the middle of its label text
    q = questions[2]
    cut = text.index(json.dumps(q["profile"][3][spec.input_field])) + 5
    qpath.write_text(text[:cut])
    msg = _convert_fails(tmp_path, raw, task)
    assert str(qpath) in msg and "not valid JSON" in msg
    assert (
        f"question id {q['id']}" in msg
        and f"field '[2].profile[3].{spec.input_field}'" in msg
    )


def test_malformed_outputs_json_names_file_id_and_field(tmp_path):
    raw = write_release(tmp_path, "lamp2")
    opath = _opath(raw, "lamp2", "train")
    text = opath.read_text()
    gold = json.loads(text)["golds"][4]
    opath.write_text(
        text.replace(f'"output": "{gold["output"]}"', '"output": twist', 1)
    )
    msg = _convert_fails(tmp_path, raw, "lamp2")
    assert (
        str(opath) in msg
        and f"gold id {gold['id']}" in msg
        and "field 'golds[4].output'" in msg
    )


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda q, o: q[0].pop("input"),
            "dev_questions.json: question id 30001: missing or empty field 'input'",
        ),
        (
            lambda q, o: q[0].update(profile=[]),
            "dev_questions.json: question id 30001: missing or empty field 'profile'",
        ),
        (
            lambda q, o: q[0].update(input="Rate this: fine"),
            "dev_questions.json: question id 30001: query\\[0\\].input: "
            "not a LaMP-3 question",
        ),
        (
            lambda q, o: q[1].update(id=q[0]["id"]),
            "dev_questions.json: question id 30001: field 'id' repeated",
        ),
        (
            lambda q, o: (q[0].update(id="30000"), o["golds"][0].update(id="30000")),
            "dev_questions.json: question id 30000: field 'id' also in .*train_q",
        ),
        (
            lambda q, o: o["golds"][0].update(output="4.5"),
            "dev_outputs.json: gold id 30001: field 'output' is '4.5', not one of the "
            "LaMP-3 labels",
        ),
        (
            lambda q, o: o["golds"].append({"id": "999", "output": "3"}),
            "dev_outputs.json: gold id 999 has no question in dev_questions.json",
        ),
        (
            lambda q, o: o.update(task="LaMP_4"),
            "dev_outputs.json: field 'task' is 'LaMP_4', expected 'LaMP_3'",
        ),
        (
            lambda q, o: o["golds"][0].pop("id"),
            "dev_outputs.json: golds\\[0\\] missing field 'id'",
        ),
    ],
)
def test_other_bad_input(tmp_path, edit, match):
    raw = write_release(tmp_path, "lamp3")
    qpath, opath = _qpath(raw, "lamp3"), _opath(raw, "lamp3")
    q, o = json.loads(qpath.read_text()), json.loads(opath.read_text())
    edit(q, o)
    qpath.write_text(json.dumps(q))
    opath.write_text(json.dumps(o))
    with pytest.raises(LampDataError, match=match):
        lamp_release.convert("lamp3", raw, tmp_path / "lamp", n_test=3)
    assert _files(tmp_path / "lamp") == []


def test_missing_release_file(tmp_path):
    raw = write_release(tmp_path, "lamp5")
    _opath(raw, "lamp5").unlink()
    with pytest.raises(LampDataError, match=r"LaMP_5/dev_outputs\.json: file not"):
        lamp_release.convert("lamp5", raw, tmp_path / "lamp", n_test=3)


def test_json_context():
    text = '[{"id": "7", "input": "x", "profile": [{"id": "7-0", "text": "a"}, '
    text += '{"id": 71, "text": "b'
    assert lamp_release.json_context(text, len(text)) == ("7", "[0].profile[1].text")
    assert lamp_release.json_context(
        '{"task": "LaMP_1", "golds": [{"id": 3, "output"', 47
    ) == ("3", "golds[0].output")
    assert lamp_release.json_context('[{"input": "a \\" b", "id"', 26) == (
        None,
        "[0].id",
    )
    assert lamp_release.json_context("", 0) == (None, "")


# ------------------------------------------------------------------------- disjointness


def test_check_disjoint_raises_and_write_layout_writes_nothing(tmp_path):
    raw = write_release(tmp_path, "lamp4")
    users = lamp_release.read_release("lamp4", raw)
    split = lamp_release.split_users(users, "lamp4", n_test=3)
    out = tmp_path / "lamp"
    first = {"user_id": split.test[0]["user_id"], "profile": split.test[0]["profile"]}
    shared = [*split.candidates, first]
    with pytest.raises(
        LampDataError,
        match=f"user id {split.test[0]['user_id']} is both a bank candidate and a test",
    ):
        lamp_release.write_layout(out, "lamp4", shared, split.test)
    with pytest.raises(
        LampDataError, match=r"query id .* is also a bank candidate's question"
    ):
        lamp_release.write_layout(
            out,
            "lamp4",
            split.candidates,
            split.test,
            candidate_question_ids=[split.test[1]["query"][0]["id"]],
        )
    assert _files(out) == []
    lamp_release.write_layout(out, "lamp4", split.candidates, split.test)
    assert len(_files(out)) == 2


def test_candidate_holding_a_test_answer_is_dropped(tmp_path):
    # LaMP-2: one real user asks several questions, each profile being their other items
    raw = write_release(tmp_path, "lamp2")
    users = lamp_release.read_release("lamp2", raw)
    test_ids = {
        u["user_id"] for u in lamp_release.split_users(users, "lamp2", n_test=3).test
    }
    t = next(u for u in users if u["user_id"] in test_ids)
    description = lamp.get_task("lamp2").query_fields(t["query"][0]["input"])[
        "description"
    ]
    victim = next(u for u in users if u["user_id"] not in test_ids)
    qpath = next(
        p
        for p in (_qpath(raw, "lamp2", "train"), _qpath(raw, "lamp2", "dev"))
        if victim["user_id"] in {q["id"] for q in json.loads(p.read_text())}
    )
    _edit(
        qpath,
        lambda d: next(q for q in d if q["id"] == victim["user_id"])["profile"][
            5
        ].update(description=f" {description} ", tag=t["query"][0]["gold"]),
    )
    done = lamp_release.convert("lamp2", raw, tmp_path / "lamp", n_test=3)
    assert (
        done.dropped == [victim["user_id"]]
        and done.n_candidates == 11
        and "1 candidates dropped" in done.summary()
    )
    assert victim["user_id"] not in {
        u.user_id for u in lamp.load_candidates(tmp_path / "lamp", "lamp2")
    }
    kept = lamp_release.convert(
        "lamp2", raw, tmp_path / "kept", n_test=3, drop_leaks=False
    )
    assert kept.dropped == [] and kept.n_candidates == 12
    split = lamp_release.split_users(
        lamp_release.read_release("lamp2", raw), "lamp2", n_test=3, drop_leaks=False
    )
    with pytest.raises(
        LampDataError,
        match=f"bank candidate {victim['user_id']}: field 'profile' holds a test",
    ):
        lamp_release.check_disjoint(split.candidates, split.test, "lamp2")


def test_test_file_holds_out_by_question_id(tmp_path):
    # the authors' test_100.json numbers users their own way
    # (LaMP-2: user 8000002 asks question 102)
    raw = write_release(tmp_path, "lamp4")
    official = json.loads(_qpath(raw, "lamp4", "train").read_text())[2]
    gold = {
        g["id"]: g["output"]
        for g in json.loads(_opath(raw, "lamp4", "train").read_text())["golds"]
    }
    authors = [
        {
            "user_id": 8000002,
            "profile": official["profile"],
            "query": [
                {
                    "id": official["id"],
                    "input": official["input"],
                    "gold": gold[official["id"]],
                }
            ],
        }
    ]
    test_file = tmp_path / "test_100.json"
    test_file.write_text(json.dumps(authors))
    out = tmp_path / "lamp"
    lamp_release.convert("lamp4", raw, out, test_file=test_file)
    cands, test = lamp.load_candidates(out, "lamp4"), lamp.load_test_users(out, "lamp4")
    assert [u.user_id for u in test] == ["8000002"] and test[0].query[0].id == official[
        "id"
    ]
    assert len(cands) == 14 and official["id"] not in {u.user_id for u in cands}
    # a test user numbered like an official question that stays a candidate
    authors[0]["user_id"] = json.loads(_qpath(raw, "lamp4", "dev").read_text())[0]["id"]
    test_file.write_text(json.dumps(authors))
    with pytest.raises(LampDataError, match="is both a bank candidate and a test user"):
        lamp_release.convert("lamp4", raw, tmp_path / "other", test_file=test_file)
    assert _files(tmp_path / "other") == []


def test_outputs_are_written_together_or_not_at_all(tmp_path):
    raw = write_release(tmp_path, "lamp5")
    out = tmp_path / "lamp"
    (out / "scholarly_title" / TEST_FILE).mkdir(
        parents=True
    )  # the rename onto it fails
    with pytest.raises(OSError):
        lamp_release.convert("lamp5", raw, out, n_test=3)
    assert _files(out) == []


def test_write_layout_streams_ascii_json_without_a_second_copy(tmp_path):
    # LaMP-3's candidates file is GBs: writing it must not build its text in memory,
    # and a file of ASCII decodes to one byte a character in the run's loader
    raw = write_release(tmp_path, "lamp3", n_users=40, n_items=60)
    split = lamp_release.split_users(
        lamp_release.read_release("lamp3", raw), "lamp3", n_test=3
    )
    split.candidates[0]["profile"][0]["text"] += " it\u2019s"
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cand_path, _ = lamp_release.write_layout(
            tmp_path / "lamp", "lamp3", split.candidates, split.test
        )
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < cand_path.stat().st_size / 4
    assert cand_path.read_bytes().isascii()
    first = lamp.load_candidates(tmp_path / "lamp", "lamp3")[0].history[0]["text"]
    assert first.endswith(" it\u2019s")


def test_synthetic_official_lamp3_has_table_3s_lengths_and_converts(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic_official.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_official", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = ["--users", "40", "--test-eligible", "3"]  # and 40 / 8 dev users
    for out in ("a", "b"):
        tool.main([*args, "--review-chars", "120", "--out", str(tmp_path / out)])
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    users = lamp_release.read_release("lamp3", tmp_path / "a")
    lengths = [len(u["profile"]) for u in users]
    assert len(users) == 45 and (min(lengths), max(lengths)) == (97, 1021)
    assert abs(sum(lengths) / len(lengths) - 202.52) < 0.05
    assert lengths.count(100) >= 3 and 100 < summary["mean_review_chars"] < 140
    assert len(json.loads(_qpath(tmp_path / "a", "lamp3", "dev").read_text())) == 5
    for split in ("train", "dev"):
        assert (
            _qpath(tmp_path / "a", "lamp3", split).read_bytes()
            == _qpath(tmp_path / "b", "lamp3", split).read_bytes()
        )
    done = lamp_release.convert("lamp3", tmp_path / "a", tmp_path / "lamp", n_test=3)
    assert (done.n_candidates, done.n_test) == (42, 3)


# ---------------------------------------------------------------------------------- CLI


def test_cli_builds_layout_offline_with_checksums(tmp_path):
    tool = _tool()
    raw = write_release(tmp_path, "lamp4")
    out = tmp_path / "lamp"
    tool.main(
        [
            "--tasks",
            "lamp4",
            "--out",
            str(out),
            "--raw-dir",
            str(raw),
            "--offline",
            "--n-test",
            "2",
        ]
    )
    assert (
        len(lamp.load_test_users(out, "lamp4")) == 2
        and len(lamp.load_candidates(out, "lamp4")) == 13
    )
    sums = json.loads((raw / "checksums.json").read_text())
    assert set(sums) == {
        f"LaMP_4/{s}_{k}.json"
        for s in ("train", "dev")
        for k in ("questions", "outputs")
    }
    assert sums["LaMP_4/dev_outputs.json"]["url"].endswith(
        "/LaMP_4/dev/dev_outputs.json"
    )
    _edit(_opath(raw, "lamp4"), lambda d: d["golds"].reverse())
    with pytest.raises(SystemExit, match="differs from the recorded"):
        tool.main(
            ["--tasks", "lamp4", "--out", str(out), "--raw-dir", str(raw), "--offline"]
        )
    assert lamp_release.official_url("lamp2", "dev", "questions").endswith(
        "/LaMP_2/new/dev/dev_questions.json"
    )


def test_cli_lamp1_needs_an_explicit_citation_source(tmp_path):
    tool = _tool()
    raw = write_release(tmp_path, "lamp1")
    out = tmp_path / "lamp"
    base = [
        "--tasks",
        "lamp1",
        "--out",
        str(out),
        "--raw-dir",
        str(raw),
        "--offline",
        "--n-test",
        "3",
    ]
    with pytest.raises(SystemExit, match="citation: official LaMP-1 profile items"):
        tool.main(base)
    assert _files(out) == []
    with pytest.raises(LampDataError, match=r"profile\[0\]\.citation: missing"):
        tool.main([*base, "--lamp1-citation-from", "keep"])
    tool.main([*base, "--lamp1-citation-from", "abstract"])
    assert len(lamp.load_test_users(out, "lamp1")) == 3


def test_cli_offline_missing_files_says_how_to_set_lamp_dir(tmp_path):
    tool = _tool()
    with pytest.raises(SystemExit, match="LAMP_DIR"):
        tool.main(["--tasks", "lamp5", "--out", str(tmp_path), "--offline"])
    assert _files(tmp_path) == []
