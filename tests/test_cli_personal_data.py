"""`leadflow export-person`, `leadflow erase` and `leadflow keys` against the dev server: the CLI
runs in a thread with its own event loop (as the command would), the worker in the test's."""

from __future__ import annotations

import json
import os
import uuid

import client as leads
import starter
from funnel.models import ActivityEvent, ProfileUpdate
from activities.store import AuditStore
from payload_codec import LeadKeys, PayloadKeyring
from tests.conftest import running_worker, settle

EMAIL, FORM = "ann.example@mail.test", "form of Ann Beispiel"


async def test_export_person_then_erase_from_the_command_line(dev_env, settings, store, cli):
    lead = f"C-{uuid.uuid4().hex[:6]}"
    client = dev_env.client
    async with running_worker(client, settings, store):
        now = await dev_env.get_current_time()
        await leads.send_profile(client, settings, ProfileUpdate(update_id="p1", lead_id=lead,
                                                                 facts={"email": EMAIL, "industry": "software"}))
        await leads.send_events(client, settings, [ActivityEvent(event_id="e1", lead_id=lead, type="webinar_attended",
                                                                  occurred_at=now, attributes={"form": FORM})])
        await settle(dev_env, client, lead, lambda v: v.events_applied == 1 and v.profile)
        await leads.flush_audit(client, lead)

        code, out, err = await cli("export-person", lead)
        assert code == 0, err
        export = json.loads(out)
        assert export["profile"] == {"email": EMAIL, "industry": "software"}
        assert export["events"][0]["attributes"] == {"form": FORM}
        assert any(EMAIL in e["detail"] for e in export["history"])

        code, out, err = await cli("erase", lead, "--by", "mona")
        assert code == 0, err
        assert f"personal data of lead {lead} erased by mona" in out and "Temporal history: crypto-shredded" in out

        await settle(dev_env, client, lead, lambda v: "email" not in v.profile)
        code, out, err = await cli("export-person", lead)
        assert code == 0, err
        assert EMAIL not in out and FORM not in out
        assert json.loads(out)["profile"] == {"industry": "software"}
        assert [e["erased_by"] for e in json.loads(out)["erasures"]] == ["mona"]

        code, _, err = await cli("erase", "nobody-here", "--by", "mona")
        assert code == 3 and "no lead nobody-here" in err
        code, _, err = await cli("export-person", "nobody-here")
        assert code == 3


async def test_keys_new_and_rewrap(cli, monkeypatch, tmp_path):
    code, out, _ = await cli("keys", "new", "k2")
    assert code == 0
    new = out.strip()
    ring = PayloadKeyring.parse(new)
    assert ring.current == "k2" and len(ring.key("k2")) == 32
    assert (await cli("keys", "new", "bad:id"))[0] == 2

    # a store with a lead key wrapped by the old key; rotate (the new key first, the old kept), re-wrap
    store = AuditStore(f"sqlite:///{tmp_path / 'rotate.db'}")
    old = os.environ["LEADFLOW_PAYLOAD_KEYS"]
    await LeadKeys(PayloadKeyring.parse(old), store).current("L-1")
    monkeypatch.setenv("LEADFLOW_DATABASE_URL", f"sqlite:///{tmp_path / 'rotate.db'}")
    monkeypatch.setenv("LEADFLOW_PAYLOAD_KEYS", f"{new},{old}")
    code, out, err = await cli("keys", "rewrap")
    assert code == 0, err
    assert "1 lead key(s) re-wrapped with payload key 'k2'" in out
    assert [r.kek_id for r in store.lead_keys("L-1")] == ["k2"]
    assert await LeadKeys(PayloadKeyring.parse(new), store).key("L-1", 1) is not None  # the old key may go


async def test_without_payload_keys_the_cli_says_how_to_get_them(cli, monkeypatch, tmp_path):
    monkeypatch.delenv("LEADFLOW_PAYLOAD_KEYS")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(starter, "connect", __import__("config").connect)
    code, _, err = await cli("erase", "L-1", "--by", "mona")
    assert code == 2
    assert "no payload keys" in err and "LEADFLOW_PAYLOAD_KEYS" in err and "Traceback" not in err
