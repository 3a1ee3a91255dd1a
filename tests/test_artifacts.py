"""training.artifacts: model artifacts rebuilt from their manifest alone and refused, naming the file, when any
part does not match; atomic publishing; version names; the store's listing and pointers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch

from training.artifacts import (
    MANIFEST,
    ArtifactError,
    ArtifactStore,
    LoadedModel,
    check_version,
    load_model,
    load_vocabularies,
    new_version,
    publishing,
    save_model,
    sha256_file,
    write_manifest,
)
from training.dataset import Dataset
from training.features import encode_item_frame
from training.model import TwoTower, embed_items


def test_loaded_model_reproduces_the_saved_item_embeddings(trained_model: LoadedModel, tiny_dataset: Dataset) -> None:
    reloaded = load_model(trained_model.directory)
    ids, saved = reloaded.item_embeddings()
    assert ids == list(tiny_dataset.items.index)
    np.testing.assert_allclose(
        embed_items(reloaded.model, encode_item_frame(tiny_dataset.spec, reloaded.model.vocabs, tiny_dataset.items)),
        saved,
        rtol=1e-5,
        atol=1e-6,
    )


def _copy(model: LoadedModel, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model.directory, tmp_path / model.version))


def test_corrupted_weights_are_refused_naming_the_file(trained_model: LoadedModel, tmp_path: Path) -> None:
    copy = _copy(trained_model, tmp_path)
    data = bytearray((copy / "user_tower.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "user_tower.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"user_tower\.safetensors is corrupted"):
        load_model(copy)


def test_weights_that_do_not_fit_the_manifest_are_refused_naming_the_file(
    trained_model: LoadedModel, tmp_path: Path
) -> None:
    copy = _copy(trained_model, tmp_path)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["tower_config"]["dim"] = 8
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"user_tower\.safetensors does not fit"):
        load_model(copy)


def test_manifest_without_a_full_tower_config_is_refused(trained_model: LoadedModel, tmp_path: Path) -> None:
    copy = _copy(trained_model, tmp_path)
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["tower_config"]["combine"]  # as written before the field existed
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="lacks combine"):
        load_model(copy)


def test_vocabularies_from_another_run_are_refused(trained_model: LoadedModel, tmp_path: Path) -> None:
    copy = _copy(trained_model, tmp_path)
    vocab = json.loads((copy / "vocabularies.json").read_text())
    vocab["item_ids"] = list(reversed(vocab["item_ids"]))
    (copy / "vocabularies.json").write_text(json.dumps(vocab))
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["vocabularies.json"]["sha256"] = sha256_file(copy / "vocabularies.json")
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="vocab_hash"):
        load_model(copy)


def test_store_lists_versions_and_finds_the_newest(trained_model: LoadedModel, artifacts_root: Path) -> None:
    store = ArtifactStore(artifacts_root)
    assert trained_model.version in store.model_versions()
    assert store.latest_model() == store.model_versions()[-1]
    with pytest.raises(ArtifactError, match="twotower train"):
        ArtifactStore(artifacts_root / "empty").latest_model()


def test_vocabularies_load_alone_and_equal_the_models(trained_model: LoadedModel) -> None:
    vocabs = load_vocabularies(trained_model.directory)
    assert vocabs.digest() == trained_model.model.vocabs.digest() == trained_model.manifest["vocab_hash"]


def test_publishing_is_all_or_nothing(tmp_path: Path) -> None:
    final = tmp_path / "models" / "v1"
    with pytest.raises(RuntimeError, match="boom"), publishing(final) as tmp:
        (tmp / "half-written").write_text("x")
        raise RuntimeError("boom")
    assert not final.exists() and list((tmp_path / "models").iterdir()) == []  # no temporary left behind
    with publishing(final) as tmp:
        (tmp / "done").write_text("x")
    assert (final / "done").read_text() == "x"
    with pytest.raises(ArtifactError, match="immutable"), publishing(final):
        pass


def test_version_names_are_plain_directory_names(tmp_path: Path) -> None:
    made = [new_version("idx-") for _ in range(3)]
    assert made == sorted(made) and len(set(made)) == 3  # sortable by creation, unique
    assert all(check_version(v) == v for v in [*made, "my-model_1.2"])
    for bad in ("", "../models", "a/b", ".hidden", "x" * 200):
        with pytest.raises(ArtifactError, match="not a valid artifact version name"):
            check_version(bad)


def test_the_active_pointer_moves_only_to_an_existing_index_and_names_its_model(
    trained_model: LoadedModel, tmp_path: Path
) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(ArtifactError, match="run `twotower train` first"):
        store.active_model()
    shutil.copytree(trained_model.directory, store.model_dir(trained_model.version))
    assert store.active_index() is None and store.active_model() == trained_model.version  # the newest model
    with pytest.raises(ArtifactError, match="does not exist"):
        store.set_active_index("idx-missing")
    assert store.active_index() is None


def _saved_with_weights(trained: LoadedModel, root: Path, poison: Callable[[TwoTower], None]) -> Path:
    """The trained model, changed by `poison`, saved as a complete artifact (its manifest checksums what it holds)."""
    model = deepcopy(trained.model)
    with torch.no_grad():
        poison(model)
    catalog = trained.catalog()
    return save_model(
        ArtifactStore(root),
        model,
        catalog=catalog,
        users=trained.users(),
        item_embeddings=embed_items(model, encode_item_frame(model.spec, model.vocabs, catalog)),
        training=trained.manifest["training"],
        metrics={},
    )


@pytest.mark.parametrize(("tower", "value"), [("user_tower", float("nan")), ("item_tower", float("inf"))])
def test_non_finite_weights_in_either_tower_are_refused_naming_the_file(
    trained_model: LoadedModel, tmp_path: Path, tower: str, value: float
) -> None:
    def poison(model: TwoTower) -> None:
        next(getattr(model, tower).parameters()).view(-1)[0] = value

    directory = _saved_with_weights(trained_model, tmp_path, poison)
    with pytest.raises(ArtifactError, match=rf"{tower}\.safetensors holds non-finite values"):
        load_model(directory)


def test_a_safetensors_file_with_a_damaged_header_is_refused_naming_the_file(
    trained_model: LoadedModel, tmp_path: Path
) -> None:
    directory = _copy(trained_model, tmp_path)
    data = bytearray((directory / "item_tower.safetensors").read_bytes())
    data[8:16] = b"\x00garbage"  # inside the JSON header
    (directory / "item_tower.safetensors").write_bytes(bytes(data))
    manifest = json.loads((directory / MANIFEST).read_text())
    # checksums agree: only the header is bad
    write_manifest(directory, {k: v for k, v in manifest.items() if k != "files"})
    with pytest.raises(ArtifactError, match=r"item_tower\.safetensors is not a readable safetensors file"):
        load_model(directory)
