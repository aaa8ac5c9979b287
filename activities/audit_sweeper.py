"""The worker's audit sweeper: writes the entries leads keep waiting in their state.

A score change is decided in a workflow task, and writing it from the lead costs the lead
a lag timer, a write activity and two more workflow tasks: about 12 history events. For
real traffic (a lead gets an event, then nothing for days) that was every event's cost,
four times the event itself. Leads of version 4 (RunBehaviour.swept_audit) note
themselves instead (SWEEP_NOTES, workflows/audit_cadence.py); every `interval` this sweeper
takes the noted leads of its task queue, reads what waits by the `audit_tail` query (a
query adds nothing to a history) and writes all of it in one transaction. The store keeps
the first copy of each (lead, seq), so the lead's own later write of the same entries
changes nothing.

Leads also hand the entries of each workflow task to the sweeper (`Handed`): it writes them
once a read of the lead's newest history events shows that task completed (`task_outcome`),
with no query and no replay; what it cannot confirm so, it asks by query. A later task of
the same run instance vouches for the earlier ones with no read at all: the SDK's core
gives an instance its next task only once the server took the completion of the one
before, and evicts the instance if it did not. So the newest task of a busy instance
(one that handed in the last BUSY_SWEEPS sweeps too) waits for its successor, and a read
is made once the instance is quiet for a sweep: per burst of events to a lead, one read
instead of one per sweep. An instance's first task (all of them, under sparse traffic) is
read at once.

If a sweep fails (the store or Temporal down), its leads are noted again for the next one.
If the worker dies first, the entries are still in the leads' state (Temporal's history)
and reach the store with the lead's next write of its own: an entry that must not wait,
or the end of its run. `client.read_history` shows them meanwhile (store + tail).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import OrderedDict
from datetime import timedelta, timezone

from sqlalchemy.exc import SQLAlchemyError
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryReverseRequest
from temporalio.client import Client, WorkflowQueryRejectedError
from temporalio.service import RPCError, RPCStatusCode

import client as leads
from activities.store import AuditStore
from funnel.models import AuditEntry
from workflows.audit_cadence import HANDED_MAX, SWEEP_NOTES, Handed
from workflows.lead import workflow_id

log = logging.getLogger("leadflow.sweeper")

QUERY_CONCURRENCY = 16
OVERDUE = 5.0  # s a noted lead may wait while newer ones go first; then it is asked first
QUERY_TIMEOUT = 10.0  # s; a lead that does not answer is noted again
MAX_TRIES = 40  # sweeps in a row a lead may not answer (~10 s at 0.25 s) before it is left to write itself
REMEMBERED_LEADS = 100_000  # per lead, the last seq written: the next query asks only for newer ones
SAME_INSTANT = timedelta(microseconds=5)  # a task's start time as the lead saw it vs as the history has it
# A handed task's outcome is read from the run's newest history events, CONFIRM_PAGE at a time
# (almost always one page: the task, its completion and its commands), up to CONFIRM_REACH
# back; further back, the lead is asked by query. Measured (2 cores, sparse leads of ~10
# history events): a page of 16 cost the dev server 1.5-1.65 ms and the worker 0.53 ms per
# read, one of 4 1.2-1.3 ms and 0.44 ms: the 16 carried the run's input, its scoring model.
CONFIRM_PAGE = 4
CONFIRM_REACH = 16
BUSY_SWEEPS = 3  # an instance that handed within this many sweeps before is busy: its newest task waits


class AuditSweeper:
    def __init__(self, client: Client, store: AuditStore, task_queue: str, interval: float = 1.0):
        self.client = client
        self.store = store
        self.task_queue = task_queue
        self.interval = interval
        self._written: OrderedDict[str, int] = OrderedDict()
        self._failures: dict[str, int] = {}  # leads whose query failed, sweeps in a row
        self._waiting: OrderedDict[str, float] = OrderedDict()  # noted, not asked -> since when; newest last
        self._by_age: list[tuple[float, str]] = []  # heap of the same (since, lead); stale ones skipped
        self._asking: dict[str, asyncio.Task] = {}  # leads whose query is under way
        self._noted_again: set[str] = set()  # noted while asked: asked again after that answer
        self._answers: list[AuditEntry] = []  # answered, not written yet
        self._confirming: set[asyncio.Task] = set()  # handed entries whose task is being looked up
        self._unconfirmed: list[Handed] = []  # task not completed yet at the last look: looked up again
        self._deferred: dict[tuple[str, str, int], list[Handed]] = {}  # a busy instance's newest task
        self._last_handed: dict[tuple[str, str, int], int] = {}  # instance -> the sweep it last handed in
        self._sweeps = 0
        self._confirm_slots = asyncio.Semaphore(QUERY_CONCURRENCY)
        self._can_confirm = True  # False: the server cannot read a history backwards; leads are asked
        self._stopping = asyncio.Event()
        self._sweeping = asyncio.Lock()
        self.swept_entries = 0  # written by sweeps (new or not), for tests and figures
        self.queries = 0  # leads asked by query ...
        self.confirmed = 0  # ... and handed tasks confirmed by a history read ...
        self.vouched = 0  # ... and by a later task of the same instance, for figures

    async def run(self) -> None:
        """Every `interval`: look up the tasks of the entries handed since, ask the leads noted
        since, and write the answers that are in.
        A sweep does not wait for its slowest lead (one the worker must replay to answer):
        waiting let notes pile up, and by the time they were asked, more of those leads had
        left the worker's cache (measured: sweeps of 3-9 s with the sparse benchmark)."""
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            except TimeoutError:
                pass
            async with self._sweeping:  # never cut off half way by stop()
                try:
                    self._confirm_handed()
                    self._ask_noted()
                    await self._write_answers()
                except Exception:  # noqa: BLE001 - the loop outlives any one sweep
                    log.exception("audit sweep failed; its leads write their entries themselves later")

    async def stop(self, timeout: float = 10.0) -> None:
        """End the loop after its current sweep, and sweep once more (a worker shutting down:
        what its leads noted last reaches the store now, not with their next write)."""
        self._stopping.set()
        async with self._sweeping:
            try:
                await asyncio.wait_for(self.sweep(), timeout)
            except TimeoutError:
                log.warning("last audit sweep cut off after %.0f s; the leads write it themselves later", timeout)
                self._waiting.clear()  # (a cancelled ask would start the next one)
                self._by_age.clear()
                self._unconfirmed.clear()
                self._deferred.clear()
                for task in [*self._asking.values(), *self._confirming]:
                    task.cancel()

    async def sweep(self) -> int:
        """Confirm every handed entry and ask every lead noted (and those it could not
        confirm), wait for all answers (of earlier asks too) and write them; returns how many
        entries were new."""
        self._confirm_handed(defer=False)
        while self._confirming:  # what they cannot confirm is noted, and asked below
            await asyncio.gather(*self._confirming, return_exceptions=True)
        self._ask_noted()
        while self._asking:
            await asyncio.gather(*self._asking.values(), return_exceptions=True)
        return await self._write_answers()

    def _confirm_handed(self, defer: bool = True) -> None:
        """Take the entries handed since the last sweep (and those whose task had not completed
        at the last look, or waited): per run instance, those of tasks before its newest are
        vouched for by it; the newest is looked up by one read, unless the instance is busy
        (`defer`): then it waits for a later task to vouch for it, and is read once the
        instance hands nothing in a sweep."""
        new = SWEEP_NOTES.take_handed(self.task_queue)
        by_instance: dict[tuple[str, str, int], list[Handed]] = self._deferred
        self._deferred = {}
        for item in self._unconfirmed + new:
            by_instance.setdefault((item.lead_id, item.run_id, item.instance), []).append(item)
        self._unconfirmed = []
        self._sweeps += 1
        busy = set()
        for key in {(item.lead_id, item.run_id, item.instance) for item in new}:
            last = self._last_handed.get(key)
            if last is not None and self._sweeps - last <= BUSY_SWEEPS:
                busy.add(key)
            self._last_handed[key] = self._sweeps
        if len(self._last_handed) > HANDED_MAX:  # (quiet instances are forgotten)
            self._last_handed = {k: n for k, n in self._last_handed.items() if self._sweeps - n <= BUSY_SWEEPS}
        for key, items in by_instance.items():
            newest = max(item.started_id for item in items)
            vouched = [item for item in items if item.started_id < newest]
            if vouched:
                self.vouched += len({item.started_id for item in vouched})
                self._take(key[0], vouched)
            items = [item for item in items if item.started_id == newest]
            if defer and key in busy:
                self._deferred[key] = items
            elif not self._can_confirm:
                SWEEP_NOTES.note(self.task_queue, key[0])
            else:
                task = asyncio.create_task(self._confirm(items))
                self._confirming.add(task)
                task.add_done_callback(self._confirming.discard)

    def _take(self, lead_id: str, items: list[Handed]) -> None:
        """Entries of completed tasks, to be written (those not written yet)."""
        self._failures.pop(lead_id, None)
        written = self._written.get(lead_id, 0)
        self._answers.extend(e for item in items for e in item.entries if e.seq > written)

    def _ask_noted(self) -> None:
        """Newest note first, QUERY_CONCURRENCY at a time. A lead the worker still caches
        answers from memory; one it has evicted replays its whole history to answer. Under
        sparse traffic the cache turns over in about a second, so the lead noted last is the
        likeliest still there (`bench/ingest.py --shape sparse --cache 40`, two runs each:
        asked in lead-id order, 70% of the queries replayed a lead; newest first, 54%).
        So that newer notes cannot starve older ones under a sustained load, a lead waiting
        longer than OVERDUE goes first: overloaded, the sweeper asks oldest first."""
        now = time.monotonic()
        for lead_id in SWEEP_NOTES.take(self.task_queue):
            since = self._waiting.pop(lead_id, None)
            if since is None:
                since = now
                heapq.heappush(self._by_age, (since, lead_id))
            self._waiting[lead_id] = since  # the newest now, waiting since its first note
        self._ask_waiting()

    def _ask_waiting(self) -> None:
        while self._waiting and len(self._asking) < QUERY_CONCURRENCY:
            while self._waiting.get(self._by_age[0][1]) != self._by_age[0][0]:
                heapq.heappop(self._by_age)  # asked already (newest first), or noted anew since
            since, lead_id = self._by_age[0]
            if time.monotonic() - since > OVERDUE:
                heapq.heappop(self._by_age)
                del self._waiting[lead_id]
            else:
                lead_id, _ = self._waiting.popitem(last=True)
            if lead_id in self._asking:
                self._noted_again.add(lead_id)
            else:
                self._asking[lead_id] = asyncio.create_task(self._ask(lead_id))
        if not self._waiting:
            self._by_age.clear()  # only stale entries left

    async def _ask(self, lead_id: str) -> None:
        try:
            try:  # [] for a lead that is gone or won (it wrote everything before it ended)
                self.queries += 1
                got = await leads.audit_tail(self.client, lead_id, QUERY_TIMEOUT,
                                             after_seq=self._written.get(lead_id, 0))
            except WorkflowQueryRejectedError:
                got = []  # the run failed or was terminated: it will not answer again
            except Exception:  # noqa: BLE001 - no answer in time, a failed query, the server away: again
                got = None
        finally:
            del self._asking[lead_id]
            self._ask_waiting()  # the next newest, now, not at the next sweep
        if got is None:
            if self._retry(lead_id):
                SWEEP_NOTES.note(self.task_queue, lead_id)
        else:
            self._failures.pop(lead_id, None)
            self._answers.extend(got)
        if lead_id in self._noted_again:
            self._noted_again.discard(lead_id)
            SWEEP_NOTES.note(self.task_queue, lead_id)

    async def _confirm(self, items: list[Handed]) -> None:
        """Take handed entries once the workflow task that produced them is in the lead's
        history as completed: its WorkflowTaskStarted at `started_id` (at `started_at`), then
        WorkflowTaskCompleted. One read of the newest history events (a page, rarely a few), no
        workflow task and no replay (a query on an evicted lead replays it). A task that failed
        or timed out, or one further back than CONFIRM_REACH: the lead is asked by query, which
        sees completed tasks only. Not completed yet: looked up again at the next sweep."""
        handed = max(items, key=lambda item: item.started_id)
        async with self._confirm_slots:
            try:
                newest_first = await self._newest_events(handed)
            except Exception as err:  # noqa: BLE001 - the server away, a timeout: again at the next sweep
                status = err.status if isinstance(err, RPCError) else None
                if status == RPCStatusCode.NOT_FOUND:
                    return  # the run is gone (its history deleted): nothing to confirm it by
                if status == RPCStatusCode.UNIMPLEMENTED:  # e.g. the SDK's time-skipping test server
                    self._can_confirm = False
                    SWEEP_NOTES.note(self.task_queue, handed.lead_id)
                elif self._retry(handed.lead_id):
                    self._unconfirmed += items
                return
        outcome = task_outcome(newest_first, handed)
        if outcome is None:  # still running: the completion is on its way
            if self._retry(handed.lead_id):
                self._unconfirmed += items
            else:
                SWEEP_NOTES.note(self.task_queue, handed.lead_id)  # asked: a query waits for the task
        elif outcome:
            self.confirmed += 1
            self._take(handed.lead_id, items)
        else:
            SWEEP_NOTES.note(self.task_queue, handed.lead_id)

    async def _newest_events(self, handed: Handed) -> list:
        """The run's newest history events, newest first, back to `handed.started_id` (or
        CONFIRM_REACH of them, or the run's start)."""
        events: list = []
        token = b""
        while True:
            page = await self.client.workflow_service.get_workflow_execution_history_reverse(
                GetWorkflowExecutionHistoryReverseRequest(
                    namespace=self.client.namespace, maximum_page_size=CONFIRM_PAGE, next_page_token=token,
                    execution=WorkflowExecution(workflow_id=workflow_id(handed.lead_id), run_id=handed.run_id)),
                timeout=timedelta(seconds=QUERY_TIMEOUT))
            events += page.history.events
            token = page.next_page_token
            if not token or not events or events[-1].event_id <= handed.started_id or len(events) >= CONFIRM_REACH:
                return events

    async def _write_answers(self) -> int:
        """All answers in, in one transaction; if it fails, their leads are noted again."""
        entries = list({(e.lead_id, e.seq): e for e in self._answers}.values())
        self._answers = []
        if not entries:
            return 0
        try:
            new = await asyncio.to_thread(self.store.write_audit, entries)
        except Exception as err:  # noqa: BLE001 - the store down (SQLAlchemyError) or worse: try again
            lead_ids = {entry.lead_id for entry in entries}
            level = logging.WARNING if isinstance(err, SQLAlchemyError) else logging.ERROR
            log.log(level, "audit sweep of %d lead(s) not written, trying again: %s", len(lead_ids),
                    (str(err).splitlines() or [type(err).__name__])[0][:200])
            for lead_id in lead_ids:
                SWEEP_NOTES.note(self.task_queue, lead_id)
            return 0
        for entry in entries:
            self._remember(entry.lead_id, entry.seq)
        self.swept_entries += len(entries)
        return new

    def _retry(self, lead_id: str) -> bool:
        """Whether to ask a lead that did not answer again: up to MAX_TRIES sweeps in a row,
        then its entries wait for the lead's own next write (and reads merge them)."""
        failures = self._failures.get(lead_id, 0) + 1
        if failures >= MAX_TRIES:
            self._failures.pop(lead_id, None)
            log.warning("lead %s did not answer %d audit sweeps; its entries go with its own next write",
                        lead_id, failures)
            return False
        self._failures[lead_id] = failures
        return True

    def _remember(self, lead_id: str, seq: int) -> None:
        if seq > self._written.get(lead_id, 0):
            self._written[lead_id] = seq
            self._written.move_to_end(lead_id)
            while len(self._written) > REMEMBERED_LEADS:
                self._written.popitem(last=False)


def task_outcome(newest_first, handed: Handed) -> bool | None:
    """From a run's newest history events: True if the workflow task started at event
    `handed.started_id`, at `handed.started_at`, completed; None if its outcome is not in the
    history yet; False if it did not complete (failed, timed out, another task at that id) or
    the events read do not reach back to it."""
    by_id = {event.event_id: event for event in newest_first}
    if by_id and max(by_id) == handed.started_id:
        return None  # the task is still running, or its completion is on its way
    started, after = by_id.get(handed.started_id), by_id.get(handed.started_id + 1)
    if started is None or after is None or started.event_type != EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
        return False
    # workflow.now() goes through a float: the same instant within a few microseconds
    if abs(started.event_time.ToDatetime(tzinfo=timezone.utc) - handed.started_at) > SAME_INSTANT:
        return False  # a task at the same id, not the one that produced the entries
    return after.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
