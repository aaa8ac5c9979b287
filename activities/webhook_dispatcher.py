"""The worker's webhook dispatcher: posts the subscriptions' deliveries (webhook_store.py).

It runs beside the worker, not in the leads: a receiver that is down for days costs its
deliveries retries, never a lead's progress or history. Each delivery is signed per the
Standard Webhooks convention with its subscription's secret (`webhook-id` is the delivery
id, the same on every attempt; `webhook-timestamp` the attempt's time), retried on a
network error, a timeout or a non-2xx answer on the schedule below, and after the last
attempt left in the dead letter (status `dead`) for a manager to replay.

Several workers may share a store: a delivery is leased to one dispatcher while it posts.
A delivery can still reach its receiver twice (a post whose answer was lost), which the
stable `webhook-id` lets the receiver recognise.

A lead's deliveries to one subscription arrive in the order they were recorded (a CRM that
sets the stage from them never goes back from SAL to MQL): the dispatcher posts them one
after another, and a failed one holds the later ones back until it is delivered or dead.
Different leads' deliveries go out concurrently.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import nullcontext
import logging
from datetime import datetime, timedelta, timezone

import httpx
from standardwebhooks import Webhook

from activities import webhook_store
from activities.store import AuditStore

log = logging.getLogger("leadflow.webhooks")

# The retry schedule is Settings.webhook_retry_seconds: by default Standard Webhooks'
# suggestion (immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h), then the dead letter.
POST_TIMEOUT = 10.0  # s
BATCH = 50  # deliveries claimed per round
LEASE = timedelta(seconds=60)  # longer than a post may take (POST_TIMEOUT) with room


class WebhookDispatcher:
    def __init__(self, store: AuditStore, schedule: list[float], interval: float = 0.5,
                 http: httpx.AsyncClient | None = None):
        self.store = store
        self.interval = interval
        self.schedule = schedule
        self._http = http
        self._stopping = asyncio.Event()
        self.attempts = 0  # posts made, for tests and figures

    async def run(self) -> None:
        """Every `interval`, post what is due (at once again while there was a full batch)."""
        # A caller's client is used as it is, not closed here.
        async with httpx.AsyncClient(timeout=POST_TIMEOUT) if self._http is None else nullcontext(self._http) as http:
            while not self._stopping.is_set():
                try:
                    busy = await self.dispatch(http)
                except Exception:  # noqa: BLE001 - the loop outlives a store outage
                    log.exception("webhook dispatch failed; retrying")
                    busy = False
                if not busy:
                    try:
                        await asyncio.wait_for(self._stopping.wait(), self.interval)
                    except TimeoutError:
                        pass

    async def stop(self) -> None:
        self._stopping.set()

    async def dispatch(self, http: httpx.AsyncClient) -> bool:
        """One round: claim due deliveries, post each lead's in order (leads concurrently),
        record each outcome. True if the batch was full (more may be due)."""
        now = datetime.now(timezone.utc)
        claimed = await asyncio.to_thread(webhook_store.claim_due, self.store, now, LEASE, BATCH)
        in_order: dict[tuple[str, str], list] = {}
        for delivery, sub in claimed:
            in_order.setdefault(webhook_store.in_order_of(delivery), []).append((delivery, sub))
        await asyncio.gather(*(self._post_in_order(http, queue) for queue in in_order.values()))
        return len(claimed) == BATCH

    async def _post_in_order(self, http: httpx.AsyncClient, queue: list) -> None:
        for done, (delivery, sub) in enumerate(queue):
            if not await self._attempt(http, delivery, sub):
                await asyncio.to_thread(webhook_store.release, self.store,
                                        [later.delivery_id for later, _ in queue[done + 1:]])
                return

    async def _attempt(self, http: httpx.AsyncClient, delivery, sub) -> bool:
        """Post one delivery and record the outcome; True if it was delivered."""
        body = json.dumps(delivery.body, separators=(",", ":"))
        sent_at = datetime.now(timezone.utc).replace(microsecond=0)
        headers = {"content-type": "application/json", "webhook-id": delivery.delivery_id,
                   "webhook-timestamp": str(int(sent_at.timestamp())),
                   "webhook-signature": Webhook(sub.secret).sign(delivery.delivery_id, sent_at, body)}
        status, error = None, None
        try:
            response = await http.post(sub.url, content=body.encode("utf-8"), headers=headers)
            status = response.status_code
            if not response.is_success:
                error = f"answered {status}: {response.text[:200]}"
        except httpx.HTTPError as err:
            error = f"unreachable: {err!r}"
        self.attempts += 1
        attempt = delivery.attempts + 1
        retry_in = None if error is None or attempt > len(self.schedule) else timedelta(
            seconds=self.schedule[attempt - 1])
        if error is not None:
            log.info("webhook %s to %s failed (attempt %d): %s%s", delivery.delivery_id, sub.url, attempt, error,
                     "" if retry_in else "; dead letter")
        await asyncio.to_thread(webhook_store.record_attempt, self.store, delivery.delivery_id,
                                datetime.now(timezone.utc), error is None, status, error, retry_in)
        return error is None

