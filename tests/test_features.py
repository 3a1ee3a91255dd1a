"""training.features: tokens, vocabularies and the one encoding of raw inputs, unknown values as index 0, and the
table adapters that feed it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from training.features import (
    UNKNOWN,
    FeatureDef,
    FeatureSpec,
    Vocabularies,
    build_vocabularies,
    encode_item_frame,
    encode_items,
    encode_user_frame,
    encode_users,
)

SPEC = FeatureSpec(
    user_features=(
        FeatureDef("age", "bucket", boundaries=(18.0, 25.0)),
        FeatureDef("zip", "prefix", prefix_len=2),
    ),
    item_features=(FeatureDef("genres", "multi", max_values=3), FeatureDef("studio")),
    max_history=4,
)


def vocabs() -> Vocabularies:
    return build_vocabularies(
        SPEC,
        ["u1", "u2"],
        ["a", "b", "c"],
        {"age": [17, 30], "zip": ["94043", "10001"]},
        {"genres": [["Drama", "War"], ["Comedy"]], "studio": ["x", "y"]},
    )


def test_feature_tokens_bucket_prefix_and_multi() -> None:
    age, zip_code, genres = SPEC.user_features[0], SPEC.user_features[1], SPEC.item_features[0]
    assert age.tokens(17) == ["bucket0"] and age.tokens("25") == ["bucket2"] and age.tokens(24.9) == ["bucket1"]
    assert age.tokens("old") == [] and age.tokens(None) == [] and age.tokens(float("nan")) == []
    assert zip_code.tokens("94043") == ["94"]
    assert genres.tokens("Drama|War") == ["Drama", "War"] and genres.tokens(["A", "B", "C", "D"]) == [
        "A",
        "B",
        "C",
    ]


def test_unknown_ids_and_feature_values_encode_to_the_unknown_index() -> None:
    encoded = encode_users(
        SPEC,
        vocabs(),
        ["u2", "stranger", None],
        {"age": [30, None, "x"], "zip": ["10001"] * 3},
        [["a", "zzz"], [], ["c"]],
    )
    assert encoded.ids.tolist() == [2, UNKNOWN, UNKNOWN]
    assert encoded.features["age"][:, 0].tolist()[1:] == [UNKNOWN, UNKNOWN]
    assert encoded.history.shape == (3, 4)
    assert encoded.history[0].tolist() == [1, UNKNOWN, 0, 0]  # unknown history items contribute nothing


def test_missing_feature_column_encodes_as_unknown() -> None:
    encoded = encode_items(SPEC, vocabs(), ["a", "new-item"], {"genres": [["War", "Horror"], None]})
    assert encoded.ids.tolist() == [1, UNKNOWN]
    assert encoded.features["studio"].tolist() == [[UNKNOWN], [UNKNOWN]]
    war = vocabs().features["genres"].lookup("War")
    assert encoded.features["genres"].tolist() == [[war, UNKNOWN, 0], [0, 0, 0]]


def test_history_is_truncated_to_the_newest_items() -> None:
    encoded = encode_users(SPEC, vocabs(), ["u1"], {}, [["a", "b", "c", "a", "b", "c"]])
    assert encoded.history.tolist() == [[1, 2, 3, 1]]


def test_vocabularies_roundtrip_and_digest_is_stable() -> None:
    original = vocabs()
    restored = Vocabularies.from_dict(original.to_dict())
    assert restored.digest() == original.digest()
    assert (
        restored.sizes()
        == original.sizes()
        == {"user_ids": 3, "item_ids": 4, "age": 3, "zip": 3, "genres": 4, "studio": 3}
    )
    assert FeatureSpec.from_dict(SPEC.to_dict()) == SPEC


def test_encoding_is_vectorised_over_rows() -> None:
    many = encode_items(SPEC, vocabs(), ["a", "b"] * 500, {"studio": ["x", "y"] * 500})
    assert many.features["studio"][:, 0].tolist() == [1, 2] * 500
    assert np.issubdtype(many.ids.dtype, np.int64)


def test_frame_adapters_encode_tables_like_the_column_functions() -> None:
    spec = FeatureSpec(
        user_features=(FeatureDef("segment"),),
        item_features=(FeatureDef("genres", "multi", max_values=2), FeatureDef("year", "bucket", boundaries=(2000.0,))),
        max_history=3,
    )
    vocabs = build_vocabularies(spec, ["u1", "u2"], ["i1", "i2"], {"segment": ["a", "b"]}, {"genres": [["x"], ["y"]]})
    items = pd.DataFrame(
        {"genres": [["x", "y"], []], "year": [1999, 2005], "title": ["kept", "unused"]},
        index=pd.Index(["i1", "new"], name="item_id"),
    )
    direct = encode_items(spec, vocabs, ["i1", "new"], {"genres": [["x", "y"], []], "year": [1999, 2005]})
    framed = encode_item_frame(spec, vocabs, items)
    np.testing.assert_array_equal(framed.ids, direct.ids)
    for name in ("genres", "year"):
        np.testing.assert_array_equal(framed.features[name], direct.features[name])

    users = pd.DataFrame(
        {"segment": ["b", None], "history": [np.array(["i2", "i1"]), None]}, index=pd.Index(["u2", "u9"])
    )
    from_column = encode_user_frame(spec, vocabs, users)  # a users table of an artifact: Parquet arrays, gaps
    given = encode_user_frame(spec, vocabs, users.drop(columns="history"), [["i2", "i1"], []])
    expected = encode_users(spec, vocabs, ["u2", "u9"], {"segment": ["b", None]}, [["i2", "i1"], []])
    for encoded in (from_column, given):
        np.testing.assert_array_equal(encoded.ids, expected.ids)
        np.testing.assert_array_equal(encoded.history, expected.history)
        np.testing.assert_array_equal(encoded.features["segment"], expected.features["segment"])
