"""Mining, sampling and schedules against brute force and hand-computed values."""

import itertools
import math
import os

import numpy as np
import pytest
import torch

from imgembed.data import class_balanced_sampler
from imgembed.errors import UserError
from imgembed.mining import random_triplets
from imgembed.train import TripletObjective, lr_factor

TRAIN_CFG = {"loss_margin": 0.3, "distance": "euclidean", "miner": "semihard", "scheduler": "cosine",
             "step_size": 2, "gamma": 0.1}


def brute_force_triplets(emb: torch.Tensor, labels: torch.Tensor, margin: float, kind: str) -> set:
    d = torch.cdist(emb, emb)
    found = set()
    n = len(labels)
    for a, p, neg in itertools.product(range(n), repeat=3):
        if a == p or labels[a] != labels[p] or labels[a] == labels[neg]:
            continue
        gap = float(d[a, neg] - d[a, p])
        if (kind == "semihard" and 0 < gap <= margin) or (kind == "hard" and gap <= 0) or (kind == "all" and gap <= margin):
            found.add((a, p, neg))
    return found


@pytest.mark.parametrize("kind", ["semihard", "hard", "all"])
def test_miner_matches_brute_force(kind):
    torch.manual_seed(0)
    emb = torch.randn(12, 3)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    objective = TripletObjective({**TRAIN_CFG, "miner": kind})
    a, p, n = objective.miner(emb, labels)
    mined = set(zip(a.tolist(), p.tolist(), n.tolist()))
    assert mined == brute_force_triplets(emb, labels, TRAIN_CFG["loss_margin"], kind)
    loss, count = objective(emb, labels)
    assert count == len(mined) and torch.isfinite(loss)


def test_random_triplets_are_valid_and_cover_candidates():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # classes 2 and 3 have no positive
    usable = [i for i in range(7) if (labels == labels[i]).sum() > 1]
    seen_pos, seen_neg = set(), set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        a, p, n = random_triplets(labels, gen)
        assert a.tolist() == usable
        assert all(labels[x] == labels[y] and x != y for x, y in zip(a.tolist(), p.tolist()))
        assert all(labels[x] != labels[y] for x, y in zip(a.tolist(), n.tolist()))
        seen_pos |= set(zip(a.tolist(), p.tolist()))
        seen_neg |= set(zip(a.tolist(), n.tolist()))
    all_pos = {(x, y) for x in usable for y in range(7) if x != y and labels[x] == labels[y]}
    all_neg = {(x, y) for x in usable for y in range(7) if labels[x] != labels[y]}
    assert seen_pos == all_pos and seen_neg == all_neg


def test_random_triplets_without_positives():
    a, p, n = random_triplets(torch.tensor([0, 1, 2]))
    assert a.numel() == p.numel() == n.numel() == 0


def test_sampler_gives_p_by_k_batches():
    labels = np.repeat(np.arange(6), [5, 6, 7, 8, 9, 10])
    sampler = class_balanced_sampler(labels, classes_per_batch=3, samples_per_class=4)
    indices = list(iter(sampler))
    assert len(indices) == (len(labels) // 12) * 12  # whole batches covering about one pass
    for start in range(0, len(indices) - 11, 12):
        batch = labels[indices[start : start + 12]]
        values, counts = np.unique(batch, return_counts=True)
        assert len(values) == 3 and counts.tolist() == [4, 4, 4]


def test_sampler_needs_enough_classes():
    with pytest.raises(UserError, match="data.classes_per_batch"):
        class_balanced_sampler(np.array([0, 0, 1, 1]), classes_per_batch=3, samples_per_class=2)


def test_warmup_then_cosine():
    cfg = {**TRAIN_CFG, "scheduler": "cosine"}
    values = [lr_factor(s, total_steps=10, warmup_steps=2, train_cfg=cfg, steps_per_epoch=5) for s in range(11)]
    assert values[0] == pytest.approx(0.5) and values[1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(1.0)
    assert values[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert values[10] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[1:], values[2:]))


def test_step_decay():
    cfg = {**TRAIN_CFG, "scheduler": "step", "step_size": 2, "gamma": 0.1}
    factors = [lr_factor(epoch * 5, 100, 0, cfg, steps_per_epoch=5) for epoch in range(5)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_num_workers_auto_is_none_on_the_cpu_and_several_on_a_gpu(monkeypatch):
    from imgembed.runtime import resolve_num_workers

    assert resolve_num_workers("auto", torch.device("cpu")) == 0
    assert resolve_num_workers(3, torch.device("cpu")) == 3
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert resolve_num_workers("auto", torch.device("cuda")) == 8
    assert resolve_num_workers("auto", torch.device("cuda"), processes=4) == 3


def test_cpu_threads_follow_the_callers_budget_not_accelerates_default():
    from imgembed.runtime import cpu_threads

    # Snakemake sets MKL_NUM_THREADS (and OMP_NUM_THREADS, which accelerate launch overwrites).
    assert cpu_threads(1, {"MKL_NUM_THREADS": "3", "OMP_NUM_THREADS": "1"}) == 3
    assert cpu_threads(2, {"MKL_NUM_THREADS": "6"}) == 3
    assert cpu_threads(4, {"MKL_NUM_THREADS": "2"}) == 1
    # `dvc repro` sets nothing: every core this process may use, shared among the processes.
    available = len(os.sched_getaffinity(0))
    assert cpu_threads(1, {"OMP_NUM_THREADS": "1"}) == available
    assert cpu_threads(1, {"MKL_NUM_THREADS": "zero"}) == available
    assert cpu_threads(available * 2, {}) == 1


def test_several_processes_without_a_gpu_join_on_the_cpu(monkeypatch):
    import torch

    from imgembed.runtime import distributed_on_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed_on_cpu({"WORLD_SIZE": "2"})  # multi_cpu: torchrun's processes, no GPU
    assert not distributed_on_cpu({"WORLD_SIZE": "1"}) and not distributed_on_cpu({})  # one process: accelerate decides
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not distributed_on_cpu({"WORLD_SIZE": "2"})  # multi_gpu on GPUs: nccl
