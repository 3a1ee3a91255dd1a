"""`twotower`: the one console command. Subcommands: train, tune, evaluate, reindex, export-events, retrain, serve,
load-features.

Each subcommand parses its flags and calls the module that owns the work; nothing here computes. `serve` and
`load-features` belong to the online side: they are handed to `python -m service` (the process is replaced, so
signals reach the server directly), and nothing offline imports the service. Every setting of the training
recipe (`training.config`) is a generated `twotower train` flag. Errors are reported one way, by `main`: the
subcommand and the message on stderr, exit status 1 for a missed recall target, 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from training.dataset import Dataset

DEFAULT_ARTIFACTS = Path("artifacts")
ARTIFACTS_HELP = "artifacts root (default: $TWOTOWER_ARTIFACTS or ./artifacts)"
# Subcommands of the online side, run by `python -m service`.
SERVICE_COMMANDS = ("serve", "load-features")

log = logging.getLogger("twotower")


class CommandError(Exception):
    """A subcommand could not do its work; `main` prints the message and exits with `code`."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _artifacts(args: argparse.Namespace) -> Path:
    """--artifacts, else $TWOTOWER_ARTIFACTS, else ./artifacts: one rule for every subcommand."""
    return args.artifacts or Path(os.environ.get("TWOTOWER_ARTIFACTS", DEFAULT_ARTIFACTS))


def _dataset(args: argparse.Namespace, seed: int, record: dict[str, Any] | None = None) -> Dataset:
    """--data (or the synthetic data) plus --events where given; `record` gets the number of exported events read
    (the model's `events_seen`, so `retrain` knows which later events are new to it)."""
    from training.data import load_dataset
    from training.dataset import synthetic
    from training.dataset_cache import default_cache_dir

    if args.data:
        cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
        dataset = load_dataset(args.data, cache_dir=cache)
    else:
        dataset = synthetic(n_users=args.synthetic_users, n_items=args.synthetic_items, seed=seed)
        log.info("no --data given: using the built-in %s", dataset.describe())
    if getattr(args, "events", None):
        from training.dataset import with_events
        from training.event_export import read_events
        from training.retrain import EVENTS_SEEN

        events = read_events(args.events)
        dataset = with_events(dataset, events["user_id"], events["item_id"], events["timestamp"])
        if record is not None:
            record[EVENTS_SEEN] = len(events)
        log.info("with %d exported events from %s: %s", len(events), args.events, dataset.describe())
    return dataset


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="dataset folder or file (format detected); default: built-in synthetic data")
    parser.add_argument("--synthetic-users", type=int, default=2000, help="synthetic data: number of users")
    parser.add_argument("--synthetic-items", type=int, default=1000, help="synthetic data: number of items")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where encoded datasets are kept, by the hash of their input (default: $TWOTOWER_CACHE_DIR or "
        "~/.cache/twotower/datasets)",
    )
    parser.add_argument("--no-cache", action="store_true", help="read and encode the data again, keep nothing")


# --------------------------------------------------------------------------- train


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting of `training.config.settable_fields()`; a flag not given leaves the default."""
    from training.config import settable_fields

    group = parser.add_argument_group("training recipe (every setting of TrainConfig and TowerConfig)")
    for setting in settable_fields().values():
        text = f"{setting.help} (default: {setting.default})".replace("%", "%%")
        if setting.is_bool:
            group.add_argument(
                _flag(setting.name), dest=f"set_{setting.name}", action=argparse.BooleanOptionalAction, help=text
            )
        else:
            choices = typing.get_args(setting.hint) if typing.get_origin(setting.hint) is Literal else None
            metavar = "{" + ",".join(choices) + "}" if choices else "VALUE"
            group.add_argument(_flag(setting.name), dest=f"set_{setting.name}", metavar=metavar, help=text)


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        name.removeprefix("set_"): value
        for name, value in vars(args).items()
        if name.startswith("set_") and value is not None
    }


def cmd_train(args: argparse.Namespace) -> None:
    from training import distributed
    from training.artifacts import ArtifactStore, load_model
    from training.config import TrainConfig, with_overrides
    from training.train import Tuning, choose_device, train_and_save

    config = with_overrides(TrainConfig(), _config_overrides(args))
    if args.nproc > 1 and not distributed.launched():
        _launch(args.nproc)
        return
    distributed.start(choose_device(config.device))
    main = distributed.is_main()
    try:
        # Rank 0 reads (and caches) the data first; the other ranks then read the cached arrays.
        record: dict[str, Any] = {}
        dataset = _dataset(args, config.seed, record) if main else None
        distributed.barrier()
        dataset = dataset if dataset is not None else _dataset(args, config.seed, record)
        store = ArtifactStore(_artifacts(args))
        tuning = Tuning(args.tune, args.tune_seconds, args.tune_storage) if args.tune is not None else None
        warm_from = None
        if args.warm_start:
            warm_from = load_model(
                store.model_dir(store.active_model() if args.warm_start == "active" else args.warm_start)
            )
        model_dir = train_and_save(
            dataset,
            store,
            config,
            holdout=args.holdout,
            progress=not args.quiet,
            tuning=tuning,
            warm_from=warm_from,
            record=record,
        )
    finally:
        distributed.stop()
    if model_dir is not None:
        print(f"model {model_dir.name} written to {model_dir}")
        print(json.dumps(load_model(model_dir).manifest["metrics"], indent=2))


def _launch(nproc: int) -> None:
    """Run this same `twotower train` command as `nproc` processes under PyTorch's elastic launcher (torchrun),
    on this machine; `--nproc` itself is dropped from what each process is given."""
    from torch.distributed.run import main as torchrun

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    torchrun(["--standalone", f"--nproc_per_node={nproc}", "-m", "training", *argv])


def cmd_tune(args: argparse.Namespace) -> None:
    """Search only: add trials to the shared study and print what it knows."""
    from training.artifacts import ArtifactStore
    from training.config import TrainConfig, with_overrides
    from training.train import Tuning, search_recipe, training_split

    config = with_overrides(TrainConfig(), _config_overrides(args))
    dataset = _dataset(args, config.seed)
    train, _ = training_split(dataset, args.holdout, config.seed)
    store = ArtifactStore(_artifacts(args))
    _, searched = search_recipe(
        dataset, train, config, store, Tuning(args.trials, args.tune_seconds, args.tune_storage)
    )
    print(json.dumps({k: v for k, v in searched.items() if k != "history"}, indent=2))


def _add_redis_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=None, help="the service's Redis (default: $TWOTOWER_REDIS_URL)")
    parser.add_argument("--redis-prefix", default=None, help="Redis key prefix (default: $TWOTOWER_REDIS_PREFIX)")


def _add_tuning_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tune-seconds", type=float, default=None, help="stop adding trials after this many seconds")
    parser.add_argument(
        "--tune-storage",
        default=None,
        help="where the study lives, shared by every process that names it: a journal file, or redis://HOST:PORT/DB "
        "(default: <artifacts>/tuning/<study>.journal)",
    )


# --------------------------------------------------------------------------- evaluate


def cmd_evaluate(args: argparse.Namespace) -> None:
    from training.artifacts import ArtifactStore, load_model
    from training.dataset import split_random
    from training.evaluate import Protocol, evaluate

    store = ArtifactStore(_artifacts(args))
    loaded = load_model(store.model_dir(args.model or store.latest_model()))
    training = loaded.manifest["training"]
    seed, holdout = training["seed"], training["holdout"]
    # Only the split the model was trained on is a fair test: any other split puts training rows in the test set.
    if training.get("held_out_rows"):
        raise CommandError(
            f"model {loaded.version} was tested on the newest events of its retrain, not on a random split that "
            "could be drawn again: its test metrics are in its metrics.json"
        )
    if not holdout:
        raise CommandError(f"model {loaded.version} was trained on every row (holdout 0): it has no test split")
    dataset = _dataset(args, seed)
    if dataset.name != training["dataset"]:
        raise CommandError(f"model {loaded.version} was trained on {training['dataset']}, not on {dataset.name}")
    train, test = split_random(dataset.interactions, holdout, seed=seed)
    result = {
        "model": loaded.version,
        "split_seed": seed,
        "two_tower": evaluate(loaded.model, dataset, train, test).as_dict(),
        "popularity": Protocol(train, test).popularity(train).as_dict(),
    }
    print(json.dumps(result, indent=2))


# --------------------------------------------------------------------------- reindex


def cmd_reindex(args: argparse.Namespace) -> None:
    import torch

    from training import distributed
    from training.artifacts import ArtifactError, ArtifactStore
    from training.catalog import CatalogError
    from training.index_build import RecallTargetError
    from training.redis_keys import DEFAULT_PREFIX
    from training.reindex import reindex

    store = ArtifactStore(_artifacts(args))
    before = store.active_index()
    distributed.start(torch.device("cpu"))  # under torchrun the ranks share the catalog's embedding
    main = distributed.is_main()
    try:
        version = reindex(
            store,
            model_version=args.model,
            catalog=args.catalog,
            recipe=args.recipe,
            recall_target=args.recall_target,
            redis_url=args.redis_url or os.environ.get("TWOTOWER_REDIS_URL") or None,
            redis_prefix=args.redis_prefix or os.environ.get("TWOTOWER_REDIS_PREFIX") or DEFAULT_PREFIX,
            progress=not args.quiet,
        )
    except (RecallTargetError, CatalogError, ArtifactError, ValueError) as e:
        code = 1 if isinstance(e, RecallTargetError) else 2
        raise CommandError(f"not published (active index unchanged: {before}): {e}", code) from e
    finally:
        distributed.stop()
    if not main:
        return
    manifest = store.index_manifest(version)
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


# --------------------------------------------------------------------------- the feedback loop


def _redis(args: argparse.Namespace) -> tuple[str, str]:
    """(Redis URL, key prefix) from the flags, else $TWOTOWER_REDIS_URL / $TWOTOWER_REDIS_PREFIX."""
    from training.redis_keys import DEFAULT_PREFIX

    url = args.redis_url or os.environ.get("TWOTOWER_REDIS_URL")
    if not url:
        raise CommandError("the event log is in Redis: give --redis-url or set TWOTOWER_REDIS_URL")
    return url, args.redis_prefix or os.environ.get("TWOTOWER_REDIS_PREFIX") or DEFAULT_PREFIX


def cmd_export_events(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from training.event_export import export_events

    url, prefix = _redis(args)
    out = args.out or _artifacts(args) / "events"
    with tqdm(unit="event", desc="export events", disable=args.quiet) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            result = export_events(url, out, prefix, since=args.since, on_progress=progress)
        except ValueError as e:
            raise CommandError(str(e)) from e
    print(f"exported {result.exported} events to {out} (cursor {result.cursor})")
    print(json.dumps(result.as_dict(), indent=2))


def cmd_retrain(args: argparse.Namespace) -> None:
    from training.artifacts import ArtifactStore
    from training.catalog import CatalogError
    from training.index_build import RecallTargetError
    from training.retrain import DEFAULT_TOLERANCE, MIN_GATE_EVENTS, retrain

    url, prefix = _redis(args)
    store = ArtifactStore(_artifacts(args))
    base = _dataset(args, 0)
    before = store.active_index()
    try:
        result = retrain(
            base,
            store,
            url,
            prefix,
            events_dir=args.events_dir,
            overrides=_config_overrides(args),
            warm=not args.cold,
            tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
            min_gate_events=MIN_GATE_EVENTS if args.min_gate_events is None else args.min_gate_events,
            progress=not args.quiet,
        )
    except (RecallTargetError, CatalogError, ValueError) as e:
        code = 1 if isinstance(e, RecallTargetError) else 2
        raise CommandError(f"not published (active index unchanged: {before}): {e}", code) from e
    print(result.reason)
    print(json.dumps(result.as_dict(), indent=2, default=str))
    if not result.published:
        raise CommandError("nothing published; the active index is unchanged", 1)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
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
    train.add_argument("--holdout", type=float, default=0.2, help="test fraction (0: train on everything)")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train with this many processes on this machine (torchrun --standalone --nproc_per_node=N); for "
        "several machines run torchrun yourself (README)",
    )
    train.add_argument(
        "--tune",
        type=int,
        default=None,
        metavar="TRIALS",
        help="first search the recipe on the validation slice with this many Optuna trials (0: none, just use the "
        "study's best so far), then train with the best settings",
    )
    _add_tuning_args(train)
    train.add_argument(
        "--events",
        type=Path,
        default=None,
        metavar="DIR",
        help="also train on the events `twotower export-events` wrote there (new users and items join)",
    )
    train.add_argument(
        "--warm-start",
        default=None,
        metavar="MODEL",
        help="start from this model's weights (a version, or `active`) for the ids and layers it shares",
    )
    _add_config_flags(train)
    train.set_defaults(func=cmd_train)

    tune = sub.add_parser(
        "tune",
        help="search the recipe on the validation slice (Optuna) and print the best settings",
        description="Add trials to the study of this data and recipe (TPE sampling, median pruning) without training "
        "a final model; several processes or machines can share one study through --tune-storage. "
        "`twotower train --tune 0 --tune-storage ...` then trains with the best settings found.",
    )
    _add_data_args(tune)
    tune.add_argument("--artifacts", type=Path, default=None, help=ARTIFACTS_HELP)
    tune.add_argument("--holdout", type=float, default=0.2, help="test fraction, as train uses (never searched on)")
    tune.add_argument("--trials", type=int, default=20, help="trials to add (default: %(default)s)")
    _add_tuning_args(tune)
    _add_config_flags(tune)
    tune.set_defaults(func=cmd_tune)

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
    rx.add_argument("--redis-prefix", default=None, help="Redis key prefix (default: $TWOTOWER_REDIS_PREFIX)")
    rx.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    rx.set_defaults(func=cmd_reindex)

    ex = sub.add_parser(
        "export-events",
        help="move the service's event log (Redis) into Parquet partitions, exactly once",
        description="Append the events logged since the last export to DIR as Parquet partitions in the generic "
        "interactions format (user_id, item_id, timestamp), then trim them from the log. Safe to repeat and to "
        "interrupt: the cursor is the newest partition's last stream id.",
    )
    ex.add_argument("--artifacts", type=Path, default=None, help=ARTIFACTS_HELP)
    ex.add_argument("--out", type=Path, default=None, metavar="DIR", help="default: <artifacts>/events")
    ex.add_argument("--since", default=None, metavar="ID", help="export only events after this stream id")
    _add_redis_args(ex)
    ex.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ex.set_defaults(func=cmd_export_events)

    rt = sub.add_parser(
        "retrain",
        help="export the event log, train on the data plus the events, and publish if not worse",
        description="export-events, then train on --data plus every exported event (the active model's recipe, "
        "warm-started from its weights), then re-index and publish unless the new model's validation NDCG@10 "
        "is more than --tolerance below the active model's. Exit status 1 when nothing was published.",
    )
    _add_data_args(rt)
    rt.add_argument("--artifacts", type=Path, default=None, help=ARTIFACTS_HELP)
    rt.add_argument("--events-dir", type=Path, default=None, help="default: <artifacts>/events")
    rt.add_argument("--cold", action="store_true", help="no warm start from the active model")
    rt.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest drop of NDCG@10 on the held-out newest events allowed, against the active model (default: 0.01)",
    )
    rt.add_argument(
        "--min-gate-events",
        type=int,
        default=None,
        metavar="N",
        help="held-out events the gate needs at least; fewer new events and nothing is trained (default: 50)",
    )
    _add_redis_args(rt)
    rt.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_config_flags(rt)
    rt.set_defaults(func=cmd_retrain)

    for name, text in (
        ("serve", "run the HTTP service (FastAPI under uvicorn); `twotower serve --help` lists its flags"),
        ("load-features", "load a model's users (features and histories) into Redis; see `--help`"),
    ):
        sub.add_parser(name, help=text, add_help=False)  # never parsed here: handed to `python -m service`
    return parser


def _hand_to_service(argv: Sequence[str]) -> None:
    """Replace this process with `python -m service <argv>` (the online side's own command line)."""
    command = [sys.executable, "-m", "service", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in args_list if not a.startswith("-")), None)
    if first in SERVICE_COMMANDS:
        _hand_to_service(args_list[args_list.index(first) :])
    args = build_parser().parse_args(args_list)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # faiss logs which CPU build it tried at INFO, as tracebacks; only its warnings matter to a user.
    logging.getLogger("faiss").setLevel(logging.WARNING)
    from training.artifacts import ArtifactError
    from training.config import ConfigError
    from training.tables import DataFormatError

    try:
        args.func(args)
    except CommandError as e:
        print(f"twotower {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except (ArtifactError, ConfigError, DataFormatError, FileNotFoundError) as e:
        print(f"twotower {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
