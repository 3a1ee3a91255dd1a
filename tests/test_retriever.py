"""The retriever as a plain class (no HTTP, no Redis): lifecycle, filters and exact fallback, and the answer
cache (keyed by record revision, one per pair)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from service.errors import NotReadyError
from service.retriever import Retriever, UserQuery
from tests.helpers import brute_force, publish_index, serving_root
from training.artifacts import ArtifactError, ArtifactStore, LoadedModel


def trained_user(model: LoadedModel, row: int) -> tuple[str, dict[str, Any], list[str]]:
    """The id, features and history of one of the model's training users."""
    users = model.users()
    user_id = str(users.index[row])
    features = {"segment": users.loc[user_id, "segment"], "region": users.loc[user_id, "region"]}
    return user_id, features, [str(i) for i in users.loc[user_id, "history"]]


def test_retriever_is_cheap_to_build_and_not_ready_until_loaded(tmp_path: Path) -> None:
    retriever = Retriever(tmp_path)
    assert not retriever.ready
    with pytest.raises(NotReadyError, match="no model/index pair is loaded"):
        retriever.recommend([UserQuery()])
    with pytest.raises(NotReadyError, match="twotower reindex"):
        retriever.load()


def test_a_failed_load_keeps_the_previous_pair_serving(trained_model: LoadedModel, tmp_path: Path) -> None:
    model_version, _ = serving_root(trained_model, tmp_path)
    retriever = Retriever(tmp_path)
    before = retriever.load()
    broken = publish_index(tmp_path, model_version, activate=False)
    index_file = ArtifactStore(tmp_path).index_dir(broken) / "index.faiss"
    data = bytearray(index_file.read_bytes())
    data[-8] ^= 0xFF
    index_file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted"):
        retriever.load(broken)
    assert retriever.current is before
    assert retriever.recommend([UserQuery(k=3)])[0].index_version == before.index_version


def test_a_filter_the_over_fetch_cannot_fill_falls_back_to_exact_search_over_matching_items(
    trained_model: LoadedModel, tmp_path: Path
) -> None:
    serving_root(trained_model, tmp_path)
    # A small fetch budget makes over-fetching fall short, as a selective filter does on a large catalog.
    retriever = Retriever(tmp_path, max_fetch=12)
    retriever.load()
    catalog = trained_model.catalog()
    user_id, features, history = trained_user(trained_model, 5)
    genres = sorted({g for values in catalog["genres"] for g in values})
    queries = [UserQuery(user_id, features, history, k=10, filter={"genres": {g}}, stored=True) for g in genres]
    results = retriever.recommend(queries)
    assert any(r.exact_fallback for r in results)
    for genre, result in zip(genres, results, strict=True):
        allowed = {str(i) for i, values in catalog["genres"].items() if genre in list(values)}
        expected = brute_force(
            trained_model, user_id=user_id, features=features, history=history, k=10, exclude=history, allowed=allowed
        )
        assert result.item_ids == [item for item, _ in expected]
        assert result.scores == pytest.approx([score for _, score in expected], rel=1e-4, abs=1e-5)


def test_a_stored_record_seen_again_reuses_its_vector_and_answer_and_a_changed_one_does_not(
    trained_model: LoadedModel, tmp_path: Path
) -> None:
    serving_root(trained_model, tmp_path)
    retriever = Retriever(tmp_path)
    retriever.load()
    cache = retriever.cache
    assert cache is not None
    user_id, features, history = trained_user(trained_model, 3)

    def ask(
        revision: str | None, history: list[str], exclude: frozenset[str] = frozenset(), exclude_seen: bool = True
    ) -> list[str]:
        query = UserQuery(user_id, features, history, history, 10, exclude, exclude_seen, stored=True)
        return retriever.recommend([replace(query, record_revision=revision)])[0].item_ids

    plain = ask(None, history)
    assert len(cache) == 0  # a query that is not a stored record is never remembered
    assert ask("r1", history, exclude_seen=False) == ask(None, history, exclude_seen=False)
    remembered = cache.lookup(user_id, "r1")
    assert remembered is not None and not remembered.answers  # its vector and seen items; nothing asked plainly yet
    assert ask("r1", history) == plain  # answered and remembered
    assert list(remembered.answers[10].item_ids) == plain  # the next plain ask is answered without a search
    assert ask("r1", history) == plain and cache.lookup(user_id, "r1") is remembered  # reused, same answer
    assert ask("r1", history, exclude=frozenset(plain[:2])) == ask(None, history, exclude=frozenset(plain[:2]))
    changed = [plain[0], *history]  # the user consumed the top item: the store reads a new revision
    assert ask("r2", changed) == ask(None, changed) != plain
    assert cache.lookup(user_id, "r1") is None and cache.lookup(user_id, "r2") is not None
    expected = brute_force(trained_model, user_id=user_id, features=features, history=changed, k=10, exclude=changed)
    assert ask("r2", changed) == [item for item, _ in expected]


def test_a_new_pair_starts_with_an_empty_answer_cache(trained_model: LoadedModel, tmp_path: Path) -> None:
    model_version, _ = serving_root(trained_model, tmp_path)
    retriever = Retriever(tmp_path)
    retriever.load()
    user_id, features, history = trained_user(trained_model, 3)
    query = UserQuery(user_id, features, history, history, 10, stored=True, record_revision="r1")
    retriever.recommend([query])
    assert retriever.cache is not None and len(retriever.cache) == 1
    retriever.load(publish_index(tmp_path, model_version))
    assert retriever.cache is not None and len(retriever.cache) == 0


def test_cold_users_share_one_answer_per_k_and_a_mixed_batch_searches_only_the_rest(
    trained_model: LoadedModel, tmp_path: Path
) -> None:
    serving_root(trained_model, tmp_path)
    retriever = Retriever(tmp_path)
    retriever.load()
    assert retriever.cache is not None
    cold_answers = retriever.cache.cold.answers
    assert not cold_answers
    cold = brute_force(trained_model, user_id=None, features={}, history=[], k=5)
    first = retriever.recommend([UserQuery(k=5)])[0]
    assert first.item_ids == [item for item, _ in cold] and first.path == "cold_start"
    assert list(cold_answers[5].item_ids) == first.item_ids  # remembered for every later cold user

    user_id, features, history = trained_user(trained_model, 5)
    batch = [
        UserQuery(k=5),  # answered from the pair's cold answer
        UserQuery("someone-new", k=5, exclude=frozenset(first.item_ids[:2])),  # cold, but asks for more: searched
        UserQuery(user_id, features, history, k=7, stored=True),  # no stored record: searched
        UserQuery(k=3),  # cold at another k: searched once, then remembered too
    ]
    results = retriever.recommend(batch)
    expected = [
        cold,
        brute_force(trained_model, user_id=None, features={}, history=[], k=5, exclude=first.item_ids[:2]),
        brute_force(trained_model, user_id=user_id, features=features, history=history, k=7, exclude=history),
        cold[:3],
    ]
    for result, want in zip(results, expected, strict=True):
        assert result.item_ids == [item for item, _ in want]
        assert result.scores == pytest.approx([score for _, score in want], rel=1e-4, abs=1e-5)
    assert sorted(cold_answers) == [3, 5]
    results[0].item_ids.append("mutated")  # a caller's list is its own: the remembered answer is unchanged
    assert retriever.recommend([UserQuery(k=5)])[0].item_ids == first.item_ids
