"""A lead tells its account what changed, beside its loop (workflows/lead.py, version 7+):
the latest snapshot only, one activity at a time, so a busy lead costs its account one
signal per change it can keep up with, and a lead without an account costs nothing.

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
    def __init__(self) -> None:
        self._sent: ContactSnapshot | None = None
        self._pending: ContactSnapshot | None = None
        self._busy = False

    def offer(self, snapshot: ContactSnapshot | None) -> None:
        if snapshot is None or same_for_account(snapshot, self._pending or self._sent):
            return
        self._pending = snapshot
        if not self._busy:
            self._busy = True
            asyncio.create_task(self._send())

    async def _send(self) -> None:
        while self._pending is not None:
            snapshot, self._pending = self._pending, None
            await workflow.execute_activity("feed_account", snapshot, start_to_close_timeout=FEED_TIMEOUT,
                                            retry_policy=FEED_RETRY)
            self._sent = snapshot
        self._busy = False
