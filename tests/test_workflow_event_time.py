"""Order and batching do not matter through the real lead workflow either.

The same generated event sets go to two leads on the time-skipping server: to one in
time order in one signal, to the other newest first, one signal per event, with a
redelivery; likewise profile updates (fit facts and consent facts), each lead getting
them in the opposite order. After the decision delay both must show the same score,
breakdown, stage path, profile, consent and messages, and three weeks later the same
nurture steps sent or skipped (the core's property tests cover thousands of sets; these
check the workflow shell adds no order of its own).
"""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

import client as leads
from funnel.models import ActivityEvent, OutboundKind, ProfileUpdate
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


def fact_set(seed: int, now) -> list[ProfileUpdate]:
    """Updates that disagree: a later observation of a fact wins, whatever arrives last."""
    rng = random.Random(seed * 7)
    choices = {"industry": ["software", "retail"], "company_size": [40, 400], "student": [True, False],
               "email_consent": [True, False]}
    updates = []
    for i in range(rng.randint(2, 5)):
        facts = {name: rng.choice(values) for name, values in rng.sample(sorted(choices.items()), 2)}
        updates.append(ProfileUpdate(update_id=f"p{seed}-{i}", lead_id="placeholder", facts=facts,
                                     observed_at=now - timedelta(hours=rng.randint(1, 300))))
    return updates


def for_lead(items: list, lead: str) -> list:
    return [e.model_copy(update={"lead_id": lead}) for e in items]


def outcome(view, outbox) -> dict:
    return {
        "score": view.score,
        "stage": view.stage,
        "path": [(v.stage, v.trigger) for v in view.history],
        "channel": view.channel,
        "consent": view.consent["email"],
        "profile": view.profile,
        "messages": sorted(
            (m.kind.value, m.payload.get("reason"), m.payload.get("score"), str(m.payload.get("breakdown")))
            for m in outbox if m.kind in (OutboundKind.HANDOVER, OutboundKind.REVIEW)
        ),
        "nurture": sorted((m.payload["track"], m.payload["step"]) for m in outbox
                          if m.kind == OutboundKind.NURTURE_STEP),
    }


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_the_workflow_scores_and_decides_alike_whatever_the_delivery(ts_env, settings, store, seed):
    client = ts_env.client
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        events, facts = event_set(seed, "placeholder", now), fact_set(seed, now)
        ordered, shuffled = f"E{seed}-ordered", f"E{seed}-shuffled"
        for update in sorted(for_lead(facts, ordered), key=lambda u: u.observed_at):
            await leads.send_profile(client, settings, update)
        await leads.send_events(client, settings, sorted(for_lead(events, ordered), key=lambda e: e.occurred_at))
        reverse = sorted(for_lead(events, shuffled), key=lambda e: e.occurred_at, reverse=True)
        for event in reverse + reverse[:1]:  # one signal each, and a webhook redelivery
            await leads.send_events(client, settings, [event])
        for update in sorted(for_lead(facts, shuffled), key=lambda u: u.observed_at, reverse=True):
            await leads.send_profile(client, settings, update)
        views = {}
        for lead in (ordered, shuffled):
            view = await settle(ts_env, client, lead, lambda v: v.events_applied == len(events)
                                and len(v.profile) >= 2 and v.decision_due_at is None)
            await ts_env.sleep(timedelta(seconds=settings.decision_delay_seconds + 1))
            views[lead] = await leads.get_view(client, lead)
        await ts_env.sleep(timedelta(days=21))  # the nurture sequences run (or are skipped) meanwhile
        for lead in (ordered, shuffled):
            await leads.flush_audit(client, lead)
        assert views[shuffled].duplicates_ignored == 1
    messages = store.pending_outbox(limit=1000)
    a = outcome(views[ordered], [m for m in messages if m.lead_id == ordered])
    b = outcome(views[shuffled], [m for m in messages if m.lead_id == shuffled])
    assert a == b
