"""Stage 1 and stage 2 texts against the authors' code: select_anchor.py:62-68 (items for Eq. 2) and
dense_retrieval_matcher.py:56-116 (the whole-history document), transcribed below as the oracles."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest

from mta.data.lamp import TASKS, User, cluster_texts, get_task, match_document
from mta.profiles import CPU, PAPER
from mta.run import pipeline
from mta.run.rundir import RunDir
from mta.stages.anchors import select_anchors
from mta.stages.matching import match_anchors

LONG = " ".join(f"w{i}" for i in range(400))  # over select_anchor.py's 368-word cut
HISTORIES = {
    "citation": [{"id": "1", "title": "Deep  nets\nfor graphs", "citation": "Graph kernels"},
                 {"id": "2", "title": " A survey ", "citation": LONG}],
    "movie_tagging": [{"id": "1", "description": "A robot\tlearns to love.", "tag": "sci-fi"},
                      {"id": "2", "description": LONG, "tag": "dark comedy"}],
    "product_rating": [{"id": "1", "text": "  Great blender, loud. ", "score": "5"},
                       {"id": "2", "text": "Broke\nafter a week ", "score": 1},
                       {"id": "3", "text": LONG + "  ", "score": "3"}],
    "news_headline": [{"id": "1", "text": "The senate voted today.", "title": "Senate votes "},
                      {"id": "2", "text": LONG, "title": "Long  read"}],
    "scholarly_title": [{"id": "1", "abstract": "We study LoRA merging.", "title": "Merging LoRAs"},
                        {"id": "2", "abstract": LONG, "title": " On length "}],
}

# Per-Pcs's prompt/prompt.json `retrieval_history`, the file select_anchor.py reads as ./prompt/prompt.json.
RETRIEVAL_HISTORY = {
    "movie_tagging": "Description: {description} Tag: {tag}\n",
    "citation": "Paper Title: {title}\n",
    "news_headline": "Article: {text} Headline: {title}\n",
    "product_rating": "Review: {text} Score: {score}\n",
    "scholarly_title": "abstract: {abstract} title: {title}\n",
}


def get_first_k_tokens(text, k):  # select_anchor.py:12-16
    tokens = text.split()
    output = " ".join(tokens[:k])
    return output


def authors_stage1_items(profile, task_name):  # select_anchor.py:62-68
    visible_history_list = copy.deepcopy(profile)
    for p in visible_history_list:
        for key, value in p.items():
            if isinstance(value, str):
                p[key] = get_first_k_tokens(value, 368)
    return [RETRIEVAL_HISTORY[task_name].format(**p) for p in visible_history_list], visible_history_list


def extract_user_text(user_data, task_name):  # dense_retrieval_matcher.py:56-116, verbatim but for logging
    texts = []
    if task_name == "product_rating":
        if 'profile' in user_data:
            profile = user_data['profile']
            for review in profile:
                if 'text' in review:
                    texts.append(review['text'])
    elif task_name == "scholarly_title":
        if 'profile' in user_data:
            profile = user_data['profile']
            for item in profile:
                title = item.get('title', '')
                abstract = item.get('abstract', '')
                if title or abstract:
                    texts.append(f"{title} {abstract}".strip())
    elif task_name == "news_headline":
        if 'profile' in user_data:
            profile = user_data['profile']
            for item in profile:
                title = item.get('title', '')
                text = item.get('text', '')
                if title or text:
                    texts.append(f"{title} {text}".strip())
    elif task_name == "citation":
        if 'profile' in user_data:
            profile = user_data['profile']
            for item in profile:
                title = item.get('title', '')
                abstract = item.get('abstract', '')
                citation = item.get('citation', '')
                if title or abstract or citation:
                    texts.append(f"{title} {abstract} {citation}".strip())
    elif task_name == "movie_tagging":  # noqa: SIM102 (verbatim)
        if 'profile' in user_data:
            profile = user_data['profile']
            for item in profile:
                tag = item.get('tag', '')
                description = item.get('description', '')
                if tag or description:
                    texts.append(f"{tag} {description}".strip())
    combined_text = " ".join(texts)
    return combined_text.strip()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_stage2_document_is_the_authors_matcher_text(task):
    history = HISTORIES[task]
    expected = extract_user_text({"profile": copy.deepcopy(history)}, task)
    assert match_document(get_task(task), history, "authors_code") == expected
    assert match_document(get_task(task), history, "ours") == "\n".join(map(get_task(task).render_history, history))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_stage1_items_are_the_authors_anchor_selection_text(task):
    history = HISTORIES[task]
    before = copy.deepcopy(history)
    expected, _ = authors_stage1_items(history, task)
    assert cluster_texts(get_task(task), history, "authors_code") == expected
    assert history == before  # the cut is not applied in place
    assert cluster_texts(get_task(task), history, "ours") == [get_task(task).render_history(i) for i in history]


def test_lamp1_stage1_items_carry_only_the_title():
    history = HISTORIES["citation"]
    assert cluster_texts(get_task("citation"), history, "authors_code") == ["Paper Title: Deep nets for graphs\n",
                                                                          "Paper Title: A survey\n"]
    assert match_document(get_task("citation"), history[:1], "authors_code") == "Deep  nets\nfor graphs  Graph kernels"


def test_unknown_stage_text_is_refused():
    with pytest.raises(ValueError, match="stage text"):
        match_document(get_task("citation"), HISTORIES["citation"], "paper")
    with pytest.raises(ValueError, match="stage1_text"):
        PAPER.replace(stage1_text="paper")


class RecordingEncoder:
    """Records what it is asked to embed; a text's vector is fixed by its length, of norm 1 + len % 3."""

    def __init__(self):
        self.calls = []

    def encode(self, texts, batch_size=32, progress=False, normalize=True):
        self.calls.append((list(texts), normalize))
        rng = [np.random.default_rng(len(t)) for t in texts]
        out = np.stack([r.standard_normal(4) for r in rng]).astype(np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        out *= np.array([1 + len(t) % 3 for t in texts], dtype=np.float32)[:, None]
        return out / np.linalg.norm(out, axis=1, keepdims=True) if normalize else out


def users(task: str, n: int, prefix: str = "u") -> list[User]:
    history = HISTORIES[task]
    return [User(f"{prefix}{i}", [dict(it, id=f"{i}-{j}") for j, it in enumerate(history[: 1 + i % len(history)])])
            for i in range(n)]


def test_select_anchors_averages_raw_item_vectors_of_the_authors_text():
    task, candidates = get_task("citation"), users("citation", 4)
    enc = RecordingEncoder()
    vectors, _ = select_anchors(candidates, task, enc, 2, 1, seed=0, progress=False)
    (texts, normalize), = enc.calls
    assert not normalize and texts == [t for u in candidates for t in authors_stage1_items(u.history, "citation")[0]]
    raw = enc.encode(texts, normalize=False)
    np.testing.assert_allclose(vectors[3], raw[-2:].mean(0), rtol=1e-6)
    vectors, _ = select_anchors(candidates, task, enc, 2, 1, seed=0, progress=False, text="ours", item_norm=True)
    assert enc.calls[-1] == ([task.render_history(i) for u in candidates for i in u.history], True)


def test_match_anchors_embeds_anchors_as_select_anchor_stored_them():
    task = get_task("news_headline")
    anchors, targets = users("news_headline", 2, "a"), users("news_headline", 2, "t")
    enc = RecordingEncoder()
    match_anchors(targets, anchors, task, enc, progress=False)
    (anchor_docs, _), (user_docs, _) = enc.calls
    stored = [{"profile": authors_stage1_items(a.history, "news_headline")[1]} for a in anchors]
    assert anchor_docs == [extract_user_text(s, "news_headline") for s in stored]
    assert user_docs == [extract_user_text({"profile": u.history}, "news_headline") for u in targets]
    assert anchor_docs[1] != extract_user_text({"profile": anchors[1].history}, "news_headline")  # the cut shows
    match_anchors(targets, anchors, task, enc, progress=False, text="ours")
    assert enc.calls[-2][0] == [match_document(task, a.history, "ours") for a in anchors]


def test_profiles_follow_the_authors_and_the_pipeline_passes_the_settings(tmp_path, monkeypatch):
    for p in (PAPER, CPU):
        assert (p.stage1_text, p.stage2_text, p.item_norm) == ("authors_code", "authors_code", False)
    enc = RecordingEncoder()
    monkeypatch.setattr(pipeline, "load_encoder", lambda *a, **k: enc)
    cands = users("news_headline", 4)
    run = SimpleNamespace(dir=RunDir(tmp_path), candidates=cands, test_users=users("news_headline", 2, "t"),
                          task_spec=get_task("news_headline"), seed=0, progress=False,
                          data_sha256={"candidates": "c", "test_users": "t"},
                          profile=CPU.replace(n_anchors=2, min_anchor_items=1, stage1_text="ours", item_norm=True,
                                              stage2_text="ours"))
    matches = pipeline.stage2_match_anchors(run)
    items, normalize = enc.calls[0]
    assert normalize and items == [run.task_spec.render_history(i) for u in cands for i in u.history]
    assert enc.calls[-1][0] == [match_document(run.task_spec, u.history, "ours") for u in run.test_users]
    assert sorted(matches) == ["t0", "t1"]
