"""Format detection (`training.data.load_dataset`): each format found from the files present, the choice logged,
an unknown folder refused with the file sets that were expected."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import (
    write,
    write_generic,
    write_latest,
    write_ml1m,
)
from training.data import load_dataset
from training.tables import DataFormatError


def test_load_dataset_detects_each_format_and_logs_its_choice(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    ml100k = tmp_path / "ml-100k"
    write(ml100k / "u.data", "1\t10\t5\t881250949\n")
    write(ml100k / "u.user", "1|24|M|technician|85711\n")
    write(ml100k / "u.item", "10|Film (1995)|01-Jan-1995||http://x|" + "|".join(["0"] * 18 + ["1"]) + "\n")
    (tmp_path / "pq").mkdir()
    pd.DataFrame({"user": [1, 2], "item": [5, 6]}).to_parquet(tmp_path / "pq" / "interactions.parquet")
    cases = {
        "movielens-100k": ml100k,
        "movielens-1m": write_ml1m(tmp_path / "ml-1m"),
        "movielens-10m": write_ml1m(tmp_path / "ml-10m", users=None),
        "movielens-latest": write_latest(tmp_path / "ml-latest-small"),
        "interactions-csv": write_generic(tmp_path / "csv"),
        "interactions-parquet": tmp_path / "pq",
    }
    for name, folder in cases.items():
        logs.clear()
        dataset = load_dataset(folder)
        assert f"detected format {name}" in logs.text, (name, logs.text)
        assert len(dataset.interactions) > 0
    assert load_dataset(tmp_path / "ml-latest-small").name == "movielens-latest-small"


def test_a_file_given_directly_selects_its_format_or_is_read_as_an_interactions_table(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    folder = write_ml1m(tmp_path / "ml-1m")
    assert load_dataset(folder / "ratings.dat").name == "movielens-1m"
    write(tmp_path / "events" / "clicks.csv", "user,item\na,x\nb,y\n")
    dataset = load_dataset(tmp_path / "events" / "clicks.csv")
    assert "a .csv table given directly" in logs.text
    assert sorted(dataset.interactions.frame().user_id) == ["a", "b"]


def test_unknown_folder_is_refused_with_the_expected_file_sets(tmp_path: Path) -> None:
    write(tmp_path / "notes.txt", "hello\n")
    with pytest.raises(DataFormatError, match=r"ratings\.dat, movies\.dat, users\.dat"):
        load_dataset(tmp_path)
