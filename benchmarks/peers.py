"""The models the two-tower is measured against, on the same split and protocol: EASE and its rank-D truncation,
and implicit ALS. Used by `benchmarks/quality.py`; none of this is part of the product.

EASE (Steck 2019, *Embarrassingly shallow autoencoders*) is the item-item matrix B minimising ||X - XB||² + λ||B||²
with diag(B) = 0: B = I - P diag(1/diag(P)), P = (XᵀX + λI)⁻¹, and a user's scores are x_u B. It is solved in
whichever space is smaller, exactly:
- items (I <= U): P inverted directly (I x I);
- users (U < I, e.g. 5.5k users x 17k items): by the push-through identity X P = K X with K = (XXᵀ + λI)⁻¹ (U x U),
  and diag(P) = (1 - colsum(X ⊙ KX)) / λ, so no I x I matrix is ever formed.
Scores are computed directly (`Protocol.score_dense`), not by an identity matrix through an index. The rank-D row is
B's truncated SVD B ≈ (U_D S_D) V_Dᵀ found by a randomized range finder on products with B (never B itself): user
vectors x_u U_D S_D and item vectors V_D, an inner-product model of the two-tower's shape, scored by the same exact
index as the two-tower.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from training.dataset import Interactions, split_random
from training.evaluate import Protocol, RankingMetrics
from training.train import VALIDATION_SEED_OFFSET

log = logging.getLogger("benchmarks.peers")

EASE_LAMBDAS = (50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0)
ALS_GRID = {"factors": (32, 64, 128), "regularization": (0.01, 0.1, 1.0, 10.0), "alpha": (1.0, 2.0, 5.0, 10.0)}
# How a range is extended past its edge, and how many rounds of that at most.
ALS_STEPS = {"factors": 2, "regularization": 10, "alpha": 2}
ALS_EXTENSIONS = 6
# More factors want at least as much regularisation (fewer, at most as much): a new number of factors is tried with
# each regularisation on that side of the best one, not only with the best, so the two can move together.
ALS_CAPACITY = ("factors", "regularization")
VAL_FRACTION = 0.1  # the validation slice, carved from the training rows exactly as the two-tower's fit does it


def matrix(rows: Interactions) -> sp.csr_matrix:
    """(all users x all catalog items) 0/1 matrix of `rows` (users by code, items by catalog position)."""
    shape = (len(rows.user_ids), len(rows.item_ids))
    data = np.ones(len(rows), dtype=np.float64)
    x = sp.csr_matrix((data, (rows.user, rows.item)), shape=shape)
    x.data[:] = 1.0
    return x


def validation_slice(train: Interactions, seed: int) -> tuple[Interactions, Interactions]:
    return split_random(train, VAL_FRACTION, seed=seed + VALIDATION_SEED_OFFSET)


class Ease:
    """EASE fitted on the 0/1 matrix `x` (users x items) with regularization `lam`; see the module docstring."""

    def __init__(self, x: sp.csr_matrix, lam: float) -> None:
        self.x, self.lam = x.tocsr(), lam
        users, items = x.shape
        self.item_space = items <= users
        if self.item_space:
            gram = (x.T @ x).toarray()
            gram[np.diag_indices_from(gram)] += lam
            self.p = np.linalg.inv(gram)  # (I, I)
            self.d = np.diag(self.p).copy()
        else:
            outer = (x @ x.T).toarray()
            outer[np.diag_indices_from(outer)] += lam
            self.k = np.linalg.inv(outer)  # (U, U)
            self.kx = np.asarray((x.T @ self.k).T)  # (U, I) = X P
            self.d = (1.0 - np.asarray(x.multiply(self.kx).sum(axis=0)).ravel()) / lam

    def scores(self, users: np.ndarray) -> np.ndarray:
        """(len(users), I) scores x_u B = x_u - (x_u P) / diag(P) of the given user codes."""
        rows = self.x[users]
        xp = rows @ self.p if self.item_space else self.kx[users]
        return np.asarray(rows.toarray() - xp / self.d)

    def _p_times(self, m: np.ndarray) -> np.ndarray:
        if self.item_space:
            return self.p @ m
        return (m - self.x.T @ (self.k @ (self.x @ m))) / self.lam  # P = (I - Xᵀ K X) / λ

    def b_times(self, m: np.ndarray) -> np.ndarray:
        """B @ m for an (I, r) matrix m: m - P (m / diag(P))."""
        return m - self._p_times(m / self.d[:, None])

    def bt_times(self, m: np.ndarray) -> np.ndarray:
        """Bᵀ @ m: m - (P m) / diag(P) (P is symmetric)."""
        return m - self._p_times(m) / self.d[:, None]

    def factors(self, rank: int, seed: int, oversample: int = 10, power: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """(user-side map (I, rank) = U_D S_D, item vectors (I, rank) = V_D) of B's rank-`rank` truncated SVD, by a
        randomized range finder (Halko et al. 2011) with `power` iterations."""
        rng = np.random.default_rng(seed)
        y = self.b_times(rng.standard_normal((self.x.shape[1], rank + oversample)))
        for _ in range(power):
            y, _ = np.linalg.qr(y)
            y, _ = np.linalg.qr(self.bt_times(y))
            y = self.b_times(y)
        q, _ = np.linalg.qr(y)
        left, singular, right_t = np.linalg.svd(self.bt_times(q).T, full_matrices=False)  # of Qᵀ B
        u = q @ left[:, :rank]
        return u * singular[:rank], right_t[:rank].T


def ease(
    train: Interactions, test: Interactions, seed: int, rank: int, protocol: Protocol
) -> tuple[RankingMetrics, RankingMetrics, dict[str, Any]]:
    """EASE and its rank-`rank` truncation, λ tuned for each on the validation slice over `EASE_LAMBDAS` (the grid
    is widened while the best value lies at its edge), both refit on all training rows: (full-rank metrics,
    rank-`rank` metrics, the chosen λs and the validation NDCG@10 of each)."""
    fit_rows, val_rows = validation_slice(train, seed)
    validation = Protocol(fit_rows, val_rows)
    x_fit = matrix(fit_rows)
    scored: dict[float, tuple[float, float]] = {}

    def evaluate_lambda(lam: float) -> tuple[float, float]:
        if lam not in scored:
            model = Ease(x_fit, lam)
            full = validation.score_dense(lambda rows: model.scores(validation.users[rows])).ndcg
            scored[lam] = (full, _truncated(model, x_fit, validation, rank, seed).ndcg)
        return scored[lam]

    picks = []
    for which in (0, 1):
        grid = list(EASE_LAMBDAS)
        while True:
            best = max(grid, key=lambda lam: evaluate_lambda(lam)[which])
            if best == grid[0] and best / 2 >= 1:
                grid.insert(0, best / 2)
            elif best == grid[-1]:
                grid.append(best * 2)
            else:
                break
        picks.append(best)
    log.info("EASE seed %d: λ %g (full rank), λ %g (rank %d); validation %s", seed, *picks, rank, scored)
    final = {lam: Ease(matrix(train), lam) for lam in set(picks)}  # usually one λ: solved once
    full_model, rank_model = final[picks[0]], final[picks[1]]
    full = protocol.score_dense(lambda rows: full_model.scores(protocol.users[rows]))
    truncated = _truncated(rank_model, matrix(train), protocol, rank, seed)
    return full, truncated, {"lambda": picks[0], "lambda_rank": picks[1], "validation": scored}


def _truncated(model: Ease, x: sp.csr_matrix, protocol: Protocol, rank: int, seed: int) -> RankingMetrics:
    user_map, item_vectors = model.factors(rank, seed)
    users = np.asarray(x[protocol.users] @ user_map, dtype=np.float32)  # (U, rank)
    return protocol.score(users, item_vectors.astype(np.float32))


def extended_grid_search(
    score: Callable[[dict[str, Any]], float],
    grid: Mapping[str, tuple[Any, ...]],
    steps: Mapping[str, float],
    rounds: int,
    capacity: tuple[str, str] | None = None,
) -> tuple[dict[str, Any], float, int]:
    """The setting with the highest `score` over the product `grid` (ranges ascending), then, for up to `rounds`
    rounds, each range whose best value lies at its edge extended one step (`steps`: the factor) past it, since a
    best value at the edge of its range is no optimum. A new value is tried with the other settings at their best;
    a new value of `capacity[0]` also with each value of `capacity[1]` on the side of its best that the change of
    capacity wants (see ALS_CAPACITY). Returns (best setting, its score, settings tried)."""
    scored: dict[tuple[tuple[str, Any], ...], float] = {}

    def score_once(params: dict[str, Any]) -> None:
        key = tuple(params.items())
        if key not in scored:
            scored[key] = score(params)

    def best() -> dict[str, Any]:
        return dict(max(scored.items(), key=lambda entry: entry[1])[0])

    for values in itertools.product(*grid.values()):
        score_once(dict(zip(grid, values, strict=True)))
    ranges = {name: list(choices) for name, choices in grid.items()}
    for _ in range(rounds):
        at = best()
        edges = [name for name in steps if at[name] in (ranges[name][0], ranges[name][-1])]
        if not edges:
            break
        for name in edges:
            up = at[name] == ranges[name][-1]
            value = type(at[name])(at[name] * steps[name] if up else at[name] / steps[name])
            ranges[name] = [*ranges[name], value] if up else [value, *ranges[name]]
            partners: list[dict[str, Any]] = [{}]
            if capacity is not None and name == capacity[0]:
                follower = capacity[1]
                partners = [{follower: v} for v in ranges[follower] if (v >= at[follower] if up else v <= at[follower])]
            for partner in partners:
                score_once({**at, name: value, **partner})
    found = best()
    return found, scored[tuple(found.items())], len(scored)


def implicit_als(
    train: Interactions, test: Interactions, seed: int, protocol: Protocol
) -> tuple[RankingMetrics, dict[str, Any]]:
    """implicit's ALS, grid-tuned on the validation slice, refit on all training rows."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    def fit_score(rows: Interactions, scoring: Protocol, params: dict[str, Any]) -> RankingMetrics:
        model = AlternatingLeastSquares(**params, iterations=15, random_state=seed)
        model.fit(matrix(rows).astype(np.float32), show_progress=False)
        return scoring.score(model.user_factors[scoring.users], model.item_factors)

    fit_rows, val_rows = validation_slice(train, seed)
    validation = Protocol(fit_rows, val_rows)
    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, single-threaded BLAS
        best, best_ndcg, tried = extended_grid_search(
            lambda params: fit_score(fit_rows, validation, params).ndcg,
            ALS_GRID,
            ALS_STEPS,
            ALS_EXTENSIONS,
            ALS_CAPACITY,
        )
        log.info("ALS seed %d: best validation NDCG@10 %.4f with %s (%d settings tried)", seed, best_ndcg, best, tried)
        return fit_score(train, protocol, best), {**best, "val_ndcg@10": best_ndcg, "tried": tried}
