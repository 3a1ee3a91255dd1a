"""training.losses against hand-computed values: the hinge and its margin, BPR, the sampled softmax with logQ and
accidental-hit masks, the direction of a gradient step, and the negative samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.losses import NegativeSampler, bpr_loss, hard_triplet_loss, softmax_loss, triplet_loss
from training.model import score


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_triplet_loss_matches_hand_computed_hinge() -> None:
    users = t([1.0, 0.0], [1.0, 0.0])
    positives = t([0.5, 0.0], [2.0, 0.0])
    negatives = t([0.2, 0.0], [0.0, 0.0])
    # triplet 1: max(0, 0.5 - 0.5 + 0.2) = 0.2; triplet 2 is ranked right by more than the margin: 0
    assert triplet_loss(users, positives, negatives, margin=0.5).item() == pytest.approx(0.1)


def test_triplet_loss_without_margin_accepts_a_tie_but_with_margin_does_not() -> None:
    users, tie = t([1.0, 1.0]), t([0.5, 0.5])
    assert triplet_loss(users, tie, tie, margin=0.0).item() == 0.0
    assert triplet_loss(users, tie, tie, margin=0.3).item() == pytest.approx(0.3)


def test_hard_triplet_loss_holds_each_positive_against_its_rows_highest_scoring_allowed_negatives() -> None:
    users = t([1.0, 0.0], [0.0, 2.0])
    items = t([1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8])  # unit vectors: |u| |v+| is |u|
    owner, column = torch.tensor([0, 1]), torch.tensor([0, 1])  # row 0 owns column 0, row 1 column 1
    # Row 0 scores columns (1, 0, 0.8, 0.6); its hardest two negatives are 0.8 and 0.6:
    #   mean(max(0, 0.5 * 1 - 1 + 0.8), max(0, 0.5 - 1 + 0.6)) = mean(0.3, 0.1) = 0.2.
    # Row 1 scores (0, 2, 1.2, 1.6); hardest 1.6 and 1.2 against margin 0.5 * 2 = 1:
    #   mean(1 - 2 + 1.6, 1 - 2 + 1.2) = mean(0.6, 0.2) = 0.4.
    loss = hard_triplet_loss(users, items, owner, column, margin=0.5, hardest=2)
    assert loss.item() == pytest.approx((0.2 + 0.4) / 2)
    # Columns outside the mining pool are never negatives: with only column 3 allowed, row 0 has 0.6 and -inf.
    dead = torch.tensor([True, True, True, False])
    pooled = hard_triplet_loss(users, items, owner, column, margin=0.5, hardest=2, dead=dead)
    row0 = (0.1 + 0.0) / 2  # a missing second negative (-inf) costs nothing
    row1 = (1 - 2 + 1.6 + 0.0) / 2
    assert pooled.item() == pytest.approx((row0 + row1) / 2)


def test_bpr_loss_matches_hand_computed_value() -> None:
    users, positives, negatives = t([1.0, 2.0]), t([0.5, 0.25]), t([0.1, 0.0])  # dots 1.0 and 0.1
    expected = -math.log(1.0 / (1.0 + math.exp(-0.9)))
    assert bpr_loss(users, positives, negatives).item() == pytest.approx(expected, rel=1e-6)


def test_softmax_loss_matches_hand_computed_value_with_logq() -> None:
    users, items = t([1.0, 0.0], [0.0, 1.0]), t([1.0, 0.0], [0.0, 1.0])
    log_q = torch.log(torch.tensor([0.5, 0.25]))
    # logits = dots / 0.5 - log q(column): row 0 -> [2 - ln .5, 0 - ln .25], row 1 -> [0 - ln .5, 2 - ln .25]
    rows = [[2 - math.log(0.5), -math.log(0.25)], [-math.log(0.5), 2 - math.log(0.25)]]
    expected = sum(-r[i] + math.log(sum(math.exp(x) for x in r)) for i, r in enumerate(rows)) / 2
    got = softmax_loss(users, items, torch.arange(2), log_q, temperature=0.5).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_softmax_loss_masks_accidental_hits() -> None:
    users = t([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    items = t([1.0, 0.0], [0.0, 1.0], [1.0, 0.0])
    ids = torch.tensor([7, 8, 7])  # rows 0 and 2 share a positive: neither is the other's negative
    accidental = torch.nonzero(ids.unsqueeze(0) == ids.unsqueeze(1), as_tuple=True)
    got = softmax_loss(users, items, torch.arange(3), None, temperature=1.0, hits=accidental)
    logits = users @ items.T
    row0 = -logits[0, 0] + torch.logsumexp(logits[0, [0, 1]], 0)
    row1 = -logits[1, 1] + torch.logsumexp(logits[1], 0)
    row2 = -logits[2, 2] + torch.logsumexp(logits[2, [1, 2]], 0)
    assert got.item() == pytest.approx(((row0 + row1 + row2) / 3).item(), rel=1e-6)


def test_softmax_loss_never_uses_a_users_own_positives_as_its_negatives() -> None:
    users = t([1.0, 0.0], [0.0, 1.0])
    items = t([1.0, 0.0], [0.5, 0.5], [0.0, 1.0])
    owner = torch.tensor([0, 0, 1])  # user 0 owns columns 0 and 1, user 1 owns column 2
    logits = users @ items.T
    # user 0's only negative is column 2; user 1's negatives are columns 0 and 1
    pairs = [
        -logits[0, 0] + torch.logsumexp(logits[0, [0, 2]], 0),
        -logits[0, 1] + torch.logsumexp(logits[0, [1, 2]], 0),
        -logits[1, 2] + torch.logsumexp(logits[1, [0, 1, 2]], 0),
    ]
    got = softmax_loss(users, items, owner, None, temperature=1.0)
    assert got.item() == pytest.approx((sum(pairs) / 3).item(), rel=1e-6)


@pytest.mark.parametrize("loss", ["triplet", "bpr", "softmax"])
def test_gradient_step_moves_positives_up_and_negatives_down(loss: str) -> None:
    generator = torch.Generator().manual_seed(0)
    users = torch.randn(8, 4, generator=generator, requires_grad=True)
    positives = torch.randn(8, 4, generator=generator, requires_grad=True)
    negatives = torch.randn(8, 4, generator=generator, requires_grad=True)

    def value() -> torch.Tensor:
        if loss == "triplet":
            return triplet_loss(users, positives, negatives, margin=10.0)  # large margin: every triplet active
        if loss == "bpr":
            return bpr_loss(users, positives, negatives)
        # in-batch: row i's negatives are the other rows' positives
        return softmax_loss(users, positives, torch.arange(8), None, temperature=1.0)

    def gap() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            pos = score(users, positives)
            neg = score(users, negatives) if loss != "softmax" else (users @ positives.T).fill_diagonal_(0).sum(1) / 7
            return pos, neg

    pos_before, neg_before = gap()
    value().backward()
    with torch.no_grad():
        for p in (users, positives, negatives):
            if p.grad is not None:  # softmax samples no negatives of its own
                p -= 0.01 * p.grad
    pos_after, neg_after = gap()
    assert (pos_after > pos_before).all()
    assert (neg_after < neg_before).all()


def test_popularity_sampler_draws_in_proportion_to_counts_and_never_unseen_items() -> None:
    sampler = NegativeSampler(np.array([0.0, 1.0, 3.0]), "popularity")
    draws = np.bincount(sampler.sample(40_000, np.random.default_rng(0)), minlength=3)
    assert draws[0] == 0
    assert draws[2] / draws[1] == pytest.approx(3.0, rel=0.1)


def test_uniform_sampler_ignores_popularity() -> None:
    sampler = NegativeSampler(np.array([0.0, 1.0, 30.0]), "uniform")
    draws = np.bincount(sampler.sample(40_000, np.random.default_rng(0)), minlength=3)
    assert draws[0] == 0
    assert draws[2] / draws[1] == pytest.approx(1.0, rel=0.1)
