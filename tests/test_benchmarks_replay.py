"""The replay benchmark end to end on small planted data: the real service over a real Redis, real `twotower
train / reindex / retrain` subprocesses, every row scored on the same events. Posting events must matter (live
beats frozen by far on planted clusters), and each retrain either publishes (and the service swaps to it under
the replay) or says why not."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.replay import main

ROW_KEYS = {"hit_rate@10", "ndcg@10", "requests", "p50_ms", "p99_ms"}


def test_the_replay_measures_every_row_on_the_same_events(tmp_path: Path) -> None:
    out = tmp_path / "replay.json"
    # D = 64: a retrain small enough to publish while these 240 events are still being replayed
    args = ["--synthetic-users", "300", "--max-events", "240", "--retrain-every", "0.4"]
    args += ["--train-args", "--epochs 8 --dim 64"]
    args += ["--retrain-args", "--min-gate-events 10"]  # 96 events per retrain: the newest 19 judge it
    result = main([*args, "--out", str(out), "--plot", str(tmp_path / "replay.png")])
    assert json.loads(out.read_text())["rows"].keys() == {"frozen", "live", "retrain", "popularity"}
    assert (tmp_path / "replay.png").stat().st_size > 0
    rows = result["rows"]
    for name, row in rows.items():
        assert row.keys() >= ROW_KEYS, name
        assert row["requests"] == 240 and 0.0 <= row["ndcg@10"] <= row["hit_rate@10"] <= 1.0, name
    assert rows["live"]["hit_rate@10"] > rows["frozen"]["hit_rate@10"] + 0.1
    assert rows["frozen"]["index_versions_served"] == rows["live"]["index_versions_served"] == 1
    # Posted events invalidate the user's cached record: frozen histories stay cached, live ones do not.
    assert rows["frozen"]["user_cache_hit_rate"] > rows["live"]["user_cache_hit_rate"]
    runs = result["retrain_runs"]
    assert len(runs) == rows["retrain"]["retrains"] == 2
    for run in runs:
        assert run["exit"] in (0, 1) and run["reason"], run  # published, or refused by the gate with the reason
        assert run["published"] == (run["exit"] == 0)
        assert run["gate_events"] >= 10 and run["gate_ndcg"] is not None and run["previous_gate_ndcg"] is not None
    if rows["retrain"]["retrains_published"]:
        assert rows["retrain"]["index_versions_served"] >= 2  # the swap happened during the replay
