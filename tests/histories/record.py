"""Record lead workflow histories for the replay test.

Run after a change to workflow code has shipped (leads are running with it):
    .venv/bin/python tests/histories/record.py [--only funnel|accounts]
It drives leads through the funnel (including continue-as-new, at the limit and after a
quiet spell, and an event that arrives after the contact that followed it up) and two leads of one
account to an MQA on a throwaway dev server, and writes one JSON history per workflow
run into this folder (account workflows' as A-*.json).
Keep the old files: they are the running leads the new code must still replay.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from temporalio.testing import WorkflowEnvironment  # noqa: E402

import client as leads  # noqa: E402
from activities.store import AuditStore  # noqa: E402
from config import Settings, data_converter, dev_server_dynamic_flags  # noqa: E402
from funnel.models import Accept, Bant, Close, LogContact, ProfileUpdate, Qualify, Reject  # noqa: E402
from funnel.scoring_model import load_model  # noqa: E402
from tests.conftest import ANNA, BEN, account_when, binary, event, running_worker, settle  # noqa: E402
from workflows import search_attributes as sa  # noqa: E402
from workflows.lead import workflow_id  # noqa: E402


async def main() -> None:
    env = await WorkflowEnvironment.start_local(
        # Unencrypted on purpose: these histories are checked in as test fixtures (their data is
        # made up) and must replay anywhere; the codec passes unencrypted payloads through.
        dev_server_existing_path=binary("temporal"), data_converter=data_converter(encrypted=False),
        search_attributes=sa.ALL,
        dev_server_extra_args=dev_server_dynamic_flags(**{"limit.historyCount.suggestContinueAsNew": "40"}),
    )
    tmp = Path(tempfile.mkdtemp())
    settings = Settings(task_queue="record", database_url=f"sqlite:///{tmp / 'audit.db'}")
    store = AuditStore(settings.database_url)
    client = env.client
    model = load_model(settings.model_path)  # new leads start on it, as the API starts them
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    async with running_worker(client, settings, store):
        now = await env.get_current_time()
        if only in (None, "accounts"):
            await record_accounts(env, client, settings, model, now)
        if only == "accounts":
            await env.shutdown()
            return
        won, lost, burst = "R-won", "R-disq", "R-burst"
        await leads.send_profile(client, settings, ProfileUpdate(update_id="p", lead_id=won,
                                                                  facts={"target_account": True}), model)
        await leads.send_events(client, settings, [event(won, "1", "webinar_attended", now),
                                                   event(won, "2", "demo_request", now),
                                                   event(won, "2", "demo_request", now)])
        await settle(env, client, won, lambda v: v.owner is not None)
        await leads.run_command(client, won, Accept(by=ANNA))
        await leads.run_command(client, won, Qualify(by=ANNA, bant=Bant(budget=True, need=True, timing=True)))
        await leads.run_command(client, won, LogContact(by=BEN))
        await leads.run_command(client, won, Close(by=BEN, outcome="won"))

        await leads.send_events(client, settings, [event(lost, "1", "demo_request", now)], model)
        await settle(env, client, lost, lambda v: v.owner is not None)
        await leads.run_command(client, lost, Reject(by=ANNA, reason="student", recycle=True))

        for b in range(15):
            await leads.send_events(client, settings, [event(burst, f"{b}-{i}", "website_visit", now) for i in range(3)],
                                    model if b == 0 else None)
        await settle(env, client, burst, lambda v: v.events_applied == 45, tries=300)

        # (version 12) a quiet lead with a long run continues as new when it wakes
        quiet = "R-quiet"
        quick = settings.model_copy(update={"quiet_history_events": 20, "quiet_after_seconds": 1.0})
        for n in range(8):
            await leads.send_events(client, quick, [event(quiet, str(n), "website_visit", now)], model)
            await settle(env, client, quiet, lambda v, n=n: v.events_applied == n + 1)
        await asyncio.sleep(1.5)
        await leads.send_events(client, quick, [event(quiet, "late", "email_open", now)])
        await settle(env, client, quiet, lambda v: v.events_applied == 9)
        await asyncio.sleep(2)  # the write before the new run, and the new run's first task

        # (version 13) a webinar that arrives after the call that followed it up: met, no deadline runs
        late = "R-late"
        await leads.send_events(client, settings, [event(late, "1", "demo_request", now)], model)
        await settle(env, client, late, lambda v: v.owner is not None)
        await leads.run_command(client, late, LogContact(by=ANNA))
        await leads.send_events(client, settings, [event(late, "2", "webinar_attended", now)])
        await settle(env, client, late, lambda v: v.events_applied == 2)
        await leads.flush_audit(client, late)

        for lead in (won, lost, burst, quiet, late):
            await write_runs(client, workflow_id(lead), lead)
    await env.shutdown()


async def record_accounts(env, client, settings, model, now) -> None:
    """Two leads of one target account (version 7 feeds it) make an MQA."""
    from workflows.account_input import account_workflow_id

    domain = "acme-record.example"
    for lead, role, extra in (("R-acct-a", "decision_maker", {"target_account": True}), ("R-acct-b", "champion", {})):
        await leads.send_profile(client, settings, ProfileUpdate(
            update_id="p", lead_id=lead, facts={"email": f"{role}@{domain}", "role": role, **extra}), model)
        await leads.send_events(client, settings, [event(lead, "1", "webinar_attended", now)])
        await settle(env, client, lead, lambda v: v.events_applied == 1)
    view = await account_when(client, domain, lambda v: v.owner is not None, timeout=20)
    assert view.stage.value == "mqa", view
    for lead in ("R-acct-a", "R-acct-b"):
        await write_runs(client, workflow_id(lead), lead)
    await write_runs(client, account_workflow_id(domain), "A-acct")


async def write_runs(client, wf_id: str, name: str) -> None:
    async for run in client.list_workflows(f"WorkflowId = '{wf_id}'"):
        history = await client.get_workflow_handle(run.id, run_id=run.run_id).fetch_history()
        if not any(e.HasField("workflow_task_completed_event_attributes") for e in history.events):
            continue  # a run that has not made a decision yet has nothing to replay
        path = HERE / f"{name}-{run.run_id[:8]}.json"
        path.write_text(history.to_json())
        print("wrote", path.name, len(history.events), "events")


if __name__ == "__main__":
    asyncio.run(main())
