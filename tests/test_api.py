"""The HTTP API against the real thing: uvicorn on loopback, the Temporal dev server and a worker.

Each test serves `api.create_app(...)` with uvicorn in this test's event loop (on a
socket bound to a free port), beside a worker from `running_worker` with its own
task queue and SQLite audit store, and talks to it with httpx like any tool would:
a lead from first webhook to won, duplicate and out-of-order webhooks, every
refusal (401/403/404/409/410/413/422, 503 without Temporal), the refusal to
start without keys, and a burst of 2000 events from 16 concurrent clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import logging
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlmodel import Session, select
from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause

from activities.lead_activities import LeadActivities
from activities.store import AuditRow
import client as leads_client
from api import MAX_BATCH, MAX_BODY_BYTES, ConfigError, KeyRing, create_app
from funnel.models import AuditEntry, AuditKind, Outbound, OutboundKind
from tests.conftest import running_worker, scheduled_activities, until
from workflows.lead import workflow_id

ROOT = Path(__file__).resolve().parent.parent

# name -> (role, key); the names are what the audit history must show.
KEYS = {
    "mautic": ("marketing", "mk-l20tcNDJqjpRTq6OGzs8Dd3J0NknXOG4"),
    "anna": ("presales", "ps-0kwBdvgU-ktoxYJMGqO9cIQCVstFFQTy"),
    "ben": ("sales", "sa-6tt69Ns0FaVqZPsPNO8tGlCtRTt3XHsN"),
    "mia": ("manager", "mg-q_7V-nud9793Yg75pTU0CaiU_K6uQfgD"),
}
KEYRING = KeyRing(KeyRing.parse(",".join(f"{name}:{role}:{key}" for name, (role, key) in KEYS.items())))
WAIT = 60.0  # seconds for the worker to apply something


def now() -> datetime:
    return datetime.now(timezone.utc)


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def ev(event_id: str, lead: str, kind: str, at: datetime, channel: str | None = "website", **extra) -> dict:
    body = {"event_id": event_id, "lead_id": lead, "type": kind, "occurred_at": iso(at), **extra}
    if channel:
        body["channel"] = channel
    return body


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: Ctrl-C stays pytest's."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@contextlib.asynccontextmanager
async def serving(app):
    """Serve `app` on 127.0.0.1 (a free port, bound before uvicorn starts: no race) in this loop."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()


class Api:
    def __init__(self, base_url: str):
        self.base_url = base_url
        self._clients: list[httpx.AsyncClient] = []

    def as_(self, name: str | None, **headers: str) -> httpx.AsyncClient:
        """A client with `name`'s key (None: no key)."""
        if name is not None:
            headers.setdefault("Authorization", f"Bearer {KEYS[name][1]}")
        client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=90)
        self._clients.append(client)
        return client

    async def close(self) -> None:
        for client in self._clients:
            await client.aclose()


@contextlib.asynccontextmanager
async def api_over_worker(dev_env, settings, store):
    """The API served beside a worker of `settings`, and clients for it (closed after)."""
    async with running_worker(dev_env.client, settings, store):
        app = create_app(settings=settings, keys=KEYRING, temporal=dev_env.client, store=store)
        async with serving(app) as base_url:
            api = Api(base_url)
            try:
                yield api
            finally:
                await api.close()


@pytest.fixture
async def api(dev_env, settings, store):
    async with api_over_worker(dev_env, settings, store) as api:
        yield api


async def view_when(client: httpx.AsyncClient, lead: str, check, timeout: float = WAIT) -> dict:
    response = await until(lambda: client.get(f"/leads/{lead}"),
                           lambda r: r.status_code == 200 and check(r.json()), timeout)
    return response.json()


# --------------------------------------------------------------------------- the funnel over HTTP


async def test_lead_from_first_webhook_to_won(api, store, settings):
    lead = f"L-{uuid.uuid4().hex[:8]}"
    mautic, anna, ben, mia = api.as_("mautic"), api.as_("anna"), api.as_("ben"), api.as_("mia")
    t0 = now() - timedelta(minutes=30)

    r = await mautic.post(f"/leads/{lead}/profile", json={"update_id": "pu-1", "facts": {"target_account": True}})
    assert r.status_code == 202, r.text
    assert r.json()["outcome"] == "accepted"
    r = await mautic.post("/events", json=ev(f"{lead}-1", lead, "website_visit", t0, channel="webinar"))
    assert r.status_code == 202, r.text
    assert r.json() == {"event_id": f"{lead}-1", "lead_id": lead, "outcome": "accepted",
                        "detail": "taken; applied once by the lead"}
    r = await mautic.post("/events/batch", json={"events": [
        ev(f"{lead}-2", lead, "webinar_attended", t0 + timedelta(minutes=1)),
        ev(f"{lead}-3", lead, "webinar_attended", t0 + timedelta(minutes=2)),
    ]})
    assert r.status_code == 202, r.text
    assert (r.json()["accepted"], r.json()["rejected"]) == (2, 0)

    view = await view_when(anna, lead, lambda v: v["owner"] is not None)
    assert view["stage"] == "mql" and view["owner"] in settings.presales_team
    assert view["channel"] == "webinar"
    assert view["score"]["fit"] == 20 and view["score"]["engagement"] == 126  # 1 + 50 + 50 x1.5
    assert view["score"]["breakdown"]["webinar_attended"] == 125
    owner = view["owner"]

    # Presales decides; the answer is the lead's new state.
    r = await anna.post(f"/leads/{lead}/accept", json={"note": "looks good"})
    assert r.status_code == 200, r.text
    assert r.json()["stage"] == "sal"
    listed = await until(lambda: anna.get("/leads", params={"stage": "sal", "owner": owner}),
                         lambda r: r.status_code == 200 and lead in [x["lead_id"] for x in r.json()["leads"]])
    assert next(x for x in listed.json()["leads"] if x["lead_id"] == lead)["owner"] == owner
    r = await anna.post(f"/leads/{lead}/qualify", json={"framework": "bant", "bant": {"budget": True, "need": True}})
    assert r.status_code == 409 and "BANT 2 of 4 met" in r.json()["detail"]
    r = await anna.post(f"/leads/{lead}/qualify",
                        json={"bant": {"budget": True, "need": True, "authority": True}})
    assert r.status_code == 200, r.text
    assert r.json()["stage"] == "sql" and r.json()["qualified_by"].startswith("bant 3/4")

    # Sales works it to won.
    r = await ben.post(f"/leads/{lead}/contact", json={"channel": "meeting", "note": "demo done"})
    assert r.status_code == 200 and r.json()["stage"] == "sql"
    r = await ben.post(f"/leads/{lead}/close", json={"outcome": "won"})
    assert r.status_code == 200, r.text
    assert r.json()["stage"] == "won"

    # A won lead takes nothing more, and says so.
    r = await ben.post(f"/leads/{lead}/close", json={"outcome": "lost", "reason": "no_budget"})
    assert r.status_code == 410 and "closed" in r.json()["detail"]
    r = await mautic.post("/events", json=ev(f"{lead}-9", lead, "website_visit", now()))
    assert r.status_code == 410, r.text
    r = await mautic.post("/events/batch", json={"events": [ev(f"{lead}-9", lead, "website_visit", now())]})
    assert r.status_code == 202 and r.json()["results"][0]["outcome"] == "rejected"
    assert "closed" in r.json()["results"][0]["reason"]
    r = await mautic.post(f"/leads/{lead}/profile", json={"facts": {"industry": "software"}})
    assert r.status_code == 410, r.text
    # ...but is still read: state from its completed workflow, history from the store.
    r = await ben.get(f"/leads/{lead}")
    assert r.status_code == 200 and r.json()["stage"] == "won"

    # The history names the keys' owners as actors, never anything a body said.
    history = await until(lambda: mia.get(f"/leads/{lead}/history", params={"limit": 1000}),
                          lambda r: any(e["to_stage"] == "won" for e in r.json()["entries"]))
    page = history.json()
    assert page["total"] == len(page["entries"]) == store.count_history(lead)
    actors = {(e["kind"], e.get("to_stage")): (e["actor"], e["role"]) for e in page["entries"]}
    assert actors[("profile_updated", None)] == ("mautic", "marketing")
    # The event log keeps what a backtest replays: each event and profile update taken, once.
    replay = [r.event_id if "event_id" in r._fields else r.update_id for r in store.replay_log(lead_id=lead)]
    assert replay.count("pu-1") == 1 and replay.count(f"{lead}-1") == 1
    (pu,) = [r for r in store.replay_log(lead_id=lead) if "update_id" in r._fields and r.update_id == "pu-1"]
    assert (pu.facts, pu.actor, pu.role) == ({"target_account": True}, "mautic", "marketing")
    assert actors[("stage_changed", "mql")] == ("leadflow", "system")
    assert actors[("stage_changed", "sal")] == ("anna", "presales")
    assert actors[("stage_changed", "sql")] == ("anna", "presales")
    assert actors[("contact_logged", None)] == ("ben", "sales")
    assert actors[("stage_changed", "won")] == ("ben", "sales")
    second = (await mia.get(f"/leads/{lead}/history", params={"offset": 2, "limit": 3})).json()
    assert (second["total"], second["offset"], second["limit"]) == (page["total"], 2, 3)
    assert second["entries"] == page["entries"][2:5]

    # The handover waits in the outbox for pollers until acknowledged.
    r = await mautic.get("/outbox", params={"kind": "handover"})
    assert r.status_code == 200
    handovers = [m for m in r.json()["messages"] if m["lead_id"] == lead]
    assert len(handovers) == 1 and handovers[0]["payload"]["owner"] == owner
    message_id = handovers[0]["message_id"]
    r = await mautic.post("/outbox/ack", json={"message_ids": [message_id, message_id]})
    assert r.json() == {"acknowledged": 1, "unchanged": 0}
    r = await mautic.post("/outbox/ack", json={"message_ids": [message_id]})
    assert r.json() == {"acknowledged": 0, "unchanged": 1}
    r = await mia.get("/outbox")
    assert message_id not in [m["message_id"] for m in r.json()["messages"]]

    report = (await mia.get("/report")).json()
    won = {s["stage"]: s for s in report["overall"]["stages"]}["won"]
    assert won["reached"] >= 1
    table = await mia.get("/report", params={"format": "csv"})
    assert table.status_code == 200 and table.headers["content-type"].startswith("text/csv")
    rows = {(r["channel"], r["stage"]): r for r in csv.DictReader(io.StringIO(table.text))}
    assert rows[("all", "won")]["reached"] == str(won["reached"])
    assert len(rows) == (1 + len(report["by_channel"])) * len(report["overall"]["stages"])
    assert report["presales"]["overall"]["accepted"] >= 1 and report["opportunities"]["overall"]["won"] >= 1
    table = await mia.get("/report", params={"format": "csv", "table": "slas"})
    assert table.status_code == 200 and 'filename="funnel-slas.csv"' in table.headers["content-disposition"]
    assert table.text.startswith("by,group,set,met,breached")
    assert (await mia.get("/report", params={"opportunity_days": 0})).status_code == 422
    assert (await mia.get("/report", params={"format": "csv", "table": "nope"})).status_code == 422
    assert (await mia.get("/readyz")).json()["ready"] is True


# --------------------------------------------------------------------------- duplicates and order


async def test_consent_withdrawn_shows_on_the_lead_and_in_its_history(api):
    """An unsubscribe: the lead's view says it may not be mailed, since when and why, and
    its history has an entry saying so; a confirmed resubscribe gives consent back."""
    lead = f"L-{uuid.uuid4().hex[:8]}"
    mautic, anna = api.as_("mautic"), api.as_("anna")
    t0 = now() - timedelta(minutes=30)
    r = await mautic.post("/events/batch", json={"events": [
        ev(f"{lead}-1", lead, "newsletter_signup", t0), ev(f"{lead}-2", lead, "unsubscribe", t0 + timedelta(minutes=5))]})
    assert r.status_code == 202 and r.json()["accepted"] == 2, r.text
    view = await view_when(anna, lead, lambda v: v["consent"]["email"] is False)
    assert view["consent"] == {"email": False, "since": (t0 + timedelta(minutes=5)).isoformat(),
                               "source": f"unsubscribe {lead}-2"}
    r = await mautic.post("/events", json=ev(f"{lead}-3", lead, "resubscribe", t0 + timedelta(minutes=9)))
    assert r.status_code == 202, r.text
    await view_when(anna, lead, lambda v: v["consent"]["email"] is True)
    history = await until(lambda: anna.get(f"/leads/{lead}/history"),
                          lambda r: r.status_code == 200 and sum(
                              e["kind"] == "consent_changed" for e in r.json()["entries"]) == 2)
    assert [e["detail"] for e in history.json()["entries"] if e["kind"] == "consent_changed"] == [
        f"email consent: may not be mailed since {(t0 + timedelta(minutes=5)).isoformat()} (unsubscribe {lead}-2)",
        f"email consent: may be mailed again since {(t0 + timedelta(minutes=9)).isoformat()} (resubscribe {lead}-3)"]


async def test_duplicate_and_out_of_order_webhooks(api, store, dev_env):
    mautic = api.as_("mautic")
    lead = f"D-{uuid.uuid4().hex[:8]}"
    t0 = now() - timedelta(hours=1)
    first = ev(f"{lead}-a", lead, "email_open", t0)

    r = await mautic.post("/events", json=first)
    assert r.json()["outcome"] == "accepted"
    await view_when(mautic, lead, lambda v: v["events_applied"] == 1)
    # The `duplicate` answer comes from the audit store, which gets score changes
    # within LEADFLOW_AUDIT_MAX_LAG; have the lead write them now.
    await leads_client.flush_audit(dev_env.client, lead)
    # A redelivery of an applied event changes nothing and says so.
    r = await mautic.post("/events", json=first)
    assert r.status_code == 202 and r.json()["outcome"] == "duplicate", r.text
    r = await mautic.post("/events/batch", json={"events": [first, first]})
    assert [x["outcome"] for x in r.json()["results"]] == ["duplicate", "duplicate"]
    # Redeliveries racing each other: whatever the answers, applied once.
    burst = ev(f"{lead}-b", lead, "email_click", t0 + timedelta(minutes=1))
    answers = await asyncio.gather(*(mautic.post("/events", json=burst) for _ in range(5)))
    assert all(a.status_code == 202 for a in answers)
    view = await view_when(mautic, lead, lambda v: v["events_applied"] == 2)
    assert view["score"]["breakdown"] == {"email_open": 2, "email_click": 5}
    # redeliveries the event log knew never reached the lead; racing ones it de-duplicated
    assert view["duplicates_ignored"] <= 4

    # Out of order: one batch in reverse occurred_at order is scored in time order,
    # so the frequency bonus grows with time (x1, x1.5, x2, x2), not with arrival.
    times = [t0 + timedelta(minutes=10 + i) for i in range(4)]
    batch = [ev(f"{lead}-p{i}", lead, "pricing_page_visit", times[i]) for i in range(4)]
    r = await mautic.post("/events/batch", json={"events": list(reversed(batch))})
    assert r.json()["accepted"] == 4
    assert [x["event_id"] for x in r.json()["results"]] == [f"{lead}-p{i}" for i in (3, 2, 1, 0)]
    await view_when(mautic, lead, lambda v: v["events_applied"] == 6)
    page = (await mautic.get(f"/leads/{lead}/history", params={"limit": 1000})).json()
    assert page["complete"] is True and page["total"] == len(page["entries"])
    entries = page["entries"]
    scored = [(e["event_id"], e["points"]) for e in entries
              if e["kind"] == "score_changed" and (e["event_id"] or "").startswith(f"{lead}-p")]
    assert scored == [(f"{lead}-p0", 5), (f"{lead}-p1", 7.5), (f"{lead}-p2", 10), (f"{lead}-p3", 10)]
    duplicates = [e for e in entries if e["kind"] == "duplicate_ignored"]
    assert {e["event_id"] for e in duplicates} <= {f"{lead}-b"}  # only racing redeliveries got that far
    # The history was the store plus what the lead had not written yet; once written,
    # the store holds exactly those entries.
    await leads_client.flush_audit(dev_env.client, lead)
    assert store.history(lead, limit=1000) == [AuditEntry.model_validate(e) for e in entries]


# --------------------------------------------------------------------------- refusals


async def test_who_may_do_what(api):
    lead = f"A-{uuid.uuid4().hex[:8]}"
    event = ev(f"{lead}-1", lead, "website_visit", now())
    nobody = api.as_(None)
    # Probes and documentation need no key.
    assert (await nobody.get("/healthz")).status_code == 200
    assert (await nobody.get("/readyz")).json()["ready"] is True
    docs = (await nobody.get("/docs")).text
    assert "Leadflow API" in docs
    spec = (await nobody.get("/openapi.json")).json()
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert "Roles: presales, manager." in spec["paths"]["/leads/{lead_id}/accept"]["post"]["description"]
    r = await nobody.post("/events", json=event)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in r.json()["detail"]
    r = await api.as_(None, Authorization="Bearer not-a-key-of-ours-at-all").post("/events", json=event)
    assert r.status_code == 401 and r.json()["detail"] == "invalid API key"
    r = await api.as_(None, Authorization=f"Basic {KEYS['mautic'][1]}").get(f"/leads/{lead}")
    assert r.status_code == 401
    # X-API-Key works as well as the bearer header.
    r = await api.as_(None, **{"X-API-Key": KEYS["mautic"][1]}).post("/events", json=event)
    assert r.status_code == 202, r.text
    await view_when(api.as_("mia"), lead, lambda v: v["events_applied"] == 1)

    forbidden = [
        ("anna", "post", "/events", event),
        ("ben", "post", f"/leads/{lead}/profile", {"facts": {"student": True}}),
        ("mautic", "post", f"/leads/{lead}/accept", {}),
        ("ben", "post", f"/leads/{lead}/accept", {}),
        ("mautic", "post", f"/leads/{lead}/close", {"outcome": "won"}),
        ("anna", "post", f"/leads/{lead}/close", {"outcome": "won"}),
        ("anna", "post", f"/leads/{lead}/reopen", {"reason": "mistake"}),
        ("ben", "get", "/report", None),
        ("anna", "get", "/outbox", None),
        ("ben", "post", "/outbox/ack", {"message_ids": ["x"]}),
    ]
    for who, method, path, body in forbidden:
        client = api.as_(who)
        r = await (client.post(path, json=body) if method == "post" else client.get(path))
        assert r.status_code == 403, (who, path, r.text)
        assert f"role {KEYS[who][0]} may not" in r.json()["detail"]
    # Reads are open to every role.
    for who in KEYS:
        assert (await api.as_(who).get(f"/leads/{lead}")).status_code == 200
        assert (await api.as_(who).get(f"/leads/{lead}/history")).status_code == 200


async def test_unknown_refused_and_closed_leads(api):
    anna, mia, mautic = api.as_("anna"), api.as_("mia"), api.as_("mautic")
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    for r in [await anna.post(f"/leads/{missing}/accept", json={}),
              await anna.get(f"/leads/{missing}"),
              await anna.get(f"/leads/{missing}/history")]:
        assert r.status_code == 404, r.text
        assert missing in r.json()["detail"]

    lead = f"R-{uuid.uuid4().hex[:8]}"
    assert (await mautic.post("/events", json=ev(f"{lead}-1", lead, "website_visit", now()))).status_code == 202
    await view_when(anna, lead, lambda v: v["events_applied"] == 1)
    r = await anna.post(f"/leads/{lead}/accept", json={})
    assert r.status_code == 409
    assert r.json()["detail"] == f"refused: cannot accept lead {lead}: it is iql, not mql"
    r = await mia.post(f"/leads/{lead}/reopen", json={"reason": "mistake"})
    assert r.status_code == 409 and "it is iql" in r.json()["detail"]
    r = await api.as_("ben").post(f"/leads/{lead}/reject", json={"reason": "no_budget"})
    assert r.status_code == 409  # an IQL lead is not sales' to reject
    view = (await anna.get(f"/leads/{lead}")).json()
    assert view["stage"] == "iql" and len(view["history"]) == 1  # refusals changed nothing


async def test_bad_input_is_422_naming_the_field_and_changes_nothing(api):
    mautic, anna = api.as_("mautic"), api.as_("anna")
    lead = f"B-{uuid.uuid4().hex[:8]}"
    good = ev(f"{lead}-1", lead, "website_visit", now() - timedelta(minutes=5))

    async def refused(response, field: str, words: str = "") -> None:
        assert response.status_code == 422, response.text
        body = response.json()
        assert any(field in ".".join(map(str, d["loc"])) for d in body["detail"]), body
        assert words in body["message"], body

    await refused(await mautic.post("/events", json={**good, "type": "telepathy"}), "type",
                  "unknown event type 'telepathy' in scoring model default@1")
    await refused(await mautic.post("/events", json={**good, "score": 100}), "score", "Extra inputs")
    await refused(await mautic.post("/events", json={**good, "occurred_at": "yesterday"}), "occurred_at")
    await refused(await mautic.post("/events", json={**good, "occurred_at": "2026-01-01T10:00:00"}),
                  "occurred_at", "timezone")
    await refused(await mautic.post("/events", json={**good, "occurred_at": iso(now() + timedelta(hours=1))}),
                  "occurred_at", "in the future")
    await refused(await mautic.post("/events", json={**good, "occurred_at": "0001-01-01T00:00:00Z"}),
                  "occurred_at", "before 1970")
    await refused(await mautic.post("/events", json={**good, "lead_id": "anna@example.com"}), "lead_id")
    await refused(await mautic.post("/events", json={**good, "event_id": 7}), "event_id")
    await refused(await mautic.post("/events", json={**good, "attributes": {"x": [1]}}), "attributes.x")
    await refused(await mautic.post("/events", json={**good, "attributes": {"x": "a\x00b"}}), "attributes.x",
                  "control characters")
    nan = (f'{{"event_id": "{lead}-n", "lead_id": "{lead}", "type": "website_visit", '
           f'"occurred_at": "{good["occurred_at"]}", "attributes": {{"ratio": NaN}}}}')
    await refused(await mautic.post("/events", content=nan, headers={"content-type": "application/json"}),
                  "attributes.ratio", "finite")
    await refused(await mautic.post("/events", content=b'{"event_id": ', headers={"content-type": "application/json"}),
                  "body", "JSON decode error")
    await refused(await mautic.post("/events", json=[good]), "body")
    await refused(await mautic.post("/events/batch", json={"events": []}), "events", "at least 1")
    await refused(await mautic.post("/events/batch", json={"events": [good] * (MAX_BATCH + 1)}), "events",
                  f"at most {MAX_BATCH}")
    await refused(await mautic.post("/events/batch", json={"events": [good], "source": "x"}), "source")
    await refused(await mautic.post(f"/leads/{lead}/profile", json={"facts": {}}), "facts")
    await refused(await mautic.post(f"/leads/{lead}/profile", json={"facts": {"Bad Key": 1}}), "facts")
    # Commands never take an actor from the body: the key is the actor.
    await refused(await anna.post(f"/leads/{lead}/accept", json={"by": {"name": "boss", "role": "manager"}}), "by",
                  "Extra inputs")
    await refused(await anna.post(f"/leads/{lead}/reject", json={"reason": "No Budget!"}), "reason")
    await refused(await anna.post(f"/leads/{lead}/accept", json={"note": "x" * 1001}), "note")
    await refused(await anna.post("/leads/not%20an%20id/accept", json={}), "lead_id")
    await refused(await anna.get(f"/leads/{lead}/history", params={"limit": 0}), "limit")
    await refused(await anna.get("/leads", params={"owner": "x' OR '1'='1"}), "owner")
    await refused(await anna.get("/leads", params={"stage": "limbo"}), "stage")

    # A batch keeps its good events and rejects the bad ones, each with its reason.
    r = await mautic.post("/events/batch", json={"events": [
        good,
        {**good, "event_id": f"{lead}-2", "type": "telepathy"},
        {**good, "event_id": f"{lead}-3", "occurred_at": iso(now() + timedelta(days=1))},
        {"event_id": f"{lead}-4"},
        "not an event",
        {**good, "event_id": f"{lead}-5", "type": "email_open"},
    ]})
    assert r.status_code == 202, r.text
    results = r.json()["results"]
    assert [x["outcome"] for x in results] == ["accepted", "rejected", "rejected", "rejected", "rejected", "accepted"]
    assert results[1]["reason"].startswith("events.1.type: unknown event type 'telepathy'")
    assert results[2]["reason"].startswith("events.2.occurred_at:")
    assert "events.3.lead_id: Field required" in results[3]["reason"]
    assert results[4]["reason"].startswith("events.4: Input should be a valid dictionary")
    assert (r.json()["accepted"], r.json()["rejected"]) == (2, 4)

    # Nothing of the refused input reached any lead.
    view = await view_when(mautic, lead, lambda v: v["events_applied"] == 2)
    await asyncio.sleep(0.5)
    view = (await mautic.get(f"/leads/{lead}")).json()
    assert view["events_applied"] == 2 and view["profile"] == {}
    history = (await mautic.get(f"/leads/{lead}/history", params={"limit": 1000})).json()["entries"]
    assert {e["kind"] for e in history} <= {"lead_created", "score_changed", "duplicate_ignored"}
    assert (await anna.get("/leads/anna@example.com")).status_code == 422


async def test_oversize_bodies_are_413(api):
    mautic = api.as_("mautic")
    big = b'{"events": [' + b" " * MAX_BODY_BYTES + b"]}"
    r = await mautic.post("/events/batch", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]

    async def chunks():  # no Content-Length: counted while reading
        yield b'{"events": ['
        for _ in range(40):
            yield b" " * 65536
        yield b"]}"

    r = await mautic.post("/events/batch", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    # The service is fine afterwards.
    assert (await mautic.get("/healthz")).status_code == 200


async def test_every_answer_has_a_request_id_and_every_request_is_logged(api, caplog):
    mautic = api.as_("mautic")
    caplog.set_level(logging.INFO, logger="leadflow.api.access")
    r = await mautic.get("/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    r = await mautic.get("/outbox", headers={"X-Request-Id": "crm-sync-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "crm-sync-42"  # the caller's own, when sane
    r = await mautic.get("/healthz", headers={"X-Request-Id": "no spaces; <no markup> please"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])  # not echoed: a new one
    refused = [await mautic.post("/events/batch", content=b"events=1", headers={"content-type": "text/plain"}),
               await api.as_(None).get("/outbox"), await api.as_("anna").get("/report")]
    assert [r.status_code for r in refused] == [415, 401, 403]
    assert all(r.headers.get("x-request-id") for r in refused)
    logged = [record.getMessage() for record in caplog.records if record.name == "leadflow.api.access"]
    assert any(line.startswith("crm-sync-42 GET /outbox 200 ") and line.endswith("key=mautic") for line in logged)
    assert any(line.startswith(f"{refused[2].headers['x-request-id']} GET /report 403 ") and line.endswith("key=anna")
               for line in logged)


async def test_lists_page_by_cursor(api, store):
    """The outbox pages by an opaque cursor, past any page size; a history's pages say where
    the next begins (a history only grows: an offset is a stable cursor)."""
    tag = uuid.uuid4().hex[:6]
    sent = [Outbound(message_id=f"P{tag}-{i}/handover/1", lead_id=f"P{tag}-{i}", kind=OutboundKind.HANDOVER, at=now(),
                     payload={"n": i}) for i in range(7)]
    for message in sent:
        store.add_outbox(message)
    mia = api.as_("mia")
    seen, cursor, pages = [], None, 0
    while True:
        page = (await mia.get("/outbox", params={"limit": 3, **({"cursor": cursor} if cursor else {})})).json()
        seen += [m["message_id"] for m in page["messages"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    mine = [m for m in seen if m.startswith(f"P{tag}-")]
    assert mine == [m.message_id for m in sent] and len(seen) == len(set(seen)) and pages >= 3
    assert (await mia.get("/outbox", params={"cursor": "bm90LWEtY3Vyc29y"})).status_code == 422

    store.write_audit([AuditEntry(lead_id=f"H{tag}", seq=n, at=now(), kind=AuditKind.SCORE_CHANGED, actor="leadflow",
                                  role="system", detail=f"+{n}") for n in range(1, 6)])
    first = (await mia.get(f"/leads/H{tag}/history", params={"limit": 2})).json()
    assert (first["total"], first["next_offset"]) == (5, 2)
    last = (await mia.get(f"/leads/H{tag}/history", params={"offset": 4, "limit": 2})).json()
    assert [e["seq"] for e in last["entries"]] == [5] and last["next_offset"] is None


async def test_a_body_that_is_not_json_is_415(api):
    mautic = api.as_("mautic")
    body = json.dumps(ev("ct-1", "CT-1", "website_visit", now()))
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        r = await mautic.post("/events", content=body.encode(), headers=headers)
        assert r.status_code == 415, (content_type, r.status_code, r.text)
        assert "Content-Type must be application/json" in r.json()["detail"]
    r = await mautic.post("/events", content=body.encode(), headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 202, r.text
    assert "415" in (await mautic.get("/openapi.json")).json()["paths"]["/events"]["post"]["responses"]


# --------------------------------------------------------------------------- without Temporal, without keys


async def test_temporal_unreachable_is_503(tmp_path, store, settings):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]  # nothing listens here once closed
    cut_off = settings.model_copy(update={"temporal_address": f"127.0.0.1:{dead}"})
    app = create_app(settings=cut_off, keys=KEYRING, store=store)
    async with serving(app) as base_url:
        api = Api(base_url)
        try:
            mautic, anna = api.as_("mautic"), api.as_("anna")
            assert (await mautic.get("/healthz")).json() == {"status": "ok"}
            r = await mautic.get("/readyz")
            assert r.status_code == 503
            assert r.json()["temporal"]["ok"] is False and r.json()["store"]["ok"] is True
            lead = "U-1"
            for response in [
                await mautic.post("/events", json=ev("u-1", lead, "website_visit", now())),
                await mautic.post("/events/batch", json={"events": [ev("u-1", lead, "website_visit", now())]}),
                await mautic.post(f"/leads/{lead}/profile", json={"facts": {"student": True}}),
                await anna.post(f"/leads/{lead}/accept", json={}),
                await anna.get(f"/leads/{lead}"),
                await anna.get("/leads"),
            ]:
                assert response.status_code == 503, response.text
                assert "cannot reach Temporal" in response.json()["detail"]
                assert response.headers["retry-after"] == "5"
            # Reads from the audit store do not need Temporal: the history is the store's
            # alone, and says so.
            assert (await anna.get(f"/leads/{lead}/history")).status_code == 404
            store.write_audit([AuditEntry(lead_id="U-2", seq=1, at=now(), kind=AuditKind.LEAD_CREATED,
                                          actor="leadflow", role="system", detail="lead created as iql")])
            page = (await anna.get("/leads/U-2/history")).json()
            assert page["total"] == 1 and page["complete"] is False
            assert (await api.as_("mia").get("/report")).status_code == 200
        finally:
            await api.close()


def _env_without_keys() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_API_")}


async def test_the_docs_work_offline(api):
    """/docs loads Swagger UI from the API itself, never from a CDN, and every file it names
    is there; /redoc (which would need a CDN) is not offered."""
    import re

    nobody = api.as_(None)
    page = await nobody.get("/docs")
    assert page.status_code == 200 and "Leadflow API" in page.text
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page.text), page.text
    assets = re.findall(r"(?:src|href)=[\"']([^\"']+)", page.text) + re.findall(r"url: ?'([^']+)'", page.text)
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css", "/openapi.json"} <= set(assets)
    for asset in assets:
        assert (await nobody.get(asset)).status_code == 200, asset
    assert (await nobody.get("/redoc")).status_code == 404


def test_refuses_to_start_without_keys(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**_env_without_keys(), "LEADFLOW_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}",
           "TEMPORAL_ADDRESS": "127.0.0.1:1"}
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "api:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode != 0
    assert "leadflow api cannot start: no API keys configured: set LEADFLOW_API_KEYS=name:role:key" in done.stderr
    assert "Traceback" not in done.stderr


def test_api_keys_configuration(tmp_path):
    ring = KeyRing.from_env({"LEADFLOW_API_KEYS": "mautic:marketing:0123456789abcdef:x, ben:sales:fedcba9876543210"})
    assert len(ring) == 2
    assert ring.lookup("0123456789abcdef:x").name == "mautic"
    assert ring.lookup("fedcba9876543210").role.value == "sales"
    assert ring.lookup("0123456789abcdef") is None and ring.lookup("") is None
    assert "0123456789abcdef" not in repr([vars(k) for k in ring._keys])  # only digests are kept

    keys = tmp_path / "keys.toml"
    keys.write_text(
        '[[keys]]\nname = "hubspot"\nrole = "marketing"\n'
        f'sha256 = "{hashlib.sha256(b"a-long-enough-secret").hexdigest()}"\n'
        '[[keys]]\nname = "mia"\nrole = "manager"\nkey = "another-long-secret"\n'
    )
    ring = KeyRing.from_env({"LEADFLOW_API_KEYS_FILE": str(keys)})
    assert ring.lookup("a-long-enough-secret").name == "hubspot"
    assert ring.lookup("another-long-secret").role.value == "manager"

    dev = KeyRing.from_env({"LEADFLOW_API_DEV_KEYS": "1"})
    assert {dev.lookup(f"dev-{r}").role.value for r in ("marketing", "presales", "sales", "manager")} == {
        "marketing", "presales", "sales", "manager"}
    for env, words in [
        ({}, "no API keys configured"),
        ({"LEADFLOW_API_DEV_KEYS": "0"}, "no API keys configured"),
        ({"LEADFLOW_API_KEYS": "x:boss:0123456789abcdef"}, "unknown role 'boss'"),
        ({"LEADFLOW_API_KEYS": "x:system:0123456789abcdef"}, "unknown role 'system'"),
        ({"LEADFLOW_API_KEYS": "x:sales:short"}, "at least 16 characters"),
        ({"LEADFLOW_API_KEYS": "x:sales"}, "expected name:role:key"),
        ({"LEADFLOW_API_KEYS": "a:sales:0123456789abcdef,b:manager:0123456789abcdef"}, "are the same key"),
        ({"LEADFLOW_API_KEYS_FILE": str(tmp_path / "none.toml")}, "cannot read it"),
    ]:
        with pytest.raises(ConfigError, match=words):
            KeyRing.from_env(env)
    keys.write_text('[[keys]]\nname = "x"\nrole = "sales"\n')
    with pytest.raises(ConfigError, match="exactly one of key or sha256"):
        KeyRing.from_env({"LEADFLOW_API_KEYS_FILE": str(keys)})


# --------------------------------------------------------------------------- a burst


async def _history_event_kinds(client, lead: str) -> dict[str, int]:
    """How many events of each type the lead's workflow history has, over all its runs
    (for the failure message: task timeouts and failures explain a divergent store)."""
    kinds: Counter = Counter()
    run_id = None
    while True:
        handle = client.get_workflow_handle(f"lead-{lead}", run_id=run_id)
        history = await handle.fetch_history()
        for e in history.events:
            kind = EventType.Name(e.event_type).removeprefix("EVENT_TYPE_").lower()
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                kind += f" ({WorkflowTaskFailedCause.Name(e.workflow_task_failed_event_attributes.cause)})"
            kinds[kind] += 1
        started = history.events[0].workflow_execution_started_event_attributes
        if not started.continued_execution_run_id:
            return dict(kinds)
        run_id = started.continued_execution_run_id


async def test_a_batch_for_new_leads_starts_them_side_by_side(api, store, settings, monkeypatch):
    """A batch for many new leads is sent to Temporal concurrently, at most
    api.limits.SEND_CONCURRENCY leads at a time (sent one after another, 500 new leads took
    3.4x as long to answer: bench/batch.py), and every lead starts, on the active model the
    API passes it. Later sends to these leads do not carry the model again."""
    import api as api_module

    n_leads = 3 * api_module.limits.SEND_CONCURRENCY
    in_flight, most = 0, 0
    real_send = api_module.leads.send_events
    models = []  # what each send passed for its lead to start on

    async def watched(client, settings, events, model=None):  # the real send, counted
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        models.append(model)
        try:
            return await real_send(client, settings, events, model)
        finally:
            in_flight -= 1

    monkeypatch.setattr(api_module.leads, "send_events", watched)
    active = LeadActivities(settings, store).sync_model_file()  # as a worker does at its start
    run = uuid.uuid4().hex[:6]
    at = now() - timedelta(minutes=5)
    events = [ev(f"{run}-{i}", f"new-{run}-{i:03d}", "website_visit", at) for i in range(n_leads)]
    r = await api.as_("mautic").post("/events/batch", json={"events": events})
    assert r.status_code == 202, r.text
    assert (r.json()["accepted"], r.json()["rejected"]) == (n_leads, 0)
    assert 1 < most <= api_module.limits.SEND_CONCURRENCY, f"{most} leads were sent at the same time"
    anna = api.as_("anna")
    for event in events:
        view = await view_when(anna, event["lead_id"], lambda v: v["events_applied"] == 1)
        assert view["score"]["breakdown"] == {"website_visit": 1}
    assert [m.ref if m else None for m in models] == [active.ref] * n_leads
    again = [ev(f"{run}-again-{i}", f"new-{run}-{i:03d}", "website_visit", at) for i in range(n_leads)]
    r = await api.as_("mautic").post("/events/batch", json={"events": again})
    assert r.status_code == 202, r.text
    assert models[n_leads:] == [None] * n_leads


async def test_burst_of_2000_events_from_16_clients_loses_nothing(api, store, dev_env):
    """16 clients post 2000 events for 100 leads (singles and batches, shuffled across
    leads and in time), with 40 invalid events and ~100 redeliveries mixed in. Every
    event must be either scored exactly once or rejected with a reason: each lead's
    events_applied and the audit store's score entries both match what was accepted.

    A failure naming events "never scored" and "scored more than once" next to a
    `workflow_task_failed (..._UNHANDLED_COMMAND)` in the lead's history is the audit
    store diverging from the lead: a workflow task that wrote audit rows (local
    activity) and then tried to continue-as-new was failed because signals arrived,
    and its retry, with those signals, wrote other entries under the same seqs,
    which the store's ON CONFLICT DO NOTHING dropped."""
    rng = random.Random(7)
    run = uuid.uuid4().hex[:6]
    n_leads, per_lead, n_clients = 100, 20, 16
    base = now() - timedelta(hours=2)
    kinds = ["website_visit", "email_open", "email_click", "pricing_page_visit", "content_download",
             "social_interaction", "video_view"]
    valid = [ev(f"{run}-{i}-{j}", f"burst-{run}-{i}", rng.choice(kinds), base + timedelta(minutes=j, seconds=i))
             for i in range(n_leads) for j in range(per_lead)]
    invalid = [ev(f"{run}-bad-{k}", f"burst-{run}-{k}" if k < 20 else f"burst-{run}-x{k - 20}", "not_in_the_model",
                  base) for k in range(40)]
    events = valid + invalid
    rng.shuffle(events)
    shares = [events[c::n_clients] for c in range(n_clients)]

    outcomes: dict[str, Counter] = defaultdict(Counter)
    reasons: dict[str, str] = {}
    posted = 0

    async def sender(share: list[dict]) -> None:
        nonlocal posted
        client = api.as_("mautic")
        sent: list[dict] = []
        i = 0
        while i < len(share):
            size = 1 if rng.random() < 0.5 else rng.randint(2, 30)
            chunk = share[i : i + size]
            i += size
            if rng.random() < 0.1 and sent:  # a webhook redelivered
                chunk = chunk + rng.sample(sent, min(len(sent), 5))
            if len(chunk) == 1:
                r = await client.post("/events", json=chunk[0])
                if r.status_code == 422:
                    results = [{"event_id": chunk[0]["event_id"], "outcome": "rejected", "reason": r.json()["message"]}]
                else:
                    assert r.status_code == 202, r.text
                    results = [r.json()]
            else:
                r = await client.post("/events/batch", json={"events": chunk})
                assert r.status_code == 202, r.text
                results = r.json()["results"]
            posted += len(chunk)
            for result in results:
                outcomes[result["event_id"]][result["outcome"]] += 1
                if result["outcome"] == "rejected":
                    reasons[result["event_id"]] = result["reason"]
            sent += chunk

    started = time.monotonic()
    await asyncio.gather(*(sender(share) for share in shares))
    post_seconds = time.monotonic() - started

    # Every valid event was taken (never rejected); every invalid one rejected with its reason.
    for event in valid:
        assert outcomes[event["event_id"]]["accepted"] >= 1, (event, outcomes[event["event_id"]])
        assert outcomes[event["event_id"]]["rejected"] == 0
    for event in invalid:
        assert set(outcomes[event["event_id"]]) == {"rejected"}
        assert "unknown event type 'not_in_the_model'" in reasons[event["event_id"]]

    # Every lead applied each of its events exactly once: the lead's count and the store agree.
    mia = api.as_("mia")
    expected = Counter(e["lead_id"] for e in valid)

    async def applied(lead: str) -> int:
        return (await view_when(mia, lead, lambda v: v["events_applied"] == expected[lead], timeout=240))[
            "events_applied"]

    gate = asyncio.Semaphore(16)

    async def check(lead: str) -> int:
        async with gate:
            return await applied(lead)

    counts = await asyncio.gather(*(check(lead) for lead in expected))
    applied_seconds = time.monotonic() - started
    assert sum(counts) == len(valid)

    def score_entries() -> list[tuple[str, str]]:
        with Session(store.engine) as session:
            return list(session.exec(
                select(AuditRow.lead_id, AuditRow.event_id).where(
                    AuditRow.kind == AuditKind.SCORE_CHANGED.value, AuditRow.event_id.is_not(None),
                    AuditRow.lead_id.in_(list(expected)))
            ).all())

    # A lead's state moves on before its audit batch is written (a local activity): wait for the store.
    async def stored() -> list[tuple[str, str]]:
        return await asyncio.to_thread(score_entries)

    rows = await until(stored, lambda rows: len(rows) >= len(valid))
    scored = Counter(event_id for _, event_id in rows)
    missing = {e["event_id"] for e in valid} - set(scored)
    twice = sorted(event_id for event_id, n in scored.items() if n > 1)
    if missing or twice:
        affected = sorted({event_id.rsplit("-", 1)[0] for event_id in [*missing, *twice]})
        kinds = {lead: await _history_event_kinds(dev_env.client, f"burst-{lead}") for lead in affected}
        raise AssertionError(f"never scored: {sorted(missing)}; scored more than once: {twice}; "
                             f"workflow history of the leads: {kinds}")
    assert Counter(lead for lead, _ in rows) == expected
    # Invalid events never reached a lead: those for new leads created none.
    assert (await mia.get(f"/leads/burst-{run}-x0")).status_code == 404

    print(
        f"\nburst: {posted} events ({len(valid)} valid, {len(invalid)} invalid, "
        f"{posted - len(events)} redelivered) over HTTP from {n_clients} clients in {post_seconds:.1f} s "
        f"= {posted / post_seconds:.0f} events/s taken; all {len(valid)} applied after {applied_seconds:.1f} s "
        f"= {len(valid) / applied_seconds:.0f} events/s end to end"
    )


async def test_a_manager_applies_a_model_version_over_http(api, store, dev_env):
    """POST /models: only managers; invalid is 422 naming the line, a dry run changes nothing,
    applying records the key's owner and starts the rollout, a reused version is 409. The
    edge knows the applied version at once, and a new lead starts on it without reading it."""
    v2 = (ROOT / "scoring_models" / "default.toml").read_text().replace('version = "1"', 'version = "2"', 1)
    v2 = v2.replace("[events.live_chat]\npoints = 15", "[events.live_chat]\npoints = 30", 1)
    mia, anna = api.as_("mia"), api.as_("anna")
    assert (await anna.post("/models", json={"toml": v2})).status_code == 403
    bad = await mia.post("/models", json={"toml": v2.replace("points = 30", 'points = "lots"')})
    assert bad.status_code == 422 and "events.live_chat.points (line" in bad.json()["message"]

    lead = f"M-{uuid.uuid4().hex[:6]}"
    mautic = api.as_("mautic")
    r = await mautic.post("/events", json=ev(f"{lead}-1", lead, "live_chat", now()))
    assert r.status_code == 202
    await view_when(mia, lead, lambda v: v["events_applied"] == 1)
    dry = await mia.post("/models", json={"toml": v2, "dry_run": True})
    assert dry.status_code == 200, dry.text
    assert dry.json()["model"] == "default@2" and dry.json()["score_changes"] >= 1
    assert store.active_model() is None  # nothing recorded

    applied = await mia.post("/models", json={"toml": v2, "rate_per_second": 100})
    assert applied.status_code == 202, applied.text
    body = applied.json()
    assert (body["ref"], body["applied_by"], body["active"]) == ("default@2", "mia", True)
    view = await view_when(mia, lead, lambda v: v["model_ref"] == "default@2")
    assert view["score"]["total"] == 30
    detail = await mia.get("/models/default@2")
    assert detail.status_code == 200 and detail.json()["text"] == v2
    assert [m["ref"] for m in (await mia.get("/models")).json()] == ["default@2"]
    assert (await mia.get("/models/default@9")).status_code == 404
    conflict = await mia.post("/models", json={"toml": v2 + "\n# edited\n"})
    assert conflict.status_code == 409 and "new version" in conflict.json()["detail"]
    # events of a type only the new version knows are taken at the edge now
    v3 = v2.replace('version = "2"', 'version = "3"', 1) + "\n[events.podcast_listen]\npoints = 3\n"
    assert (await mia.post("/models", json={"toml": v3, "rate_per_second": 100})).status_code == 202
    r = await mautic.post("/events", json=ev(f"{lead}-2", lead, "podcast_listen", now()))
    assert r.status_code == 202, r.text
    newcomer = f"{lead}-new"
    r = await mautic.post("/events", json=ev(f"{newcomer}-1", newcomer, "podcast_listen", now()))
    assert r.status_code == 202, r.text
    view = await view_when(mia, newcomer, lambda v: v["events_applied"] == 1)
    assert view["model_ref"] == "default@3" and view["score"]["engagement"] == 3
    history = await dev_env.client.get_workflow_handle(workflow_id(newcomer)).fetch_history()
    assert "load_scoring_model" not in scheduled_activities(history)


async def test_contract_breaks_are_clear_refusals_not_500s(api, store):
    """Timestamps that overflow in UTC, alone, in a batch and in `since`; a body that claims
    its own source. Each bad item is refused on its own; the good ones are taken."""
    mautic, mia = api.as_("mautic"), api.as_("mia")
    lead = f"C-{uuid.uuid4().hex[:6]}"
    for n, stamp in enumerate(("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00")):
        bad = {"event_id": f"{lead}-bad", "lead_id": lead, "type": "website_visit", "occurred_at": stamp}
        r = await mautic.post("/events", json=bad)
        assert r.status_code == 422 and "out of range" in r.json()["message"], r.text
        r = await mautic.post("/events/batch", json={"events": [bad, ev(f"{lead}-ok{n}", lead, "website_visit", now())]})
        assert r.status_code == 202, r.text
        assert [x["outcome"] for x in r.json()["results"]] == ["rejected", "accepted"]
        assert "out of range" in r.json()["results"][0]["reason"]
        r = await mia.get("/report", params={"since": stamp})
        assert r.status_code == 422 and "out of range" in r.json()["message"], r.text
    # the first and last instants UTC can say are valid creation-time bounds (the list asks
    # visibility a little wider than them), not an overflow
    r = await mia.get("/leads", params={"created_from": "0001-01-01T00:00:00Z", "created_to": "9999-12-31T23:59:59Z"})
    assert r.status_code == 200, r.text
    claimed = ev(f"{lead}-2", lead, "email_open", now(), source="someone-else")
    assert (await mautic.post("/events", json=claimed)).status_code == 422
    await view_when(mia, lead, lambda v: v["events_applied"] == 2)
    history = (await mia.get(f"/leads/{lead}/history")).json()["entries"]
    [scored] = [e for e in history if e["kind"] == "score_changed" and e["event_id"] == f"{lead}-ok0"]
    assert scored["source"] == "mautic"  # the key's owner, whatever a body says


async def test_an_event_id_is_taken_once_and_the_answer_tells_the_truth(api, store):
    """A redelivery is `duplicate` at once (not only after the audit lag) and is not sent to
    the lead again; the same id with other content is a conflict (409), never a silent duplicate."""
    mautic, mia = api.as_("mautic"), api.as_("mia")
    lead = f"D-{uuid.uuid4().hex[:6]}"
    first = ev(f"{lead}-1", lead, "webinar_attended", now())
    assert (await mautic.post("/events", json=first)).json()["outcome"] == "accepted"
    again = await mautic.post("/events", json=first)
    assert again.status_code == 202 and again.json()["outcome"] == "duplicate"
    other = dict(first, type="demo_request")
    conflict = await mautic.post("/events", json=other)
    assert conflict.status_code == 409 and "other content" in conflict.json()["detail"]
    batch = await mautic.post("/events/batch", json={"events": [first, other, ev(f"{lead}-2", lead, "email_open", now())]})
    assert [r["outcome"] for r in batch.json()["results"]] == ["duplicate", "conflict", "accepted"]
    assert batch.json()["conflicts"] == 1
    view = await view_when(mia, lead, lambda v: v["events_applied"] == 2)
    assert view["duplicates_ignored"] == 0  # the redeliveries never reached the lead
    assert [row.event_id for row in store.event_log(lead)] == [f"{lead}-1", f"{lead}-2"]
