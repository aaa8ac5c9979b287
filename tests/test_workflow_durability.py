"""Durability on the real dev server: continue-as-new in the middle of a burst of
activity, a worker restart in the middle of a lead's life, and replay of saved
histories (so a change to workflow code that would break running leads fails here).
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from temporalio import activity
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

import client as leads
from activities.lead_activities import LeadActivities
from config import DEFAULT_MODEL, Settings
from funnel.models import Accept, AuditBatch, AuditEntry, AuditKind, Outbound, ProfileUpdate, Stage
from funnel.scoring_model import load_model
from tests.conftest import (
    ANNA,
    event,
    history_kinds,
    running_worker,
    scheduled_activities,
    settle,
)
from workflows.lead import LeadWorkflow, workflow_id

HISTORIES = Path(__file__).parent / "histories"


async def runs_of(client, lead: str, at_least: int = 1) -> list:
    """The lead's runs; visibility is eventually consistent, so give it a few seconds."""
    for _ in range(100):
        runs = [w async for w in client.list_workflows(f"WorkflowId = '{workflow_id(lead)}'")]
        if len(runs) >= at_least:
            break
        await asyncio.sleep(0.1)
    return runs


async def test_continue_as_new_mid_activity_keeps_state_and_audit(dev_env, settings, store):
    """The dev server suggests continue-as-new after 40 history events; 120 events
    in 60 concurrent signals (60 history events however the worker batches them)
    cross that at least once."""
    client, lead = dev_env.client, "D-can"
    async with running_worker(client, settings, store):
        now = await dev_env.get_current_time()
        await leads.send_profile(client, settings, ProfileUpdate(update_id="p1", lead_id=lead,
                                                                  facts={"target_account": True}))
        batches = [[event(lead, f"{b}-{i}", "email_open", now) for i in range(2)] for b in range(60)]
        await asyncio.gather(*(leads.send_events(client, settings, batch) for batch in batches))
        view = await settle(dev_env, client, lead, lambda v: v.events_applied == 120, tries=300)
        runs = await runs_of(client, lead, at_least=2)
        assert len(runs) >= 2, "the burst crossed a continue-as-new"
        # a redelivery of an event from the first run is still recognised after continue-as-new
        await leads.send_events(client, settings, [event(lead, "0-0", "email_open", now)])
        view = await settle(dev_env, client, lead, lambda v: v.duplicates_ignored == 1)
        assert view.score["fit"] == 20
        assert view.score["engagement"] == 20  # email_open capped at 20
        assert view.events_applied == 120
        # Score changes reach the store (and LeadScore) within the audit lag: write now.
        await leads.flush_audit(client, lead)
        # listed once by stage (closed runs left by continue-as-new are not), with its score
        for _ in range(50):
            listed = [x for x in await leads.list_leads(client, stage="iql") if x.lead_id == lead]
            if listed and listed[0].score == 40:
                break
            await asyncio.sleep(0.1)
        assert [(x.stage, x.score, x.channel) for x in listed] == [("iql", 40.0, "website")]
        assert not [x for x in await leads.list_leads(client, stage="mql") if x.lead_id == lead]
    history = store.history(lead, limit=10_000)
    assert [e.seq for e in history] == list(range(1, len(history) + 1)), "no gap, no duplicate across runs"
    scored = [e for e in history if e.kind == AuditKind.SCORE_CHANGED and e.rule == "email_open"]
    assert round(sum(e.points for e in scored), 2) == 20  # the cap, however the batches interleaved


async def test_worker_restart_mid_life(dev_env, tmp_path):
    """Stop the worker with a lead waiting on a timer and events in flight; a new
    worker picks up where the old one stopped: nothing lost, nothing twice."""
    fast_model = tmp_path / "fast.toml"
    fast_model.write_text(
        DEFAULT_MODEL.read_text().replace('after = "1d"\n', 'after = "3s"\n', 1)
    )
    settings = Settings(task_queue=f"restart-{tmp_path.name}", database_url=f"sqlite:///{tmp_path / 'audit.db'}",
                        model_path=fast_model)
    from activities.store import AuditStore

    store = AuditStore(settings.database_url)
    client, lead = dev_env.client, "D-restart"
    now = await dev_env.get_current_time()
    async with running_worker(client, settings, store):
        await leads.send_events(client, settings, [event(lead, "1", "website_visit", now)])
        view = await settle(dev_env, client, lead, lambda v: v.events_applied == 1)
        assert view.next_nurture_step["step"] == "welcome"
    # no worker: the nurture timer (3 s) fires unattended, then events queue up in Temporal
    await asyncio.sleep(4)
    now = await dev_env.get_current_time()
    await leads.send_events(client, settings, [event(lead, "2", "demo_request", now),
                                               event(lead, "3", "website_visit", now)])
    async with running_worker(client, settings, store):
        view = await settle(dev_env, client, lead, lambda v: v.owner is not None, tries=100)
        assert view.events_applied == 3
        assert view.stage == Stage.MQL
        view = await leads.run_command(client, lead, Accept(by=ANNA))
        assert view.stage == Stage.SAL
    history = store.history(lead, limit=1000)
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    assert [e.detail for e in history if e.kind == AuditKind.NURTURE_STEP_SENT] == ["nurture iql step welcome"]


def saved_histories() -> list[Path]:
    return sorted(HISTORIES.glob("*.json"))


def test_there_are_saved_histories_to_replay():
    assert len(saved_histories()) >= 2


@pytest.mark.parametrize("path", saved_histories(), ids=lambda p: p.stem)
async def test_replay_saved_history(path: Path, converter):
    """Histories recorded by tests/histories/record.py from earlier code must replay, through the
    encrypting converter too (their payloads predate encryption: it passes them through):
    leads (R-*, the R-acct-* ones feeding their account) and accounts (A-*)."""
    from workflows.account import AccountWorkflow

    history = WorkflowHistory.from_json(path.stem, json.loads(path.read_text()))
    replayer = Replayer(workflows=[LeadWorkflow, AccountWorkflow], data_converter=converter)
    await asyncio.wait_for(replayer.replay_workflow(history), timeout=60)


async def test_replay_detects_a_changed_workflow(converter):
    """The replay test above can fail: a workflow that decides differently is caught."""
    path = next(p for p in saved_histories() if p.name.startswith("R-"))
    history = WorkflowHistory.from_json(path.stem, json.loads(path.read_text()))
    from tests import changed_workflow

    replayer = Replayer(workflows=[changed_workflow.LeadWorkflow], data_converter=converter)
    with pytest.raises(Exception, match="[Nn]ondetermin"):
        await replayer.replay_workflow(history)



@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13])
async def test_run_version_decides_how_the_lead_behaves(ts_env, settings, store, version):
    """Leads started by older code keep replaying their way. Version 1: the model by a
    regular activity. Version 2: by local activity (a marker, no round trip), handover and
    owner in one activity, decisions at once. Version 3 (what callers start now): the model
    by a regular activity again (a local one replayed differently after a cache eviction),
    the owner is assigned by its own activity before the handover is posted, and decisions
    wait for the lead's decision delay. Version 4 (what callers start now): a quiet event's
    score change reaches the store through the worker's sweeper, without a lag timer or a
    write in the lead (versions 2 and 3 start a lag timer; 1 writes at once). Version 5: a
    new lead given the active model starts on it without reading it (older ones read it
    anyway). Version 6: the lead's creation time is a search attribute as well. Version 7: a
    lead in an account feeds it (test_accounts.py). Version 8: the
    lead writes the input it took to the store's event log with its audit, so the log is
    whole though nobody else logged it (these events come straight from the client, as
    when the API's own log write fails); without holding a write back for it. Version 9:
    a lead that leaves its account tells it (test_accounts.py). Version 10: the handover's
    owner comes back with the write of the stage change, in one activity, and the stage and
    owner reach visibility in one upsert. Version 11: a lead started
    with search attributes upserts only what differs from them (started here without any, it
    upserts every one it has a value for: test_lead_start_attributes.py has the rest).
    Version 12: a lead woken after a quiet spell with a long run continues as new
    (test_workflow_quiet_continue.py; nothing here is quiet or long). Version 13 (what callers
    start now): a contact meets the follow-up of an event that arrives after it
    (test_lead_event_time.py; nothing here arrives late). All score alike."""
    from workflows.lead_input import CURRENT_VERSION, LeadInput

    client, lead = ts_env.client, f"V{version}"
    assert CURRENT_VERSION == 13
    given = load_model(settings.model_path)
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        await client.start_workflow(
            LeadWorkflow.run, LeadInput(lead_id=lead, version=version, decision_delay_seconds=5, model=given),
            id=workflow_id(lead), task_queue=settings.task_queue, start_signal="events",
            start_signal_args=[[event(lead, "1", "webinar_attended", now), event(lead, "2", "demo_request", now)]],
        )
        view = await settle(ts_env, client, lead, lambda v: v.owner is not None)
        assert view.score["engagement"] == 150
        entered_mql = view.history[-1].entered_at
        handle = client.get_workflow_handle(workflow_id(lead))
        await leads.flush_audit(client, lead)
        before = await handle.fetch_history()
        await leads.send_events(client, settings, [event(lead, "3", "email_open", now)])  # lag 30 s (LeadInput)
        await settle(ts_env, client, lead, lambda v: v.events_applied == 3)
        await asyncio.sleep(1.5)  # a sweep
        history = await handle.fetch_history()
        quiet_timers = history_kinds(history).count("timer_started") - history_kinds(before).count("timer_started")
        quiet_writes = (scheduled_activities(history).count("record_audit")
                        - scheduled_activities(before).count("record_audit"))
        stored = store.count_history(lead)
        total, _ = await leads.read_history(client, store, lead)
        await leads.flush_audit(client, lead)
        logged = [row.event_id for row in store.event_log(lead)]
    # (v1 waits with a timeout: a timer per signal)
    assert (quiet_timers, quiet_writes) == {1: (1, 1), 2: (1, 0), 3: (1, 0), 4: (0, 0), 5: (0, 0), 6: (0, 0), 7: (0, 0),
                                            8: (0, 0), 9: (0, 0), 10: (0, 0), 11: (0, 0), 12: (0, 0),
                                            13: (0, 0)}[version]
    assert (stored == total) == (version != 2 and version != 3)  # written at once, or swept; 2 and 3 wait 30 s
    assert sorted(logged) == ([f"{lead}-1", f"{lead}-2", f"{lead}-3"] if version >= 8 else [])
    activities = scheduled_activities(history)
    assert ("load_scoring_model" in activities) == (version in (1, 3, 4))
    upserted = {name for e in history.events if e.HasField("upsert_workflow_search_attributes_event_attributes")
                for name in e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields}
    assert ("LeadCreated" in upserted) == (version >= 6)
    assert ("marker_recorded" in history_kinds(history)) == (version == 2)
    assert ("hand_over" in activities) == (version < 3)
    assert ("assign_owner" in activities) == (3 <= version < 10)
    assert ("record_audit_and_assign" in activities) == (version >= 10)
    assert "record_audit" in activities
    # v10: the handover's stage and its owner reach visibility in one upsert; v9 upserts the
    # stage, then the owner once its own activity is back (after the first upsert, the lead's
    # start: v11 leaves out there an owner it never had, older versions unset it)
    upserts = [set(e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields)
               for e in history.events if e.HasField("upsert_workflow_search_attributes_event_attributes")]
    if version >= 9:
        assert any("LeadStage" in names and "LeadOwner" not in names for names in upserts[1:]) == (version == 9)
    delay = (entered_mql - view.history[0].entered_at).total_seconds()
    assert delay >= 5 if version >= 3 else delay < 5


async def test_callers_start_leads_at_the_current_version(ts_env, settings, store):
    """A lead sent its first events by a caller behaves as the current version (see above):
    it starts on the model the caller passed, or reads the active one by a regular activity;
    no local activity at all; the owner comes back with the write of the handover."""
    client, given, read = ts_env.client, "V-now-given", "V-now-read"
    model = load_model(settings.model_path).model_copy(update={"name": "given", "version": "1"})
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        await leads.send_events(client, settings, [event(given, "1", "website_visit", now),
                                                    event(given, "2", "demo_request", now)], model)
        await leads.send_profile(client, settings, ProfileUpdate(update_id="p", lead_id=read, facts={"title": "CEO"}))
        await leads.send_events(client, settings, [event(read, "2", "demo_request", now)], model)  # already started
        views = {lead: await settle(ts_env, client, lead, lambda v: v.owner is not None) for lead in (given, read)}
        histories = {lead: await client.get_workflow_handle(workflow_id(lead)).fetch_history() for lead in views}
    assert views[given].model_ref == "given@1"
    assert views[read].model_ref == load_model(settings.model_path).ref
    assert "load_scoring_model" not in scheduled_activities(histories[given])
    for history in histories.values():
        assert "record_audit_and_assign" in scheduled_activities(history)
        assert "assign_owner" not in scheduled_activities(history)
        assert "marker_recorded" not in history_kinds(history)
    assert "load_scoring_model" in scheduled_activities(histories[read])


async def test_a_lead_that_is_still_starting_says_so_rather_than_not_found(ts_env, settings, store):
    """Its worker has not finished its first step (here: the model read is slow): readers
    must hear 'starting, ask again', not 'no such lead' (the API answers 503 with Retry-After)."""
    from activities.lead_activities import all_activities

    release = threading.Event()

    class SlowModel(LeadActivities):
        @activity.defn(name="load_scoring_model")
        def load_scoring_model(self, ref=None):
            release.wait(30)
            return super().load_scoring_model(ref)

    client, lead = ts_env.client, "S-starting"
    acts = SlowModel(settings, store)
    async with running_worker(client, settings, store, activities=acts):
        now = await ts_env.get_current_time()
        await leads.send_events(client, settings, [event(lead, "1", "website_visit", now)])
        with pytest.raises(leads.LeadStarting, match="still starting"):
            for _ in range(100):
                await leads.get_view(client, lead)  # raises once the worker has the lead in hand
                await asyncio.sleep(0.05)
        release.set()
        view = await settle(ts_env, client, lead, lambda v: v.events_applied == 1)
        assert view.stage == Stage.IQL
    assert all_activities(acts)


async def test_an_event_id_that_left_the_leads_memory_is_still_applied_once(ts_env, settings, store):
    """It used to be applied again once the id had left the last-2,000 window (reproduced:
    the 2,501st application of 2,500 ids). Here the memory holds 5 ids."""
    from workflows.lead_input import CURRENT_VERSION, LeadInput

    client, lead = ts_env.client, "S-memory"
    async with running_worker(client, settings, store):
        now = await ts_env.get_current_time()
        evs = [event(lead, str(i), "email_open", now) for i in range(8)]
        await client.start_workflow(
            LeadWorkflow.run, LeadInput(lead_id=lead, version=CURRENT_VERSION, seen_ids_max=5, audit_max_lag_seconds=0),
            id=workflow_id(lead), task_queue=settings.task_queue, start_signal="events", start_signal_args=[evs])
        await settle(ts_env, client, lead, lambda v: v.events_applied == 8)
        await leads.flush_audit(client, lead)
        await leads.send_events(client, settings, [evs[0], evs[7]])  # one forgotten, one remembered
        view = await settle(ts_env, client, lead, lambda v: v.duplicates_ignored == 2)
        assert view.events_applied == 8


class HeldActivities(LeadActivities):
    """The lead's activities, with `record_audit` and `assign_owner` held while their gate
    is closed: a test can keep a write in flight and say when the owner comes back."""

    def __init__(self, settings, store) -> None:
        super().__init__(settings, store)
        self.audit_open, self.audit_held = threading.Event(), threading.Event()
        self.owner_open, self.owner_held = threading.Event(), threading.Event()
        self.audit_open.set()
        self.owner_open.set()

    @activity.defn(name="record_audit")
    def record_audit(self, batch: list[AuditEntry] | AuditBatch) -> int:
        if not self.audit_open.is_set():
            self.audit_held.set()
            self.audit_open.wait(60)
        return super().record_audit(batch)

    @activity.defn(name="assign_owner")
    def assign_owner(self, message: Outbound) -> dict:
        if not self.owner_open.is_set():
            self.owner_held.set()
            self.owner_open.wait(60)
        return super().assign_owner(message)


async def until_set(flag: threading.Event, what: str, timeout: float = 30) -> None:
    if not await asyncio.to_thread(flag.wait, timeout):
        raise AssertionError(f"{what} did not happen within {timeout:g} s")


async def hold_the_last_write_before_continue_as_new(dev_env, settings, acts, lead: str, now) -> int:
    """With audit writes held, send events until the lead, told by the server to
    continue-as-new (at 40 history events), is writing its last batch; returns how many."""
    client = dev_env.client
    acts.audit_open.clear()
    for n in range(1, 60):
        await leads.send_events(client, settings, [event(lead, f"v{n}", "website_visit", now)])
        if await asyncio.to_thread(acts.audit_held.wait, 0.3):
            return n
    raise AssertionError("the lead never wrote before continuing as new")


async def test_an_owner_assigned_during_the_last_write_before_continue_as_new_is_written(dev_env, settings, store):
    """Found by tests/test_chaos.py: the handover's owner came back (the store had been
    down) while the lead's last write before continue-as-new was in flight; its
    OWNER_ASSIGNED entry was left behind, its seq used: a gap in the store for ever. A
    version 9 run: from version 10 the owner comes back with the write of the stage change
    itself, and the run after this one is version 10."""
    client, lead = dev_env.client, "D-owner-at-can"
    acts = HeldActivities(settings, store)
    async with running_worker(client, settings, store, activities=acts):
        now = await dev_env.get_current_time()
        acts.owner_open.clear()
        await client.start_workflow(LeadWorkflow.run, leads._input(settings, lead).model_copy(update={"version": 9}),
                                    **leads._start_options(settings, lead),
                                    start_signal="event", start_signal_args=[event(lead, "hand", "demo_request", now)])
        await until_set(acts.owner_held, "the handover")  # MQL written; its owner is held
        sent = await hold_the_last_write_before_continue_as_new(dev_env, settings, acts, lead, now)
        acts.owner_open.set()  # the owner comes back while the write is in flight
        await settle(dev_env, client, lead, lambda v: v.owner is not None)
        acts.audit_open.set()
        await settle(dev_env, client, lead, lambda v: v.events_applied == sent + 1)
        assert len(await runs_of(client, lead, at_least=2)) >= 2
        last = await leads.flush_audit(client, lead)
        view = await leads.get_view(client, lead)
    history = store.history(lead, limit=1000)
    assert [e.seq for e in history] == list(range(1, last + 1)), "no entry left behind"
    assert [e.detail for e in history if e.kind == AuditKind.OWNER_ASSIGNED] == [
        f"owner {view.owner} (handover to presales)"]


async def test_a_command_during_the_last_write_before_continue_as_new_is_answered(dev_env, settings, store):
    """A command whose handler ran while that write was in flight waited for ever for its
    entries to be written: the lead was stuck until some other update came."""
    client, lead = dev_env.client, "D-command-at-can"
    acts = HeldActivities(settings, store)
    async with running_worker(client, settings, store, activities=acts):
        now = await dev_env.get_current_time()
        await leads.send_events(client, settings, [event(lead, "hand", "demo_request", now)])
        await settle(dev_env, client, lead, lambda v: v.owner is not None)
        await hold_the_last_write_before_continue_as_new(dev_env, settings, acts, lead, now)
        accept = asyncio.create_task(leads.run_command(client, lead, Accept(by=ANNA)))
        await settle(dev_env, client, lead, lambda v: v.stage == Stage.SAL)  # the handler ran
        acts.audit_open.set()
        view = await asyncio.wait_for(accept, 20)
        assert view.stage == Stage.SAL
        last = await leads.flush_audit(client, lead)
    history = store.history(lead, limit=1000)
    assert [e.seq for e in history] == list(range(1, last + 1))
    assert [e.to_stage for e in history if e.kind == AuditKind.STAGE_CHANGED] == [Stage.MQL, Stage.SAL]
