import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from training.artifacts import MANIFEST, ArtifactError, ArtifactStore, LoadedModel, load_model, sha256_file
from training.data import Dataset, split_random
from training.features import encode_users
from training.model import TwoTower, embed_items, embed_users
from training.train import TrainConfig, Trainer, TrainingData, encode_catalog, fit

from .conftest import TINY_CONFIG


def test_model_beats_popularity_on_planted_data_by_a_clear_margin(trained_model: LoadedModel) -> None:
    metrics = trained_model.manifest["metrics"]
    model_ndcg, popularity_ndcg = metrics["test"]["ndcg@10"], metrics["test_popularity"]["ndcg@10"]
    assert model_ndcg > popularity_ndcg + 0.1, (model_ndcg, popularity_ndcg)


def test_training_writes_curves_plot_beside_metrics(trained_model: LoadedModel) -> None:
    metrics = json.loads((trained_model.directory / "metrics.json").read_text())
    assert len(metrics["curves"]) >= 1 and {"loss", "val_ndcg@10"} <= metrics["curves"][0].keys()
    assert (trained_model.directory / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("loss", ["softmax", "bpr", "triplet"])
def test_training_is_deterministic_given_a_seed(tiny_dataset: Dataset, loss: str) -> None:
    train, _ = split_random(tiny_dataset.interactions, 0.2, seed=1)
    config = TrainConfig(**{**TINY_CONFIG.__dict__, "epochs": 2, "loss": loss})
    first, second = (fit(tiny_dataset, train, config, progress=False).model.state_dict() for _ in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("history_keep", [0.5, 0.95])  # at 0.95 many users draw no target and get one back
def test_batch_history_never_contains_its_targets(tiny_dataset: Dataset, history_keep: float) -> None:
    data = TrainingData(tiny_dataset, tiny_dataset.interactions)
    config = TrainConfig(history_keep=history_keep, id_dropout=0.0)
    trainer = Trainer(TwoTower(tiny_dataset.spec, data.vocabs), data, config)
    batch = trainer.batch(np.arange(len(data)))
    targets = data.items.ids[batch.positives]  # (T,) vocabulary ids
    assert not (batch.users.history[batch.owner] == targets[:, None]).any()
    # Every user has targets, and history plus targets are exactly the user's items.
    assert set(batch.owner.tolist()) == set(range(len(data)))
    for row in (0, 1, len(data) - 1):
        shown = set(batch.users.history[row][batch.users.history[row] != 0].tolist())
        hidden = set(targets[batch.owner == row].tolist())
        assert shown | hidden == set(data.items.ids[data.items_of(row)].tolist())


def test_unknown_user_with_a_cluster_history_gets_that_clusters_items(
    trained_model: LoadedModel, tiny_dataset: Dataset
) -> None:
    model = trained_model.model
    cluster = np.array([genres[0] for genres in tiny_dataset.items.genres])  # planted: first genre = cluster
    item_vectors = embed_items(model, encode_catalog(model, tiny_dataset))
    clusters = sorted(set(cluster))
    histories = [list(tiny_dataset.items.index[cluster == c][:8]) for c in clusters]
    users = encode_users(model.spec, model.vocabs, ["never-seen"] * len(clusters), {}, histories)
    top = np.argsort(-(embed_users(model, users) @ item_vectors.T), axis=1)[:, :10]  # (C, 10)
    in_cluster = np.mean([cluster[row] == c for row, c in zip(top, clusters, strict=True)])
    assert in_cluster >= 0.5, in_cluster  # chance is 1/6


def test_loaded_model_reproduces_the_saved_item_embeddings(trained_model: LoadedModel, tiny_dataset: Dataset) -> None:
    reloaded = load_model(trained_model.directory)
    ids, saved = reloaded.item_embeddings()
    assert ids == list(tiny_dataset.items.index)
    np.testing.assert_allclose(
        embed_items(reloaded.model, encode_catalog(reloaded.model, tiny_dataset)), saved, rtol=1e-5, atol=1e-6
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
