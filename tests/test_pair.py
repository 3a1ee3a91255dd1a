"""`service.pair.load_pair`: an index is served only with the model it was built from, checked three ways (the
manifests, the model directory's own version, the item vectors against the item tower)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.pair import load_pair
from tests.helpers import copy_model, derived_model, publish_index, serving_root
from training.artifacts import MANIFEST, ArtifactError, ArtifactStore, LoadedModel, VersionMismatchError, write_manifest


def test_load_pairs_the_active_index_with_the_model_it_names(trained_model: LoadedModel, tmp_path: Path) -> None:
    model_version, index_version = serving_root(trained_model, tmp_path)
    pair = load_pair(ArtifactStore(tmp_path), index_version)
    assert (pair.model_version, pair.index_version) == (model_version, index_version)
    assert len(pair.index) == trained_model.manifest["item_count"]


def test_an_index_whose_model_directory_holds_another_version_is_refused_naming_both(
    trained_model: LoadedModel, tmp_path: Path
) -> None:
    copy_model(trained_model, tmp_path)
    # A copy of the model under another name: its manifest still says which training run it is.
    renamed = ArtifactStore(tmp_path).model_dir("renamed-model")
    ArtifactStore(tmp_path).models.joinpath(trained_model.version).rename(renamed)
    index_version = publish_index(tmp_path, "renamed-model")
    with pytest.raises(VersionMismatchError) as info:
        load_pair(ArtifactStore(tmp_path), index_version)
    assert "renamed-model" in str(info.value)
    assert trained_model.version in str(info.value)
    assert index_version in str(info.value)


def test_an_index_of_vectors_from_another_item_tower_is_refused(trained_model: LoadedModel, tmp_path: Path) -> None:
    copy_model(trained_model, tmp_path)
    other = derived_model(trained_model, tmp_path, seed=1)
    _, vectors = trained_model.item_embeddings()
    index_version = publish_index(tmp_path, other, vectors=vectors)  # manifest: `other`; vectors: the first model's
    with pytest.raises(VersionMismatchError, match="item vectors differ"):
        load_pair(ArtifactStore(tmp_path), index_version)


def test_a_pair_prepares_the_served_user_tower_and_the_cold_vector(trained_model: LoadedModel, tmp_path: Path) -> None:
    _, index_version = serving_root(trained_model, tmp_path)
    pair = load_pair(ArtifactStore(tmp_path), index_version)
    users = trained_model.users().head(4)
    features = [{name: users.loc[u, name] for name in pair.user_feature_names} for u in users.index]
    histories = [[str(i) for i in users.loc[u, "history"]] for u in users.index]
    served = pair.embed(list(users.index), features, histories)
    torch_pair = load_pair(ArtifactStore(tmp_path), index_version, user_tower="torch")
    np.testing.assert_allclose(served, torch_pair.embed(list(users.index), features, histories), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pair.cold_vector, pair.embed([None], [{}], [[]])[0], rtol=1e-6)


def test_an_index_with_non_finite_vectors_is_refused_naming_the_file(
    trained_model: LoadedModel, tmp_path: Path
) -> None:
    index_version = serving_root(trained_model, tmp_path)[1]
    directory = ArtifactStore(tmp_path).index_dir(index_version)
    vectors = np.load(directory / "item_vectors.npy")
    vectors[3, 0] = np.nan
    np.save(directory / "item_vectors.npy", vectors)
    manifest = json.loads((directory / MANIFEST).read_text())
    write_manifest(directory, {k: v for k, v in manifest.items() if k != "files"})  # written so: checksums agree
    with pytest.raises(ArtifactError, match=r"item_vectors\.npy holds non-finite values"):
        load_pair(ArtifactStore(tmp_path), index_version)
