"""`leadflow import` of last year's history against the dev server: it scores, but pages nobody.

The CLI runs in a thread with its own event loop (as the command would), the worker in the
test's (the `cli` fixture of tests/conftest.py). A lead in the same file with a
fresh demo request is the control: it is handed over, so the absence of messages for the old
history is not just messages not written yet.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta

import client as leads
from funnel.models import OutboundKind, Stage
from tests.conftest import running_worker, settle


def line(event_id: str, lead_id: str, type_: str, at, **more) -> str:
    return json.dumps({"event_id": event_id, "lead_id": lead_id, "type": type_, "occurred_at": at.isoformat(),
                       **more})


async def outbox_until(store, lead_id: str, until, tries: int = 200) -> list:
    for _ in range(tries):
        messages = store.outbox_of(lead_id)
        if until(messages):
            return messages
        await asyncio.sleep(0.05)
    raise AssertionError(f"outbox of {lead_id} never got there; last: {messages}")


async def test_importing_last_years_history_scores_but_pages_nobody(dev_env, settings, store, cli, tmp_path):
    old, fresh = f"B-{uuid.uuid4().hex[:6]}", f"F-{uuid.uuid4().hex[:6]}"
    client = dev_env.client
    now = await dev_env.get_current_time()
    year_ago = now - timedelta(days=400)
    path = tmp_path / "last-year.jsonl"
    path.write_text("\n".join([
        # the format `leadflow events export` writes: a profile line, then events (received_at is informational)
        json.dumps({"update_id": f"{old}-p", "lead_id": old, "observed_at": year_ago.isoformat(),
                    "facts": {"target_account": True, "company_size": 250, "industry": "software",
                              "seniority": "vp", "country": "DE"},
                    "received_at": year_ago.isoformat()}),
        line(f"{old}-w", old, "webinar_attended", year_ago, channel="webinar", received_at=year_ago.isoformat()),
        line(f"{old}-d", old, "demo_request", year_ago + timedelta(hours=1)),
        line(f"{old}-s", old, "sample_request", year_ago + timedelta(hours=2)),
        line(f"{old}-e", old, "event_attended", year_ago + timedelta(days=1)),
        line(f"{fresh}-d", fresh, "demo_request", now - timedelta(hours=1)),  # the control: news
    ]) + "\n", encoding="utf-8")

    async with running_worker(client, settings, store):
        code, out, err = await cli("import", str(path))
        assert code == 0, err
        assert "sent 5 event(s) and 1 profile update(s) for 2 lead(s)" in out

        # The control is handed over: messages of this import do reach the outbox.
        await outbox_until(store, fresh, lambda ms: any(m.kind == OutboundKind.HANDOVER for m in ms))
        view = await settle(dev_env, client, old, lambda v: v.events_applied == 4 and v.profile
                            and v.decision_due_at is None)
        await leads.flush_audit(client, old)

        # It scored (fit, and the old events, decayed) ...
        code, out, err = await cli("show", old, "--json")
        assert code == 0, err
        shown = json.loads(out)
        breakdown = shown["score"]["breakdown"]
        assert {"demo_request", "webinar_attended", "sample_request", "event_attended"} <= set(breakdown)
        assert breakdown["decay"] < 0 and shown["score"]["fit"] == 60
        # ... but nobody was paged: no MQL, no owner, no handover, no escalation, no open deadline.
        assert shown["stage"] == Stage.IQL.value and shown["owner"] is None
        assert [v["stage"] for v in shown["history"]] == ["iql"]
        assert shown["deadlines"] == []
        kinds = [m.kind for m in store.outbox_of(old)]
        assert OutboundKind.HANDOVER not in kinds and OutboundKind.ESCALATION not in kinds
        assert view.owner is None

        # The history says why.
        code, out, err = await cli("history", old, "--json", "--limit", "200")
        assert code == 0, err
        history = json.loads(out)
        by_kind = {}
        for entry in history:
            by_kind.setdefault(entry["kind"], []).append(entry)
        [not_handed] = by_kind["not_handed_over"]
        assert not_handed["reason"] == "backfill" and not_handed["event_id"] == f"{old}-d"
        assert not_handed["detail"].endswith("is older than 1w when it arrived: scored, not fast-tracked")
        [late] = by_kind["sla_late_data"]  # the webinar follow-up was due a year ago: late data
        assert late["rule"] == "webinar_follow_up" and late["detail"].endswith("(late data); not escalated")
        assert "sla_breached" not in by_kind and "stage_changed" not in by_kind and "sla_set" not in by_kind

        # A second run of the same file changes nothing (the ids are known): still nobody paged.
        code, out, err = await cli("import", str(path))
        assert code == 0, err
        assert "already taken" in out
        kinds = [m.kind for m in store.outbox_of(old)]
        assert OutboundKind.HANDOVER not in kinds and OutboundKind.ESCALATION not in kinds
