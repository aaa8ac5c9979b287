"""Backtest and demo data (issue: try a scoring model before it goes live).

A generated population goes into a real SQLite store through `leadflow demo-data`; the
backtest reads it back (audit, event log, profile updates) and replays it through the core.
Under the model that was live it must reproduce every lead's recorded stage path exactly;
under a candidate it must say what changes.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from freezegun import freeze_time
from hypothesis import given, strategies as st

from activities.store import AuditStore
from config import DEFAULT_MODEL, Settings
from funnel import backtest
from funnel.models import AuditKind, Stage
from funnel.scoring_model import load_model
from tests.test_cli import run
from tests.test_store import postgres_server  # noqa: F401 - the throwaway PostgreSQL server fixture

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
MODEL = load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    """400 demo leads made by the CLI at NOW, in a store of their own."""
    url = f"sqlite:///{tmp_path_factory.mktemp('demo') / 'demo.db'}"
    with pytest.MonkeyPatch.context() as mp, freeze_time(NOW):
        mp.setenv("LEADFLOW_DATABASE_URL", url)
        mp.delenv("LEADFLOW_MODEL", raising=False)
        import starter

        assert starter.main(["demo-data", "--leads", "400", "--seed", "11"]) == 0
    store = AuditStore(url)
    yield url, store
    store.dispose()


def recorded_paths(store: AuditStore) -> dict[str, list[tuple]]:
    paths: dict[str, list[tuple]] = {}
    for e in store.report_entries(kinds=(AuditKind.LEAD_CREATED, AuditKind.STAGE_CHANGED)):
        paths.setdefault(e.lead_id, []).append((e.to_stage, e.trigger, e.happened_at))
    return paths


def test_under_the_live_model_the_backtest_reproduces_every_recorded_stage_path(demo_store):
    _, store = demo_store
    logs = backtest.lead_logs(store.report_entries(kinds=backtest.DECISION_KINDS), store.replay_log())
    delay = timedelta(seconds=Settings().decision_delay_seconds)
    runs = backtest.replay_all(logs, {"live": MODEL}, NOW, delay)["live"]
    recorded = recorded_paths(store)
    assert len(runs) == len(recorded) == 400
    for run_ in runs:
        assert [(stage, trigger, at) for stage, at, trigger in run_.path] == recorded[run_.lead_id], run_.lead_id
        assert run_.refused == 0
    # ...and the population has everything to check: each stage and outcome, with decisions.
    finals = {path[-1][0] for path in recorded.values()}
    seen = {stage for path in recorded.values() for stage, _, _ in path}
    assert {Stage.IQL, Stage.MQL, Stage.SAL, Stage.SQL, Stage.WON, Stage.LOST, Stage.DISQUALIFIED,
            Stage.RECYCLED} <= seen and Stage.WON in finals
    triggers = {trigger for path in recorded.values() for _, trigger, _ in path}
    assert {"fast_track", "score_threshold", "accept", "qualify", "reject_recycle"} <= {t.value for t in triggers if t}


def test_on_postgresql_too(postgres_server):
    """The same population on PostgreSQL replays to the same recorded paths (the log is read
    there by two server-side cursors merged per lead)."""
    url = postgres_server.new_database()
    with pytest.MonkeyPatch.context() as mp, freeze_time(NOW):
        mp.setenv("LEADFLOW_DATABASE_URL", url)
        mp.delenv("LEADFLOW_MODEL", raising=False)
        import starter

        assert starter.main(["demo-data", "--leads", "150", "--seed", "5"]) == 0
    store = AuditStore(url)
    try:
        logs = backtest.lead_logs(store.report_entries(kinds=backtest.DECISION_KINDS), store.replay_log())
        runs = backtest.replay_all(logs, {"live": MODEL}, NOW, timedelta(seconds=Settings().decision_delay_seconds))
        recorded = recorded_paths(store)
        assert len(runs["live"]) == 150
        assert all([(s, t, at) for s, at, t in r.path] == recorded[r.lead_id] for r in runs["live"])
        # each process reading its own shard, there too
        from activities import backtest_source

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(backtest_source, "MIN_SHARD", 20)
            sharded = backtest_source.replay_store(store, {"live": MODEL}, NOW, None,
                                                   timedelta(seconds=Settings().decision_delay_seconds), workers=2)
        assert [(r.lead_id, r.path) for r in sharded["live"]] == [(r.lead_id, r.path) for r in runs["live"]]
    finally:
        store.dispose()


def test_the_logs_read_as_named_tuples_are_the_logs_read_from_database_rows(demo_store):
    """activities/backtest_source.py reads the event log as named tuples, with the garbage
    collector paused: the same logs, value for value, and the collector as it was after."""
    import gc

    from activities import backtest_source

    _, store = demo_store
    slow = backtest.lead_logs(store.report_entries(kinds=backtest.DECISION_KINDS), store.replay_log())
    fast = backtest_source.lead_logs_of(store)
    assert gc.isenabled()
    assert len(fast) == 400 and sum(len(log.inputs) for log in fast) > 4000
    assert fast == slow and repr(fast) == repr(slow)
    assert all(a.event.model_fields_set == b.event.model_fields_set for x, y in zip(fast, slow)
               for a, b in zip(x.inputs, y.inputs) if a.event is not None)
    gc.disable()
    try:
        assert backtest_source.lead_logs_of(store, (fast[0].lead_id, fast[9].lead_id)) == slow[:10]
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_processes_give_what_one_process_gives(demo_store):
    _, store = demo_store
    logs = backtest.lead_logs(store.report_entries(kinds=backtest.DECISION_KINDS), store.replay_log())
    one = backtest.replay_all(logs, {"m": MODEL}, NOW, workers=1)["m"]
    two = backtest.replay_all(logs, {"m": MODEL}, NOW, workers=2)["m"]
    assert [(r.lead_id, r.path, r.peak_score) for r in one] == [(r.lead_id, r.path, r.peak_score) for r in two]


def test_processes_reading_their_own_shards_give_what_reading_in_one_place_gives(demo_store, monkeypatch):
    """`leadflow backtest` lets each worker process read its own range of lead ids; the
    runs must be those of the logs read in one place and replayed there, in the same
    order, also for a time window that cuts through the shards."""
    from activities import backtest_source

    _, store = demo_store
    monkeypatch.setattr(backtest_source, "MIN_SHARD", 30)  # 400 leads: several shards per process
    logs = backtest.lead_logs(store.report_entries(kinds=backtest.DECISION_KINDS), store.replay_log())
    created = sorted(log.created_at for log in logs)
    windows = [(None, NOW), (created[len(created) // 3], created[2 * len(created) // 3])]
    for since, until in windows:
        wanted = [log for log in logs if (since is None or log.created_at >= since) and log.created_at < until]
        assert 0 < len(wanted) and (since is None or len(wanted) < len(logs))
        expected = backtest.replay_all(wanted, {"m": MODEL}, until)["m"]
        sharded = backtest_source.replay_store(store, {"m": MODEL}, until, since, workers=2)["m"]
        assert len(backtest_source.shards(store.created_leads(since, until), 2 * backtest_source.SHARDS_PER_WORKER)) > 2
        assert [(r.lead_id, r.path, r.peak_score, r.refused, r.outcome) for r in sharded] == \
            [(r.lead_id, r.path, r.peak_score, r.refused, r.outcome) for r in expected]


def test_shards_cover_every_lead_once_in_order():
    ids = [f"L-{i:04d}" for i in range(1000)]
    from activities.backtest_source import MIN_SHARD, shards

    for count in (1, 2, 3, 16, 1000):
        parts = shards(ids, count)
        covered = [i for first, last in parts for i in ids if first <= i <= last]
        assert covered == ids
        assert all(len([i for i in ids if first <= i <= last]) >= MIN_SHARD for first, last in parts[:-1])
    assert shards([], 4) == []


def test_an_in_memory_store_is_read_in_this_process():
    from activities.backtest_source import shareable

    assert not shareable("sqlite://") and not shareable("sqlite:///:memory:")
    assert shareable("sqlite:////tmp/x.db") and shareable("postgresql+psycopg://u@h/db")


def test_a_replay_without_effects_ends_in_the_same_state_as_one_that_records_them(demo_store):
    """The backtest's lead writes no audit entries or messages (`record_effects=False`, for
    speed); what it reads, the state, must be what the recording lead has, field by field."""
    _, store = demo_store
    logs = backtest.lead_logs(store.report_entries(kinds=backtest.DECISION_KINDS), store.replay_log())
    lower = MODEL.model_copy(update={"thresholds": MODEL.thresholds.model_copy(update={"mql": 70.0})})
    delay = timedelta(seconds=Settings().decision_delay_seconds)
    for model in (MODEL, lower):
        for log in logs:
            quiet, *figures = backtest.play(log, model, NOW, delay)
            loud, *recorded = backtest.play(log, model, NOW, delay, record_effects=True)
            assert quiet.take_effects().audit == [] and loud.take_effects().audit
            assert figures == recorded
            assert quiet.state.model_dump() == loud.state.model_dump(), log.lead_id
            assert quiet.state.model_fields_set == loud.state.model_fields_set


def backtest_json(capsys, monkeypatch, url: str, *args: str) -> dict:
    monkeypatch.setenv("LEADFLOW_DATABASE_URL", url)
    with freeze_time(NOW):
        code, out, err = run(capsys, "backtest", *args, "--json", "--workers", "2")
    assert code == 0, err
    return json.loads(out)


def test_the_same_model_changes_nothing(capsys, monkeypatch, demo_store):
    url, _ = demo_store
    report = backtest_json(capsys, monkeypatch, url, "--model", str(DEFAULT_MODEL))
    assert report["changed"] == []
    assert {k: v for k, v in report["current"].items() if k != "model"} == {
        k: v for k, v in report["candidate"].items() if k != "model"}
    assert report["current"]["won_caught"] == report["won"] > 0  # the live model made every won lead MQL
    assert report["current"]["decisions_refused"] == 0


def test_a_lower_threshold_hands_over_more_and_sooner(capsys, monkeypatch, demo_store, tmp_path):
    url, store = demo_store
    candidate = tmp_path / "candidate.toml"
    candidate.write_text(DEFAULT_MODEL.read_text().replace('version = "1"', 'version = "2"')
                         .replace("mql = 100 ", "mql = 60 "))
    chart = tmp_path / "sweep.png"
    report = backtest_json(capsys, monkeypatch, url, "--model", str(candidate), "--chart", str(chart))
    cur, cand = report["current"], report["candidate"]
    assert cand["model"] == "default@2" and cur["model"] == "default@1"
    assert cand["mqls"] > cur["mqls"] and cand["median_days_first_touch_to_mql"] <= cur["median_days_first_touch_to_mql"]
    assert report["won_earlier"] > 0 and report["won_later"] == 0
    newly = [c for c in report["changed"] if c["current_mql_at"] is None and c["candidate_mql_at"] is not None]
    assert newly and all(c["current"] == "iql" for c in newly)
    recorded = recorded_paths(store)
    assert all(Stage.MQL not in [s for s, _, _ in recorded[c["lead_id"]]] for c in newly)
    by_threshold = {p["threshold"]: p["mqls"] for p in report["sweep"]}
    assert by_threshold[60.0] == cand["mqls"]  # the sweep at the candidate's own threshold is the replay's
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    since = backtest_json(capsys, monkeypatch, url, "--model", str(candidate), "--from", "2026-08-01T00:00:00Z")
    assert 0 < since["leads"] < report["leads"]


@given(st.lists(st.tuples(st.floats(0, 300), st.booleans(), st.sampled_from([Stage.WON, Stage.LOST, None])),
                min_size=1, max_size=40))
def test_a_higher_threshold_never_hands_over_more(leads):
    runs = [backtest.Replay(f"L{i}", "web", [], None, None, peak, fast, Stage.IQL, 0, outcome)
            for i, (peak, fast, outcome) in enumerate(leads)]
    points = backtest.sweep(runs, 100.0)
    assert [p.threshold for p in points] == sorted(p.threshold for p in points)
    assert all(a.mqls >= b.mqls for a, b in zip(points, points[1:]))
    shares = [p.won_caught_share for p in points if p.won_caught_share is not None]
    assert all(a >= b for a, b in zip(shares, shares[1:]))


def test_demo_data_goes_into_an_empty_store_only(capsys, monkeypatch, demo_store):
    url, _ = demo_store
    monkeypatch.setenv("LEADFLOW_DATABASE_URL", url)
    code, _, err = run(capsys, "demo-data", "--leads", "5")
    assert code == 2 and "already holds leads" in err


def test_demo_data_writes_as_it_makes_the_same_population_in_flat_memory(capsys, monkeypatch, tmp_path):
    """`demo-data` generates and writes a chunk at a time (100,000 leads held at once took
    7 GB): the store holds what generating all first and writing it gives, and four times
    the leads do not take anything like four times the memory."""
    import tracemalloc

    import starter
    from funnel import demo

    monkeypatch.setattr(starter, "DEMO_CHUNK", 60)
    monkeypatch.delenv("LEADFLOW_MODEL", raising=False)

    def stored(store: AuditStore) -> tuple[list, list]:
        return ([(e.lead_id, e.seq, e.kind, e.at, e.to_stage) for e in store.report_entries(kinds=list(AuditKind))],
                [tuple(row) for row in store.replay_log()])

    peaks = {}
    for leads in (60, 240):
        url = f"sqlite:///{tmp_path / f'chunks-{leads}.db'}"
        monkeypatch.setenv("LEADFLOW_DATABASE_URL", url)
        tracemalloc.start()
        with freeze_time(NOW):
            code, out, _ = run(capsys, "demo-data", "--leads", str(leads), "--seed", "3")
        peaks[leads] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert code == 0 and out.startswith(f"{leads} demo leads")
    chunked = AuditStore(f"sqlite:///{tmp_path / 'chunks-240.db'}")
    whole = AuditStore(f"sqlite:///{tmp_path / 'whole.db'}")
    try:
        made = demo.generate(240, MODEL, NOW, seed=3, decision_delay=timedelta(seconds=Settings().decision_delay_seconds))
        starter.write_population(whole, made)
        assert stored(chunked) == stored(whole)
        mqls = sum(any(e.to_stage == Stage.MQL for e in lead.entries) for lead in made)
        assert f"{sum(len(lead.events) for lead in made)} events" in out and f"{mqls} became MQL" in out
    finally:
        chunked.dispose()
        whole.dispose()
    assert peaks[240] < 2 * peaks[60], peaks
