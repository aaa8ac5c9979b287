"""The lead's audit goes to the store on a cadence.

Each write is an activity and costs the server about as much as taking an event, so
the entries in DEFERRABLE (score changes, duplicates, profile facts, ...) wait, up to
`max_lag` or BATCH_MAX entries; anything else (a stage change, a command, an SLA, an
outbound message) writes everything pending at once, before deliveries start and
before a command returns. Until written, entries are part of the lead's workflow
state (rebuilt from Temporal's history like the rest of it) and readable by the
`audit_tail` query, so `client.read_history` always shows all of them.

From version 4 (`swept`), waiting entries cost the lead nothing more: no lag timer and no
write. The lead notes itself in SWEEP_NOTES, and the worker's sweeper
(activities/audit_sweeper.py) reads its tail by query (no history event) and writes it to
the store beside the workflow, for many leads in one transaction. The lead does not learn
of it: it writes its tail again, at the next entry that must not wait or before its run
ends, and the store keeps the first copy of each (lead, seq). A query sees only state of
completed workflow tasks, which a replay rebuilds exactly, so what the sweeper writes is
what the lead would have written.

Since 2026-11-24 (no new version: nothing in a history changes) a lead hands the entries
each workflow task produced to the sweeper in memory, with the task's id and start time
(`Handed`), instead of only noting itself. The sweeper writes them once a later task of
the same run instance shows the task completed, or one read of the lead's newest history
events does; a task the server rejected is decided again, so its entries are never written.
What it cannot confirm it asks by query as before. This spares the query, and the replay
it costs when the worker has evicted the lead.

From version 8, each write also carries the input the lead took since the last one
(`TakenInput`), for the store's event log: the edge logs input at once but best effort,
and the lead's write makes the log complete. Taken input does not make a write due by
itself (it rides along with the next one, at the latest before the run ends), unless
UNLOGGED_MAX items wait.

From version 10, the write that comes before a handover also gives it its owner (`write(assign)`,
activity `record_audit_and_assign`): the owner comes back with the write. And a deadline that
starts (SLA_SET) may wait like a score change; its outcome may not.

Workflow code: only workflow time, timers and activities.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from funnel.models import (ActivityEvent, Assigned, AuditBatch, AuditEntry, AuditKind, Outbound, ProfileUpdate,
                               TakenInput)

AUDIT_TIMEOUT = timedelta(seconds=30)
BATCH_MAX = 200  # write when this many entries wait, whatever their age
UNLOGGED_MAX = 500  # ... or this many taken events and profile updates (~500 bytes each)
# Entries that may wait for the next write; any other kind writes at once. The owner
# comes back from the handover, which has told presales already (webhook and outbox
# carry it), so it need not cost a write of its own.
DEFERRABLE = frozenset({
    AuditKind.LEAD_CREATED, AuditKind.SCORE_CHANGED, AuditKind.PROFILE_UPDATED,
    AuditKind.DUPLICATE_IGNORED, AuditKind.EVENT_IGNORED, AuditKind.OWNER_ASSIGNED, AuditKind.CONSENT_CHANGED,
})


@dataclass(frozen=True)
class Handed:
    """Entries a lead produced in one workflow task, handed to its worker's sweeper. They may
    be written only once that very task is known to have completed (its WorkflowTaskStarted
    event `started_id`, at `started_at`, followed by WorkflowTaskCompleted in run `run_id`):
    a task that failed or timed out is decided again, and its entries with it."""

    lead_id: str
    run_id: str
    started_id: int
    started_at: datetime
    entries: tuple[AuditEntry, ...]
    # The run instance in this worker that handed them: its tasks reached it one after
    # another, each only once the one before had completed (a rejected completion evicts
    # the instance), so any later task it handed vouches for all its earlier ones.
    instance: int = 0


INSTANCES = itertools.count(1)  # numbers the run instances of this process (not workflow state)
HANDED_MAX = 20_000  # per task queue; beyond it a lead is noted instead (its tail read by query)


class SweepNotes:
    """Leads whose audit waits in their state, per task queue, for the sweeper of the worker
    that ran them (one per process and task queue). Workflow code only adds to it, and not
    while replaying: a hint for the sweeper, never read back by a workflow. A lead either
    hands the entries it produced (`hand`) or only notes itself (`note`: the sweeper asks)."""

    def __init__(self) -> None:
        self._leads: dict[str, dict[str, None]] = {}  # task queue -> leads, oldest note first
        self._handed: dict[str, list[Handed]] = {}  # task queue -> handed entries, oldest first
        self._lock = threading.Lock()  # leads note on workflow threads, the sweeper takes on its loop

    def note(self, task_queue: str, lead_id: str) -> None:
        with self._lock:
            leads = self._leads.setdefault(task_queue, {})
            leads.pop(lead_id, None)  # noted again: now the newest
            leads[lead_id] = None

    def hand(self, task_queue: str, handed: Handed) -> None:
        with self._lock:
            queue = self._handed.setdefault(task_queue, [])
            if len(queue) < HANDED_MAX:
                queue.append(handed)
                return
        self.note(task_queue, handed.lead_id)  # no sweeper takes them (or it is far behind)

    def take(self, task_queue: str) -> list[str]:
        """The leads noted since the last take, oldest note first."""
        with self._lock:
            return list(self._leads.pop(task_queue, {}))

    def take_handed(self, task_queue: str) -> list[Handed]:
        """The entries handed since the last take, oldest first."""
        with self._lock:
            return self._handed.pop(task_queue, [])


SWEEP_NOTES = SweepNotes()


# Version 10 (RunBehaviour.defers_deadlines): a deadline that starts waits too; its outcome does not.
DEFERRABLE_V10 = DEFERRABLE | {AuditKind.SLA_SET}


class AuditCadence:
    def __init__(self, max_lag: timedelta | None, written_seq: int, enabled: bool = True, swept: bool = False,
                 lead_id: str = "", defers_deadlines: bool = False):
        self.deferrable = DEFERRABLE_V10 if defers_deadlines else DEFERRABLE
        self.max_lag = max_lag
        self.enabled = enabled  # False (version-1 runs): every batch is written at once
        self.swept = swept  # version 4: the worker's sweeper writes what waits (no lag timer)
        self.lead_id = lead_id
        self.written_seq = written_seq
        self.unwritten: list[AuditEntry] = []  # produced, not yet sent to the store
        self.writing: list[AuditEntry] = []  # sent, not yet confirmed
        self.unlogged: list[TakenInput] = []  # input taken since the last write (version 8)
        self.to_log = 0  # items handed to `log` in this run ...
        self.logged = 0  # ... and of them, written
        self.flush_requested = False  # a command, the lag timer or flush_audit wants it now
        self.wrote = False  # set by each write; the workflow refreshes search attributes
        self._lag_timer: asyncio.Task | None = None
        # Entries up to this seq were handed to the sweeper by this run instance (seqs start at
        # 1: its first live task hands the whole tail). Not workflow state: what this process told.
        self._handed_seq = 0
        self._instance = next(INSTANCES)

    @property
    def tail(self) -> list[AuditEntry]:
        """Entries the store may not have yet, oldest first."""
        return self.writing + self.unwritten

    def tail_after(self, seq: int) -> list[AuditEntry]:
        return [entry for entry in self.tail if entry.seq > seq]

    def add(self, entries: list[AuditEntry]) -> None:
        self.unwritten += entries

    def log(self, items: list[ActivityEvent | ProfileUpdate], at) -> None:
        """Input the lead took at `at`, for the event log with the next write."""
        if items:
            self.unlogged.append(TakenInput(received_at=at, items=items))
            self.to_log += len(items)

    @property
    def waiting(self) -> bool:
        """Whether anything waits for a write (the run must not end before it)."""
        return bool(self.unwritten or self.unlogged)

    def due(self, outbound: bool) -> bool:
        """Whether what waits must be written now."""
        if not self.waiting:
            return False
        if not self.enabled or self.flush_requested or outbound or self.max_lag == timedelta(0):
            return True
        if len(self.unwritten) >= BATCH_MAX or sum(len(t.items) for t in self.unlogged) >= UNLOGGED_MAX:
            return True
        return any(entry.kind not in self.deferrable for entry in self.unwritten)

    async def write(self, assign: list[Outbound] = ()) -> Assigned | None:
        """Write what waits; with `assign` (version 10), the same activity gives these
        handovers their owners and returns them."""
        # A regular activity, not a local one: it is scheduled only by a workflow task
        # that completed, so the rows are always decisions Temporal kept. (A local
        # activity runs inside the task; if that task then fails, e.g. a continue-as-new
        # refused because signals came in, its retry decides anew under the same
        # `lead/seq` ids and the store would keep stale rows.)
        self.writing, self.unwritten = self.unwritten, []
        taken, self.unlogged = self.unlogged, []
        self.flush_requested = False
        if assign:
            activity, batch, answer = ("record_audit_and_assign",
                                       AuditBatch(entries=self.writing, taken=taken, assign=list(assign)), Assigned)
        else:
            activity, batch, answer = ("record_audit", AuditBatch(entries=self.writing, taken=taken) if taken
                                       else self.writing, int)
        result = await workflow.execute_activity(
            activity, batch, result_type=answer, start_to_close_timeout=AUDIT_TIMEOUT,
            retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=30)),
        )
        if self.writing:
            self.written_seq = self.writing[-1].seq
        self.logged += sum(len(t.items) for t in taken)
        self.writing = []
        self.wrote = True
        return result if assign else None

    def settle(self) -> None:
        """After a round of effects: keep one lag timer while entries wait, none otherwise.
        One timer per write cycle, never restarted per event (a timer per event would cost
        as much as the writes it saves). (Taken input alone waits for the next write.)"""
        if not self.unwritten:
            self.flush_requested = False
            if self._lag_timer is not None:  # nothing waits: a firing timer would wake us for nothing
                self._lag_timer.cancel()
                self._lag_timer = None
        elif self.swept:
            if self.max_lag is not None:
                self._hand()
        elif self.enabled and self._lag_timer is None and self.max_lag is not None:
            self._lag_timer = asyncio.create_task(self._flush_after_lag())

    def _hand(self) -> None:
        """Hand the entries this workflow task produced to the sweeper, with the task they
        came from. The first live task of a run instance hands its whole tail: what earlier
        instances handed may have been lost with a worker, and the sweeper skips what it wrote."""
        if workflow.unsafe.is_replaying():
            return
        new = [e for e in self.unwritten if e.seq > self._handed_seq]
        if new:
            info = workflow.info()
            SWEEP_NOTES.hand(info.task_queue, Handed(self.lead_id, info.run_id, info.get_current_history_length(),
                                                     workflow.now(), tuple(new), self._instance))
            self._handed_seq = new[-1].seq

    async def _flush_after_lag(self) -> None:
        assert self.max_lag is not None
        await workflow.sleep(self.max_lag)
        self._lag_timer = None
        if self.unwritten:
            self.flush_requested = True
