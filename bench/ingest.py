"""Ingest benchmark: how fast do lead workflows take webhook events, compared with
the fastest a Temporal workflow can take signals on the same server?

One run starts one Temporal dev server (SQLite file by default, `--in-memory`
optionally) and, in this process, measures two phases one after the other:

1. baseline: `bench.counting_workflow.CountingWorkflow` (counts `event` signals,
   nothing else, run outside the sandbox like the lead) gets N leads x M events by
   signal-with-start from C concurrent senders sharing one client.
2. lead: the real `LeadWorkflow` with the real worker (`worker.build_worker`)
   and the real audit store (SQLite in a temp dir, or `--store URL`) gets the
   same N x M events through `client.send_events`, one event per call (as
   webhooks arrive).

A phase is done when the server says no workflow has a workflow task pending (every
signal taken by the worker; `settled`) and, for the lead, the store holds all N x M
SCORE_CHANGED entries, written by the worker's audit sweeper as in production
(`LEADFLOW_AUDIT_MAX_LAG=never`: by asking each lead to write, one update per lead,
timed). After the clock stops, each workflow is asked by query whether it counts its M
events (the baseline's `count`, the lead's `events_applied`): a query makes the worker
replay an evicted workflow, which would time the bench's own reading, not the ingest.

Both are end to end: from the first send until done (each phase first takes one
untimed warm-up lead). It prints a table (events/s,
ratio lead/baseline, history events per ingested event, overall and by event
type, continue-as-new runs, CPU seconds of this process = worker + senders and
of the dev server, peak RSS) and a one-line JSON summary. Figures only:
nothing here passes or fails.

On a shared 2-core machine the absolute rates move a lot with what else runs;
`--rounds R` alternates baseline and lead R times on the same server and
sums them (plus the ratio of each round). CPU per event is the steadier figure.
On 2 cores the worker and the dev server also take CPU from each other, which a
deployment (workers on their own machines) does not: `--pin` gives the dev
server one CPU and this process the others, in both phases alike.

`--replays N` then replays N workflows of each phase from their histories in this process
and prints the worker CPU per replay: what an event to a workflow the worker does not cache
costs the worker (the sparse shape), without the server. It moves between runs too, by up
to ~40%, so compare the two of one run: the SDK's Replayer adds the same fixed cost per
history to both, and the difference is the lead's. A history that does not replay stops it.

    .venv/bin/python bench/ingest.py [--leads 50] [--events 40] [--concurrency 32]
                                     [--db-file | --in-memory] [--store sqlite|URL] [--rounds 1] [--pin]
                                     [--replays N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import func  # noqa: E402
from sqlmodel import Session, select  # noqa: E402
from temporalio.api.common.v1 import WorkflowExecution  # noqa: E402
from temporalio.api.enums.v1 import EventType  # noqa: E402
from temporalio.api.workflowservice.v1 import DescribeWorkflowExecutionRequest  # noqa: E402
from temporalio.client import Client, WorkflowExecutionStatus  # noqa: E402
from temporalio.service import RPCError  # noqa: E402
from temporalio.testing import WorkflowEnvironment  # noqa: E402
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, Worker  # noqa: E402

import client as leads_client  # noqa: E402
from activities.lead_activities import LeadActivities  # noqa: E402
from activities.store import AuditRow, AuditStore  # noqa: E402
from bench.counting_workflow import CountingWorkflow  # noqa: E402
from config import DEFAULT_MODEL, DEV_SERVER_DYNAMIC_CONFIG, Settings, data_converter, dev_server_file_flags  # noqa: E402
from payload_codec import PayloadKeyring, key_spec, new_key  # noqa: E402
from funnel.models import ActivityEvent, AuditKind  # noqa: E402
from funnel.scoring_model import load_model  # noqa: E402
from worker import ACTIVITY_THREADS, build_worker, freeze_heap  # noqa: E402
from workflows import search_attributes as sa  # noqa: E402
from workflows.lead import LeadWorkflow, workflow_id as lead_workflow_id  # noqa: E402

BIN = Path(sys.executable).parent
POLL_INTERVAL = 0.1  # seconds between confirmation rounds
DONE_TIMEOUT = 600.0  # give up waiting for confirmation after this long (and say so)
CHECK_TIMEOUT = 30.0  # one confirmation query or store count (a query to a lead nobody serves never ends)
SEND_ATTEMPTS = 5

# How often each event type arrives, roughly as marketing automation reports
# them: many visits and opens, few demo requests. Types the model lacks are
# skipped; model types missing here get weight 1.
EVENT_WEIGHTS = {
    "website_visit": 30, "email_open": 20, "email_click": 10, "pricing_page_visit": 8,
    "social_interaction": 6, "content_download": 6, "video_view": 5, "webinar_registration": 3,
    "newsletter_signup": 2, "webinar_attended": 2, "live_chat": 2, "event_attended": 1,
    "sample_request": 1, "cart_add": 1, "demo_request": 1, "unsubscribe": 0.5, "email_bounced": 0.5,
}
CHANNELS = ["web", "email", "social", "ads", "events"]


# --------------------------------------------------------------------------- measuring


def rss_mb() -> float:
    """Peak resident set size of this process (worker + senders) so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_pids() -> list[int]:
    """Processes this one started (the dev server), from /proc."""
    pids: list[int] = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


def pin(pid: int | str, cpus: set[int]) -> None:
    """Every thread of process `pid` ("self": this one) onto `cpus`; threads it starts later
    inherit the set of the thread that starts them."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that just ended
            pass


def cpu_of(pids: list[int]) -> float:
    """utime + stime of the given processes, in seconds (0 for any that are gone)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


@dataclass
class Phase:
    name: str
    workflows: int
    events: int
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    send_seconds: float = 0.0
    flush_seconds: float = 0.0  # lead phase: from all applied until the store is complete (sweeper, or flush_audit)
    total_seconds: float = 0.0
    cpu_bench_s: float = 0.0
    cpu_server_s: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds per successful send
    send_retries: int = 0
    history_events: int = 0  # what the timed events added (setup and final flush not included)
    flush_history_events: int = 0  # lead phase: what the final flush_audit added
    runs: int = 0
    continued_as_new: int = 0
    history_by_type: Counter = field(default_factory=Counter)
    confirmed: bool = True
    rounds: list[float] = field(default_factory=list)  # events/s of each round, once folded
    setup_events: int = 0  # sparse: the untimed events that created the leads (their history is not counted)
    sweeper_queries: int = 0  # lead phase, timed window: leads the audit sweeper asked by query ...
    sweeper_confirmed: int = 0  # ... and handed workflow tasks it confirmed by a history read ...
    sweeper_vouched: int = 0  # ... or by a later task of the same run instance (no read)

    def add(self, other: "Phase") -> None:
        """Fold another round of the same phase into this one (sums; peak RSS is the last)."""
        for name in ("workflows", "events", "send_seconds", "flush_seconds", "total_seconds", "cpu_bench_s", "cpu_server_s",
                     "send_retries", "history_events", "flush_history_events", "runs", "continued_as_new",
                     "setup_events", "sweeper_queries", "sweeper_confirmed", "sweeper_vouched"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.history_by_type.update(other.history_by_type)
        self.rss_after_mb = other.rss_after_mb
        self.confirmed &= other.confirmed
        self.rounds.append(other.events_per_s)
        self.latencies += other.latencies

    @property
    def events_per_s(self) -> float:
        return self.events / self.total_seconds if self.total_seconds else 0.0

    def latency_ms(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    @property
    def cpu_ms_per_event(self) -> float:
        return 1000 * (self.cpu_bench_s + self.cpu_server_s) / self.events if self.events else 0.0

    @property
    def history_per_event(self) -> float:
        """What taking one timed event cost in history: counted after the setup and again
        once every event is applied (the clock stopped meanwhile), so neither the leads'
        creation nor the bench's final flush is in it."""
        return self.history_events / self.events if self.events else 0.0

    @property
    def flush_history_per_event(self) -> float:
        return self.flush_history_events / self.events if self.events else 0.0


async def start_embedded(tmp: Path, store: AuditStore, key: bytes | None = None, in_memory: bool = False,
                         dynamic_config: dict[str, str] | None = None,
                         key_cache_seconds: float | None = None) -> WorkflowEnvironment:
    """The embedded default for a benchmark: the dev server (on `tmp/temporal.db`, or in
    memory) with scripts/run's SQLite settings and dynamic config (plus `dynamic_config`), and a client that
    encrypts as production does, with a throwaway payload key and the lead keys in `store`."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(BIN / "temporal"), search_attributes=sa.ALL,
        data_converter=data_converter(Settings(**({} if key_cache_seconds is None else
                                                  {"key_cache_seconds": key_cache_seconds, "shred_delay_seconds": 0})),
                                      keyring=PayloadKeyring({"bench": key or new_key()}, "bench"),
                                      key_store=store),
        dev_server_database_filename=None if in_memory else str(tmp / "temporal.db"), dev_server_log_level="error",
        dev_server_extra_args=dev_server_file_flags(**(dynamic_config or {})),
    )


# --------------------------------------------------------------------------- input


def make_sparse(prefix: str, leads: int, events: int, seed: int) -> tuple[list[ActivityEvent], list[ActivityEvent]]:
    """Real traffic: `leads` existing leads (one event each creates them, untimed), then
    `events` events, each to a random one of them. With more leads than the worker caches,
    most events reach a lead that is not in the cache and has nothing to batch with."""
    created = make_events(prefix, leads, 1, seed)
    pool = make_events(prefix + "s", 1, events, seed + 1)  # a realistic mix of types
    rng = random.Random(seed + 2)
    lead_ids = [e.lead_id for e in created]
    timed = [e.model_copy(update={"lead_id": rng.choice(lead_ids), "event_id": f"{prefix}-x{i:06d}"})
             for i, e in enumerate(pool)]
    return created, timed


def make_events(prefix: str, leads: int, per_lead: int, seed: int) -> list[ActivityEvent]:
    """N x M events, interleaved across leads (event j of every lead before event j+1)."""
    model = load_model(DEFAULT_MODEL)
    # The listed types only, in the model's order: the same events for every version of
    # the code (a model that gains a type must not change the workload).
    types = [t for t in model.events if t in EVENT_WEIGHTS]
    weights = [EVENT_WEIGHTS[t] for t in types]
    rng = random.Random(seed)
    now = datetime.now(timezone.utc)
    lead_ids = [f"{prefix}-{i:05d}" for i in range(leads)]
    channels = {lead: rng.choice(CHANNELS) for lead in lead_ids}
    events = []
    for j in range(per_lead):
        for lead in lead_ids:
            events.append(
                ActivityEvent(
                    event_id=f"{lead}-e{j:05d}",
                    lead_id=lead,
                    type=rng.choices(types, weights)[0],
                    occurred_at=now,
                    channel=channels[lead],
                    attributes={"source": "bench"},
                )
            )
    return events


# --------------------------------------------------------------------------- driving


async def send_all(events: list[ActivityEvent], concurrency: int,
                   send: Callable[[ActivityEvent], Awaitable[None]], phase: Phase) -> float:
    """Send every event from `concurrency` tasks; returns the start time (perf_counter)."""
    queue: asyncio.Queue[ActivityEvent] = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)
    latencies = phase.latencies

    async def sender() -> None:
        while True:
            try:
                event = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            for attempt in range(SEND_ATTEMPTS):
                t = time.perf_counter()
                try:
                    await send(event)
                    latencies.append(time.perf_counter() - t)
                    break
                except RPCError:
                    if attempt == SEND_ATTEMPTS - 1:
                        raise
                    phase.send_retries += 1
                    await asyncio.sleep(0.2 * (attempt + 1))

    start = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    phase.send_seconds = time.perf_counter() - start
    return start


async def wait_until(keys: list[str], is_done: Callable[[str], Awaitable[bool]], chunk: int | None = None) -> bool:
    """Poll `is_done(key)` for the keys not done yet until all are (or time out): all at once,
    or `chunk` at a time in the order given, each round stopping at the first chunk with one
    not done (the rest is asked next round)."""
    pending = list(keys)
    deadline = time.perf_counter() + DONE_TIMEOUT
    step = chunk or len(pending)
    while pending:
        for i in range(0, len(pending), step):
            batch = pending[i:i + step]
            # A lead the worker no longer answers for must not hang the bench: each check times out.
            results = await asyncio.gather(*(asyncio.wait_for(is_done(k), CHECK_TIMEOUT) for k in batch),
                                           return_exceptions=True)
            waiting = [k for k, ok in zip(batch, results) if ok is not True]
            if waiting:
                pending = waiting + pending[i + step:]
                break
        else:
            return True
        if time.perf_counter() > deadline:
            print(f"  gave up waiting: {len(pending)} not confirmed, e.g. {pending[0]}", file=sys.stderr)
            return False
        await asyncio.sleep(POLL_INTERVAL)
    return True


async def settled(client: Client, workflow_id: str) -> bool:
    """The worker has taken every signal the server accepted so far: the workflow has no
    workflow task pending (a signal schedules one, or joins the one pending). Asked of the
    server, not the workflow: a query would make the worker replay every evicted workflow,
    so the bench would time its own reading, and more so for the workflow whose queries
    cost more. Signals and workflow tasks of both phases are judged the same way. The
    sparse setup waits for its new leads so too: polling 300 leads by query while a cache of
    40 evicts them is where the SDK stall (README: known problems) came, 3 times in 3 days."""
    response = await client.workflow_service.describe_workflow_execution(DescribeWorkflowExecutionRequest(
        namespace=client.namespace, execution=WorkflowExecution(workflow_id=workflow_id)))
    return not response.HasField("pending_workflow_task")


SETTLE_CHUNK = 32  # workflows asked at once by wait_settled


async def wait_settled(client: Client, events: Sequence[ActivityEvent], lead_ids: Iterable[str],
                       workflow_id: Callable[[str], str]) -> bool:
    """Wait until the workflow of every lead in `lead_ids` is `settled`, once `events` are
    sent. They are asked in the order of each lead's last event (the senders take events in
    order, and the worker their tasks about so), SETTLE_CHUNK at a time. Asking all that are
    pending every round cost the server ~1,600 requests per phase of 300 workflows, inside
    the timed window."""
    last = {event.lead_id: i for i, event in enumerate(events)}
    in_send_order = sorted(lead_ids, key=lambda lead: last.get(lead, -1))
    return await wait_until([workflow_id(lead) for lead in in_send_order], lambda w: settled(client, w),
                            chunk=SETTLE_CHUNK)


WARMUP_EVENTS = 3


async def warm_up(send: Callable[[ActivityEvent], Awaitable[None]],
                  is_done: Callable[[str], Awaitable[bool]]) -> None:
    """One untimed lead through the phase's worker first (caches, connections, first poll)."""
    events = make_events(f"w{uuid.uuid4().hex[:6]}", 1, WARMUP_EVENTS, seed=0)
    for event in events:
        await send(event)
    await wait_until([events[0].lead_id], is_done)


@dataclass
class HistoryCount:
    by_type: Counter = field(default_factory=Counter)
    runs: int = 0
    continued_as_new: int = 0

    @property
    def events(self) -> int:
        return sum(self.by_type.values())


async def count_history(client: Client, workflow_ids: list[str]) -> HistoryCount:
    """History events over every run of each workflow id (runs closed by continue-as-new too)."""
    sem = asyncio.Semaphore(16)
    count = HistoryCount()

    async def one(wid: str) -> None:
        async with sem:
            runs = [e async for e in client.list_workflows(f"WorkflowId = '{wid}'")]
            for execution in runs:
                history = await client.get_workflow_handle(wid, run_id=execution.run_id).fetch_history()
                count.by_type.update(EventType.Name(e.event_type) for e in history.events)
                count.runs += 1
                if execution.status == WorkflowExecutionStatus.CONTINUED_AS_NEW:
                    count.continued_as_new += 1

    await asyncio.gather(*(one(w) for w in workflow_ids))
    return count


def take_history(phase: Phase, before: HistoryCount, after: HistoryCount) -> None:
    """The timed events' share: what `after` has beyond `before`."""
    phase.history_by_type.update(after.by_type)
    phase.history_by_type.subtract(before.by_type)
    phase.history_events = after.events - before.events
    phase.runs, phase.continued_as_new = after.runs, after.continued_as_new


class Meter:
    """Peak RSS from the start of a phase (worker start-up included); CPU from `start()`
    (after the warm-up) to `stop()` (before the history is counted)."""

    def __init__(self, phase: Phase, server_pids: list[int]):
        self.phase, self.server_pids = phase, server_pids
        phase.rss_before_mb = rss_mb()
        self.cpu0 = self.server0 = 0.0

    def start(self) -> None:
        self.cpu0, self.server0 = cpu_self(), cpu_of(self.server_pids)

    def stop(self) -> None:
        """Adds the CPU since `start()` (a phase may start and stop the meter twice)."""
        self.phase.cpu_bench_s += cpu_self() - self.cpu0
        self.phase.cpu_server_s += cpu_of(self.server_pids) - self.server0
        self.phase.rss_after_mb = rss_mb()


async def run_baseline(client: Client, events: list[ActivityEvent], lead_ids: list[str], expected: dict[str, int],
                       concurrency: int, server_pids: list[int], setup: list[ActivityEvent] = (),
                       cache: int = 1000) -> Phase:
    phase = Phase("baseline", workflows=len(lead_ids), events=len(events), setup_events=len(setup))
    task_queue = f"bench-count-{uuid.uuid4().hex[:8]}"

    def wid(lead_id: str) -> str:
        return f"count-{lead_id}"

    async def send(event: ActivityEvent) -> None:
        await client.start_workflow(
            CountingWorkflow.run, id=wid(event.lead_id), task_queue=task_queue,
            start_signal="event", start_signal_args=[event],
        )

    async def done(lead_id: str) -> bool:
        wanted = WARMUP_EVENTS if lead_id.startswith("w") else expected[lead_id]
        return await client.get_workflow_handle(wid(lead_id)).query(CountingWorkflow.count) >= wanted

    meter = Meter(phase, server_pids)
    # Outside the sandbox, as the lead runs (worker.build_worker): in it, every replay of an
    # evicted workflow builds a sandbox first (8-10 ms), which slowed the baseline, not the lead.
    async with Worker(client, task_queue=task_queue, workflows=[CountingWorkflow], max_cached_workflows=cache,
                      workflow_runner=UnsandboxedWorkflowRunner()):
        freeze_heap()  # the same for both workers
        await warm_up(send, done)
        before = HistoryCount()
        if setup:  # untimed: the leads exist before the timed events reach them
            await send_all(list(setup), concurrency, send, Phase("setup", 0, 0))
            await wait_settled(client, setup, {e.lead_id for e in setup}, wid)
            before = await count_history(client, [wid(lead) for lead in lead_ids])
        meter.start()
        start = await send_all(events, concurrency, send, phase)
        phase.confirmed = await wait_settled(client, events, lead_ids, wid)
        phase.total_seconds = time.perf_counter() - start
        meter.stop()
        phase.confirmed &= await wait_until(lead_ids, done)  # untimed: each count is what was sent
    take_history(phase, before, await count_history(client, [wid(lead) for lead in lead_ids]))
    return phase


def score_changes(store: AuditStore, prefix: str) -> int:
    """Distinct events scored in the store: a row count could hide one event scored
    twice and another not at all."""
    stmt = (
        select(func.count(func.distinct(AuditRow.event_id))).select_from(AuditRow)
        .where(AuditRow.kind == AuditKind.SCORE_CHANGED.value, AuditRow.lead_id.startswith(f"{prefix}-"),
               AuditRow.event_id.is_not(None))
    )
    with Session(store.engine) as session:
        return session.exec(stmt).one()


async def flush_or_say(client: Client, lead_id: str) -> None:
    """Ask a lead to write now; one that does not answer in CHECK_TIMEOUT is reported, not
    waited for (its entries are then missing, and the phase says it is not confirmed)."""
    try:
        await asyncio.wait_for(leads_client.flush_audit(client, lead_id), CHECK_TIMEOUT)
    except Exception as err:  # noqa: BLE001 - a figure with a note beats a bench that hangs
        print(f"  lead {lead_id} did not flush its audit: {type(err).__name__} {err}", file=sys.stderr)


async def run_lead(client: Client, settings: Settings, events: list[ActivityEvent], lead_ids: list[str],
                   expected: dict[str, int], concurrency: int, prefix: str, server_pids: list[int],
                   setup: list[ActivityEvent] = (), cache: int = 1000) -> Phase:
    phase = Phase("lead", workflows=len(lead_ids), events=len(events), setup_events=len(setup))
    store = AuditStore(settings.database_url)
    activities = LeadActivities(settings, store)

    sent_to: set[str] = set()

    async def send(event: ActivityEvent) -> None:  # as the API sends: a new lead starts on the active model
        model = None if event.lead_id in sent_to else activities.model(None)
        await leads_client.send_events(client, settings, [event], model)
        sent_to.add(event.lead_id)

    async def applied(lead_id: str) -> bool:
        wanted = WARMUP_EVENTS if lead_id.startswith("w") else expected[lead_id]
        return (await leads_client.get_view(client, lead_id)).events_applied >= wanted

    def scored(count: int) -> Callable[[str], Awaitable[bool]]:
        """A wait_until check: the store holds `count` of this run's events scored."""
        async def holds(_: str) -> bool:
            return await asyncio.to_thread(score_changes, store, prefix) >= count
        return holds

    audited = scored(len(events) + len(setup))

    try:
        meter = Meter(phase, server_pids)
        with ThreadPoolExecutor(ACTIVITY_THREADS) as executor:
            async with build_worker(client, settings, activities, executor, max_cached_workflows=cache) as worker:
                freeze_heap()  # as worker.run does once the worker is up
                await warm_up(send, applied)
                before = HistoryCount()
                if setup:  # untimed: the leads exist (and have written their audit) before the timed events
                    await send_all(list(setup), concurrency, send, Phase("setup", 0, 0))
                    await wait_settled(client, setup, {e.lead_id for e in setup}, lead_workflow_id)
                    if settings.audit_max_lag_seconds is not None:
                        # as a lead that got its event yesterday: written by the sweeper, no flush
                        # in its history (a flush is an update, an activity and two more tasks
                        # that every replay of the timed phase would go through again)
                        await wait_until(["store"], scored(len(setup)))
                    else:
                        for lead in sorted({e.lead_id for e in setup}):
                            await flush_or_say(client, lead)
                    before = await count_history(client, [lead_workflow_id(lead) for lead in lead_ids])
                meter.start()
                sweeper = worker.sweeper
                asked0, confirmed0, vouched0 = (sweeper.queries, sweeper.confirmed, sweeper.vouched) if sweeper else (0, 0, 0)
                start = await send_all(events, concurrency, send, phase)
                wids = [lead_workflow_id(lead) for lead in lead_ids]
                phase.confirmed = await wait_settled(client, events, lead_ids, lead_workflow_id)
                applied_seconds = time.perf_counter() - start
                if settings.audit_max_lag_seconds is not None:
                    # Score changes reach the store by the worker's sweeper (about a second),
                    # which adds nothing to the leads' histories.
                    phase.confirmed &= await wait_until(["store"], audited)
                    phase.flush_seconds = time.perf_counter() - start - applied_seconds
                    phase.total_seconds = time.perf_counter() - start
                    meter.stop()
                    if sweeper is not None:
                        phase.sweeper_queries = sweeper.queries - asked0
                        phase.sweeper_confirmed = sweeper.confirmed - confirmed0
                        phase.sweeper_vouched = sweeper.vouched - vouched0
                    phase.confirmed &= await wait_until(lead_ids, applied)  # untimed: each lead counts its events
                    ingested = flushed = await count_history(client, wids)
                    take_history(phase, before, ingested)
                else:
                    # LEADFLOW_AUDIT_MAX_LAG=never: no sweeper; every lead is asked to write
                    # now (counted: it is in the window). The clock stops while the history
                    # is counted in between.
                    meter.stop()
                    phase.confirmed &= await wait_until(lead_ids, applied)  # untimed: each lead counts its events
                    ingested = await count_history(client, wids)
                    take_history(phase, before, ingested)
                    meter.start()
                    flush_from = time.perf_counter()
                    sem = asyncio.Semaphore(concurrency)

                    async def flush(lead_id: str) -> None:
                        async with sem:
                            await flush_or_say(client, lead_id)

                    await asyncio.gather(*(flush(lead) for lead in lead_ids))
                    phase.confirmed &= await wait_until(["store"], audited)
                    phase.flush_seconds = time.perf_counter() - flush_from
                    phase.total_seconds = applied_seconds + phase.flush_seconds
                    meter.stop()
                    flushed = await count_history(client, wids)
        phase.flush_history_events = flushed.events - ingested.events
        phase.runs, phase.continued_as_new = flushed.runs, flushed.continued_as_new
    finally:
        activities.close()
        store.dispose()
    return phase


async def replay_cost(client: Client, kinds: dict[str, tuple[type, list[str]]], repeat: int = 3) -> dict:
    """Worker CPU per replay of a whole history, per workflow type, in this process: what a
    worker pays when an event reaches a workflow it does not cache (the sparse shape), without
    the server. {kind: (ms per replay, history
    events per workflow)}; the first pass is a warm-up."""
    found = {}
    for kind, (workflow, workflow_ids) in kinds.items():
        histories = [await client.get_workflow_handle(wid).fetch_history() for wid in workflow_ids]
        replayer = Replayer(workflows=[workflow], data_converter=client.data_converter,
                            workflow_runner=UnsandboxedWorkflowRunner())

        async def replay_all() -> None:
            async def each():
                for history in histories:
                    yield history

            async with replayer.workflow_replay_iterator(each()) as results:
                async for result in results:
                    if result.replay_failure is not None:
                        raise RuntimeError(f"{kind} does not replay: {result.replay_failure}")

        await replay_all()
        cpu = cpu_self()
        for _ in range(repeat):
            await replay_all()
        found[kind] = (1000 * (cpu_self() - cpu) / (repeat * len(histories)),
                       sum(len(h.events) for h in histories) / len(histories))
    return found


# --------------------------------------------------------------------------- reporting


def report(args: argparse.Namespace, server_kind: str, store_kind: str, base: Phase, lead: Phase,
           replays: dict[str, tuple[float, float]] | None = None) -> dict:
    ratio = lead.events_per_s / base.events_per_s if base.events_per_s else 0.0
    print()
    shape = (f"sparse: {args.leads} existing leads, {args.leads * args.events} events to random ones, worker cache "
             f"{args.cache}" if args.shape == "sparse" else f"{args.leads} leads x {args.events} events")
    print(f"Leadflow ingest benchmark ({shape}) = "
          f"{args.leads * args.events} events per phase and round, {args.rounds} round(s), "
          f"concurrency {args.concurrency}, dev server {server_kind}, audit store {store_kind}, "
          f"{os.cpu_count()} CPUs, key changes looked for every {args.key_cache_seconds:g} s"
          + (", dev server pinned to its own CPU" if args.pin else ""))
    rows = [
        ("events/s (end to end)", f"{base.events_per_s:.1f}", f"{lead.events_per_s:.1f}"),
        ("seconds end to end", f"{base.total_seconds:.2f}", f"{lead.total_seconds:.2f}"),
        ("seconds sending", f"{base.send_seconds:.2f}", f"{lead.send_seconds:.2f}"),
        ("seconds applied -> store complete", "-", f"{lead.flush_seconds:.2f}"),
        ("send latency p50/p99 ms", f"{base.latency_ms(0.5)}/{base.latency_ms(0.99)}",
         f"{lead.latency_ms(0.5)}/{lead.latency_ms(0.99)}"),
        ("send retries", str(base.send_retries), str(lead.send_retries)),
        ("history events per event (ingest)", f"{base.history_per_event:.2f}", f"{lead.history_per_event:.2f}"),
        ("  + final flush, per event", "-", f"{lead.flush_history_per_event:.2f}"),
        ("history events total (ingest)", str(base.history_events), str(lead.history_events)),
        ("workflow runs / continue-as-new", f"{base.runs} / {base.continued_as_new}",
         f"{lead.runs} / {lead.continued_as_new}"),
        ("CPU s bench process (worker)", f"{base.cpu_bench_s:.1f}", f"{lead.cpu_bench_s:.1f}"),
        ("CPU s dev server", f"{base.cpu_server_s:.1f}", f"{lead.cpu_server_s:.1f}"),
        ("CPU ms per event bench+server", f"{base.cpu_ms_per_event:.1f}", f"{lead.cpu_ms_per_event:.1f}"),
        ("peak RSS MB before -> after", f"{base.rss_before_mb:.0f} -> {base.rss_after_mb:.0f}",
         f"{lead.rss_before_mb:.0f} -> {lead.rss_after_mb:.0f}"),
        ("audit sweeper: queries / tasks confirmed by history / by a later task", "-",
         f"{lead.sweeper_queries} / {lead.sweeper_confirmed} / {lead.sweeper_vouched}"),
        ("all confirmed", str(base.confirmed), str(lead.confirmed)),
    ]
    if replays:
        rows.append((f"replay from history ({args.replays} workflows): CPU ms per replay",
                     f"{replays['baseline'][0]:.2f}", f"{replays['lead'][0]:.2f}"))
        rows.append(("  history events per replayed workflow", f"{replays['baseline'][1]:.1f}",
                     f"{replays['lead'][1]:.1f}"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "baseline", "")])
    w2 = max(len(r[2]) for r in rows + [("", "", "lead")])
    print(f"  {'':<{w0}}  {'baseline':>{w1}}  {'lead':>{w2}}")
    for name, a, b in rows:
        print(f"  {name:<{w0}}  {a:>{w1}}  {b:>{w2}}")
    cpu_ratio = base.cpu_ms_per_event / lead.cpu_ms_per_event if lead.cpu_ms_per_event else 0.0
    print(f"  ratio lead/baseline events/s: {ratio:.2f}  (target >= 0.8)")
    print(f"  ratio by CPU per event (baseline/lead ms, steadier when the machine is shared): {cpu_ratio:.2f}")
    round_ratios = [lead_eps / base_eps for base_eps, lead_eps in zip(base.rounds, lead.rounds) if base_eps]
    if len(round_ratios) > 1:
        print("  rounds (baseline / lead events/s, ratio): " + ", ".join(
            f"{b:.0f}/{l:.0f} {r:.2f}" for b, l, r in zip(base.rounds, lead.rounds, round_ratios))
            + f"; median ratio {statistics.median(round_ratios):.2f}")
    print("  history events per ingested event, by type (ingest only, before the final flush):")
    kinds = sorted({k for k, n in (base.history_by_type + lead.history_by_type).items() if n},
                   key=lambda k: -(lead.history_by_type[k] + base.history_by_type[k]))
    wk = max(len(k.removeprefix("EVENT_TYPE_")) for k in kinds) if kinds else 10
    for k in kinds:
        print(f"    {k.removeprefix('EVENT_TYPE_').lower():<{wk}}  "
              f"{base.history_by_type[k] / base.events:>6.2f}  {lead.history_by_type[k] / lead.events:>6.2f}")
    summary = {
        "shape": args.shape, "cache": args.cache, "key_cache_seconds": args.key_cache_seconds, "audit_max_lag": args.audit_max_lag,
        "leads": args.leads, "events_per_lead": args.events, "concurrency": args.concurrency,
        "server": server_kind, "store": store_kind, "dynamic_config": {**DEV_SERVER_DYNAMIC_CONFIG, **dict(kv.split("=", 1) for kv in args.dynamic_config)}, "cpus": os.cpu_count(), "pinned": args.pin,
        "baseline_eps": round(base.events_per_s, 1), "lead_eps": round(lead.events_per_s, 1),
        "ratio": round(ratio, 3),
        "cpu_ratio": round(cpu_ratio, 3),
        "rounds": args.rounds,
        **({"round_ratios": [round(r, 3) for r in round_ratios],
            "median_round_ratio": round(statistics.median(round_ratios), 3)} if len(round_ratios) > 1 else {}),
        "baseline_hist_per_event": round(base.history_per_event, 2),
        "lead_hist_per_event": round(lead.history_per_event, 2),
        "lead_flush_hist_per_event": round(lead.flush_history_per_event, 2),
        "sweeper_queries": lead.sweeper_queries, "sweeper_confirmed": lead.sweeper_confirmed,
        "sweeper_vouched": lead.sweeper_vouched,
        "continue_as_new": lead.continued_as_new,
        "baseline_cpu_bench_s": round(base.cpu_bench_s, 1), "baseline_cpu_server_s": round(base.cpu_server_s, 1),
        "lead_cpu_bench_s": round(lead.cpu_bench_s, 1), "lead_cpu_server_s": round(lead.cpu_server_s, 1),
        "baseline_cpu_ms_per_event": round(base.cpu_ms_per_event, 2),
        "lead_cpu_ms_per_event": round(lead.cpu_ms_per_event, 2),
        "rss_mb": [round(base.rss_before_mb), round(base.rss_after_mb), round(lead.rss_before_mb),
                   round(lead.rss_after_mb)],
        "confirmed": base.confirmed and lead.confirmed,
        **({"replay_cpu_ms": [round(replays["baseline"][0], 2), round(replays["lead"][0], 2)],
            "replay_history_events": [round(replays["baseline"][1], 1), round(replays["lead"][1], 1)]}
           if replays else {}),
    }
    print(json.dumps(summary, separators=(",", ":")))
    return summary


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--leads", type=int, default=50, help="leads (workflows) per phase (default 50)")
    p.add_argument("--events", type=int, default=40, help="events per lead (default 40)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent senders sharing one client (default 32)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--db-file", dest="in_memory", action="store_false",
                      help="dev server persists to a SQLite file in a temp dir (default)")
    mode.add_argument("--in-memory", dest="in_memory", action="store_true", help="dev server keeps state in memory")
    p.set_defaults(in_memory=False)
    p.add_argument("--store", default="sqlite",
                   help="audit store: 'sqlite' (a file in the temp dir, default) or a database URL, e.g.\n"
                        "postgresql+psycopg://user:pw@host/db (rows of earlier runs are not counted)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat baseline then lead this many times on the same server, with new leads\n"
                        "each round, and sum the rounds (a shared machine is noisy; default 1)")
    p.add_argument("--dynamic-config", action="append", default=[], metavar="KEY=JSON",
                   help="dev-server dynamic config on top of the embedded default's\n"
                        "(config.DEV_SERVER_DYNAMIC_CONFIG), repeatable, e.g.\n"
                        "system.enableActivityEagerExecution=false")
    p.add_argument("--seed", type=int, default=1, help="random seed of the event mix (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (server db, audit db)")
    p.add_argument("--shape", choices=["burst", "sparse"], default="burst",
                   help="burst: each lead's events one after another (default); sparse: --leads leads created "
                        "first (untimed), then leads x events events, each to a random existing lead")
    p.add_argument("--audit-max-lag", default="30", type=lambda v: None if v == "never" else float(v),
                   help="LEADFLOW_AUDIT_MAX_LAG of the leads: seconds, or never (default 30)")
    p.add_argument("--cache", type=int, default=1000,
                   help="workflows the workers keep cached (default 1000, the SDK's); sparse traffic over more "
                        "leads than this replays most leads from their history")
    p.add_argument("--key-cache-seconds", type=float, default=Settings().key_cache_seconds,
                   help="LEADFLOW_KEY_CACHE_SECONDS: how often a process looks for changed lead keys (default:\n"
                        "the setting's). Code before 2026-11-24 expired keys this long after reading them, so a\n"
                        "small value showed there what leads idle for days cost; now it is the looks' cost")
    p.add_argument("--replays", type=int, default=0, metavar="N",
                   help="after the rounds, replay N workflows of each phase of the last round from their\n"
                        "histories in this process and print the worker CPU per replay (what an event to an\n"
                        "uncached workflow costs the worker). Default 0: off")
    p.add_argument("--pin", action="store_true",
                   help="the dev server on CPU 0, this process (worker, senders) on the others, as when the\n"
                        "worker runs on its own machine: the lead's worker CPU then does not slow the server\n"
                        "(Linux, 2+ CPUs; both phases pinned alike)")
    args = p.parse_args(argv)
    if args.pin and (not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2):
        p.error("--pin needs Linux and at least 2 CPUs")
    if args.replays < 0:
        p.error("--replays must be 0 or more")
    if min(args.leads, args.events, args.concurrency, args.rounds) < 1:
        p.error("--leads, --events, --concurrency and --rounds must be at least 1")
    return args


async def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="leadflow-bench-"))
    database_url = f"sqlite:///{tmp / 'audit.db'}" if args.store == "sqlite" else args.store
    store_kind = "sqlite file" if args.store == "sqlite" else database_url.split("://")[0]
    server_kind = "in memory" if args.in_memory else "sqlite file (WAL)"
    cpus = os.sched_getaffinity(0) if args.pin else set()
    if args.pin:  # before the SDK's runtime starts its threads
        pin("self", cpus - {min(cpus)})
    print(f"starting the dev server ({server_kind}) in {tmp} ...", file=sys.stderr)
    key = new_key()
    if args.keep:  # what a kept server db is read with: LEADFLOW_PAYLOAD_KEYS_FILE=<tmp>/payload-keys.toml
        (tmp / "payload-keys.toml").write_text(f'current = "bench"\n\n[keys]\nbench = "{key_spec("bench", key).split(":", 1)[1]}"\n')
    env = await start_embedded(tmp, AuditStore(database_url), key=key, in_memory=args.in_memory,
                               dynamic_config=dict(kv.split("=", 1) for kv in args.dynamic_config),
                               key_cache_seconds=args.key_cache_seconds)
    base = Phase("baseline", workflows=0, events=0)
    lead = Phase("lead", workflows=0, events=0)
    try:
        server_pids = child_pids()
        for pid in server_pids if args.pin else ():
            pin(pid, {min(cpus)})
        for n in range(1, args.rounds + 1):
            prefix = f"b{uuid.uuid4().hex[:6]}"  # new leads each round
            if args.shape == "sparse":
                setup, events = make_sparse(prefix, args.leads, args.leads * args.events, args.seed)
            else:
                setup, events = [], make_events(prefix, args.leads, args.events, args.seed)
            lead_ids = sorted({e.lead_id for e in [*setup, *events]})
            expected = Counter(e.lead_id for e in [*setup, *events])
            print(f"round {n}, phase 1: baseline (counting workflow) ...", file=sys.stderr)
            b = await run_baseline(env.client, events, lead_ids, expected, args.concurrency, server_pids, setup,
                                   args.cache)
            print(f"  {b.events_per_s:.1f} events/s, CPU ms per event: bench {1000 * b.cpu_bench_s / b.events:.1f}, "
                  f"server {1000 * b.cpu_server_s / b.events:.1f}", file=sys.stderr)
            settings = Settings(task_queue=f"bench-lead-{uuid.uuid4().hex[:8]}", database_url=database_url,
                                audit_max_lag_seconds=args.audit_max_lag)
            print(f"round {n}, phase 2: lead workflow ...", file=sys.stderr)
            ld = await run_lead(env.client, settings, events, lead_ids, expected, args.concurrency, prefix,
                                server_pids, setup, args.cache)
            print(f"  {ld.events_per_s:.1f} events/s, CPU ms per event: bench {1000 * ld.cpu_bench_s / ld.events:.1f}, "
                  f"server {1000 * ld.cpu_server_s / ld.events:.1f}", file=sys.stderr)
            if n == 1:
                base.rss_before_mb, lead.rss_before_mb = b.rss_before_mb, ld.rss_before_mb
            base.add(b)
            lead.add(ld)
        replays = {}
        if args.replays:
            print(f"replaying {args.replays} workflows of each phase ...", file=sys.stderr)
            replays = await replay_cost(env.client, {
                "baseline": (CountingWorkflow, [f"count-{lead}" for lead in lead_ids[:args.replays]]),
                "lead": (LeadWorkflow, [lead_workflow_id(lead) for lead in lead_ids[:args.replays]])})
    finally:
        await env.shutdown()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return report(args, server_kind, store_kind, base, lead, replays)


if __name__ == "__main__":
    asyncio.run(main())
