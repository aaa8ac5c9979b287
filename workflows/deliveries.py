"""Outbound messages go out beside the lead's loop: a webhook that is down retries on
its own and never holds up events, commands or timers of the lead.

A message that hands the lead to a team (`assign_to`: presales on MQL, sales on SQL)
first gets its owner (a short store write, retried quickly), which the lead records at
once; only then is the message, naming the owner, delivered. A receiver that is down
for hours therefore delays the webhook, not the owner. From version 10 the owner comes
with the audit write before the message (`start(message, assigned)`); older runs assign
it here, by an activity of its own.

Workflow code: only activities and workflow tasks.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Callable

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from funnel.models import Assigned, Outbound, OutboundKind
    from funnel.personal_data import ERASED, scrub_payload

DELIVERY_TIMEOUT = timedelta(minutes=2)
# Deliveries retry until the receiver is back (no attempt limit), at most every 10 minutes.
DELIVERY_RETRY = RetryPolicy(maximum_interval=timedelta(minutes=10))
ASSIGN_TIMEOUT = timedelta(seconds=30)
ASSIGN_RETRY = RetryPolicy(maximum_interval=timedelta(seconds=30))


class Deliveries:
    def __init__(self, on_owner: Callable[[str, str], None], assign_first: bool):
        self._on_owner = on_owner  # (owner, team): the lead records its new owner
        self._assign_first = assign_first  # False: version 1-2 runs hand over in one activity
        self.undelivered: dict[str, Outbound] = {}

    def scrub(self, made_until: datetime) -> None:
        """Erasure: messages made until then and still on their way lose the person's data
        (what a run carries over; the outbox stores late ones scrubbed as well)."""
        for message_id, message in list(self.undelivered.items()):
            if message.at <= made_until:
                self.undelivered[message_id] = message.model_copy(
                    update={"payload": scrub_payload(message.payload, ERASED)})

    def needs_owner(self, message: Outbound) -> bool:
        """Whether the message hands the lead to a team and names no owner yet."""
        return self._assign_first and message.assign_to is not None and "owner" not in message.payload

    def start(self, message: Outbound, assigned: Assigned | None = None) -> None:
        """Deliver `message`. `assigned` (version 10): the write before it gave it its owner
        and its outbox row already; the lead records the owner now, and the message goes out
        only if a webhook wants it."""
        owner = assigned.owners.get(message.message_id) if assigned is not None else None
        if owner is not None and message.assign_to is not None:
            self._on_owner(owner, message.assign_to)
            if not assigned.post:
                return
            message = message.with_owner(owner)
        self.undelivered[message.message_id] = message
        asyncio.create_task(self._deliver(message))

    async def _deliver(self, message: Outbound) -> None:
        if self._assign_first and message.assign_to and "owner" not in message.payload:
            # The owner and the outbox row in one short store write; the webhook after it.
            handed = await workflow.execute_activity(
                "assign_owner", message, result_type=dict,
                start_to_close_timeout=ASSIGN_TIMEOUT, retry_policy=ASSIGN_RETRY,
            )
            self._on_owner(handed["owner"], message.assign_to)
            message = self.undelivered.get(message.message_id, message)  # scrubbed meanwhile, if erased
            message = message.with_owner(handed["owner"])
            self.undelivered[message.message_id] = message  # carried over with its owner
            if handed["post"]:
                await self._post(message)
        elif not self._assign_first and message.kind == OutboundKind.HANDOVER:
            owner = await workflow.execute_activity(
                "hand_over", message, result_type=str, start_to_close_timeout=DELIVERY_TIMEOUT,
                retry_policy=DELIVERY_RETRY,
            )
            self._on_owner(owner, "presales")
        else:
            await self._post(message)
        del self.undelivered[message.message_id]

    async def _post(self, message: Outbound) -> None:
        await workflow.execute_activity(
            "deliver", message, start_to_close_timeout=DELIVERY_TIMEOUT, retry_policy=DELIVERY_RETRY
        )
