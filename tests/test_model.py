"""The serving user tower (numpy copy of the weights) equals the training module's outputs to float tolerance."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from training.artifacts import LoadedModel
from training.features import EncodedUsers, FeatureDef, FeatureSpec, build_vocabularies, encode_users
from training.model import NumpyUserTower, TowerConfig, TwoTower, embed_users

SPEC = FeatureSpec(
    user_features=(FeatureDef("segment"), FeatureDef("tags", "multi", max_values=3)),
    item_features=(FeatureDef("genres", "multi", max_values=2),),
    max_history=12,
)


def _model(config: TowerConfig, seed: int) -> TwoTower:
    torch.manual_seed(seed)
    vocabs = build_vocabularies(
        SPEC,
        [f"u{i}" for i in range(30)],
        [f"i{i}" for i in range(50)],
        {"segment": [f"s{i % 4}" for i in range(30)], "tags": [[f"t{i % 7}", f"t{i % 5}"] for i in range(30)]},
        {"genres": [[f"g{i % 3}"] for i in range(50)]},
    )
    model = TwoTower(SPEC, vocabs, config)
    with torch.no_grad():  # trained-looking weights: not the tiny init, so differences would show
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    return model.eval()


def _users(model: TwoTower, n: int, seed: int) -> EncodedUsers:
    rng = np.random.default_rng(seed)
    ids = [f"u{i}" if rng.random() < 0.7 else "stranger" for i in rng.integers(0, 30, n)]  # some unknown ids
    segments = [None if rng.random() < 0.2 else f"s{rng.integers(0, 6)}" for _ in range(n)]  # unknown + missing
    tags = [[f"t{t}" for t in rng.integers(0, 9, rng.integers(0, 4))] for _ in range(n)]  # empty lists too
    histories = [[f"i{i}" for i in rng.integers(0, 60, rng.integers(0, 20))] for _ in range(n)]  # OOV, > max
    histories[0] = []  # an all-padding row: zeros, as EmbeddingBag gives
    return encode_users(SPEC, model.vocabs, ids, {"segment": segments, "tags": tags}, histories)


def _with_features(**settings: Any) -> TowerConfig:
    return TowerConfig(use_user_features=True, **settings)  # the user tower's feature path is under test too


@pytest.mark.parametrize(
    "config",
    [
        _with_features(dim=16, id_dim=8, feature_dim=4, hidden=(32,), normalize=True, use_user_id=True, combine="mlp"),
        _with_features(
            dim=16, id_dim=8, feature_dim=4, hidden=(32, 24), normalize=False, use_user_id=True, combine="mlp"
        ),
        _with_features(dim=8, id_dim=8, feature_dim=4, hidden=(), normalize=True, use_user_id=False, combine="mlp"),
        _with_features(dim=8, id_dim=8, feature_dim=4, hidden=(16,), normalize=False, use_user_id=False, combine="mlp"),
        _with_features(dim=8, normalize=False, use_user_id=True, combine="sum"),
        _with_features(dim=8, normalize=True, use_user_id=False, combine="sum"),
    ],
    ids=[
        "mlp-normalized",
        "mlp-two-hidden-raw",
        "mlp-no-hidden-no-id",
        "mlp-raw-no-id",
        "sum-raw-id",
        "sum-normalized",
    ],
)
def test_numpy_user_tower_equals_the_training_module(config: TowerConfig) -> None:
    model = _model(config, seed=1)
    users = _users(model, 64, seed=2)
    expected = embed_users(model, users)  # (B, D)
    actual = NumpyUserTower(model.user_tower)(users)
    assert actual.shape == expected.shape and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    for row in range(3):  # batch 1 (the serving case) as well as the whole batch
        one = NumpyUserTower(model.user_tower)(_slice(users, row))
        np.testing.assert_allclose(one[0], expected[row], rtol=1e-5, atol=1e-6)


def test_numpy_user_tower_equals_the_trained_session_model(trained_model: LoadedModel) -> None:
    model = trained_model.model
    users = trained_model.users()
    names = [f.name for f in model.spec.user_features]
    encoded = encode_users(
        model.spec,
        model.vocabs,
        [str(u) for u in users.index],
        {name: users[name].tolist() for name in names},
        [[str(i) for i in h] for h in users["history"]],
    )
    np.testing.assert_allclose(
        NumpyUserTower(model.user_tower)(encoded), embed_users(model, encoded), rtol=1e-5, atol=1e-6
    )


def _slice(users: EncodedUsers, row: int) -> EncodedUsers:
    return EncodedUsers(
        users.ids[row : row + 1],
        {name: values[row : row + 1] for name, values in users.features.items()},
        users.history[row : row + 1],
    )
