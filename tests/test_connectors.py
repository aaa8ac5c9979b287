"""Inbound connectors: Mautic and HubSpot webhooks as the vendors send them.

The fixtures (tests/fixtures/connectors/) follow the payloads of the vendors' documentation
(Mautic's "Webhook events and payloads", including PHP's escaped slashes; HubSpot's Webhooks
API). Signatures are computed here the way the vendors' documentation says to (Mautic:
base64 HMAC-SHA256 of the raw body; HubSpot v3: base64 HMAC-SHA256 of method + URL + body +
timestamp), independently of connectors/. Times in the fixtures are moved to "just now"
so the replay window holds whenever the tests run.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from connectors import hubspot, mautic
from connectors.mapping import DEFAULT_CONNECTORS, MappingError, load_connectors
from tests.conftest import until
from tests.test_api import api_over_worker, view_when

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "connectors"
MAUTIC_SECRET = "mautic-webhook-secret-7f3a9c"
HUBSPOT_SECRET = "a1b2c3d4-e5f6-4711-9abc-hubspot-app"
ISO = re.compile(r'"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+00:00)"')
EPOCH_MS = re.compile(r'"occurredAt": (\d{13})')


def mautic_body(name: str, newest: datetime | None = None) -> bytes:
    """A Mautic fixture, raw, with its times moved so the newest is `newest` (default: a
    minute ago); the text is otherwise untouched (signatures cover the raw bytes)."""
    text = (FIXTURES / name).read_text()
    times = [datetime.fromisoformat(t) for t in ISO.findall(text)]
    shift = (newest or datetime.now(timezone.utc) - timedelta(minutes=1)) - max(times)
    # Whole seconds, as Mautic writes them.
    shift = timedelta(seconds=round(shift.total_seconds()))
    return ISO.sub(lambda m: '"' + (datetime.fromisoformat(m.group(1)) + shift).isoformat() + '"', text).encode()


def hubspot_body(name: str) -> bytes:
    text = (FIXTURES / name).read_text()
    newest = max(int(t) for t in EPOCH_MS.findall(text))
    shift = int(datetime.now(timezone.utc).timestamp() * 1000) - 60_000 - newest
    return EPOCH_MS.sub(lambda m: f'"occurredAt": {int(m.group(1)) + shift}', text).encode()


def mautic_signature(body: bytes, secret: str = MAUTIC_SECRET) -> str:
    # Mautic: base64_encode(hash_hmac('sha256', $payload, $secret, true))
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def hubspot_headers(url: str, body: bytes, secret: str = HUBSPOT_SECRET, at: datetime | None = None) -> dict:
    stamp = str(int((at or datetime.now(timezone.utc)).timestamp() * 1000))
    signed = b"POST" + url.encode() + body + stamp.encode()
    return {"Content-Type": "application/json", "X-HubSpot-Request-Timestamp": stamp,
            "X-HubSpot-Signature-v3": base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode(),
            "X-HubSpot-Signature-Version": "v3"}


# --------------------------------------------------------------------------- pure: signatures and mapping

def test_mautic_signature_is_the_documented_hmac_of_the_raw_body():
    body = mautic_body("mautic_form_on_submit.json")
    assert mautic.signature_ok(body, mautic_signature(body), MAUTIC_SECRET)
    assert not mautic.signature_ok(body, mautic_signature(body, "another-secret"), MAUTIC_SECRET)
    assert not mautic.signature_ok(body + b" ", mautic_signature(body), MAUTIC_SECRET)
    # Re-encoding the JSON (slashes unescaped) is another body: the raw bytes are what is signed.
    reencoded = json.dumps(json.loads(body)).encode()
    assert not mautic.signature_ok(reencoded, mautic_signature(body), MAUTIC_SECRET)
    assert not mautic.signature_ok(body, None, MAUTIC_SECRET)


def test_hubspot_v3_signature_covers_method_url_body_and_time():
    body = hubspot_body("hubspot_contact_changes.json")
    url = "https://leadflow.example.com/connectors/hubspot"
    h = hubspot_headers(url, body)
    sig, stamp = h["X-HubSpot-Signature-v3"], h["X-HubSpot-Request-Timestamp"]
    assert hubspot.signature_ok("POST", url, body, stamp, sig, HUBSPOT_SECRET)
    assert not hubspot.signature_ok("POST", url, body, str(int(stamp) + 1), sig, HUBSPOT_SECRET)
    assert not hubspot.signature_ok("POST", url + "x", body, stamp, sig, HUBSPOT_SECRET)
    assert not hubspot.signature_ok("POST", url, body, stamp, sig, "another-secret")
    # HubSpot signs the URL with some characters decoded.
    encoded = "https://leadflow.example.com/connectors/hubspot?portal%3A62515"
    signed = hubspot_headers("https://leadflow.example.com/connectors/hubspot?portal:62515", body)
    assert hubspot.signature_ok("POST", encoded, body, signed["X-HubSpot-Request-Timestamp"],
                                signed["X-HubSpot-Signature-v3"], HUBSPOT_SECRET)


def test_mapping_turns_documented_mautic_payloads_into_events_facts_and_ignored():
    mapping = load_connectors().mautic
    items = mautic.items(json.loads(mautic_body("mautic_background_batch.json")), mapping)
    by_type = {item.vendor_type: item for item in items}
    hit = by_type["mautic.page_on_hit"]
    assert (hit.event_type, hit.contact_id, hit.vendor_id, hit.channel, hit.campaign) == (
        "pricing_page_visit", "4712", "mautic:hit:90412", "website", "herbst-kampagne")
    saved = by_type["mautic.lead_post_save_update"]
    assert saved.event_type is None
    assert saved.facts == {"company": "Beispiel AG", "job_title": "Einkauf", "email": "max@example.at",
                           "country": "AT"}
    assert by_type["mautic.lead_points_change"].ignored == "mautic.lead_points_change is ignored by the mapping"
    assert by_type["mautic.company_post_save"].ignored == "no rule maps mautic.company_post_save"
    (form,) = mautic.items(json.loads(mautic_body("mautic_form_on_submit.json")), mapping)
    assert (form.event_type, form.contact_id, form.vendor_id) == ("demo_request", "4711", "mautic:submission:1187")


def test_mapping_of_hubspot_property_changes():
    mapping = load_connectors().hubspot
    items = hubspot.items(json.loads(hubspot_body("hubspot_contact_changes.json")), mapping)
    assert [i.ignored for i in items] == ["no rule maps contact.creation", None, None, None]
    assert items[1].facts == {"company_size": 250} and items[2].facts == {"industry": "software"}
    assert items[3].event_type == "demo_request" and items[3].vendor_id == "hubspot:62515:1831275436"
    assert items[3].occurred_at.tzinfo is not None


def test_unusable_vendor_items_say_why():
    mapping = load_connectors().mautic
    no_contact, bad_time = mautic.items({"mautic.page_on_hit": [
        {"hit": {"id": 1, "dateHit": "2026-11-23T10:00:00+00:00"}, "timestamp": "2026-11-23T10:00:00+00:00"},
        {"hit": {"id": 2, "lead": {"id": 5}, "dateHit": "yesterday"}, "timestamp": "2026-11-23 10:00"},
    ]}, mapping)
    assert no_contact.problem == "no contact id in the payload"
    assert bad_time.problem.startswith("no usable timestamp")


def test_a_contact_becomes_a_lead_id_the_same_in_every_process():
    import subprocess
    import sys
    from api.routes_connectors import _lead_id

    assert _lead_id("mautic", "4711") == "mautic-4711"
    assert _lead_id("hubspot", "a b/c") == "hubspot-a_b_c"
    long = "x" * 200  # too long for a lead id: a digest, not Python's per-process hash
    here = _lead_id("hubspot", long)
    there = subprocess.run([sys.executable, "-c", "from api.routes_connectors import _lead_id; "
                            f"print(_lead_id('hubspot', {long!r}))"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent.parent, check=True).stdout.strip()
    assert here == there and len(here) <= 128


def test_a_broken_mapping_file_is_refused_with_its_place(tmp_path):
    broken = tmp_path / "c.toml"
    broken.write_text(DEFAULT_CONNECTORS.read_text().replace('type = "email_open"', 'type = "Email Open"'))
    with pytest.raises(MappingError, match=r"mautic\.events\.2\.type"):
        load_connectors(broken)
    both = tmp_path / "d.toml"
    both.write_text(DEFAULT_CONNECTORS.read_text().replace('vendor = "mautic.lead_points_change"\nignore = true',
                                                           'vendor = "mautic.lead_points_change"\nignore = true\n'
                                                           'type = "email_open"'))
    with pytest.raises(MappingError, match="either `type`"):
        load_connectors(both)


# --------------------------------------------------------------------------- through the API, worker and dev server

@pytest.fixture
async def api(dev_env, settings, store):
    settings = settings.model_copy(update={"mautic_secret": MAUTIC_SECRET, "hubspot_secret": HUBSPOT_SECRET})
    async with api_over_worker(dev_env, settings, store) as api:
        yield api


async def test_a_mautic_webhook_moves_a_lead_through_the_funnel(api, store):
    vendor = api.as_(None)
    anna, ben, mia = api.as_("anna"), api.as_("ben"), api.as_("mia")
    body = mautic_body("mautic_form_on_submit.json")
    headers = {"Content-Type": "application/json", "Webhook-Signature": mautic_signature(body)}
    r = await vendor.post("/connectors/mautic", content=body, headers=headers)
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert (result["outcome"], result["vendor_id"], result["lead_id"]) == ("accepted", "mautic:submission:1187",
                                                                           "mautic-4711")
    # The lead is found by Mautic's contact id; the demo request fast-tracks it to presales.
    r = await anna.get("/leads/by-external/mautic/4711")
    assert r.status_code == 200 and r.json()["lead_id"] == "mautic-4711"
    view = await view_when(anna, "mautic-4711", lambda v: v["owner"] is not None)
    assert view["stage"] == "mql"
    # Mautic redelivers the same body (its queue retried): a duplicate, applied once.
    r = await vendor.post("/connectors/mautic", content=body, headers=headers)
    assert r.status_code == 200 and r.json()["results"][0]["outcome"] == "duplicate", r.text
    # Presales and sales take it from there.
    assert (await anna.post("/leads/mautic-4711/accept", json={})).json()["stage"] == "sal"
    r = await anna.post("/leads/mautic-4711/qualify", json={"bant": {"budget": True, "need": True, "authority": True}})
    assert r.json()["stage"] == "sql", r.text
    assert (await ben.post("/leads/mautic-4711/close", json={"outcome": "won"})).json()["stage"] == "won"
    history = await until(lambda: mia.get("/leads/mautic-4711/history", params={"limit": 1000}),
                          lambda r: any(e.get("to_stage") == "won" for e in r.json()["entries"]))
    scored = [e for e in history.json()["entries"] if e["kind"] == "score_changed"]
    assert [e["event_id"] for e in scored] == ["mautic:submission:1187"]
    assert scored[0]["source"] == "connector:mautic"


async def test_mautic_batches_map_each_event_and_record_the_ignored(api, store):
    vendor, mia, anna = api.as_(None), api.as_("mia"), api.as_("anna")
    body = mautic_body("mautic_background_batch.json")
    r = await vendor.post("/connectors/mautic", content=body,
                          headers={"Content-Type": "application/json", "Webhook-Signature": mautic_signature(body)})
    assert r.status_code == 200, r.text
    outcome = {x["vendor_type"]: x["outcome"] for x in r.json()["results"]}
    assert outcome == {"mautic.page_on_hit": "accepted", "mautic.lead_post_save_update": "accepted",
                       "mautic.lead_points_change": "ignored", "mautic.company_post_save": "ignored"}
    view = await view_when(anna, "mautic-4712", lambda v: v["score"]["engagement"] > 0 and v["profile"])
    assert view["channel"] == "website" and view["score"]["breakdown"]["pricing_page_visit"] > 0
    assert view["profile"] == {"company": "Beispiel AG", "job_title": "Einkauf", "email": "max@example.at",
                               "country": "AT"}
    assert view["score"]["fit"] == 5  # country_served
    (logged,) = [r for r in store.replay_log(lead_id="mautic-4712") if "event_id" in r._fields]
    assert (logged.event_id, logged.campaign, logged.source) == ("mautic:hit:90412", "herbst-kampagne",
                                                                  "connector:mautic")
    log = (await mia.get("/connectors/mautic/log")).json()["entries"]
    ignored = [e for e in log if e["outcome"] == "ignored"]
    assert {e["vendor_type"] for e in ignored} == {"mautic.lead_points_change", "mautic.company_post_save"}
    assert all("max@example.at" not in json.dumps(e) for e in log)  # the log keeps no personal data
    assert (await anna.get("/connectors/mautic/log")).status_code == 403


async def test_bad_mautic_signatures_and_stale_bodies_are_refused(api, store):
    vendor = api.as_(None)
    body = mautic_body("mautic_form_on_submit.json")
    for signature in (None, mautic_signature(body, "guessed-secret"), mautic_signature(body + b"\n")):
        headers = {"Content-Type": "application/json"} | ({"Webhook-Signature": signature} if signature else {})
        r = await vendor.post("/connectors/mautic", content=body, headers=headers)
        assert r.status_code == 401 and "Webhook-Signature" in r.json()["detail"], r.text
    # A body signed with the right secret but two days old: a replay, refused.
    old = mautic_body("mautic_form_on_submit.json", newest=datetime.now(timezone.utc) - timedelta(days=2))
    r = await vendor.post("/connectors/mautic", content=old,
                          headers={"Content-Type": "application/json", "Webhook-Signature": mautic_signature(old)})
    assert r.status_code == 401 and "stale or replayed" in r.json()["detail"]
    assert (await api.as_("anna").get("/leads/by-external/mautic/4711")).status_code == 404


async def test_a_hubspot_webhook_moves_a_lead_to_presales(api, store):
    vendor, anna = api.as_(None), api.as_("anna")
    body = hubspot_body("hubspot_contact_changes.json")
    url = f"{api.base_url}/connectors/hubspot"
    headers = hubspot_headers(url, body)
    r = await vendor.post("/connectors/hubspot", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert [x["outcome"] for x in r.json()["results"]] == ["ignored", "accepted", "accepted", "accepted"]
    lead = (await anna.get("/leads/by-external/hubspot/9070155101")).json()["lead_id"]
    assert lead == "hubspot-9070155101"
    view = await view_when(anna, lead, lambda v: v["owner"] is not None and v["score"]["fit"] == 20)
    assert view["stage"] == "mql" and view["profile"] == {"company_size": 250, "industry": "software"}
    # HubSpot retries with the same eventIds (a new attempt, newly signed): duplicates.
    retry = body.replace(b'"attemptNumber": 0', b'"attemptNumber": 1')
    r = await vendor.post("/connectors/hubspot", content=retry, headers=hubspot_headers(url, retry))
    assert [x["outcome"] for x in r.json()["results"]] == ["ignored", "duplicate", "duplicate", "duplicate"]
    # Refused: a wrong secret, a changed body, a request signed for another URL, an old request.
    for bad in (hubspot_headers(url, body, secret="guessed"), hubspot_headers(url + "/x", body),
                hubspot_headers(url, body, at=datetime.now(timezone.utc) - timedelta(minutes=6))):
        r = await vendor.post("/connectors/hubspot", content=body, headers=bad)
        assert r.status_code == 401, r.text
    r = await vendor.post("/connectors/hubspot", content=body + b" ", headers=headers)
    assert r.status_code == 401


async def test_external_ids_link_a_lead_made_by_the_api(api, store):
    mautic_key, anna, mia = api.as_("mautic"), api.as_("anna"), api.as_("mia")
    lead = f"L-{uuid.uuid4().hex[:8]}"
    r = await mautic_key.put(f"/leads/{lead}/external/mautic/4711")
    assert r.status_code == 200 and r.json() == {"system": "mautic", "external_id": "4711", "lead_id": lead}
    assert (await mautic_key.put(f"/leads/{lead}/external/mautic/4711")).status_code == 200  # idempotent
    r = await mautic_key.put("/leads/someone-else/external/mautic/4711")
    assert r.status_code == 409 and lead in r.json()["detail"]
    # Mautic's webhook for contact 4711 now reaches that lead.
    body = mautic_body("mautic_form_on_submit.json")
    r = await api.as_(None).post("/connectors/mautic", content=body, headers={
        "Content-Type": "application/json", "Webhook-Signature": mautic_signature(body)})
    assert r.json()["results"][0]["lead_id"] == lead
    await view_when(anna, lead, lambda v: v["stage"] == "mql")
    assert (await anna.put(f"/leads/{lead}/external/crm/1")).status_code == 403
    assert (await mia.get("/leads/by-external/crm/nope")).status_code == 404


async def test_an_unconfigured_connector_is_404(dev_env, settings, store):
    async with api_over_worker(dev_env, settings, store) as api:
        body = mautic_body("mautic_form_on_submit.json")
        r = await api.as_(None).post("/connectors/mautic", content=body, headers={
            "Content-Type": "application/json", "Webhook-Signature": mautic_signature(body)})
        assert r.status_code == 404 and "LEADFLOW_MAUTIC_SECRET" in r.json()["detail"]


async def test_vendor_events_pass_the_same_edge_checks_as_the_api(api, store):
    """A vendor event with a time the API would refuse is rejected on its own, saying why."""
    future = int((datetime.now(timezone.utc) + timedelta(days=1)).timestamp() * 1000)
    body = json.dumps([{"eventId": 77, "subscriptionId": 1, "portalId": 62515, "appId": 1, "occurredAt": future,
                        "subscriptionType": "contact.propertyChange", "attemptNumber": 0, "objectId": 5150,
                        "propertyName": "hs_email_last_open_date", "propertyValue": str(future)}]).encode()
    url = f"{api.base_url}/connectors/hubspot"
    r = await api.as_(None).post("/connectors/hubspot", content=body, headers=hubspot_headers(url, body))
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert result["outcome"] == "rejected" and result["reason"].startswith("occurred_at: ")
    assert "minutes in the future" in result["reason"]
