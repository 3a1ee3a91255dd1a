"""Warm start: a new model begins from a previous model's weights for everything the two share.

A retrain on grown data (`twotower train --events`, `twotower retrain`) builds new vocabularies, so an embedding
row's position means another id than before. Each table keyed by a vocabulary (user ids, item ids in the item
tower and in the history pool, each feature's values) is copied row by row for the tokens both vocabularies hold,
the unknown/padding row included; new tokens keep their fresh initialisation. Every other parameter (the towers'
layers) is copied where its shape is unchanged. Towers of another shape (a different `dim`, `combine`, ...) share
nothing: refused, since a silent partial copy would be a cold start under another name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training.features import Vocabulary
from training.model import TwoTower


@dataclass
class WarmStart:
    model_version: str
    rows_copied: int  # embedding rows taken from the previous model
    rows_new: int  # embedding rows of tokens it did not know (freshly initialised)
    tensors_copied: int  # other parameters taken whole

    def as_dict(self) -> dict[str, object]:
        return {
            "model_version": self.model_version,
            "rows_copied": self.rows_copied,
            "rows_new": self.rows_new,
            "tensors_copied": self.tensors_copied,
        }


def _vocabulary_of(model: TwoTower, name: str) -> Vocabulary | None:
    """The vocabulary whose tokens index the rows of parameter `name` (None: not an embedding table)."""
    vocabs = model.vocabs
    if name in ("user_tower.user_id.weight",):
        return vocabs.user_ids
    if name in ("user_tower.history.weight", "item_tower.item_id.weight"):
        return vocabs.item_ids
    parts = name.split(".")
    if len(parts) == 5 and parts[1:3] == ["features", "tables"] and parts[4] == "weight":
        return vocabs.features.get(parts[3])
    return None


def warm_start(model: TwoTower, previous: TwoTower, previous_version: str) -> WarmStart:
    """Copy into `model` what `previous` knows (module docstring); returns what was copied."""
    if model.config.to_dict() != previous.config.to_dict():
        raise ValueError(
            f"cannot warm-start from model {previous_version}: its towers are configured differently "
            f"({previous.config.to_dict()} vs {model.config.to_dict()}); train it cold or with that recipe"
        )
    old_state = previous.state_dict()
    new_state = model.state_dict()
    copied = new_rows = tensors = 0
    with torch.no_grad():
        for name, target in new_state.items():
            source = old_state.get(name)
            if source is None:
                continue
            vocab, old_vocab = _vocabulary_of(model, name), _vocabulary_of(previous, name)
            if vocab is not None and old_vocab is not None:
                positions = np.array([old_vocab.lookup(t) for t in vocab.tokens], dtype=np.int64)
                known = np.flatnonzero(positions > 0)
                rows = torch.from_numpy(np.concatenate([[0], known + 1]))  # row 0: unknown/padding
                target[rows] = source[torch.from_numpy(np.concatenate([[0], positions[known]]))].to(target)
                copied += len(rows)
                new_rows += len(vocab.tokens) - len(known)
            elif source.shape == target.shape:
                target.copy_(source)
                tensors += 1
    model.load_state_dict(new_state)
    return WarmStart(previous_version, copied, new_rows, tensors)
