"""Webhook subscriptions: fan-out in the store's own transactions, the dispatcher's signed
posts, retries, dead letters and replays, and a subscriber closing the loop from a real lead.

Receivers verify every delivery with the Standard Webhooks reference library
(`standardwebhooks.Webhook.verify`), not with Leadflow's code.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from standardwebhooks import Webhook

from activities import webhook_store
from activities.webhook_dispatcher import WebhookDispatcher
from activities.webhook_store import SubscriptionKind
from funnel.models import AuditEntry, AuditKind, Outbound, OutboundKind, Role, Stage
from funnel.personal_data import ERASED, ErasureReport
from tests.conftest import Receiver, until
from tests.test_api import api_over_worker, ev, view_when

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)


def stage_entry(lead: str, seq: int, to: Stage, frm: Stage | None = None) -> AuditEntry:
    kind = AuditKind.STAGE_CHANGED if frm else AuditKind.LEAD_CREATED
    return AuditEntry(lead_id=lead, seq=seq, at=T0 + timedelta(minutes=seq), kind=kind,
                      actor="leadflow", role=Role.SYSTEM, detail=f"{frm} -> {to} (note: call Erika at 0171…)",
                      from_stage=frm, to_stage=to, reason=None)


def verified(receiver: Receiver, secret: str) -> list[dict]:
    """Every body the receiver took, each checked by the reference verifier (raises if not)."""
    with receiver.lock:
        raw = list(receiver.raw)
    return [Webhook(secret).verify(body, headers) for headers, body in raw]


async def settle(dispatcher: WebhookDispatcher, rounds: int = 1) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        for _ in range(rounds):
            await dispatcher.dispatch(http)


# --------------------------------------------------------------------------- fan-out in the store

def test_stage_changes_and_messages_fan_out_to_the_subscriptions_that_want_them(store):
    stages = webhook_store.add_subscription(store, "http://127.0.0.1:9/a", [SubscriptionKind.STAGE_CHANGE], "mia")
    handovers = webhook_store.add_subscription(store, "http://127.0.0.1:9/b", [SubscriptionKind.HANDOVER,
                                                                                 SubscriptionKind.MODEL_CHANGE], "mia")
    entries = [stage_entry("L1", 1, Stage.IQL), stage_entry("L1", 2, Stage.MQL, Stage.IQL),
               AuditEntry(lead_id="L1", seq=3, at=T0, kind=AuditKind.SCORE_CHANGED, actor="x", role=Role.SYSTEM,
                          detail="+5")]
    assert store.write_audit(entries) == 3
    assert store.write_audit(entries) == 0  # a retried write announces nothing twice
    store.add_outbox(Outbound(message_id="L1/handover/1", lead_id="L1", kind=OutboundKind.HANDOVER, at=T0,
                              payload={"profile": {"email": "erika@example.de"}}))
    store.add_outbox(Outbound(message_id="L1/nurture_step/1", lead_id="L1", kind=OutboundKind.NURTURE_STEP, at=T0,
                              payload={}))
    store.record_model("default@9", "text", "mia")
    mine = webhook_store.deliveries(store, stages.subscription_id)
    assert [(d.kind, d.body["data"]["to_stage"]) for d in mine] == [("stage_change", "iql"), ("stage_change", "mql")]
    assert all("Erika" not in json.dumps(d.body) for d in mine)  # the free-text detail stays in the audit
    assert mine[1].body["type"] == "leadflow.stage_change" and mine[1].body["data"]["from_stage"] == "iql"
    theirs = webhook_store.deliveries(store, handovers.subscription_id)
    assert sorted(d.kind for d in theirs) == ["handover", "model_change"]
    # A subscription made later gets what is recorded from then on, not the past.
    late = webhook_store.add_subscription(store, "http://127.0.0.1:9/c", [SubscriptionKind.STAGE_CHANGE], "mia")
    assert webhook_store.deliveries(store, late.subscription_id) == []
    # Erasure scrubs the person's data from deliveries not yet made.
    store.erase_personal_data(ErasureReport(erasure_id="er-1", lead_id="L1", erased_by="mia", erased_at=T0))
    (handover,) = [d for d in webhook_store.deliveries(store, handovers.subscription_id) if d.kind == "handover"]
    assert handover.body["data"]["payload"]["profile"] == {"email": ERASED}


# --------------------------------------------------------------------------- the dispatcher

async def test_deliveries_are_signed_retried_dead_lettered_and_replayed(store):
    receiver = Receiver(mode="down")
    try:
        sub = webhook_store.add_subscription(store, receiver.url, [SubscriptionKind.STAGE_CHANGE], "mia")
        store.write_audit([stage_entry("L2", 1, Stage.IQL), stage_entry("L2", 2, Stage.MQL, Stage.IQL)])
        dispatcher = WebhookDispatcher(store, schedule=[0.0, 0.0])  # three attempts, then the dead letter
        for _ in range(3):
            await settle(dispatcher)
        log = webhook_store.deliveries(store, sub.subscription_id)
        # The stage change to MQL waits behind the lead's earlier one until that is dead ...
        assert [(d.status, d.attempts) for d in log] == [("dead", 3), ("pending", 0)]
        for _ in range(3):  # ... and then has attempts of its own
            await settle(dispatcher)
        log = webhook_store.deliveries(store, sub.subscription_id)
        assert [(d.status, d.attempts, d.last_status_code) for d in log] == [("dead", 3, 503)] * 2
        assert "answered 503" in log[0].last_error
        await settle(dispatcher)
        assert dispatcher.attempts == 6  # the dead letter waits
        receiver.mode = "up"
        assert webhook_store.replay(store, sub.subscription_id, [log[0].delivery_id]) == 1
        await settle(dispatcher)
        assert webhook_store.replay(store, sub.subscription_id) == 1  # the rest of the dead letter
        await settle(dispatcher)
        log = webhook_store.deliveries(store, sub.subscription_id)
        assert [(d.status, d.replays) for d in log] == [("delivered", 1), ("delivered", 1)]
        bodies = verified(receiver, sub.secret)
        assert [b["data"]["to_stage"] for b in bodies] == ["iql", "mql"]
        # The webhook-id is the delivery id: the same on every attempt.
        assert [h["webhook-id"] for h, _ in receiver.raw] == [d.delivery_id for d in log]
        with pytest.raises(Exception):
            Webhook(webhook_store.add_subscription(store, "http://x", ["handover"], "m").secret).verify(
                receiver.raw[0][1], receiver.raw[0][0])
    finally:
        receiver.close()


async def test_a_leads_deliveries_arrive_in_the_order_recorded_and_other_leads_go_on(store):
    receiver = Receiver()
    try:
        sub = webhook_store.add_subscription(store, receiver.url, [SubscriptionKind.STAGE_CHANGE], "mia")
        store.write_audit([stage_entry("L4", 1, Stage.IQL), stage_entry("L4", 2, Stage.MQL, Stage.IQL),
                           stage_entry("L5", 1, Stage.IQL)])
        store.write_audit([stage_entry("L4", 3, Stage.SAL, Stage.MQL)])
        dispatcher = WebhookDispatcher(store, schedule=[0.0])
        receiver.refused_leads = {"L4"}  # L4's receiver-side record is briefly unavailable
        await settle(dispatcher)
        assert dispatcher.attempts == 2  # L4's first failed, its later ones waited; L5 went on
        assert [(b["data"]["lead_id"], b["data"]["to_stage"]) for b in verified(receiver, sub.secret)] == [
            ("L5", "iql")]
        receiver.refused_leads = set()
        await settle(dispatcher)
        assert [(b["data"]["lead_id"], b["data"]["to_stage"]) for b in verified(receiver, sub.secret)] == [
            ("L5", "iql"), ("L4", "iql"), ("L4", "mql"), ("L4", "sal")]
        assert {d.status for d in webhook_store.deliveries(store, sub.subscription_id)} == {"delivered"}
    finally:
        receiver.close()


async def test_a_removed_subscription_gets_nothing_more(store):
    receiver = Receiver()
    try:
        sub = webhook_store.add_subscription(store, receiver.url, [SubscriptionKind.STAGE_CHANGE], "mia")
        store.write_audit([stage_entry("L3", 1, Stage.IQL)])
        assert webhook_store.remove_subscription(store, sub.subscription_id)
        store.write_audit([stage_entry("L3", 2, Stage.MQL, Stage.IQL)])
        await settle(WebhookDispatcher(store, schedule=[0.0]))
        assert receiver.raw == []  # pending ones of a removed subscription are not attempted either
        assert len(webhook_store.deliveries(store, sub.subscription_id)) == 1
    finally:
        receiver.close()


# --------------------------------------------------------------------------- from a real lead, through the API

async def test_a_subscriber_receives_signed_stage_changes_of_a_real_lead(dev_env, settings, store):
    receiver = Receiver()
    settings = settings.model_copy(update={"webhook_retry_seconds": [0.2, 0.2]})
    try:
        async with api_over_worker(dev_env, settings, store) as api:
            mia, anna, mautic = api.as_("mia"), api.as_("anna"), api.as_("mautic")
            r = await mia.post("/subscriptions", json={"url": receiver.url, "kinds": ["stage_change",
                                                                                     "handover"]})
            assert r.status_code == 201, r.text
            sub = r.json()
            assert sub["secret"].startswith("whsec_")
            listed = (await mia.get("/subscriptions")).json()
            assert [s["subscription_id"] for s in listed] == [sub["subscription_id"]]
            assert listed[0]["secret"] != sub["secret"]  # shown once
            assert (await anna.get("/subscriptions")).status_code == 403
            lead = f"L-{uuid.uuid4().hex[:8]}"
            t = datetime.now(timezone.utc) - timedelta(minutes=5)
            r = await mautic.post("/events", json=ev(f"{lead}-1", lead, "demo_request", t))
            assert r.status_code == 202, r.text
            await view_when(anna, lead, lambda v: v["owner"] is not None)
            assert (await anna.post(f"/leads/{lead}/accept", json={})).json()["stage"] == "sal"

            def stage_bodies():
                return [b for b in verified(receiver, sub["secret"]) if b["type"] == "leadflow.stage_change"]

            await until(lambda: asyncio.sleep(0, stage_bodies()), lambda bodies: len(bodies) >= 3)
            assert [(b["data"]["from_stage"], b["data"]["to_stage"]) for b in stage_bodies()] == [
                (None, "iql"), ("iql", "mql"), ("mql", "sal")]
            assert stage_bodies()[2]["data"]["actor"] == "anna"
            assert any(b["type"] == "leadflow.handover" for b in verified(receiver, sub["secret"]))
            page = (await mia.get(f"/subscriptions/{sub['subscription_id']}/deliveries",
                                  params={"limit": 2})).json()
            assert len(page["deliveries"]) == 2 and page["next_cursor"]
            rest = (await mia.get(f"/subscriptions/{sub['subscription_id']}/deliveries",
                                  params={"cursor": page["next_cursor"]})).json()
            assert {d["status"] for d in page["deliveries"] + rest["deliveries"]} == {"delivered"}
            # The receiver goes down: the lead goes on, deliveries retry and die, a replay delivers.
            receiver.mode = "down"
            r = await anna.post(f"/leads/{lead}/qualify", json={"bant": {"budget": True, "need": True,
                                                                         "authority": True}})
            assert r.status_code == 200 and r.json()["stage"] == "sql"
            dead = await until(lambda: mia.get(f"/subscriptions/{sub['subscription_id']}/deliveries",
                                               params={"status": "dead"}),
                               lambda r: len(r.json()["deliveries"]) >= 1)
            (letter,) = [d for d in dead.json()["deliveries"] if d["kind"] == "stage_change"]
            assert letter["attempts"] == 3 and "503" in letter["last_error"]
            receiver.mode = "up"
            r = await mia.post(f"/subscriptions/{sub['subscription_id']}/replay", json={})
            assert r.json()["replayed"] >= 1
            await until(lambda: asyncio.sleep(0, stage_bodies()), lambda bodies: len(bodies) >= 4)
            assert stage_bodies()[3]["data"]["to_stage"] == "sql"
            assert (await mia.delete(f"/subscriptions/{sub['subscription_id']}")).status_code == 204
            assert (await mia.get(f"/subscriptions/{sub['subscription_id']}")).json()["active"] is False
            assert (await mia.get("/subscriptions/sub_0000000000000000")).status_code == 404
    finally:
        receiver.close()


# --------------------------------------------------------------------------- the CLI

def test_the_cli_manages_subscriptions_and_their_dead_letter(tmp_path, monkeypatch, capsys):
    import starter
    from activities.store import AuditStore

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    store = AuditStore(url)
    monkeypatch.setenv("LEADFLOW_DATABASE_URL", url)

    def run(*argv: str) -> tuple[int, str, str]:
        code = starter.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run("subscriptions", "add", "http://127.0.0.1:9/hook", "--kinds", "stage_change,sla_breach",
                         "--by", "mia")
    assert code == 0, err
    sub_id = out.split(":")[0]
    assert "secret (shown once" in out and "whsec_" in out
    assert run("subscriptions", "add", "http://x", "--kinds", "stage_changes", "--by", "mia")[0] == 2
    assert run("subscriptions", "add", "ftp://x", "--kinds", "handover", "--by", "mia")[0] == 2
    code, out, _ = run("subscriptions", "list")
    assert sub_id in out and "sla_breach,stage_change" in out
    store.write_audit([stage_entry("L9", 1, Stage.IQL)])
    asyncio.run(settle(WebhookDispatcher(store, schedule=[])))  # one attempt, refused: the dead letter
    code, out, _ = run("subscriptions", "deliveries", sub_id, "--status", "dead")
    assert f"{sub_id}.L9.1  stage_change  dead  attempts 1  unreachable" in out
    code, out, _ = run("subscriptions", "replay", sub_id)
    assert out.strip() == f"1 dead letter(s) of {sub_id} go out again"
    assert run("subscriptions", "remove", sub_id)[0] == 0
    assert run("subscriptions", "remove", "sub_0000000000000000")[0] == 2
    code, out, _ = run("subscriptions", "list", "--all")
    assert "(removed)" in out


def test_a_store_made_before_ordered_deliveries_gets_the_order_column(tmp_path):
    from activities.store import AuditStore

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = AuditStore(url)
    sub = webhook_store.add_subscription(old, "http://127.0.0.1:9/a", [SubscriptionKind.STAGE_CHANGE], "mia")
    old.write_audit([stage_entry("L6", 1, Stage.IQL)])
    with old.engine.begin() as conn:  # as older code left it
        conn.exec_driver_sql("ALTER TABLE webhook_delivery DROP COLUMN ordinal")
    old.dispose()
    store = AuditStore(url)
    store.write_audit([stage_entry("L6", 2, Stage.MQL, Stage.IQL)])
    claimed = webhook_store.claim_due(store, datetime.now(timezone.utc), timedelta(seconds=60))
    assert [(d.body["data"]["to_stage"], d.ordinal) for d, _ in claimed] == [("iql", 0), ("mql", 0)]
    assert {s.subscription_id for _, s in claimed} == {sub.subscription_id}
    store.dispose()
