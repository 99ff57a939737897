"""Triplet selection for the siamese-triplet recipe, in the tuple format pytorch-metric-learning uses.

The default recipe mines with pytorch-metric-learning's miners; this module only adds what
that library lacks: the siamese-triplet code's *random* triplets (one random positive and one
random negative per anchor), kept so the original recipe can be reproduced and compared.
"""

from __future__ import annotations

import torch


def random_triplets(
    labels: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchor, positive, negative) indices: one random valid triplet per usable anchor.

    An anchor is usable when the batch holds another item of its class and an item of
    another class.
    """
    labels = labels.flatten()
    n = labels.numel()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=labels.device)
    pos_mask = same & ~eye
    neg_mask = ~same
    usable = pos_mask.any(1) & neg_mask.any(1)
    anchors = torch.nonzero(usable).flatten()
    if anchors.numel() == 0:
        empty = torch.empty(0, dtype=torch.long, device=labels.device)
        return empty, empty, empty
    # Random scores, masked to valid candidates; argmax picks a uniform random candidate.
    scores = torch.rand((anchors.numel(), n), generator=generator).to(labels.device)
    positives = torch.where(pos_mask[anchors], scores, -1.0).argmax(1)
    scores = torch.rand((anchors.numel(), n), generator=generator).to(labels.device)
    negatives = torch.where(neg_mask[anchors], scores, -1.0).argmax(1)
    return anchors, positives, negatives
