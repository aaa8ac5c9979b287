"""When the lead writes its audit, on the time-skipping server.

Score changes and other high-volume entries wait (up to the audit lag) so a
burst of events costs one write; stage changes, commands and timers write
everything at once; reads see every entry either way. Timers for the lead's
wake-ups are not restarted by each event.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import client as leads
from funnel.models import Accept, AuditKind, Stage
from tests.conftest import (
    ANNA,
    event,
    history_kinds,
    running_worker,
    scheduled_activities,
    settle,
)
from workflows.lead import workflow_id


async def store_reaches(store, lead: str, count: int) -> int:
    """The store's entry count for `lead` once it reaches `count` (an activity may be finishing)."""
    for _ in range(200):
        if store.count_history(lead) >= count:
            break
        await asyncio.sleep(0.02)
    return store.count_history(lead)


async def test_score_changes_wait_for_the_lag_and_are_readable_meanwhile(ts_env, settings, store):
    client, lead = ts_env.client, "A-lag"
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        for n in range(5):  # five separate webhooks, one write for all of them
            await leads.send_events(client, settings, [event(lead, str(n), "website_visit", now)])
            await settle(ts_env, client, lead, lambda v, n=n: v.events_applied == n + 1)
        total, history = await leads.read_history(client, store, lead)
        assert [e.kind for e in history].count(AuditKind.SCORE_CHANGED) == 5
        assert total == len(history)
        assert store.count_history(lead) == 0
        await ts_env.sleep(timedelta(seconds=settings.audit_max_lag_seconds + 1))
        assert await store_reaches(store, lead, total) == total
        assert store.history(lead) == history
        # paging over store and tail gives the same entries
        await leads.send_events(client, settings, [event(lead, "late", "website_visit", now)])
        await settle(ts_env, client, lead, lambda v: v.events_applied == 6)
        total, whole = await leads.read_history(client, store, lead)
        assert total == len(history) + 1 and whole[:-1] == history
        pages = [(await leads.read_history(client, store, lead, offset=o, limit=2))[1] for o in range(0, total, 2)]
        assert [e for page in pages for e in page] == whole
        handle = client.get_workflow_handle(workflow_id(lead))
        assert scheduled_activities(await handle.fetch_history()).count("record_audit") == 1


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
