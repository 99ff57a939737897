"""Leave-one-out retrieval metrics: each embedding queries all the others.

Pure functions over arrays, so they are unit-tested against hand-computed values and reused
unchanged for validation during training and for the final evaluation. Ties in distance are
broken by index (the earlier item ranks first), which makes every result deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

RECALL_KS = (1, 5, 10)


# Cap of one block of a full sort's distance matrix (queries x items floats).
MAX_BLOCK_FLOATS = 1 << 25
# Up to this many items, one full sort per block of queries is cheap; above it the search
# bounds each query's k-th distance first (see `_neighbours_by_bound`).
FULL_SORT_MAX_ITEMS = 4096
# Score tiles of about this many floats (8 MB) stay in the CPU cache between the matrix product
# and the scan that follows it; writing full query x N rows to memory is what made the plain
# search slow at 200,000 items.
TILE_FLOATS = 1 << 21
# Columns of a tile are scanned in groups this wide: one max per group finds the few groups
# that hold a candidate.
GROUP = 32
# The bound on each query's k-th distance comes from an exact search over every STRIDE-th item.
STRIDE = 16


def leave_one_out_neighbours(
    embeddings: np.ndarray | torch.Tensor, k: int, chunk_size: int = 1024, progress: bool = False
) -> np.ndarray:
    """Indices (N x k) of each item's k nearest other items: the evaluation's search."""
    return nearest_neighbours(embeddings, embeddings, k, leave_one_out=True, chunk_size=chunk_size, progress=progress)


def nearest_neighbours(queries: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, k: int,
                       leave_one_out: bool = False, chunk_size: int = 1024, progress: bool = False) -> np.ndarray:
    """Indices (Q x k) of each query's k nearest reference items by Euclidean distance, nearest first.

    The one exact search of the project, for evaluation and for `imgembed search` alike (as
    pytorch-metric-learning's get_knn serves both). With `leave_one_out` the queries are the
    reference items themselves and each skips itself. Exact search in blocks of `chunk_size`
    queries, so 200k items never need an N x N matrix. Ties in distance rank the lower index
    first, whichever path runs. k is capped at the number of items there are to find.
    """
    x = torch.as_tensor(np.ascontiguousarray(reference, dtype=np.float32))
    q = x if leave_one_out else torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32))
    n = x.shape[0]
    k = min(k, n - 1 if leave_one_out else n)
    if k <= 0 or q.shape[0] == 0:
        return np.zeros((q.shape[0], max(k, 0)), dtype=np.int64)
    with torch.no_grad():
        if n <= FULL_SORT_MAX_ITEMS or n // STRIDE < 4 * (k + 1):
            return _neighbours_by_full_sort(x, k, chunk_size, None if leave_one_out else q)
        return _neighbours_by_bound(x, k, chunk_size, progress, None if leave_one_out else q)


def _neighbours_by_full_sort(x: torch.Tensor, k: int, chunk_size: int, queries: torch.Tensor | None = None) -> np.ndarray:
    """One stable sort of each query's distances to all items; `queries=None` is leave-one-out."""
    q_all = x if queries is None else queries
    n, m = x.shape[0], q_all.shape[0]
    sq_norms = (x * x).sum(1)
    q_norms = sq_norms if queries is None else (q_all * q_all).sum(1)
    step = max(1, min(chunk_size, MAX_BLOCK_FLOATS // max(n, 1)))
    out = np.empty((m, k), dtype=np.int64)
    for start in range(0, m, step):
        q = q_all[start : start + step]
        rows = torch.arange(start, start + q.shape[0])
        dist = q_norms[rows, None] + sq_norms[None, :] - 2.0 * (q @ x.T)
        dist.clamp_(min=0)
        if queries is None:
            dist[torch.arange(q.shape[0]), rows] = float("inf")
        out[start : start + q.shape[0]] = torch.sort(dist, dim=1, stable=True).indices[:, :k].numpy()
    return out


def _neighbours_by_bound(x: torch.Tensor, k: int, chunk_size: int, progress: bool = False,
                         queries: torch.Tensor | None = None) -> np.ndarray:
    """Exact k nearest items of each query without scanning a queries x N matrix in memory
    (`queries=None`: every item, leave-one-out).

    Nearest by distance means largest score s(q, x) = q.x - |x|^2/2, one matrix product of
    [q, 1] with [x, -|x|^2/2]. For each block of queries:
    1. an exact search over every STRIDE-th item gives each query a score bound: at least k
       other items score at or above it (its k-th best there; leave-one-out, its (k+1)-th,
       as the query itself may be among them);
    2. cache-sized score tiles over all items keep only the items at or above the bound
       (a few hundred per query), found through the maximum of each group of columns;
    3. those candidates are ranked by score (the distance, up to fp32 rounding), then index.
    Step 1 proves the true k nearest are all among the candidates, so the result is exact.
    """
    n = x.shape[0]
    leave_one_out = queries is None
    q_all = x if leave_one_out else queries
    m = q_all.shape[0]
    sq_norms = (x * x).sum(1)
    chunk = max(1, min(chunk_size, 1024))
    width = max(GROUP, (TILE_FLOATS // chunk) // GROUP * GROUP)
    scored = _scored_items(x, sq_norms, width)
    padded = scored.shape[0]
    sample = scored[:n:STRIDE]
    # Two matrix products of the same numbers may round differently; lowering the bound by far
    # more than fp32 rounding can move a score only adds a few candidates.
    q_norms = sq_norms if leave_one_out else (q_all * q_all).sum(1)
    slack = 1e-4 * (max(sq_norms.max(), q_norms.max()) + 1.0)
    need = k + 1 if leave_one_out else k
    out = np.empty((m, k), dtype=np.int64)

    def search_block(start: int) -> None:
        stop = min(start + chunk, m)
        block = torch.cat([q_all[start:stop], torch.ones(stop - start, 1)], dim=1)
        bound = torch.topk(block @ sample.T, need, dim=1).values[:, -1:] - slack
        rows, cols, values = [], [], []
        scores = torch.empty(stop - start, width)
        for left in range(0, padded, width):
            torch.mm(block, scored[left : left + width].T, out=scores)
            groups = scores.view(stop - start, width // GROUP, GROUP)
            hit_rows, hit_groups = torch.nonzero(groups.amax(dim=2) >= bound, as_tuple=True)
            hits = groups[hit_rows, hit_groups]
            member, offset = torch.nonzero(hits >= bound[hit_rows], as_tuple=True)
            rows.append(hit_rows[member])
            cols.append(left + hit_groups[member] * GROUP + offset)
            values.append(hits[member, offset])
        out[start:stop] = _best_candidates(start, stop - start, torch.cat(rows), torch.cat(cols), torch.cat(values), k,
                                           leave_one_out)

    _run_blocks(search_block, range(0, m, chunk), progress)
    return out


def _run_blocks(search_block: Callable[[int], None], starts: range, progress: bool) -> None:
    """Most of the work is small tensor operations that one thread runs no faster than several:
    one block of queries per thread, each single-threaded, keeps every core busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            blocks = pool.map(search_block, starts)
            for _ in tqdm(blocks, total=len(starts), desc="nearest neighbours", unit="block", disable=not progress):
                pass
    finally:
        torch.set_num_threads(threads)


def _scored_items(x: torch.Tensor, sq_norms: torch.Tensor, width: int) -> torch.Tensor:
    """[x, -|x|^2/2] per item, padded with rows that score -inf to a multiple of `width` items."""
    n, dim = x.shape
    scored = torch.cat([x, -0.5 * sq_norms[:, None]], dim=1)
    padded = -(-n // width) * width
    if padded > n:
        pad = torch.zeros(padded - n, dim + 1)
        pad[:, -1] = float("-inf")
        scored = torch.cat([scored, pad])
    return scored


def _best_candidates(start: int, num_queries: int, rows: torch.Tensor, cols: torch.Tensor, scores: torch.Tensor,
                     k: int, leave_one_out: bool = True) -> np.ndarray:
    """The k best-scoring candidates of each query row (leave-one-out: other than itself), ties by index.

    Candidates arrive grouped by tile and, within a row, in increasing index order; a stable
    sort by row keeps that order, so a stable sort by score breaks ties by index.
    """
    if leave_one_out:
        not_self = cols != rows + start
        rows, cols, scores = rows[not_self], cols[not_self], scores[not_self]
    by_row = torch.sort(rows, stable=True).indices
    rows, cols, scores = rows[by_row], cols[by_row], scores[by_row]
    counts = torch.bincount(rows, minlength=num_queries)
    if counts.min() < k:  # cannot happen by step 1; say so loudly if it does
        raise AssertionError("nearest-neighbour bound kept fewer than k candidates")
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(rows)) - first[rows]
    dense_scores = torch.full((num_queries, int(counts.max())), float("-inf"))
    dense_cols = torch.zeros((num_queries, int(counts.max())), dtype=torch.int64)
    dense_scores[rows, slot] = scores
    dense_cols[rows, slot] = cols
    best = torch.sort(dense_scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(dense_cols, 1, best).numpy()


def relevant_counts(labels: np.ndarray) -> np.ndarray:
    """For each item, how many *other* items share its label."""
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse] - 1


def neighbours_needed(labels: np.ndarray) -> int:
    """Neighbours to retrieve so that MAP@R, mP@5 and Recall@10 are exact."""
    return int(max(max(RECALL_KS), 5, relevant_counts(labels).max(initial=0)))


def _precision_weighted_hits(hits: np.ndarray) -> np.ndarray:
    """hits[q, i] * precision at rank i+1 of query q."""
    ranks = np.arange(1, hits.shape[1] + 1)
    return hits * (np.cumsum(hits, axis=1) / ranks)


def retrieval_metrics(labels: np.ndarray, neighbours: np.ndarray) -> dict[str, float]:
    """Precision@1, mP@5 (the GUIE score), MAP@R and Recall@{1,5,10} averaged over queries.

    Queries whose class has no other item cannot be answered correctly by anyone and are
    left out (their count is reported as `queries_without_match`).
    """
    labels = np.asarray(labels)
    hits = labels[neighbours] == labels[:, None]
    n_rel = relevant_counts(labels)
    valid = n_rel > 0
    hits, n_rel = hits[valid], n_rel[valid]
    result: dict[str, float] = {"num_queries": int(valid.sum()), "queries_without_match": int((~valid).sum())}
    if not valid.any():
        for key in ("precision_at_1", "map_at_5", "map_at_r") + tuple(f"recall_at_{k}" for k in RECALL_KS):
            result[key] = 0.0
        return result
    weighted = _precision_weighted_hits(hits)
    result["precision_at_1"] = float(hits[:, 0].mean())
    result["map_at_5"] = float((weighted[:, :5].sum(1) / np.minimum(5, n_rel)).mean())
    within_r = np.arange(hits.shape[1])[None, :] < n_rel[:, None]
    result["map_at_r"] = float(((weighted * within_r).sum(1) / n_rel).mean())
    for k in RECALL_KS:
        result[f"recall_at_{k}"] = float(hits[:, :k].any(1).mean())
    return result


def per_class_precision_at_1(
    labels: np.ndarray, neighbours: np.ndarray, class_names: list[str]
) -> dict[str, float | None]:
    """Precision@1 of each class's queries; None for a class with fewer than two items."""
    labels = np.asarray(labels)
    correct = labels[neighbours[:, 0]] == labels if neighbours.shape[1] else np.zeros(len(labels), bool)
    answerable = relevant_counts(labels) > 0
    queries = np.bincount(labels[answerable], minlength=len(class_names))
    right = np.bincount(labels[answerable], weights=correct[answerable], minlength=len(class_names))
    return {name: float(right[i] / queries[i]) if queries[i] else None for i, name in enumerate(class_names)}


def evaluate_embeddings(embeddings: np.ndarray, labels: np.ndarray, chunk_size: int = 1024) -> dict[str, float]:
    """Convenience: neighbours then metrics, used by training-time validation."""
    neighbours = leave_one_out_neighbours(embeddings, neighbours_needed(labels), chunk_size)
    return retrieval_metrics(labels, neighbours)
