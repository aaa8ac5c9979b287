"""A quiet lead with a long run continues as new (version 12, RunBehaviour.continues_when_quiet).

Real leads get their events weeks apart: by then the worker has evicted the lead and replays
its whole run before it applies the event (or fires a timer), at ~0.4 ms of CPU per history
event (bench/long_leads.py). So a lead that wakes after a quiet spell with a long run starts
a new one, carrying its state; a lead whose input keeps coming goes on to the history limit,
and runs of older versions keep replaying as they were.
"""

from __future__ import annotations

from datetime import timedelta

import client as leads
from funnel.scoring_model import load_model
from tests.conftest import event, history_kinds, running_worker, settle
from workflows.lead import LeadWorkflow, workflow_id
from workflows.lead_input import CURRENT_VERSION, LeadInput, behaviour

QUIET_EVENTS = 30  # history events
QUIET_AFTER = 600.0  # seconds
BURST = 12  # events, one call each: ~4 history events apiece, past QUIET_EVENTS


async def test_a_quiet_lead_with_a_long_run_continues_as_new_and_an_older_version_does_not(ts_env, settings, store):
    client = ts_env.client
    settings = settings.model_copy(update={"quiet_history_events": QUIET_EVENTS, "quiet_after_seconds": QUIET_AFTER})
    model = load_model(settings.model_path)
    now_lead, old_lead = "quiet-v-now", "quiet-v11"
    assert behaviour(CURRENT_VERSION).continues_when_quiet  # what callers start now
    async with running_worker(client, settings, store):
        await client.start_workflow(  # as a caller of version 11 started its leads
            LeadWorkflow.run, LeadInput(lead_id=old_lead, model=model, version=11, decision_delay_seconds=1,
                                        quiet_history_events=QUIET_EVENTS, quiet_after_seconds=QUIET_AFTER),
            id=workflow_id(old_lead), task_queue=settings.task_queue)
        start = await ts_env.get_current_time()
        for n in range(BURST):  # busy: each call its own workflow task, moments apart
            for lead in (now_lead, old_lead):
                await leads.send_events(client, settings, [event(lead, str(n), "website_visit", start)], model)
                await settle(ts_env, client, lead, lambda v, n=n: v.events_applied == n + 1)
        handles = {lead: client.get_workflow_handle(workflow_id(lead)) for lead in (now_lead, old_lead)}
        first_runs = {lead: (await handle.describe()).run_id for lead, handle in handles.items()}
        busy = {lead: await handle.fetch_history() for lead, handle in handles.items()}
        assert all(len(history.events) >= QUIET_EVENTS for history in busy.values()), "the runs are long"
        assert all("workflow_execution_continued_as_new" not in history_kinds(h) for h in busy.values()), (
            "input that keeps coming never makes a quiet spell")

        await ts_env.sleep(timedelta(seconds=2 * QUIET_AFTER))  # quiet (no timer of these leads is due)
        later = await ts_env.get_current_time()
        for lead in (now_lead, old_lead):
            await leads.send_events(client, settings, [event(lead, "late", "website_visit", later)])
            await settle(ts_env, client, lead, lambda v: v.events_applied == BURST + 1)
        for _ in range(200):  # the new run starts once the lead has written what it decided
            if (await handles[now_lead].describe()).run_id != first_runs[now_lead]:
                break
            await ts_env.sleep(timedelta(milliseconds=50))
        ended = {lead: await client.get_workflow_handle(workflow_id(lead), run_id=first_runs[lead]).fetch_history()
                 for lead in first_runs}
        current = {lead: await handle.describe() for lead, handle in handles.items()}
        views = {lead: await leads.get_view(client, lead) for lead in handles}  # (the new run's, for the first)

    assert history_kinds(ended[now_lead])[-1] == "workflow_execution_continued_as_new"
    assert current[now_lead].run_id != first_runs[now_lead]
    assert "workflow_execution_continued_as_new" not in history_kinds(ended[old_lead]), "version 11 goes on as it was"
    assert current[old_lead].run_id == first_runs[old_lead]
    # The new run carried everything: the same events applied and the same score as the
    # lead that went on in one run.
    assert views[now_lead].events_applied == views[old_lead].events_applied == BURST + 1
    assert views[now_lead].score == views[old_lead].score
    assert [v.stage for v in views[now_lead].history] == [v.stage for v in views[old_lead].history]
