"""bench/ingest.py --replays: the worker CPU of replaying a workflow from its history.

The figure explains the sparse shape (most events reach a workflow the worker does not
cache), so it must come from real replays of the histories asked for, and a history that
does not replay must stop the benchmark rather than be timed."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from bench.counting_workflow import CountingWorkflow
from bench.ingest import replay_cost
from funnel.models import ActivityEvent
from workflows.lead import LeadWorkflow


async def _counted(client, events: int) -> str:
    task_queue, wid = f"replay-{uuid.uuid4().hex[:8]}", f"count-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=task_queue, workflows=[CountingWorkflow],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        for n in range(events):
            await client.start_workflow(
                CountingWorkflow.run, id=wid, task_queue=task_queue, start_signal="event",
                start_signal_args=[ActivityEvent(event_id=f"e{n}", lead_id="l", type="web_visit",
                                                 occurred_at=datetime.now(timezone.utc))])
        handle = client.get_workflow_handle(wid)
        assert await handle.query(CountingWorkflow.count) == events
    return wid


async def test_replay_cost_replays_the_histories_it_is_given(ts_env):
    client = ts_env.client
    wid = await _counted(client, 3)
    history = await client.get_workflow_handle(wid).fetch_history()

    found = await replay_cost(client, {"baseline": (CountingWorkflow, [wid])}, repeat=2)

    ms, events = found["baseline"]
    assert events == len(history.events) >= 3 + 1  # the three signals and the start, at least
    assert ms > 0


async def test_a_history_that_does_not_replay_stops_the_benchmark(ts_env):
    wid = await _counted(ts_env.client, 1)

    with pytest.raises(RuntimeError, match="lead does not replay"):
        await replay_cost(ts_env.client, {"lead": (LeadWorkflow, [wid])}, repeat=1)
