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

If a sweep fails (the store or Temporal down), its leads are noted again for the next one.
If the worker dies first, the entries are still in the leads' state (Temporal's history)
and reach the store with the lead's next write of its own: an entry that must not wait,
or the end of its run. `client.read_history` shows them meanwhile (store + tail).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from sqlalchemy.exc import SQLAlchemyError
from temporalio.client import Client, WorkflowQueryRejectedError

import client as leads
from activities.store import AuditStore
from funnel.models import AuditEntry
from workflows.audit_cadence import SWEEP_NOTES

log = logging.getLogger("leadflow.sweeper")

QUERY_CONCURRENCY = 16
QUERY_TIMEOUT = 10.0  # s; a lead that does not answer is noted again
MAX_TRIES = 40  # sweeps in a row a lead may not answer (~10 s at 0.25 s) before it is left to write itself
REMEMBERED_LEADS = 100_000  # per lead, the last seq written: the next query asks only for newer ones


class AuditSweeper:
    def __init__(self, client: Client, store: AuditStore, task_queue: str, interval: float = 1.0):
        self.client = client
        self.store = store
        self.task_queue = task_queue
        self.interval = interval
        self._written: OrderedDict[str, int] = OrderedDict()
        self._failures: dict[str, int] = {}  # leads whose query failed, sweeps in a row
        self._stopping = asyncio.Event()
        self._sweeping = asyncio.Lock()
        self.swept_entries = 0  # written by sweeps (new or not), for tests and figures

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            except TimeoutError:
                pass
            async with self._sweeping:  # a sweep is never cut off half way by stop()
                try:
                    await self.sweep()
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

    async def sweep(self) -> int:
        """One sweep of the leads noted since the last; returns how many entries were new."""
        lead_ids = sorted(SWEEP_NOTES.take(self.task_queue))
        if not lead_ids:
            return 0
        gate = asyncio.Semaphore(QUERY_CONCURRENCY)

        async def tail(lead_id: str) -> list[AuditEntry] | None:
            async with gate:
                try:  # [] for a lead that is gone or won (it wrote everything before it ended)
                    return await leads.audit_tail(self.client, lead_id, QUERY_TIMEOUT, after_seq=self._written.get(lead_id, 0))
                except WorkflowQueryRejectedError:
                    return []  # the run failed or was terminated: it will not answer again
                except Exception:  # noqa: BLE001 - no answer in time, a failed query, the server away: again
                    return None

        tails = await asyncio.gather(*(tail(lead) for lead in lead_ids))
        again = [lead for lead, got in zip(lead_ids, tails) if got is None and self._retry(lead)]
        for lead, got in zip(lead_ids, tails):
            if got is not None:
                self._failures.pop(lead, None)
        entries = [entry for got in tails if got for entry in got]
        new = 0
        if entries:
            try:
                new = await asyncio.to_thread(self.store.write_audit, entries)
            except Exception as err:  # noqa: BLE001 - the store down (SQLAlchemyError) or worse: try again
                level = logging.WARNING if isinstance(err, SQLAlchemyError) else logging.ERROR
                log.log(level, "audit sweep of %d lead(s) not written, trying again: %s", len(lead_ids),
                        (str(err).splitlines() or [type(err).__name__])[0][:200])
                again = lead_ids
                entries = []
        for entry in entries:
            self._remember(entry.lead_id, entry.seq)
        self.swept_entries += len(entries)
        for lead in again:
            SWEEP_NOTES.note(self.task_queue, lead)
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
