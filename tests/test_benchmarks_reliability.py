"""The reliability benchmark end to end, on its `--quick` budget: a real uvicorn service over a real Redis that the
run kills and freezes, real artifacts it damages, schemathesis against the live schema. Every count whose goal is
zero must be zero, and each phase must have measured something (a benchmark that ran nothing would pass too)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.reliability import main


def test_the_quick_reliability_run_meets_every_zero_goal(tmp_path: Path) -> None:
    out = tmp_path / "reliability.json"
    result = main(["--quick", "--examples", "10", "--out", str(out)])
    assert json.loads(out.read_text())["zero_goals"] == result["zero_goals"]
    assert result["zero_goals"] == dict.fromkeys(result["zero_goals"], 0), result["zero_goals"]
    assert result["schemathesis"]["cases"] > 50
    assert len(result["hostile_inputs"]) > 20
    for how, outage in result["redis"].items():
        assert outage["events_acknowledged"] > 0, how
        assert outage["events_answered_503"] > 0, how  # the outage really happened while events came in
    assert result["swaps"]["swaps"] == 3 and result["swaps"]["requests"] > 100
    assert {r["case"] for r in result["bad_artifacts"]} >= {"truncated index", "wrong dimension"}
    assert result["heavy_user"]["heavy_user_events"] > 0
