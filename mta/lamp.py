"""LaMP tasks as the MTA paper's code uses them: data layout, prompts, output parsers.

Layout (the processed one the paper's scripts read, see tools/download_lamp.py):
    <lamp_dir>/<task>/user_anchor_candidate.json   bank candidates: [{user_id, profile}]
    <lamp_dir>/<task>/test_100/test_100.json       test users: [{user_id, profile, query}]

Every prompt, for training and for the query alike, is
    ### User History:\n{retrieved history item(s)}\n\n\n### User Instruction:\n{instruction}
where the history is chosen by BM25 (the user's *other* items for a training example,
the user's whole profile for the query) and the instruction is the task template filled
with the item's input. Retrieval is a plain callable, `mta.bm25.top_k` by default.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from mta.bm25 import top_k as bm25_top_k

# retrieve(query, docs, k) -> indices of the k best docs, best first (default: mta.bm25.top_k).
Retriever = Callable[[str, Sequence[str], int], list[int]]

MOVIE_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
)
CITATION_LABELS = ("[1]", "[2]")
RATING_LABELS = ("1", "2", "3", "4", "5")

HISTORY_HEADER = "### User History:\n"
INSTRUCTION_HEADER = "### User Instruction:\n"
RAG_SEPARATOR = "\n\n"  # between retrieved items when k > 1 (the authors' bank-data script)

CANDIDATES_FILE = "user_anchor_candidate.json"
TEST_FILE = os.path.join("test_100", "test_100.json")


class LampDataError(ValueError):
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


def parse_first_line(output: str) -> str:
    """First non-empty line, stripped ('' if there is none)."""
    for line in output.splitlines():
        if line.strip():
            return line.strip()
    return ""


# ----------------------------------------------------------------------------- task specs


@dataclass(frozen=True)
class TaskSpec:
    """Everything task-specific, in one place.

    input_field/label_field: the profile item's fields (the label is the training target).
    question: the official LaMP question wording (what test_100.json `input` holds);
        `question_marker` is the text right before the item's input in it.
    instruction: the authors' instruction template, filled with the item's fields.
    history: how one history item is rendered inside "### User History".
    retrieval_doc: what BM25 indexes for a history item (the authors' code, per task).
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
    parse: Callable[[str], str | None]
    metric: str  # "classification" | "rating" | "generation"
    metric_names: tuple[str, ...]
    test_history_len: int  # Appendix B: test users have exactly this many history items
    labels: tuple[str, ...] | None = None

    @property
    def profile_fields(self) -> tuple[str, str]:
        return (self.input_field, self.label_field)

    def render_history(self, item: dict) -> str:
        return self.history.format(**_as_text(item))

    def render_instruction(self, fields: dict) -> str:
        return self.instruction.format(**_as_text(fields))

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
            parse=parse_citation, metric="classification", metric_names=("accuracy", "f1"),
            test_history_len=50, labels=CITATION_LABELS,
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
            parse=parse_movie_tag, metric="classification", metric_names=("accuracy", "f1"),
            test_history_len=10, labels=MOVIE_TAGS,
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
            parse=parse_rating, metric="rating", metric_names=("mae", "rmse"),
            test_history_len=100, labels=RATING_LABELS,
        ),
        TaskSpec(
            name="news_headline", lamp_id="LaMP-4", input_field="text", label_field="title",
            question="Generate a headline for the following article: {text}",
            question_marker="Generate a headline for the following article: ",
            instruction="Generate a headline for the following article.\nArticle: {text} Headline:",
            history="Article: {text} Headline: {title}",
            retrieval_doc="{title} {text}",
            parse=parse_first_line, metric="generation",
            metric_names=("rouge-1", "rouge-L", "rouge-1_stem", "rouge-L_stem"),
            test_history_len=10,
        ),
        TaskSpec(
            name="scholarly_title", lamp_id="LaMP-5", input_field="abstract", label_field="title",
            question="Generate a title for the following abstract of a paper: {abstract}",
            question_marker="Generate a title for the following abstract of a paper: ",
            instruction="Generate a title for the following abstract of a paper.\nAbstract: {abstract} Title:",
            history="abstract: {abstract} title: {title}",
            retrieval_doc="{abstract}",
            parse=parse_first_line, metric="generation",
            metric_names=("rouge-1", "rouge-L", "rouge-1_stem", "rouge-L_stem"),
            test_history_len=50,
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
    profile: list[dict]
    query: list[Query] = field(default_factory=list)


def default_lamp_dir() -> Path:
    """$LAMP_DIR, else ../shared/lamp next to the repository."""
    env = os.environ.get("LAMP_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "lamp"


def load_candidates(lamp_dir: str | os.PathLike, task: str, errors: dict[str, str] | None = None) -> list[User]:
    """Bank candidates of `task` (profile only). See `load_test_users` for `errors`."""
    spec = get_task(task)
    return _load_users(Path(lamp_dir) / spec.name / CANDIDATES_FILE, spec, with_query=False, errors=errors)


def load_test_users(lamp_dir: str | os.PathLike, task: str, errors: dict[str, str] | None = None) -> list[User]:
    """Test users of `task`, each with a profile and queries with gold labels.

    By default a bad user fails the whole file; with an `errors` dict, bad users are skipped and
    recorded there as user id -> message, so a run can go on for the others."""
    spec = get_task(task)
    return _load_users(Path(lamp_dir) / spec.name / TEST_FILE, spec, with_query=True, errors=errors)


def _load_users(path: Path, spec: TaskSpec, with_query: bool, errors: dict[str, str] | None = None) -> list[User]:
    if not path.is_file():
        raise LampDataError(f"{path}: file not found (set LAMP_DIR or run tools/download_lamp.py)")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LampDataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(rows, list):
        raise LampDataError(f"{path}: expected a JSON list of users")
    users = []
    for i, row in enumerate(rows):
        try:
            users.append(validate_user(row, spec, with_query, source=f"{path}: user #{i}"))
        except LampDataError as e:
            if errors is None:
                raise
            uid = row.get("user_id") if isinstance(row, dict) else None
            errors[str(uid if uid not in (None, "") else f"#{i}")] = str(e)
    return users


def validate_user(row: dict, spec: TaskSpec, with_query: bool, source: str = "<data>") -> User:
    """A User from one JSON row, or LampDataError naming `source`, the user id and the field."""
    if not isinstance(row, dict) or row.get("user_id") in (None, ""):
        raise LampDataError(f"{source}: missing field 'user_id'")
    where = f"{source}: user {row['user_id']!s}"
    profile = row.get("profile")
    if not isinstance(profile, list) or not profile:
        raise LampDataError(f"{where}: missing or empty field 'profile'")
    for j, item in enumerate(profile):
        for f in spec.profile_fields:
            if not isinstance(item, dict) or item.get(f) in (None, ""):
                raise LampDataError(f"{where}: profile[{j}] missing field {f!r} ({spec.lamp_id} items need "
                                    f"{' and '.join(map(repr, spec.profile_fields))})")
    queries = []
    if with_query:
        raw = row.get("query")
        if isinstance(raw, dict):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise LampDataError(f"{where}: missing or empty field 'query'")
        for j, q in enumerate(raw):
            for f in ("id", "input", "gold"):
                if not isinstance(q, dict) or q.get(f) in (None, ""):
                    raise LampDataError(f"{where}: query[{j}] missing field {f!r}")
            try:
                spec.query_fields(q["input"])
            except ValueError as e:
                raise LampDataError(f"{where}: query[{j}] field 'input': {e}") from e
            queries.append(Query(id=str(q["id"]), input=q["input"], gold=str(q["gold"])))
    return User(user_id=str(row["user_id"]), profile=profile, query=queries)


def select_test_users(users: Sequence[dict], task: str, n_test: int = 100, seed: int = 0
                      ) -> tuple[list[dict], list[dict]]:
    """Appendix B split: `n_test` users drawn (seeded) among those with exactly the task's
    history length become test users; every other user becomes a bank candidate.
    Returns (candidates, test_users), disjoint, each in input order."""
    spec = get_task(task)
    eligible = [i for i, u in enumerate(users) if len(u["profile"]) == spec.test_history_len]
    if len(eligible) < n_test:
        raise LampDataError(f"{spec.name}: only {len(eligible)} users have exactly {spec.test_history_len} "
                            f"history items, {n_test} test users requested")
    chosen = set(random.Random(seed).sample(eligible, n_test))
    test = [users[i] for i in sorted(chosen)]
    candidates = [u for i, u in enumerate(users) if i not in chosen]
    return candidates, test


# ----------------------------------------------------------------------------- prompts


def format_prompt(history: Sequence[str], instruction: str) -> str:
    """The paper code's prompt: history block, blank lines, instruction block."""
    return f"{HISTORY_HEADER}{RAG_SEPARATOR.join(history)}\n\n\n{INSTRUCTION_HEADER}{instruction}"


def retrieve_history(spec: TaskSpec, query_text: str, items: Sequence[dict], k: int,
                     retrieve: Retriever = bm25_top_k) -> list[str]:
    """Rendered top-k history items for `query_text` among `items`."""
    docs = [spec.retrieval_doc.format(**_as_text(it)) for it in items]
    return [spec.render_history(items[i]) for i in retrieve(query_text, docs, min(k, len(items)))]


def training_pairs(spec: TaskSpec | str, profile: Sequence[dict], retrieve: Retriever = bm25_top_k,
                   k: int = 1, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, target) per profile item: the item's instruction, with history retrieved
    leave-one-out from the user's other items, and the item's label as target.

    LaMP-1 items are (paper title, a cited title): the example asks to pick the item's
    citation against a hard negative, the BM25-closest other item's citation by title,
    in a seeded random order (as the authors' citation script does). Items without a
    usable negative are skipped, so LaMP-1 may return fewer pairs than items.
    """
    spec = get_task(spec)
    if len(profile) < 2:
        raise LampDataError(f"{spec.name}: leave-one-out training needs at least 2 profile items, got {len(profile)}")
    rng = random.Random(seed)
    pairs = []
    for i, item in enumerate(profile):
        others = [p for j, p in enumerate(profile) if j != i]
        query_text = str(item[spec.input_field])
        fields = {spec.input_field: query_text}
        target = str(item[spec.label_field])
        if spec.name == "citation":
            negatives = [p for p in others if p["citation"] != item["citation"]]
            if not negatives:
                continue
            neg = negatives[retrieve(query_text, [p["title"] for p in negatives], 1)[0]]["citation"]
            swap = rng.random() >= 0.5
            fields.update(option1=neg if swap else target, option2=target if swap else neg)
            target = "[2]" if swap else "[1]"
        history = retrieve_history(spec, query_text, others, k, retrieve)
        pairs.append((format_prompt(history, spec.render_instruction(fields)), target))
    return pairs


def query_prompt(spec: TaskSpec | str, profile: Sequence[dict], query: Query | str,
                 retrieve: Retriever = bm25_top_k, k: int = 1) -> str:
    """Prompt for a test query: its instruction with the top-k BM25 items of the profile.
    k=1 is the training format (MTA, OPPU, adapt-only...); k=1,3,5 are the RAG baseline."""
    spec = get_task(spec)
    fields = spec.query_fields(query.input if isinstance(query, Query) else query)
    history = retrieve_history(spec, fields[spec.input_field], profile, k, retrieve)
    return format_prompt(history, spec.render_instruction(fields))


def instruction_only(spec: TaskSpec | str, query: Query | str) -> str:
    """The query's instruction without history (the no-personalization baseline)."""
    spec = get_task(spec)
    return spec.render_instruction(spec.query_fields(query.input if isinstance(query, Query) else query))
