"""Limits and timeouts of the API: one place to read (and tune) them."""

from __future__ import annotations

from datetime import datetime, timezone




# --------------------------------------------------------------------------- limits

MAX_BODY_BYTES = 1024 * 1024  # per request, by Content-Length and while reading
MAX_BATCH = 500  # events per POST /events/batch
MAX_PAGE = 1000  # history entries, leads, outbox messages per read
SEND_CONCURRENCY = 16  # leads of one batch signalled at the same time
DOCS_ASSETS = "/docs/assets"  # Swagger UI's files (swagger-ui-bundle), served here
SEND_TIMEOUT = 20.0  # s for Temporal to take one lead's events (signal-with-start)
ANSWER_TIMEOUT = 30.0  # s for a lead to answer a command or query
CONNECT_TIMEOUT = 5.0  # s to (re)connect to Temporal
PROBE_TIMEOUT = 3.0  # s per readiness check
HEALTH_TTL = 2.0  # s the API trusts what Temporal said of the backlog
BEHIND_RETRY_AFTER = 30  # s a sender is told to wait when the workers are behind
EARLIEST_EVENT = datetime(1970, 1, 1, tzinfo=timezone.utc)
