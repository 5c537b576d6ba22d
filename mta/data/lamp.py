"""LaMP tasks as the MTA paper's code uses them: data layout, prompts, output parsers.

Layout (the processed one the paper's scripts read, see tools/download_lamp.py):
    <lamp_dir>/<task>/user_anchor_candidate.json   bank candidates: [{user_id, profile}]
    <lamp_dir>/<task>/test_100/test_100.json       test users: [{user_id, profile, query}]

Every prompt is
    ### User History:\n{retrieved history item(s)}{gap}### User Instruction:\n{instruction}
as the authors' scripts build it (zyj1214566/MTA), one script per use:
- bank training (`training_pairs(..., bank=True)`, prepare_meta_lora.py): BM25 over the other
  items rendered as history, queried with the task's `bank_query`; gap "\n\n\n" for every task;
  profile fields cut to their first 368 words, as select_anchor.py stores the anchors.
- adaptation training (`training_pairs`, data/<task>/create_training_data.py): BM25 over
  `retrieval_doc` of the other items, queried with the item's input (LaMP-1: the first other
  item, no retrieval); gap `train_gap`.
- test queries (`query_prompt`, data/<task>/create_eval_data.py): BM25 over `retrieval_doc` of
  the whole profile, queried with `query_retrieval`; instruction `query_instruction`; gap `query_gap`.
Retrieval is a plain callable, `mta.data.bm25.top_k` by default.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mta.data import paper_prompts
from mta.data.bm25 import top_k as bm25_top_k
from mta.errors import InputError
from mta.log import log

# retrieve(query, docs, k, sep=...) -> indices of the k best docs, best first (default: mta.data.bm25.top_k), each
# text split by `sep` into tokens (a str, or None for any whitespace).
Retriever = Callable[..., list[int]]

MOVIE_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
)
CITATION_LABELS = ("[1]", "[2]")
RATING_LABELS = ("1", "2", "3", "4", "5")

HISTORY_HEADER = "### User History:\n"
INSTRUCTION_HEADER = "### User Instruction:\n"
# Between history and instruction: prompt_template.json's history item ends in "\n" and
# prepare_meta_lora.py appends "\n\n"; the per-task scripts write "\n\n\n" or "\n\n" (TaskSpec gaps).
LONG_GAP = "\n\n\n"
SHORT_GAP = "\n\n"
# Between retrieved items when k > 1 (the RAG baseline). Our choice: the authors' code has no
# k > 1 query prompt but movie_tagging's create_eval_data.py (k_history), which joins with "\n".
RAG_SEPARATOR = "\n\n"
BANK_MAX_WORDS = 368  # select_anchor.py: get_first_k_tokens(value, 368) on every anchor item field
STAGE_TEXTS = ("authors_code", "ours")  # how stages 1 and 2 show history items to their encoders

CANDIDATES_FILE = "user_anchor_candidate.json"
TEST_FILE = os.path.join("test_100", "test_100.json")


class LampDataError(InputError):
    """Bad LaMP input; the message names the file, the user and the field."""


# ----------------------------------------------------------------------------- parsers


def parse_citation(output: str) -> str | None:
    """'[1]' or '[2]': the first bracketed choice, else a bare leading 1/2."""
    m = re.search(r"\[\s*([12])\s*\]", output)
    if m is None:
        m = re.match(r"\s*([12])(?!\d|\.\d)", output)
    return f"[{m.group(1)}]" if m else None


def parse_movie_tag(output: str) -> str | None:
    """The tag that occurs first in the output (case-insensitive, whole words);
    at the same position the longer tag wins ('dark comedy' over 'comedy')."""
    text = output.lower()
    best = None  # (start, -len, tag)
    for tag in MOVIE_TAGS:
        m = re.search(r"(?<![\w-])" + re.escape(tag) + r"(?![\w-])", text)
        if m and (best is None or (m.start(), -len(tag)) < best[:2]):
            best = (m.start(), -len(tag), tag)
    return best[2] if best else None


def parse_rating(output: str) -> str | None:
    """The first standalone digit 1-5 ('4', 'Score: 4', '4/5'); '4.5' and '10' do not count."""
    m = re.search(r"(?<![\d.])([1-5])(?![\d]|\.\d)", output)
    return m.group(1) if m else None


def parse_rating_authors(output: str) -> str | None:
    """LaMP-3 as evaluate_product_rating.py:66-71 parses: the whole output as a Python float, rounded (half to
    even) and clamped to 1..5; None (the penalty of `mta.eval.metrics.rating_scores`) where float() fails or
    the value cannot be rounded (nan, inf)."""
    try:
        return str(max(1, min(5, round(float(output.strip())))))
    except (ValueError, OverflowError):
        return None


@dataclass(frozen=True)
class EvalConditions:
    """How a test query is decoded and parsed: the base's precision (`nf4`: the weights as a 4-bit NF4 base
    computes with them), whether the prompt takes the chat template, the repetition penalty, the most new
    tokens (None: the profile's `max_new_tokens`) and the parser that replaces the task's own (None: keep it)."""

    nf4: bool = False
    chat_template: bool = True
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    parse: Callable[[str], str | None] | None = None


# The released evaluation scripts (zyj1214566/MTA eval/<task>/evaluate_<task>.py): LaMP-1, 2, 3 and 5 load the
# merged base in 4-bit NF4 (bf16 compute, no double quantisation) with the stacked LoRA unmerged on it, LaMP-4
# in bf16; LaMP-1, 2 and 3 apply the chat template, LaMP-4 and 5 tokenize the bare instruction; LaMP-3 decodes
# with repetition_penalty=1.1 and parses with float(); each script has its own max_new_tokens.
AUTHORS_EVAL = {
    "citation": EvalConditions(nf4=True, max_new_tokens=5),
    "movie_tagging": EvalConditions(nf4=True, max_new_tokens=10),
    "product_rating": EvalConditions(nf4=True, repetition_penalty=1.1, max_new_tokens=3, parse=parse_rating_authors),
    "news_headline": EvalConditions(chat_template=False, max_new_tokens=50),
    "scholarly_title": EvalConditions(nf4=True, chat_template=False, max_new_tokens=30),
}


def parse_first_line(output: str) -> str:
    """First non-empty line, stripped ('' if there is none)."""
    for line in output.splitlines():
        if line.strip():
            return line.strip()
    return ""


def parse_title(output: str) -> str:
    """First non-empty line up to its first '.', stripped (evaluate_scholarly_title.py)."""
    return parse_first_line(output).split(".")[0].strip()


# ----------------------------------------------------------------------------- task specs


@dataclass(frozen=True)
class TaskSpec:
    """Everything task-specific, in one place.

    input_field/label_field: the profile item's fields (the label is the training target).
    question: the official LaMP question wording (what test_100.json `input` holds);
        `question_marker` is the text right before the item's input in it.
    instruction: the authors' instruction template for training, filled with the item's fields.
    history: how one history item is rendered inside "### User History".
    retrieval_doc: what BM25 indexes for a history item (the per-task scripts).
    bank_query: the BM25 query of a bank example (prompt_template.json `retrieval_query_wokey`);
        the bank indexes history items as rendered.
    query_retrieval / query_instruction: a test query's BM25 query and instruction, filled with the
        fields of `query_fields` plus `question`; the instruction defaults to `instruction`.
    train_gap / query_gap: between history and instruction in adaptation / test prompts.
    cluster_item: an item as stage 1 embeds it in the authors' code (prompt.json `retrieval_history`,
        select_anchor.py:68; the file is Per-Pcs's prompt/prompt.json, MTA ships none).
    match_fields: the fields of an item stage 2 joins in the authors' code (dense_retrieval_matcher.py:56-116).
    """

    name: str
    lamp_id: str
    input_field: str
    label_field: str
    question: str
    question_marker: str
    instruction: str
    history: str
    retrieval_doc: str
    bank_query: str
    query_retrieval: str
    train_gap: str
    query_gap: str
    parse: Callable[[str], str | None]
    metric: str  # "classification" | "rating" | "generation"
    metric_names: tuple[str, ...]
    test_history_len: int  # Appendix B: test users have exactly this many history items
    cluster_item: str
    match_fields: tuple[str, ...]
    labels: tuple[str, ...] | None = None
    query_instruction: str | None = None
    # How the released scripts tokenise history and query for BM25: split(" ") for LaMP-1/3/4/5 and the bank, split()
    # for LaMP-2 (movie_tagging/create_*_data.py) and for LaMP-1's hard negatives (`citation_options`).
    bm25_sep: str | None = " "

    @property
    def profile_fields(self) -> tuple[str, str]:
        return (self.input_field, self.label_field)

    def render_history(self, item: dict) -> str:
        return self.history.format(**_as_text(item))

    def render_instruction(self, fields: dict) -> str:
        return self.instruction.format(**_as_text(fields))

    def render_query_instruction(self, fields: dict) -> str:
        return (self.query_instruction or self.instruction).format(**_as_text(fields))

    def query_fields(self, question: str) -> dict:
        """Recover the item's input (and, for LaMP-1, the two options) from a LaMP question."""
        if self.name == "citation":
            m = re.search(r'title "(.*)", which reference is related\?.*\[1\]: "(.*)" \[2\]: "(.*)"',
                          question, re.DOTALL)
            if m is None:
                raise LampDataError(f"not a LaMP-1 question (title and [1]/[2] options expected): {question[:80]!r}")
            return {"title": m.group(1), "option1": m.group(2), "option2": m.group(3)}
        pos = question.find(self.question_marker)
        if pos < 0:
            raise LampDataError(f"not a {self.lamp_id} question (no {self.question_marker!r}): {question[:80]!r}")
        return {self.input_field: question[pos + len(self.question_marker):].strip()}


MOVIE_TAG_LIST = "[" + ", ".join(MOVIE_TAGS) + "]"

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="citation", lamp_id="LaMP-1", input_field="title", label_field="citation",
            question='For an author who has written the paper with the title "{title}", which reference is '
                     'related? Just answer with [1] or [2] without explanation. [1]: "{option1}" [2]: "{option2}"',
            question_marker='written the paper with the title "',
            instruction='For an author who has written the paper with the title "{title}", which reference is '
                        'related? Just answer with [1] or [2] without explanation.\n'
                        'Reference: [1] - {option1} [2] - {option2}\nAnswer:',
            history="Paper Title: {title} Citation: {citation}",
            retrieval_doc="{title}",
            bank_query='For an author who has written the paper with the title "{title}", which reference is '
                       'related? Just answer with [1] or [2] without explanation.',
            query_retrieval="{title}", train_gap=SHORT_GAP, query_gap=SHORT_GAP,
            parse=parse_citation, metric="classification", metric_names=("accuracy", "f1"),
            test_history_len=50, labels=CITATION_LABELS,
            cluster_item="Paper Title: {title}\n", match_fields=("title", "abstract", "citation"),
        ),
        TaskSpec(
            name="movie_tagging", lamp_id="LaMP-2", input_field="description", label_field="tag",
            question="Which tag does this movie relate to among the following tags? Just answer with the tag "
                     "name without further explanation. tags: " + MOVIE_TAG_LIST + " description: {description}",
            question_marker="] description: ",
            instruction="Which tag does this movie relate to among the following tags? Just answer with the tag "
                        "name without further explanation. tags: " + MOVIE_TAG_LIST +
                        "\nDescription: {description} Tag:",
            history="Description: {description} Tag: {tag}",
            retrieval_doc="{description} {tag}",
            bank_query="Which tag does this movie relate to among the following tags? Just answer with the tag "
                       "name without further explanation.\n Description: {description}",
            query_retrieval="{question}", query_instruction="{question} Tag:", bm25_sep=None,
            train_gap=SHORT_GAP, query_gap=SHORT_GAP,
            parse=parse_movie_tag, metric="classification", metric_names=("accuracy", "f1"),
            test_history_len=10, labels=MOVIE_TAGS,
            cluster_item="Description: {description} Tag: {tag}\n", match_fields=("tag", "description"),
        ),
        TaskSpec(
            name="product_rating", lamp_id="LaMP-3", input_field="text", label_field="score",
            question="What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, "
                     "4, or 5 without further explanation. review: {text}",
            question_marker="without further explanation. review: ",
            instruction="What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, "
                        "3, 4, or 5 without further explanation.\nReview: {text} Score:",
            history="Review: {text} Score: {score}",
            retrieval_doc="{text}",
            bank_query="What is the score of the following review on a scale of 1 to 5? review: {text}",
            query_retrieval="{question}", query_instruction="{question} Score:",
            train_gap=SHORT_GAP, query_gap=LONG_GAP,
            parse=parse_rating, metric="rating", metric_names=("mae", "rmse"),
            test_history_len=100, labels=RATING_LABELS,
            cluster_item="Review: {text} Score: {score}\n", match_fields=("text",),
        ),
        TaskSpec(
            name="news_headline", lamp_id="LaMP-4", input_field="text", label_field="title",
            question="Generate a headline for the following article: {text}",
            question_marker="Generate a headline for the following article: ",
            instruction="Generate a headline for the following article.\nArticle: {text} Headline:",
            history="Article: {text} Headline: {title}",
            retrieval_doc="{title} {text}",
            bank_query="Generate a headline for the following article: {text}",
            query_retrieval="{text}", train_gap=LONG_GAP, query_gap=LONG_GAP,
            parse=parse_first_line, metric="generation",
            metric_names=("rouge-1", "rouge-L", "rouge-1_stem", "rouge-L_stem"),
            test_history_len=10,
            cluster_item="Article: {text} Headline: {title}\n", match_fields=("title", "text"),
        ),
        TaskSpec(
            name="scholarly_title", lamp_id="LaMP-5", input_field="abstract", label_field="title",
            question="Generate a title for the following abstract of a paper: {abstract}",
            question_marker="Generate a title for the following abstract of a paper: ",
            instruction="Generate a title for the following abstract of a paper.\nAbstract: {abstract} Title:",
            history="abstract: {abstract} title: {title}",
            retrieval_doc="{abstract}",
            bank_query="Generate a title for the following abstract of a paper: {abstract}",
            query_retrieval="{abstract}", train_gap=LONG_GAP, query_gap=LONG_GAP,
            parse=parse_title, metric="generation",
            metric_names=("rouge-1", "rouge-L", "rouge-1_stem", "rouge-L_stem"),
            test_history_len=50,
            cluster_item="abstract: {abstract} title: {title}\n", match_fields=("title", "abstract"),
        ),
    )
}
ALIASES = {"lamp1": "citation", "lamp2": "movie_tagging", "lamp3": "product_rating",
           "lamp4": "news_headline", "lamp5": "scholarly_title"}


def get_task(name: str | TaskSpec) -> TaskSpec:
    """Task by directory name ('news_headline') or alias ('lamp4', 'LaMP-4')."""
    if isinstance(name, TaskSpec):
        return name
    key = ALIASES.get(name.lower().replace("-", "").replace("_", ""), name)
    if key not in TASKS:
        raise LampDataError(f"unknown LaMP task {name!r}; known: {', '.join(TASKS)} (aliases {', '.join(ALIASES)})")
    return TASKS[key]


def _as_text(fields: dict) -> dict:
    return {k: v if isinstance(v, str) else str(v) for k, v in fields.items()}


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Query:
    id: str
    input: str
    gold: str


@dataclass
class User:
    user_id: str
    history: list[dict]  # LaMP's "profile": the user's past items
    query: list[Query] = field(default_factory=list)


# The project's own data folder (gitignored): `mta reproduce` fills it on first use (mta.run.download).
DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "lamp"


def default_lamp_dir() -> Path:
    """$LAMP_DIR, else the project's own data folder, data/lamp in the repository."""
    env = os.environ.get("LAMP_DIR")
    return Path(env) if env else DATA_DIR


# Size limits, each far above the official LaMP data so that no real user is refused (docs/data.md, "What is checked"):
# a processed file holds a task's train and dev users; the largest, LaMP-3's candidates, has about 4.6 M items
# (Table 3: 202.5 per user, about 22,500 users) at 1 to 2 KB each (LaMP-4's official train questions: 826 MB for
# 391 k items), 5 to 10 GB; the limit is over 3 times that.
MAX_FILE_BYTES = 32 * 2**30
MAX_HISTORY_ITEMS = 10_000  # Table 3's longest history has 1,289 items (LaMP-2): 7.7 times that
# An item's text or a query's input: the longest in the LaMP-4 and LaMP-2 dev data is a 1,392-character article;
# 70 times that, about 25,000 tokens (LaMP-3's reviews and LaMP-1/5's abstracts were not measured).
MAX_TEXT_CHARS = 100_000
# A label, gold or id: the longest headline there has 131 characters; 76 times that also holds an abstract, which
# LaMP-1's stand-in citations are (mta.data.lamp_release).
MAX_LABEL_CHARS = 10_000
MIN_TRAIN_HISTORY = 2  # `training_pairs` takes each item's history from the user's other items
MAX_LISTED_PROBLEMS = 20  # an error lists this many problems, then counts the rest


def load_candidates(lamp_dir: str | os.PathLike, task: str) -> list[User]:
    """Bank candidates of `task`: a profile each, and the user's LaMP query with its gold where the file keeps it
    (`mta.data.lamp_release` does). Every user is checked as in `load_test_users`."""
    spec = get_task(task)
    return _load_users(Path(lamp_dir) / spec.name / CANDIDATES_FILE, spec, with_query=False)


def load_test_users(lamp_dir: str | os.PathLike, task: str) -> list[User]:
    """Test users of `task`, each with a profile and queries with gold labels. The whole file is checked in one
    pass; if anything is wrong, one LampDataError names the file and lists every problem as
    `user <id>: <field>: <what>`, and no user is returned."""
    spec = get_task(task)
    return _load_users(Path(lamp_dir) / spec.name / TEST_FILE, spec, with_query=True)


def _read_rows(path: Path) -> list:
    """The file's JSON list of rows, or LampDataError naming the file: missing, larger than MAX_FILE_BYTES
    (checked before reading), not UTF-8, not JSON, not a list, or empty."""
    if not path.is_file():
        raise LampDataError(f"{path}: file not found (set LAMP_DIR or run tools/download_lamp.py)")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise LampDataError(f"{path}: {size:,} bytes, more than MAX_FILE_BYTES = {MAX_FILE_BYTES:,} "
                            "(mta.data.lamp); not read")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LampDataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise LampDataError(f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise LampDataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(rows, list):
        raise LampDataError(f"{path}: expected a JSON list of users, got {_json_kind(rows)}")
    if not rows:
        raise LampDataError(f"{path}: no users (an empty list)")
    return rows


def _load_users(path: Path, spec: TaskSpec, with_query: bool) -> list[User]:
    rows = _read_rows(path)
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        label = _user_label(row, i)
        problems += [f"user {label}: {f}: {what}" for f, what in user_problems(row, spec, with_query)]
        uid = row.get("user_id") if isinstance(row, dict) else None
        if _id_problem(uid) is None and seen.setdefault(str(uid), i) != i:
            problems.append(f"user {label}: user_id: repeated (users #{seen[str(uid)]} and #{i})")
    if problems:
        raise LampDataError(_report(f"{path}", problems))
    return [_user(row) for row in rows]


def validate_user(row: dict, spec: TaskSpec, with_query: bool, source: str = "<data>") -> User:
    """A User from one JSON row, or one LampDataError naming `source` and listing every problem of the row
    (`user_problems`). `with_query`: the row must hold queries; without it a `query` there is optional but
    checked the same."""
    problems = user_problems(row, spec, with_query)
    if problems:
        label = _user_label(row, None)
        raise LampDataError(_report(source, [f"{'' if label is None else f'user {label}: '}{f}: {what}"
                                             for f, what in problems]))
    return _user(row)


def user_problems(row: object, spec: TaskSpec, with_query: bool) -> list[tuple[str, str]]:
    """Every problem of one user's JSON row, as (field, what is wrong), e.g. ('profile[3].title', 'empty')."""
    if not isinstance(row, dict):
        return [("user", f"not an object ({_json_kind(row)})")]
    problems = []
    if (p := _id_problem(row.get("user_id"))) is not None:
        problems.append(("user_id", p))
    profile = row.get("profile")
    if (p := _list_problem(profile)) is not None:
        problems.append(("profile", p))
    else:
        if len(profile) > MAX_HISTORY_ITEMS:
            problems.append(("profile", f"{len(profile):,} items, more than MAX_HISTORY_ITEMS = "
                                        f"{MAX_HISTORY_ITEMS:,} (mta.data.lamp)"))
        for j, item in enumerate(profile):
            problems += [(f"profile[{j}]{f}", p) for f, p in _item_problems(item, spec)]
    raw = row.get("query")
    if with_query or raw is not None:  # a bank candidate's query is optional (its population example)
        raw = [raw] if isinstance(raw, dict) else raw
        if (p := _list_problem(raw)) is not None:
            problems.append(("query", p))
        else:
            for j, q in enumerate(raw):
                problems += [(f"query[{j}]{f}", p) for f, p in _query_problems(q, spec)]
    return problems


def _item_problems(item: object, spec: TaskSpec) -> list[tuple[str, str]]:
    if not isinstance(item, dict):
        return [("", f"not an object ({_json_kind(item)})")]
    problems = []
    for f in spec.profile_fields:
        p = _number_problem(item.get(f)) if f == spec.label_field and spec.metric == "rating" \
            else _text_problem(item.get(f))
        if p is not None:
            need = " and ".join(map(repr, spec.profile_fields))
            problems.append((f".{f}", f"{p} ({spec.lamp_id} items need {need})" if p == "missing" else p))
    for f, value in item.items():  # every text the prompts or encoders may show
        limit = (MAX_LABEL_CHARS, "MAX_LABEL_CHARS") if f == spec.label_field else (MAX_TEXT_CHARS, "MAX_TEXT_CHARS")
        if (p := _length_problem(value, *limit)) is not None:
            problems.append((f".{f}", p))
    return problems


def _query_problems(q: object, spec: TaskSpec) -> list[tuple[str, str]]:
    if not isinstance(q, dict):
        return [("", f"not an object ({_json_kind(q)})")]
    gold, text = q.get("gold"), q.get("input")
    checks = {
        ".id": _id_problem(q.get("id")),
        ".gold": _number_problem(gold) if isinstance(gold, int | float) and not isinstance(gold, bool)
        else _text_problem(gold, "a string or a number") or _length_problem(gold, MAX_LABEL_CHARS, "MAX_LABEL_CHARS"),
        ".input": _text_problem(text) or _length_problem(text, MAX_TEXT_CHARS, "MAX_TEXT_CHARS"),
    }
    if checks[".input"] is None:
        try:
            spec.query_fields(text)
        except LampDataError as e:
            checks[".input"] = str(e)
    return [(f, p) for f, p in checks.items() if p is not None]


def _text_problem(value: object, kind: str = "a string") -> str | None:
    """What is wrong with a required text field (missing, not a string, blank), or None."""
    if value is None:
        return "missing"
    if not isinstance(value, str):
        return f"not {kind} ({_json_kind(value)})"
    return None if value.strip() else "empty"


def _length_problem(value: object, limit: int, name: str) -> str | None:
    if isinstance(value, str) and len(value) > limit:
        return f"{len(value):,} characters, more than {name} = {limit:,} (mta.data.lamp)"
    return None


def _number_problem(value: object) -> str | None:
    """What is wrong with a numeric label (LaMP-3's score: an integer, a finite number or a numeric string)."""
    if value is None:
        return "missing"
    if isinstance(value, str):
        if not value.strip():
            return "empty"
        try:
            number = float(value)
        except ValueError:
            return f"not a number ({value[:40]!r})"
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = value
    else:
        return f"not a number ({_json_kind(value)})"
    return None if isinstance(number, int) or math.isfinite(number) else \
        f"not a finite number ({value!r})" if isinstance(value, str) else f"not a finite number ({_json_kind(value)})"


def _id_problem(value: object) -> str | None:
    """What is wrong with a user or query id (a non-empty string or an integer), or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    return _text_problem(value, "a string or an integer") or _length_problem(value, MAX_LABEL_CHARS, "MAX_LABEL_CHARS")


def _list_problem(value: object) -> str | None:
    if value is None:
        return "missing"
    if not isinstance(value, list):
        return f"not a list ({_json_kind(value)})"
    return None if value else "empty"


def _json_kind(value: object) -> str:
    """A value's JSON kind for messages: 'a list', 'an object', 'true', 'NaN', 'the number 1.5', ..."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return f"the number {value}" if math.isfinite(value) else json.dumps(value)
    return {list: "a list", dict: "an object", str: "a string"}.get(type(value), type(value).__name__)


def _user_label(row: object, i: int | None) -> str | None:
    """How messages name a row's user: its id where that is valid, else `#i` (None without an index)."""
    uid = row.get("user_id") if isinstance(row, dict) else None
    return str(uid) if _id_problem(uid) is None else (None if i is None else f"#{i}")


def _report(source: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    listed = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(listed)
    return (f"{source}: {len(problems)} problems:\n  " + "\n  ".join(listed)
            + (f"\n  ... and {more} more problems" if more else ""))


def _user(row: dict) -> User:
    queries = row.get("query")
    queries = [queries] if isinstance(queries, dict) else queries or []
    return User(user_id=str(row["user_id"]), history=row["profile"],
                query=[Query(id=str(q["id"]), input=q["input"], gold=str(q["gold"])) for q in queries])


def select_test_users(users: Sequence[dict], task: str, n_test: int = 100, seed: int = 0
                      ) -> tuple[list[dict], list[dict]]:
    """Appendix B split: `n_test` users drawn (seeded) among those with exactly the task's
    history length become test users; every other user becomes a bank candidate. Where fewer
    users are eligible, all of them are test users, and a log line says so (the paper's LaMP-2
    file has 72 users). Returns (candidates, test_users), disjoint, each in input order."""
    spec = get_task(task)
    eligible = [i for i, u in enumerate(users) if len(u["profile"]) == spec.test_history_len]
    if not eligible:
        raise LampDataError(f"{spec.name}: no user has exactly {spec.test_history_len} history items")
    if len(eligible) < n_test:
        log(f"{spec.name}: only {len(eligible)} users have exactly {spec.test_history_len} history items, "
            f"{n_test} test users requested: all {len(eligible)} become test users")
    chosen = set(random.Random(seed).sample(eligible, min(n_test, len(eligible))))
    test = [users[i] for i in sorted(chosen)]
    candidates = [u for i, u in enumerate(users) if i not in chosen]
    return candidates, test


# ----------------------------------------------------------------------------- prompts


PROMPT_STYLES = ("authors_code", "paper")


def format_prompt(history: Sequence[str], instruction: str, gap: str = LONG_GAP) -> str:
    """The paper code's prompt: history block, `gap`, instruction block."""
    return f"{HISTORY_HEADER}{RAG_SEPARATOR.join(history)}{gap}{INSTRUCTION_HEADER}{instruction}"


def render_prompt(spec: TaskSpec, history: Sequence[str], fields: dict, instruction: str, gap: str,
                  style: str) -> str:
    """One prompt in the authors' code format (`instruction` after `gap`), or as Appendix E prints it."""
    if style == "paper":
        return paper_prompts.render(spec.name, history, fields)
    if style != "authors_code":
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}; got {style!r}")
    return format_prompt(history, instruction, gap)


def retrieve_history(spec: TaskSpec, query_text: str, items: Sequence[dict], k: int,
                     retrieve: Retriever = bm25_top_k) -> list[str]:
    """Rendered top-k history items for `query_text` among `items`, BM25 over `retrieval_doc`."""
    docs = [spec.retrieval_doc.format(**_as_text(it)) for it in items]
    return [spec.render_history(items[i]) for i in retrieve(query_text, docs, min(k, len(items)), sep=spec.bm25_sep)]


def bank_history(spec: TaskSpec, fields: dict, items: Sequence[dict], k: int,
                 retrieve: Retriever = bm25_top_k) -> list[str]:
    """Top-k history items of a bank example: BM25 over the items as rendered, queried
    with `bank_query` (prepare_meta_lora.py)."""
    docs = [spec.render_history(it) for it in items]
    return [docs[i] for i in retrieve(spec.bank_query.format(**_as_text(fields)), docs, min(k, len(items)))]


def first_words(item: dict, n: int = BANK_MAX_WORDS) -> dict:
    """`item` with every text field cut to its first `n` whitespace-separated words."""
    return {key: " ".join(v.split()[:n]) if isinstance(v, str) else v for key, v in item.items()}


def cluster_texts(spec: TaskSpec, history: Sequence[dict], style: str) -> list[str]:
    """Stage 1: each history item as the clustering encoder sees it. "authors_code": select_anchor.py:62-68,
    every text field cut to its first 368 words, then `cluster_item` (LaMP-1: the title alone);
    "ours": the item as prompts show it."""
    _check_stage_text(style)
    if style == "ours":
        return [spec.render_history(item) for item in history]
    return [spec.cluster_item.format(**_as_text(first_words(item))) for item in history]


def match_document(spec: TaskSpec, history: Sequence[dict], style: str) -> str:
    """Stage 2: a user's whole history as one text. "authors_code": `extract_user_text` of
    dense_retrieval_matcher.py:56-116, per item its `match_fields` joined by spaces (a field the item lacks
    is empty) and stripped, a lone field as it is, the items joined by spaces; "ours": the items as prompts
    show them, one per line."""
    _check_stage_text(style)
    if style == "ours":
        return "\n".join(spec.render_history(item) for item in history)
    texts = [" ".join(_as_text(item).get(f, "") for f in spec.match_fields) for item in history]
    if len(spec.match_fields) > 1:
        texts = [t.strip() for t in texts]
    return " ".join(texts).strip()


def _check_stage_text(style: str) -> None:
    if style not in STAGE_TEXTS:
        raise ValueError(f"stage text must be one of {STAGE_TEXTS}; got {style!r}")


def citation_options(item: dict, others: Sequence[dict], retrieve: Retriever, rng: random.Random
                     ) -> tuple[dict, str] | None:
    """(option1/option2 fields, target) of a LaMP-1 training example: the item's citation against
    a hard negative, the citation of the BM25-closest other item by title, in a random order.
    None when every other item has the same citation."""
    target = item["citation"]
    negatives = [p for p in others if p["citation"] != target]
    if not negatives:
        return None
    neg = negatives[retrieve(item["title"], [p["title"] for p in negatives], 1, sep=None)[0]]["citation"]
    if rng.random() >= 0.5:
        return {"option1": neg, "option2": target}, "[2]"
    return {"option1": target, "option2": neg}, "[1]"


def training_pairs(spec: TaskSpec | str, history: Sequence[dict], retrieve: Retriever = bm25_top_k,
                   k: int = 1, seed: int = 0, bank: bool = False, style: str = "authors_code",
                   earlier_only: bool = False, items: slice = slice(None)) -> list[tuple[str, str]]:
    """(prompt, target) per profile item: the item's instruction, with history taken
    leave-one-out from the user's other items, and the item's label as target.

    bank=False: the adaptation data of data/<task>/create_training_data.py (LaMP-1 takes the
    first other item as history, the others BM25 over `retrieval_doc`). bank=True: the
    meta-LoRA bank data of prepare_meta_lora.py (see `bank_history`), on fields cut as
    select_anchor.py stores them. LaMP-1 items are (paper title, a cited title) and become
    a choice between two citations (`citation_options`, seeded); items without a usable
    negative are skipped, so LaMP-1 may return fewer pairs than items.
    earlier_only: item i's history comes from items 0..i-1 only, and the first item has the
    instruction alone (OPPU.py:224-245). items: which items become examples (all by default).
    k = 0: every item's instruction alone (Per-Pcs's plain examples).
    """
    spec = get_task(spec)
    if len(history) < MIN_TRAIN_HISTORY:
        raise LampDataError(f"{spec.name}: leave-one-out training needs at least {MIN_TRAIN_HISTORY} profile items, "
                            f"got {len(history)}")
    if bank:
        history = [first_words(item) for item in history]
    chosen = set(range(len(history))[items])
    rng = random.Random(seed)
    pairs = []
    for i, item in enumerate(history):
        if i not in chosen:
            continue
        others = [p for j, p in enumerate(history) if j != i]
        visible = history[:i] if earlier_only else others
        fields = {spec.input_field: str(item[spec.input_field])}
        target = str(item[spec.label_field])
        if spec.name == "citation":
            choice = citation_options(item, others, retrieve, rng)
            if choice is None:
                continue
            fields.update(choice[0])
            target = choice[1]
        if not visible or k == 0:
            instruction = paper_prompts.instruction(spec.name, fields) if style == "paper" \
                else spec.render_instruction(fields)
            pairs.append((instruction, target))
            continue
        if bank:
            shown, gap = bank_history(spec, fields, visible, k, retrieve), LONG_GAP
        elif spec.name == "citation":
            shown, gap = [spec.render_history(p) for p in visible[:k]], spec.train_gap
        else:
            shown, gap = retrieve_history(spec, fields[spec.input_field], visible, k, retrieve), spec.train_gap
        pairs.append((render_prompt(spec, shown, fields, spec.render_instruction(fields), gap, style), target))
    return pairs


def _query_fields(spec: TaskSpec, query: Query | str) -> dict:
    """A test query's fields: its LaMP question (right-stripped) and what `query_fields` recovers."""
    question = query.input if isinstance(query, Query) else query
    return {"question": question.rstrip(), **spec.query_fields(question)}


def query_prompt(spec: TaskSpec | str, history: Sequence[dict], query: Query | str,
                 retrieve: Retriever = bm25_top_k, k: int = 1, style: str = "authors_code") -> str:
    """Prompt for a test query (data/<task>/create_eval_data.py): its instruction with the top-k
    BM25 items of the user's history. k=1 is the format of every trained method; k=1,3,5 are the RAG baseline."""
    spec = get_task(spec)
    fields = _query_fields(spec, query)
    items = retrieve_history(spec, spec.query_retrieval.format(**fields), history, k, retrieve)
    return render_prompt(spec, items, fields, spec.render_query_instruction(fields), spec.query_gap, style)


def instruction_only(spec: TaskSpec | str, query: Query | str, style: str = "authors_code") -> str:
    """The query's instruction without history (the no-personalization baseline)."""
    spec = get_task(spec)
    fields = _query_fields(spec, query)
    return paper_prompts.instruction(spec.name, fields) if style == "paper" else spec.render_query_instruction(fields)
