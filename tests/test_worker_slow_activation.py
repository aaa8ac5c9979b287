"""A lead whose workflow activation runs longer than 2 s (a loaded machine, a long replay, a
garbage collection) goes on: it takes the next events and answers queries.

With the SDK's deadlock detection on (temporalio 1.35), such an activation failed its task
and the eviction that followed raced the still-running activation ("Eviction processed,
but 2 tasks remain"), so the lead took nothing more on that worker until the process was
replaced (worker.let_slow_activations_finish). The activation is held here by hand inside
the lead's core, in the workflow's own thread, as a slow machine would hold it."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import datetime, timezone

import pytest

import client as leads
import funnel.lead as core
from tests.conftest import event, running_worker, until

HOLD = 2.5  # s: longer than the SDK's deadlock timeout (2 s)


class _Hold:
    """Holds the first call of a core method for one lead, once armed, in the workflow thread."""

    def __init__(self, lead_id: str) -> None:
        self.lead_id = lead_id
        self.armed = False
        self.held = threading.Event()

    def once(self, lead_id: str) -> None:
        if self.armed and lead_id == self.lead_id and not self.held.is_set():
            self.held.set()
            time.sleep(HOLD)


async def _applied(client, lead: str) -> int | None:
    """How many events the lead has applied; None while it does not answer."""
    try:
        view = await asyncio.wait_for(leads.get_view(client, lead), 5)
    except (asyncio.TimeoutError, leads.LeadStarting):
        return None
    return view.events_applied


async def _send(client, settings, lead: str, n: int) -> None:
    await leads.send_events(client, settings, [event(lead, f"e{n}", "website_visit", datetime.now(timezone.utc))])


@pytest.mark.parametrize("held", ["event", "query"])
async def test_a_lead_goes_on_after_an_activation_slower_than_the_deadlock_timeout(
        dev_env, settings, store, monkeypatch, held):
    client = dev_env.client
    lead = f"slow-{held}-{uuid.uuid4().hex[:6]}"
    hold = _Hold(lead)
    if held == "event":
        ingest = core.Lead.ingest_many

        def slow_ingest(self, events, now, applied=frozenset()):
            if any(e.event_id == f"{lead}-e2" for e in events):
                hold.once(self.state.lead_id)
            return ingest(self, events, now, applied)

        monkeypatch.setattr(core.Lead, "ingest_many", slow_ingest)
    else:
        view = core.Lead.view

        def slow_view(self):
            hold.once(self.state.lead_id)
            return view(self)

        monkeypatch.setattr(core.Lead, "view", slow_view)

    async with running_worker(client, settings, store):
        await _send(client, settings, lead, 1)
        await until(lambda: _applied(client, lead), lambda n: n == 1, timeout=30)
        hold.armed = True
        if held == "event":
            await _send(client, settings, lead, 2)  # its activation is held
        else:
            await _applied(client, lead)  # this query's activation is held (it may fail)
        assert await asyncio.to_thread(hold.held.wait, 30), "the hold was never reached"
        await _send(client, settings, lead, 3)
        sent = 3 if held == "event" else 2
        # Stuck, it would answer None (no query answered) or 1 for as long as the worker runs.
        await until(lambda: _applied(client, lead), lambda n: n == sent, timeout=30)
