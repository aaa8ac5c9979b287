"""Personal data over HTTP: which roles read it (LEADFLOW_PII_READERS) and who gets it masked,
export and erasure for managers only, and the codec server the Temporal UI and CLI use
(authentication, CORS, a cookie for the browser), against the real stack as test_api.py."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import uuid

import httpx
import pytest

from api import create_app
from tests.conftest import binary, running_worker, until
from tests.test_workflow_personal_data import b64_variants
from tests.test_api import KEYRING, KEYS, Api, api, ev, now, serving, view_when  # noqa: F401 (fixture)
from workflows.lead import workflow_id

EMAIL, PHONE, FORM = "ann.example@mail.test", "+49 170 5550123", "Whitepaper form of Ann Beispiel"
UI = "http://127.0.0.1:8233"


async def a_lead_with_personal_data(api: Api, note: str = "her mobile is +49 170 5550123") -> str:
    lead = f"P-{uuid.uuid4().hex[:8]}"
    mautic, anna = api.as_("mautic"), api.as_("anna")
    r = await mautic.post(f"/leads/{lead}/profile", json={"update_id": f"{lead}-p", "facts": {
        "email": EMAIL, "phone": PHONE, "target_account": True}})
    assert r.status_code == 202, r.text
    r = await mautic.post("/events/batch", json={"events": [
        ev(f"{lead}-1", lead, "content_download", now(), attributes={"form": FORM}),
        ev(f"{lead}-2", lead, "demo_request", now())]})
    assert r.json()["accepted"] == 2, r.text
    await view_when(anna, lead, lambda v: v["owner"] is not None)
    r = await anna.post(f"/leads/{lead}/accept", json={"note": note})
    assert r.status_code == 200, r.text
    return lead


def shows_personal_data(response: httpx.Response) -> bool:
    return any(value in response.text for value in (EMAIL, PHONE, FORM, "+49 170"))


async def test_roles_not_allowed_to_read_personal_data_get_it_masked(api):
    lead = await a_lead_with_personal_data(api)
    mautic, anna, ben, mia = api.as_("mautic"), api.as_("anna"), api.as_("ben"), api.as_("mia")

    # marketing wrote the facts, but reads none of them back
    r = await mautic.get(f"/leads/{lead}")
    assert r.status_code == 200 and not shows_personal_data(r)
    assert r.json()["profile"] == {"email": "***", "phone": "***", "target_account": "***"}
    r = await mautic.get(f"/leads/{lead}/history", params={"limit": 1000})
    assert r.status_code == 200 and not shows_personal_data(r)
    details = [e["detail"] for e in r.json()["entries"]]
    assert "profile: email=***, phone=***, target_account=***" in details
    assert any(d.endswith("; note: ***") for d in details)
    r = await until(lambda: mautic.get("/outbox", params={"kind": "handover"}),
                    lambda r: any(m["lead_id"] == lead for m in r.json()["messages"]))
    mine = [m for m in r.json()["messages"] if m["lead_id"] == lead]
    assert not shows_personal_data(httpx.Response(200, json=mine))
    assert mine[0]["payload"]["profile"] == {"email": "***", "phone": "***", "target_account": "***"}
    assert mine[0]["payload"]["score"] > 100  # the rest stays

    # presales, sales and managers read them (the default LEADFLOW_PII_READERS)
    for reader in (anna, ben, mia):
        r = await reader.get(f"/leads/{lead}")
        assert r.json()["profile"]["email"] == EMAIL
        assert shows_personal_data(await reader.get(f"/leads/{lead}/history", params={"limit": 1000}))
    assert shows_personal_data(await mia.get("/outbox"))


async def test_which_roles_read_personal_data_is_configurable(dev_env, settings, store):
    managers_only = settings.model_copy(update={"pii_readers": ["manager"]})
    async with running_worker(dev_env.client, settings, store):
        app = create_app(settings=managers_only, keys=KEYRING, temporal=dev_env.client, store=store)
        async with serving(app) as base_url:
            api = Api(base_url)
            try:
                lead = await a_lead_with_personal_data(api)
                anna, mia = api.as_("anna"), api.as_("mia")
                r = await anna.post(f"/leads/{lead}/qualify", json={"bant": {"budget": True, "need": True,
                                                                             "authority": True}})
                assert r.status_code == 200 and r.json()["profile"]["email"] == "***"  # a command's answer too
                assert not shows_personal_data(await anna.get(f"/leads/{lead}"))
                assert not shows_personal_data(await anna.get(f"/leads/{lead}/history", params={"limit": 1000}))
                # the outcome of a command read back by its key: the note it carried stays masked
                r = await anna.post(f"/leads/{lead}/contact", json={"note": "call her on +49 170 5550123"},
                                    headers={"Idempotency-Key": f"{lead}-contact"})
                assert r.status_code == 200, r.text
                r = await anna.get(f"/leads/{lead}/commands/{lead}-contact")
                assert r.status_code == 200 and r.json()["outcome"] == "applied" and r.json()["entries"], r.text
                assert not shows_personal_data(r)
                assert shows_personal_data(await mia.get(f"/leads/{lead}/commands/{lead}-contact"))
                assert (await mia.get(f"/leads/{lead}")).json()["profile"]["email"] == EMAIL
                spec = (await mia.get("/openapi.json")).json()
                assert "LEADFLOW_PII_READERS" in spec["paths"]["/leads/{lead_id}"]["get"]["description"]
            finally:
                await api.close()


async def test_export_and_erasure_are_for_managers_only(api, store):
    lead = await a_lead_with_personal_data(api)
    mautic, anna, mia = api.as_("mautic"), api.as_("anna"), api.as_("mia")
    for caller in (mautic, anna):
        assert (await caller.get(f"/leads/{lead}/personal-data")).status_code == 403
        assert (await caller.delete(f"/leads/{lead}/personal-data")).status_code == 403

    r = await mia.get(f"/leads/{lead}/personal-data")
    assert r.status_code == 200, r.text
    export = r.json()
    assert export["complete"] is True and export["profile"]["email"] == EMAIL
    assert {e["event_id"]: e["attributes"] for e in export["events"]}[f"{lead}-1"] == {"form": FORM}
    assert any("+49 170" in e["detail"] for e in export["history"])
    assert export["outbox"][0]["payload"]["profile"]["phone"] == PHONE

    r = await mia.delete(f"/leads/{lead}/personal-data")
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["erased_by"] == "mia" and report["key_generation"] == 2 and report["profile_facts"] == 2
    assert "crypto-shredded" in report["history"]

    r = await until(lambda: mia.get(f"/leads/{lead}/personal-data"),
                    lambda r: r.status_code == 200 and r.json()["complete"])
    assert not shows_personal_data(r)
    assert r.json()["profile"] == {"target_account": True}  # a fit rule's category: kept, the score stays
    assert [e["erased_by"] for e in r.json()["erasures"]] == ["mia"]
    history = (await mia.get(f"/leads/{lead}/history", params={"limit": 1000})).json()["entries"]
    assert [e["actor"] for e in history if e["kind"] == "personal_data_erased"] == ["mia"]
    assert (await mia.delete("/leads/nobody-here/personal-data")).status_code == 404


# --------------------------------------------------------------------------- the codec server


async def encrypted_payloads(dev_env, lead: str) -> list[dict]:
    history = await dev_env.client.get_workflow_handle(workflow_id(lead)).fetch_history()
    return [json.loads(history.to_json())["events"][0]["workflowExecutionStartedEventAttributes"]["input"]
            ["payloads"][0]]


async def test_codec_server_decodes_for_managers_only(api, dev_env):
    lead = await a_lead_with_personal_data(api)
    await api.as_("mia").post(f"/leads/{lead}/qualify", json={"bant": {"budget": True, "need": True,
                                                                      "authority": True}})
    history = await dev_env.client.get_workflow_handle(workflow_id(lead)).fetch_history()
    payloads = [p for e in json.loads(history.to_json())["events"] for key, attrs in e.items()
                if key.endswith("Attributes") and isinstance(attrs, dict)
                for field in ("input", "result") if isinstance(attrs.get(field), dict)
                for p in attrs[field].get("payloads", [])]
    assert payloads and all(base64.b64decode(p["metadata"]["encoding"]) == b"binary/encrypted" for p in payloads)
    body = {"payloads": payloads}

    assert (await api.as_(None).post("/codec/decode", json=body)).status_code == 401
    assert (await api.as_("anna").post("/codec/decode", json=body)).status_code == 403
    r = await api.as_("mia").post("/codec/decode", json=body)
    assert r.status_code == 200, r.text
    decoded = r.json()["payloads"]
    assert len(decoded) == len(payloads)
    texts = [base64.b64decode(p.get("data", "")).decode("utf-8", "replace") for p in decoded]
    assert any(EMAIL in t for t in texts) and any(FORM in t for t in texts)
    # the CLI's templated endpoint, /codec/{namespace}/decode, and encode back
    assert (await api.as_("mia").post("/codec/default/decode", json=body)).json() == r.json()
    r = await api.as_("mia").post("/codec/encode", json={"payloads": decoded[:1]})
    assert base64.b64decode(r.json()["payloads"][0]["metadata"]["encoding"]) == b"binary/encrypted"
    json_type = {"content-type": "application/json"}  # what the codec protocol has clients send
    assert (await api.as_("mia").post("/codec/decode", content=b"not json", headers=json_type)).status_code == 400
    assert (await api.as_("mia").post("/codec/decode", content=b"not json")).status_code == 415
    # found by tests/test_api_fuzz.py: protobuf's JSON parser took a list for a payload
    for path in ("/codec/encode", "/codec/decode"):
        for bad in ([[]], [[1, 2]], ["text"], [None]):
            r = await api.as_("mia").post(path, json={"payloads": bad})
            assert r.status_code == 400 and "each payload is an object" in r.text, (path, bad, r.text)


async def test_codec_server_answers_the_ui_origin_only_and_logs_a_browser_in(api):
    preflight = {"Origin": UI, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type,x-namespace"}
    r = await api.as_(None).options("/codec/decode", headers=preflight)
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == UI
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "X-Namespace" in r.headers["access-control-allow-headers"]
    r = await api.as_(None).options("/codec/decode", headers={**preflight, "Origin": "https://evil.example"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    # a refusal carries the CORS headers too, or the browser hides why
    r = await api.as_(None, Origin=UI).post("/codec/decode", json={"payloads": []})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == UI

    browser = api.as_(None, Origin=UI)
    assert (await browser.post("/codec/login", data={"key": KEYS["anna"][1]})).status_code == 403
    r = await browser.post("/codec/login", data={"key": KEYS["mia"][1]})
    assert r.status_code == 200 and "Logged in as mia" in r.text
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/codec" in cookie
    r = await browser.post("/codec/decode", json={"payloads": []})
    assert r.status_code == 200 and r.json() == {}  # no payloads in, none out
    assert "login" in (await browser.get("/codec/login")).text


async def test_a_blank_codec_login_key_is_refused_as_the_document_says(api):
    """Found by tests/test_api_fuzz.py: the document let a key of blanks through (`minLength`
    1), which the form's answer refuses as no key at all (400)."""
    document = (await api.as_(None).get("/openapi.json")).json()
    body = document["paths"]["/codec/login"]["post"]["requestBody"]["content"]["application/x-www-form-urlencoded"]
    key = body["schema"]["properties"]["key"]

    def documented_valid(value: str) -> bool:  # a JSON Schema string's length and pattern
        return len(value) >= key.get("minLength", 0) and re.search(key.get("pattern", ""), value) is not None

    assert documented_valid("a-key")
    for blank in (" ", "\t ", "  "):
        assert not documented_valid(blank), repr(blank)
        r = await api.as_(None, Origin=UI).post("/codec/login", data={"key": blank})
        assert r.status_code == 400 and "form field `key`" in r.text


async def test_the_temporal_cli_shows_payloads_through_the_codec_server(api, dev_env):
    """`temporal workflow show --codec-endpoint ... --codec-auth "Bearer KEY"`: an operator with a
    manager's key reads the lead's payloads; without the codec server nobody does."""
    lead = await a_lead_with_personal_data(api)
    address = dev_env.client.service_client.config.target_host

    def show(*extra: str) -> str:
        result = subprocess.run([binary("temporal"), "workflow", "show", "-w", workflow_id(lead), "--address", address,
                                 "-o", "json", *extra], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    encrypted = base64.b64encode(b"binary/encrypted").decode()
    plain = await asyncio.to_thread(show)
    assert EMAIL not in plain and encrypted in plain
    decoded = await asyncio.to_thread(show, "--codec-endpoint", f"{api.base_url}/codec",
                                      "--codec-auth", f"Bearer {KEYS['mia'][1]}")
    assert encrypted not in decoded  # JSON output shows payload data in base64
    assert any(variant in decoded for variant in b64_variants(EMAIL))
