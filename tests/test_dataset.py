"""`training.dataset`: the synthetic generator, the split, histories and the users table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from training.dataset import build_dataset, histories, make_interactions, split_random, synthetic, users_table
from training.features import FeatureDef, FeatureSpec


def test_synthetic_generator_is_deterministic_for_a_seed() -> None:
    a, b = synthetic(100, 60, 5, 10, seed=3), synthetic(100, 60, 5, 10, seed=3)
    pd.testing.assert_frame_equal(a.interactions.frame(), b.interactions.frame())
    pd.testing.assert_frame_equal(a.users, b.users)
    pd.testing.assert_frame_equal(a.items, b.items)
    assert not synthetic(100, 60, 5, 10, seed=4).interactions.frame().equals(a.interactions.frame())


def test_the_split_is_one_seeded_uniform_partition_of_the_rows() -> None:
    rows = synthetic(200, 80, 4, 10, seed=1).interactions
    rest, held = split_random(rows, 0.2, seed=5)
    assert len(held) == round(len(rows) * 0.2) and len(rest) + len(held) == len(rows)
    pairs = lambda part: set(zip(part.user.tolist(), part.item.tolist(), strict=True))  # noqa: E731
    assert not pairs(rest) & pairs(held) and pairs(rest) | pairs(held) == pairs(rows)
    again, _ = split_random(rows, 0.2, seed=5)
    pd.testing.assert_frame_equal(rest.frame(), again.frame())
    assert not split_random(rows, 0.2, seed=6)[1].frame().equals(held.frame())
    assert (np.diff(rest.timestamp) >= 0).all()  # each part keeps the rows' time order


def test_histories_are_newest_first_and_the_users_table_carries_them() -> None:
    dataset = synthetic(30, 20, 2, 5, seed=2)
    rows = dataset.interactions
    hist = histories(rows)
    frame = rows.frame()
    user = frame.user_id.iloc[0]
    mine = frame[frame.user_id == user].sort_values("timestamp", ascending=False, kind="stable")
    assert hist[user] == list(mine.item_id)
    table = users_table(dataset, rows).to_pandas().set_index("user_id")
    assert list(table.index) == sorted(hist) and list(table.loc[user, "history"]) == hist[user]
    assert table.loc[user, "segment"] == dataset.users.loc[user, "segment"]


def test_rows_are_integer_codes_in_time_order_and_the_latest_duplicate_stays() -> None:
    rows = make_interactions(["b", "a", "b", "a"], ["x", "y", "x", "z"], [30, 10, 20, 40], [1.0, 2.0, 3.0, 4.0])
    assert rows.user.dtype == np.int32 and rows.item.dtype == np.int32 and rows.timestamp.dtype == np.int64
    assert rows.user_ids.tolist() == ["a", "b"]  # code order is id order
    frame = rows.frame()
    assert frame.timestamp.tolist() == [10, 30, 40]  # ("b", "x") at 20 was superseded by the one at 30
    assert frame.user_id.tolist() == ["a", "b", "a"] and frame.weight.tolist() == [2.0, 1.0, 4.0]
    grouped = rows.by_user()
    assert [rows.item_ids[grouped.of(i)].tolist() for i in range(len(grouped))] == [["z", "y"], ["x"]]


def test_a_dataset_covers_every_id_and_codes_items_in_catalog_order() -> None:
    rows = make_interactions(["u1", "u2", "u2"], ["i9", "i1", "i2"], [1, 2, 3])
    items = pd.DataFrame({"genres": [["g"], ["h"], ["k"]]}, index=pd.Index(["i1", "i2", "i3"], name="item_id"))
    spec = FeatureSpec(item_features=(FeatureDef("genres", "multi"),))
    dataset = build_dataset("d", rows, None, items, spec)
    assert dataset.items.index.tolist() == ["i1", "i2", "i3", "i9"]  # the table's order, then the undescribed
    assert dataset.items.loc["i9", "genres"] == []
    assert dataset.interactions.item_ids.tolist() == dataset.items.index.tolist()
    assert dataset.interactions.frame().item_id.tolist() == ["i9", "i1", "i2"]
    assert sorted(dataset.users.index) == ["u1", "u2"]
