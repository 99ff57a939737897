"""Retrieval metrics against values computed by hand (see the comments for the working)."""

import numpy as np
import pytest
import torch

import imgembed.metrics as metrics_module
from imgembed.metrics import (
    evaluate_embeddings,
    leave_one_out_neighbours,
    neighbours_needed,
    per_class_precision_at_1,
    relevant_counts,
    retrieval_metrics,
)

# Five points on a line. Sorted neighbours and hits (same label) per query:
#   q0 x=0  l0: 1,2,3,4 -> hits 1,0,0,1  R=2  P@1=1  mP@5=(1+2/4)/2=0.75   MAP@R=(1)/2=0.5
#   q1 x=1  l0: 0,2,3,4 -> hits 1,0,0,1  R=2  P@1=1  mP@5=0.75             MAP@R=0.5
#   q2 x=3  l1: 1,0,3,4 -> hits 0,0,1,0  R=1  P@1=0  mP@5=(1/3)/1          MAP@R=0
#   q3 x=10 l1: 4,2,1,0 -> hits 0,1,0,0  R=1  P@1=0  mP@5=(1/2)/1          MAP@R=0
#   q4 x=11 l0: 3,2,1,0 -> hits 0,0,1,1  R=2  P@1=0  mP@5=(1/3+2/4)/2=5/12 MAP@R=0
LINE_X = np.array([[0.0], [1.0], [3.0], [10.0], [11.0]])
LINE_Y = np.array([0, 0, 1, 1, 0])


def test_neighbours_on_a_line():
    expected = [[1, 2, 3, 4], [0, 2, 3, 4], [1, 0, 3, 4], [4, 2, 1, 0], [3, 2, 1, 0]]
    assert leave_one_out_neighbours(LINE_X, k=4).tolist() == expected


def test_metrics_on_a_line():
    m = retrieval_metrics(LINE_Y, leave_one_out_neighbours(LINE_X, k=4))
    assert m["precision_at_1"] == pytest.approx(0.4)
    assert m["map_at_5"] == pytest.approx((0.75 + 0.75 + 1 / 3 + 0.5 + 5 / 12) / 5)
    assert m["map_at_r"] == pytest.approx(0.2)
    assert m["recall_at_1"] == pytest.approx(0.4)
    assert m["recall_at_5"] == pytest.approx(1.0)
    assert m["recall_at_10"] == pytest.approx(1.0)
    assert m["num_queries"] == 5 and m["queries_without_match"] == 0


def test_ties_and_single_image_class():
    # q0 x=0 is at distance 1 from both q1 (other class) and q2 (same class): the tie goes to
    # the lower index, so q0 ranks q1 first. q1 is alone in its class and is not a query.
    x = np.array([[0.0], [1.0], [-1.0]])
    y = np.array([0, 1, 0])
    nn = leave_one_out_neighbours(x, k=2)
    assert nn.tolist() == [[1, 2], [0, 2], [0, 1]]
    m = retrieval_metrics(y, nn)
    assert m["queries_without_match"] == 1 and m["num_queries"] == 2
    assert m["precision_at_1"] == pytest.approx(0.5)
    assert m["map_at_5"] == pytest.approx((0.5 + 1.0) / 2)  # q0: hit at rank 2 -> 1/2; q2: 1
    assert m["map_at_r"] == pytest.approx((0.0 + 1.0) / 2)
    per_class = per_class_precision_at_1(y, nn, ["a", "b"])
    assert per_class == {"a": 0.5, "b": None}


def test_map_at_5_divides_by_min_of_5_and_class_size():
    # Seven items of class 0 at x=0..6 and one far item of class 1: every class-0 query has its
    # six relatives first, so mP@5 = 1 (divided by min(5, 6) = 5, not 6) and MAP@R = 1.
    x = np.array([[float(i)] for i in range(7)] + [[100.0], [101.0]])
    y = np.array([0] * 7 + [1, 1])
    m = retrieval_metrics(y, leave_one_out_neighbours(x, k=neighbours_needed(y)))
    assert m["map_at_5"] == pytest.approx(1.0)
    assert m["map_at_r"] == pytest.approx(1.0)


def test_relevant_counts_and_neighbours_needed():
    y = np.array([3, 3, 3, 7, 9, 9])
    assert relevant_counts(y).tolist() == [2, 2, 2, 0, 1, 1]
    assert neighbours_needed(y) == 10


def test_large_path_matches_brute_force():
    # Above 4096 items the search bounds each query's k-th distance and ranks candidates; it must
    # give the same order as a full stable sort, including ties (duplicated points force exact ties).
    rng = np.random.RandomState(0)
    x = rng.randint(0, 4, size=(4200, 3)).astype(np.float32)
    nn = leave_one_out_neighbours(x, k=7, chunk_size=1000)
    sample = rng.choice(len(x), 50, replace=False)
    for q in sample:
        d = ((x - x[q]) ** 2).sum(1)
        d[q] = np.inf
        assert nn[q].tolist() == np.argsort(d, kind="stable")[:7].tolist()


def test_chunking_does_not_change_results():
    rng = np.random.RandomState(1)
    x = rng.normal(size=(300, 8))
    y = rng.randint(0, 6, size=300)
    assert evaluate_embeddings(x, y, chunk_size=7) == evaluate_embeddings(x, y, chunk_size=1000)


def test_perfect_and_hopeless_embeddings():
    y = np.repeat(np.arange(4), 5)
    perfect = np.eye(4)[y] + 1e-3 * np.arange(20)[:, None]
    m = evaluate_embeddings(perfect, y)
    assert m["precision_at_1"] == 1.0 and m["map_at_5"] == pytest.approx(1.0) and m["map_at_r"] == pytest.approx(1.0)
    # Each item's nearest neighbours are all of other classes.
    hopeless = np.array([[float(i * 10 + c)] for c in range(5) for i in range(4)])
    y2 = np.repeat(np.arange(5), 4)
    m2 = evaluate_embeddings(hopeless, y2[np.argsort(np.repeat(np.arange(5), 4), kind="stable")])
    assert 0.0 <= m2["precision_at_1"] <= 1.0


@pytest.mark.parametrize("normalise", [True, False])
def test_bound_search_finds_the_true_nearest(normalise):
    """The bounded search against float64 brute force, on clustered data sorted by class (the
    order an embeddings file has) and, unnormalised, with norms spread over two decades."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(500), 10)
    x = rng.normal(size=(500, 16))[labels] + 0.7 * rng.normal(size=(5000, 16))
    x = x / np.linalg.norm(x, axis=1, keepdims=True) if normalise else x * rng.uniform(0.1, 10, size=(5000, 1))
    x = x.astype(np.float32)
    k = 12
    nn = leave_one_out_neighbours(x, k=k, chunk_size=256)
    assert nn.shape == (5000, k)
    x64 = x.astype(np.float64)
    for q in rng.choice(5000, 200, replace=False):
        d = ((x64 - x64[q]) ** 2).sum(1)
        d[q] = np.inf
        assert q not in nn[q]
        np.testing.assert_allclose(d[nn[q]], np.sort(d)[:k], rtol=1e-5, atol=1e-6)


def test_bound_search_matches_full_sort_on_ties_and_chunks():
    rng = np.random.RandomState(5)
    x = rng.randint(0, 3, size=(4500, 4)).astype(np.float32)  # 81 distinct points: ties everywhere
    full = metrics_module._neighbours_by_full_sort(torch.as_tensor(x), 9, 1024)
    for chunk in (100, 1024):
        assert (leave_one_out_neighbours(x, k=9, chunk_size=chunk) == full).all()


def test_per_class_precision_at_1_counts_only_answerable_queries():
    labels = np.array([0, 0, 1, 1, 1, 2])
    neighbours = np.array([[1], [2], [3], [4], [0], [0]])
    assert per_class_precision_at_1(labels, neighbours, ["a", "b", "c"]) == {"a": 0.5, "b": 2 / 3, "c": None}


@pytest.mark.parametrize("n", [300, 4500])  # the full-sort path and the bounded path
def test_query_search_matches_full_sort_on_ties(n):
    """Queries against a reference (search's use of the one engine): the same order as a full
    stable sort, ties to the lower reference index; a query that is a reference item finds itself."""
    rng = np.random.RandomState(6)
    reference = rng.randint(0, 3, size=(n, 4)).astype(np.float32)  # 81 distinct points: ties everywhere
    queries = np.concatenate([reference[:5], rng.randint(0, 3, size=(40, 4)).astype(np.float32) + 0.5])
    nn = metrics_module.nearest_neighbours(queries, reference, k=9, chunk_size=16)
    full = metrics_module._neighbours_by_full_sort(torch.as_tensor(reference), 9, 1024, torch.as_tensor(queries))
    assert (nn == full).all()
    for q in range(len(queries)):
        d = ((reference - queries[q]) ** 2).sum(1)
        assert nn[q].tolist() == np.argsort(d, kind="stable")[:9].tolist()
    assert nn[:5, 0].tolist() == [int(np.flatnonzero((reference == reference[i]).all(1))[0]) for i in range(5)]


def test_leave_one_out_is_a_flag_of_the_same_search():
    x = np.array([[0.0], [1.0], [3.0], [10.0], [11.0]])
    assert (metrics_module.nearest_neighbours(x, x, k=4, leave_one_out=True) == leave_one_out_neighbours(x, k=4)).all()
    assert metrics_module.nearest_neighbours(x, x, k=2)[:, 0].tolist() == [0, 1, 2, 3, 4]  # without it, itself first
    assert metrics_module.nearest_neighbours(x[:0], x, k=2).shape == (0, 2)
