"""Stage 1a in chunks: the same user vectors as one call, each chunk saved as it finishes, a killed stage 1a
resumed at its first missing chunk, no more than a chunk's items embedded at once, and the `cpu` profile's caps
on the candidate pool and on the items embedded per candidate."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mta.data.lamp import User, cluster_texts, get_task, load_candidates, load_test_users
from mta.models.encoders import load_encoder, user_item_embeddings
from mta.profiles import CPU, PAPER, profile_from_dict, resolve_profile
from mta.run import pipeline
from mta.stages import anchors
from mta.stages.anchors import candidate_pool, chunk_bounds, embedded_items, select_anchors, user_vectors
from mta.stamps import load_tensors
from tests.fixtures import make_bert, make_lamp, make_profile

TASK = get_task("news_headline")
WORDS = ["team", "coach", "season", "vote", "bill", "chef", "sauce", "chip", "cloud", "robot", "market", "final"]


def pool(n: int = 23) -> list[User]:
    """Users with 1..7 items of varied lengths."""
    return [User(f"u{i:02d}", [{"text": " ".join(WORDS[(i + j + k) % len(WORDS)] for k in range(3 + (i * j) % 9)),
                                "title": WORDS[(i * 7 + j) % len(WORDS)], "id": f"u{i}-{j}"}
                               for j in range(1 + (i * 5) % 7)]) for i in range(n)]


class Recording:
    """Wraps an encoder: records each call's number of texts; raises on call `fail_at` (counted from 0)."""

    def __init__(self, encoder, fail_at: int | None = None):
        self.encoder, self.fail_at, self.sizes = encoder, fail_at, []

    def encode(self, texts, batch_size=32, progress=False, normalize=True):
        if len(self.sizes) == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.sizes.append(len(texts))
        return self.encoder.encode(texts, batch_size, progress, normalize)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_encoder(str(make_bert(tmp_path_factory.mktemp("bert"))))


def test_chunk_bounds_follow_candidate_order_and_sizes_only():
    assert chunk_bounds([3, 4, 2, 9, 1, 1], 7) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert chunk_bounds([5], 2) == [(0, 1)] and chunk_bounds([], 4) == []
    assert chunk_bounds([1] * 10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_chunked_vectors_equal_one_call(encoder):
    texts = [cluster_texts(TASK, u.history, "authors_code") for u in pool()]
    whole = user_item_embeddings(encoder, texts)
    rec = Recording(encoder)
    chunked = user_vectors(texts, rec, chunk_items=8, progress=False)
    assert len(rec.sizes) > 5 and max(rec.sizes) <= 8  # never more than a chunk's items at once
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)  # other batch shapes: rounding only
    np.testing.assert_array_equal(chunked, user_vectors(texts, encoder, chunk_items=8, progress=False))


def test_a_killed_stage_1a_resumes_at_its_first_missing_chunk(encoder, tmp_path):
    users = pool()
    expected = select_anchors(users, TASK, encoder, 3, 2, seed=0, progress=False, chunk_items=8,
                              chunks=lambda a, b: (tmp_path / "plain" / f"{a}-{b}.safetensors", {"chunk": [a, b]}))
    n_chunks = len(list((tmp_path / "plain").iterdir()))
    chunks = lambda a, b: (tmp_path / "killed" / f"{a}-{b}.safetensors", {"chunk": [a, b]})  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        select_anchors(users, TASK, Recording(encoder, fail_at=3), 3, 2, seed=0, progress=False, chunk_items=8,
                       chunks=chunks)
    assert len(list((tmp_path / "killed").iterdir())) == 3  # chunks 0..2 finished and saved, nothing else
    rec = Recording(encoder)
    vectors, doc = select_anchors(users, TASK, rec, 3, 2, seed=0, progress=False, chunk_items=8, chunks=chunks)
    assert len(rec.sizes) == n_chunks - 3  # the saved chunks are read, not embedded again
    np.testing.assert_array_equal(vectors, expected[0])
    assert doc == expected[1]
    rec = Recording(encoder)  # a chunk recorded as made from other inputs is embedded again
    select_anchors(users, TASK, rec, 3, 2, seed=0, progress=False, chunk_items=8,
                   chunks=lambda a, b: (chunks(a, b)[0], {"chunk": [a, b], "seed": 1}))
    assert len(rec.sizes) == n_chunks


def test_the_pool_cap_is_a_seeded_sample_in_file_order_and_a_no_op_on_a_smaller_pool():
    users = pool(40)
    sample = candidate_pool(users, 10, seed=0)
    assert len(sample) == 10 and sample == candidate_pool(users, 10, seed=0) != candidate_pool(users, 10, seed=1)
    assert [users.index(u) for u in sample] == sorted(users.index(u) for u in sample)
    assert candidate_pool(users, 40, seed=0) == users == candidate_pool(users, None, seed=0)


def test_the_item_cap_draws_a_seeded_subset_per_user():
    user = pool(12)[11]  # 7 items
    texts = cluster_texts(TASK, user.history, "authors_code")
    three = embedded_items(user, TASK, "authors_code", 3, seed=0)
    assert len(three) == 3 and set(three) <= set(texts) and three == embedded_items(user, TASK, "authors_code", 3, 0)
    assert embedded_items(user, TASK, "authors_code", 7, 0) == texts == embedded_items(user, TASK, "authors_code",
                                                                                      None, 0)
    assert any(embedded_items(user, TASK, "authors_code", 3, s) != three for s in range(1, 5))


def test_select_anchors_clusters_the_capped_pool_on_the_capped_items(encoder):
    users = pool(30)
    rec = Recording(encoder)
    vectors, doc = select_anchors(users, TASK, rec, 3, 2, seed=0, progress=False, max_candidates=12, max_items=2)
    kept = candidate_pool(users, 12, 0)
    assert vectors.shape[0] == 12 == doc["n_candidates"] and sum(rec.sizes) == sum(min(2, len(u.history))
                                                                                   for u in kept)
    assert sorted(m for a in doc["anchors"] for m in a["members"]) == sorted(u.user_id for u in kept)
    assert all(a["n_items"] == len(next(u for u in kept if u.user_id == a["user_id"]).history)
               for a in doc["anchors"])  # activity counts every item, not the embedded ones


def test_profile_caps_are_validated_and_leave_the_dev_pool_whole():
    for bad in ({"max_candidates": 0}, {"max_items_embedded": 0}, {"max_candidates": 8, "n_anchors": 16}):
        with pytest.raises(ValueError, match="max_"):
            profile_from_dict({"base": "cpu", **bad})
    assert PAPER.max_candidates is None and PAPER.max_items_embedded is None
    # the LaMP-4 dev pool (263 candidates, at most 206 items each) is embedded whole (docs/defaults/candidate-pool.md)
    assert CPU.max_candidates > 263 and CPU.max_items_embedded >= 206


def test_stage1_select_saves_chunks_in_the_run_directory_and_applies_the_profile_caps(tmp_path, monkeypatch):
    lamp = make_lamp(tmp_path / "lamp")
    profile = make_profile(tmp_path / "p.json", tmp_path / "unused-llm", make_bert(tmp_path / "bert"),
                           max_candidates=8, max_items_embedded=3)
    run = pipeline.Run("news_headline", resolve_profile(str(profile)), lamp, runs=tmp_path / "runs", progress=False)
    doc = pipeline.stage1_select(run)
    assert doc["n_candidates"] == 8 and json.loads(run.dir.anchors.read_text()) == doc
    assert [c.name for c in (run.dir.stage1 / "vectors").iterdir()] == ["0000000-0000008.safetensors"]
    np.testing.assert_array_equal(load_tensors(run.dir.stage1_chunk(0, 8))[0]["vectors"].numpy(),
                                  np.load(run.dir.stage1 / "user_vectors.npy"))
    run.dir.anchors.unlink()  # killed after the last chunk: nothing is embedded again
    monkeypatch.setattr(anchors, "user_item_embeddings", lambda *a: pytest.fail("embedded again"))
    assert pipeline.stage1_select(run) == doc


def test_the_synthetic_pool_has_table_3s_history_lengths_in_the_processed_layout(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "make_synthetic_pool", Path(__file__).resolve().parents[1] / "tools" / "make_synthetic_pool.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    source = make_lamp(tmp_path / "lamp")
    for out in ("a", "b"):
        tool.main(["--source", str(source), "--out", str(tmp_path / out), "--candidates", "60", "--test-users", "3"])
    users = load_candidates(tmp_path / "a", "news_headline")
    lengths = [len(u.history) for u in users]
    assert len(users) == 60 and (min(lengths), max(lengths)) == (7, 945) and abs(np.mean(lengths) - 31.2) < 0.05
    assert [len(u.history) for u in load_test_users(tmp_path / "a", "news_headline")] == [10] * 3
    words = {w for u in load_candidates(source, "news_headline") for it in u.history for w in it["text"].split()}
    assert {w for it in users[0].history for w in it["text"].split()} <= words
    same = tmp_path / "a" / "news_headline" / "user_anchor_candidate.json"
    assert same.read_bytes() == (tmp_path / "b" / "news_headline" / "user_anchor_candidate.json").read_bytes()
    assert json.loads(capsys.readouterr().out.splitlines()[0])["items"] == sum(lengths)
