"""bench/shapes.py: the verdict over every shape of the ingest goal.

A shape meets the goal on its median ratio over the runs, with its history events per event
within the limit in every run; the lowest run is printed beside it, not hidden."""

from __future__ import annotations

import pytest

from bench.shapes import HISTORY_LIMIT, SHAPES, TARGET, run_shape, verdict


def _run(ratio: float, history: float = 2.6, cpu: float = 0.8) -> dict:
    return {"ratio": ratio, "lead_hist_per_event": history, "cpu_ratio": cpu}


def test_a_shape_meets_the_goal_on_its_median_and_shows_its_lowest_run():
    rows = verdict({"a": [_run(0.78), _run(0.83), _run(0.81)], "b": [_run(0.79), _run(0.77), _run(0.84)]})

    assert rows[0] == ("a", 0.81, 0.78, 0.8, 2.6, True)
    assert rows[1][0] == "b" and rows[1][1] == 0.79 and rows[1][2] == 0.77 and rows[1][5] is False


def test_too_many_history_events_in_any_run_misses_the_goal_whatever_the_speed():
    (row,) = verdict({"a": [_run(0.9), _run(0.9, history=HISTORY_LIMIT + 0.1)]})

    assert row[1] >= TARGET and row[4] == HISTORY_LIMIT + 0.1 and row[5] is False


def test_the_shapes_are_the_three_the_issue_names():
    assert [shape[shape.index("--leads") + 1] for shape in SHAPES.values()] == ["50", "500", "300"]
    assert "sparse" in list(SHAPES.values())[2] and "--cache" in list(SHAPES.values())[2]


def test_a_failed_bench_run_stops_the_script_with_its_error():
    with pytest.raises(RuntimeError, match="failed"):
        run_shape(["--shape", "no-such-shape"], 1, [])
