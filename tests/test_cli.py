"""`twotower`: every recipe setting is a generated flag that reaches the artifact, unknown or ill-typed settings are
refused, errors are reported one way (stderr, exit 2; 1 for a missed recall target), and the online side's
commands are handed to `python -m service`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import redis

from training.artifacts import ArtifactStore, LoadedModel, load_model
from training.cli import main
from training.config import settable_fields
from training.redis_keys import RedisKeys

ROOT = Path(__file__).resolve().parents[1]


def store_with(tmp_path: Path, model: LoadedModel) -> ArtifactStore:
    """A private artifacts root holding a copy of the model artifact."""
    store = ArtifactStore(tmp_path / "artifacts")
    shutil.copytree(model.directory, store.model_dir(model.version))
    return store


def catalog_csv(catalog: pd.DataFrame, path: Path) -> Path:
    table = catalog.rename_axis("item_id").reset_index()
    table["genres"] = ["|".join(g) for g in table["genres"]]
    table.to_csv(path, index=False)
    return path


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`twotower ARGV` in a fresh process (`python -m training` is the same entry point)."""
    return subprocess.run(
        [sys.executable, "-m", "training", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_train_has_a_flag_for_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name, setting in settable_fields().items():
        flag = "--" + name.replace("_", "-")
        assert flag in out, flag
        if setting.is_bool:
            assert f"--no-{name.replace('_', '-')}" in out


def test_train_flags_reach_the_artifact_and_evaluate_scores_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--synthetic-users", "120", "--synthetic-items", "80", "--artifacts", str(tmp_path)]
    argv = ["train", *data, "-q", "--epochs", "2", "--eval-every", "1", "--refit", "never", "--history-keep", "0.5"]
    argv += ["--dim", "8", "--combine", "mlp", "--hidden", "16,8", "--no-use-user-features", "--loss", "bpr"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    [version] = ArtifactStore(tmp_path).model_versions()
    assert f"model {version} written" in out and json.loads(out[out.index("{") :])["best_epoch"] >= 1
    manifest = load_model(ArtifactStore(tmp_path).model_dir(version)).manifest
    training, tower = manifest["training"], manifest["tower_config"]
    assert (training["epochs"], training["refit"], training["history_keep"], training["loss"]) == (
        2,
        "never",
        0.5,
        "bpr",
    )
    assert (tower["dim"], tower["combine"], tower["hidden"], tower["use_user_features"]) == (8, "mlp", [16, 8], False)

    assert main(["evaluate", *data]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == version and 0 <= result["two_tower"]["ndcg@10"] <= 1


def test_unknown_and_ill_typed_settings_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--artifacts", str(tmp_path), "--no-such-setting", "1"])
    assert info.value.code == 2
    assert "unrecognized arguments: --no-such-setting" in capsys.readouterr().err
    assert main(["train", "--artifacts", str(tmp_path), "--lr", "fast"]) == 2
    assert "twotower train: error: setting 'lr' takes float, got 'fast'" in capsys.readouterr().err
    assert main(["train", "--artifacts", str(tmp_path), "--combine", "concat"]) == 2
    assert "setting 'combine' takes one of ['mlp', 'sum']" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_evaluate_refuses_a_model_without_a_test_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--synthetic-users", "60", "--synthetic-items", "40", "--artifacts", str(tmp_path)]
    assert main(["train", *data, "-q", "--epochs", "1", "--eval-every", "1", "--holdout", "0"]) == 0
    capsys.readouterr()
    assert main(["evaluate", *data]) == 2
    assert "has no test split" in capsys.readouterr().err
    assert main(["evaluate", "--artifacts", str(tmp_path / "empty")]) == 2
    assert "run `twotower train` first" in capsys.readouterr().err


def test_serve_and_load_features_are_handed_to_the_service() -> None:
    for command, flags in (("serve", ("--host", "--port", "--access-log")), ("load-features", ("--redis-url",))):
        done = run(command, "--help")
        assert done.returncode == 0, done.stderr
        assert f"usage: twotower {command}" in done.stdout
        assert all(flag in done.stdout for flag in flags)


def test_the_services_own_info_lines_reach_stderr_when_served() -> None:
    # uvicorn sets up only its own loggers; a swap logged by the watcher must still show in `docker logs`.
    code = (
        "import logging; from service.__main__ import configure_logging; configure_logging('info'); "
        "logging.getLogger('service.watcher').info('swapped to index idx-1'); "
        "logging.getLogger('service.watcher').debug('not at info')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "INFO service.watcher: swapped to index idx-1" in done.stderr
    assert "not at info" not in done.stderr


def test_load_features_writes_the_active_models_users_into_redis(
    trained_model: LoadedModel, tmp_path: Path, redis_url: str
) -> None:
    store = store_with(tmp_path, trained_model)
    keys = RedisKeys("cli:")
    argv = ["load-features", "-q", "--artifacts", str(store.root), "--redis-url", redis_url]
    done = run(*argv, env={"TWOTOWER_REDIS_PREFIX": keys.prefix})
    assert done.returncode == 0, done.stderr
    users = trained_model.users()
    assert f"loaded features and histories of {len(users)} users (model {trained_model.version})" in done.stdout
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        user = str(users.index[0])
        assert client.lrange(keys.user_history(user), 0, -1) == [str(i) for i in users.loc[user, "history"]]
    finally:
        client.close()


def test_cli_reindex_help_lists_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["reindex", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--artifacts", "--model", "--catalog", "--recipe", "--recall-target", "--redis-url"):
        assert flag in out


def test_cli_reindex_publishes_and_prints_version_recipe_params_and_recall(
    trained_model: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_with(tmp_path, trained_model)
    catalog = trained_model.catalog()
    new = pd.DataFrame({"genres": [["g1"]], "year": [2001]}, index=pd.Index(["brand-new"], name="item_id"))
    csv = catalog_csv(pd.concat([catalog, new]), tmp_path / "items.csv")
    argv = ["reindex", "--artifacts", str(store.root), "--catalog", str(csv), "--recipe", "IVF4,Flat", "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    version = store.active_index()
    assert version is not None and f"index {version} published" in out
    summary = json.loads(out[out.index("{") :])
    assert summary["index_version"] == version and summary["model_version"] == trained_model.version
    assert summary["recipe"] == "IVF4,Flat" and "nprobe" in summary["params"]
    assert summary["recall@10"] >= 0.95 and summary["items"] == len(catalog) + 1
    assert main(argv) == 0
    assert "already active" in capsys.readouterr().out and store.index_versions() == [version]


def test_cli_reindex_exits_non_zero_and_keeps_the_active_index_when_refused(
    trained_model: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_with(tmp_path, trained_model)
    assert main(["reindex", "--artifacts", str(store.root), "-q"]) == 0
    active = store.active_index()
    capsys.readouterr()
    assert main(["reindex", "--artifacts", str(store.root), "--recipe", "IVF4,Flat", "--recall-target", "1.01"]) == 1
    assert "not published" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,year\ni1,1990\n")
    assert main(["reindex", "--artifacts", str(store.root), "--catalog", str(bad)]) == 2
    assert "missing feature column ['genres']" in capsys.readouterr().err
    assert store.active_index() == active and store.index_versions() == [active]
