"""The lead decides the same whether a timer's firing comes stamped late or early.

bench/query_race.py runs the race with the real worker: the SDK applied a
lead's decision timer firing while answering a query, stamped with the time of the lead's
previous workflow task; replayed later, the same firing carried the time of the task that
recorded it, and the lead's commands differed (a new timer live, the handover's write on
replay): a nondeterminism error. That race needs luck; this test gives the lead the two
stampings directly, through the SDK's own workflow instance (what the worker drives), and
asserts the same commands come out.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from google.protobuf.timestamp_pb2 import Timestamp
from temporalio.api.common.v1 import Payloads
from temporalio.bridge.proto.workflow_activation import (
    FireTimer,
    InitializeWorkflow,
    SignalWorkflow,
    WorkflowActivation,
    WorkflowActivationJob,
)
from temporalio.common import Priority, TypedSearchAttributes
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import UnsandboxedWorkflowRunner, WorkflowInstance, WorkflowInstanceDetails
from temporalio.workflow import Info, _Definition

from config import DEFAULT_MODEL
from funnel.models import ActivityEvent
from funnel.scoring_model import load_model
from workflows.lead import LeadWorkflow
from workflows.lead_input import CURRENT_VERSION, LeadInput

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=timezone.utc)
DELAY = timedelta(seconds=2)
WORKFLOW_ID, RUN_ID = "lead-stale-1", "run-1"


def _instance() -> WorkflowInstance:
    """As the worker makes one: on its event loop (activations then run on another thread)."""
    info = Info(
        attempt=1, continued_run_id=None, cron_schedule=None, execution_timeout=None, first_execution_run_id=RUN_ID,
        headers={}, namespace="default", original_execution_run_id=RUN_ID, parent=None, root=None, raw_memo={},
        retry_policy=None, run_id=RUN_ID, run_timeout=None, search_attributes={}, start_time=T0,
        workflow_start_time=T0, task_queue="stale-stamp", task_timeout=timedelta(seconds=10),
        typed_search_attributes=TypedSearchAttributes.empty, workflow_id=WORKFLOW_ID, workflow_type="LeadWorkflow",
        priority=Priority.default,
    )
    return UnsandboxedWorkflowRunner().create_instance(WorkflowInstanceDetails(
        payload_converter_factory=pydantic_data_converter._new_payload_converter,
        failure_converter_class=pydantic_data_converter.failure_converter_class,
        interceptor_classes=[], defn=_Definition.must_from_class(LeadWorkflow), info=info, randomness_seed=1,
        extern_functions={}, disable_eager_activity_execution=False, worker_level_failure_exception_types=[],
        patch_activation_callback=None, last_completion_result=Payloads(), last_failure=None,
    ))


def _activation(at: datetime, history_length: int, *jobs: WorkflowActivationJob) -> WorkflowActivation:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return WorkflowActivation(run_id=RUN_ID, timestamp=stamp, is_replaying=False, history_length=history_length,
                              jobs=list(jobs))


def _signal(event: ActivityEvent) -> WorkflowActivationJob:
    payload = pydantic_data_converter.payload_converter.to_payloads([event])[0]
    return WorkflowActivationJob(signal_workflow=SignalWorkflow(signal_name="event", input=[payload]))


async def _commands(instance: WorkflowInstance, activation: WorkflowActivation) -> list:
    completion = await asyncio.to_thread(instance.activate, activation)
    assert completion.HasField("successful"), completion
    return list(completion.successful.commands)


def _kinds(commands: list) -> list[str]:
    return [c.WhichOneof("variant") for c in commands]


async def _lead_up_to_its_decision() -> tuple[WorkflowInstance, int, datetime]:
    """A lead that got a visit, then a demo request: its decision is due DELAY after that
    second task. Returns the instance, the decision timer's seq and the second task's time."""
    instance = _instance()
    lead_input = LeadInput(lead_id="stale-1", model=load_model(DEFAULT_MODEL), version=CURRENT_VERSION,
                           decision_delay_seconds=DELAY.total_seconds())
    start = WorkflowActivationJob(initialize_workflow=InitializeWorkflow(
        workflow_type="LeadWorkflow", workflow_id=WORKFLOW_ID, randomness_seed=1,
        arguments=pydantic_data_converter.payload_converter.to_payloads([lead_input])))
    visit = ActivityEvent(event_id="e1", lead_id="stale-1", type="website_visit", occurred_at=T0, channel="website")
    await _commands(instance, _activation(T0, 3, start, _signal(visit)))
    asked = T0 + timedelta(seconds=5)
    demo = ActivityEvent(event_id="e2", lead_id="stale-1", type="demo_request", occurred_at=asked, channel="website")
    timers = [c.start_timer for c in await _commands(instance, _activation(asked, 9, _signal(demo)))
              if c.HasField("start_timer")]
    assert [t.start_to_fire_timeout.ToTimedelta() for t in timers] == [DELAY], "the decision waits DELAY"
    return instance, timers[0].seq, asked


async def test_a_timer_firing_stamped_with_the_task_before_gives_the_commands_of_its_replay():
    replayed, seq, asked = await _lead_up_to_its_decision()
    fired = WorkflowActivationJob(fire_timer=FireTimer(seq=seq))
    # How a replay (or a worker that saw it in order) stamps it: the task that recorded it.
    on_replay = _kinds(await _commands(replayed, _activation(asked + DELAY + timedelta(seconds=1), 15, fired)))
    assert "schedule_activity" in on_replay  # the decision is taken: the handover's write

    live, seq, asked = await _lead_up_to_its_decision()
    # How the SDK stamped it when it applied the firing for a query: the task before.
    stale = _kinds(await _commands(live, _activation(asked, 14, WorkflowActivationJob(fire_timer=FireTimer(seq=seq)))))

    assert stale == on_replay
