import numpy as np
import pytest

from mta.stages.kmeans import _update_centers, kmeans, kmeans_plusplus

sklearn_cluster = pytest.importorskip("sklearn.cluster")
sklearn_datasets = pytest.importorskip("sklearn.datasets")
sklearn_metrics = pytest.importorskip("sklearn.metrics")


def test_well_separated_blobs_match_sklearn_partition():
    X, _ = sklearn_datasets.make_blobs(n_samples=600, centers=6, n_features=8, cluster_std=0.5,
                                       center_box=(-20, 20), random_state=1)
    ours = kmeans(X, 6, n_init=5, seed=0)
    ref = sklearn_cluster.KMeans(6, n_init=5, random_state=0).fit(X)
    assert sklearn_metrics.adjusted_rand_score(ref.labels_, ours.labels) == 1.0
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_overlapping_blobs_inertia_close_to_sklearn(dtype):
    X, _ = sklearn_datasets.make_blobs(n_samples=3000, centers=12, n_features=16, cluster_std=4.0,
                                       center_box=(-8, 8), random_state=2)
    X = X.astype(dtype)
    ours = kmeans(X, 12, n_init=4, max_iter=300, seed=0)
    ref = sklearn_cluster.KMeans(12, n_init=4, max_iter=300, random_state=0).fit(X)
    assert ours.centers.dtype == dtype and ours.labels.shape == (3000,)
    assert ours.inertia <= 1.01 * ref.inertia_
    d = ((X[:, None, :] - ours.centers[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(ours.labels, d.argmin(1))  # labels agree with the returned centers


def test_deterministic_under_seed():
    X = np.random.default_rng(0).normal(size=(500, 5))
    a, b = kmeans(X, 7, n_init=3, seed=11), kmeans(X, 7, n_init=3, seed=11)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centers, b.centers)
    assert a.inertia == b.inertia and a.n_iter == b.n_iter


def test_kmeans_plusplus_picks_distinct_data_points():
    X = np.random.default_rng(1).normal(size=(200, 3))
    centers = kmeans_plusplus(X, 10, np.random.default_rng(0))
    assert len({tuple(c) for c in centers}) == 10
    assert all((c == X).all(1).any() for c in centers)


def test_empty_cluster_moves_to_farthest_point():
    X = np.array([[0.0], [1.0], [10.0], [2.0]])
    labels = np.array([0, 0, 0, 1])
    dist = np.array([1.0, 0.0, 81.0, 0.0])  # point 2 is farthest from its center
    centers = _update_centers(X, labels, dist, k=3)
    np.testing.assert_allclose(centers, [[0.5], [2.0], [10.0]])


def test_k_equal_n_gives_zero_inertia():
    X = np.arange(12.0).reshape(6, 2)
    assert kmeans(X, 6, n_init=1).inertia == pytest.approx(0.0)


def test_bad_inputs():
    X = np.zeros((5, 3))
    with pytest.raises(ValueError, match="number of points"):
        kmeans(X, 6)
    with pytest.raises(ValueError, match="number of points"):
        kmeans(X, 0)
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*\[2\]"):
        kmeans(X, 2)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(np.zeros(5), 2)


def test_authors_call_is_one_kmeanspp_run_of_at_most_3000_iterations(monkeypatch):
    """select_anchor.py:105 calls KMeans(n_clusters=k, random_state=0, max_iter=3000): under scikit-learn
    >= 1.4 (the authors pinned 1.6.1) n_init "auto" is one k-means++ run. select_anchors runs the same."""
    from mta.data.lamp import User, get_task
    from mta.profiles import CPU, PAPER
    from mta.stages import anchors

    X = np.random.default_rng(3).normal(size=(40, 4)).astype(np.float32)
    ref = sklearn_cluster.KMeans(n_clusters=5, random_state=0, max_iter=3000).fit(X)
    assert (ref._n_init, ref.max_iter) == (1, 3000)
    assert PAPER.kmeans_n_init == CPU.kmeans_n_init == 1

    seedings, calls = [], []
    real_seeding, real_kmeans = kmeans_plusplus, anchors.kmeans
    monkeypatch.setattr("mta.stages.kmeans.kmeans_plusplus", lambda *a: seedings.append(1) or real_seeding(*a))
    monkeypatch.setattr(anchors, "kmeans", lambda *a, **kw: calls.append(kw) or real_kmeans(*a, **kw))

    class Fixed:  # an encoder that returns X row by row, one item per user
        def encode(self, texts, batch_size, progress, normalize):
            return X[: len(texts)]

    users = [User(f"u{i}", [{"text": f"article {i}", "title": f"headline {i}"}]) for i in range(len(X))]
    anchors.select_anchors(users, get_task("news_headline"), Fixed(), 5, 1, seed=0, progress=False)
    assert calls[-1] == {"n_init": 1, "max_iter": 3000, "seed": 0} and len(seedings) == 1
    anchors.select_anchors(users, get_task("news_headline"), Fixed(), 5, 1, seed=0, progress=False, kmeans_n_init=4)
    assert calls[-1]["n_init"] == 4 and len(seedings) == 5
