"""A busy lead is never lost (issue "Hold under faults and load", section 0).

On a dev server of its own with a low hard history limit (`limit.historyCount.error`:
a run over it is terminated by the server, and the lead is gone for good), a steady
stream of events, one call each, must make the lead continue-as-new whatever keeps
arriving; a backlog of 10,000 events queued while no worker runs must be worked off a
bounded share per workflow task, without tripping the SDK's deadlock detector.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime, timezone

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

import client as leads
from activities.store import AuditStore
from config import Settings, dev_server_dynamic_flags
from funnel.models import ActivityEvent, AuditKind
from tests.conftest import binary, running_worker, settle
from workflows import search_attributes as sa
from workflows.lead import workflow_id

HARD_LIMIT = 1500  # history events: the server terminates a run past it
SUGGEST = 300


@pytest.fixture(scope="module")
async def tight_env(converter):
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=binary("temporal"), data_converter=converter,
        search_attributes=sa.ALL,
        dev_server_extra_args=dev_server_dynamic_flags(**{
            "limit.historyCount.error": str(HARD_LIMIT), "limit.historyCount.warn": str(HARD_LIMIT // 2),
            "limit.historyCount.suggestContinueAsNew": str(SUGGEST),
        }),
    )
    yield env
    await env.shutdown()


@pytest.fixture
def tight_settings(tmp_path) -> Settings:
    return Settings(task_queue=f"busy-{uuid.uuid4().hex[:8]}", database_url=f"sqlite:///{tmp_path / 'audit.db'}",
                    max_history_events=SUGGEST, decision_delay_seconds=1.0, audit_max_lag_seconds=2)


@pytest.fixture
def store(tight_settings) -> AuditStore:
    """The audit store of `tight_settings` (this module's leads), in place of conftest's."""
    return AuditStore(tight_settings.database_url)


def events(lead: str, n: int, now) -> list[ActivityEvent]:
    kinds = ["website_visit", "email_open", "email_click", "pricing_page_visit", "video_view"]
    return [ActivityEvent(event_id=f"{lead}-{i}", lead_id=lead, type=kinds[i % len(kinds)], occurred_at=now,
                          channel="web") for i in range(n)]


async def runs_of(client, lead: str) -> list:
    return [run async for run in client.list_workflows(f"WorkflowId = '{workflow_id(lead)}'")]


async def history_lengths(client, lead: str) -> list[int]:
    lengths = []
    for run in await runs_of(client, lead):
        history = await client.get_workflow_handle(workflow_id(lead), run_id=run.run_id).fetch_history()
        lengths.append(len(history.events))
    return lengths


def own_entries(store, lead: str) -> list[str]:
    return [e.event_id for e in store.history(lead, limit=100_000) if e.kind == AuditKind.SCORE_CHANGED and e.event_id]


async def test_a_steady_stream_continues_as_new_and_the_lead_lives(tight_env, tight_settings, store, tmp_path):
    """One event per call, as a bot on the website sends them: the old loop never found a
    quiet moment to continue-as-new, and the server terminated the lead at its limit."""
    client, lead, n = tight_env.client, "B-stream", 1200
    async with running_worker(client, tight_settings, store):
        now = await tight_env.get_current_time()
        queue = list(events(lead, n, now))

        async def sender():
            while queue:
                await leads.send_events(client, tight_settings, [queue.pop(0)])

        await asyncio.gather(*(sender() for _ in range(8)))
        view = await settle(tight_env, client, lead, lambda v: v.events_applied == n, tries=2400)
        assert view.duplicates_ignored == 0
        await leads.flush_audit(client, lead)
        runs = await runs_of(client, lead)
        statuses = {run.status for run in runs}
        assert WorkflowExecutionStatus.TERMINATED not in statuses
        assert len(runs) >= 3, "the stream crossed several continue-as-new"
        assert max(await history_lengths(client, lead)) < HARD_LIMIT // 2
    assert sorted(own_entries(store, lead)) == sorted(e.event_id for e in events(lead, n, now)), "each once"


async def test_a_backlog_of_10000_events_is_worked_off_without_wedging(tight_env, tight_settings, store):
    """10,000 events queue up while no worker runs; then the worker starts. The old loop
    applied ~4,200 in one workflow task, tripped the deadlock detector on every retry, and
    the lead never answered again."""
    client, lead, n = tight_env.client, "B-backlog", 10_000
    now = await tight_env.get_current_time()
    await leads.send_events(client, tight_settings, events(lead, n, now))  # 100 signals of 100, nobody applies them
    started = time.monotonic()
    async with running_worker(client, tight_settings, store):
        view = await settle(tight_env, client, lead, lambda v: v.events_applied == n, tries=4000)
        seconds = time.monotonic() - started
        assert view.events_applied == n and view.score["breakdown"]
        await leads.flush_audit(client, lead)
        failed = []
        for run in await runs_of(client, lead):
            history = await client.get_workflow_handle(workflow_id(lead), run_id=run.run_id).fetch_history()
            failed += [e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
            assert len(history.events) < HARD_LIMIT
        assert failed == [], "no workflow task failed (deadlock detector, payload limits)"
    assert len(set(own_entries(store, lead))) == n
    print(f"\nbacklog of {n} events worked off in {seconds:.1f} s")


async def test_a_lead_that_ended_abnormally_is_not_called_won(tight_env, tight_settings, store):
    client, lead = tight_env.client, "B-terminated"
    async with running_worker(client, tight_settings, store):
        now = await tight_env.get_current_time()
        await leads.send_events(client, tight_settings, events(lead, 1, now))
        await settle(tight_env, client, lead, lambda v: v.events_applied == 1)
        await client.get_workflow_handle(workflow_id(lead)).terminate("operator test")
        with pytest.raises(leads.LeadClosed, match="ended abnormally \\(terminated\\), not won"):
            await leads.send_events(client, tight_settings, [events(lead, 2, now)[1]])


async def test_history_reads_do_not_hang_without_a_worker(tight_env, tight_settings, store):
    client, lead = tight_env.client, "B-noworker"
    async with running_worker(client, tight_settings, store):
        now = await tight_env.get_current_time()
        await leads.send_events(client, tight_settings, events(lead, 3, now))
        await settle(tight_env, client, lead, lambda v: v.events_applied == 3)
        await leads.flush_audit(client, lead)
    started = time.monotonic()
    with pytest.raises(leads.TailUnknown):
        await leads.read_history(client, store, lead)
    assert time.monotonic() - started < leads.TAIL_TIMEOUT + 2


async def test_temporal_going_away_is_a_plain_error(converter):
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=binary("temporal"),
                                                data_converter=converter)
    client = env.client
    await env.shutdown()
    settings = Settings(task_queue="gone")
    now = datetime.now(timezone.utc)
    with pytest.raises(leads.TemporalUnavailable, match="did not take the events of lead B-gone"):
        await asyncio.wait_for(leads.send_events(client, settings, events("B-gone", 1, now)), 60)


async def test_a_worker_started_before_its_store_waits_for_it(tight_env, tmp_path):
    """It used to exit 1 (it creates tables at start), which stopped the whole local stack."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    blocked = tmp_path / "data"
    blocked.write_text("a file where the store's directory should be")
    log = tmp_path / "worker.log"
    env = {**os.environ, "TEMPORAL_ADDRESS": tight_env.client.service_client.config.target_host,
           "LEADFLOW_DATABASE_URL": f"sqlite:///{blocked / 'leadflow.db'}", "LEADFLOW_TASK_QUEUE": "busy-wait"}
    with log.open("wb") as out:
        worker = subprocess.Popen([sys.executable, "worker.py"], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "unreachable" not in log.read_text() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert "the audit store" in log.read_text() and "unreachable" in log.read_text(), log.read_text()
        await asyncio.sleep(2)
        assert worker.poll() is None, "the worker waits instead of exiting"
        blocked.unlink()  # the store comes back
        deadline = time.monotonic() + 60
        while "worker on task queue" not in log.read_text() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert "worker on task queue 'busy-wait'" in log.read_text(), log.read_text()
    finally:
        worker.terminate()
        worker.wait(20)


async def test_status_says_how_far_behind_the_workers_are(tight_env, tight_settings, capsys, monkeypatch):
    import starter

    client = tight_env.client
    now = await tight_env.get_current_time()
    settings = tight_settings.model_copy(update={"max_backlog_seconds": 2.0})
    monkeypatch.setattr(starter.Settings, "from_env", classmethod(lambda cls, env=None: settings))

    async def connect(_settings=None):
        return client

    monkeypatch.setattr(starter, "connect", connect)
    for i in range(3):  # nobody works them off
        await leads.send_events(client, settings, events(f"B-status-{i}", 1, now))
    for _ in range(60):
        code = await asyncio.to_thread(starter.main, ["status", "--json"])
        report = json.loads(capsys.readouterr().out)
        if report["behind"]:
            break
        await asyncio.sleep(0.5)
    assert code == 1 and report["workers"] == 0 and report["backlog"] >= 3 and report["oldest_seconds"] > 2
