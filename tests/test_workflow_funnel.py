"""The lead workflow on the time-skipping server: the whole funnel, commands, duplicates."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

import client as leads
from funnel.models import (
    Accept,
    AuditKind,
    Bant,
    Close,
    LogContact,
    ProfileUpdate,
    Qualify,
    Reject,
    Reopen,
    Stage,
)
from tests.conftest import ANNA, BEN, MIA, event, running_worker, settle


@pytest.mark.parametrize("sandboxed", [False, True], ids=["as-deployed", "in-sandbox"])
async def test_first_visit_to_won(ts_env, settings, store, sandboxed):
    """The whole funnel, as the worker runs it (unsandboxed), and in Temporal's sandbox,
    which raises on any non-deterministic call in the workflow code: the guard that
    keeps workflows/lead.py sandbox-clean (see worker.build_worker)."""
    client = ts_env.client
    lead = "L-won"
    async with running_worker(client, settings, store, sandboxed=sandboxed):
        now = await ts_env.get_current_time()
        await leads.send_profile(client, settings, ProfileUpdate(update_id="p1", lead_id=lead,
                                                                  facts={"target_account": True}))
        await leads.send_events(client, settings, [
            event(lead, "1", "website_visit", now),
            event(lead, "2", "webinar_attended", now),
            event(lead, "3", "pricing_page_visit", now),
        ])
        view = await settle(ts_env, client, lead, lambda v: v.events_applied == 3)
        assert view.stage == Stage.IQL
        assert view.score["fit"] == 20 and view.score["engagement"] == 56
        assert view.channel == "website"

        await leads.send_events(client, settings, [event(lead, "4", "content_download", now),
                                                   event(lead, "5", "email_click", now),
                                                   event(lead, "6", "live_chat", now)])
        view = await settle(ts_env, client, lead, lambda v: v.owner is not None)
        assert view.stage == Stage.MQL
        assert view.score["total"] >= 100
        assert view.owner in settings.presales_team
        assert {d.name for d in view.deadlines} >= {"presales_decision", "webinar_follow_up"}

        view = await leads.run_command(client, lead, Accept(by=ANNA))
        assert view.stage == Stage.SAL
        with pytest.raises(leads.CommandRefused, match=r"BANT 2 of 4 met \(budget, need\); at least 3"):
            await leads.run_command(client, lead, Qualify(by=ANNA, bant=Bant(budget=True, need=True)))
        view = await leads.run_command(client, lead, Qualify(by=ANNA, bant=Bant(budget=True, need=True,
                                                                                  authority=True)))
        assert view.stage == Stage.SQL and view.qualified_by.startswith("bant 3/4")
        view = await leads.run_command(client, lead, LogContact(by=BEN))
        assert not view.deadlines  # first_sales_contact and webinar_follow_up met
        view = await leads.run_command(client, lead, Close(by=BEN, outcome="won"))
        assert view.stage == Stage.WON

        handle = client.get_workflow_handle(f"lead-{lead}")
        result = await handle.result()
        assert result["stage"] if isinstance(result, dict) else result.stage == Stage.WON

        with pytest.raises(leads.LeadClosed):
            await leads.send_events(client, settings, [event(lead, "7", "website_visit", now)])

    history = store.history(lead, limit=1000)
    moves = [(e.from_stage, e.to_stage, e.actor, e.trigger) for e in history if e.kind == AuditKind.STAGE_CHANGED]
    assert [(a, b) for a, b, _, _ in moves] == [
        (Stage.IQL, Stage.MQL), (Stage.MQL, Stage.SAL), (Stage.SAL, Stage.SQL), (Stage.SQL, Stage.WON)
    ]
    assert [actor for _, _, actor, _ in moves] == ["leadflow", "anna", "anna", "ben"]
    kinds = [e.kind for e in history]
    # presales_decision, presales_qualification, webinar_follow_up and first_sales_contact
    assert kinds.count(AuditKind.SLA_MET) == 4
    # an owner at every stage: presales on MQL, an account executive on SQL
    owners = [e.detail for e in history if e.kind == AuditKind.OWNER_ASSIGNED]
    assert [o.split()[-1].rstrip(")") for o in owners] == ["presales", "sales"]
    assert owners[1].split()[1] in settings.sales_team
    assert [e.seq for e in history] == list(range(1, len(history) + 1)), "audit is complete and gap-free"
    assert any(e.detail.startswith("+50 webinar_attended (event L-won-2") for e in history)
    kinds_out = {m.kind.value for m in store.pending_outbox(limit=100)}
    assert {"handover", "opportunity"} <= kinds_out


async def test_duplicates_are_applied_once_and_recorded(ts_env, settings, store):
    client = ts_env.client
    lead = "L-dup"
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        once = event(lead, "1", "newsletter_signup", now)
        await leads.send_events(client, settings, [once])
        await leads.send_events(client, settings, [once, event(lead, "2", "website_visit", now)])
        await leads.send_events(client, settings, [once])
        view = await settle(ts_env, client, lead, lambda v: v.duplicates_ignored == 2)
        assert view.events_applied == 2
        assert view.score["engagement"] == 21
        # Readable at once (the lead's tail), in the store within the audit lag.
        _, history = await leads.read_history(client, store, lead)
        assert store.count_history(lead) == 0, "score changes and duplicates wait for the next write"
        await ts_env.sleep(timedelta(seconds=settings.audit_max_lag_seconds + 1))
        for _ in range(100):
            if store.count_history(lead) == len(history):
                break
            await asyncio.sleep(0.05)
        assert store.history(lead) == history
    assert sum(1 for e in history if e.kind == AuditKind.DUPLICATE_IGNORED) == 2
    assert sum(1 for e in history if e.kind == AuditKind.SCORE_CHANGED and e.event_id == f"{lead}-1") == 1


async def test_refused_commands_write_nothing(ts_env, settings, store):
    client = ts_env.client
    lead = "L-refused"
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        await leads.send_events(client, settings, [event(lead, "1", "website_visit", now)])
        await settle(ts_env, client, lead, lambda v: v.events_applied == 1)
        before = store.count_history(lead)
        with pytest.raises(leads.CommandRefused, match="cannot accept lead L-refused: it is iql, not mql"):
            await leads.run_command(client, lead, Accept(by=ANNA))
        with pytest.raises(leads.CommandRefused, match="it is iql"):
            await leads.run_command(client, lead, Close(by=BEN, outcome="won"))
        with pytest.raises(leads.LeadNotFound):
            await leads.run_command(client, "L-nobody", Accept(by=ANNA))
        view = await leads.get_view(client, lead)
        assert view.stage == Stage.IQL
        assert store.count_history(lead) == before
        # the workflow is still healthy and takes the next event
        await leads.send_events(client, settings, [event(lead, "2", "demo_request", now)])
        view = await settle(ts_env, client, lead, lambda v: v.stage == Stage.MQL)


async def test_disqualify_then_manager_reopens(ts_env, settings, store):
    client = ts_env.client
    lead = "L-disq"
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        await leads.send_events(client, settings, [event(lead, "1", "demo_request", now)])
        await settle(ts_env, client, lead, lambda v: v.stage == Stage.MQL)
        view = await leads.run_command(client, lead, Reject(by=ANNA, reason="competitor"))
        assert view.stage == Stage.DISQUALIFIED
        with pytest.raises(leads.CommandRefused, match="role presales may not; allowed: manager"):
            await leads.run_command(client, lead, Reopen(by=ANNA, reason="mistake"))
        view = await leads.run_command(client, lead, Reopen(by=MIA, reason="misjudged"))
        assert view.stage == Stage.RECYCLED
    moves = [e for e in store.history(lead) if e.kind == AuditKind.STAGE_CHANGED]
    assert [(m.to_stage, m.actor, m.reason) for m in moves[1:]] == [
        (Stage.DISQUALIFIED, "anna", "competitor"), (Stage.RECYCLED, "mia", "misjudged")
    ]
