"""The event log's offline side: `twotower export-events` moves the service's event log (a Redis stream, see
`training.redis_keys`) into Parquet partitions in the generic interactions format (user_id, item_id, timestamp),
and `read_events` reads them back for training.

Exactly once, across restarts and repeated runs. A partition is named by the stream ids of its first and last
event (`events-<first>_<last>.parquet`); it is written to a temporary file, fsynced, renamed into place, and its
folder fsynced. Where an export starts (its cursor) is the last id of the newest partition, read from the file
names, so no second record can disagree with the data. Only after that are the exported events trimmed from the
log (XTRIM MINID: ids up to the cursor, nothing newer). A crash at any point leaves either no partition (its events
are still in the log and go into the next export) or a whole one (its events are trimmed by the next export).

The log is bounded (`TWOTOWER_EVENT_LOG_MAX`, trimmed by Redis as events arrive): an export that falls behind by
more than the bound loses the oldest unexported events. The export counts them, from the log's count of events
ever appended less those exported and those still in the log, and reports them as `dropped`.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from training.redis_keys import RedisKeys

log = logging.getLogger(__name__)

PARTITION = re.compile(r"^events-(\d+-\d+)_(\d+-\d+)\.parquet$")
SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.float64())])
DEFAULT_CHUNK = 100_000  # events per partition at most
REDIS_TIMEOUT_S = 30.0


def stream_id(text: str) -> tuple[int, int]:
    """A stream id ("<ms>-<seq>") as a pair that orders like the stream."""
    ms, _, seq = text.partition("-")
    if not ms.isdigit() or not seq.isdigit():
        raise ValueError(f"not a stream id: {text!r} (expected <milliseconds>-<sequence>, e.g. 1700000000000-0)")
    return int(ms), int(seq)


def _id_text(value: tuple[int, int]) -> str:
    return f"{value[0]}-{value[1]}"


def partitions(folder: Path) -> list[tuple[tuple[int, int], tuple[int, int], Path]]:
    """(first id, last id, path) of every partition in `folder`, in stream order."""
    found = []
    for path in folder.glob("events-*.parquet") if folder.is_dir() else ():
        match = PARTITION.match(path.name)
        if match:
            found.append((stream_id(match[1]), stream_id(match[2]), path))
    return sorted(found)


def cursor(folder: Path) -> tuple[int, int] | None:
    """The last exported stream id (None before the first export)."""
    found = partitions(folder)
    return found[-1][1] if found else None


def exported_count(folder: Path) -> int:
    return sum(pq.ParquetFile(path).metadata.num_rows for _, _, path in partitions(folder))


def read_events(folder: Path) -> pd.DataFrame:
    """Every exported event, oldest first: user_id, item_id (str), timestamp (unix seconds, float)."""
    found = partitions(Path(folder))
    if not found:
        raise FileNotFoundError(f"{folder}: no exported events (events-*.parquet); run `twotower export-events`")
    return pa.concat_tables([pq.read_table(path, schema=SCHEMA) for _, _, path in found]).to_pandas()


def _write_partition(folder: Path, rows: list[tuple[str, dict[str, str]]]) -> Path:
    first, last = rows[0][0], rows[-1][0]
    table = pa.table(
        {
            "user_id": [fields.get("user_id", "") for _, fields in rows],
            "item_id": [fields.get("item_id", "") for _, fields in rows],
            "timestamp": [float(fields.get("timestamp") or stream_id(i)[0] / 1000) for i, fields in rows],
        },
        schema=SCHEMA,
    )
    target = folder / f"events-{first}_{last}.parquet"
    descriptor, name = tempfile.mkstemp(dir=folder, prefix=".events-", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as out:
            pq.write_table(table, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself is durable before the log forgets these events
    finally:
        os.close(directory)
    return target


@dataclass
class ExportResult:
    exported: int  # events written by this run
    partitions: list[Path]
    cursor: str | None  # the last exported stream id, after this run
    dropped: int  # events the log's bound removed before any export reached them (ever, not just this run)
    remaining: int  # events left in the log (arrived during the export)

    def as_dict(self) -> dict[str, Any]:
        return {
            "exported": self.exported,
            "partitions": [p.name for p in self.partitions],
            "cursor": self.cursor,
            "dropped": self.dropped,
            "remaining": self.remaining,
        }


def export_events(
    redis_url: str,
    out: Path,
    prefix: str,
    *,
    since: str | None = None,
    chunk: int = DEFAULT_CHUNK,
    on_progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Move the event log into Parquet partitions under `out` (module docstring), starting after the newest
    partition's last id or after `since`, whichever is later. `on_progress(done, total)` hears of each partition."""
    import redis

    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    start = stream_id(since) if since else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = RedisKeys(prefix)
    client = redis.Redis.from_url(
        redis_url, decode_responses=True, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
    )
    written: list[Path] = []
    exported = 0
    try:
        done = cursor(out)
        if done is not None:  # a previous run may have stopped between its last partition and its trim
            client.xtrim(keys.events, minid=_id_text((done[0], done[1] + 1)), approximate=False)
        with client.pipeline(transaction=True) as pipe:
            pipe.get(keys.events_added)
            pipe.xlen(keys.events)
            added, length = pipe.execute()
        dropped = max(0, int(added or 0) - exported_count(out) - int(length))
        if dropped:
            log.warning(
                "%d events left the log (bound TWOTOWER_EVENT_LOG_MAX) before an export reached them; export more "
                "often or raise the bound",
                dropped,
            )
        after = max((x for x in (done, start) if x is not None), default=None)
        total = int(length)
        while True:
            lower = "-" if after is None else f"({_id_text(after)}"  # "(": after this id, not including it
            rows: list[tuple[str, dict[str, str]]] = client.xrange(keys.events, min=lower, count=chunk)  # type: ignore[assignment]
            if not rows:
                break
            path = _write_partition(out, rows)
            written.append(path)
            exported += len(rows)
            after = stream_id(rows[-1][0])
            client.xtrim(keys.events, minid=_id_text((after[0], after[1] + 1)), approximate=False)
            if on_progress is not None:
                on_progress(exported, max(total, exported))
        remaining = int(client.xlen(keys.events))
    finally:
        client.close()
    last = cursor(out)
    return ExportResult(exported, written, None if last is None else _id_text(last), dropped, remaining)
