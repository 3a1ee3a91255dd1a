"""`NumpyUserTower`: the serving copy of a trained user tower, the same weights evaluated with numpy.

Built once per loaded model by `service.retriever` from `training.model.UserTower` (never re-declared: every
shape and flag is read off the module), so it cannot drift from the training definition; a test checks its
outputs equal the module's to float tolerance for every tower option. Why not the module itself: at batch 1
an eager PyTorch forward costs ~90 µs of dispatch (more inside a loaded server, and `embed_users` also walks
the module tree for `eval()` on every call) while the arithmetic is a few gathers and one small MLP; numpy
does it in a fraction of that, and its cost per request stays flat as batches grow.

Same arithmetic as the module, step by step:
- history: mean of the item-id embeddings of the non-padding (non-zero) entries; all-padding rows give zeros
  (`nn.EmbeddingBag(mode="mean", padding_idx=0)`);
- each user feature: single-valued -> its embedding row (index 0 = learned unknown); multi-valued -> mean of
  its non-padding values' rows, like history;
- user id embedding last (when the tower uses ids); concatenated in the module's order;
- the MLP (Linear, ReLU, ..., Linear), then L2-normalization with the same epsilon as `F.normalize` when the
  tower normalizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from training.features import EncodedUsers
from training.model import UserTower

# torch.nn.functional.normalize's default eps: the norm is clamped to at least this.
NORMALIZE_EPS = 1e-12


def _padding_zeroed(table: np.ndarray) -> np.ndarray:
    """A copy of a pooled table whose row 0 (padding, never part of a mean) is zero, so sums may include it."""
    table = table.copy()
    table[0] = 0.0
    return table


def _pooled_mean(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(B, E) mean of `table` rows over each row of (B, L) `index`, zeros left out; all-zero rows give zeros.

    `table` has a zero row 0 (`_padding_zeroed`), so the sum over a row's entries needs no mask: only the
    count does. Columns after the last non-zero one (the padding of short histories) are cut off first: a
    request's history is usually far shorter than the padded width, and this runs once per request."""
    used = np.flatnonzero(index.any(axis=0))  # columns holding any entry
    if used.size == 0:
        return np.zeros((index.shape[0], table.shape[1]), dtype=np.float32)
    index = index[:, : used[-1] + 1]
    counts = np.count_nonzero(index, axis=1)  # (B,)
    sums = table[index].sum(axis=1)  # (B, E)
    return sums / np.maximum(counts, 1)[:, None].astype(np.float32)


@dataclass(frozen=True)
class _Feature:
    name: str
    table: np.ndarray  # (V, E) float32
    multi: bool


class NumpyUserTower:
    """`UserTower.forward` on numpy copies of its weights; call with the `EncodedUsers` that
    `training.features.encode_users` produced. Immutable after construction (safe to share across threads)."""

    def __init__(self, tower: UserTower) -> None:
        def array(parameter: nn.Parameter | object) -> np.ndarray:
            assert isinstance(parameter, nn.Parameter)
            return np.ascontiguousarray(parameter.detach().cpu().numpy(), dtype=np.float32)

        self.history = _padding_zeroed(array(tower.history.weight))  # (I, E)
        self.user_id = array(tower.user_id.weight) if tower.user_id is not None else None  # (U, E)
        features = []
        for name, table in tower.features.tables.items():
            multi = tower.features.multi[name]  # multi-valued: pooled like history; single: row 0 = unknown
            weights = array(table.weight)
            features.append(_Feature(name, _padding_zeroed(weights) if multi else weights, multi))
        self.features = tuple(features)
        layers: list[tuple[np.ndarray, np.ndarray]] = []
        for module in tower.mlp:
            if isinstance(module, nn.Linear):
                layers.append((array(module.weight).T.copy(), array(module.bias)))  # (in, out), (out,)
            elif not isinstance(module, nn.ReLU):
                raise TypeError(f"NumpyUserTower knows Linear and ReLU layers, not {type(module).__name__}")
        if not layers:
            raise TypeError("the user tower's MLP has no Linear layer")
        self.layers = tuple(layers)
        self.normalize = bool(tower.config.normalize)
        self.dim = int(layers[-1][1].shape[0])

    def __call__(self, users: EncodedUsers) -> np.ndarray:
        """(B, D) float32 user embeddings."""
        parts = [_pooled_mean(self.history, users.history)]  # (B, E)
        for feature in self.features:
            index = users.features[feature.name]  # (B, width)
            parts.append(_pooled_mean(feature.table, index) if feature.multi else feature.table[index[:, 0]])
        if self.user_id is not None:
            parts.append(self.user_id[users.ids])
        x = np.concatenate(parts, axis=1)  # (B, in)
        last = len(self.layers) - 1
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight
            x += bias
            if i < last:
                np.maximum(x, 0.0, out=x)
        if self.normalize:
            norms = np.sqrt(np.einsum("bd,bd->b", x, x))  # (B,)
            x /= np.maximum(norms, NORMALIZE_EPS)[:, None]
        return x
