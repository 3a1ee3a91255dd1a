"""The two towers and `score()`: the one model definition that training, evaluation, re-indexing and serving use.

`score(u, v) = dot(u, v)`. When `TowerConfig.normalize` is set both towers L2-normalise their outputs, so
the dot product is a cosine; the flag is recorded in the manifest and the towers apply it themselves, so
the index and the service never have to remember to.

Every form of the model lives here, beside what it copies: the torch towers that training learns and evaluation,
re-indexing and the service's load checks run, and `NumpyUserTower`, the same user tower on numpy arrays that the
service runs per request. Nothing here knows about losses or data files: the towers take the index arrays that
`training.features.encode_users` / `encode_items` produce.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.features import EncodedItems, EncodedUsers, FeatureDef, FeatureSpec, Vocabularies


@dataclass(frozen=True)
class TowerConfig:
    """Shapes of both towers; with the vocabulary sizes it rebuilds the model from a manifest alone."""

    # 128: on the sparse, 17k-item citeulike-a, 64 dimensions cost validation NDCG@10 and 256 add little more for
    # twice the training time and index size; on MovieLens 100K the three are level (docs/loss.md).
    dim: int = field(default=128, metadata={"help": "output embedding size D"})
    id_dim: int = field(default=64, metadata={"help": "user/item id and history item embeddings (combine=mlp)"})
    feature_dim: int = field(default=16, metadata={"help": "each categorical feature's embedding (combine=mlp)"})
    hidden: tuple[int, ...] = field(default=(256,), metadata={"help": "MLP widths, comma-separated (combine=mlp)"})
    # Defaults are the recipe measured best (docs/loss.md, "What moved the numbers"): summed embeddings,
    # unnormalised inner product, no per-user id embedding (it memorises users instead of learning from their
    # history).
    normalize: bool = field(default=False, metadata={"help": "L2-normalise tower outputs (score = cosine)"})
    use_user_id: bool = field(default=False, metadata={"help": "a learned embedding per training user"})
    # Off by default: where users have histories, their features make the towers overfit (docs/loss.md); on, they
    # are what carries a user who has no history yet (the tuner searches both).
    use_user_features: bool = field(default=False, metadata={"help": "user categorical features in the user tower"})
    # The sum is a frozen Linear of stacked identities, so every consumer of the towers' Linear layers serves it
    # unchanged.
    combine: Literal["mlp", "sum"] = field(
        default="sum",
        metadata={
            "help": "sum: every part is a D-dim embedding and the tower outputs their sum; mlp: the parts "
            "concatenated through the MLP"
        },
    )
    # At torch's default N(0, 1) the initial dot products are large and noisy, and the early steps spend
    # themselves shrinking them (docs/loss.md).
    init_std: float = field(default=0.01, metadata={"help": "embedding tables start at N(0, init_std^2)"})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TowerConfig:
        """Every field must be recorded: a default filled in here could rebuild a different tower."""
        missing = sorted({f.name for f in fields(cls)} - data.keys())
        if missing:
            raise ValueError(f"tower config lacks {', '.join(missing)} (written by an older version)")
        return cls(**{**data, "hidden": tuple(data["hidden"])})


def _mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def _summing(parts: int, dim: int) -> nn.Sequential:
    """A frozen Linear that adds `parts` concatenated D-dim vectors: weight [I I ... I], bias 0."""
    linear = nn.Linear(parts * dim, dim)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(dim).repeat(1, parts))
        linear.bias.zero_()
    linear.requires_grad_(False)
    return nn.Sequential(linear)


def _pooled(rows: int, dim: int) -> nn.EmbeddingBag:
    """Mean of the embeddings of a (B, L) index array, index 0 (padding/unknown) left out; all-padding rows give
    zeros. EmbeddingBag does this in one fused kernel instead of a gather, a mask and a sum."""
    return nn.EmbeddingBag(rows, dim, mode="mean", padding_idx=0)


def _pool_packed(bag: nn.EmbeddingBag, index: torch.Tensor) -> torch.Tensor:
    """`bag(index)` for a (B, L) array that is mostly padding, given to the bag without its padding (values and
    offsets): the same means, but the backward pass sorts only the real entries (padding is most of a batch
    whose histories vary in length)."""
    real = index != 0
    counts = real.sum(dim=1)
    return bag(index[real], torch.cumsum(counts, 0) - counts)


class FeatureEmbeddings(nn.Module):
    """Embeds each categorical feature: single-valued ones directly (index 0 = learned unknown), multi-valued
    ones as the mean of their values (index 0 = padding, ignored)."""

    def __init__(self, features: tuple[FeatureDef, ...], sizes: Mapping[str, int], dim: int) -> None:
        super().__init__()
        self.multi = {f.name: f.kind == "multi" for f in features}
        self.tables = nn.ModuleDict(
            {
                f.name: _pooled(sizes[f.name], dim) if f.kind == "multi" else nn.Embedding(sizes[f.name], dim)
                for f in features
            }
        )
        self.out_dim = dim * len(features)

    def forward(self, features: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for name, table in self.tables.items():
            index = features[name]  # (B, width)
            out.append(table(index) if self.multi[name] else table(index[:, 0]))
        return out


class UserTower(nn.Module):
    """user id + user features + mean-pooled history -> (B, D)."""

    def __init__(self, spec: FeatureSpec, sizes: Mapping[str, int], config: TowerConfig) -> None:
        super().__init__()
        self.config = config
        summed = config.combine == "sum"
        id_dim, feature_dim = (config.dim, config.dim) if summed else (config.id_dim, config.feature_dim)
        self.user_id = nn.Embedding(sizes["user_ids"], id_dim) if config.use_user_id else None
        self.history = _pooled(sizes["item_ids"], id_dim)
        self.features = FeatureEmbeddings(spec.user_features if config.use_user_features else (), sizes, feature_dim)
        in_dim = id_dim * (2 if config.use_user_id else 1) + self.features.out_dim
        self.mlp = _summing(in_dim // id_dim, id_dim) if summed else _mlp(in_dim, config.hidden, config.dim)

    def forward(self, ids: torch.Tensor, features: Mapping[str, torch.Tensor], history: torch.Tensor) -> torch.Tensor:
        parts = [_pool_packed(self.history, history), *self.features(features)]  # history: (B, L) -> (B, E)
        if self.user_id is not None:
            parts.append(self.user_id(ids))
        out = self.mlp(torch.cat(parts, dim=-1))  # (B, D)
        return F.normalize(out, dim=-1) if self.config.normalize else out


class ItemTower(nn.Module):
    """item id + item features -> (N, D)."""

    def __init__(self, spec: FeatureSpec, sizes: Mapping[str, int], config: TowerConfig) -> None:
        super().__init__()
        self.config = config
        summed = config.combine == "sum"
        id_dim, feature_dim = (config.dim, config.dim) if summed else (config.id_dim, config.feature_dim)
        self.item_id = nn.Embedding(sizes["item_ids"], id_dim)
        self.features = FeatureEmbeddings(spec.item_features, sizes, feature_dim)
        in_dim = id_dim + self.features.out_dim
        self.mlp = _summing(in_dim // id_dim, id_dim) if summed else _mlp(in_dim, config.hidden, config.dim)

    def forward(self, ids: torch.Tensor, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = self.mlp(torch.cat([self.item_id(ids), *self.features(features)], dim=-1))  # (N, D)
        return F.normalize(out, dim=-1) if self.config.normalize else out


def score(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """The model's score: inner product of matching rows, (B, D) x (B, D) -> (B,)."""
    return (users * items).sum(-1)


class TwoTower(nn.Module):
    """Both towers plus what rebuilds them (spec, vocabularies, config)."""

    def __init__(self, spec: FeatureSpec, vocabs: Vocabularies, config: TowerConfig | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.vocabs = vocabs
        self.config = config or TowerConfig()
        sizes = vocabs.sizes()
        self.user_tower = UserTower(spec, sizes, self.config)
        self.item_tower = ItemTower(spec, sizes, self.config)
        for module in self.modules():
            if isinstance(module, nn.Embedding | nn.EmbeddingBag):
                nn.init.normal_(module.weight, std=self.config.init_std)

    @property
    def device(self) -> torch.device:
        return self.item_tower.item_id.weight.device

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def users(self, batch: EncodedUsers) -> torch.Tensor:
        """(B, D) user embeddings for encoded users (on the model's device)."""
        return self.user_tower(
            self._tensor(batch.ids),
            {k: self._tensor(v) for k, v in batch.features.items()},
            self._tensor(batch.history),
        )

    def items(self, batch: EncodedItems) -> torch.Tensor:
        """(N, D) item embeddings for encoded items (on the model's device)."""
        return self.item_tower(self._tensor(batch.ids), {k: self._tensor(v) for k, v in batch.features.items()})


@torch.inference_mode()
def embed_items(model: TwoTower, items: EncodedItems, chunk: int = 65536, progress: bool = False) -> np.ndarray:
    """(N, D) float32 item embeddings, computed in bounded-memory chunks."""
    from tqdm.auto import tqdm

    model.eval()
    out = np.empty((len(items), model.config.dim), dtype=np.float32)
    starts = range(0, len(items), chunk)
    for start in tqdm(starts, desc="embed items", unit="chunk", disable=not progress):
        end = min(start + chunk, len(items))
        part = EncodedItems(items.ids[start:end], {k: v[start:end] for k, v in items.features.items()})
        out[start:end] = model.items(part).float().cpu().numpy()
    return out


@torch.inference_mode()
def embed_users(model: TwoTower, users: EncodedUsers, chunk: int = 8192) -> np.ndarray:
    """(B, D) float32 user embeddings."""
    model.eval()
    out = np.empty((len(users), model.config.dim), dtype=np.float32)
    for start in range(0, len(users), chunk):
        end = min(start + chunk, len(users))
        part = EncodedUsers(
            users.ids[start:end],
            {k: v[start:end] for k, v in users.features.items()},
            users.history[start:end],
        )
        out[start:end] = model.users(part).float().cpu().numpy()
    return out


# --------------------------------------------------------------------------- the serving copy of the user tower

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
    """`UserTower.forward` on numpy copies of its weights: the user tower as the service runs it per request.

    Built from a trained `UserTower` (every shape and flag read off the module, never re-declared), called with
    the `EncodedUsers` that `training.features.encode_users` produced; `tests/test_model.py` checks it equals the
    module for every tower option. Why a copy: per request the arithmetic is a few gathers and one small MLP,
    and an eager PyTorch forward spends far longer dispatching than computing that (docs/performance.md); numpy's
    cost stays flat as batches grow. Same arithmetic as the module, step by step:

    - history: mean of the item-id embeddings of the non-padding (non-zero) entries; all-padding rows give zeros
      (`nn.EmbeddingBag(mode="mean", padding_idx=0)`);
    - each user feature: single-valued -> its embedding row (index 0 = learned unknown); multi-valued -> mean of
      its non-padding values' rows, like history;
    - user id embedding last (when the tower uses ids); concatenated in the module's order;
    - the MLP (Linear, ReLU, ..., Linear), then L2-normalization with the same epsilon as `F.normalize` when the
      tower normalizes.

    Immutable after construction (safe to share across threads)."""

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
