"""Personal data through the real thing (dev server, worker, store): what Temporal keeps is
unreadable without the keys, old keys keep old histories readable after a rotation, an
erasure leaves nothing of the person anywhere (state, store, outbox, Temporal history)
while the lead and the funnel's numbers go on, and an export gives everything there is.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from datetime import timedelta

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.worker import Replayer

import client as leads
from activities.store import AuditStore
from config import Settings, data_converter
from funnel.personal_data import ERASED
from funnel.models import Accept, ActivityEvent, AuditEntry, AuditKind, Close, LogContact, ProfileUpdate, Qualify, Bant, Stage
from funnel.report import funnel_report
from payload_codec import ENCODING, KeyUnavailable, PayloadKeyring, key_ids_in, new_key
from tests.conftest import ANNA, BEN, MIA, running_worker, settle
from workflows.lead import LeadWorkflow, workflow_id

EMAIL, PHONE, NAME = "ann.example@mail.test", "+49 170 5550123", "Ann Beispielfrau"
FORM = "Whitepaper form filled by Ann Beispielfrau"
NOTE = "called Ann on her private mobile +49 170 5550123"
PII = [EMAIL, PHONE, NAME, FORM, NOTE]


def b64_variants(text: str) -> list[str]:
    """Substrings every base64 encoding of a byte string containing `text` contains, whatever
    its alignment: a JSON history shows payload data in base64."""
    raw = text.encode()
    variants = []
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw).decode()
        variants.append(encoded[4 if shift else 0: -4])
    return variants


def leaks(history, texts=PII) -> list[str]:
    """Which of `texts` appear in a raw history: in its protobuf bytes, its JSON or as base64."""
    raw = b"".join(event.SerializeToString() for event in history.events)
    as_json = history.to_json()
    found = []
    for text in texts:
        if text.encode() in raw or text in as_json or any(v in as_json for v in b64_variants(text)):
            found.append(text)
    return found


def payloads_of(history) -> list[Payload]:
    found: list[Payload] = []

    def walk(message):
        if isinstance(message, Payload):
            found.append(message)
            return
        for field, value in message.ListFields():
            if field.type != field.TYPE_MESSAGE:
                continue
            if field.message_type.GetOptions().map_entry:
                items = [v for v in value.values() if hasattr(v, "ListFields")]
            elif field.is_repeated:
                items = list(value)
            else:
                items = [value]
            for item in items:
                walk(item)

    for event in history.events:
        walk(event)
    return found


async def decoded_text(client: Client, history) -> str:
    """Every payload of the history decoded with the client's codec, as one text."""
    payloads = [p for p in payloads_of(history) if p.metadata.get("encoding") == ENCODING]
    decoded = await client.data_converter.payload_codec.decode(payloads)
    return "\n".join(p.data.decode("utf-8", "replace") for p in decoded)


class Histories:
    """Every run of a lead (it continues-as-new) as one history-like object, oldest first."""

    def __init__(self, runs):
        self.runs = runs
        self.events = [event for run in runs for event in run.events]

    def to_json(self) -> str:
        return "\n".join(run.to_json() for run in self.runs)


async def lead_history(client: Client, lead: str, run_id: str | None = None) -> Histories:
    """The lead's runs from the first up to `run_id` (default: the latest), via each run's
    `continued_execution_run_id`."""
    runs = []
    while True:
        run = await client.get_workflow_handle(workflow_id(lead), run_id=run_id).fetch_history()
        runs.insert(0, run)
        previous = run.events[0].workflow_execution_started_event_attributes.continued_execution_run_id
        if not previous:
            return Histories(runs)
        run_id = previous


async def plain_client(env) -> Client:
    """A client of the same server without the codec (an operator without the keys)."""
    return await Client.connect(env.client.service_client.config.target_host, namespace=env.client.namespace)


async def a_lead_with_personal_data(env, settings, lead: str, accept: bool = True, store=None):
    """A lead with facts, events with attributes and a note; with `store`, its events are in
    the event log too, as the API and CLI put them there."""
    client = env.client
    now = await env.get_current_time()
    update = ProfileUpdate(update_id=f"{lead}-p1", lead_id=lead, observed_at=now,
                           facts={"email": EMAIL, "phone": PHONE, "name": NAME, "target_account": True,
                                  "industry": "Software", "company_size": 250})
    await leads.send_profile(client, settings, update)
    if store is not None:
        store.log_facts([update], now)
    events = [
        ActivityEvent(event_id=f"{lead}-e1", lead_id=lead, type="content_download", occurred_at=now,
                      channel="website", attributes={"form": FORM, "email": EMAIL}),
        ActivityEvent(event_id=f"{lead}-e2", lead_id=lead, type="demo_request", occurred_at=now,
                      channel="website", attributes={"phone": PHONE}),
    ]
    await leads.send_events(client, settings, events)
    if store is not None:
        store.log_events(events, now)
    await settle(env, client, lead, lambda v: v.owner is not None)
    if accept:
        await leads.run_command(client, lead, Accept(by=ANNA, note=NOTE))
    await leads.flush_audit(client, lead)


async def test_history_read_without_the_key_shows_no_personal_data(dev_env, settings, store):
    """Facts, attributes and notes are in the lead's Temporal history only as ciphertext under
    the lead's own key: a client without the codec finds none of them (nor their base64);
    the codec reads them all."""
    lead = f"PII-{uuid.uuid4().hex[:6]}"
    async with running_worker(dev_env.client, settings, store):
        await a_lead_with_personal_data(dev_env, settings, lead)
        history = await lead_history(await plain_client(dev_env), lead)

    assert leaks(history) == []
    payloads = payloads_of(history)
    encrypted = [p for p in payloads if p.metadata.get("encoding") == ENCODING]
    # everything the lead's workflow carries is encrypted: only search attributes (no personal data) are not
    assert len(encrypted) > 10
    assert {p.metadata["encoding"] for p in payloads} <= {ENCODING, b"json/plain", b"binary/null"}
    assert {key for key in key_ids_in(history.events)} == {f"lead:1:{lead}"}
    text = await decoded_text(dev_env.client, history)
    for value in PII:
        assert value in text


async def test_refusals_still_read_through_the_encrypting_failure_converter(dev_env, settings, store):
    """Failure messages and stack traces are encoded (and so encrypted) by the converter
    (tests/test_payload_codec.py checks its class); a refused command's reason still reaches
    the caller."""
    lead = f"PII-{uuid.uuid4().hex[:6]}"
    async with running_worker(dev_env.client, settings, store):
        now = await dev_env.get_current_time()
        await leads.send_events(dev_env.client, settings, [ActivityEvent(
            event_id=f"{lead}-1", lead_id=lead, type="website_visit", occurred_at=now)])
        await settle(dev_env, dev_env.client, lead, lambda v: v.events_applied == 1)
        with pytest.raises(leads.CommandRefused, match="it is iql, not mql"):
            await leads.run_command(dev_env.client, lead, Accept(by=ANNA, note=NOTE))


async def test_history_written_under_an_old_payload_key_still_replays_after_rotation(dev_env, settings, tmp_path):
    """A lead and a rollout-like payload written under payload key k1; then k2 becomes current
    (k1 kept): a new worker replays the lead's whole history, the lead goes on, its history
    decodes and replays, new lead keys are wrapped by k2, and `rewrap` lets k1 retire."""
    k1, k2 = new_key(), new_key()
    old = PayloadKeyring({"k1": k1}, "k1")
    rotated = PayloadKeyring({"k2": k2, "k1": k1}, "k2")
    key_store = AuditStore(f"sqlite:///{tmp_path / 'keys.db'}")
    store = AuditStore(settings.database_url)
    target = dev_env.client.service_client.config.target_host

    async def client_with(keyring: PayloadKeyring) -> Client:
        converter = data_converter(Settings(key_cache_seconds=1, shred_delay_seconds=0), keyring=keyring,
                                   key_store=key_store)
        return await Client.connect(target, namespace=dev_env.client.namespace, data_converter=converter)

    lead = f"ROT-{uuid.uuid4().hex[:6]}"
    before = await client_with(old)
    now = await dev_env.get_current_time()
    async with running_worker(before, settings, store):
        await leads.send_profile(before, settings, ProfileUpdate(update_id="p1", lead_id=lead, facts={"email": EMAIL}))
        await leads.send_events(before, settings, [ActivityEvent(event_id="e1", lead_id=lead, type="webinar_attended",
                                                                  occurred_at=now, attributes={"form": FORM})])
        await settle(dev_env, before, lead, lambda v: v.events_applied == 1 and v.profile)
    record = key_store.lead_key(lead, 1)
    assert record.kek_id == "k1"
    # a payload under the payload key itself (what the model rollout's workflow uses)
    plain = await before.data_converter.encode([{"by": "mona"}])
    assert plain[0].metadata["encryption-key-id"] == b"k1"

    after = await client_with(rotated)
    async with running_worker(after, settings, store):  # a fresh worker: replays the history so far
        await leads.send_events(after, settings, [ActivityEvent(event_id="e2", lead_id=lead, type="website_visit",
                                                                 occurred_at=now + timedelta(seconds=1))])
        view = await settle(dev_env, after, lead, lambda v: v.events_applied == 2)
        assert view.profile["email"] == EMAIL
        history = await lead_history(after, lead)
        assert [FORM in await decoded_text(after, history)] == [True]
        assert await after.data_converter.decode(plain) == [{"by": "mona"}]
        assert (await after.data_converter.encode(["x"]))[0].metadata["encryption-key-id"] == b"k2"
        new_lead = f"ROT-{uuid.uuid4().hex[:6]}"
        await leads.send_events(after, settings, [ActivityEvent(event_id="n1", lead_id=new_lead, type="website_visit",
                                                                 occurred_at=now)])
        await settle(dev_env, after, new_lead, lambda v: v.events_applied == 1)
    assert key_store.lead_key(new_lead, 1).kek_id == "k2"
    for run in history.runs:
        await Replayer(workflows=[LeadWorkflow], data_converter=after.data_converter).replay_workflow(run)

    # Retiring k1: re-wrap the lead keys under k2; then a ring without k1 still reads the lead.
    codec = after.data_converter.payload_codec
    assert codec.lead_keys.rewrap_sync() == 1
    only_k2 = await client_with(PayloadKeyring({"k2": k2}, "k2"))
    assert FORM in await decoded_text(only_k2, history)
    with pytest.raises(KeyUnavailable, match="'k1' is not configured"):
        await only_k2.data_converter.decode(plain)


async def test_erasure_leaves_nothing_of_the_person_and_keeps_the_funnel(dev_env, settings, store):
    lead = f"ERA-{uuid.uuid4().hex[:6]}"
    client = dev_env.client
    async with running_worker(client, settings, store):
        await a_lead_with_personal_data(dev_env, settings, lead, store=store)
        before = await leads.get_view(client, lead)
        last_run = (await client.get_workflow_handle(workflow_id(lead)).describe()).run_id
        report_before = funnel_report(store.stage_changes(), now=before.stage_since)
        assert any(EMAIL in json.dumps(m.payload) for m in store.outbox_of(lead))
        assert any(EMAIL in e.detail for e in store.history(lead, limit=1000))

        report = await leads.erase_person(client, store, lead, MIA)
        assert report.erased_by == "mia" and report.key_generation == 2
        assert report.profile_facts == 3 and report.events == 2  # email, phone, name; two events' attributes
        assert report.audit_entries >= 2 and report.outbox_messages == 1

        view = await settle(dev_env, client, lead, lambda v: True)  # the lead goes on in a new run
        # fit categories stay (the model's words), so the score survives a refit; the rest is gone
        assert view.profile == {"target_account": True, "industry": "software", "company_size": 50}
        assert view.score == before.score and view.stage == before.stage == Stage.SAL
        state = await client.get_workflow_handle(workflow_id(lead)).query(LeadWorkflow.state)
        assert all(not e.attributes for e in state.engagement.window) and state.personal_data_erased_at

        # the old run's keys are destroyed once the new run holds nothing under them
        for _ in range(200):
            erasures = store.erasures(lead)
            if erasures and erasures[0].keys_destroyed_at:
                break
            await asyncio.sleep(0.1)
        assert erasures[0].keys_destroyed_at is not None and erasures[0].erased_by == "mia"

        # the lead goes on: new input, a command, its history readable under the new key
        now = await dev_env.get_current_time()
        await leads.send_events(client, settings, [ActivityEvent(event_id=f"{lead}-e3", lead_id=lead,
                                                                  type="website_visit", occurred_at=now)])
        await settle(dev_env, client, lead, lambda v: v.events_applied == 3)
        await leads.run_command(client, lead, Qualify(by=ANNA, bant=Bant(budget=True, need=True, authority=True)))
        await leads.flush_audit(client, lead)
        everything = await lead_history(client, lead)
        old = await lead_history(client, lead, run_id=last_run)  # the runs up to the erasure
        current = Histories(everything.runs[len(old.runs):])

    # Temporal: the first run is unreadable for everyone now; the current one has no personal data
    with pytest.raises(KeyUnavailable, match="destroyed"):
        await decoded_text(client, old)
    assert {k for k in key_ids_in(current.events)} == {f"lead:2:{lead}"}
    text = await decoded_text(client, current)
    assert [value for value in PII if value in text] == []
    # the store: no value, no note; the erasure is recorded; the funnel's numbers are the same
    everything = json.dumps([e.model_dump(mode="json") for e in store.history(lead, limit=1000)])
    everything += json.dumps([m.model_dump(mode="json") for m in store.outbox_of(lead)])
    everything += json.dumps([r.model_dump(mode="json") for r in store.event_log(lead)])
    everything += json.dumps([r.facts for r in store.replay_log(lead) if "update_id" in r._fields], default=str)
    assert [value for value in PII if value in everything] == []
    assert len(store.event_log(lead)) == 3  # the events stay logged (without attributes), the later one too
    erased = [e for e in store.history(lead, limit=1000) if e.kind == AuditKind.PERSONAL_DATA_ERASED]
    assert len(erased) == 1 and erased[0].actor == "mia"
    assert "3 profile fact value(s), attributes of 2 event(s)" in erased[0].detail
    after = funnel_report([e for e in store.stage_changes() if e.to_stage != Stage.SQL], now=before.stage_since)
    assert after == report_before


async def test_input_only_the_lead_logged_is_erased_from_the_event_log_too(dev_env, settings, store):
    """Input the edge did not log (the store was down for it) reaches the event log with
    the lead's own write, which an erasure makes before it scrubs the store: none of the
    person's data comes back into the log afterwards."""
    lead = f"ERL-{uuid.uuid4().hex[:6]}"
    client = dev_env.client
    async with running_worker(client, settings, store):
        await a_lead_with_personal_data(dev_env, settings, lead, accept=False)  # no store: the edge logged nothing
        await leads.erase_person(client, store, lead, MIA)
        await settle(dev_env, client, lead, lambda v: True)
        await leads.flush_audit(client, lead)
    logged = store.event_log(lead)
    assert [row.event_id for row in logged] == [f"{lead}-e1", f"{lead}-e2"]
    assert all(row.attributes == {} for row in logged)
    (facts,) = [row.facts for row in store.replay_log(lead) if "update_id" in row._fields]
    assert facts["email"] == facts["phone"] == facts["name"] == ERASED
    assert [value for value in PII if value in json.dumps(facts, default=str)] == []


async def test_erasure_of_a_lead_whose_workflow_has_ended(dev_env, settings, store):
    lead = f"ERW-{uuid.uuid4().hex[:6]}"
    client = dev_env.client
    async with running_worker(client, settings, store):
        await a_lead_with_personal_data(dev_env, settings, lead, store=store)
        await leads.run_command(client, lead, Qualify(by=ANNA, bant=Bant(budget=True, need=True, authority=True)))
        await leads.run_command(client, lead, LogContact(by=BEN, note=NOTE))
        await leads.run_command(client, lead, Close(by=BEN, outcome="won", note=NOTE))
        await client.get_workflow_handle(workflow_id(lead)).result()
        report = await leads.erase_person(client, store, lead, MIA)
        assert report.keys_destroyed_at is not None and "crypto-shredded" in report.history
        history = await lead_history(client, lead)
    with pytest.raises(KeyUnavailable, match="destroyed"):
        await decoded_text(client, history)
    everything = json.dumps([e.model_dump(mode="json") for e in store.history(lead, limit=1000)])
    everything += json.dumps([m.model_dump(mode="json") for m in store.outbox_of(lead)])
    everything += json.dumps([r.model_dump(mode="json") for r in store.event_log(lead)])
    everything += json.dumps([r.facts for r in store.replay_log(lead) if "update_id" in r._fields], default=str)
    assert [value for value in PII if value in everything] == []
    assert len(store.event_log(lead)) == 2  # the events stay logged, without attributes
    assert [e.erased_by for e in store.erasures(lead)] == ["mia"]
    with pytest.raises(leads.LeadNotFound):
        await leads.erase_person(client, store, "never-was", MIA)


async def test_export_gives_everything_kept_about_the_person(dev_env, settings, store):
    lead = f"EXP-{uuid.uuid4().hex[:6]}"
    client = dev_env.client
    async with running_worker(client, settings, store):
        await a_lead_with_personal_data(dev_env, settings, lead, store=store)
        export = await leads.export_person(client, store, lead)
        assert export.complete and export.notes == []
        assert {e.event_id: e.attributes for e in export.received_events}[f"{lead}-e2"] == {"phone": PHONE}
        assert [(u.update_id, u.facts["email"], u.actor) for u in export.received_profile_updates] == [
            (f"{lead}-p1", EMAIL, "leadflow")]
        assert export.profile["email"] == EMAIL and export.profile_observed["email"]["update_id"] == f"{lead}-p1"
        assert {e.event_id: e.attributes for e in export.events}[f"{lead}-e1"] == {"form": FORM, "email": EMAIL}
        assert any(NOTE in e.detail for e in export.history)
        assert any(e.kind == AuditKind.PROFILE_UPDATED and EMAIL in e.detail for e in export.history)
        assert [m.kind.value for m in export.outbox] == ["handover"]
        assert export.outbox[0].payload["profile"]["phone"] == PHONE

        await leads.erase_person(client, store, lead, MIA)
        export = await leads.export_person(client, store, lead)
    dumped = export.model_dump_json()
    assert [value for value in PII if value in dumped] == []
    assert [e.erased_by for e in export.erasures] == ["mia"]
    # the event log keeps what the funnel needs (type, time, channel) and the digest for redeliveries
    assert [(e.event_id, e.type, e.channel, e.attributes) for e in export.received_events] == [
        (f"{lead}-e1", "content_download", "website", {}), (f"{lead}-e2", "demo_request", "website", {})]
    assert [u.facts for u in export.received_profile_updates] == [{name: "[erased]" for name in (
        "email", "phone", "name", "target_account", "industry", "company_size")}]
    with pytest.raises(leads.LeadNotFound):
        await leads.export_person(client, store, "never-was")


async def test_a_sweep_that_read_before_an_erasure_cannot_bring_personal_data_back(dev_env, settings, store):
    """The worker's audit sweeper reads a lead's waiting entries by query and writes them
    later; an erasure in between must not be undone. The lead writes everything before the
    store is scrubbed, so a late sweep only meets rows already there (first copy kept)."""
    lead = f"SWP-{uuid.uuid4().hex[:6]}"
    client = dev_env.client
    async with running_worker(client, settings, store):
        await a_lead_with_personal_data(dev_env, settings, lead, accept=False)
        now = await dev_env.get_current_time()
        await leads.send_profile(client, settings, ProfileUpdate(
            update_id=f"{lead}-p2", lead_id=lead, observed_at=now, facts={"phone": PHONE + "9"}))
        await settle(dev_env, client, lead, lambda v: v.profile.get("phone") == PHONE + "9")
        read_early = await client.get_workflow_handle(workflow_id(lead)).query(
            "audit_tail", 0, result_type=list[AuditEntry])
        assert any(PHONE in entry.detail for entry in read_early)  # waiting, with personal data
        await leads.erase_person(client, store, lead, MIA)
        assert store.write_audit(read_early) == 0  # the late sweep
    everything = json.dumps([e.model_dump(mode="json") for e in store.history(lead, limit=1000)])
    assert [value for value in PII if value in everything] == []
