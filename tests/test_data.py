"""Loaders in training/data.py: format detection, parsing, located errors, and nothing dropped silently.

Every fixture is a few hand-written lines in tmp_path (no MovieLens data is copied); one test reads the real
ml-100k folder when it is present."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.data import (
    ML100K_GENRES,
    MOVIELENS_LATEST_SPEC,
    MOVIELENS_SPEC,
    DataFormatError,
    load_dataset,
    synthetic,
)

ML100K = Path(__file__).parents[2] / "shared/data/ml-100k"

ML1M_RATINGS = "1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n"
ML1M_USERS = "1::F::1::10::48067\n2::M::56::16::70072-1234\n"
ML1M_MOVIES = (
    "10::Café Society (1995)::Drama\n"
    "20::Toy Story (1995)::Animation|Children's|Comedy\n"
    "30::Never Rated (1999)::Drama|Thriller\n"
)
LATEST_RATINGS = "userId,movieId,rating,timestamp\n1,10,3.5,1112486027\n1,20,4.0,1112484676\n2,10,5.0,1112484819\n"
LATEST_MOVIES = (
    "movieId,title,genres\n"
    '10,"American President, The (1995)",Comedy|Drama|Romance\n'
    "20,Babylon 5,(no genres listed)\n"
    '30,"Fawlty Towers (1975-1979)",Comedy\n'
)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def ml1m(folder: Path, ratings: str = ML1M_RATINGS, users: str | None = ML1M_USERS, movies: str = ML1M_MOVIES) -> Path:
    write(folder / "ratings.dat", ratings, "latin-1")
    write(folder / "movies.dat", movies, "latin-1")
    if users is not None:
        write(folder / "users.dat", users, "latin-1")
    return folder


def latest(folder: Path, ratings: str = LATEST_RATINGS, movies: str = LATEST_MOVIES) -> Path:
    write(folder / "ratings.csv", ratings)
    write(folder / "movies.csv", movies)
    return folder


def generic(folder: Path, interactions: str = "user_id,item_id,timestamp\nu1,i1,100\nu2,i2,200\n") -> Path:
    write(folder / "interactions.csv", interactions)
    return folder


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="training.data")
    return caplog


# --------------------------------------------------------------------------- detection


def test_load_dataset_detects_each_format_and_logs_its_choice(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    ml100k = tmp_path / "ml-100k"
    write(ml100k / "u.data", "1\t10\t5\t881250949\n")
    write(ml100k / "u.user", "1|24|M|technician|85711\n")
    write(ml100k / "u.item", "10|Film (1995)|01-Jan-1995||http://x|" + "|".join(["0"] * 18 + ["1"]) + "\n")
    (tmp_path / "pq").mkdir()
    pd.DataFrame({"user": [1, 2], "item": [5, 6]}).to_parquet(tmp_path / "pq" / "interactions.parquet")
    cases = {
        "movielens-100k": ml100k,
        "movielens-1m": ml1m(tmp_path / "ml-1m"),
        "movielens-10m": ml1m(tmp_path / "ml-10m", users=None),
        "movielens-latest": latest(tmp_path / "ml-latest-small"),
        "interactions-csv": generic(tmp_path / "csv"),
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
    folder = ml1m(tmp_path / "ml-1m")
    assert load_dataset(folder / "ratings.dat").name == "movielens-1m"
    write(tmp_path / "events" / "clicks.csv", "user,item\na,x\nb,y\n")
    dataset = load_dataset(tmp_path / "events" / "clicks.csv")
    assert "a .csv table given directly" in logs.text
    assert sorted(dataset.interactions.user_id) == ["a", "b"]


def test_unknown_folder_is_refused_with_the_expected_file_sets(tmp_path: Path) -> None:
    write(tmp_path / "notes.txt", "hello\n")
    with pytest.raises(DataFormatError, match=r"ratings\.dat, movies\.dat, users\.dat"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------- MovieLens 1M


def test_movielens_1m_parses_ids_user_features_genres_and_years(tmp_path: Path) -> None:
    dataset = load_dataset(ml1m(tmp_path))
    assert dataset.spec == MOVIELENS_SPEC
    inter = dataset.interactions
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
    dataset = load_dataset(ml1m(tmp_path, ratings="1::10::4::1\n", movies=movies))
    item = dataset.items.loc["10"]
    assert item.title == "Mission: Impossible::Ghost Protocol (2011)"
    assert item.genres == ["Action", "Thriller"]
    assert item.year == 2011.0


def test_movielens_10m_without_users_dat_has_no_user_features(tmp_path: Path) -> None:
    dataset = load_dataset(ml1m(tmp_path, ratings="1::10::4.5::1\n", users=None))
    assert dataset.spec == MOVIELENS_LATEST_SPEC
    assert dataset.users.columns.empty and list(dataset.users.index) == ["1"]
    assert dataset.interactions.weight.tolist() == [4.5]


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
    folder = ml1m(tmp_path, ratings=f"1::20::3::978302109\n{line}\n2::10::4::978301968\n")
    with pytest.raises(DataFormatError, match=re.escape(location)):
        load_dataset(folder)


def test_movielens_1m_line_reader_takes_over_when_the_fast_parser_is_stricter(tmp_path: Path) -> None:
    # The fast parser reads "::" as ":" plus checked empty fields; an id containing one ":" fails that
    # check but is a valid line, so the line-by-line reader returns it instead of an error.
    dataset = load_dataset(ml1m(tmp_path, ratings="1::10::5::100\nweb:7::20::3::200\n"))
    assert dataset.interactions.user_id.tolist() == ["1", "web:7"]
    assert dataset.interactions.weight.dtype == np.float32


def test_movielens_1m_malformed_users_and_movies_name_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"users\.dat:2:4"):
        load_dataset(ml1m(tmp_path / "a", users="1::F::1::10::48067\n2::M::56::teacher::70072\n"))
    with pytest.raises(DataFormatError, match=r"movies\.dat:2: expected 3 fields"):
        load_dataset(ml1m(tmp_path / "b", movies="10::A (1995)::Drama\n20 Toy Story (1995)\n"))


def test_movielens_1m_counts_duplicates_blank_lines_and_undescribed_items(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    ratings = "1::10::5::100\n\n1::10::2::200\n1::99::3::150\n"
    movies = ML1M_MOVIES + "10::Again (2000)::Comedy\n"
    dataset = load_dataset(ml1m(tmp_path, ratings=ratings, movies=movies))
    assert "dropped 1 duplicate (user, item) interactions" in logs.text
    assert "ratings.dat: skipped 1 blank lines" in logs.text
    assert "movies.dat: dropped 1 rows whose item_id repeats" in logs.text
    assert "movies.dat: 1 item_ids appear in the interactions but not in this table" in logs.text
    inter = dataset.interactions.set_index("item_id")
    assert inter.loc["10", "weight"] == 2.0  # the latest event of the duplicate pair is kept
    assert dataset.items.loc["10", "title"] == "Café Society (1995)"  # the first row of a repeated id is kept
    assert dataset.items.loc["99", "genres"] == []  # rated but undescribed: in the catalog, features missing
    assert np.isnan(dataset.items.loc["99", "year"])


# --------------------------------------------------------------------------- MovieLens latest / 25M


def test_movielens_latest_parses_quoted_titles_genres_and_years(tmp_path: Path) -> None:
    dataset = load_dataset(latest(tmp_path))
    assert dataset.spec == MOVIELENS_LATEST_SPEC and dataset.spec.user_features == ()
    assert sorted(dataset.users.index) == ["1", "2"] and dataset.users.columns.empty
    assert dataset.interactions.weight.tolist() == [4.0, 5.0, 3.5]  # ordered by timestamp
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
        load_dataset(latest(tmp_path, ratings=ratings))


def test_movielens_latest_header_and_movies_errors_name_file_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"ratings\.csv:1: .*missing column 'timestamp'"):
        load_dataset(latest(tmp_path / "a", ratings="userId,movieId,rating\n1,10,3.5\n"))
    with pytest.raises(DataFormatError, match=r"movies\.csv:4: expected 3 fields"):
        load_dataset(latest(tmp_path / "b", movies=LATEST_MOVIES.replace('"Fawlty', "Fawlty, ")))
    bad_utf8 = tmp_path / "c"
    latest(bad_utf8)
    (bad_utf8 / "movies.csv").write_bytes(LATEST_MOVIES.encode().replace(b"Babylon", b"Bab\xffylon"))
    with pytest.raises(DataFormatError, match=r"movies\.csv:3: byte 7"):
        load_dataset(bad_utf8)


# --------------------------------------------------------------------------- generic tables


def test_generic_tables_give_str_ids_inferred_features_and_a_full_catalog(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    generic(tmp_path, "user_id,item_id,timestamp,weight,session\n7,i1,100,1.0,s\nu2,i2,200,2.5,s\nu2,i9,300,1,s\n")
    write(tmp_path / "users.csv", "user_id,country,age\n7,FR,31\nu2,DE,\nu3,FR,40\n")
    write(
        tmp_path / "items.csv",
        "item_id,genres,year,brand\ni1,rock|pop,1994,acme\ni2,jazz,2003,\ni5,,2011,zeta\n",
    )
    dataset = load_dataset(tmp_path)
    inter = dataset.interactions
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
    inter = dataset.interactions
    assert inter.user_id.tolist() == ["2", "1", "1"] and inter.item_id.tolist() == ["10", "10", "20"]
    assert inter.timestamp.tolist() == [1704067200, 1704067210, 1704067220]
    assert dataset.items.loc["10", "tags"] == ["a", "b"]
    assert dataset.spec.item_features[0].kind == "multi"


def test_generic_without_timestamps_orders_events_by_row_and_counts_duplicates(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    dataset = load_dataset(generic(tmp_path, "user,item,weight\na,x,1\nb,y,1\na,x,3\n"))
    assert dataset.interactions.timestamp.tolist() == [1, 2]
    assert dataset.interactions.set_index("user_id").loc["a", "weight"] == 3.0  # the later row wins
    assert "dropped 1 duplicate (user, item) interactions" in logs.text
    assert "no timestamp column; events are ordered by row" in logs.text


def test_generic_missing_column_names_the_file_and_the_column(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"interactions\.csv:1: missing column 'item_id'"):
        load_dataset(generic(tmp_path / "a", "user_id,product\nu1,p1\n"))
    generic(tmp_path / "b")
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
        load_dataset(generic(tmp_path, text))


def test_generic_parquet_missing_id_names_file_and_row(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user_id": ["u1", None], "item_id": ["i1", "i2"]})
    frame.to_parquet(tmp_path / "interactions.parquet")
    with pytest.raises(DataFormatError, match=r"interactions\.parquet: row 2, column 'user_id'"):
        load_dataset(tmp_path)


def test_generic_feature_name_in_both_tables_is_renamed_per_side(tmp_path: Path) -> None:
    generic(tmp_path)
    write(tmp_path / "users.csv", "user_id,country\nu1,FR\n")
    write(tmp_path / "items.csv", "item_id,country\ni1,US\n")
    dataset = load_dataset(tmp_path)
    assert [f.name for f in dataset.spec.user_features] == ["user_country"]
    assert [f.name for f in dataset.spec.item_features] == ["item_country"]
    assert dataset.items.loc["i1", "item_country"] == "US"


# --------------------------------------------------------------------------- real data and synthetic data


@pytest.mark.skipif(not ML100K.exists(), reason="ml-100k not present")
def test_real_movielens_100k_has_the_published_counts() -> None:
    dataset = load_dataset(ML100K)
    assert len(dataset.interactions) == 100_000
    assert dataset.interactions.user_id.nunique() == 943 and len(dataset.users) == 943
    assert len(dataset.items) == 1_682
    assert len(ML100K_GENRES) == 19
    assert {g for genres in dataset.items.genres for g in genres} == set(ML100K_GENRES)
    assert isinstance(dataset.interactions.user_id.iloc[0], str)


def test_synthetic_generator_is_deterministic_for_a_seed() -> None:
    a, b = synthetic(100, 60, 5, 10, seed=3), synthetic(100, 60, 5, 10, seed=3)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.users, b.users)
    pd.testing.assert_frame_equal(a.items, b.items)
    assert not synthetic(100, 60, 5, 10, seed=4).interactions.equals(a.interactions)
