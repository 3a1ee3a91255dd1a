"""The generic tables format (`training.tables`): str ids, inferred features, a full catalog, and located errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import (
    write,
    write_generic,
)
from training.data import load_dataset
from training.tables import DataFormatError


def test_generic_tables_give_str_ids_inferred_features_and_a_full_catalog(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    write_generic(
        tmp_path, "user_id,item_id,timestamp,weight,session\n7,i1,100,1.0,s\nu2,i2,200,2.5,s\nu2,i9,300,1,s\n"
    )
    write(tmp_path / "users.csv", "user_id,country,age\n7,FR,31\nu2,DE,\nu3,FR,40\n")
    write(
        tmp_path / "items.csv",
        "item_id,genres,year,brand\ni1,rock|pop,1994,acme\ni2,jazz,2003,\ni5,,2011,zeta\n",
    )
    dataset = load_dataset(tmp_path)
    inter = dataset.interactions.frame()
    assert inter.user_id.tolist() == ["7", "u2", "u2"] and inter.weight.tolist() == [1.0, 2.5, 1.0]
    assert "ignored columns ['session']" in logs.text
    spec = dataset.spec
    assert [(f.name, f.kind) for f in spec.user_features] == [
        ("country", "categorical"),
        ("age", "categorical"),
    ]
    kinds = {f.name: f for f in spec.item_features}
    assert kinds["genres"].kind == "multi" and kinds["genres"].max_values == 2
    assert kinds["year"].kind == "bucket" and kinds["year"].boundaries == (2000.0, 2010.0)
    assert kinds["brand"].kind == "categorical"
    assert dataset.users.loc["7", "age"] == "31" and pd.isna(dataset.users.loc["u2", "age"])
    assert "u3" in dataset.users.index  # a user without interactions stays
    items = dataset.items
    assert list(items.index) == ["i1", "i2", "i5", "i9"]  # i5: no interactions; i9: not in items.csv
    assert items.loc["i1", "genres"] == ["rock", "pop"] and items.loc["i2", "genres"] == ["jazz"]
    assert items.loc["i5", "genres"] == [] and items.loc["i9", "genres"] == []
    assert "1 item_ids appear in the interactions but not in this table" in logs.text


def test_generic_parquet_reads_int_ids_list_columns_and_datetimes(tmp_path: Path) -> None:
    pd.DataFrame(
        {
            "user": [1, 2, 1],
            "item": [10, 10, 20],
            "timestamp": pd.to_datetime(["2024-01-01T00:00:10", "2024-01-01T00:00:00", "2024-01-01T00:00:20"]),
        }
    ).to_parquet(tmp_path / "interactions.parquet")
    pd.DataFrame({"item_id": [10, 20], "tags": [["a", "b"], ["c"]]}).to_parquet(tmp_path / "items.parquet")
    dataset = load_dataset(tmp_path)
    inter = dataset.interactions.frame()
    assert inter.user_id.tolist() == ["2", "1", "1"] and inter.item_id.tolist() == ["10", "10", "20"]
    assert inter.timestamp.tolist() == [1704067200, 1704067210, 1704067220]
    assert dataset.items.loc["10", "tags"] == ["a", "b"]
    assert dataset.spec.item_features[0].kind == "multi"


def test_generic_without_timestamps_orders_events_by_row_and_counts_duplicates(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    dataset = load_dataset(write_generic(tmp_path, "user,item,weight\na,x,1\nb,y,1\na,x,3\n"))
    assert dataset.interactions.frame().timestamp.tolist() == [1, 2]
    assert dataset.interactions.frame().set_index("user_id").loc["a", "weight"] == 3.0  # the later row wins
    assert "dropped 1 duplicate (user, item) interactions" in logs.text
    assert "no timestamp column; events are ordered by row" in logs.text


def test_generic_missing_column_names_the_file_and_the_column(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"interactions\.csv:1: missing column 'item_id'"):
        load_dataset(write_generic(tmp_path / "a", "user_id,product\nu1,p1\n"))
    write_generic(tmp_path / "b")
    write(tmp_path / "b" / "items.csv", "id,genre\ni1,rock\n")
    with pytest.raises(DataFormatError, match=r"items\.csv:1: missing column 'item_id'"):
        load_dataset(tmp_path / "b")


@pytest.mark.parametrize(
    ("text", "location"),
    [
        ("user_id,item_id,timestamp\nu1,i1,100\n\nu2,,200\n", r"interactions\.csv:4:2"),  # blank line counted
        ("user_id,item_id,timestamp\nu1,i1,100\nu2,i2,yesterday\n", r"interactions\.csv:3:3"),
        ("user_id,item_id,timestamp\nu1,i1,100\nu2,i2,\n", r"interactions\.csv:3:3"),
        ("user_id,item_id\nu1,i1\nu2,i2,oops\n", r"interactions\.csv:3: expected 2 fields"),
        ('user_id,item_id,timestamp\nu1,"i\n1",100\n,i2,200\n', r"interactions\.csv:4:1"),  # quoted newline
    ],
)
def test_generic_malformed_csv_names_file_line_and_column(tmp_path: Path, text: str, location: str) -> None:
    with pytest.raises(DataFormatError, match=location):
        load_dataset(write_generic(tmp_path, text))


def test_generic_parquet_missing_id_names_file_and_row(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user_id": ["u1", None], "item_id": ["i1", "i2"]})
    frame.to_parquet(tmp_path / "interactions.parquet")
    with pytest.raises(DataFormatError, match=r"interactions\.parquet: row 2, column 'user_id'"):
        load_dataset(tmp_path)


def test_generic_feature_name_in_both_tables_is_renamed_per_side(tmp_path: Path) -> None:
    write_generic(tmp_path)
    write(tmp_path / "users.csv", "user_id,country\nu1,FR\n")
    write(tmp_path / "items.csv", "item_id,country\ni1,US\n")
    dataset = load_dataset(tmp_path)
    assert [f.name for f in dataset.spec.user_features] == ["user_country"]
    assert [f.name for f in dataset.spec.item_features] == ["item_country"]
    assert dataset.items.loc["i1", "item_country"] == "US"
