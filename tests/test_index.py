"""training.index: inner-product parity for every recipe, recall measured against exact search and tuned,
and the index artifact's save/load checks (checksums, metric, model version).

Seeded synthetic clustered vectors stand in for item-tower outputs; every approximate result is compared
with brute-force dot products, the reference the towers are trained with."""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from training import artifacts
from training.artifacts import ArtifactError, VersionMismatchError
from training.index import (
    ItemIndex,
    RecallTargetError,
    build_index,
    choose_recipe,
    exact_topk,
    load_index,
    recall_at_k,
    save_index,
)

N_ITEMS = 10_000  # enough training points for 8-bit PQ codebooks (256 centroids x 39)
DIM = 32
N_CLUSTERS = 50
K = 10
RECIPES = ["Flat", "HNSW16", "IVF64,Flat", "IVF64,SQ8", "IVF64,PQ8"]
COMPRESSED = ["IVF64,SQ8", "IVF64,PQ8"]


def clustered(n: int, seed: int, centroid_seed: int = 0, spread: float = 1.0) -> np.ndarray:
    """(n, DIM) float32 vectors around N_CLUSTERS unit-norm centroids shared by items and users."""
    centroids = np.random.default_rng(centroid_seed).standard_normal((N_CLUSTERS, DIM)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, DIM), dtype=np.float32) * (spread / np.sqrt(DIM))
    return np.ascontiguousarray(centroids[rng.integers(N_CLUSTERS, size=n)] + noise)


ITEMS = clustered(N_ITEMS, seed=1)  # (N, D)
USERS = clustered(500, seed=2)  # (Q, D)
ITEM_IDS = [f"item-{i}" for i in range(N_ITEMS)]


@functools.cache
def built(recipe: str, target: float = 0.9) -> tuple[ItemIndex, dict]:
    return build_index(
        ITEMS,
        ITEM_IDS,
        recipe,
        target,
        USERS,
        K,
        model_version="model-a",
        progress=False,
        measure_speed=False,
    )


def brute_force(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ ITEMS.T  # (Q, N)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("recipe", RECIPES)
def test_index_scores_equal_user_item_dot_products(recipe: str) -> None:
    item_index, _ = built(recipe)
    scores, positions = item_index.search(USERS, K)  # (Q, K), (Q, K)
    assert scores.dtype == np.float32 and positions.dtype == np.int64
    assert (positions >= 0).all()
    dots = np.einsum("qd,qkd->qk", USERS.astype(np.float64), ITEMS[positions].astype(np.float64))
    np.testing.assert_allclose(scores, dots, rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all(), "results must be ranked best first"


@pytest.mark.parametrize("recipe", COMPRESSED)
def test_compressed_recipes_rescore_approximate_faiss_scores_exactly(recipe: str) -> None:
    # The codes only approximate the vectors, so FAISS's own scores differ from the dot products; the index
    # must re-rank its candidates with the stored float32 vectors (the parity test above checks the result).
    item_index, _ = built(recipe)
    assert not item_index.exact_scores and item_index.params["k_factor"] >= 1
    raw_scores, raw_positions = item_index.index.search(USERS, K)
    dots = np.einsum("qd,qkd->qk", USERS, ITEMS[raw_positions])
    assert np.abs(raw_scores - dots).max() > 1e-4


def test_flat_returns_exactly_the_brute_force_top_k() -> None:
    item_index, report = built("Flat")
    scores, positions = item_index.search(USERS, K)
    expected_scores, expected_positions = brute_force(USERS, K)
    np.testing.assert_array_equal(positions, expected_positions)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert report["recall@10"] == 1.0 and report["params"] == {}


def test_recall_never_decreases_as_nprobe_grows_and_is_exact_at_nlist() -> None:
    item_index, _ = built("IVF64,Flat")
    _, exact = exact_topk(ITEMS, USERS, K)
    recalls = []
    for nprobe in [1, 2, 4, 8, 16, 32, 64]:
        item_index.set_params(nprobe=nprobe)
        recalls.append(recall_at_k(item_index.search(USERS, K)[1], exact))
    item_index.set_params(**built("IVF64,Flat")[1]["params"])
    assert all(b >= a for a, b in itertools.pairwise(recalls)), recalls
    assert recalls[0] < 0.95 and recalls[-1] == 1.0, recalls


def test_recall_grows_with_ef_search() -> None:
    item_index, report = built("HNSW16")
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
    item_index, report = built(recipe)
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


def test_exact_search_subset_ranks_only_the_subset() -> None:
    item_index, _ = built("IVF64,SQ8")
    subset = np.arange(0, N_ITEMS, 7)
    scores, positions = item_index.exact_search_subset(USERS[:5], subset, K)
    expected = USERS[:5] @ ITEMS[subset].T
    order = np.argsort(-expected, axis=1)[:, :K]
    np.testing.assert_array_equal(positions, subset[order])
    np.testing.assert_allclose(scores, np.take_along_axis(expected, order, axis=1), rtol=1e-6)
    scores, positions = item_index.exact_search_subset(USERS[:2], [3, 5], K)
    assert set(positions[0, :2]) == {3, 5} and (positions[:, 2:] == -1).all()
    assert np.isneginf(scores[:, 2:]).all()


def test_search_pads_with_minus_one_when_catalog_has_fewer_than_k_items() -> None:
    item_index, _ = build_index(
        ITEMS[:3], ITEM_IDS[:3], "Flat", 0.95, None, 3, model_version="m", progress=False, measure_speed=False
    )
    scores, positions = item_index.search(USERS[:2], 5)
    assert (positions[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert sorted(positions[0, :3]) == [0, 1, 2]


def test_similar_items_exclude_the_item_itself() -> None:
    item_index, _ = built("IVF64,Flat")
    scores, positions = item_index.similar(42, K)
    assert len(positions) == K and 42 not in positions
    np.testing.assert_allclose(scores, ITEMS[positions] @ ITEMS[42], rtol=1e-5, atol=1e-5)
    assert item_index.positions_of(["item-42", "unknown"]).tolist() == [42, -1]


@pytest.mark.parametrize("recipe", ["Flat", "HNSW16", "IVF64,SQ8"])
def test_save_load_roundtrip_keeps_results_identical(tmp_path: Path, recipe: str) -> None:
    item_index, report = built(recipe)
    manifest = save_index(item_index, tmp_path / "idx-1", report, {"normalized": False})
    loaded, loaded_manifest = load_index(tmp_path / "idx-1", expected_model_version="model-a", expected_dim=DIM)
    assert loaded_manifest == manifest
    assert isinstance(loaded.item_vectors, np.memmap)
    assert loaded.params == item_index.params and loaded.item_ids == ITEM_IDS
    for a, b in zip(loaded.search(USERS, K), item_index.search(USERS, K), strict=True):
        np.testing.assert_array_equal(a, b)
    assert manifest["kind"] == "index" and manifest["version"] == "idx-1"
    assert manifest["metric"] == "inner_product" and manifest["recipe"] == recipe
    assert manifest["model_version"] == "model-a" and manifest["dim"] == DIM
    assert manifest["item_count"] == N_ITEMS and manifest["recall@10"] == report["recall@10"]
    assert manifest["normalized"] is False
    assert {"index.faiss", "item_ids.json", "item_vectors.npy"} <= set(manifest["files"])


def test_save_into_a_publishing_directory_checksums_the_callers_extra_files(tmp_path: Path) -> None:
    item_index, report = built("Flat")
    final = tmp_path / "indexes" / "v7"
    with artifacts.publishing(final) as tmp:
        (tmp / "items.parquet").write_bytes(b"catalog written by the re-index job")
        save_index(item_index, tmp, report, version="v7")
    _, manifest = load_index(final)
    assert manifest["version"] == "v7" and "items.parquet" in manifest["files"]
    with pytest.raises(ArtifactError, match="immutable"):
        save_index(item_index, final, report)


@pytest.mark.parametrize("name", ["index.faiss", "item_vectors.npy", "item_ids.json"])
def test_corrupt_file_raises_artifact_error_naming_it(tmp_path: Path, name: str) -> None:
    item_index, report = built("Flat")
    save_index(item_index, tmp_path / "idx", report)
    path = tmp_path / "idx" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=name):
        load_index(tmp_path / "idx")


def test_wrong_model_version_is_refused_naming_both_versions(tmp_path: Path) -> None:
    item_index, report = built("Flat")
    save_index(item_index, tmp_path / "idx", report)
    with pytest.raises(VersionMismatchError) as info:
        load_index(tmp_path / "idx", expected_model_version="model-b")
    assert "model-a" in str(info.value) and "model-b" in str(info.value)


def test_wrong_dim_is_refused(tmp_path: Path) -> None:
    item_index, report = built("Flat")
    save_index(item_index, tmp_path / "idx", report)
    with pytest.raises(ArtifactError, match=f"dim {DIM} != model dim 16"):
        load_index(tmp_path / "idx", expected_dim=16)


def test_non_inner_product_index_is_refused(tmp_path: Path) -> None:
    l2 = faiss.IndexFlatL2(DIM)
    l2.add(ITEMS)
    with pytest.raises(ArtifactError, match="not inner product"):
        ItemIndex(l2, ITEM_IDS, ITEMS, recipe="Flat", model_version="m")
    # An artifact whose index file is L2 (checksums and manifest otherwise valid) is refused at load.
    item_index, report = built("Flat")
    directory = tmp_path / "idx"
    save_index(item_index, directory, report)
    faiss.write_index(l2, str(directory / "index.faiss"))
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").unlink()
    artifacts.write_manifest(directory, {k: v for k, v in manifest.items() if k != "files"})
    with pytest.raises(ArtifactError, match="not inner product"):
        load_index(directory)


def test_bad_inputs_fail_with_clear_messages() -> None:
    with pytest.raises(ValueError, match="not unique"):
        build_index(ITEMS[:3], ["a", "a", "b"], "Flat", model_version="m", progress=False, k=1)
    bad = ITEMS[:3].copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"item vector 1 .*'b'.* not finite"):
        build_index(bad, ["a", "b", "c"], "Flat", model_version="m", progress=False, k=1)
    with pytest.raises(ValueError, match="IDMap"):
        build_index(ITEMS[:3], ["a", "b", "c"], "IDMap,Flat", model_version="m", progress=False, k=1)
    item_index, _ = built("Flat")
    with pytest.raises(ValueError, match="dim 16 but the index has dim 32"):
        item_index.search(np.zeros((1, 16), dtype=np.float32), K)
    with pytest.raises(ValueError, match="unknown search parameter"):
        item_index.set_params(nprobe=4)
