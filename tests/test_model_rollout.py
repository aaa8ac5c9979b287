"""Changing the scoring model under running leads: validate, record, try it (dry run),
roll it out at a bounded rate, on the real dev server (the rollout finds the leads
behind in Temporal visibility)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest

import client as leads
from activities.store import ModelConflict
from config import DEFAULT_MODEL
from funnel.models import Accept, AuditKind, ProfileUpdate, Stage
from funnel.scoring_model import ModelError
from tests.conftest import ANNA, MIA, account_when, event, running_worker, settle, until
from workflows import search_attributes as sa

V2 = DEFAULT_MODEL.read_text().replace('version = "1"', 'version = "2"', 1).replace(
    "[events.live_chat]\npoints = 15", "[events.live_chat]\npoints = 30", 1)


async def test_a_new_version_is_tried_recorded_and_rolled_out(dev_env, settings, store):
    client = dev_env.client
    run = settings.task_queue[-6:]
    near, accepted, cold = f"R{run}-near", f"R{run}-sal", f"R{run}-cold"
    async with running_worker(client, settings, store):
        now = await dev_env.get_current_time()
        await leads.send_profile(client, settings, ProfileUpdate(update_id="p", lead_id=near,
                                                                  facts={"target_account": True}))
        await leads.send_events(client, settings, [event(near, "1", "website_visit", now),
                                                   event(near, "2", "webinar_attended", now),
                                                   event(near, "3", "live_chat", now)])
        await leads.send_events(client, settings, [event(accepted, "1", "demo_request", now)])
        await leads.send_events(client, settings, [event(cold, "1", "website_visit", now)])
        await settle(dev_env, client, near, lambda v: v.score["total"] == 86)
        await settle(dev_env, client, accepted, lambda v: v.stage == Stage.MQL)
        await leads.run_command(client, accepted, Accept(by=ANNA))
        for lead in (near, accepted, cold):
            await leads.flush_audit(client, lead)  # visibility follows the store

        # a dry run says what would change, and changes nothing
        from funnel.scoring_model import parse_model

        preview = await leads.preview_model(client, store, settings, parse_model(V2, "v2.toml"))
        mine = {e["lead_id"]: e for e in preview.examples if e["lead_id"].startswith(f"R{run}")}
        assert mine[near] == {"lead_id": near, "score": [86, 101], "stage": ["iql", "mql"]}
        assert accepted not in mine and cold not in mine
        assert (await leads.get_view(client, near)).model_ref == "default@1"

        version, _ = await leads.apply_model(client, settings, store, V2, "v2.toml", by=MIA.model_copy(),
                                             rate_per_second=50)
        assert (version.ref, version.applied_by, version.active) == ("default@2", "mia", True)
        assert store.active_model().ref == "default@2"

        await until(lambda: leads.rollout_progress(client, settings, "default@2"), bool)
        progress = await until(lambda: _done(client, settings), bool)
        assert progress.signalled >= 3 and progress.behind == 0
        view = await settle(dev_env, client, near, lambda v: v.stage == Stage.MQL)
        assert view.model_ref == "default@2" and view.score["total"] == 101
        assert (await leads.get_view(client, accepted)).stage == Stage.SAL  # nobody is demoted
        # a new lead uses the new version at once
        newcomer = f"R{run}-new"
        await leads.send_events(client, settings, [event(newcomer, "1", "live_chat", now)])
        view = await settle(dev_env, client, newcomer, lambda v: v.events_applied == 1)
        assert (view.model_ref, view.score["total"]) == ("default@2", 30)
        await leads.flush_audit(client, near)

    [change] = [e for e in store.history(near, limit=1000) if e.kind == AuditKind.MODEL_CHANGED]
    assert change.detail == "scoring model default@1 \u2192 default@2: 86 \u2192 101"
    assert (change.actor, change.role.value) == ("mia", "manager")
    moves = [e for e in store.history(near, limit=1000) if e.kind == AuditKind.STAGE_CHANGED]
    assert moves[-1].to_stage == Stage.MQL and moves[-1].happened_at >= change.at


async def _done(client, settings):
    progress = await leads.rollout_progress(client, settings, "default@2")
    return progress if progress is not None and progress.done else None


async def test_a_bad_or_reused_version_is_refused_before_anything_changes(dev_env, settings, store):
    from funnel.models import Actor, Role

    manager = Actor(name="mona", role=Role.MANAGER)
    with pytest.raises(ModelError, match="invalid scoring model"):
        await leads.apply_model(dev_env.client, settings, store, V2.replace("points = 30", 'points = "lots"'),
                                "bad.toml", by=manager)
    assert store.active_model() is None
    store.record_model("default@2", V2, applied_by="mona")
    with pytest.raises(ModelConflict, match="new version"):
        await leads.apply_model(dev_env.client, settings, store, V2 + "\n# edited\n", "v2.toml", by=manager)
    assert store.active_model().ref == "default@2"


class Population:
    """Running leads as the rollout's activities see them, without Temporal visibility: a
    page is the next ids in order that are still on another version, at most 10."""

    def __init__(self, env, size: int) -> None:
        self.env = env
        self.everyone = [f"lead-R{i:04d}" for i in range(size)]  # visibility's order
        self.behind = set(self.everyone)
        self.told: list[str] = []
        self.calls: list[tuple[object, int]] = []  # (server time, leads told) of every signalling
        self.halfway = asyncio.Event()

    def activities(self) -> list:
        from temporalio import activity

        everyone = self.everyone

        @activity.defn(name="leads_behind")
        async def leads_behind(ref: str, page_token: str | None, page_size: int) -> dict:
            start = int(page_token or 0)
            ids = [i for i in everyone[start:start + 10] if i in self.behind]
            following = start + 10
            return {"workflow_ids": ids, "next_page_token": str(following) if following < len(everyone) else None}

        @activity.defn(name="count_leads_behind")
        async def count_leads_behind(ref: str) -> int:
            return len(self.behind)

        @activity.defn(name="signal_model_change")
        async def signal_model_change(workflow_ids: list[str], ref: str, by) -> int:
            self.calls.append((await self.env.get_current_time(), len(workflow_ids)))
            self.told += workflow_ids
            self.behind -= set(workflow_ids)
            if len(self.told) >= len(everyone) // 2:
                self.halfway.set()
            return len(workflow_ids)

        return [leads_behind, count_leads_behind, signal_model_change]


async def test_a_rollout_keeps_its_rate_survives_a_worker_restart_and_continues_as_new(dev_env):
    """600 leads at 200 a second: each is told once, though the worker stops halfway and
    another takes over (the rollout is durable); signalling is spaced by the rate (workflow
    time); after 50 pages the run continues as new, and applying the version again joins
    the rollout under way instead of starting another."""
    from temporalio.common import WorkflowIDConflictPolicy
    from temporalio.worker import Worker

    from workflows.rollout import PAGES_PER_RUN, ModelRolloutWorkflow, RolloutInput, rollout_id

    # The dev server, not the time-skipping one: that one sometimes never hands the rollout
    # to the second worker (its task stays with the stopped worker's sticky queue).
    client, population, queue = dev_env.client, Population(dev_env, 600), f"rollout-{uuid.uuid4().hex[:8]}"
    start = dict(id=rollout_id("default@2", queue), task_queue=queue,
                 id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING)
    rollout = RolloutInput(ref="default@2", by=MIA, rate_per_second=200)
    # The first worker lets a signalling under way finish as it stops (else the task is
    # lost to the server until its 2 min timeout).
    async with Worker(client, task_queue=queue, workflows=[ModelRolloutWorkflow],
                      activities=population.activities(), graceful_shutdown_timeout=timedelta(seconds=10)):
        handle = await client.start_workflow(ModelRolloutWorkflow.run, rollout, **start)
        first_run = handle.result_run_id
        await asyncio.wait_for(population.halfway.wait(), 60)
    told_by_first_worker = len(population.told)
    assert 300 <= told_by_first_worker < 600
    again = await client.start_workflow(ModelRolloutWorkflow.run, rollout, **start)  # `model apply` again
    assert again.first_execution_run_id == first_run
    async with Worker(client, task_queue=queue, workflows=[ModelRolloutWorkflow],
                      activities=population.activities()):
        # (the new worker goes on once what the stopped one had taken times out: up to 2 min)
        async def told() -> int:
            return len(population.told)

        await until(told, lambda count: count == 600, timeout=200, every=0.2)
        progress = await asyncio.wait_for(handle.result(), 60)
    assert sorted(population.told) == sorted(f"lead-R{i:04d}" for i in range(600))  # each once
    assert progress.done and progress.signalled == 600 and progress.behind == 0 and progress.passes == 1
    # the rate: after telling n leads, the next telling waits n / 200 seconds of workflow time
    for (at, n), (next_at, _) in zip(population.calls, population.calls[1:]):
        assert (next_at - at).total_seconds() >= n / 200 - 0.005
    assert (population.calls[-1][0] - population.calls[0][0]).total_seconds() >= (600 - 10) / 200
    # 60 pages: the first run ended in a continue-as-new after PAGES_PER_RUN of them
    history = await client.get_workflow_handle(start["id"], run_id=first_run).fetch_history()
    assert history.events[-1].HasField("workflow_execution_continued_as_new_event_attributes")
    assert PAGES_PER_RUN < 60


async def test_a_rollout_reaches_accounts_too(dev_env, settings, store):
    """An account's rules (its [account] thresholds, its fit) come from the model as well: a
    rollout tells running accounts, each goes on under the new version, says so in its
    history, and shows it in visibility, so the rollout knows when nobody is behind."""
    from funnel.models import ProfileUpdate as Profile

    client, run = dev_env.client, settings.task_queue[-6:]
    domain = f"acme-{run}.de"
    lower = V2 + "\n[account]\nthreshold = 60\n"  # a buying team of two at 71 points is now enough
    async with running_worker(client, settings, store):
        now = await dev_env.get_current_time()
        for lead, role, extra, kind in ((f"A{run}-dm", "decision_maker", {"target_account": True}, "webinar_attended"),
                                        (f"A{run}-ch", "champion", {}, "website_visit")):
            await leads.send_profile(client, settings, Profile(update_id="p", lead_id=lead, facts={
                "email": f"{role}@{domain}", "role": role, **extra}))
            await leads.send_events(client, settings, [event(lead, "1", kind, now)])

        before = await account_when(client, domain, lambda v: v.score == 71 and len(v.roles) == 2)
        assert before.stage.value == "engaged" and before.threshold == 120
        await leads.apply_model(client, settings, store, lower, "v2.toml", by=MIA.model_copy(), rate_per_second=50)
        progress = await until(lambda: _done(client, settings), bool)
        after = await account_when(client, domain, lambda v: v.stage.value == "mqa")
        assert after.threshold == 60 and progress.behind == 0
        model_entry = next(e for e in after.history if e.kind == "model")
        assert model_entry.detail == "scoring model default@1 \u2192 default@2: 71 \u2192 71"
        assert after.history.index(model_entry) < [e.kind for e in after.history].index("mqa")
        described = await client.get_workflow_handle(f"account-{domain}").describe()
        assert described.typed_search_attributes.get(sa.LEAD_MODEL) == "default@2"
