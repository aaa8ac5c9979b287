"""Outbound delivery never holds a lead up: with the webhook down, events, commands
and timers go on; when it comes back, the handover arrives (once) and the owner
is assigned."""

from __future__ import annotations

from datetime import timedelta

import client as leads
from funnel.models import Accept, Stage
from tests.conftest import ANNA, Receiver, event, running_worker, settle


async def delivered_handover(receiver, env, tries: int = 200) -> None:
    for _ in range(tries):
        if any(body["kind"] == "handover" for _, body in receiver.taken):
            return
        await env.sleep(timedelta(milliseconds=50))
    raise AssertionError("the handover never reached the receiver")


async def test_webhook_outage_does_not_hold_the_lead_up(ts_env, settings, store):
    receiver = Receiver(mode="down")
    settings = settings.model_copy(update={"webhook_url": receiver.url})
    client, lead = ts_env.client, "O-outage"
    try:
        async with running_worker(client, settings, store):
            now = await ts_env.get_current_time()
            await leads.send_events(client, settings, [event(lead, "1", "demo_request", now)])
            view = await settle(ts_env, client, lead, lambda v: v.stage == Stage.MQL)
            await ts_env.sleep(timedelta(minutes=5))  # handover retrying against a 503
            view = await leads.get_view(client, lead)
            # the owner is assigned first and recorded at once; only the webhook waits
            assert view.owner in settings.presales_team
            presales_owner = view.owner
            view = await leads.run_command(client, lead, Accept(by=ANNA))
            assert view.stage == Stage.SAL, "commands are not blocked by a failing delivery"
            now = await ts_env.get_current_time()
            await leads.send_events(client, settings, [event(lead, "2", "website_visit", now)])
            await settle(ts_env, client, lead, lambda v: v.events_applied == 2)

            receiver.mode = "up"
            await ts_env.sleep(timedelta(minutes=15))  # past the next retry (at most 10 min apart)
            await delivered_handover(receiver, ts_env)
            view = await leads.get_view(client, lead)
            assert view.owner == presales_owner
    finally:
        receiver.close()
    handovers = [(key, body) for key, body in receiver.taken if body["kind"] == "handover"]
    assert len(handovers) == 1
    key, body = handovers[0]
    assert key == body["message_id"] and body["payload"]["owner"] == view.owner
