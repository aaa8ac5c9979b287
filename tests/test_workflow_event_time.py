"""Order and batching do not matter through the real lead workflow either.

The same generated event sets go to two leads on the time-skipping server: to one in
time order in one signal, to the other newest first, one signal per event, with a
redelivery. After the decision delay both must show the same score, breakdown, stage
path and messages (the core's property tests cover thousands of sets; these check
the workflow shell adds no order of its own).
"""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

import client as leads
from funnel.models import ActivityEvent, OutboundKind
from tests.conftest import running_worker, settle

TYPES = ["website_visit", "pricing_page_visit", "email_open", "webinar_attended", "newsletter_signup",
         "content_download", "demo_request", "unsubscribe", "sample_request", "resubscribe"]


def event_set(seed: int, lead: str, now) -> list[ActivityEvent]:
    rng = random.Random(seed)
    events = []
    for i in range(rng.randint(6, 12)):
        age = rng.choice([timedelta(hours=rng.randint(1, 48)), timedelta(days=rng.choice([5, 31, 40, 62]))])
        events.append(ActivityEvent(event_id=f"s{seed}-{i}", lead_id=lead, type=rng.choice(TYPES),
                                    occurred_at=now - age, channel=rng.choice(["web", "ads", None])))
    return events


def for_lead(events: list[ActivityEvent], lead: str) -> list[ActivityEvent]:
    return [e.model_copy(update={"lead_id": lead}) for e in events]


def outcome(view, outbox) -> dict:
    return {
        "score": view.score,
        "stage": view.stage,
        "path": [(v.stage, v.trigger) for v in view.history],
        "channel": view.channel,
        "consent": view.consent["email"],
        "messages": sorted(
            (m.kind.value, m.payload.get("reason"), m.payload.get("score"), str(m.payload.get("breakdown")))
            for m in outbox if m.kind in (OutboundKind.HANDOVER, OutboundKind.REVIEW)
        ),
    }


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_the_workflow_scores_and_decides_alike_whatever_the_delivery(ts_env, settings, store, seed):
    client = ts_env.client
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        events = event_set(seed, "placeholder", now)
        ordered, shuffled = f"E{seed}-ordered", f"E{seed}-shuffled"
        await leads.send_events(client, settings, sorted(for_lead(events, ordered), key=lambda e: e.occurred_at))
        reverse = sorted(for_lead(events, shuffled), key=lambda e: e.occurred_at, reverse=True)
        for event in reverse + reverse[:1]:  # one signal each, and a webhook redelivery
            await leads.send_events(client, settings, [event])
        views = {}
        for lead in (ordered, shuffled):
            view = await settle(ts_env, client, lead, lambda v: v.events_applied == len(events)
                                and v.decision_due_at is None)
            await ts_env.sleep(timedelta(seconds=settings.decision_delay_seconds + 1))
            views[lead] = await leads.get_view(client, lead)
            await leads.flush_audit(client, lead)
        assert views[shuffled].duplicates_ignored == 1
    messages = store.pending_outbox(limit=1000)
    a = outcome(views[ordered], [m for m in messages if m.lead_id == ordered])
    b = outcome(views[shuffled], [m for m in messages if m.lead_id == shuffled])
    assert a == b
