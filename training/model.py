"""The two towers and `score()`: the one model definition that training, evaluation, re-indexing and serving use.

`score(u, v) = dot(u, v)`. When `TowerConfig.normalize` is set both towers L2-normalise their outputs, so
the dot product is a cosine; the flag is recorded in the manifest and the towers apply it themselves, so
the index and the service never have to remember to.

Nothing here knows about losses or data files: the towers take the index arrays that
`training.features.encode_users` / `encode_items` produce.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.features import EncodedItems, EncodedUsers, FeatureDef, FeatureSpec, Vocabularies


@dataclass(frozen=True)
class TowerConfig:
    """Shapes of both towers; with the vocabulary sizes it rebuilds the model from a manifest alone."""

    dim: int = 64  # output embedding size D
    id_dim: int = 64  # user/item id and history item embeddings
    feature_dim: int = 16  # each categorical feature's embedding
    hidden: tuple[int, ...] = (256,)
    normalize: bool = True
    use_user_id: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TowerConfig:
        return cls(**{**data, "hidden": tuple(data["hidden"])})


def _mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def _pooled(rows: int, dim: int) -> nn.EmbeddingBag:
    """Mean of the embeddings of a (B, L) index array, index 0 (padding/unknown) left out; all-padding rows give
    zeros. EmbeddingBag does this in one fused kernel (several times faster than gather-mask-sum)."""
    return nn.EmbeddingBag(rows, dim, mode="mean", padding_idx=0)


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
        self.user_id = nn.Embedding(sizes["user_ids"], config.id_dim) if config.use_user_id else None
        self.history = _pooled(sizes["item_ids"], config.id_dim)
        self.features = FeatureEmbeddings(spec.user_features, sizes, config.feature_dim)
        in_dim = config.id_dim * (2 if config.use_user_id else 1) + self.features.out_dim
        self.mlp = _mlp(in_dim, config.hidden, config.dim)

    def forward(self, ids: torch.Tensor, features: Mapping[str, torch.Tensor], history: torch.Tensor) -> torch.Tensor:
        parts = [self.history(history), *self.features(features)]  # history: (B, L) -> (B, E)
        if self.user_id is not None:
            parts.append(self.user_id(ids))
        out = self.mlp(torch.cat(parts, dim=-1))  # (B, D)
        return F.normalize(out, dim=-1) if self.config.normalize else out


class ItemTower(nn.Module):
    """item id + item features -> (N, D)."""

    def __init__(self, spec: FeatureSpec, sizes: Mapping[str, int], config: TowerConfig) -> None:
        super().__init__()
        self.config = config
        self.item_id = nn.Embedding(sizes["item_ids"], config.id_dim)
        self.features = FeatureEmbeddings(spec.item_features, sizes, config.feature_dim)
        self.mlp = _mlp(config.id_dim + self.features.out_dim, config.hidden, config.dim)

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

    def users(self, batch: EncodedUsers) -> torch.Tensor:
        """(B, D) user embeddings for encoded users."""
        return self.user_tower(
            torch.from_numpy(batch.ids),
            {k: torch.from_numpy(v) for k, v in batch.features.items()},
            torch.from_numpy(batch.history),
        )

    def items(self, batch: EncodedItems) -> torch.Tensor:
        """(N, D) item embeddings for encoded items."""
        return self.item_tower(torch.from_numpy(batch.ids), {k: torch.from_numpy(v) for k, v in batch.features.items()})


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
        out[start:end] = model.items(part).numpy()
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
        out[start:end] = model.users(part).numpy()
    return out
