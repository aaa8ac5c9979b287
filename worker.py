"""Runs Leadflow's worker: the lead workflow and its activities, until Ctrl-C.

Configuration comes from the environment (see config.py): TEMPORAL_ADDRESS or
a Temporal env-config profile, LEADFLOW_DATABASE_URL, LEADFLOW_MODEL, ...
The scoring model is validated before connecting, so a bad model file stops
the worker with a clear message instead of reaching any lead.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.exc import SQLAlchemyError

from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.worker import (
    Interceptor, UnsandboxedWorkflowRunner, Worker, WorkflowInboundInterceptor, WorkflowInterceptorClassInput,
)
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from activities.audit_sweeper import AuditSweeper
from activities.webhook_dispatcher import WebhookDispatcher
from activities.account_activities import AccountActivities
from workflows.account import AccountWorkflow
from activities.lead_activities import LeadActivities, all_activities
from activities.personal_data_activities import PersonalDataActivities
from activities.rollout_activities import RolloutActivities
from activities.store import ModelConflict
import client as leads
from config import WORKER_STALLED_EXIT, Settings, connect
from funnel.scoring_model import ModelError, load_model
from payload_codec import KeyConfigError
from workflows import search_attributes as sa
from workflows.lead import LeadWorkflow
from workflows.rollout import ModelRolloutWorkflow

log = logging.getLogger("leadflow.worker")
ACTIVITY_THREADS = 16


class WorkflowProgress(Interceptor):
    """When this worker last ran workflow code: a lead (or other workflow) starting or
    replaying, a signal, a query or an update. The stall watch asks this before it believes
    that a worker Temporal sees silent has stopped."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def idle_seconds(self) -> float:
        return time.monotonic() - self.last

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput):
        progress = self

        class Inbound(WorkflowInboundInterceptor):
            def init(self, outbound):
                progress.last = time.monotonic()
                super().init(outbound)

            async def handle_signal(self, input):
                progress.last = time.monotonic()
                return await super().handle_signal(input)

            async def handle_query(self, input):
                progress.last = time.monotonic()
                return await super().handle_query(input)

            def handle_update_validator(self, input):
                progress.last = time.monotonic()
                return super().handle_update_validator(input)

        return Inbound


class LeadWorker(Worker):
    """Temporal's worker, with its companions beside it while it runs: the audit sweeper
    (activities/audit_sweeper.py) and the subscriptions' webhook dispatcher
    (activities/webhook_dispatcher.py); and its `progress` for the stall watch."""

    def __init__(self, *args, sweeper: AuditSweeper | None = None, dispatcher: WebhookDispatcher | None = None,
                 progress: WorkflowProgress | None = None, **kwargs) -> None:
        self.progress = progress or WorkflowProgress()
        super().__init__(*args, interceptors=[self.progress], **kwargs)
        self.sweeper = sweeper
        self.dispatcher = dispatcher
        let_slow_activations_finish(self)

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


def let_slow_activations_finish(worker: Worker) -> None:
    """Switch off the SDK's deadlock detection (temporalio 1.35: an activation that runs
    longer than 2 s fails its workflow task), because what follows it wedges the lead.

    Leads do no I/O and never block, so on this worker an activation that long is only a
    slow one: a loaded machine, a long replay, a garbage collection. The SDK then fails the
    task, and evicts the lead while the activation's thread is still running it (its wait
    for that thread is `asyncio.wait_for`, which cancels the future it waited on, so the
    eviction's "wait for the deadlocked activation" returns at once). The eviction finds
    the lead's tasks still there ("Eviction processed, but 2 tasks remain"), retries for
    ever, and the lead takes nothing more on this worker: no event, no query, no timer,
    until the process is replaced (tests/test_worker_slow_activation.py). Without the
    detection a slow activation just finishes; one longer than the workflow task timeout
    (10 s) is timed out by the server and retried, after an ordinary eviction. The SDK
    core still logs every activation over 5 s (TMPRL1104). There is no public option:
    `debug_mode` would also run activations on the worker's event loop."""
    inner = getattr(worker, "_workflow_worker", None)
    if inner is None:
        return  # an activity-only worker
    if not hasattr(inner, "_deadlock_timeout_seconds"):
        raise RuntimeError("temporalio changed: worker.let_slow_activations_finish no longer applies; review it")
    inner._deadlock_timeout_seconds = None


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


def freeze_heap() -> None:
    """Take what a started worker holds for good (modules, pydantic schemas, the client, the
    model) out of the garbage collector's sight, so each full collection walks only what
    leads make. Measured in bench/ingest.py --shape sparse: a full collection took ~140 ms
    of the worker's CPU and the collector 0.8 s of a lead phase's 6 s; frozen, 0.4 s.
    What is frozen is never collected, so this runs once, after start-up."""
    gc.collect()
    gc.freeze()


STALL_CONFIRM_SECONDS = 10.0  # a verdict must hold this long before the worker exits


def stall_verdict(backlog: int, oldest_seconds: float, last_poll_seconds: float | None, idle_seconds: float,
                  limit: float) -> str | None:
    """Why a worker has stopped taking workflow tasks, or None while it has not.

    Stalled means all three, for longer than `limit`: lead tasks have waited (Temporal says),
    this worker has not polled for them (`last_poll_seconds` None: Temporal no longer lists
    it), and it has run no workflow code (`idle_seconds`). A busy worker runs workflow code
    all along, even when its polls are seconds apart (measured on 2 cores, tests/
    test_worker_stall.py); an idle one has nothing waiting for it."""
    if backlog <= 0 or oldest_seconds <= limit or idle_seconds <= limit:
        return None
    if last_poll_seconds is not None and last_poll_seconds <= limit:
        return None
    silent = "is no longer listed as polling" if last_poll_seconds is None else \
        f"last polled {last_poll_seconds:.0f} s ago"
    return (f"{backlog} lead task(s) have waited up to {oldest_seconds:.0f} s while this worker {silent} "
            f"for workflow tasks and ran no workflow code for {idle_seconds:.0f} s (limit {limit:g} s)")


class StallWatch:
    """Notices a worker that has stopped taking workflow tasks while they wait for it.

    Seen with temporalio 1.35 when leads leave a full cache with tasks buffered (README, known
    problems): the SDK core logs "Extra buffered run should not have produced an activation",
    and this process's workflow poller stops for good while its activity poller goes on. Every
    lead on the worker then waits until the process is replaced. Nothing is lost meanwhile
    (input waits in Temporal, audit entries in the leads' state), so the cure is to exit and
    be started again. The verdict rests on what Temporal sees (DescribeTaskQueue) and on
    whether workflow code runs here (WorkflowProgress, which counts from the worker's start),
    not on SDK internals."""

    def __init__(self, client, task_queue: str, identity: str, progress: WorkflowProgress, limit: float,
                 interval: float | None = None, confirm: float = STALL_CONFIRM_SECONDS, clock=time.monotonic) -> None:
        self.client, self.task_queue, self.identity, self.limit = client, task_queue, identity, limit
        self.progress, self.confirm, self.clock = progress, confirm, clock
        self.interval = interval if interval is not None else max(1.0, limit / 8)
        self.verdict: str | None = None

    async def run(self, on_stall) -> None:
        """Check every `interval` until a verdict has held on every check for `confirm`
        seconds (Temporal's backlog figures lag: a backlog just worked off is still counted
        for a few seconds); then record it and call `on_stall()`."""
        since: float | None = None  # when the current run of verdicts began
        while True:
            await asyncio.sleep(self.interval)
            try:
                seen = await leads.workflow_polling(self.client, self.task_queue)
            except leads.TemporalUnavailable as err:
                log.debug("stall watch: %s", err)  # not this worker's fault; the worker says so itself
                since = None
                continue
            except Exception:  # noqa: BLE001 - the watch must outlive a bad answer
                log.warning("stall watch: could not read the task queue", exc_info=True)
                since = None
                continue
            verdict = stall_verdict(seen.backlog, seen.oldest_seconds, seen.last_poll_seconds.get(self.identity),
                                    self.progress.idle_seconds(), self.limit)
            if verdict is None:
                since = None
                continue
            since = self.clock() if since is None else since
            if self.clock() - since >= self.confirm:
                self.verdict = verdict
                on_stall()
                return


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
            freeze_heap()
            watch = watching = None
            if settings.worker_stall_seconds:
                identity = worker.config().get("identity") or client.identity
                watch = StallWatch(client, settings.task_queue, identity, worker.progress, settings.worker_stall_seconds)
                watching = asyncio.create_task(watch.run(stop.set))
            await stop.wait()
            if watching is not None:
                watching.cancel()
            if watch is not None and watch.verdict is not None:
                # No graceful shutdown: it would wait for the very poller that is stuck.
                log.critical("worker stalled: %s; exiting (code %d) to be started again", watch.verdict,
                             WORKER_STALLED_EXIT)
                logging.shutdown()
                os._exit(WORKER_STALLED_EXIT)
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
