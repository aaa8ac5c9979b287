"""What the routes share: connections to Temporal and the audit store (Backends), the
active scoring model for edge checks, timeouts turned into 503/504, personal-data rules."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from fastapi import Request
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from temporalio.client import Client
from temporalio.service import RPCError

import client as leads
from activities.store import AuditStore
from config import Settings, connect
from funnel.models import AuditEntry, Role
from funnel.personal_data import MASK
from funnel.scoring_model import ScoringModel, load_model, parse_model

from api.limits import ANSWER_TIMEOUT, CONNECT_TIMEOUT, HEALTH_TTL, PROBE_TIMEOUT

log = logging.getLogger("leadflow.api")


class Behind(Exception):
    """The workers are too far behind to take more input now (503 with Retry-After)."""


class Unavailable(Exception):
    """Temporal or the audit store cannot be reached (503)."""


class NoAnswer(Exception):
    """The lead's workflow did not answer in time (504)."""

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers


class ActiveModel:
    """The scoring model the leads use, for checks at the edge (an event of a type it does
    not know is refused here with a clear message instead of ignored by the lead): the
    store's active version, re-read every few seconds, or the model file while the store
    has none (or cannot be reached). Also what a lead the API creates starts on, and which
    leads it sent to lately (those are running: they are not sent the model again)."""

    TTL_SECONDS = 2.0
    LEADS_REMEMBERED = 100_000  # ids of leads sent to, most recent (~10 MB)

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = load_model(self.path)
        self._active: ScoringModel | None = None
        self._read_at = -1e9
        self._sent_to: OrderedDict[str, None] = OrderedDict()

    async def get(self, backends: "Backends") -> ScoringModel:
        now = asyncio.get_running_loop().time()
        if now - self._read_at > self.TTL_SECONDS:
            self._read_at = now
            try:
                version = await backends.in_store(AuditStore.active_model)
            except Unavailable:
                version = None
            if version is not None and (self._active is None or self._active.ref != version.ref):
                self._active = parse_model(version.text, version.ref)
        return self._active or self._file

    def forget(self) -> None:
        self._read_at = -1e9

    async def for_starting(self, backends: "Backends", lead_id: str) -> ScoringModel | None:
        """What to start `lead_id` on, should this call create it: the store's active
        version, so the new lead need not read it (the API then passes its ~5 KB with the
        lead's input). None for a lead this process has sent to lately (it runs: the input
        is ignored), or when the store was not read (a new lead reads the model itself)."""
        if lead_id in self._sent_to:
            self._sent_to.move_to_end(lead_id)
            return None
        await self.get(backends)
        return self._active

    def sent(self, lead_id: str) -> None:
        """`lead_id` took a send: it runs (or has ended, which a start cannot change)."""
        self._sent_to[lead_id] = None
        self._sent_to.move_to_end(lead_id)
        while len(self._sent_to) > self.LEADS_REMEMBERED:
            self._sent_to.popitem(last=False)


class Backends:
    """Temporal and the audit store, connected lazily so the API starts (and /readyz can
    say what is missing) while either is down; a call that needs one gets a 503."""

    def __init__(self, settings: Settings, temporal: Client | None = None, store: AuditStore | None = None):
        self.settings = settings
        self._temporal = temporal
        self._store = store
        self._own_store = store is None
        self._connecting = asyncio.Lock()
        self._store_lock = threading.Lock()
        self._health: tuple[float, leads.QueueHealth] | None = None

    @property
    def address(self) -> str:
        return self.settings.temporal_address or os.environ.get("TEMPORAL_ADDRESS") or "localhost:7233"

    async def temporal(self) -> Client:
        if self._temporal is None:
            async with self._connecting:
                if self._temporal is None:
                    try:
                        self._temporal = await asyncio.wait_for(connect(self.settings), CONNECT_TIMEOUT)
                    except (TimeoutError, RuntimeError, OSError, RPCError) as err:
                        raise Unavailable(f"cannot reach Temporal at {self.address}: {first_line(err)}") from None
        return self._temporal

    def store(self) -> AuditStore:
        """Blocking (creates tables the first time): call it from a thread."""
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    try:
                        self._store = AuditStore(self.settings.database_url)
                    except SQLAlchemyError as err:
                        raise Unavailable(f"cannot reach the audit store: {first_line(err)}") from None
        return self._store

    async def in_store(self, fn, *args):
        """Run `fn(store, *args)` in a thread; store trouble becomes Unavailable (503)."""

        def call():
            try:
                return fn(self.store(), *args)
            except SQLAlchemyError as err:
                raise Unavailable(f"audit store error: {first_line(err)}") from None

        return await run_in_threadpool(call)

    async def queue_health(self, max_age: float = HEALTH_TTL) -> leads.QueueHealth:
        """How far behind the workers are, asked of Temporal at most every `max_age` seconds."""
        now = asyncio.get_running_loop().time()
        if self._health is None or now - self._health[0] > max_age:
            temporal = await self.temporal()
            try:
                health = await asyncio.wait_for(leads.queue_health(temporal, self.settings), PROBE_TIMEOUT)
            except (leads.TemporalUnavailable, TimeoutError) as err:
                raise Unavailable(str(err) or "Temporal did not say how far behind the workers are") from None
            self._health = (now, health)
        return self._health[1]

    async def check_not_behind(self) -> None:
        """Ingestion's back-pressure: refuse input while the oldest waiting workflow task is
        older than LEADFLOW_MAX_BACKLOG seconds. Not knowing (Temporal did not say) takes it."""
        try:
            health = await self.queue_health()
        except Unavailable:
            return
        if health.oldest_seconds > self.settings.max_backlog_seconds:
            raise Behind(
                f"Leadflow is behind: its workers have {health.backlog} lead task(s) waiting, the oldest for "
                f"{health.oldest_seconds:.0f} s (limit {self.settings.max_backlog_seconds:g} s; workers polling: "
                f"{health.workers}); retry later, nothing of this request was taken"
            )

    async def warm_up(self) -> None:
        try:
            await self.temporal()
        except Unavailable as err:
            log.warning("%s; will retry on the first request that needs it", err)
        try:
            await run_in_threadpool(self.store)
        except Unavailable as err:
            log.warning("%s; will retry on the first request that needs it", err)

    def close(self) -> None:
        if self._own_store and self._store is not None:
            self._store.dispose()


def first_line(err: BaseException) -> str:
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    return str(text).strip().splitlines()[0][:300] if str(text).strip() else type(err).__name__


def is_temporal_trouble(err: BaseException) -> bool:
    return isinstance(err, (RPCError, TimeoutError, ConnectionError, Unavailable)) or (
        isinstance(err, RuntimeError) and "connect" in str(err).lower()
    )


async def history_page(backends: Backends, lead_id: str, offset: int,
                       limit: int) -> tuple[int, list[AuditEntry], bool]:
    """One page of a lead's whole history (total, entries, complete): the lead's unwritten
    tail first, then the store (see client.read_history). The store alone still answers
    when Temporal is down (complete is then False): managers can audit regardless."""
    complete = True
    try:
        temporal = await backends.temporal()
        tail = await temporal_call(leads.audit_tail(temporal, lead_id), ANSWER_TIMEOUT, "query")
    except (Unavailable, NoAnswer):
        tail, complete = [], False

    def page(store: AuditStore) -> tuple[int, list[AuditEntry]]:
        return leads.merge_history(tail, store.count_history(lead_id),
                                   lambda o, n: store.history(lead_id, offset=o, limit=n), offset, limit)

    total, entries = await backends.in_store(page)
    return total, entries, complete


async def temporal_call(awaitable, timeout: float, what: str):
    """Await a Temporal call; unreachable -> Unavailable (503), no answer -> NoAnswer (504)."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise NoAnswer(
            f"no answer to the {what} within {timeout:.0f} s: is the worker running? "
            + ("A command may still be applied: read the lead to see." if what != "query" else "")
        ) from None
    except RPCError as err:
        raise Unavailable(f"Temporal error: {first_line(err)}") from None


def backends_of(request: Request) -> Backends:
    return request.app.state.backends


async def edge_model(request: Request) -> ScoringModel:
    return await request.app.state.scoring_model.get(backends_of(request))



# --------------------------------------------------------------------------- personal data


def reads_personal_data(request: Request, role: Role) -> bool:
    """Whether keys of `role` may read personal data (LEADFLOW_PII_READERS; default manager,
    presales, sales): the others get fact values, attributes and notes masked."""
    return role.value in backends_of(request).settings.pii_readers


MASKED_NOTE = (" Personal data (profile fact values, event attributes, notes, the free-text consent source) is "
           f"masked as \"{MASK}\" for roles not in LEADFLOW_PII_READERS (default: manager, presales, sales; "
           "marketing tools write facts but read none back); names of facts stay.")

