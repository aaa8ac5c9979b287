"""Runs Leadflow's worker: the lead workflow and its activities, until Ctrl-C.

Configuration comes from the environment (see config.py): TEMPORAL_ADDRESS or
a Temporal env-config profile, LEADFLOW_DATABASE_URL, LEADFLOW_MODEL, ...
The scoring model is validated before connecting, so a bad model file stops
the worker with a clear message instead of reaching any lead.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.exc import SQLAlchemyError

from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from activities.audit_sweeper import AuditSweeper
from activities.webhook_dispatcher import WebhookDispatcher
from activities.account_activities import AccountActivities
from workflows.account import AccountWorkflow
from activities.lead_activities import LeadActivities, all_activities
from activities.personal_data_activities import PersonalDataActivities
from activities.rollout_activities import RolloutActivities
from activities.store import ModelConflict
from config import Settings, connect
from funnel.scoring_model import ModelError, load_model
from payload_codec import KeyConfigError
from workflows import search_attributes as sa
from workflows.lead import LeadWorkflow
from workflows.rollout import ModelRolloutWorkflow

log = logging.getLogger("leadflow.worker")
ACTIVITY_THREADS = 16


class LeadWorker(Worker):
    """Temporal's worker, with its companions beside it while it runs: the audit sweeper
    (activities/audit_sweeper.py) and the subscriptions' webhook dispatcher
    (activities/webhook_dispatcher.py)."""

    def __init__(self, *args, sweeper: AuditSweeper | None = None, dispatcher: WebhookDispatcher | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sweeper = sweeper
        self.dispatcher = dispatcher

    async def run(self) -> None:
        companions = [asyncio.create_task(c.run()) for c in (self.sweeper, self.dispatcher) if c is not None]
        try:
            await super().run()
        finally:
            for task in companions:
                task.cancel()

    async def shutdown(self) -> None:
        """A last sweep while the worker still answers queries, then Temporal's shutdown."""
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self.sweeper is not None:
            await self.sweeper.stop()
        await super().shutdown()


SWEEP_INTERVAL = 0.25  # s: soon enough that the leads swept are still in the worker's cache


def sweep_interval(settings: Settings) -> float | None:
    """Seconds between sweeps (or the audit lag if shorter); None when the lag is "never"
    (nothing swept: entries wait for the lead's own writes). A query to a lead the worker
    no longer caches replays its history, so sweeps follow the leads' work closely."""
    lag = settings.audit_max_lag_seconds
    return None if lag is None else max(0.05, min(SWEEP_INTERVAL, lag))


def build_worker(client: Client, settings: Settings, activities: LeadActivities | None = None,
                 executor: ThreadPoolExecutor | None = None, sandboxed: bool = False,
                 max_cached_workflows: int = 1000) -> LeadWorker:
    """The worker for `settings.task_queue`; activities are blocking (SQL, HTTP), hence threads.

    The lead workflow runs outside Temporal's Python sandbox: measured in
    bench/ingest.py, the sandbox took ~25% of the worker's CPU (SDK 1.35 looks up a
    serialization context inside it for every payload, and builds an 8-10 ms
    sandbox per lead run), and it checks only `workflows/lead.py` itself: the logic
    in `funnel/` is passed through, as Temporal recommends, so the sandbox never
    checked it. Determinism rests on the design (the core takes `now` as an
    argument and does no I/O), on replaying saved histories, and on a test that
    runs a lead's whole life in the sandbox (`sandboxed=True`).
    """
    activities = activities or LeadActivities(settings)
    interval = sweep_interval(settings)
    return LeadWorker(
        client,
        sweeper=None if interval is None else AuditSweeper(client, activities.store, settings.task_queue, interval),
        dispatcher=WebhookDispatcher(activities.store, settings.webhook_retry_seconds),
        task_queue=settings.task_queue,
        workflows=[LeadWorkflow, ModelRolloutWorkflow, AccountWorkflow],
        activities=(all_activities(activities) + RolloutActivities(client).all()
                    + AccountActivities(client, settings, activities.store).all()
                    + PersonalDataActivities(client, activities.store).all()),
        activity_executor=executor or ThreadPoolExecutor(ACTIVITY_THREADS),
        max_concurrent_activities=ACTIVITY_THREADS,
        workflow_runner=SandboxedWorkflowRunner() if sandboxed else UnsandboxedWorkflowRunner(),
        max_cached_workflows=max_cached_workflows,
    )


RETRY_MAX_SECONDS = 30.0


async def _when_reachable(what: str, make, stop: asyncio.Event):
    """`make()` once what it needs is reachable: a worker started before its database or
    Temporal waits for them (saying so) instead of exiting and taking a local stack down."""
    delay = 1.0
    while True:
        try:
            return await make()
        except (SQLAlchemyError, OSError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and "connect" not in str(err).lower():
                raise
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            log.warning("%s unreachable (%s); trying again in %.0f s", what, first, delay)
        try:
            await asyncio.wait_for(stop.wait(), delay)
            raise SystemExit(0)  # stopped while waiting
        except TimeoutError:
            delay = min(delay * 2, RETRY_MAX_SECONDS)


class MissingSearchAttributes(Exception):
    """The server lacks search attributes the leads upsert, and this worker may not add them."""


async def ensure_search_attributes(client: Client) -> list[str]:
    """Add the search attributes a lead upserts that the namespace lacks, and return their
    names. A lead upserting an unknown attribute fails its workflow task on every retry, and
    `temporal server start-dev --search-attribute` registers them only on a new database (a
    version that adds one would otherwise wedge every lead on an existing dev server). Where
    this worker may not add them (a cluster), it says which to create, and does not start."""
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest

    namespace = client.namespace
    known = await client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace=namespace))
    have = set(known.custom_attributes) | set(known.system_attributes)
    missing = {key.name: IndexedValueType.ValueType(key.indexed_value_type) for key in sa.ALL if key.name not in have}
    if not missing:
        return []
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing))
    except RPCError as err:
        wanted = ", ".join(f"{key.name} ({sa.type_name(key)})" for key in sa.ALL if key.name in missing)
        raise MissingSearchAttributes(f"namespace {namespace} lacks the search attributes {wanted} and this worker "
                                      f"may not add them ({err.message}): create them (temporal operator "
                                      "search-attribute create --name NAME --type TYPE) and start it again") from None
    log.info("added search attributes to namespace %s: %s", namespace, ", ".join(sorted(missing)))
    return sorted(missing)


async def run(settings: Settings) -> None:
    load_model(settings.model_path)  # a bad file stops the worker before anything else
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    address = settings.temporal_address or "Temporal (env-config)"
    client = await _when_reachable(f"Temporal at {address}", lambda: connect(settings), stop)
    await ensure_search_attributes(client)

    async def store_ready() -> LeadActivities:
        activities = await asyncio.to_thread(LeadActivities, settings)  # creates the tables
        await asyncio.to_thread(activities.sync_model_file)
        return activities

    store_name = settings.database_url.split("@")[-1]
    activities = await _when_reachable(f"the audit store {store_name}", store_ready, stop)
    model = activities.model(None)
    with ThreadPoolExecutor(ACTIVITY_THREADS) as executor:
        worker = build_worker(client, settings, activities, executor)
        log.info(
            "worker on task queue %r at %s, model %s, store %s",
            settings.task_queue, client.service_client.config.target_host, model.ref,
            settings.database_url.split("@")[-1],
        )
        async with worker:
            await stop.wait()
            log.info("stopping worker")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(run(Settings.from_env()))
    except (ModelError, ModelConflict, KeyConfigError, MissingSearchAttributes) as err:
        print(f"leadflow worker: {err}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:
        if "connect" in str(err).lower():
            print(f"leadflow worker: cannot reach Temporal: {err}", file=sys.stderr)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
