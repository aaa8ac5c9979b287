"""One running timer for the lead's next wake-up (an SLA, a nurture step, decay, a
decision), kept apart like Temporal's samples keep their UpdatableTimer.

A wait with a timeout would start a timer and cancel it again for every signal (two
history events and two timer writes per event). Here a timer is started only for a
wake-up earlier than every one already running; a later one is left to the loop,
which looks again each time it wakes.

It also remembers the latest wake-up that fired (`fired_for`): the lead never reads a time
earlier than that (LeadWorkflow._now). The Python SDK 1.35 can hand a timer's firing to the
workflow stamped with the time of the task before: when a query reaches a worker that no
longer caches the lead and the history it reads already holds the firing, the worker applies
the firing there and then. A replay later stamps it with the task that recorded it, so the
lead decided differently live ("not due yet", a new timer) than on replay (due, a handover):
a nondeterminism error that wedged the lead (tests/test_workflow_stale_timer_stamp.py). A firing
always comes at or after the wake-up it was set for, so with correct stamps this changes
nothing.

Workflow code: only workflow time and timers.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow


class WakeTimer:
    def __init__(self) -> None:
        self._running: set[datetime] = set()
        self.due = False  # a timer fired since the loop last looked
        self.fired_for: datetime | None = None  # the latest wake-up whose timer fired

    def arm(self, wake: datetime | None) -> None:
        self.due = False
        if wake is None or any(pending <= wake for pending in self._running):
            return  # an earlier or equal timer wakes the loop, which then looks again
        self._running.add(wake)
        asyncio.create_task(self._sleep_until(wake))

    async def _sleep_until(self, wake: datetime) -> None:
        await workflow.sleep(max(wake - workflow.now(), timedelta(0)))
        self._running.discard(wake)
        self.due = True
        self.note_fired(wake)

    def note_fired(self, wake: datetime) -> None:
        """A timer set for `wake` fired (here, or a version-1 lead's wait with a timeout)."""
        if self.fired_for is None or wake > self.fired_for:
            self.fired_for = wake
