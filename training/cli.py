"""`twotower`: the one console command. Subcommands: train, evaluate, reindex, serve, load-features.

Each subcommand parses its own flags and calls into the module that owns the work; nothing here computes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.artifacts import ArtifactStore
    from training.data import Dataset

DEFAULT_ARTIFACTS = Path("artifacts")
ARTIFACTS_HELP = "artifacts root (default: $TWOTOWER_ARTIFACTS or ./artifacts)"


def _artifacts(args: argparse.Namespace) -> Path:
    """--artifacts, else $TWOTOWER_ARTIFACTS, else ./artifacts: one rule for every subcommand."""
    return args.artifacts or Path(os.environ.get("TWOTOWER_ARTIFACTS", DEFAULT_ARTIFACTS))


def _dataset(path: str | None, synthetic_users: int, synthetic_items: int, seed: int) -> Dataset:
    from training.data import load_dataset, synthetic

    if path:
        return load_dataset(path)
    dataset = synthetic(n_users=synthetic_users, n_items=synthetic_items, seed=seed)
    logging.getLogger("twotower").info("no --data given: using the built-in %s", dataset.describe())
    return dataset


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="dataset folder or file (format detected); default: built-in synthetic data")
    parser.add_argument("--synthetic-users", type=int, default=2000, help="synthetic data: number of users")
    parser.add_argument("--synthetic-items", type=int, default=1000, help="synthetic data: number of items")


def cmd_train(args: argparse.Namespace) -> int:
    from training.artifacts import ArtifactStore
    from training.model import TowerConfig
    from training.train import TrainConfig, train_and_save

    dataset = _dataset(args.data, args.synthetic_users, args.synthetic_items, args.seed)
    tower = TowerConfig(dim=args.dim, normalize=args.normalize, use_user_features=not args.no_user_features)
    config = TrainConfig(
        loss=args.loss,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        temperature=args.temperature,
        margin=args.margin,
        negatives=args.negatives,
        seed=args.seed,
        max_seconds=args.max_seconds,
        tower=tower,
    )
    model_dir = train_and_save(
        dataset, ArtifactStore(_artifacts(args)), config, holdout=args.holdout, progress=not args.quiet
    )
    metrics = json.loads((model_dir / "metrics.json").read_text())
    metrics.pop("curves", None)
    print(f"model {model_dir.name} written to {model_dir}")
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.artifacts import ArtifactStore, load_model
    from training.data import split_random
    from training.evaluate import Protocol
    from training.train import evaluate

    store = ArtifactStore(_artifacts(args))
    loaded = load_model(store.model_dir(args.model or store.latest_model()))
    training = loaded.manifest["training"]
    seed, holdout = training["seed"], training["holdout"]
    # Only the split the model was trained on is a fair test: any other split puts training rows in the test set.
    if not holdout:
        raise SystemExit(f"model {loaded.version} was trained on every row (holdout 0): it has no test split")
    dataset = _dataset(args.data, args.synthetic_users, args.synthetic_items, seed)
    if dataset.name != training["dataset"]:
        raise SystemExit(f"model {loaded.version} was trained on {training['dataset']}, not on {dataset.name}")
    train, test = split_random(dataset.interactions, holdout, seed=seed)
    result = {
        "model": loaded.version,
        "split_seed": seed,
        "two_tower": evaluate(loaded.model, dataset, train, test).as_dict(),
        "popularity": Protocol(list(dataset.items.index), train, test).popularity(train).as_dict(),
    }
    print(json.dumps(result, indent=2))
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    from training.artifacts import MANIFEST, ArtifactError, ArtifactStore
    from training.index import RecallTargetError
    from training.reindex import CatalogError, reindex

    artifacts = _artifacts(args)
    store = ArtifactStore(artifacts)
    before = store.active_index()
    try:
        version = reindex(
            store,
            model_version=args.model,
            catalog=args.catalog,
            recipe=args.recipe,
            recall_target=args.recall_target,
            redis_url=args.redis_url or os.environ.get("TWOTOWER_REDIS_URL") or None,
            redis_prefix=args.redis_prefix or os.environ.get("TWOTOWER_REDIS_PREFIX") or "twotower:",
            progress=not args.quiet,
        )
    except RecallTargetError as e:
        print(f"not published (active index unchanged: {before}): {e}", file=sys.stderr)
        return 1
    except (CatalogError, ArtifactError, ValueError) as e:
        print(f"not published (active index unchanged: {before}): {e}", file=sys.stderr)
        return 2
    manifest = json.loads((store.index_dir(version) / MANIFEST).read_text())
    k = manifest["recall_k"]
    if version == before:
        print(f"index {version} is already active for this model, catalog and recipe: nothing published")
    else:
        print(f"index {version} published to {store.index_dir(version)} and active")
    summary = {
        "index_version": version,
        "model_version": manifest["model_version"],
        "items": manifest["item_count"],
        "new_items": manifest.get("new_items"),
        "recipe": manifest["recipe"],
        "params": manifest["params"],
        f"recall@{k}": manifest[f"recall@{k}"],
        "recall_target": manifest["recall_target"],
        "latency": manifest.get("latency"),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _active_model_version(store: ArtifactStore) -> str:
    """The model the active index was built from (the pair the service will serve); else the newest model."""
    from training.artifacts import MANIFEST

    active = store.active_index()
    if active is None:
        version = store.latest_model()
        logging.getLogger("twotower").warning("no active index yet: using the newest model, %s", version)
        return version
    return str(json.loads((store.index_dir(active) / MANIFEST).read_text())["model_version"])


def _example_user(artifacts: Path) -> str:
    """A user id the served model knows, for the printed curl example (best effort)."""
    from training.artifacts import VOCABULARIES, ArtifactError, ArtifactStore

    try:
        store = ArtifactStore(artifacts)
        users = json.loads((store.model_dir(_active_model_version(store)) / VOCABULARIES).read_text())["user_ids"]
        return str(users[0]) if users else "some-user"
    except (OSError, ValueError, KeyError, ArtifactError):
        return "some-user"


def cmd_serve(args: argparse.Namespace) -> int:
    from service.__main__ import serve

    artifacts = _artifacts(args)
    base = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    body = json.dumps({"user_id": _example_user(artifacts), "k": 5})
    print(f"serving {artifacts} on {base} (API docs: {base}/docs, readiness: {base}/readyz); try:")
    print(f"  curl -s -X POST {base}/v1/recommendations -H 'content-type: application/json' -d '{body}'")
    serve(args.host, args.port, artifacts=artifacts, access_log=args.access_log, log_level=args.log_level)
    return 0


def cmd_load_features(args: argparse.Namespace) -> int:
    import asyncio

    from tqdm.auto import tqdm

    from service.settings import Settings
    from service.store import load_users_into_redis
    from training.artifacts import ArtifactStore, load_model

    flags = {"artifacts": args.artifacts, "redis_url": args.redis_url, "data_dir": args.data_dir}
    settings = Settings(**{name: value for name, value in flags.items() if value is not None})
    store = ArtifactStore(settings.artifacts)
    version = args.model or _active_model_version(store)
    users = load_model(store.model_dir(version)).users()
    target = settings.redis_url or f"the embedded Redis under {settings.data_dir / 'redis'}"
    with tqdm(total=len(users), unit="user", desc="load features", disable=args.quiet) as bar:
        written = asyncio.run(
            load_users_into_redis(
                users,
                url=settings.redis_url,
                data_dir=settings.data_dir,
                prefix=settings.redis_prefix,
                max_history=settings.max_history,
                on_progress=bar.update,
            )
        )
    print(f"loaded features and histories of {written} users (model {version}) into {target}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from training.losses import LOSSES
    from training.model import TowerConfig
    from training.train import TrainConfig

    parser = argparse.ArgumentParser(prog="twotower", description="Two-tower retrieval: train, index, serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train the towers and write a model artifact",
        description="Train on a dataset (default: synthetic), evaluate, write models/<version>/.",
    )
    _add_data_args(train)
    train.add_argument("--artifacts", type=Path, default=None, help=ARTIFACTS_HELP)
    # Defaults come from TrainConfig / TowerConfig: the recipe measured best (docs/loss.md).
    defaults, tower = TrainConfig(), TowerConfig()
    train.add_argument(
        "--loss",
        choices=LOSSES,
        default=defaults.loss,
        help="training loss (default: %(default)s, the best measured; see docs/loss.md)",
    )
    train.add_argument(
        "--negatives",
        choices=["uniform", "popularity"],
        default=defaults.negatives,
        help="negative sampler for bpr/triplet (default: %(default)s)",
    )
    train.add_argument("--epochs", type=int, default=defaults.epochs, help="maximum epochs (early stopping)")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="users per step")
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--temperature", type=float, default=defaults.temperature, help="softmax temperature")
    train.add_argument("--margin", type=float, default=defaults.margin, help="triplet margin")
    train.add_argument("--dim", type=int, default=tower.dim, help="embedding dimension")
    train.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=tower.normalize,
        help="L2-normalise tower outputs (score = cosine)",
    )
    train.add_argument(
        "--no-user-features", action="store_true", help="user tower without user features (best on MovieLens)"
    )
    train.add_argument("--holdout", type=float, default=0.2, help="test fraction (0: train on everything)")
    train.add_argument("--seed", type=int, default=defaults.seed, help="split and training seed")
    train.add_argument("--max-seconds", type=float, default=None, help="stop training after this long")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "evaluate",
        help="evaluate a model artifact on its test split (DESIGN §4)",
        description="Re-create the model's split and score it through an exact FAISS IP index.",
    )
    _add_data_args(ev)
    ev.add_argument("--artifacts", type=Path, default=None, help=ARTIFACTS_HELP)
    ev.add_argument("--model", help="model version (default: the newest)")
    ev.set_defaults(func=cmd_evaluate)

    rx = sub.add_parser(
        "reindex",
        help="embed the current catalog with a model's item tower, build an index and publish it",
        description="Run the item tower over the current catalog (items new since training included), build a "
        "FAISS inner-product index, measure its recall@10 against exact search with the model's own users as "
        "queries, and publish indexes/<version>/ and the ACTIVE_INDEX pointer only if it meets the target. "
        "Re-running on the same model, catalog and recipe publishes nothing. Exit status: 0 published (or "
        "already active), 1 recall target missed, 2 bad input (catalog, model or recipe); on 1 and 2 nothing "
        "is published and the active index stays.",
    )
    rx.add_argument("--artifacts", type=Path, default=None, help=ARTIFACTS_HELP)
    rx.add_argument("--model", help="model version (default: the newest)")
    rx.add_argument(
        "--catalog",
        type=Path,
        metavar="ITEMS_FILE",
        help="items .parquet or .csv: item_id + the model's item feature columns (multi-valued: lists in Parquet, "
        "'|'-separated in CSV); default: the catalog the model was trained with",
    )
    rx.add_argument(
        "--recipe",
        default="auto",
        help="FAISS factory string (Flat, HNSW32, IVF1000,Flat, IVF1000,SQ8, IVF1000,PQ16, ...) or auto: chosen "
        "from the catalog size and the target (default: %(default)s)",
    )
    rx.add_argument(
        "--recall-target", type=float, default=0.95, help="minimum recall@10 against exact search (default: 0.95)"
    )
    rx.add_argument(
        "--redis-url",
        default=None,
        help="also SET the active index in Redis and PUBLISH it (default: $TWOTOWER_REDIS_URL)",
    )
    rx.add_argument(
        "--redis-prefix", default=None, help="Redis key prefix (default: $TWOTOWER_REDIS_PREFIX or twotower:)"
    )
    rx.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    rx.set_defaults(func=cmd_reindex)

    from service.__main__ import add_serve_args  # the server's flags are defined beside the server

    serve = sub.add_parser(
        "serve",
        help="run the HTTP service (FastAPI under uvicorn)",
        description="Serve recommendations from the active index and its model; configuration from TWOTOWER_* "
        "environment variables (see service/settings.py), Redis embedded unless TWOTOWER_REDIS_URL is set.",
    )
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)

    load = sub.add_parser(
        "load-features",
        help="load users' features and histories from a model artifact into Redis",
        description="Bulk-write (pipelined) the users table of a model artifact into Redis, so a fresh stack "
        "serves known users. Redis: --redis-url, else $TWOTOWER_REDIS_URL, else the embedded one under the data dir.",
    )
    load.add_argument("--artifacts", type=Path, default=None, help=ARTIFACTS_HELP)
    load.add_argument("--model", help="model version (default: the model of the active index)")
    load.add_argument("--redis-url", default=None, help="Redis URL (default: $TWOTOWER_REDIS_URL, else embedded)")
    load.add_argument("--data-dir", type=Path, default=None, help="embedded Redis data dir (default: ./data)")
    load.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    load.set_defaults(func=cmd_load_features)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else list(argv))[:1] == ["serve"]:
        # Read by OpenBLAS when numpy loads, which building the parser does: one BLAS thread per serving process,
        # like torch and FAISS (TWOTOWER_THREADS); spinning BLAS workers stalled requests on a busy machine.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", os.environ.get("TWOTOWER_THREADS", "1"))
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # faiss logs which CPU build it tried at INFO, as tracebacks; only its warnings matter to a user.
    logging.getLogger("faiss").setLevel(logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
