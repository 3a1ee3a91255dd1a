"""training.index: inner-product parity for every recipe (FAISS scores equal brute-force dot products, compressed
codes re-scored exactly), filtered exact search, similar items, and the index artifact's save/load checks
(checksums, metric, model version, dim).

Seeded synthetic clustered vectors stand in for item-tower outputs."""

from __future__ import annotations

import json
from pathlib import Path

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
    brute_force_top_k,
    built_index,
)
from training import artifacts
from training.artifacts import ArtifactError, VersionMismatchError
from training.index import ItemIndex, exact_index, load_index, save_index
from training.index_build import build_index

ITEMS, USERS, ITEM_IDS = INDEX_ITEMS, INDEX_USERS, INDEX_ITEM_IDS
N_ITEMS, DIM, K = INDEX_ITEMS_N, INDEX_DIM, INDEX_K
RECIPES = ["Flat", "HNSW16", "IVF64,Flat", "IVF64,SQ8", "IVF64,PQ8"]
COMPRESSED = ["IVF64,SQ8", "IVF64,PQ8"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_index_scores_equal_user_item_dot_products(recipe: str) -> None:
    item_index, _ = built_index(recipe)
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
    item_index, _ = built_index(recipe)
    assert not item_index.exact_scores and item_index.params["k_factor"] >= 1
    raw_scores, raw_positions = item_index.index.search(USERS, K)
    dots = np.einsum("qd,qkd->qk", USERS, ITEMS[raw_positions])
    assert np.abs(raw_scores - dots).max() > 1e-4


def test_flat_returns_exactly_the_brute_force_top_k() -> None:
    item_index, report = built_index("Flat")
    scores, positions = item_index.search(USERS, K)
    expected_scores, expected_positions = brute_force_top_k(USERS, K)
    np.testing.assert_array_equal(positions, expected_positions)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert report["recall@10"] == 1.0 and report["params"] == {}


def test_exact_search_subset_ranks_only_the_subset() -> None:
    item_index, _ = built_index("IVF64,SQ8")
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
    item_index, _ = built_index("IVF64,Flat")
    scores, positions = item_index.similar(42, K)
    assert len(positions) == K and 42 not in positions
    np.testing.assert_allclose(scores, ITEMS[positions] @ ITEMS[42], rtol=1e-5, atol=1e-5)
    assert item_index.positions_of(["item-42", "unknown"]).tolist() == [42, -1]


@pytest.mark.parametrize("recipe", ["Flat", "HNSW16", "IVF64,SQ8"])
def test_save_load_roundtrip_keeps_results_identical(tmp_path: Path, recipe: str) -> None:
    item_index, report = built_index(recipe)
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
    item_index, report = built_index("Flat")
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
    item_index, report = built_index("Flat")
    save_index(item_index, tmp_path / "idx", report)
    path = tmp_path / "idx" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=name):
        load_index(tmp_path / "idx")


def test_wrong_model_version_is_refused_naming_both_versions(tmp_path: Path) -> None:
    item_index, report = built_index("Flat")
    save_index(item_index, tmp_path / "idx", report)
    with pytest.raises(VersionMismatchError) as info:
        load_index(tmp_path / "idx", expected_model_version="model-b")
    assert "model-a" in str(info.value) and "model-b" in str(info.value)


def test_wrong_dim_is_refused(tmp_path: Path) -> None:
    item_index, report = built_index("Flat")
    save_index(item_index, tmp_path / "idx", report)
    with pytest.raises(ArtifactError, match=f"says dim {DIM}, but the model.s dim is 16"):
        load_index(tmp_path / "idx", expected_dim=16)


def test_non_inner_product_index_is_refused(tmp_path: Path) -> None:
    l2 = faiss.IndexFlatL2(DIM)
    l2.add(ITEMS)
    with pytest.raises(ArtifactError, match="not inner product"):
        ItemIndex(l2, ITEM_IDS, ITEMS, recipe="Flat", model_version="m")
    # An artifact whose index file is L2 (checksums and manifest otherwise valid) is refused at load.
    item_index, report = built_index("Flat")
    directory = tmp_path / "idx"
    save_index(item_index, directory, report)
    faiss.write_index(l2, str(directory / "index.faiss"))
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").unlink()
    artifacts.write_manifest(directory, {k: v for k, v in manifest.items() if k != "files"})
    with pytest.raises(ArtifactError, match="not inner product"):
        load_index(directory)


def test_the_exact_index_ranks_exactly_as_brute_force() -> None:
    index = exact_index(ITEMS[:2000], ITEM_IDS[:2000], model_version="m")
    assert (index.recipe, index.exact_scores, index.params) == ("Flat", True, {})
    scores, positions = index.search(USERS[:50], K)
    expected = USERS[:50] @ ITEMS[:2000].T
    order = np.argsort(-expected, axis=1, kind="stable")[:, :K]
    np.testing.assert_array_equal(positions, order)
    np.testing.assert_allclose(scores, np.take_along_axis(expected, order, axis=1), rtol=1e-5, atol=1e-5)
