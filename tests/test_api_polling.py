"""Polling tools: `updated_since` on the lead list, the outbox and a subscription's
delivery log, with cursor paging (no cap)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from activities import webhook_store
from activities.webhook_store import SubscriptionKind
from tests.conftest import until
from tests.test_api import api, ev, iso, now  # noqa: F401 - `api` is the fixture


async def _stored(store, lead: str, at_least: int = 1) -> None:
    await until(lambda: _count(store, lead), lambda n: n >= at_least)


async def _count(store, lead: str) -> int:
    return store.count_history(lead)


async def test_leads_changed_since_are_listed_oldest_change_first_and_paged(api, store):
    mautic, anna = api.as_("mautic"), api.as_("anna")
    a, b, c = (f"P{x}-{uuid.uuid4().hex[:6]}" for x in "abc")
    t = now() - timedelta(hours=1)
    for lead in (a, b):
        assert (await mautic.post("/events", json=ev(f"{lead}-1", lead, "website_visit", t))).status_code == 202
    for lead in (a, b):
        await _stored(store, lead, 2)
    mark = datetime.now(timezone.utc)
    for lead in (b, c):
        assert (await mautic.post("/events", json=ev(f"{lead}-2", lead, "email_open", t))).status_code == 202
    await until(lambda: anna.get("/leads", params={"updated_since": iso(mark)}),
                lambda r: r.status_code == 200 and {x["lead_id"] for x in r.json()["leads"]} == {b, c})
    listed = (await anna.get("/leads", params={"updated_since": iso(mark)})).json()["leads"]
    assert [x["updated_at"] for x in listed] == sorted(x["updated_at"] for x in listed)
    assert all(x["updated_at"] >= iso(mark)[:19] for x in listed)
    # One at a time: the cursor walks through them all, then says there is no more.
    seen, cursor = [], None
    while True:
        params = {"updated_since": iso(mark), "limit": 1} | ({"cursor": cursor} if cursor else {})
        page = (await anna.get("/leads", params=params)).json()
        seen += [x["lead_id"] for x in page["leads"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [x["lead_id"] for x in listed]
    # The other filters still apply.
    r = await anna.get("/leads", params={"updated_since": iso(mark), "stage": "mql"})
    assert r.status_code == 200 and r.json()["leads"] == []
    r = await anna.get("/leads", params={"updated_since": "2026-11-23T10:00:00"})
    assert r.status_code == 422  # a time without a timezone is ambiguous


async def test_outbox_and_deliveries_since(api, store):
    mautic, mia = api.as_("mautic"), api.as_("mia")
    sub = webhook_store.add_subscription(store, "http://127.0.0.1:9/x", [SubscriptionKind.HANDOVER], "mia")
    first = f"Q-{uuid.uuid4().hex[:6]}"
    assert (await mautic.post("/events", json=ev(f"{first}-1", first, "demo_request", now()))).status_code == 202
    await until(lambda: mautic.get("/outbox", params={"kind": "handover"}),
                lambda r: any(m["lead_id"] == first for m in r.json()["messages"]))
    mark = datetime.now(timezone.utc)
    second = f"Q-{uuid.uuid4().hex[:6]}"
    assert (await mautic.post("/events", json=ev(f"{second}-1", second, "demo_request", now()))).status_code == 202
    r = await until(lambda: mautic.get("/outbox", params={"updated_since": iso(mark)}),
                    lambda r: any(m["lead_id"] == second for m in r.json()["messages"]))
    assert {m["lead_id"] for m in r.json()["messages"]} == {second}
    r = await mia.get(f"/subscriptions/{sub.subscription_id}/deliveries", params={"updated_since": iso(mark)})
    assert [d["lead_id"] for d in r.json()["deliveries"]] == [second]
    r = await mia.get(f"/subscriptions/{sub.subscription_id}/deliveries")
    assert [d["lead_id"] for d in r.json()["deliveries"]] == [first, second]


async def test_a_cursor_not_made_here_is_refused_as_such(api, store):
    anna = api.as_("anna")
    # Found by the fuzzer: a garbled Temporal page token came back from Temporal as an
    # internal error, and the API answered 503 (retry) instead of 422 (your request is wrong).
    for cursor in ("nFlkIzd0", "eyJ4IjogMX0="):
        r = await anna.get("/leads", params={"cursor": cursor})
        assert r.status_code == 422 and "invalid cursor" in r.json()["message"], r.text
