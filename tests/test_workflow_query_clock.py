"""A lead asked by query as its decision timer fires must still replay.

Found replaying a sparse benchmark run's histories (bench/ingest.py --replays): 2 of 301
leads failed with "[TMPRL1100] Nondeterminism error: Activity machine does not handle this
event: TimerStarted". Any worker restart or cache eviction would have wedged them.

What happens (Python SDK 1.35 / sdk-core): a query reaches a worker that no longer caches
the lead, and the history the worker reads for it already holds the firing of the lead's
decision timer. The worker applies that firing there and then, as a live activation, but
stamped with the time of the lead's previous workflow task. The lead, told by its clock that
the decision is not due yet, started a new timer; replayed, the same firing carries the time
of the task that recorded it, the decision is due, and the lead hands over (an activity).

The lead now never reads a time earlier than the wake-up it fired for (WakeTimer.fired_for).
The race needs a busy worker and exact timing, so this test makes many chances (leads whose
decisions fall due while they are asked by query, with a small cache) and asserts every
history replays. It is a check of the whole path, not a sure one: on the code before it
failed in 4 of 7 runs (3 of 4 with three rounds, 1 of 3 with these four; each failing run on
1-2 of its leads; the dev server also logged the live worker's own "workflow task failed ...
NonDeterministic"), and it passed in 4 of 4 runs after the change (one of them in the
fresh-clone CI). tests/test_workflow_stale_timer_stamp.py pins the cause every time.
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

import client as leads
from activities.lead_activities import LeadActivities
from activities.store import AuditStore
from config import Settings
from funnel.models import ActivityEvent
from tests.conftest import KEY_CACHE_SECONDS
from worker import build_worker
from workflows.lead import LeadWorkflow, workflow_id

ROUNDS = 4
LEADS = 60
CACHE = 10  # far fewer than the leads: most queries replay an evicted lead
DECISION_DELAY = 2.0


async def _ask(client, lead: str) -> None:
    try:
        await leads.get_view(client, lead)
    except Exception:  # noqa: BLE001 - a query that fails is fine here; only the histories count
        pass


async def test_leads_asked_by_query_while_their_decision_timer_fires_still_replay(dev_env, tmp_path):
    client = dev_env.client
    settings = Settings(task_queue=f"leads-{uuid.uuid4().hex[:8]}", database_url=f"sqlite:///{tmp_path / 'audit.db'}",
                        decision_delay_seconds=DECISION_DELAY, key_cache_seconds=KEY_CACHE_SECONDS)
    store = AuditStore(settings.database_url)
    replayer = Replayer(workflows=[LeadWorkflow], data_converter=client.data_converter,
                        workflow_runner=UnsandboxedWorkflowRunner())
    failed: list[str] = []
    with ThreadPoolExecutor(16) as executor:
        async with build_worker(client, settings, LeadActivities(settings, store), executor,
                                max_cached_workflows=CACHE):
            for round_ in range(ROUNDS):
                ids = [f"qc{round_}-{uuid.uuid4().hex[:6]}-{i}" for i in range(LEADS)]
                now = datetime.now(timezone.utc)

                async def send(lead: str, n: int, kind: str) -> None:
                    event = ActivityEvent(event_id=f"{lead}-e{n}", lead_id=lead, type=kind, occurred_at=now,
                                          channel="website")
                    await leads.send_events(client, settings, [event])

                await asyncio.gather(*(send(lead, 1, "website_visit") for lead in ids))
                await asyncio.sleep(1.0)
                # A demo request makes each lead's decision due DECISION_DELAY after its task.
                await asyncio.gather(*(send(lead, 2, "demo_request") for lead in ids))
                await asyncio.sleep(DECISION_DELAY - 0.5)
                for _ in range(3):  # asked again and again as the timers fire
                    await asyncio.gather(*(_ask(client, lead) for lead in ids))
                await asyncio.sleep(DECISION_DELAY + 2.0)  # every decision taken
                for lead in ids:
                    history = await client.get_workflow_handle(workflow_id(lead)).fetch_history()
                    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
                    if result.replay_failure is not None:
                        failed.append(f"{lead}: {str(result.replay_failure)[:200]}")
    assert not failed, f"{len(failed)} of {ROUNDS * LEADS} leads do not replay:\n" + "\n".join(failed)
