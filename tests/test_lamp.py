import json
import os
from pathlib import Path

import pytest

from mta.data import lamp
from mta.data.lamp import LampDataError, Query

TAGS = ("[sci-fi, based on a book, comedy, action, twist ending, dystopia, dark comedy, classic, psychology, "
        "fantasy, romance, thought-provoking, social commentary, violence, true story]")

# Four items per user, so that a leave-one-out corpus has three documents and a word
# found in exactly one of them gets a positive BM25 idf.
PROFILES = {
    "news_headline": [
        {"id": "n0", "text": "Cats purr when they are happy.", "title": "Why Cats Purr"},
        {"id": "n1", "text": "Bank stocks fell sharply on Monday.", "title": "Markets Slide"},
        {"id": "n2", "text": "The rain flooded the valley.", "title": "Valley Floods"},
        {"id": "n3", "text": "New stocks listed in Tokyo.", "title": "Tokyo Listings"},
    ],
    "scholarly_title": [
        {"id": "s0", "abstract": "We study graph neural networks.", "title": "Graph Networks"},
        {"id": "s1", "abstract": "A survey of Protein folding.", "title": "Folding Survey"},
        {"id": "s2", "abstract": "Faster sorting on GPUs.", "title": "GPU Sorting"},
        {"id": "s3", "abstract": "Protein design with diffusion.", "title": "Designing Proteins"},
    ],
    "product_rating": [
        {"id": "p0", "text": "Terrible battery and slow charging.", "score": "1"},
        {"id": "p1", "text": "Lovely soft blanket.", "score": "5"},
        {"id": "p2", "text": "Okay kettle, a bit loud.", "score": "3"},
        {"id": "p3", "text": "The battery lasts for days.", "score": 4},
    ],
    "movie_tagging": [
        {"id": "m0", "description": "A robot explores Mars.", "tag": "sci-fi"},
        {"id": "m1", "description": "Two friends open a bakery.", "tag": "comedy"},
        {"id": "m2", "description": "A detective hunts a killer.", "tag": "violence"},
        {"id": "m3", "description": "Astronauts stranded on Mars.", "tag": "sci-fi"},
    ],
    "citation": [
        {"id": "c0", "title": "Deep residual learning", "citation": "Gradient flow in deep nets"},
        {"id": "c1", "title": "Attention for translation", "citation": "Sequence to sequence learning"},
        {"id": "c2", "title": "Bayesian optimisation tricks", "citation": "Gaussian processes for ML"},
        {"id": "c3", "title": "Deep attention networks", "citation": "Squeeze and excitation"},
    ],
}

QUERIES = {
    "news_headline": "Generate a headline for the following article: Heavy rain expected tomorrow.",
    "scholarly_title": "Generate a title for the following abstract of a paper: Revisiting sorting networks.",
    "product_rating": "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, "
                      "or 5 without further explanation. review: My kettle, sadly, broke.",
    "movie_tagging": "Which tag does this movie relate to among the following tags? Just answer with the tag name "
                     f"without further explanation. tags: {TAGS} description: A detective and a baker team up.",
    "citation": 'For an author who has written the paper with the title "Bayesian neural inference", which reference '
                'is related? Just answer with [1] or [2] without explanation. [1]: "Dropout as inference" '
                '[2]: "Image segmentation"',
}

# Test prompts as data/<task>/create_eval_data.py builds them: LaMP-2/3 keep the official question
# (and LaMP-2 queries BM25 with all of it), LaMP-1/2 put two newlines before the instruction.
EXPECTED_QUERY_PROMPTS = {
    "news_headline": "### User History:\nArticle: The rain flooded the valley. Headline: Valley Floods\n\n\n"
                     "### User Instruction:\nGenerate a headline for the following article.\n"
                     "Article: Heavy rain expected tomorrow. Headline:",
    "scholarly_title": "### User History:\nabstract: Faster sorting on GPUs. title: GPU Sorting\n\n\n"
                       "### User Instruction:\nGenerate a title for the following abstract of a paper.\n"
                       "Abstract: Revisiting sorting networks. Title:",
    "product_rating": "### User History:\nReview: Okay kettle, a bit loud. Score: 3\n\n\n### User Instruction:\n"
                      + QUERIES["product_rating"] + " Score:",
    "movie_tagging": "### User History:\nDescription: Astronauts stranded on Mars. Tag: sci-fi\n\n"
                     "### User Instruction:\n" + QUERIES["movie_tagging"] + " Tag:",
    "citation": "### User History:\nPaper Title: Bayesian optimisation tricks Citation: Gaussian processes for ML"
                "\n\n### User Instruction:\nFor an author who has written the paper with the title \"Bayesian "
                "neural inference\", which reference is related? Just answer with [1] or [2] without explanation.\n"
                "Reference: [1] - Dropout as inference [2] - Image segmentation\nAnswer:",
}

# (prompt, target) of the last profile item as data/<task>/create_training_data.py builds it:
# BM25 leave-one-out finds item 0 or 1; LaMP-1 takes the first other item; LaMP-1/2/3 use two newlines.
EXPECTED_LAST_PAIR = {
    "news_headline": ("### User History:\nArticle: Bank stocks fell sharply on Monday. Headline: Markets Slide\n\n\n"
                      "### User Instruction:\nGenerate a headline for the following article.\n"
                      "Article: New stocks listed in Tokyo. Headline:", "Tokyo Listings"),
    "scholarly_title": ("### User History:\nabstract: A survey of Protein folding. title: Folding Survey\n\n\n"
                        "### User Instruction:\nGenerate a title for the following abstract of a paper.\n"
                        "Abstract: Protein design with diffusion. Title:", "Designing Proteins"),
    "product_rating": ("### User History:\nReview: Terrible battery and slow charging. Score: 1\n\n"
                       "### User Instruction:\nWhat is the score of the following review on a scale of 1 to 5? "
                       "just answer with 1, 2, 3, 4, or 5 without further explanation.\n"
                       "Review: The battery lasts for days. Score:", "4"),
    "movie_tagging": ("### User History:\nDescription: A robot explores Mars. Tag: sci-fi\n\n"
                      "### User Instruction:\nWhich tag does this movie relate to among the following tags? Just "
                      f"answer with the tag name without further explanation. tags: {TAGS}\n"
                      "Description: Astronauts stranded on Mars. Tag:", "sci-fi"),
    # hard negative = citation of the BM25-closest other title ("Deep ..."), order from Random(0)
    "citation": ("### User History:\nPaper Title: Deep residual learning Citation: Gradient flow in deep nets\n\n"
                 "### User Instruction:\nFor an author who has written the paper with the title \"Deep attention "
                 "networks\", which reference is related? Just answer with [1] or [2] without explanation.\n"
                 "Reference: [1] - Squeeze and excitation [2] - Gradient flow in deep nets\nAnswer:", "[1]"),
}


# ----------------------------------------------------------------------------- tasks


def test_registry_and_aliases():
    assert list(lamp.TASKS) == ["citation", "movie_tagging", "product_rating", "news_headline", "scholarly_title"]
    for i, name in enumerate(lamp.TASKS, start=1):
        assert lamp.get_task(f"lamp{i}").name == name
        assert lamp.get_task(f"LaMP-{i}").name == name
        assert lamp.get_task(name).lamp_id == f"LaMP-{i}"
    assert len(lamp.MOVIE_TAGS) == 15 and lamp.get_task("lamp2").labels == lamp.MOVIE_TAGS
    assert [lamp.get_task(f"lamp{i}").test_history_len for i in range(1, 6)] == [50, 10, 100, 10, 50]
    with pytest.raises(LampDataError, match="unknown LaMP task 'lamp9'"):
        lamp.get_task("lamp9")


@pytest.mark.parametrize("text,expected", [
    ("[1]", "[1]"), ("Answer: [2]", "[2]"), ("I pick [ 1 ] because", "[1]"), ("2", "[2]"), (" 1.", "[1]"),
    ("12", None), ("1.5", None), ("neither", None), ("", None),
])
def test_parse_citation(text, expected):
    assert lamp.parse_citation(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("comedy", "comedy"), ("Dark Comedy.", "dark comedy"), ("Tag: sci-fi, or maybe action", "sci-fi"),
    ("action and sci-fi", "action"), ("romantic comedy", "comedy"), ("Thought-provoking", "thought-provoking"),
    ("based on a book", "based on a book"), ("horror", None), ("", None), ("comedic", None),
])
def test_parse_movie_tag(text, expected):
    assert lamp.parse_movie_tag(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("4", "4"), ("Score: 5", "5"), ("3/5 stars", "3"), (" 1\n", "1"), ("4.5", None), ("10", None),
    ("0", None), ("six", None), ("", None),
])
def test_parse_rating(text, expected):
    assert lamp.parse_rating(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("A Title", "A Title"), ("\n\n  A Title  \nmore text", "A Title"), ("", ""), ("  \n \n", ""),
])
def test_parse_first_line(text, expected):
    assert lamp.parse_first_line(text) == expected
    assert lamp.get_task("lamp4").parse(text) == lamp.get_task("lamp5").parse(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("A Title. It studies x", "A Title"), ("\n A Title\nsecond. line", "A Title"),
    ("Deep Nets vs. Trees", "Deep Nets vs"), (". x", ""), ("", ""),
])
def test_parse_title_cuts_at_first_period(text, expected):
    # evaluate_scholarly_title.py: raw.split('\n')[0].split('.')[0].strip(); LaMP-4 keeps the whole line
    assert lamp.get_task("lamp5").parse(text) == expected


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("task", list(PROFILES))
def test_query_prompt_matches_exactly(task):
    assert lamp.query_prompt(task, PROFILES[task], Query("q", QUERIES[task], "g")) == EXPECTED_QUERY_PROMPTS[task]


@pytest.mark.parametrize("task", list(PROFILES))
def test_training_pairs_match_exactly(task):
    pairs = lamp.training_pairs(task, PROFILES[task], seed=0)
    assert len(pairs) == 4
    assert pairs[-1] == EXPECTED_LAST_PAIR[task]
    spec = lamp.get_task(task)
    if task != "citation":
        assert [t for _, t in pairs] == [str(it[spec.label_field]) for it in PROFILES[task]]
    gap = {"news_headline": "\n\n\n", "scholarly_title": "\n\n\n"}.get(task, "\n\n")
    for p, _ in pairs:
        history = p.split("### User Instruction:\n")[0]
        assert history.startswith("### User History:\n") and history.endswith(gap) and history[-len(gap) - 1] != "\n"
    assert pairs == lamp.training_pairs(task, PROFILES[task], seed=0)


def test_citation_adaptation_history_is_the_first_other_item():
    # data/citation/create_training_data.py: history_candidates[:1], no retrieval
    profile = PROFILES["citation"]
    for i, (prompt, _) in enumerate(lamp.training_pairs("citation", profile)):
        first = profile[1] if i == 0 else profile[0]
        history = f"Paper Title: {first['title']} Citation: {first['citation']}"
        assert prompt.startswith(f"### User History:\n{history}\n\n###")


EXPECTED_BANK_LAST_PAIR = {
    # the query "Generate a headline for the following article: New stocks ..." shares "the" only with item 2
    "news_headline": ("### User History:\nArticle: The rain flooded the valley. Headline: Valley Floods\n\n\n"
                      "### User Instruction:\nGenerate a headline for the following article.\n"
                      "Article: New stocks listed in Tokyo. Headline:", "Tokyo Listings"),
    "movie_tagging": ("### User History:\nDescription: A robot explores Mars. Tag: sci-fi\n\n\n"
                      "### User Instruction:\nWhich tag does this movie relate to among the following tags? Just "
                      f"answer with the tag name without further explanation. tags: {TAGS}\n"
                      "Description: Astronauts stranded on Mars. Tag:", "sci-fi"),
}


@pytest.mark.parametrize("task", list(EXPECTED_BANK_LAST_PAIR))
def test_bank_pairs_match_exactly(task):
    pairs = lamp.training_pairs(task, PROFILES[task], bank=True)
    assert pairs[-1] == EXPECTED_BANK_LAST_PAIR[task]
    assert all("\n\n\n### User Instruction:\n" in p for p, _ in pairs)


def test_bank_pairs_retrieve_rendered_items_with_the_bank_query():
    seen = []

    def spy(query, docs, k, sep=" "):
        seen.append((query, list(docs)))
        return [len(docs) - 1]

    profile = PROFILES["citation"]
    pairs = lamp.training_pairs("citation", profile, retrieve=spy, bank=True)
    # per item: the hard-negative lookup by title, then the history lookup over rendered items
    history_calls = seen[1::2]
    for i, (query, docs) in enumerate(history_calls):
        assert query == (f'For an author who has written the paper with the title "{profile[i]["title"]}", which '
                         'reference is related? Just answer with [1] or [2] without explanation.')
        assert docs == [f"Paper Title: {p['title']} Citation: {p['citation']}" for j, p in enumerate(profile) if j != i]
    assert pairs[0][0].startswith(f"### User History:\n{history_calls[0][1][-1]}\n\n\n###")


def test_bank_fields_are_cut_to_368_words():
    long = " ".join(f"w{i}" for i in range(400))
    profile = [{"text": long, "title": "a"}, {"text": "short  text", "title": "b"}]
    (p0, _), (p1, _) = lamp.training_pairs("news_headline", profile, bank=True)
    cut = " ".join(f"w{i}" for i in range(368))
    assert f"Article: {cut} Headline:" in p0 and "w368" not in p0 + p1
    assert f"### User History:\nArticle: {cut} Headline: a" in p1
    assert "Article: short text Headline:" in p0
    assert profile[0]["text"] == long  # the caller's items are not changed


def test_query_retrieval_text_per_task():
    seen = {}

    def spy(query, docs, k, sep=" "):
        seen[task] = (query, list(docs))
        return [0]

    for task in PROFILES:
        lamp.query_prompt(task, PROFILES[task], QUERIES[task], retrieve=spy)
    assert seen["movie_tagging"][0] == QUERIES["movie_tagging"]  # the whole question
    assert seen["product_rating"][0] == QUERIES["product_rating"]
    assert seen["news_headline"][0] == "Heavy rain expected tomorrow."
    assert seen["scholarly_title"][0] == "Revisiting sorting networks."
    assert seen["citation"] == ("Bayesian neural inference", [p["title"] for p in PROFILES["citation"]])


def test_citation_targets_follow_option_order():
    for seed in range(5):
        for (prompt, target), item in zip(lamp.training_pairs("citation", PROFILES["citation"], seed=seed),
                                          PROFILES["citation"], strict=True):
            options = prompt.rsplit("Reference: ", 1)[1]
            first = options.split(" [2] - ")[0].removeprefix("[1] - ")
            assert (target == "[1]") == (first == item["citation"])


def test_training_pairs_retrieve_leave_one_out():
    seen = []

    def spy(query, docs, k, sep=" "):
        seen.append((query, list(docs), k))
        return [0]

    profile = PROFILES["news_headline"]
    lamp.training_pairs("news_headline", profile, retrieve=spy)
    for i, (query, docs, k) in enumerate(seen):
        assert query == profile[i]["text"] and k == 1
        assert docs == [f"{p['title']} {p['text']}" for j, p in enumerate(profile) if j != i]
    with pytest.raises(LampDataError, match="at least 2"):
        lamp.training_pairs("news_headline", profile[:1])


def test_rag_prompt_top_k():
    profile = PROFILES["movie_tagging"]
    prompt = lamp.query_prompt("lamp2", profile, QUERIES["movie_tagging"], k=3)
    history = prompt.split("### User History:\n")[1].split("\n\n### User Instruction:\n")[0]
    items = history.split("\n\n")
    assert len(items) == 3 and items[0] == "Description: Astronauts stranded on Mars. Tag: sci-fi"
    assert lamp.query_prompt("lamp2", profile, QUERIES["movie_tagging"], k=10).count("Description:") == 4


def test_instruction_only_and_question_round_trip():
    for task, question in QUERIES.items():
        spec = lamp.get_task(task)
        fields = spec.query_fields(question)
        assert spec.question.format(**fields) == question
        assert lamp.instruction_only(task, question) == EXPECTED_QUERY_PROMPTS[task].split("### User Instruction:\n")[1]
    with pytest.raises(LampDataError, match="not a LaMP-4 question"):
        lamp.get_task("lamp4").query_fields("Summarise this: x")


# ----------------------------------------------------------------------------- Appendix B


def _users(lengths):
    return [{"user_id": f"u{i}", "profile": [{"text": "t", "title": "h"}] * n} for i, n in enumerate(lengths)]


def test_select_test_users_only_right_history_length_seeded_disjoint():
    users = _users([10, 3, 10, 11, 10, 9, 10, 10, 50])
    cands, test = lamp.select_test_users(users, "lamp4", n_test=3, seed=7)
    assert all(len(u["profile"]) == 10 for u in test) and len(test) == 3
    assert {u["user_id"] for u in cands} | {u["user_id"] for u in test} == {u["user_id"] for u in users}
    assert not {u["user_id"] for u in cands} & {u["user_id"] for u in test}
    assert (cands, test) == lamp.select_test_users(users, "lamp4", n_test=3, seed=7)
    picks = {tuple(u["user_id"] for u in lamp.select_test_users(users, "lamp4", 3, seed=s)[1]) for s in range(10)}
    assert len(picks) > 1
    _, test5 = lamp.select_test_users(users, "lamp5", n_test=1, seed=0)
    assert [u["user_id"] for u in test5] == ["u8"]
    with pytest.raises(LampDataError, match="no user has exactly 100"):
        lamp.select_test_users(users, "lamp3", n_test=6)


def test_select_test_users_takes_every_eligible_user_when_fewer_than_asked(capsys):
    """The paper's LaMP-2 file holds 72 users: fewer eligible users than asked make all of them test users,
    and the log says so."""
    users = _users([10, 3, 10, 11, 10, 9, 10, 10, 50])
    cands, test = lamp.select_test_users(users, "lamp4", n_test=6)
    assert [u["user_id"] for u in test] == ["u0", "u2", "u4", "u6", "u7"]
    assert [u["user_id"] for u in cands] == ["u1", "u3", "u5", "u8"]
    assert "only 5 users have exactly 10 history items, 6 test users requested" in capsys.readouterr().out


# ----------------------------------------------------------------------------- loading + errors


def _write_layout(root: Path, task: str, candidates, test):
    (root / task / "test_100").mkdir(parents=True)
    (root / task / "user_anchor_candidate.json").write_text(json.dumps(candidates))
    (root / task / "test_100" / "test_100.json").write_text(json.dumps(test))


def test_load_fixture_layout(tmp_path):
    prof = PROFILES["product_rating"]
    _write_layout(tmp_path, "product_rating", [{"user_id": 7, "profile": prof}],
                  [{"user_id": "t1", "profile": prof,
                    "query": [{"id": "q1", "input": QUERIES["product_rating"], "gold": 4}]}])
    cands = lamp.load_candidates(tmp_path, "lamp3")
    test = lamp.load_test_users(tmp_path, "product_rating")
    assert cands[0].user_id == "7" and cands[0].query == [] and cands[0].history == prof
    assert test[0].query == [Query(id="q1", input=QUERIES["product_rating"], gold="4")]


Q = [{"id": "q", "input": QUERIES["news_headline"], "gold": "y"}]


@pytest.mark.parametrize("test_user,match", [
    ({"user_id": "bob", "query": Q}, "user bob: profile: missing"),
    ({"user_id": "bob", "profile": [], "query": Q}, "user bob: profile: empty"),
    ({"user_id": "bob", "profile": PROFILES["news_headline"], "query": [{"id": "q", "input": Q[0]["input"]}]},
     "user bob: query\\[0\\].gold: missing"),
    ({"user_id": "bob", "profile": PROFILES["news_headline"]}, "user bob: query: missing"),
    ({"user_id": "bob", "profile": [{"id": "1", "text": "t"}], "query": Q},
     "user bob: profile\\[0\\].title: missing \\(LaMP-4 items need 'text' and 'title'\\)"),
    ({"profile": PROFILES["news_headline"], "query": Q}, "user #0: user_id: missing"),
    ({"user_id": "bob", "profile": PROFILES["news_headline"], "query": [{"id": "q", "input": "Title this: x",
                                                                          "gold": "y"}]},
     "user bob: query\\[0\\].input: not a LaMP-4 question"),
])
def test_bad_input_names_file_user_and_field(tmp_path, test_user, match):
    _write_layout(tmp_path, "news_headline", [], [test_user])
    with pytest.raises(LampDataError, match=match) as err:
        lamp.load_test_users(tmp_path, "news_headline")
    assert "test_100.json" in str(err.value)


def test_missing_file_and_wrong_task_fields(tmp_path):
    with pytest.raises(LampDataError, match=r"user_anchor_candidate\.json: file not found"):
        lamp.load_candidates(tmp_path, "lamp4")
    _write_layout(tmp_path, "movie_tagging", [{"user_id": "u", "profile": PROFILES["news_headline"]}], [])
    with pytest.raises(LampDataError, match=r"user u: profile\[0\]\.description: missing"):
        lamp.load_candidates(tmp_path, "movie_tagging")
    with pytest.raises(LampDataError, match="unknown LaMP task"):
        lamp.load_candidates(tmp_path, "movies")


# ----------------------------------------------------------------------------- real data


LAMP_DIR = Path(os.environ.get("LAMP_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "lamp"))


@pytest.mark.skipif(not (LAMP_DIR / "news_headline").is_dir(), reason="no LaMP data at $LAMP_DIR")
def test_real_news_headline():
    cands = lamp.load_candidates(LAMP_DIR, "news_headline")
    test = lamp.load_test_users(LAMP_DIR, "news_headline")
    assert len(cands) == 263 and len(test) == 50
    assert all(len(u.history) == 10 and len(u.query) == 1 and u.query[0].gold for u in test)
    assert not {u.user_id for u in cands} & {u.user_id for u in test}
    user = test[0]
    prompt = lamp.query_prompt("news_headline", user.history, user.query[0])
    assert prompt.startswith("### User History:\nArticle: ") and prompt.endswith(" Headline:")
    assert len(lamp.training_pairs("news_headline", user.history)) == 10
