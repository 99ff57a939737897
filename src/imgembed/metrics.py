"""Leave-one-out retrieval metrics: each embedding queries all the others.

Pure functions over arrays, so they are unit-tested against hand-computed values and reused
unchanged for validation during training and for the final evaluation. Ties in distance are
broken by index (the earlier item ranks first), which makes every result deterministic.
"""

from __future__ import annotations

import numpy as np
import torch

RECALL_KS = (1, 5, 10)


def leave_one_out_neighbours(
    embeddings: np.ndarray | torch.Tensor, k: int, chunk_size: int = 1024
) -> np.ndarray:
    """Indices (N x k) of each item's k nearest other items by Euclidean distance.

    Exact search in blocks of `chunk_size` queries keeps memory at chunk_size x N floats,
    so 200k embeddings never need an N x N matrix.
    """
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    n = x.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    sq_norms = (x * x).sum(1)
    out = np.empty((n, k), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            q = x[start : start + chunk_size]
            rows = torch.arange(start, start + q.shape[0])
            dist = sq_norms[rows, None] + sq_norms[None, :] - 2.0 * (q @ x.T)
            dist.clamp_(min=0)
            dist[torch.arange(q.shape[0]), rows] = float("inf")
            if n <= 4096:
                order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
            else:
                # topk does not order ties; re-sort the selected block by (distance, index).
                _, cand = torch.topk(dist, k, dim=1, largest=False)
                cand, _ = torch.sort(cand, dim=1)
                sel = torch.gather(dist, 1, cand)
                order = torch.gather(cand, 1, torch.sort(sel, dim=1, stable=True).indices)
            out[start : start + q.shape[0]] = order.numpy()
    return out


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
    n_rel = relevant_counts(labels)
    result: dict[str, float | None] = {}
    for index, name in enumerate(class_names):
        mask = (labels == index) & (n_rel > 0)
        result[name] = float(correct[mask].mean()) if mask.any() else None
    return result


def evaluate_embeddings(embeddings: np.ndarray, labels: np.ndarray, chunk_size: int = 1024) -> dict[str, float]:
    """Convenience: neighbours then metrics, used by training-time validation."""
    neighbours = leave_one_out_neighbours(embeddings, neighbours_needed(labels), chunk_size)
    return retrieval_metrics(labels, neighbours)
