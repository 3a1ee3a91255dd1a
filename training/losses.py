"""Training losses over tower outputs, and the negative samplers the pairwise losses use.

Offline only (the service never imports this). Every loss takes the towers' outputs, so the model itself stays
loss-free, and every loss scores with `training.model.score` (inner product): what is optimised here is exactly
what the index ranks by. See docs/loss.md for the derivation, the sign conventions and the measured comparison.

Sign convention: a higher score means a better match, every loss is minimised, and a gradient step moves
dot(u, v+) up and dot(u, v-) down.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from training.model import score

LossName = Literal["triplet", "bpr", "softmax"]
LOSSES: tuple[LossName, ...] = ("triplet", "bpr", "softmax")


def triplet_loss(users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, margin: float) -> torch.Tensor:
    """mean over triplets of max(0, margin - dot(u, v+) + dot(u, v-)).

    The 0 makes a triplet that is already ranked right by at least `margin` cost nothing (and push nothing);
    the margin makes "ranked right" mean "by a gap", so the loss cannot be satisfied by the trivial
    dot(u, v+) == dot(u, v-) that a margin-free hinge accepts. users, positives, negatives: (B, D)."""
    return F.relu(margin - score(users, positives) + score(users, negatives)).mean()


def bpr_loss(users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """mean of -log sigmoid(dot(u, v+) - dot(u, v-)), computed stably as softplus(-(difference))."""
    return F.softplus(-(score(users, positives) - score(users, negatives))).mean()


def softmax_loss(
    users: torch.Tensor,
    items: torch.Tensor,
    owner: torch.Tensor,
    log_q: torch.Tensor | None,
    temperature: float,
    accidental: torch.Tensor | None = None,
    column: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax over the batch's item columns: positive t is the pair (row owner[t], column column[t]);
    for every other row that column is a sampled negative.

    logits[u, c] = dot(u, v_c) / temperature - log q(item_c)   (logQ correction, Yi et al. 2019: an item is among
    the columns in proportion to its popularity, so without it popular items would be over-penalised as
    negatives); each positive is a softmax of its logit against its row's negatives, where a row's negatives are
    the columns that are neither the row's own positives nor marked in `accidental` (an accidental hit: the
    column's item is one of the row's items too, e.g. the same item as another row's positive).
    users: (U, D); items: (C, D); owner: (T,) row index; column: (T,) column index, default arange(T) (column t
    is positive t, C == T); log_q: (C,) or None; accidental: (U, C) bool or None.
    With U == T, owner = arange(T) this is the classic one-positive-per-row in-batch softmax."""
    logits = users @ items.T / temperature  # (U, C)
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    if column is None:
        column = torch.arange(len(owner), device=logits.device)
    not_negative = torch.zeros_like(logits, dtype=torch.bool)
    not_negative[owner, column] = True  # a row's own positives
    if accidental is not None:
        not_negative = not_negative | accidental
    negatives = torch.logsumexp(logits.masked_fill(not_negative, float("-inf")), dim=1)  # (U,)
    positive = logits[owner, column]  # (T,)
    # -log softmax of the positive against {positive} ∪ negatives of its row
    return (torch.logaddexp(positive, negatives[owner]) - positive).mean()


class NegativeSampler:
    """Draws negatives among the items seen in training: uniformly, or in proportion to popularity**alpha."""

    def __init__(
        self, counts: np.ndarray, kind: Literal["uniform", "popularity"], alpha: float = 1.0, seed: int = 0
    ) -> None:
        # counts[i] is item i's training frequency (items are the caller's positions); unseen items never drawn.
        counts = np.asarray(counts, dtype=np.float64)
        weights = (counts > 0).astype(np.float64) if kind == "uniform" else np.power(counts, alpha)
        if weights.sum() <= 0:
            raise ValueError("no item has a positive training count to sample negatives from")
        self.kind = kind
        self.probs = torch.from_numpy(weights / weights.sum())
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> torch.Tensor:
        """(n,) item positions drawn with replacement."""
        return torch.multinomial(self.probs, n, replacement=True, generator=self.generator)
