"""A lead tells its account what changed, beside its loop (workflows/lead.py, version 7+):
the latest snapshot only, one activity at a time, so a busy lead costs its account one
signal per change it can keep up with, and a lead without an account costs nothing.
From version 9 a lead that leaves its account (its facts name another or none) tells the
old account first, and what is not yet told goes with the lead into its next run.

Workflow code: only activities and workflow tasks.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from funnel.accounts import ContactSnapshot, same_for_account

FEED_TIMEOUT = timedelta(seconds=30)
FEED_RETRY = RetryPolicy(maximum_interval=timedelta(minutes=1))


class AccountFeed:
    """`account` is the account the lead last told it belongs to (None: none yet). With
    `per_account` (version 9) a waiting snapshot is replaced only by a newer one for the same
    account, so a departure is never overtaken and lost; before, the newest snapshot replaced
    whatever waited (kept so that old runs replay)."""

    def __init__(self, account: str | None = None, per_account: bool = False) -> None:
        self.account = account
        self._per_account = per_account
        self._offered: ContactSnapshot | None = None  # the newest offered
        self._told: ContactSnapshot | None = None  # the newest whose activity completed
        self._queue: list[ContactSnapshot] = []
        self._sending: ContactSnapshot | None = None
        self._busy = False

    def resume(self, untold: list[ContactSnapshot]) -> None:
        """Tell what the previous run had not told for sure (in the run, not at init: it
        starts an activity)."""
        for snapshot in untold:
            self.offer(snapshot)

    @property
    def idle(self) -> bool:
        return not self._busy

    def untold(self) -> list[ContactSnapshot]:
        """What the accounts may not have heard yet (the one being sent included: telling it
        twice changes nothing), for the lead's next run."""
        return ([self._sending] if self._sending is not None else []) + self._queue

    def offer(self, snapshot: ContactSnapshot | None) -> None:
        # Version 7-8 compared with what waits, else with what was told (not with what is
        # being sent, so it could send the same twice); that stays, so their runs replay.
        known = self._offered if self._per_account else (self._queue[-1] if self._queue else self._told)
        if snapshot is None or same_for_account(snapshot, known):
            return
        self._offered = snapshot
        self.account = None if snapshot.left else snapshot.account_id
        if self._per_account:
            self._queue = [q for q in self._queue if q.account_id != snapshot.account_id] + [snapshot]
        else:
            self._queue = [snapshot]
        if not self._busy:
            self._busy = True
            asyncio.create_task(self._send())

    async def _send(self) -> None:
        while self._queue:
            self._sending = self._queue.pop(0)
            await workflow.execute_activity("feed_account", self._sending, start_to_close_timeout=FEED_TIMEOUT,
                                            retry_policy=FEED_RETRY)
            self._told, self._sending = self._sending, None
        self._busy = False
