"""The LaMP loaders check a whole file in one pass before any work: every problem is listed with its file, user and
field, and nothing is returned when anything is wrong (mta.data.lamp)."""

import copy
import json
import os
from pathlib import Path

import pytest

from mta.data import lamp
from mta.data.lamp import LampDataError

HEADLINE_Q = "Generate a headline for the following article: "
RATING_Q = ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
            "without further explanation. review: ")
USERS = {
    "news_headline": {
        "user_id": "u1",
        "profile": [{"id": "u1-0", "text": "Cats purr when happy.", "title": "Why Cats Purr"},
                    {"id": "u1-1", "text": "Stocks fell on Monday.", "title": "Markets Slide"}],
        "query": [{"id": "q1", "input": HEADLINE_Q + "Rain floods the valley.", "gold": "Valley Floods"}],
    },
    "product_rating": {
        "user_id": "u1",
        "profile": [{"id": "u1-0", "text": "Lovely soft blanket.", "score": "5"},
                    {"id": "u1-1", "text": "Broke in a week.", "score": 1}],
        "query": [{"id": "q1", "input": RATING_Q + "Works fine.", "gold": "4"}],
    },
}
DELETE = object()


def user(task: str = "news_headline", uid: str = "u1", **edits) -> dict:
    """A valid user of `task`, with `edits` applied: 'profile.0.title' = value (DELETE removes the key)."""
    row = copy.deepcopy(USERS[task])
    row["user_id"] = uid
    for path, value in edits.items():
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        target = row
        for k in parents:
            target = target[k]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return row


def write(root: Path, rows, task: str = "news_headline", name: str = lamp.TEST_FILE) -> Path:
    path = root / task / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rows if isinstance(rows, str) else json.dumps(rows))
    return path


def problems(root: Path, rows, task: str = "news_headline") -> str:
    """The message of the one error that loading `rows` as test users raises; it names the file."""
    path = write(root, rows, task)
    with pytest.raises(LampDataError) as err:
        lamp.load_test_users(root, task)
    assert str(err.value).startswith(f"{path}: ")
    return str(err.value)


# ----------------------------------------------------------------------------- the file as a whole


@pytest.mark.parametrize("content,expected", [
    (b'[{"user_id": "caf\xe9"}]', "not UTF-8 text (byte 17: invalid continuation byte)"),
    (b'[{"user_id": "u1",]', "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 19)"),
    (b'{"user_id": "u1"}', "expected a JSON list of users, got an object"),
    (b"[]", "no users (an empty list)"),
    (b"[" + b"9" * 5000 + b"]", "not valid JSON (Exceeds the limit (4300 digits) for integer string conversion"),
])
def test_a_bad_file_is_named_with_what_is_wrong(tmp_path, content, expected):
    path = tmp_path / "news_headline" / lamp.TEST_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(LampDataError) as err:
        lamp.load_test_users(tmp_path, "lamp4")
    assert str(err.value).startswith(f"{path}: {expected}")


def test_the_file_size_is_checked_before_the_file_is_read(tmp_path, monkeypatch):
    path = write(tmp_path, [user()])
    monkeypatch.setattr(lamp, "MAX_FILE_BYTES", path.stat().st_size - 1)
    path.write_bytes(path.read_bytes()[:-1] + b"\xff")  # not UTF-8: reading it would fail otherwise
    with pytest.raises(LampDataError, match=r"test_100\.json: \d+ bytes, more than MAX_FILE_BYTES = \d+ "
                                            r"\(mta\.data\.lamp\); not read"):
        lamp.load_test_users(tmp_path, "lamp4")


# ----------------------------------------------------------------------------- one field at a time


@pytest.mark.parametrize("edits,expected", [
    ({"user_id": DELETE}, "user #1: user_id: missing"),
    ({"user_id": ""}, "user #1: user_id: empty"),
    ({"user_id": " "}, "user #1: user_id: empty"),
    ({"user_id": True}, "user #1: user_id: not a string or an integer (true)"),
    ({"user_id": 1.5}, "user #1: user_id: not a string or an integer (the number 1.5)"),
    ({"user_id": ["u1"]}, "user #1: user_id: not a string or an integer (a list)"),
    ({"user_id": {"id": "u1"}}, "user #1: user_id: not a string or an integer (an object)"),
    ({"profile": DELETE}, "user u1: profile: missing"),
    ({"profile": []}, "user u1: profile: empty"),
    ({"profile": {"0": {}}}, "user u1: profile: not a list (an object)"),
    ({"profile.1": "an item"}, "user u1: profile[1]: not an object (a string)"),
    ({"profile.1.title": DELETE}, "user u1: profile[1].title: missing (LaMP-4 items need 'text' and 'title')"),
    ({"profile.1.title": None}, "user u1: profile[1].title: missing (LaMP-4 items need 'text' and 'title')"),
    ({"profile.0.text": ""}, "user u1: profile[0].text: empty"),
    ({"profile.0.text": "\n\t "}, "user u1: profile[0].text: empty"),
    ({"profile.0.title": 1984}, "user u1: profile[0].title: not a string (the number 1984)"),
    ({"profile.0.title": ["a"]}, "user u1: profile[0].title: not a string (a list)"),
    ({"profile.0.text": False}, "user u1: profile[0].text: not a string (false)"),
    ({"query": DELETE}, "user u1: query: missing"),
    ({"query": []}, "user u1: query: empty"),
    ({"query": "Generate a headline"}, "user u1: query: not a list (a string)"),
    ({"query.0": ["q1"]}, "user u1: query[0]: not an object (a list)"),
    ({"query.0.id": DELETE}, "user u1: query[0].id: missing"),
    ({"query.0.id": ""}, "user u1: query[0].id: empty"),
    ({"query.0.id": float("nan")}, "user u1: query[0].id: not a string or an integer (NaN)"),
    ({"query.0.id": True}, "user u1: query[0].id: not a string or an integer (true)"),
    ({"query.0.input": DELETE}, "user u1: query[0].input: missing"),
    ({"query.0.input": " "}, "user u1: query[0].input: empty"),
    ({"query.0.input": {"text": "x"}}, "user u1: query[0].input: not a string (an object)"),
    ({"query.0.input": float("inf")}, "user u1: query[0].input: not a string (Infinity)"),
    ({"query.0.input": "Title this: x"},
     f"user u1: query[0].input: not a LaMP-4 question (no {HEADLINE_Q!r}): 'Title this: x'"),
    ({"query.0.gold": DELETE}, "user u1: query[0].gold: missing"),
    ({"query.0.gold": ""}, "user u1: query[0].gold: empty"),
    ({"query.0.gold": float("nan")}, "user u1: query[0].gold: not a finite number (NaN)"),
    ({"query.0.gold": float("-inf")}, "user u1: query[0].gold: not a finite number (-Infinity)"),
    ({"query.0.gold": False}, "user u1: query[0].gold: not a string or a number (false)"),
    ({"query.0.gold": ["Valley Floods"]}, "user u1: query[0].gold: not a string or a number (a list)"),
    ({"query.0.gold": {}}, "user u1: query[0].gold: not a string or a number (an object)"),
])
def test_each_bad_field_is_named_with_its_user(tmp_path, edits, expected):
    assert problems(tmp_path, [user(uid="u0"), user(**edits)]).endswith(f": {expected}")


@pytest.mark.parametrize("score,expected", [
    (float("nan"), "not a finite number (NaN)"),
    (float("inf"), "not a finite number (Infinity)"),
    ("nan", "not a finite number ('nan')"),
    ("five", "not a number ('five')"),
    ("", "empty"),
    (True, "not a number (true)"),
    ([4], "not a number (a list)"),
    ({"value": 4}, "not a number (an object)"),
])
def test_a_rating_score_is_an_integer_or_a_numeric_string(tmp_path, score, expected):
    msg = problems(tmp_path, [user("product_rating", **{"profile.1.score": score})], "product_rating")
    assert msg.endswith(f": user u1: profile[1].score: {expected}")


def test_a_rating_score_may_be_an_integer_a_number_or_a_numeric_string(tmp_path):
    write(tmp_path, [user("product_rating", **{"profile.0.score": 4, "profile.1.score": 10**400}),
                     user("product_rating", uid="u2", **{"profile.0.score": 3.0, "profile.1.score": "2.0",
                                                         "query.0.gold": 4})], "product_rating")
    users = lamp.load_test_users(tmp_path, "lamp3")
    assert [u.history[0]["score"] for u in users] == [4, 3.0] and users[1].query[0].gold == "4"


def test_ids_may_be_integers_but_nothing_else_is_turned_into_a_string(tmp_path):
    write(tmp_path, [user(uid=7, **{"query.0.id": 70}), user(uid="8")])
    users = lamp.load_test_users(tmp_path, "lamp4")
    assert [u.user_id for u in users] == ["7", "8"] and users[0].query[0].id == "70"


def test_a_nan_gold_never_becomes_the_label_nan(tmp_path):
    path = write(tmp_path, json.dumps([user(**{"query.0.gold": float("nan")})]))
    assert '"gold": NaN' in path.read_text()
    with pytest.raises(LampDataError, match=r"query\[0\]\.gold: not a finite number \(NaN\)"):
        lamp.load_test_users(tmp_path, "lamp4")


@pytest.mark.parametrize("uids,expected", [
    (["u1", "u2", "u1"], "user u1: user_id: repeated (users #0 and #2)"),
    ([7, "7"], "user 7: user_id: repeated (users #0 and #1)"),
])
def test_a_repeated_user_id_is_named_with_both_rows(tmp_path, uids, expected):
    assert problems(tmp_path, [user(uid=u) for u in uids]).endswith(f": {expected}")


# ----------------------------------------------------------------------------- size limits


def test_a_50_kb_title_fails_before_any_work(tmp_path):
    msg = problems(tmp_path, [user(**{"profile.1.title": "x" * 50_000})])
    assert msg.endswith(": user u1: profile[1].title: 50,000 characters, more than MAX_LABEL_CHARS = 10,000 "
                        "(mta.data.lamp)")


def test_a_50_mb_item_fails_before_any_work(tmp_path):
    msg = problems(tmp_path, [user(**{"profile.0.text": "word " * 10_000_000})])
    assert msg.endswith(": user u1: profile[0].text: 50,000,000 characters, more than MAX_TEXT_CHARS = 100,000 "
                        "(mta.data.lamp)")


@pytest.mark.parametrize("edits,expected", [
    ({"profile.0.text": "x" * (lamp.MAX_TEXT_CHARS + 1)}, "profile[0].text: 100,001 characters, more than "
                                                           "MAX_TEXT_CHARS"),
    ({"profile.0.abstract": "x" * (lamp.MAX_TEXT_CHARS + 1)}, "profile[0].abstract: 100,001 characters"),
    ({"query.0.input": HEADLINE_Q + "x" * lamp.MAX_TEXT_CHARS}, "query[0].input: 100,047 characters"),
    ({"query.0.gold": "x" * (lamp.MAX_LABEL_CHARS + 1)}, "query[0].gold: 10,001 characters, more than "
                                                         "MAX_LABEL_CHARS"),
    ({"query.0.id": "q" * (lamp.MAX_LABEL_CHARS + 1)}, "query[0].id: 10,001 characters"),
])
def test_a_field_over_its_limit_is_named(tmp_path, edits, expected):
    assert f": user u1: {expected}" in problems(tmp_path, [user(**edits)])


def test_the_limits_leave_the_longest_real_values_whole(tmp_path):
    text, title = "x" * lamp.MAX_TEXT_CHARS, "x" * lamp.MAX_LABEL_CHARS
    write(tmp_path, [user(**{"profile.0.text": text, "profile.0.title": title, "query.0.gold": title})])
    assert lamp.load_test_users(tmp_path, "lamp4")[0].query[0].gold == title


def test_a_history_over_the_limit_is_named(tmp_path):
    items = [{"id": str(j), "text": "t", "title": "h"} for j in range(lamp.MAX_HISTORY_ITEMS + 1)]
    msg = problems(tmp_path, [user(profile=items)])
    assert msg.endswith(": user u1: profile: 10,001 items, more than MAX_HISTORY_ITEMS = 10,000 (mta.data.lamp)")
    write(tmp_path, [user(profile=items[:-1])])
    assert len(lamp.load_test_users(tmp_path, "lamp4")[0].history) == lamp.MAX_HISTORY_ITEMS


# ----------------------------------------------------------------------------- one pass, every problem


def test_every_problem_of_every_user_is_listed_and_nothing_is_returned(tmp_path):
    rows = [user(uid="u0"), user(uid="u1", **{"profile.0.title": ""}), user(uid="u2"),
            user(uid="u3", **{"query.0.gold": float("nan"), "profile.1.text": DELETE}), "u4", user(uid="u0")]
    msg = problems(tmp_path, rows)
    assert msg.splitlines()[1:] == [
        "  user u1: profile[0].title: empty",
        "  user u3: profile[1].text: missing (LaMP-4 items need 'text' and 'title')",
        "  user u3: query[0].gold: not a finite number (NaN)",
        "  user #4: user: not an object (a string)",
        "  user u0: user_id: repeated (users #0 and #5)",
    ]
    assert msg.splitlines()[0].endswith("test_100.json: 5 problems:")


def test_the_list_stops_at_20_problems_and_counts_the_rest(tmp_path):
    lines = problems(tmp_path, [user(uid=f"u{i}", **{"query.0.gold": ""}) for i in range(25)]).splitlines()
    assert lines[0].endswith(": 25 problems:") and len(lines) == 22
    assert lines[20] == "  user u19: query[0].gold: empty" and lines[21] == "  ... and 5 more problems"


def test_candidates_are_checked_the_same_and_their_query_is_optional(tmp_path):
    cands = [{"user_id": "c0", "profile": USERS["news_headline"]["profile"]}, user(uid="c1")]
    write(tmp_path, cands, name=lamp.CANDIDATES_FILE)
    assert [len(c.query) for c in lamp.load_candidates(tmp_path, "lamp4")] == [0, 1]
    cands += [{"user_id": "c2", "profile": [{"text": "t", "title": "x" * 50_000}], "query": []}]
    write(tmp_path, cands, name=lamp.CANDIDATES_FILE)
    with pytest.raises(LampDataError) as err:
        lamp.load_candidates(tmp_path, "lamp4")
    assert str(err.value).splitlines()[1:] == [
        "  user c2: profile[0].title: 50,000 characters, more than MAX_LABEL_CHARS = 10,000 (mta.data.lamp)",
        "  user c2: query: empty",
    ]


def test_validate_user_checks_one_row_and_lists_all_its_problems():
    spec = lamp.get_task("lamp4")
    assert lamp.validate_user(user(), spec, with_query=True).user_id == "u1"
    with pytest.raises(LampDataError) as err:
        lamp.validate_user(user(**{"profile.0.text": "", "query.0.id": None}), spec, with_query=True, source="f.json")
    assert str(err.value) == "f.json: 2 problems:\n  user u1: profile[0].text: empty\n  user u1: query[0].id: missing"
    with pytest.raises(LampDataError, match=r"^f\.json: user_id: missing$"):
        lamp.validate_user(user(user_id=DELETE), spec, with_query=True, source="f.json")


def test_leave_one_out_needs_the_minimum_history():
    history = USERS["news_headline"]["profile"]
    assert lamp.MIN_TRAIN_HISTORY == 2 == len(history)
    assert len(lamp.training_pairs("lamp4", history)) == lamp.MIN_TRAIN_HISTORY
    with pytest.raises(LampDataError, match="at least 2 profile items, got 1"):
        lamp.training_pairs("lamp4", history[:1])


# ----------------------------------------------------------------------------- real data


LAMP_DIR = Path(os.environ.get("LAMP_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "lamp"))


@pytest.mark.parametrize("task", ["news_headline", "movie_tagging"])
def test_real_lamp_files_pass_with_a_wide_margin(task):
    if not (LAMP_DIR / task).is_dir():
        pytest.skip(f"no LaMP {task} data at {LAMP_DIR}")
    users = lamp.load_candidates(LAMP_DIR, task) + lamp.load_test_users(LAMP_DIR, task)
    texts = [v for u in users for it in u.history for v in it.values() if isinstance(v, str)]
    texts += [q.input for u in users for q in u.query]
    assert max(map(len, texts)) * 50 < lamp.MAX_TEXT_CHARS
    assert max(len(u.history) for u in users) * 40 < lamp.MAX_HISTORY_ITEMS
