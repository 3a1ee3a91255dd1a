"""`training.dataset`: the synthetic generator, the split, histories and the users table."""

from __future__ import annotations

import pandas as pd

from training.dataset import histories, split_random, synthetic, users_table


def test_synthetic_generator_is_deterministic_for_a_seed() -> None:
    a, b = synthetic(100, 60, 5, 10, seed=3), synthetic(100, 60, 5, 10, seed=3)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.users, b.users)
    pd.testing.assert_frame_equal(a.items, b.items)
    assert not synthetic(100, 60, 5, 10, seed=4).interactions.equals(a.interactions)


def test_the_split_is_one_seeded_uniform_partition_of_the_rows() -> None:
    rows = synthetic(200, 80, 4, 10, seed=1).interactions
    rest, held = split_random(rows, 0.2, seed=5)
    assert len(held) == round(len(rows) * 0.2) and len(rest) + len(held) == len(rows)
    pairs = lambda frame: set(zip(frame.user_id, frame.item_id, strict=True))  # noqa: E731
    assert not pairs(rest) & pairs(held) and pairs(rest) | pairs(held) == pairs(rows)
    again, _ = split_random(rows, 0.2, seed=5)
    pd.testing.assert_frame_equal(rest, again)
    assert not split_random(rows, 0.2, seed=6)[1].equals(held)


def test_histories_are_newest_first_and_the_users_table_carries_them() -> None:
    dataset = synthetic(30, 20, 2, 5, seed=2)
    rows = dataset.interactions
    hist = histories(rows)
    user = rows.user_id.iloc[0]
    mine = rows[rows.user_id == user].sort_values("timestamp", ascending=False)
    assert hist[user] == list(mine.item_id)
    table = users_table(dataset, rows)
    assert list(table.index) == sorted(hist) and table.loc[user, "history"] == hist[user]
    assert table.loc[user, "segment"] == dataset.users.loc[user, "segment"]
