"""When the lead's audit reaches the store, on the time-skipping server.

Score changes and other high-volume entries wait in the lead's state and reach the
store through the worker's sweeper (a query, no history), so a quiet event costs the
lead no timer and no write; stage changes, commands and timers have the lead write
everything at once; reads see every entry either way. Timers for the lead's wake-ups
are not restarted by each event.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy.exc import OperationalError

import client as leads
from activities.audit_sweeper import AuditSweeper
from funnel.models import Accept, AuditKind, Stage
from tests.conftest import (
    ANNA,
    event,
    history_kinds,
    running_worker,
    scheduled_activities,
    settle,
    until,
)
from workflows.lead import workflow_id


async def store_reaches(store, lead: str, count: int) -> int:
    """The store's entry count for `lead` once it reaches `count` (an activity may be finishing)."""
    for _ in range(200):
        if store.count_history(lead) >= count:
            break
        await asyncio.sleep(0.02)
    return store.count_history(lead)


async def test_score_changes_reach_the_store_by_the_sweeper_and_are_readable_meanwhile(ts_env, settings, store):
    client, lead = ts_env.client, "A-lag"
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        for n in range(5):  # five separate webhooks: neither a write nor a timer in the lead
            await leads.send_events(client, settings, [event(lead, str(n), "website_visit", now)])
            await settle(ts_env, client, lead, lambda v, n=n: v.events_applied == n + 1)
        total, history = await leads.read_history(client, store, lead)
        assert [e.kind for e in history].count(AuditKind.SCORE_CHANGED) == 5
        assert total == len(history)
        assert await store_reaches(store, lead, total) == total  # the sweeper, within about a second
        assert store.history(lead) == history
        handle = client.get_workflow_handle(workflow_id(lead))
        kinds = history_kinds(await handle.fetch_history())
        assert scheduled_activities(await handle.fetch_history()) == ["load_scoring_model"]
        # one timer: the lead's own first wake-up (its welcome nurture step), none for the audit;
        # one upsert: the new lead in visibility (score changes alone do not upsert)
        assert kinds.count("timer_started") == 1 and kinds.count("upsert_workflow_search_attributes") == 1
        # paging over store and tail gives the same entries
        await leads.send_events(client, settings, [event(lead, "late", "website_visit", now)])
        await settle(ts_env, client, lead, lambda v: v.events_applied == 6)
        total, whole = await leads.read_history(client, store, lead)
        assert total == len(history) + 1 and whole[:-1] == history
        pages = [(await leads.read_history(client, store, lead, offset=o, limit=2))[1] for o in range(0, total, 2)]
        assert [e for page in pages for e in page] == whole
        assert scheduled_activities(await handle.fetch_history()).count("record_audit") == 0
        assert await store_reaches(store, lead, total) == total
        assert store.history(lead) == whole


async def test_without_a_sweeper_what_waits_goes_with_the_leads_next_write(ts_env, settings, store):
    """A worker that dies before it swept: the entries are in the lead's state, reads show
    them, and the lead's next write of its own (here the stage change to MQL) takes them."""
    client, lead = ts_env.client, "A-nosweep"
    no_sweeper = settings.model_copy(update={"audit_max_lag_seconds": None})  # the worker's side only
    async with running_worker(client, no_sweeper, store) as worker:
        assert worker.sweeper is None
        now = await ts_env.get_current_time()
        for n in range(3):
            await leads.send_events(client, settings, [event(lead, str(n), "website_visit", now)])
            await settle(ts_env, client, lead, lambda v, n=n: v.events_applied == n + 1)
        await asyncio.sleep(1.5)
        assert store.count_history(lead) == 0
        total, history = await leads.read_history(client, store, lead)
        assert [e.kind for e in history].count(AuditKind.SCORE_CHANGED) == 3 and total == len(history)
        await leads.send_events(client, settings, [event(lead, "d", "demo_request", now)])
        await settle(ts_env, client, lead, lambda v: v.stage == Stage.MQL)
        assert await store_reaches(store, lead, total) >= total
        assert store.history(lead)[:total] == history


async def test_stage_change_and_command_write_at_once(ts_env, settings, store):
    client, lead = ts_env.client, "A-now"
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        await leads.send_events(client, settings, [event(lead, "1", "website_visit", now)])
        await settle(ts_env, client, lead, lambda v: v.events_applied == 1)
        await leads.send_events(client, settings, [event(lead, "2", "demo_request", now)])  # fast track
        await settle(ts_env, client, lead, lambda v: v.owner is not None)
        # Well within the lag: the stage change took everything before it along.
        _, history = await leads.read_history(client, store, lead)
        stored = store.history(lead, limit=1000)
        assert any(e.kind == AuditKind.STAGE_CHANGED and e.to_stage == Stage.MQL for e in stored)
        assert [e.kind for e in stored].count(AuditKind.SCORE_CHANGED) == 2
        # A command returns once its entries, and all before them, are in the store.
        view = await leads.run_command(client, lead, Accept(by=ANNA))
        assert view.stage == Stage.SAL
        total, history = await leads.read_history(client, store, lead)
        assert store.count_history(lead) == total
        assert any(e.kind == AuditKind.STAGE_CHANGED and e.to_stage == Stage.SAL and e.actor == "anna"
                   for e in history)


async def test_flush_audit_writes_everything_now(ts_env, settings, store):
    client, lead = ts_env.client, "A-flush"
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        await leads.send_events(client, settings, [event(lead, str(n), "email_open", now) for n in range(3)])
        await settle(ts_env, client, lead, lambda v: v.events_applied == 3)
        assert store.count_history(lead) == 0
        last = await leads.flush_audit(client, lead)
        total, _ = await leads.read_history(client, store, lead)
        assert last == total == store.count_history(lead)
        assert await leads.flush_audit(client, lead) == last  # nothing new: nothing written


async def test_no_lag_writes_every_batch(ts_env, settings, store):
    settings = settings.model_copy(update={"audit_max_lag_seconds": 0})
    client, lead = ts_env.client, "A-zero"
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        await leads.send_events(client, settings, [event(lead, "1", "website_visit", now)])
        await settle(ts_env, client, lead, lambda v: v.events_applied == 1)
        assert await store_reaches(store, lead, 2) == 2  # lead_created, score_changed


async def test_events_do_not_restart_the_wake_up_timer(ts_env, settings, store):
    """An MQL waits for its presales decision (an SLA deadline); events meanwhile
    leave that one timer alone instead of cancelling and starting one per event."""
    client, lead = ts_env.client, "A-timer"
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        await leads.send_events(client, settings, [event(lead, "d", "demo_request", now)])
        await settle(ts_env, client, lead, lambda v: v.owner is not None)
        handle = client.get_workflow_handle(workflow_id(lead))
        before = history_kinds(await handle.fetch_history())
        for n in range(8):
            await leads.send_events(client, settings, [event(lead, str(n), "email_open", now)])
            await settle(ts_env, client, lead, lambda v, n=n: v.events_applied == n + 2)
        after = history_kinds(await handle.fetch_history())
    assert after.count("timer_canceled") == before.count("timer_canceled")
    # at most the audit lag's timer was started by the events
    assert after.count("timer_started") - before.count("timer_started") <= 1


async def test_with_no_time_limit_score_changes_go_with_the_next_other_write(ts_env, settings, store):
    """LEADFLOW_AUDIT_MAX_LAG=never: no timer and no write per quiet event (the cost of
    sparse traffic); they reach the store with the lead's next stage change, and reads
    merge them meanwhile."""
    settings = settings.model_copy(update={"audit_max_lag_seconds": None})
    client, lead = ts_env.client, "A-never"
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        for n in range(3):
            await leads.send_events(client, settings, [event(lead, str(n), "website_visit", now)])
            await settle(ts_env, client, lead, lambda v, n=n: v.events_applied == n + 1)
        await ts_env.sleep(timedelta(hours=3))  # no lag timer: still nothing written
        assert store.count_history(lead) == 0
        total, history = await leads.read_history(client, store, lead)
        assert [e.kind for e in history].count(AuditKind.SCORE_CHANGED) == 3 and total == len(history)
        handle = client.get_workflow_handle(workflow_id(lead))
        assert scheduled_activities(await handle.fetch_history()).count("record_audit") == 0
        await leads.send_events(client, settings, [event(lead, "d", "demo_request", now)])
        await settle(ts_env, client, lead, lambda v: v.stage == Stage.MQL)
        assert await store_reaches(store, lead, total) >= total  # went with the stage change


class StoreDownOnce:
    """The audit store, whose first write fails as when PostgreSQL is down."""

    def __init__(self, store) -> None:
        self.store, self.failed = store, False

    def write_audit(self, entries):
        if not self.failed:
            self.failed = True
            raise OperationalError("INSERT INTO audit ...", {}, ConnectionRefusedError("store down"))
        return self.store.write_audit(entries)


async def test_the_sweeper_writes_each_entry_once_and_tries_again_after_a_failed_write(ts_env, settings, store):
    client, lead = ts_env.client, "A-sweep"
    no_sweeper = settings.model_copy(update={"audit_max_lag_seconds": None})  # this test sweeps by hand
    async with running_worker(client, no_sweeper, store):
        now = await ts_env.get_current_time()
        for n in range(2):
            await leads.send_events(client, settings, [event(lead, str(n), "website_visit", now)])
            await settle(ts_env, client, lead, lambda v, n=n: v.events_applied == n + 1)
        sweeper = AuditSweeper(client, StoreDownOnce(store), settings.task_queue)
        assert await sweeper.sweep() == 0 and store.count_history(lead) == 0  # failed: noted again
        assert await sweeper.sweep() == 3  # lead_created and two score changes
        assert await sweeper.sweep() == 0  # nothing noted since
        await leads.send_events(client, settings, [event(lead, "2", "website_visit", now)])
        await settle(ts_env, client, lead, lambda v: v.events_applied == 3)
        swept_before = sweeper.swept_entries
        assert await sweeper.sweep() == 1
        assert sweeper.swept_entries - swept_before == 1  # asked only for what came after
        total, history = await leads.read_history(client, store, lead)
        assert store.history(lead) == history and total == 4
        # the lead's own write later (here: asked for) adds nothing the sweeper wrote
        await leads.flush_audit(client, lead)
        assert store.history(lead) == history


def _blocking_tail(monkeypatch, asked: list[str]) -> asyncio.Event:
    """The sweeper's query, replaced: records who is asked and answers [] once released."""
    from activities import audit_sweeper

    release = asyncio.Event()

    async def audit_tail(_client, lead_id, _timeout, after_seq=0):
        asked.append(lead_id)
        await release.wait()
        return []

    monkeypatch.setattr(audit_sweeper.leads, "audit_tail", audit_tail)
    return release


async def test_the_sweeper_asks_the_newest_noted_leads_first_and_every_one_in_the_end(monkeypatch, store):
    """A lead noted last is the likeliest still in the worker's cache (answering without a
    replay), so it is asked before a backlog; at most QUERY_CONCURRENCY at a time."""
    from activities import audit_sweeper
    from workflows.audit_cadence import SWEEP_NOTES

    asked: list[str] = []
    release = _blocking_tail(monkeypatch, asked)
    queue = "tq-newest-first"
    noted = [f"L-{n:02d}" for n in range(40)]
    for lead in noted:
        SWEEP_NOTES.note(queue, lead)
    SWEEP_NOTES.note(queue, "L-00")  # noted again: now the newest
    sweeper = AuditSweeper(client=None, store=store, task_queue=queue)
    sweeping = asyncio.create_task(sweeper.sweep())
    await asyncio.sleep(0.05)
    first = audit_sweeper.QUERY_CONCURRENCY
    assert asked == ["L-00", *reversed(noted[-(first - 1):])]  # newest first, no more than that at once
    release.set()
    assert await sweeping == 0
    assert sorted(asked) == sorted(noted)  # everyone asked once, in the end


async def test_a_lead_noted_long_ago_is_asked_before_newer_ones(monkeypatch, store):
    """Newest first must not starve a backlog: a lead waiting past OVERDUE goes first."""
    from activities import audit_sweeper
    from workflows.audit_cadence import SWEEP_NOTES

    asked: list[str] = []
    release = _blocking_tail(monkeypatch, asked)
    monkeypatch.setattr(audit_sweeper, "QUERY_CONCURRENCY", 2)
    monkeypatch.setattr(audit_sweeper, "OVERDUE", 0.2)
    queue = "tq-overdue"
    sweeper = AuditSweeper(client=None, store=store, task_queue=queue)
    for lead in ("Z-old-1", "Z-old-2", "Z-old-3"):
        SWEEP_NOTES.note(queue, lead)
    sweeper._ask_noted()  # Z-old-3 and Z-old-2 asked; Z-old-1 waits
    await asyncio.sleep(0.4)  # Z-old-1 is overdue now
    for lead in ("A-new-1", "A-new-2"):
        SWEEP_NOTES.note(queue, lead)
    sweeping = asyncio.create_task(sweeper.sweep())
    await asyncio.sleep(0)
    release.set()
    assert await sweeping == 0
    # the overdue one first (though a newer note and an earlier name wait), then newest first
    assert asked == ["Z-old-3", "Z-old-2", "Z-old-1", "A-new-2", "A-new-1"]


def test_no_note_is_lost_while_the_sweeper_takes_them():
    """Leads note on the workflow threads while the sweeper takes on its loop: a note must
    not land in a batch already taken (without the lock, ~70 of 80,000 were lost here)."""
    import sys
    import threading

    from workflows.audit_cadence import SweepNotes

    notes, taken = SweepNotes(), []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        writers = [threading.Thread(target=lambda k=k: [notes.note("q", f"{k}-{i}") for i in range(20_000)])
                   for k in range(4)]
        for writer in writers:
            writer.start()
        while any(writer.is_alive() for writer in writers):
            taken += notes.take("q")
        taken += notes.take("q")
    finally:
        sys.setswitchinterval(interval)
    assert len(set(taken)) == len(taken) == 80_000


@pytest.mark.parametrize("version", [9, 10])
async def test_a_deadline_that_starts_waits_for_the_sweeper_from_version_10(ts_env, settings, store, version):
    """A webinar starts its follow-up deadline (SLA_SET) and nothing else: a version 9 lead
    wrote that alone (an activity and a workflow task), a version 10 lead leaves it to the
    sweeper like a score change. Either way it reaches the store, and so does its breach
    when it comes."""
    from workflows.lead import LeadWorkflow
    from workflows.lead_input import LeadInput

    client, lead = ts_env.client, f"A-deadline-v{version}"
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        await client.start_workflow(
            LeadWorkflow.run, LeadInput(lead_id=lead, version=version, decision_delay_seconds=5),
            id=workflow_id(lead), task_queue=settings.task_queue,
            start_signal="event", start_signal_args=[event(lead, "w", "webinar_attended", now)])
        view = await settle(ts_env, client, lead, lambda v: v.events_applied == 1)
        assert view.stage == Stage.IQL and [d.name for d in view.deadlines] == ["webinar_follow_up"]
        total, history = await leads.read_history(client, store, lead)
        assert AuditKind.SLA_SET in [e.kind for e in history]
        assert await store_reaches(store, lead, total) == total
        handle = client.get_workflow_handle(workflow_id(lead))
        assert scheduled_activities(await handle.fetch_history()).count("record_audit") == (1 if version == 9 else 0)
        await ts_env.sleep(timedelta(days=1))  # past the follow-up deadline
        await settle(ts_env, client, lead, lambda v: not v.deadlines)
        total, _ = await leads.read_history(client, store, lead)
        assert await store_reaches(store, lead, total) == total
        assert AuditKind.SLA_BREACHED in [e.kind for e in store.history(lead, limit=1000)]


async def test_handed_entries_reach_the_store_without_a_query_once_their_task_completed(
        dev_env, settings, store, monkeypatch):
    """On the dev server the lead hands its entries to the sweeper with the workflow task that
    produced them; the sweeper writes them once the history shows that task completed, without
    asking the lead (a query on an evicted lead replays it). Here every query fails, so only
    the handed entries can reach the store."""
    from activities import audit_sweeper

    asked: list[str] = []

    async def no_tail(_client, lead_id, _timeout, after_seq=0):
        asked.append(lead_id)
        raise RuntimeError("asked")

    monkeypatch.setattr(audit_sweeper.leads, "audit_tail", no_tail)
    client, lead = dev_env.client, f"A-hand-{uuid.uuid4().hex[:6]}"

    async def applied() -> int:
        try:
            return (await leads.get_view(client, lead)).events_applied
        except leads.LeadStarting:
            return 0
    async with running_worker(client, settings, store):
        now = datetime.now(timezone.utc)
        for n in range(3):  # separate workflow tasks, each handing its own entries
            await leads.send_events(client, settings, [event(lead, str(n), "website_visit", now)])
            await until(applied, lambda count, n=n: count == n + 1)
        await until(lambda: asyncio.to_thread(store.count_history, lead), lambda c: c == 4, timeout=20)
    assert asked == []
    kinds = [e.kind for e in store.history(lead)]
    assert kinds.count(AuditKind.SCORE_CHANGED) == 3 and kinds[0] == AuditKind.LEAD_CREATED


def _events(*spec):
    """History events newest first from (id, type, seconds) tuples."""
    from temporalio.api.history.v1 import HistoryEvent

    out = []
    for event_id, kind, second in spec:
        e = HistoryEvent(event_id=event_id, event_type=kind)
        e.event_time.FromDatetime(datetime(2026, 11, 24, 12, 0, second, tzinfo=timezone.utc))
        out.append(e)
    return out[::-1]


def _page(newest_first: list, request):
    """What the server answers a reverse history read: the next `maximum_page_size` events,
    newest first, and a token for the page after (empty at the run's start)."""
    from types import SimpleNamespace

    start = int(request.next_page_token or b"0")
    end = start + request.maximum_page_size
    return SimpleNamespace(history=SimpleNamespace(events=newest_first[start:end]),
                           next_page_token=str(end).encode() if end < len(newest_first) else b"")


def test_handed_entries_count_only_for_the_very_task_that_completed():
    """The sweeper writes handed entries only if the task that produced them completed: a
    failed or timed-out task is decided again (maybe otherwise), so its entries must not
    reach the store; neither may those of another task that took the same event id."""
    from temporalio.api.enums.v1 import EventType as T

    from activities.audit_sweeper import task_outcome
    from workflows.audit_cadence import Handed

    at = datetime(2026, 11, 24, 12, 0, 5, tzinfo=timezone.utc)
    handed = Handed("L", "run", 8, at, ())
    scheduled, started = (7, T.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 4), (8, T.EVENT_TYPE_WORKFLOW_TASK_STARTED, 5)
    assert task_outcome(_events(scheduled, started, (9, T.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 5)), handed) is True
    assert task_outcome(_events(scheduled, started, (9, T.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 5),
                                (10, T.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED, 5)), handed) is True
    assert task_outcome(_events(scheduled, started), handed) is None  # completion on its way
    assert task_outcome(_events(scheduled, started, (9, T.EVENT_TYPE_WORKFLOW_TASK_FAILED, 6)), handed) is False
    assert task_outcome(_events(scheduled, started, (9, T.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT, 15)), handed) is False
    other_attempt = (8, T.EVENT_TYPE_WORKFLOW_TASK_STARTED, 6)  # the same id, another task (a second later)
    assert task_outcome(_events(scheduled, other_attempt, (9, T.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 6)), handed) is False
    later = [(n, T.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED, 9) for n in range(10, 30)]
    page = _events(scheduled, started, (9, T.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 5), *later)[:16]
    assert task_outcome(page, handed) is False  # the page does not reach back: the lead is asked
    assert task_outcome([], handed) is False


async def test_the_latest_completed_task_of_a_run_instance_vouches_for_its_earlier_ones(store):
    """One history read per run instance: its tasks reached it one after another, so its
    latest completed task vouches for its earlier ones. Entries another instance handed
    from a task that did not complete (decided again later) are not written; that lead is
    asked by query instead."""
    from types import SimpleNamespace

    from temporalio.api.enums.v1 import EventType as T

    from funnel.models import AuditEntry, Role
    from workflows.audit_cadence import SWEEP_NOTES, Handed

    at = datetime(2026, 11, 24, 12, 0, 5, tzinfo=timezone.utc)
    reads: list[str] = []

    async def history_reverse(request, timeout=None):
        reads.append(request.execution.run_id)
        return _page(_events((7, T.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 4), (8, T.EVENT_TYPE_WORKFLOW_TASK_STARTED, 5),
                             (9, T.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 5)), request)

    client = SimpleNamespace(namespace="default",
                             workflow_service=SimpleNamespace(get_workflow_execution_history_reverse=history_reverse))
    queue, lead = f"q-{uuid.uuid4().hex[:6]}", "A-vouch"

    def entry(seq: int, detail: str) -> AuditEntry:
        return AuditEntry(lead_id=lead, seq=seq, at=at, kind=AuditKind.SCORE_CHANGED, actor="system",
                          role=Role.SYSTEM, detail=detail)

    SWEEP_NOTES.hand(queue, Handed(lead, "run", 4, at - timedelta(seconds=1), (entry(1, "first"),), instance=1))
    SWEEP_NOTES.hand(queue, Handed(lead, "run", 8, at, (entry(2, "second"),), instance=1))
    # another instance of the same run handed seq 3 from a task at id 8 that started later:
    # not the task in the history, so not written
    SWEEP_NOTES.hand(queue, Handed(lead, "run", 8, at + timedelta(seconds=1), (entry(3, "rejected"),), instance=2))
    sweeper = AuditSweeper(client, store, queue)
    sweeper._ask_waiting = lambda: None  # the noted lead is not asked here (no real client)
    assert await sweeper.sweep() == 2
    assert sorted(reads) == ["run", "run"]  # one read per instance, not per task
    assert [e.detail for e in store.history(lead)] == ["first", "second"]
    assert sweeper.confirmed == 1
    assert lead in sweeper._waiting  # the unconfirmed instance's lead waits to be asked


async def test_a_busy_instance_s_later_task_vouches_for_its_newest_without_a_read(store):
    """An instance gets a task only once the server took the completion of the one before
    (else the SDK evicts it), so its later task vouches for the earlier ones with no read.
    The newest task of an instance that handed in the last few sweeps waits for that; once
    the instance is quiet for a sweep it is read (an instance's first task at once). A sweep that must finish (`sweep`, at shutdown)
    reads it at once."""
    from types import SimpleNamespace

    from temporalio.api.enums.v1 import EventType as T

    from funnel.models import AuditEntry, Role
    from workflows.audit_cadence import SWEEP_NOTES, Handed

    def at(second: int) -> datetime:
        return datetime(2026, 11, 24, 12, 0, second, tzinfo=timezone.utc)

    reads: list[int] = []

    async def history_reverse(request, timeout=None):  # tasks started at ids 4, 12, 16, 20, each completed
        if not request.next_page_token:  # a read's first page
            reads.append(len(reads))
        return _page(_events(
            (3, T.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 1), (4, T.EVENT_TYPE_WORKFLOW_TASK_STARTED, 1),
            (5, T.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 1), (11, T.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 3),
            (12, T.EVENT_TYPE_WORKFLOW_TASK_STARTED, 3), (13, T.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 3),
            (15, T.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 4), (16, T.EVENT_TYPE_WORKFLOW_TASK_STARTED, 4),
            (17, T.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 4), (19, T.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 5),
            (20, T.EVENT_TYPE_WORKFLOW_TASK_STARTED, 5), (21, T.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 5)), request)

    client = SimpleNamespace(namespace="default",
                             workflow_service=SimpleNamespace(get_workflow_execution_history_reverse=history_reverse))
    queue, lead = f"q-{uuid.uuid4().hex[:6]}", "A-busy"
    sweeper = AuditSweeper(client, store, queue)
    sweeper._ask_waiting = lambda: None

    def hand(seq: int, started_id: int, second: int) -> None:
        entry = AuditEntry(lead_id=lead, seq=seq, at=at(second), kind=AuditKind.SCORE_CHANGED, actor="system",
                           role=Role.SYSTEM, detail=f"task {started_id}")
        SWEEP_NOTES.hand(queue, Handed(lead, "run", started_id, at(second), (entry,), instance=7))

    async def run_loop_sweep() -> list[str]:  # what AuditSweeper.run does every interval
        sweeper._confirm_handed()
        await asyncio.gather(*sweeper._confirming)
        await sweeper._write_answers()
        return [e.detail for e in store.history(lead)]

    hand(1, 4, 1)
    assert await run_loop_sweep() == ["task 4"] and len(reads) == 1  # a first task: read at once
    hand(2, 8, 2)
    assert await run_loop_sweep() == ["task 4"] and len(reads) == 1  # busy: waits for a later task
    hand(3, 12, 3)
    assert await run_loop_sweep() == ["task 4", "task 8"] and len(reads) == 1  # task 8 vouched, no read
    assert sweeper.vouched == 1
    assert await run_loop_sweep() == ["task 4", "task 8", "task 12"] and len(reads) == 2  # quiet: read
    hand(4, 16, 4)  # a sweep after: still busy (it handed within BUSY_SWEEPS sweeps)
    assert (await run_loop_sweep())[-1] == "task 12" and len(reads) == 2
    hand(5, 20, 5)
    assert (await run_loop_sweep())[-1] == "task 16" and len(reads) == 2  # 16 vouched, 20 waits ...
    assert await sweeper.sweep() == 1 and len(reads) == 3  # ... but the worker stops: read now
    assert [e.detail for e in store.history(lead)] == ["task 4", "task 8", "task 12", "task 16", "task 20"]
    assert sweeper.confirmed == 3 and sweeper.vouched == 2


async def test_a_confirm_read_takes_small_pages_back_only_as_far_as_the_task(store):
    """A handed task is looked up in pages of CONFIRM_PAGE newest events (a page of 16 also
    carried the run's input, its whole scoring model: 25% more server CPU per read,
    measured), and further pages only while the task is not reached, up to CONFIRM_REACH
    events back; beyond that the lead is asked by query."""
    from types import SimpleNamespace

    from temporalio.api.enums.v1 import EventType as T

    from activities.audit_sweeper import CONFIRM_PAGE, CONFIRM_REACH
    from funnel.models import AuditEntry, Role
    from workflows.audit_cadence import SWEEP_NOTES, Handed

    assert CONFIRM_PAGE < CONFIRM_REACH
    at = datetime(2026, 11, 24, 12, 0, 5, tzinfo=timezone.utc)
    history = _events((1, T.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED, 0), (2, T.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 0),
                      (3, T.EVENT_TYPE_WORKFLOW_TASK_STARTED, 1), (4, T.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 1),
                      *[(n, T.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED, 2) for n in range(5, 5 + CONFIRM_REACH)],
                      (5 + CONFIRM_REACH, T.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, 4),
                      (6 + CONFIRM_REACH, T.EVENT_TYPE_WORKFLOW_TASK_STARTED, 5),
                      (7 + CONFIRM_REACH, T.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 5),
                      (8 + CONFIRM_REACH, T.EVENT_TYPE_TIMER_STARTED, 5))
    pages: list[int] = []

    async def history_reverse(request, timeout=None):
        pages.append(request.maximum_page_size)
        return _page(history, request)

    client = SimpleNamespace(namespace="default",
                             workflow_service=SimpleNamespace(get_workflow_execution_history_reverse=history_reverse))
    queue = f"q-{uuid.uuid4().hex[:6]}"
    sweeper = AuditSweeper(client, store, queue)
    sweeper._ask_waiting = lambda: None

    def hand(lead: str, started_id: int, second: int) -> None:
        entry = AuditEntry(lead_id=lead, seq=1, at=at, kind=AuditKind.SCORE_CHANGED, actor="system",
                           role=Role.SYSTEM, detail=f"task {started_id}")
        started_at = datetime(2026, 11, 24, 12, 0, second, tzinfo=timezone.utc)
        SWEEP_NOTES.hand(queue, Handed(lead, "run", started_id, started_at, (entry,), instance=1))

    hand("A-newest", 6 + CONFIRM_REACH, 5)  # the newest task: one small page
    assert await sweeper.sweep() == 1
    assert pages == [CONFIRM_PAGE]
    pages.clear()
    hand("A-first", 3, 1)  # further back than CONFIRM_REACH: read that far, then asked
    assert await sweeper.sweep() == 0
    assert pages == [CONFIRM_PAGE] * -(-CONFIRM_REACH // CONFIRM_PAGE)
    assert "A-first" in sweeper._waiting and not store.history("A-first")
    assert [e.detail for e in store.history("A-newest")] == [f"task {6 + CONFIRM_REACH}"]
