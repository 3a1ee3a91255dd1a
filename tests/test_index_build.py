"""training.index_build: recall measured against exact search and tuned to the smallest passing parameter, the
recipe chosen from the catalog size, the build report, and refusals (target missed, bad inputs).

Seeded synthetic clustered vectors stand in for item-tower outputs."""

from __future__ import annotations

import itertools

import faiss
import numpy as np
import pytest

from tests.helpers import (
    INDEX_DIM,
    INDEX_ITEM_IDS,
    INDEX_ITEMS,
    INDEX_ITEMS_N,
    INDEX_K,
    INDEX_USERS,
    built_index,
)
from training.index import exact_topk
from training.index_build import RecallTargetError, build_index, choose_recipe, recall_at_k

ITEMS, USERS, ITEM_IDS = INDEX_ITEMS, INDEX_USERS, INDEX_ITEM_IDS
N_ITEMS, DIM, K = INDEX_ITEMS_N, INDEX_DIM, INDEX_K


def test_recall_never_decreases_as_nprobe_grows_and_is_exact_at_nlist() -> None:
    item_index, _ = built_index("IVF64,Flat")
    _, exact = exact_topk(ITEMS, USERS, K)
    recalls = []
    for nprobe in [1, 2, 4, 8, 16, 32, 64]:
        item_index.set_params(nprobe=nprobe)
        recalls.append(recall_at_k(item_index.search(USERS, K)[1], exact))
    item_index.set_params(**built_index("IVF64,Flat")[1]["params"])
    assert all(b >= a for a, b in itertools.pairwise(recalls)), recalls
    assert recalls[0] < 0.95 and recalls[-1] == 1.0, recalls


def test_recall_grows_with_ef_search() -> None:
    item_index, report = built_index("HNSW16")
    _, exact = exact_topk(ITEMS, USERS, K)
    recalls = []
    for ef in [10, 20, 40, 80, 160]:
        item_index.set_params(efSearch=ef)
        recalls.append(recall_at_k(item_index.search(USERS, K)[1], exact))
    item_index.set_params(**report["params"])
    # A graph search is not strictly monotone query by query; on average it must not drop noticeably.
    assert all(b >= a - 0.005 for a, b in itertools.pairwise(recalls)), recalls
    assert recalls[-1] > recalls[0], recalls


@pytest.mark.parametrize("recipe", ["IVF64,Flat", "HNSW16", "IVF64,PQ8"])
def test_tuned_parameter_is_the_smallest_meeting_the_target(recipe: str) -> None:
    item_index, report = built_index(recipe)
    name = item_index.search_param
    assert name is not None
    value = report["params"][name]
    _, exact = exact_topk(ITEMS, USERS, K)

    def recall(v: int) -> float:
        item_index.set_params(**{**report["params"], name: v})
        return recall_at_k(item_index.search(USERS, K)[1], exact)

    try:
        assert recall(value) >= 0.9
        assert report["recall@10"] == pytest.approx(recall(value))
        floor = K if name == "efSearch" else 1  # efSearch < k can return fewer than k items: never chosen
        assert value >= floor
        if value > floor:
            assert recall(value - 1) < 0.9
    finally:
        item_index.set_params(**report["params"])


def test_unreachable_recall_target_raises_recall_target_error() -> None:
    with pytest.raises(RecallTargetError, match=r"below the target 1\.01") as info:
        build_index(ITEMS, ITEM_IDS, "Flat", 1.01, USERS, K, model_version="m", progress=False)
    assert info.value.report["recipe"] == "Flat"
    with pytest.raises(RecallTargetError) as info:
        build_index(
            ITEMS,
            ITEM_IDS,
            "IVF64,Flat",
            0.99,
            USERS,
            K,
            model_version="m",
            progress=False,
            param_grid=[1],
        )
    assert [t["nprobe"] for t in info.value.report["trials"]] == [1]


def test_build_report_has_recall_latency_and_build_time() -> None:
    threads = faiss.omp_get_max_threads()
    _, report = build_index(ITEMS[:2000], ITEM_IDS[:2000], "auto", 0.95, None, K, model_version="m", progress=False)
    assert report["recipe"] == "Flat"  # a small catalog is searched exactly
    assert report["query_source"] == "perturbed_items"
    for key in ("recall@10", "p50_us", "p99_us", "qps_b32", "build_s", "memory_mb"):
        assert report[key] > 0, key
    assert report["p99_us"] >= report["p50_us"]
    assert faiss.omp_get_max_threads() == threads, "latency runs on one thread, then restores the setting"


def test_choose_recipe_follows_catalog_size_and_target() -> None:
    assert choose_recipe(5_000, 64) == "Flat"
    assert choose_recipe(100_000, 64) == "IVF1265,Flat"
    assert choose_recipe(1_000_000, 64) == "IVF4000,Flat"
    assert choose_recipe(1_000_000, 64, 1.0) == "Flat"
    assert choose_recipe(20_000_000, 64) == "IVF17889,SQ8"
    assert choose_recipe(100_000_000, 64) == "IVF40000,PQ16"


def test_bad_inputs_fail_with_clear_messages() -> None:
    with pytest.raises(ValueError, match="not unique"):
        build_index(ITEMS[:3], ["a", "a", "b"], "Flat", model_version="m", progress=False, k=1)
    bad = ITEMS[:3].copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"item vector 1 .*'b'.* not finite"):
        build_index(bad, ["a", "b", "c"], "Flat", model_version="m", progress=False, k=1)
    with pytest.raises(ValueError, match="IDMap"):
        build_index(ITEMS[:3], ["a", "b", "c"], "IDMap,Flat", model_version="m", progress=False, k=1)
    item_index, _ = built_index("Flat")
    with pytest.raises(ValueError, match="dim 16 but the index has dim 32"):
        item_index.search(np.zeros((1, 16), dtype=np.float32), K)
    with pytest.raises(ValueError, match="unknown search parameter"):
        item_index.set_params(nprobe=4)
