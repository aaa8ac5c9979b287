"""Buying teams: accounts scored from their contacts (funnel/accounts.py), in the core and
through the lead and account workflows, the API and the CLI."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from config import DEFAULT_MODEL
from funnel.accounts import Account, AccountStage, ContactSnapshot, account_of, contact_snapshots
from funnel.models import OutboundKind
from funnel.scoring_model import load_model
import client as leads
from tests.conftest import running_worker, until
from tests.test_api import api_over_worker, ev, view_when

MODEL = load_model(DEFAULT_MODEL)  # [account]: threshold 120, 2 roles, best 3 contacts; target account +20
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)


def snap(lead: str, seq: int, engagement: float, role: str | None = None, stage: str = "iql",
         facts: dict | None = None, account: str = "acme-gmbh.de", left: bool = False) -> ContactSnapshot:
    return ContactSnapshot(lead_id=lead, account_id=account, seq=seq, at=T0 + timedelta(minutes=seq),
                           stage=stage, score=engagement, engagement=engagement, role=role, facts=facts or {},
                           facts_at=T0 + timedelta(minutes=seq) if facts else None, left=left)


# --------------------------------------------------------------------------- membership

@pytest.mark.parametrize("profile, account", [
    ({"email": "erika@Acme-GmbH.de"}, "acme-gmbh.de"),
    ({"email": "erika@acme-gmbh.de", "account_id": "crm-4711"}, "crm-4711"),  # the explicit id wins
    ({"email": "erika@gmail.com"}, None),  # a public mail domain names no company
    ({"email": "max@web.de"}, None),
    ({"email": "not an address"}, None),
    ({"company": "Acme"}, None),
    ({"account_id": "has spaces"}, None),
])
def test_a_lead_belongs_to_an_account_by_its_id_or_company_domain(profile, account):
    assert account_of(profile) == account


# --------------------------------------------------------------------------- the rules

def test_two_contacts_make_an_mqa_that_neither_makes_alone():
    decision_maker = snap("L-a", 3, 50, "decision_maker", facts={"target_account": True})
    champion = snap("L-b", 4, 50, "champion")
    for alone in (decision_maker, champion):
        account = Account.create("acme-gmbh.de", T0)
        account.apply(alone, MODEL, T0)
        assert account.state.stage is AccountStage.ENGAGED and account.take_outbound() == []
    assert Account.create("x", T0).state.score == 0
    account = Account.create("acme-gmbh.de", T0)
    account.apply(decision_maker, MODEL, T0)
    assert (account.state.score, account.state.roles) == (70, ["decision_maker"])  # fit 20 + 50
    account.apply(champion, MODEL, T0)
    s = account.state
    assert (s.stage, s.score, s.fit, s.engagement, s.roles) == (AccountStage.MQA, 120, 20, 100,
                                                                ["champion", "decision_maker"])
    (handover,) = account.take_outbound()
    assert handover.kind is OutboundKind.ACCOUNT_HANDOVER and handover.assign_to == "sales"
    assert [c["lead_id"] for c in handover.payload["contacts"]] == ["L-a", "L-b"]
    # Handed over once: more engagement changes the score, not the stage, and sends nothing.
    account.apply(snap("L-c", 5, 30, "user"), MODEL, T0)
    assert account.state.stage is AccountStage.MQA and account.take_outbound() == []
    assert [e.kind for e in account.state.history] == ["contact", "contact", "mqa", "contact"]


def test_only_the_best_contacts_and_active_engaged_roles_count():
    account = Account.create("acme-gmbh.de", T0)
    for i, engagement in enumerate([10, 40, 30, 20]):
        account.apply(snap(f"L-{i}", 1, engagement, "user"), MODEL, T0)
    assert account.state.engagement == 90  # best 3 of 4
    account.apply(snap("L-x", 1, 0, "decision_maker"), MODEL, T0)  # not engaged: its role does not count
    account.apply(snap("L-y", 1, 60, "purchasing", stage="disqualified"), MODEL, T0)  # out of the running
    account.apply(snap("L-z", 1, 60, "ceo"), MODEL, T0)  # not a buying-team role of the model
    assert account.state.roles == ["user"]
    assert account.state.stage is AccountStage.ENGAGED


def test_a_contact_that_leaves_no_longer_counts_and_late_news_of_it_changes_nothing():
    """A lead whose facts now name another company (or none) tells its old account it left:
    its engagement and role stop counting there, a handover already made stays made, and a
    snapshot older than the departure (a retry delivered late) does not bring it back."""
    account = Account.create("acme-gmbh.de", T0)
    account.apply(snap("L-a", 3, 50, "decision_maker", facts={"target_account": True}), MODEL, T0)
    account.apply(snap("L-b", 4, 50, "champion"), MODEL, T0)
    assert account.state.stage is AccountStage.MQA
    assert account.apply(snap("L-b", 6, 50, "champion", left=True), MODEL, T0)
    s = account.state
    assert (s.score, s.engagement, s.roles, sorted(s.contacts)) == (70, 50, ["decision_maker"], ["L-a"])
    assert s.stage is AccountStage.MQA  # handed over once: leaving does not take it back
    assert s.history[-1].detail == "L-b left the account" and s.history[-1].lead_id == "L-b"
    assert not account.apply(snap("L-b", 5, 80, "champion"), MODEL, T0)  # older than its departure
    assert not account.apply(snap("L-b", 6, 80, "champion"), MODEL, T0)  # as old: the departure is newer
    assert not account.apply(snap("L-c", 2, 10, left=True), MODEL, T0)  # never a contact: nothing to drop
    assert "L-c" not in s.contacts and s.score == 70
    assert account.apply(snap("L-b", 9, 30, "champion"), MODEL, T0)  # back, later: counts again
    assert (s.score, s.roles, s.departed) == (100, ["champion", "decision_maker"], {"L-c": 2})


def test_an_account_on_another_model_version_says_so_and_applies_its_rules():
    from funnel.scoring_model import parse_model

    lower = parse_model(DEFAULT_MODEL.read_text().replace('version = "1"', 'version = "2"', 1)
                        + "\n[account]\nthreshold = 60\n", "v2.toml")
    account = Account.create("acme-gmbh.de", T0)
    account.use_model(MODEL, T0)
    account.apply(snap("L-a", 3, 50, "decision_maker", facts={"target_account": True}), MODEL, T0)
    account.apply(snap("L-b", 4, 1, "champion"), MODEL, T0)
    assert (account.state.score, account.state.stage) == (71, AccountStage.ENGAGED)
    account.use_model(MODEL, T0)  # the same version again (a new run): nothing to say
    assert [e.kind for e in account.state.history] == ["contact", "contact"]
    account.use_model(lower, T0)
    assert [e.detail for e in account.state.history[-2:]] == [
        "scoring model default@1 \u2192 default@2: 71 \u2192 71",
        "marketing-qualified account: score 71 >= 60, roles champion, decision_maker (2 >= 2)"]
    assert account.state.model_ref == "default@2"


@pytest.mark.parametrize("fed, email, told", [
    (None, "erika@acme-gmbh.de", [("acme-gmbh.de", False)]),  # a first snapshot
    ("acme-gmbh.de", "erika@acme-gmbh.de", [("acme-gmbh.de", False)]),  # stays
    ("acme-gmbh.de", "erika@globex.com", [("acme-gmbh.de", True), ("globex.com", False)]),  # moved
    ("acme-gmbh.de", "erika@gmail.com", [("acme-gmbh.de", True)]),  # no company any more
    (None, "erika@gmail.com", []),  # never in one
])
def test_a_lead_tells_the_account_it_left_before_the_one_it_joined(fed, email, told):
    out = contact_snapshots("L-1", {"email": email}, {}, "iql", 40.0, 30.0, 7, MODEL, T0, fed)
    assert [(s.account_id, s.left) for s in out] == told
    assert all(s.seq == 7 and s.lead_id == "L-1" for s in out)


@hsettings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["L-a", "L-b", "L-c", "L-d"]), st.integers(1, 6),
                          st.floats(0, 80, allow_nan=False).map(lambda x: round(x, 1)),
                          st.sampled_from([None, "decision_maker", "champion", "user"]),
                          st.sampled_from(["iql", "mql", "disqualified"]), st.booleans(),
                          st.sampled_from([False, False, False, True])),
                min_size=1, max_size=12),
       st.randoms(use_true_random=False))
def test_order_and_repetition_of_snapshots_never_change_the_account(items, rnd):
    """Each lead's newest snapshot (by seq) is what counts, whatever order or how often they
    arrive: the account's score, roles and stage are a function of its contacts' latest state.
    A lead whose newest word is that it left is no contact at all."""
    snaps, seen = [], set()
    for lead, seq, engagement, role, stage, target, left in items:
        if (lead, seq) in seen:
            continue  # one snapshot per (lead, seq), as a lead sends them
        seen.add((lead, seq))
        snaps.append(snap(lead, seq, engagement, role, stage, facts={"target_account": target}, left=left))

    def final(order):
        account = Account.create("acme-gmbh.de", T0)
        for s in order:
            account.apply(s, MODEL, T0)
        st_ = account.state
        return st_.score, st_.fit, st_.roles, st_.stage

    shuffled = list(snaps) + list(snaps)  # delivered twice
    rnd.shuffle(shuffled)
    newest = {}
    for s in sorted(snaps, key=lambda s: s.seq):
        newest[s.lead_id] = s
    in_order = final(sorted(snaps, key=lambda s: s.seq))
    members = [s for s in newest.values() if not s.left]
    assert final(shuffled)[:3] == in_order[:3] == final(members)[:3]
    # The stage may differ only where a path went through an MQA (kept once reached) that the
    # final contacts do not make; when the final contacts make one, every order ends in one.
    score, _, roles, _ = in_order
    if score >= MODEL.account.threshold and len(roles) >= MODEL.account.min_roles:
        assert final(shuffled)[3] is final(members)[3] is in_order[3] is AccountStage.MQA


# --------------------------------------------------------------------------- through the workflows and the API

async def test_two_leads_of_one_target_account_make_an_mqa_through_the_api(dev_env, settings, store, capsys):
    domain = f"acme-{uuid.uuid4().hex[:6]}.de"
    async with api_over_worker(dev_env, settings, store) as api:
        mautic, ben = api.as_("mautic"), api.as_("ben")
        t = datetime.now(timezone.utc) - timedelta(minutes=10)
        first, second = f"A-{uuid.uuid4().hex[:6]}", f"B-{uuid.uuid4().hex[:6]}"
        r = await mautic.post(f"/leads/{first}/profile", json={"facts": {
            "email": f"erika@{domain}", "role": "decision_maker", "target_account": True}})
        assert r.status_code == 202, r.text
        assert (await mautic.post("/events", json=ev(f"{first}-1", first, "webinar_attended", t))
                ).status_code == 202
        account = await until(lambda: ben.get(f"/accounts/{domain}"),
                              lambda r: r.status_code == 200 and r.json()["score"] == 70)
        assert account.json()["stage"] == "engaged" and account.json()["roles"] == ["decision_maker"]
        lead = await view_when(ben, first, lambda v: v["score"]["engagement"] == 50)
        assert lead["stage"] == "iql"  # and the lead alone is no MQL either
        r = await mautic.post(f"/leads/{second}/profile", json={"facts": {
            "email": f"max@{domain}", "role": "champion"}})
        assert (await mautic.post("/events", json=ev(f"{second}-1", second, "webinar_attended", t))
                ).status_code == 202
        mqa = await until(lambda: ben.get(f"/accounts/{domain}"),
                          lambda r: r.status_code == 200 and r.json()["stage"] == "mqa"
                          and r.json()["owner"] is not None)
        body = mqa.json()
        assert (body["score"], body["roles"]) == (120, ["champion", "decision_maker"])
        assert body["owner"] in settings.sales_team
        assert sorted(c["lead_id"] for c in body["contacts"]) == sorted([first, second])
        assert "email" not in str(body)  # an account carries no personal data
        (handover,) = [m for m in store.outbox_of(f"account-{domain}")]
        assert handover.kind is OutboundKind.ACCOUNT_HANDOVER and handover.payload["owner"] == body["owner"]
        summary = store.account_summary()
        assert (summary.accounts, summary.contacts, summary.multi_contact_accounts, summary.mqa) == (1, 2, 1, 1)
        import json
        import subprocess
        from tests.test_cli_process import cli_env, leadflow
        done = subprocess.run(leadflow("report", "--json"), env=cli_env(LEADFLOW_DATABASE_URL=settings.database_url),
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["accounts"] == {"accounts": 1, "contacts": 2, "mqa": 1, "mqa_rate": 1.0,
                                                       "multi_contact_accounts": 1}
        listed = (await ben.get("/accounts", params={"limit": 100})).json()["accounts"]
        assert domain in [a["account_id"] for a in listed]
        assert (await ben.get("/accounts/no-such.example")).status_code == 404
        import starter
        import os
        os.environ["TEMPORAL_ADDRESS"] = dev_env.client.service_client.config.target_host
        os.environ["LEADFLOW_TASK_QUEUE"] = settings.task_queue
        try:
            code = await starter.cmd_account(type("A", (), {"account": domain, "json": False})(), settings)
        finally:
            del os.environ["TEMPORAL_ADDRESS"], os.environ["LEADFLOW_TASK_QUEUE"]
        out = capsys.readouterr().out
        assert code == 0 and f"account {domain}: mqa" in out and "roles champion, decision_maker" in out
        os.environ["TEMPORAL_ADDRESS"] = dev_env.client.service_client.config.target_host
        try:  # the list, as GET /accounts
            code = await starter.cmd_accounts(type("A", (), {"limit": 100, "json": True})(), settings)
        finally:
            del os.environ["TEMPORAL_ADDRESS"]
        listing = json.loads(capsys.readouterr().out)
        assert code == 0 and listing["total"] >= 1 and listing["mqa"] >= 1
        (mine,) = [a for a in listing["accounts"] if a["account_id"] == domain]
        assert mine["stage"] == "mqa" and len(mine["contacts"]) == 2 and "history" not in mine


@pytest.mark.parametrize("version", [6, 7])
async def test_leads_feed_their_account_from_version_7(ts_env, settings, store, version):
    """Runs started by older code do not (an added activity would not replay); a lead
    without an account never does."""
    from funnel.models import ProfileUpdate
    from tests.conftest import event, scheduled_activities, settle
    from workflows.lead import LeadWorkflow, workflow_id
    from workflows.lead_input import LeadInput

    client = ts_env.client
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        histories = {}
        for lead, facts in ((f"F{version}", {"email": "erika@acme-gmbh.de", "role": "user"}),
                            (f"N{version}", {"email": "erika@gmail.com"})):
            await client.start_workflow(
                LeadWorkflow.run, LeadInput(lead_id=lead, version=version, model=MODEL),
                id=workflow_id(lead), task_queue=settings.task_queue, start_signal="profile",
                start_signal_args=[ProfileUpdate(update_id="p1", lead_id=lead, facts=facts)])
            await client.get_workflow_handle(workflow_id(lead)).signal(
                "events", [event(lead, "1", "webinar_attended", now)])
            await settle(ts_env, client, lead, lambda v: v.events_applied == 1)
            histories[lead] = await client.get_workflow_handle(workflow_id(lead)).fetch_history()
    fed = {lead: scheduled_activities(h).count("feed_account") for lead, h in histories.items()}
    assert fed[f"N{version}"] == 0
    assert (fed[f"F{version}"] >= 1) == (version >= 7)


async def test_feeding_an_account_writes_its_membership_only_when_new_or_its_role_changed(ts_env, settings, store):
    """A busy account member feeds its account often; the membership row (for the report)
    is written once, and again only when the lead's role changes."""
    from datetime import datetime, timezone

    from temporalio.testing import ActivityEnvironment

    from activities.account_activities import AccountActivities
    from funnel.accounts import ContactSnapshot

    writes = []
    note = store.note_account_member
    store.note_account_member = lambda *args: (writes.append(args[:3]), note(*args))[1]
    acts = AccountActivities(ts_env.client, settings, store)
    at = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)

    def snapshot(seq: int, role: str | None, left: bool = False) -> ContactSnapshot:
        return ContactSnapshot(lead_id="L-feed", account_id="feed.example", seq=seq, at=at, stage="iql",
                               score=10.0 * seq, engagement=10.0 * seq, role=role, left=left)

    env = ActivityEnvironment()
    for seq, role in [(1, "user"), (2, "user"), (3, "user"), (4, "champion"), (5, "champion")]:
        await env.run(acts.feed_account, snapshot(seq, role))
    assert writes == [("feed.example", "L-feed", "user"), ("feed.example", "L-feed", "champion")]
    summary = store.account_summary()
    assert (summary.accounts, summary.contacts) == (1, 1)
    # It left (twice: a retried departure), then came back: the row goes, and comes again.
    await env.run(acts.feed_account, snapshot(6, "champion", left=True))
    await env.run(acts.feed_account, snapshot(6, "champion", left=True))
    assert (store.account_summary().accounts, store.account_summary().contacts) == (0, 0)
    await env.run(acts.feed_account, snapshot(7, "champion"))
    assert writes[-1] == ("feed.example", "L-feed", "champion") and len(writes) == 3
    assert store.account_summary().contacts == 1


async def test_a_lead_that_changes_company_leaves_its_old_account_and_a_won_lead_tells_its_account(
        dev_env, settings, store):
    """Version 9: a lead whose e-mail names another company (or none) is dropped by its old
    account and its membership row goes (the report no longer counts it there), after a
    continue-as-new too; a won lead ends only once its account has heard that it was won."""
    from funnel.models import Accept, Bant, Close, LogContact, ProfileUpdate, Qualify
    from tests.conftest import ANNA, BEN, account_when, event, settle
    from workflows.lead import workflow_id

    client, model = dev_env.client, MODEL
    tag = uuid.uuid4().hex[:6]
    acme, globex = f"acme-{tag}.de", f"globex-{tag}.com"
    mover, stayer = f"MV-{tag}", f"ST-{tag}"
    t = datetime.now(timezone.utc) - timedelta(minutes=10)

    async def profile(lead: str, n: int, **facts) -> None:
        await leads.send_profile(client, settings, ProfileUpdate(update_id=f"p{n}", lead_id=lead, facts=facts), model)

    def contacts(view) -> dict[str, str]:
        return {c.lead_id: c.stage for c in view.contacts}

    async with running_worker(client, settings, store):
        await profile(mover, 1, email=f"erika@{acme}", role="decision_maker")
        await profile(stayer, 1, email=f"max@{acme}", role="champion")
        await leads.send_events(client, settings, [event(stayer, "1", "webinar_attended", t)], model)
        handle = client.get_workflow_handle(workflow_id(mover))
        first_run = (await handle.describe()).run_id
        for i in range(12):  # the dev server suggests continue-as-new after 40 history events
            await leads.send_events(client, settings, [event(mover, str(i), "website_visit", t)], model)
            await settle(dev_env, client, mover, lambda v, n=i + 1: v.events_applied == n)
        assert (await handle.describe()).run_id != first_run  # it moves in a later run
        await account_when(client, acme, lambda v: set(contacts(v)) == {mover, stayer})

        await profile(mover, 2, email=f"erika@{globex}", role="decision_maker")
        view = await account_when(client, acme, lambda v: set(contacts(v)) == {stayer})
        assert view.history[-1].detail == f"{mover} left the account" and view.roles == ["champion"]
        await account_when(client, globex, lambda v: set(contacts(v)) == {mover})
        assert store.account_summary().contacts == 2  # one in each: the acme row went

        await profile(mover, 3, email="erika@gmail.com")  # no company any more
        await account_when(client, globex, lambda v: contacts(v) == {})
        assert store.account_summary().contacts == 1

        await leads.send_events(client, settings, [event(stayer, "2", "demo_request", t)], model)
        await settle(dev_env, client, stayer, lambda v: v.owner is not None)
        await leads.run_command(client, stayer, Accept(by=ANNA))
        await leads.run_command(client, stayer, Qualify(by=ANNA, bant=Bant(budget=True, need=True, timing=True)))
        await leads.run_command(client, stayer, LogContact(by=BEN))
        await leads.run_command(client, stayer, Close(by=BEN, outcome="won"))
        await client.get_workflow_handle(workflow_id(stayer)).result()
        await account_when(client, acme, lambda v: contacts(v) == {stayer: "won"})
