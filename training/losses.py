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


def hard_triplet_loss(
    users: torch.Tensor,
    items: torch.Tensor,
    owner: torch.Tensor,
    column: torch.Tensor,
    margin: float,
    hardest: int,
    hits: tuple[torch.Tensor, torch.Tensor] | None = None,
    dead: torch.Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """The triplet hinge against each row's `hardest` negatives among the columns, the ones the current model
    scores highest (mined, not drawn: a random negative is usually already far below the positive and teaches
    nothing), with a margin scaled to the embeddings' norms: per positive t of row u and each hard negative v-,
    max(0, margin |u| |v+| - dot(u, v+) + dot(u, v-)), averaged over the negatives. A row's own items and
    accidental hits (`hits`) and `dead` columns are never its negatives. With a mining pool (`negative_pool`), the
    trainer passes every column outside it as dead, so that popular items, which fill the batch as positives, are
    not pushed down for being common. users: (U, D); items: (C, D); owner, column: (T,)."""
    scores = users @ items.T  # (U, C)
    minus_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    masked = scores.index_put((owner, column), minus_inf)
    if hits is not None:
        masked = masked.index_put(hits, minus_inf)
    if dead is not None:
        masked = masked.masked_fill(dead.unsqueeze(0), float("-inf"))
    hard = torch.topk(masked, min(hardest, masked.shape[1]), dim=1).values  # (U, h), -inf where too few
    positive = scores[owner, column]  # (T,)
    scale = (users.norm(dim=1)[owner] * items.norm(dim=1)[column]).detach()  # (T,)
    losses = F.relu((margin * scale - positive).unsqueeze(1) + hard[owner]).mean(dim=1)  # (T,)
    return losses.sum() if reduction == "sum" else losses.mean()


def bpr_loss(users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """mean of -log sigmoid(dot(u, v+) - dot(u, v-)), computed stably as softplus(-(difference))."""
    return F.softplus(-(score(users, positives) - score(users, negatives))).mean()


def softmax_loss(
    users: torch.Tensor,
    items: torch.Tensor,
    owner: torch.Tensor,
    log_q: torch.Tensor | None,
    temperature: float,
    hits: tuple[torch.Tensor, torch.Tensor] | None = None,
    column: torch.Tensor | None = None,
    dead: torch.Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Sampled softmax over the batch's item columns: positive t is the pair (row owner[t], column column[t]);
    for every other row that column is a sampled negative.

    logits[u, c] = dot(u, v_c) / temperature - log q(item_c)   (logQ correction, Yi et al. 2019: an item is among
    the columns in proportion to its popularity, so without it popular items would be over-penalised as
    negatives); each positive is a softmax of its logit against its row's negatives, where a row's negatives are
    the columns that are neither the row's own positives, nor an accidental hit (`hits`: (row, column) pairs whose
    column item is one of the row's items too), nor `dead` (columns no row may use, e.g. a second copy of an item
    gathered from another process).
    users: (U, D); items: (C, D); owner: (T,) row index; column: (T,) column index, default arange(T) (column t
    is positive t, C == T); log_q: (C,) or None; hits: two (H,) index tensors; dead: (C,) bool.
    With U == T, owner = arange(T) this is the classic one-positive-per-row in-batch softmax."""
    logits = users @ items.T / temperature  # (U, C)
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    if column is None:
        column = torch.arange(len(owner), device=logits.device)
    positive = logits[owner, column]  # (T,)
    minus_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    masked = logits.index_put((owner, column), minus_inf)  # a row's own positives
    if hits is not None:
        masked = masked.index_put(hits, minus_inf)
    if dead is not None:
        masked = masked.masked_fill(dead.unsqueeze(0), float("-inf"))
    negatives = torch.logsumexp(masked, dim=1)  # (U,)
    # -log softmax of the positive against {positive} ∪ negatives of its row
    losses = torch.logaddexp(positive, negatives[owner]) - positive
    return losses.sum() if reduction == "sum" else losses.mean()


class NegativeSampler:
    """Draws negatives among the items seen in training: uniformly, or in proportion to popularity**alpha. The
    random generator is the caller's, so a batch's draws are a function of the batch's own seed."""

    def __init__(self, counts: np.ndarray, kind: Literal["uniform", "popularity"], alpha: float = 1.0) -> None:
        # counts[i] is item i's training frequency (items are the caller's positions); unseen items never drawn.
        counts = np.asarray(counts, dtype=np.float64)
        weights = (counts > 0).astype(np.float64) if kind == "uniform" else np.power(counts, alpha)
        if weights.sum() <= 0:
            raise ValueError("no item has a positive training count to sample negatives from")
        self.kind = kind
        self.probs = weights / weights.sum()
        self._cdf = np.cumsum(self.probs)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n,) item positions drawn with replacement."""
        draws = np.searchsorted(self._cdf, rng.random(n) * self._cdf[-1], side="right")
        return np.minimum(draws, len(self._cdf) - 1).astype(np.int64)
