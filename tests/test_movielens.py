"""The MovieLens loaders (`training.movielens`): parsing, located errors, and nothing dropped silently.

Every fixture is a few hand-written lines in tmp_path (no MovieLens data is copied); one test reads the real
ml-100k folder when it is present."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    LATEST_MOVIES,
    ML1M_MOVIES,
    write_latest,
    write_ml1m,
)
from training.data import load_dataset
from training.movielens import ML100K_GENRES, MOVIELENS_LATEST_SPEC, MOVIELENS_SPEC
from training.tables import DataFormatError

ML100K = Path(__file__).parents[2] / "shared/data/ml-100k"


def test_movielens_1m_parses_ids_user_features_genres_and_years(tmp_path: Path) -> None:
    dataset = load_dataset(write_ml1m(tmp_path))
    assert dataset.spec == MOVIELENS_SPEC
    inter = dataset.interactions.frame()
    assert list(zip(inter.user_id, inter.item_id, strict=True)) == [("1", "10"), ("2", "10"), ("1", "20")]
    assert inter.weight.tolist() == [5.0, 4.0, 3.0]
    assert inter.timestamp.dtype == np.int64
    users = dataset.users
    assert users.loc["1"].tolist() == [1, "F", "10", "48067"]  # occupation stays its code
    assert users.loc["2", "zip"] == "70072-1234"
    items = dataset.items
    assert list(items.index) == ["10", "20", "30"]  # item 30 has no ratings and is still in the catalog
    assert items.loc["10", "title"] == "Café Society (1995)"  # latin-1
    assert items.loc["20", "genres"] == ["Animation", "Children's", "Comedy"]
    assert items.year.tolist() == [1995.0, 1995.0, 1999.0]


def test_movielens_1m_title_containing_double_colon_stays_whole(tmp_path: Path) -> None:
    movies = "10::Mission: Impossible::Ghost Protocol (2011)::Action|Thriller\n"
    dataset = load_dataset(write_ml1m(tmp_path, ratings="1::10::4::1\n", movies=movies))
    item = dataset.items.loc["10"]
    assert item.title == "Mission: Impossible::Ghost Protocol (2011)"
    assert item.genres == ["Action", "Thriller"]
    assert item.year == 2011.0


def test_movielens_10m_without_users_dat_has_no_user_features(tmp_path: Path) -> None:
    dataset = load_dataset(write_ml1m(tmp_path, ratings="1::10::4.5::1\n", users=None))
    assert dataset.spec == MOVIELENS_LATEST_SPEC
    assert dataset.users.columns.empty and list(dataset.users.index) == ["1"]
    assert dataset.interactions.frame().weight.tolist() == [4.5]


@pytest.mark.parametrize(
    ("line", "location"),
    [
        ("1::10::x::978300760", "ratings.dat:2:3"),  # bad rating
        ("1::10::5::soon", "ratings.dat:2:4"),  # bad timestamp
        ("1::::5::978300760", "ratings.dat:2:2"),  # empty item id
        ("1::10::5", "ratings.dat:2:"),  # too few fields
        ("1::10::5::978300760::7", "ratings.dat:2:5"),  # too many fields
    ],
)
def test_movielens_1m_malformed_rating_names_file_line_and_column(tmp_path: Path, line: str, location: str) -> None:
    folder = write_ml1m(tmp_path, ratings=f"1::20::3::978302109\n{line}\n2::10::4::978301968\n")
    with pytest.raises(DataFormatError, match=re.escape(location)):
        load_dataset(folder)


def test_movielens_1m_line_reader_takes_over_when_the_fast_parser_is_stricter(tmp_path: Path) -> None:
    # The fast parser reads "::" as ":" plus checked empty fields; an id containing one ":" fails that
    # check but is a valid line, so the line-by-line reader returns it instead of an error.
    dataset = load_dataset(write_ml1m(tmp_path, ratings="1::10::5::100\nweb:7::20::3::200\n"))
    assert dataset.interactions.frame().user_id.tolist() == ["1", "web:7"]
    assert dataset.interactions.weight.dtype == np.float32


def test_movielens_1m_malformed_users_and_movies_name_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"users\.dat:2:4"):
        load_dataset(write_ml1m(tmp_path / "a", users="1::F::1::10::48067\n2::M::56::teacher::70072\n"))
    with pytest.raises(DataFormatError, match=r"movies\.dat:2: expected 3 fields"):
        load_dataset(write_ml1m(tmp_path / "b", movies="10::A (1995)::Drama\n20 Toy Story (1995)\n"))


def test_movielens_1m_counts_duplicates_blank_lines_and_undescribed_items(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    ratings = "1::10::5::100\n\n1::10::2::200\n1::99::3::150\n"
    movies = ML1M_MOVIES + "10::Again (2000)::Comedy\n"
    dataset = load_dataset(write_ml1m(tmp_path, ratings=ratings, movies=movies))
    assert "dropped 1 duplicate (user, item) interactions" in logs.text
    assert "ratings.dat: skipped 1 blank lines" in logs.text
    assert "movies.dat: dropped 1 rows whose item_id repeats" in logs.text
    assert "movies.dat: 1 item_ids appear in the interactions but not in this table" in logs.text
    inter = dataset.interactions.frame().set_index("item_id")
    assert inter.loc["10", "weight"] == 2.0  # the latest event of the duplicate pair is kept
    assert dataset.items.loc["10", "title"] == "Café Society (1995)"  # the first row of a repeated id is kept
    assert dataset.items.loc["99", "genres"] == []  # rated but undescribed: in the catalog, features missing
    assert np.isnan(dataset.items.loc["99", "year"])


def test_movielens_latest_parses_quoted_titles_genres_and_years(tmp_path: Path) -> None:
    dataset = load_dataset(write_latest(tmp_path))
    assert dataset.spec == MOVIELENS_LATEST_SPEC and dataset.spec.user_features == ()
    assert sorted(dataset.users.index) == ["1", "2"] and dataset.users.columns.empty
    assert dataset.interactions.frame().weight.tolist() == [4.0, 5.0, 3.5]  # ordered by timestamp
    items = dataset.items
    assert list(items.index) == ["10", "20", "30"]
    assert items.loc["10", "title"] == "American President, The (1995)"
    assert items.loc["10", "genres"] == ["Comedy", "Drama", "Romance"]
    assert items.loc["20", "genres"] == []  # "(no genres listed)"
    assert np.isnan(items.loc["20", "year"])  # no year in the title
    assert items.loc["30", "year"] == 1975.0


@pytest.mark.parametrize(
    ("line", "location"),
    [
        ("1,30,great,1112484819", "ratings.csv:3:3"),
        ("1,30,4.0,", "ratings.csv:3:4"),
        ("1,30,nan,1112484819", "ratings.csv:3:3"),
        ("1,30,4.0,1112484819,extra", "ratings.csv:3:5"),
        (",30,4.0,1112484819", "ratings.csv:3:1"),
    ],
)
def test_movielens_latest_malformed_rating_names_file_line_and_column(tmp_path: Path, line: str, location: str) -> None:
    ratings = f"userId,movieId,rating,timestamp\n1,10,3.5,1112486027\n{line}\n2,10,5.0,1112484819\n"
    with pytest.raises(DataFormatError, match=re.escape(location)):
        load_dataset(write_latest(tmp_path, ratings=ratings))


def test_movielens_latest_header_and_movies_errors_name_file_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"ratings\.csv:1: .*missing column 'timestamp'"):
        load_dataset(write_latest(tmp_path / "a", ratings="userId,movieId,rating\n1,10,3.5\n"))
    with pytest.raises(DataFormatError, match=r"movies\.csv:4: expected 3 fields"):
        load_dataset(write_latest(tmp_path / "b", movies=LATEST_MOVIES.replace('"Fawlty', "Fawlty, ")))
    bad_utf8 = tmp_path / "c"
    write_latest(bad_utf8)
    (bad_utf8 / "movies.csv").write_bytes(LATEST_MOVIES.encode().replace(b"Babylon", b"Bab\xffylon"))
    with pytest.raises(DataFormatError, match=r"movies\.csv:3: byte 7"):
        load_dataset(bad_utf8)


@pytest.mark.skipif(not ML100K.exists(), reason="ml-100k not present")
def test_real_movielens_100k_has_the_published_counts() -> None:
    dataset = load_dataset(ML100K)
    assert len(dataset.interactions) == 100_000
    assert dataset.interactions.frame().user_id.nunique() == 943 and len(dataset.users) == 943
    assert len(dataset.items) == 1_682
    assert len(ML100K_GENRES) == 19
    assert {g for genres in dataset.items.genres for g in genres} == set(ML100K_GENRES)
    assert isinstance(dataset.interactions.frame().user_id.iloc[0], str)
