"""Leadflow's HTTP API: one service for the tools around the funnel.

Marketing automation (Mautic, HubSpot, Marketo) posts activity webhooks and
profile facts; presales and sales tools send decisions and get the lead's new
state back; managers' tools read lead states, audit histories, the outbox of
handovers/nurture steps/escalations and the funnel report.

Every call reaches the lead workflows through `client.py` only (signal-with-
start for events and facts, workflow updates for commands, queries for state)
and reads history from the audit store, so the API holds no state of its own:
run as many as you like beside the worker (`uvicorn api:app`, started by
scripts/run_local.py).

Why FastAPI: the funnel's inputs are pydantic models already, and FastAPI
validates requests with pydantic, answers 422 naming the bad field, and
derives the OpenAPI document and interactive docs (/docs, served with
its own files, and /openapi.json) from the same models, so the documentation cannot drift from
what is enforced. uvicorn is its well-kept ASGI server.

Configuration (environment, besides config.py's Settings):

    LEADFLOW_API_KEYS       name:role:key[,name:role:key...]   roles: marketing,
                            presales, sales, manager; keys of 16+ characters
    LEADFLOW_API_KEYS_FILE  a TOML file of [[keys]] tables (name, role and
                            either key or sha256 = hex digest of the key)
    LEADFLOW_API_DEV_KEYS   1: also accept the dev keys dev-marketing,
                            dev-presales, dev-sales, dev-manager (local runs only)
    LEADFLOW_PII_READERS    roles that read personal data (default manager,presales,sales);
                            the others get it masked
    LEADFLOW_CODEC_ORIGINS  origins of the Temporal web UI allowed to call /codec (CORS)

With no key configured the API refuses to start; so it does without payload keys
(LEADFLOW_PAYLOAD_KEYS, see payload_codec.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import threading
import time
import tomllib
import uuid
from collections import Counter, OrderedDict, defaultdict, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    WrapValidator,
    model_validator,
)
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from temporalio.client import Client
from temporalio.service import RPCError

import client as leads
from activities.store import AuditStore, ModelConflict
from api_codec import router as codec_router
from payload_codec import KeyConfigError, PayloadKeyring
from config import Settings, connect
from funnel.lead import FUTURE_TOLERANCE, LeadView
from funnel.models import (
    LEAD_ID_PATTERN,
    NAME_PATTERN,
    Accept,
    ActivityEvent,
    Actor,
    AuditEntry,
    AuditKind,
    AwareDatetime,
    Bant,
    Channel,
    Close,
    EventId,
    LeadId,
    LogContact,
    Meddic,
    Outbound,
    OutboundKind,
    ProfileUpdate,
    Qualify,
    ReasonCode,
    Reject,
    Reopen,
    Role,
    Stage,
)
from funnel.personal_data import MASK, ErasureReport, mask_view, scrub_entry, scrub_payload
from funnel.report import CSV_TABLES, FunnelReport, ReportWindows, funnel_report, report_csv
from workflows.rollout import RolloutProgress
from funnel.scoring_model import ModelError, ScoringModel, load_model, parse_model

log = logging.getLogger("leadflow.api")

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
MIN_KEY_LENGTH = 16
MIN_KEY_BITS = 64  # estimated: length x Shannon entropy of the characters
DEV_KEYS = {f"dev-{role.value}": role for role in (Role.MARKETING, Role.PRESALES, Role.SALES, Role.MANAGER)}
KEY_ROLES = (Role.MARKETING, Role.PRESALES, Role.SALES, Role.MANAGER)


# =========================================================================== API keys


class ConfigError(Exception):
    """The API cannot start with this configuration; the message says what to fix."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the owner of the key, as configured. Never what a body claims."""

    name: str
    role: Role
    dev: bool = False  # one of the well-known dev keys: taken on a loopback bind only

    @property
    def actor(self) -> Actor:
        return Actor(name=self.name, role=self.role)


@dataclass(frozen=True)
class _StoredKey:
    principal: Principal
    digest: bytes  # sha256 of the key; the plain key is never kept


class _KeyFileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    role: str
    key: str | None = None
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")] | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> _KeyFileEntry:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key or sha256")
        return self


class KeyRing:
    """The configured API keys, by sha256 digest, each bound to a name and a role."""

    def __init__(self, keys: list[_StoredKey]):
        seen: dict[bytes, str] = {}
        for stored in keys:
            if stored.digest in seen:
                raise ConfigError(f"API keys of {seen[stored.digest]} and {stored.principal.name} are the same key")
            seen[stored.digest] = stored.principal.name
        self._keys = tuple(keys)

    def __len__(self) -> int:
        return len(self._keys)

    @staticmethod
    def digest(key: str) -> bytes:
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()

    @classmethod
    def entry(cls, name: str, role: str, key: str | None = None, sha256: str | None = None,
              min_length: int = MIN_KEY_LENGTH) -> _StoredKey:
        name, role = name.strip(), role.strip()
        if role not in {r.value for r in KEY_ROLES}:
            raise ConfigError(
                f"API key {name!r}: unknown role {role!r}; use one of {', '.join(r.value for r in KEY_ROLES)}"
            )
        try:
            actor = Actor(name=name, role=Role(role))
        except ValidationError:
            raise ConfigError(f"API key {name!r}: the name must be 1-100 characters") from None
        if sha256 is not None:
            digest = bytes.fromhex(sha256)
        else:
            assert key is not None
            if len(key) < min_length or any(c.isspace() for c in key):
                raise ConfigError(
                    f"API key {name!r}: the key must be at least {min_length} characters without spaces "
                    "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
            bits = _entropy_bits(key)
            if min_length > 1 and bits < MIN_KEY_BITS:
                raise ConfigError(
                    f"API key {name!r}: the key is too easy to guess (about {bits:.0f} bits; at least "
                    f"{MIN_KEY_BITS} needed: make one with python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
            digest = cls.digest(key)
        return _StoredKey(Principal(actor.name, actor.role), digest)

    @classmethod
    def parse(cls, spec: str) -> list[_StoredKey]:
        """`name:role:key,name:role:key` (the key itself may contain ':')."""
        keys = []
        for number, item in enumerate(spec.split(","), start=1):
            if not item.strip():
                continue
            parts = item.strip().split(":", 2)
            if len(parts) != 3:
                raise ConfigError(f"LEADFLOW_API_KEYS entry {number}: expected name:role:key")
            keys.append(cls.entry(*parts))
        return keys

    @classmethod
    def parse_file(cls, path: Path) -> list[_StoredKey]:
        """[[keys]] tables with name, role and key or sha256 (hex digest of the key)."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"LEADFLOW_API_KEYS_FILE {path}: cannot read it: {err.strerror or err}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"LEADFLOW_API_KEYS_FILE {path}: not valid TOML: {err}") from None
        unknown = set(data) - {"keys"}
        if unknown or not isinstance(data.get("keys", []), list):
            raise ConfigError(f"LEADFLOW_API_KEYS_FILE {path}: expected only [[keys]] tables")
        keys = []
        for number, raw in enumerate(data.get("keys", []), start=1):
            try:
                item = _KeyFileEntry.model_validate(raw)
            except ValidationError as err:
                raise ConfigError(f"LEADFLOW_API_KEYS_FILE {path}: key {number}: {_describe(err)}") from None
            keys.append(cls.entry(item.name, item.role, item.key, item.sha256))
        return keys

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> KeyRing:
        env = dict(os.environ if env is None else env)
        keys = cls.parse(env.get("LEADFLOW_API_KEYS", ""))
        if env.get("LEADFLOW_API_KEYS_FILE"):
            keys += cls.parse_file(Path(env["LEADFLOW_API_KEYS_FILE"]))
        dev = env.get("LEADFLOW_API_DEV_KEYS", "").strip().lower()
        if dev in ("1", "true", "yes"):
            log.warning("LEADFLOW_API_DEV_KEYS is on: the well-known dev keys are accepted (local use only)")
            keys += cls.dev_keys()
        elif dev not in ("", "0", "false", "no"):
            raise ConfigError(f"LEADFLOW_API_DEV_KEYS={dev!r}: use 1 or 0")
        if not keys:
            raise ConfigError(
                "no API keys configured: set LEADFLOW_API_KEYS=name:role:key[,...] (roles: marketing, presales, "
                "sales, manager) or LEADFLOW_API_KEYS_FILE=keys.toml; for local development only, "
                "LEADFLOW_API_DEV_KEYS=1 accepts the keys dev-marketing, dev-presales, dev-sales and dev-manager"
            )
        return cls(keys)

    @classmethod
    def dev_keys(cls) -> list[_StoredKey]:
        dev = [cls.entry(key, role.value, key=key, min_length=1) for key, role in DEV_KEYS.items()]
        return [_StoredKey(Principal(k.principal.name, k.principal.role, dev=True), k.digest) for k in dev]

    def lookup(self, presented: str) -> Principal | None:
        """The key's owner, or None. Compares against every stored digest, in constant time each."""
        digest = self.digest(presented)
        found = None
        for stored in self._keys:
            if hmac.compare_digest(digest, stored.digest):
                found = stored.principal
        return found


def _entropy_bits(key: str) -> float:
    """A key's guessability: its length times the Shannon entropy of its characters. A
    random token_urlsafe(32) has about 200 bits; 'aaaa...' has none."""
    counts = Counter(key)
    per_char = -sum(n / len(key) * math.log2(n / len(key)) for n in counts.values())
    return per_char * len(key)


class FailedAuthLimiter:
    """Failed authentications per client address: after `limit` within `window` seconds, 429
    with Retry-After until the oldest of them leaves the window (guessing keys gets slow)."""

    def __init__(self, limit: int = 10, window: float = 60.0, addresses: int = 10_000):
        self.limit, self.window, self.addresses = limit, window, addresses
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, address: str, now: float) -> int | None:
        failures = self._failures.get(address)
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if failures and len(failures) >= self.limit:
            return max(1, math.ceil(failures[0] + self.window - now))
        return None

    def failed(self, address: str, now: float) -> None:
        if address not in self._failures and len(self._failures) >= self.addresses:
            self._failures.pop(next(iter(self._failures)))  # forget the longest-known address
        self._failures.setdefault(address, deque()).append(now)


# =========================================================================== request and response models


def _plain_text(value: str) -> str:
    """Free text goes into histories, payloads and SQL: no control characters, valid Unicode."""
    if re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", value):
        raise ValueError("must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


def _fact_value(value: Any) -> bool | int | float | str:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError("integer out of range (64-bit)")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value
    if isinstance(value, str):
        if len(value) > 1000:
            raise ValueError("must be at most 1000 characters")
        return _plain_text(value)
    raise ValueError("must be a boolean, a number or a string")


Note = Annotated[str, StringConstraints(max_length=1000), AfterValidator(_plain_text)]
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
FactValue = Annotated[
    bool | int | float | str,
    PlainValidator(_fact_value),  # one clear message instead of one per member of the union
    WithJsonSchema({"anyOf": [{"type": "boolean"}, {"type": "integer"}, {"type": "number"},
                              {"type": "string", "maxLength": 1000}]}),
]
Facts = Annotated[dict[Name, FactValue], Field(max_length=50)]
OwnerName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.@:-]{0,99}$")]
MessageId = Annotated[str, StringConstraints(min_length=1, max_length=300), AfterValidator(_plain_text)]
PathLeadId = Annotated[str, PathParam(pattern=LEAD_ID_PATTERN, description="lead id (an opaque key)")]


class _Request(BaseModel):
    """Request bodies refuse unknown fields: a typo is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class EventIn(_Request):
    """One activity of a lead, as marketing automation reports it. The same `event_id`
    delivered again is applied once."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "event_id": "mautic-84121", "lead_id": "L-1042", "type": "webinar_attended",
            "occurred_at": "2026-11-22T10:00:00Z", "channel": "webinar", "attributes": {"webinar": "q4-launch"},
        }]},
    )

    event_id: EventId = Field(description="the sender's id of this event; redeliveries are applied once")
    lead_id: LeadId = Field(description="an opaque key (never an e-mail address): 1-128 of A-Z a-z 0-9 _ . : -")
    type: Name = Field(description="an event type of the scoring model, e.g. webinar_attended")
    occurred_at: AwareDatetime = Field(
        description="ISO 8601 with a timezone; not before 1970 and not more than 5 minutes in the future"
    )
    channel: Channel | None = Field(default=None, description="e.g. webinar, website, email (first touch of a lead)")
    attributes: Facts = Field(default_factory=dict)

    def to_event(self, source: str | None = None) -> ActivityEvent:
        """The event, recorded as sent by `source` (the API key's name)."""
        return ActivityEvent(**self.model_dump(), source=source)


class _RejectedItem:
    """A batch item that failed validation: kept in place so the others go on."""

    def __init__(self, errors: list[dict]):
        self.errors = errors


def _keep_invalid(value: Any, handler) -> Any:
    try:
        return handler(value)
    except ValidationError as err:
        return _RejectedItem(err.errors(include_url=False, include_input=False))


class EventBatchIn(_Request):
    events: list[Annotated[EventIn, WrapValidator(_keep_invalid)]] = Field(
        min_length=1, max_length=MAX_BATCH,
        description=f"1 to {MAX_BATCH} events, for any leads; each is validated on its own",
    )


Outcome = Literal["accepted", "duplicate", "rejected", "conflict"]


class EventResult(BaseModel):
    index: int = Field(description="position in the batch")
    event_id: str | None = None
    lead_id: str | None = None
    outcome: Outcome = Field(
        description="accepted: Temporal holds it for the lead, applied once; duplicate: this id was taken before "
                    "with the same content (or repeats an id of this batch), changes nothing; conflict: this id was "
                    "taken with other content, not applied (a new event needs a new id); rejected: not applied, "
                    "see reason"
    )
    reason: str | None = None


class BatchResult(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    conflicts: int = 0
    results: list[EventResult]


class EventAccepted(BaseModel):
    event_id: str
    lead_id: str
    outcome: Literal["accepted", "duplicate"]
    detail: str


class ProfileIn(_Request):
    update_id: EventId | None = Field(
        default=None, description="the sender's id of this update, applied once; default: a fresh id"
    )
    facts: Annotated[dict[Name, FactValue], Field(min_length=1, max_length=50)] = Field(
        description="profile (fit) facts; a later value of a fact replaces the earlier",
        examples=[{"target_account": True, "company_size": 250, "industry": "software"}],
    )


class ProfileAccepted(BaseModel):
    update_id: str
    lead_id: str
    outcome: Literal["accepted", "duplicate"]
    detail: str


class AcceptIn(_Request):
    note: Note | None = None


class RejectIn(_Request):
    reason: ReasonCode = Field(description="reason code, e.g. no_budget, wrong_audience")
    recycle: bool = Field(default=False, description="true: back to nurturing (recycled); false: disqualified")
    note: Note | None = None


class QualifyIn(_Request):
    framework: Literal["bant", "meddic"] = "bant"
    bant: Bant | None = None
    meddic: Meddic | None = None
    note: Note | None = None


class ContactIn(_Request):
    channel: Literal["phone", "email", "meeting", "chat", "other"] = "phone"
    note: Note | None = None


class CloseIn(_Request):
    outcome: Literal["won", "lost"]
    reason: ReasonCode | None = Field(default=None, description="required for lost")
    note: Note | None = None


class ReopenIn(_Request):
    reason: ReasonCode
    note: Note | None = None


class HistoryPage(BaseModel):
    lead_id: str
    total: int = Field(description="entries in the lead's whole history")
    offset: int
    limit: int
    entries: list[AuditEntry]
    complete: bool = Field(
        default=True,
        description="false when Temporal could not be asked for the lead's entries not yet in the store "
        "(score changes reach the store within LEADFLOW_AUDIT_MAX_LAG): the page is the store's alone",
    )


class LeadSummaryOut(BaseModel):
    lead_id: str
    stage: str | None
    score: float | None
    owner: str | None
    channel: str | None


class LeadList(BaseModel):
    count: int
    leads: list[LeadSummaryOut]


class OutboxPage(BaseModel):
    count: int
    messages: list[Outbound]


class AckIn(_Request):
    message_ids: list[MessageId] = Field(min_length=1, max_length=MAX_PAGE)


class AckResult(BaseModel):
    acknowledged: int = Field(description="messages acknowledged now")
    unchanged: int = Field(description="already acknowledged, or unknown")


class Check(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    ready: bool
    temporal: Check
    store: Check
    workers: Check = Field(description="a worker polls the lead task queue")
    behind: leads.QueueHealth | None = Field(
        default=None, description="how far behind the workers are (approximate, from Temporal)")


class Behind(Exception):
    """The workers are too far behind to take more input now (503 with Retry-After)."""


class Problem(BaseModel):
    detail: str


class FieldProblem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationProblem(BaseModel):
    detail: list[FieldProblem]
    message: str


def _describe(err: ValidationError | list[dict], prefix: tuple = ()) -> str:
    errors = err.errors(include_url=False) if isinstance(err, ValidationError) else err
    return "; ".join(
        f"{'.'.join(str(p) for p in (*prefix, *e['loc'])) or 'value'}: {_message(e)}" for e in errors
    )


def _message(error: dict) -> str:
    msg = str(error["msg"]).removeprefix("Value error, ")
    detail = (error.get("ctx") or {}).get("error")
    if error["type"] == "json_invalid" and isinstance(detail, str):
        msg = f"{msg}: {detail}"
    return msg


# =========================================================================== backends


class Unavailable(Exception):
    """Temporal or the audit store cannot be reached (503)."""


class NoAnswer(Exception):
    """The lead's workflow did not answer in time (504)."""

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers


class _ActiveModel:
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
                        raise Unavailable(f"cannot reach Temporal at {self.address}: {_first_line(err)}") from None
        return self._temporal

    def store(self) -> AuditStore:
        """Blocking (creates tables the first time): call it from a thread."""
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    try:
                        self._store = AuditStore(self.settings.database_url)
                    except SQLAlchemyError as err:
                        raise Unavailable(f"cannot reach the audit store: {_first_line(err)}") from None
        return self._store

    async def in_store(self, fn, *args):
        """Run `fn(store, *args)` in a thread; store trouble becomes Unavailable (503)."""

        def call():
            try:
                return fn(self.store(), *args)
            except SQLAlchemyError as err:
                raise Unavailable(f"audit store error: {_first_line(err)}") from None

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


def _first_line(err: BaseException) -> str:
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    return str(text).strip().splitlines()[0][:300] if str(text).strip() else type(err).__name__


def _is_temporal_trouble(err: BaseException) -> bool:
    return isinstance(err, (RPCError, TimeoutError, ConnectionError, Unavailable)) or (
        isinstance(err, RuntimeError) and "connect" in str(err).lower()
    )


async def _temporal_call(awaitable, timeout: float, what: str):
    """Await a Temporal call; unreachable -> Unavailable (503), no answer -> NoAnswer (504)."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise NoAnswer(
            f"no answer to the {what} within {timeout:.0f} s: is the worker running? "
            + ("A command may still be applied: read the lead to see." if what != "query" else "")
        ) from None
    except RPCError as err:
        raise Unavailable(f"Temporal error: {_first_line(err)}") from None


def _backends(request: Request) -> Backends:
    return request.app.state.backends


async def _model(request: Request) -> ScoringModel:
    return await request.app.state.scoring_model.get(_backends(request))


# =========================================================================== authentication


_bearer = HTTPBearer(auto_error=False, scheme_name="bearer", description="Authorization: Bearer <API key>")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey", description="X-API-Key: <API key>")


def allow(*roles: Role):
    """A dependency: the caller's key must be valid (401) and of one of `roles` (403);
    managers may do everything."""
    allowed = frozenset(roles) | {Role.MANAGER}
    names = ", ".join(r.value for r in KEY_ROLES if r in allowed)

    async def caller(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
        header_key: Annotated[str | None, Security(_api_key)],
    ) -> Principal:
        limiter: FailedAuthLimiter = request.app.state.auth_failures
        address = request.client.host if request.client else "?"
        now = time.monotonic()
        if (wait := limiter.retry_after(address, now)) is not None:
            raise HTTPException(429, f"too many failed authentications from {address}; retry in {wait} s",
                                headers={"Retry-After": str(wait)})

        def refuse(status: int, detail: str) -> HTTPException:
            limiter.failed(address, now)
            return HTTPException(status, detail, headers={"WWW-Authenticate": "Bearer"})

        if bearer is not None and header_key is not None and bearer.credentials != header_key:
            raise refuse(400, "conflicting credentials: Authorization and X-API-Key carry different keys; send one")
        presented = bearer.credentials if bearer is not None else header_key
        if not presented:
            raise HTTPException(
                401, "missing API key: send Authorization: Bearer <key> or X-API-Key: <key>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        principal = request.app.state.keys.lookup(presented)
        if principal is None:
            raise refuse(401, "invalid API key")
        if principal.dev and not _loopback((request.scope.get("server") or ("", 0))[0]):
            raise refuse(401, "the dev keys are taken on a loopback bind only (127.0.0.1, ::1); configure "
                              "LEADFLOW_API_KEYS for this address")
        if principal.role not in allowed:
            raise HTTPException(403, f"role {principal.role.value} may not do this; allowed: {names}")
        return principal

    return caller


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# =========================================================================== edge checks


def _event_problem(event: EventIn, model: ScoringModel, now: datetime) -> tuple[str, str] | None:
    """(field, message) if the event cannot be applied, as the CLI checks it."""
    if event.type not in model.events:
        return "type", (
            f"unknown event type {event.type!r} in scoring model {model.ref}; known types: "
            + ", ".join(sorted(model.events))
        )
    if event.occurred_at > now + FUTURE_TOLERANCE:
        minutes = int(FUTURE_TOLERANCE.total_seconds() // 60)
        return "occurred_at", (
            f"{event.occurred_at.isoformat()} is more than {minutes} minutes in the future "
            f"(now {now.replace(microsecond=0).isoformat()})"
        )
    if event.occurred_at < EARLIEST_EVENT:
        return "occurred_at", f"{event.occurred_at.isoformat()} is before {EARLIEST_EVENT.date().isoformat()}"
    return None


async def _logged(backends: Backends, events: list[ActivityEvent]) -> dict[tuple[str, str], str]:
    """What the event log knows of these ids. Best effort: with the store down, events are
    still taken, and the lead applies each id once regardless."""
    try:
        return await backends.in_store(AuditStore.logged_digests, events)
    except Unavailable as err:
        log.warning("event log not read: %s", err)
        return {}


async def _log(backends: Backends, events: list[ActivityEvent]) -> None:
    """Log events Temporal has taken; best effort (a redelivery of one missing here is sent
    again, and the lead still applies it once)."""
    try:
        await backends.in_store(AuditStore.log_events, events, datetime.now(timezone.utc))
    except Unavailable as err:
        log.warning("events taken but not logged: %s", err)


async def _applied_hint(backends: Backends, kind: AuditKind, wanted: dict[str, list[str]]) -> set[tuple[str, str]]:
    """Best effort: with the store down, events are still taken (and de-duplicated by the lead)."""
    try:
        return await backends.in_store(AuditStore.applied_ids, kind, wanted)
    except Unavailable as err:
        log.warning("duplicate hint skipped: %s", err)
        return set()


async def _deliver(request: Request, events: list[ActivityEvent]) -> dict[str, str]:
    """Signal-with-start the events into their leads, one call per lead, in occurred_at
    order; a new lead starts on the active model. Returns {lead: reason} for closed (won)
    leads; raises Unavailable if Temporal did not take some lead's events (the caller
    retries: delivered events apply once)."""
    backends = _backends(request)
    temporal = await backends.temporal()
    active: _ActiveModel = request.app.state.scoring_model
    by_lead: dict[str, list[ActivityEvent]] = defaultdict(list)
    for event in events:
        by_lead[event.lead_id].append(event)
    gate = asyncio.Semaphore(SEND_CONCURRENCY)

    async def send(lead_events: list[ActivityEvent]) -> None:
        async with gate:
            lead_events.sort(key=lambda e: e.occurred_at)
            lead_id = lead_events[0].lead_id
            model = await active.for_starting(backends, lead_id)
            await asyncio.wait_for(leads.send_events(temporal, backends.settings, lead_events, model), SEND_TIMEOUT)
            active.sent(lead_id)

    results = await asyncio.gather(*(send(items) for items in by_lead.values()), return_exceptions=True)
    closed: dict[str, str] = {}
    failed: list[BaseException] = []
    for lead_id, result in zip(by_lead, results):
        if isinstance(result, leads.LeadClosed):
            closed[lead_id] = f"lead {lead_id} is closed (won): it takes no more events"
        elif isinstance(result, BaseException):
            if not _is_temporal_trouble(result):
                raise result
            failed.append(result)
    if failed:
        raise Unavailable(
            f"Temporal did not take the events of {len(failed)} of {len(by_lead)} lead(s) "
            f"({_first_line(failed[0])}); retry: events already taken are applied once"
        )
    return closed


# =========================================================================== routes

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "no or invalid API key"},
    403: {"model": Problem, "description": "the key's role may not do this"},
    413: {"model": Problem, "description": f"body larger than {MAX_BODY_BYTES} bytes"},
    422: {"model": ValidationProblem, "description": "invalid input; each problem names its field"},
    503: {"model": Problem, "description": "Temporal or the audit store cannot be reached; retry later"},
}
LEAD_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": Problem, "description": "no such lead"},
    409: {"model": Problem, "description": "the lead refused: not in a stage (or role) that allows it"},
    410: {"model": Problem, "description": "the lead is closed (won) and takes no more input"},
    504: {"model": Problem, "description": "the lead did not answer in time (is the worker running?)"},
}

health = APIRouter(tags=["health"])
ingest = APIRouter(tags=["events and profile facts"], responses=ERRORS)
commands = APIRouter(prefix="/leads/{lead_id}", tags=["commands"], responses=LEAD_ERRORS)
reads = APIRouter(tags=["reads"], responses=ERRORS)
outbox = APIRouter(prefix="/outbox", tags=["outbox"], responses=ERRORS)
models = APIRouter(prefix="/models", tags=["scoring model versions"], responses=ERRORS)


# --------------------------------------------------------------------------- health


@health.get("/healthz", summary="The process is up", response_model=dict[str, str])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get(
    "/readyz", summary="Temporal and the audit store are reachable", response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready: see which check failed"}},
)
async def readyz(request: Request):
    backends = _backends(request)

    async def temporal() -> Check:
        try:
            client = await backends.temporal()
            ok = await asyncio.wait_for(client.service_client.check_health(), PROBE_TIMEOUT)
            return Check(ok=bool(ok), detail="reachable" if ok else "serving, but not healthy")
        except Exception as err:  # noqa: BLE001 - a probe reports whatever went wrong
            return Check(ok=False, detail=_first_line(err))

    async def store() -> Check:
        try:
            await asyncio.wait_for(backends.in_store(AuditStore.ping), PROBE_TIMEOUT)
            return Check(ok=True, detail="reachable")
        except Exception as err:  # noqa: BLE001 - a probe reports whatever went wrong
            return Check(ok=False, detail=_first_line(err))

    async def workers() -> tuple[Check, leads.QueueHealth | None]:
        try:
            health = await backends.queue_health(max_age=0)
        except Exception as err:  # noqa: BLE001 - a probe reports whatever went wrong
            return Check(ok=False, detail=_first_line(err)), None
        if not health.workers:
            return Check(ok=False, detail=f"no worker polls task queue {health.task_queue!r}"), health
        return Check(ok=True, detail=f"{health.workers} polling task queue {health.task_queue!r}"), health

    t, s, (w, health) = await asyncio.gather(temporal(), store(), workers())
    body = Readiness(ready=t.ok and s.ok and w.ok, temporal=t, store=s, workers=w, behind=health)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503)


# --------------------------------------------------------------------------- events and profile facts

_INGEST_ROLES = "Roles: marketing, manager."


@ingest.post(
    "/events", status_code=202, response_model=EventAccepted,
    summary="One activity event (a webhook)",
    description=(
        "Validates the event (fields, type known in the scoring model, occurred_at not more than 5 minutes "
        "in the future) and signals it into its lead's workflow, creating the lead. 202 means Temporal holds "
        "it durably. Idempotent by event_id, for ever: an id taken before with the same content is answered "
        "`duplicate` and changes nothing; with other content it is 409 (a new event needs a new id). "
        "410 if the lead is closed (won). " + _INGEST_ROLES
    ),
    responses={410: {"model": Problem, "description": "the lead is closed (won)"},
               409: {"model": Problem, "description": "this event id was taken with other content"}},
)
async def post_event(
    event: EventIn, request: Request, caller: Annotated[Principal, Depends(allow(Role.MARKETING))]
) -> EventAccepted:
    problem = _event_problem(event, await _model(request), datetime.now(timezone.utc))
    if problem is not None:
        field, msg = problem
        raise RequestValidationError([{"loc": ("body", field), "msg": msg, "type": "value_error"}])
    backends = _backends(request)
    await backends.check_not_behind()
    taken = event.to_event(caller.name)
    fresh, known = leads.sort_out([taken], await _logged(backends, [taken]))
    if known:
        outcome, why = known[0]
        if outcome == "conflict":
            return _problem(409, why)
        return EventAccepted(event_id=event.event_id, lead_id=event.lead_id, outcome="duplicate", detail=why)
    closed = await _deliver(request, fresh)
    if closed:
        raise leads.LeadClosed(closed[event.lead_id])
    await _log(backends, fresh)
    return EventAccepted(event_id=event.event_id, lead_id=event.lead_id, outcome="accepted",
                         detail="taken; applied once by the lead")


@ingest.post(
    "/events/batch", status_code=202, response_model=BatchResult,
    summary=f"Up to {MAX_BATCH} activity events at once",
    description=(
        f"1 to {MAX_BATCH} events for any leads (body at most {MAX_BODY_BYTES} bytes). Each event is validated "
        "on its own: a bad one is `rejected` with its reason (naming the field) while the good ones are "
        "`accepted`, so the answer is 202 with one result per event, in order. Events of one lead are "
        "delivered together, in occurred_at order, and the lead applies them in time order. An event for a "
        "closed (won) lead is rejected. A repeat of an event_id in the same batch, or an event the audit "
        "store shows applied, is `duplicate`. The whole batch is refused (422) only if the body is not "
        "`{\"events\": [...]}` with 1 to 500 items. 503 if Temporal could not take every lead's events: "
        "retry the batch, events already taken are applied once. " + _INGEST_ROLES
    ),
)
async def post_events(
    batch: EventBatchIn, request: Request, caller: Annotated[Principal, Depends(allow(Role.MARKETING))]
) -> BatchResult:
    model, now = await _model(request), datetime.now(timezone.utc)
    results: list[EventResult] = []
    valid: dict[int, EventIn] = {}
    for index, item in enumerate(batch.events):
        if isinstance(item, _RejectedItem):
            results.append(EventResult(index=index, outcome="rejected",
                                       reason=_describe(item.errors, ("events", index))))
            continue
        result = EventResult(index=index, event_id=item.event_id, lead_id=item.lead_id, outcome="accepted")
        results.append(result)
        if (problem := _event_problem(item, model, now)) is not None:
            result.outcome, result.reason = "rejected", f"events.{index}.{problem[0]}: {problem[1]}"
        else:
            valid[index] = item
    if valid:
        backends = _backends(request)
        await backends.check_not_behind()
        indexes = list(valid)
        events = [valid[index].to_event(caller.name) for index in indexes]
        fresh, known = leads.sort_out(events, await _logged(backends, events))
        closed = await _deliver(request, fresh)
        await _log(backends, [e for e in fresh if e.lead_id not in closed])
        for position, index in enumerate(indexes):
            item = valid[index]
            if position in known:
                outcome, why = known[position]
                results[index].outcome, results[index].reason = outcome, why
            elif item.lead_id in closed:
                results[index].outcome, results[index].reason = "rejected", closed[item.lead_id]
    counts = {outcome: sum(1 for r in results if r.outcome == outcome) for outcome in ("accepted", "duplicate",
                                                                                        "rejected", "conflict")}
    return BatchResult(accepted=counts["accepted"], duplicates=counts["duplicate"], rejected=counts["rejected"],
                       conflicts=counts["conflict"], results=results)


@ingest.post(
    "/leads/{lead_id}/profile", status_code=202, response_model=ProfileAccepted,
    summary="Profile (fit) facts about a lead",
    description=(
        "Signals the facts into the lead (creating it); the lead re-evaluates its fit rules. Idempotent by "
        "update_id (give one for webhook redeliveries). The actor recorded is the API key's owner. "
        "410 if the lead is closed (won). " + _INGEST_ROLES
    ),
    responses={410: {"model": Problem, "description": "the lead is closed (won)"}},
)
async def post_profile(
    lead_id: PathLeadId, body: ProfileIn, request: Request,
    caller: Annotated[Principal, Depends(allow(Role.MARKETING))],
) -> ProfileAccepted:
    update = ProfileUpdate(update_id=body.update_id or f"pu-{uuid.uuid4()}", lead_id=lead_id, facts=body.facts,
                           actor=caller.actor)
    backends = _backends(request)
    await backends.check_not_behind()
    seen = await _applied_hint(backends, AuditKind.PROFILE_UPDATED, {lead_id: [update.update_id]})
    duplicate = (lead_id, update.update_id) in seen
    temporal = await backends.temporal()
    active: _ActiveModel = request.app.state.scoring_model
    model = await active.for_starting(backends, lead_id)
    try:
        await _temporal_call(leads.send_profile(temporal, backends.settings, update, model), SEND_TIMEOUT,
                             "profile update")
        active.sent(lead_id)
    except leads.LeadClosed:
        if not duplicate:
            raise
    except NoAnswer as err:
        raise Unavailable(str(err)) from None
    return ProfileAccepted(
        update_id=update.update_id, lead_id=lead_id, outcome="duplicate" if duplicate else "accepted",
        detail="already applied: changes nothing" if duplicate else "taken; applied once by the lead",
    )


# --------------------------------------------------------------------------- commands


IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$",
    description="the command's idempotency key: sent again with the same key, it is applied at most once and "
                "answered with its outcome (default: a fresh key, returned in the Idempotency-Key header)")]


async def _command(request: Request, response: Response, lead_id: str, command, key: str | None) -> LeadView:
    backends = _backends(request)
    temporal = await backends.temporal()
    key = key or f"cmd-{uuid.uuid4()}"
    response.headers["Idempotency-Key"] = key
    timeout = backends.settings.command_timeout_seconds
    try:
        view = await asyncio.wait_for(leads.run_command(temporal, lead_id, command, key=key), timeout)
    except (TimeoutError, leads.CommandTimedOut):
        raise NoAnswer(
            f"lead {lead_id} did not answer the {command.kind} command within {timeout:g} s (is its worker "
            f"running?). It may still be applied: send it again with Idempotency-Key: {key} to get its outcome "
            f"(it is applied at most once), or read GET /leads/{lead_id}/commands/{key}",
            headers={"Idempotency-Key": key}) from None
    except RPCError as err:
        raise Unavailable(f"Temporal error: {_first_line(err)}") from None
    return view if _reads_personal_data(request, command.by.role) else mask_view(view)


_COMMAND_NOTE = (
    " Executed as a workflow update: 200 with the lead's new state; 409 with the lead's reason if its stage "
    "(or the stage's rules for your role) does not allow it; 404 for an unknown lead; 410 for a won lead; "
    "504 if the lead did not answer in time (it may still apply: send it again with the same Idempotency-Key, "
    "which is applied at most once and answered with its outcome). "
    "The actor recorded is the API key's owner. Profile fact values are masked (\"***\") for roles not in "
    "LEADFLOW_PII_READERS."
)


# --------------------------------------------------------------------------- personal data


def _reads_personal_data(request: Request, role: Role) -> bool:
    """Whether keys of `role` may read personal data (LEADFLOW_PII_READERS; default manager,
    presales, sales): the others get fact values, attributes and notes masked."""
    return role.value in _backends(request).settings.pii_readers


_MASKED = (" Personal data (profile fact values, event attributes, notes, the free-text consent source) is "
           f"masked as \"{MASK}\" for roles not in LEADFLOW_PII_READERS (default: manager, presales, sales; "
           "marketing tools write facts but read none back); names of facts stay.")


@commands.post("/accept", response_model=LeadView, summary="Presales accepts an MQL (-> SAL)",
               description="Roles: presales, manager." + _COMMAND_NOTE)
async def accept(lead_id: PathLeadId, body: AcceptIn, request: Request,
                 caller: Annotated[Principal, Depends(allow(Role.PRESALES))],
                 response: Response, key: IdempotencyKey = None) -> LeadView:
    return await _command(request, response, lead_id, Accept(by=caller.actor, **body.model_dump()), key)


@commands.post("/reject", response_model=LeadView, summary="Disqualify, or recycle to nurturing, with a reason",
               description="Roles: presales, sales (after acceptance), manager." + _COMMAND_NOTE)
async def reject(lead_id: PathLeadId, body: RejectIn, request: Request,
                 caller: Annotated[Principal, Depends(allow(Role.PRESALES, Role.SALES))],
                 response: Response, key: IdempotencyKey = None) -> LeadView:
    return await _command(request, response, lead_id, Reject(by=caller.actor, **body.model_dump()), key)


@commands.post("/qualify", response_model=LeadView, summary="Qualify by BANT or MEDDIC (SAL -> SQL)",
               description="Roles: presales, sales, manager." + _COMMAND_NOTE)
async def qualify(lead_id: PathLeadId, body: QualifyIn, request: Request,
                  caller: Annotated[Principal, Depends(allow(Role.PRESALES, Role.SALES))],
                 response: Response, key: IdempotencyKey = None) -> LeadView:
    return await _command(request, response, lead_id, Qualify(by=caller.actor, **body.model_dump()), key)


@commands.post("/contact", response_model=LeadView, summary="Log a contact (meets follow-up SLAs)",
               description="Roles: sales, presales (follow-ups of MQLs), manager." + _COMMAND_NOTE)
async def contact(lead_id: PathLeadId, body: ContactIn, request: Request,
                  caller: Annotated[Principal, Depends(allow(Role.SALES, Role.PRESALES))],
                 response: Response, key: IdempotencyKey = None) -> LeadView:
    return await _command(request, response, lead_id, LogContact(by=caller.actor, **body.model_dump()), key)


@commands.post("/close", response_model=LeadView, summary="Close an SQL as won or lost (lost needs a reason)",
               description="Roles: sales, manager." + _COMMAND_NOTE)
async def close(lead_id: PathLeadId, body: CloseIn, request: Request,
                caller: Annotated[Principal, Depends(allow(Role.SALES))],
                 response: Response, key: IdempotencyKey = None) -> LeadView:
    return await _command(request, response, lead_id, Close(by=caller.actor, **body.model_dump()), key)


@commands.post("/reopen", response_model=LeadView, summary="Reopen a lost or disqualified lead (-> recycled)",
               description="Roles: manager." + _COMMAND_NOTE)
async def reopen(lead_id: PathLeadId, body: ReopenIn, request: Request,
                 caller: Annotated[Principal, Depends(allow())],
                 response: Response, key: IdempotencyKey = None) -> LeadView:
    return await _command(request, response, lead_id, Reopen(by=caller.actor, **body.model_dump()), key)


# --------------------------------------------------------------------------- reads

_READERS = (Role.MARKETING, Role.PRESALES, Role.SALES)


@reads.get(
    "/leads/{lead_id}", response_model=LeadView, summary="A lead's current state and score breakdown",
    description="Live state from the lead's workflow (works for won leads too). Roles: all." + _MASKED,
    responses={404: {"model": Problem, "description": "no such lead"},
               504: {"model": Problem, "description": "the lead did not answer in time"}},
)
async def get_lead(lead_id: PathLeadId, request: Request,
                   caller: Annotated[Principal, Depends(allow(*_READERS))]) -> LeadView:
    temporal = await _backends(request).temporal()
    view = await _temporal_call(leads.get_view(temporal, lead_id), ANSWER_TIMEOUT, "query")
    return view if _reads_personal_data(request, caller.role) else mask_view(view)


@reads.get(
    "/leads/{lead_id}/history", response_model=HistoryPage, summary="A lead's audit history, oldest first",
    description=(
        "Every score change, stage change, profile update, duplicate, SLA and contact, with its actor: the "
        "audit store, then the entries the lead has not written there yet (score changes reach the store "
        "within LEADFLOW_AUDIT_MAX_LAG). Complete for closed leads and across continue-as-new. Paginated by "
        "offset/limit; `total` is the whole history's length. 404 if there is nothing for the lead. Roles: all."
        + _MASKED
    ),
    responses={404: {"model": Problem, "description": "no history for this lead"}},
)
async def get_history(
    lead_id: PathLeadId, request: Request, caller: Annotated[Principal, Depends(allow(*_READERS))],
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> HistoryPage:
    backends = _backends(request)
    # The lead's unwritten tail first, then the store (see client.read_history). The
    # store alone still answers when Temporal is down: managers can audit regardless.
    complete = True
    try:
        temporal = await backends.temporal()
        tail = await _temporal_call(leads.audit_tail(temporal, lead_id), ANSWER_TIMEOUT, "query")
    except (Unavailable, NoAnswer):
        tail, complete = [], False

    def page(store: AuditStore) -> tuple[int, list[AuditEntry]]:
        return leads.merge_history(tail, store.count_history(lead_id),
                                   lambda o, n: store.history(lead_id, offset=o, limit=n), offset, limit)

    total, entries = await backends.in_store(page)
    if total == 0:
        raise leads.LeadNotFound(f"no lead {lead_id} (no history yet)")
    if not _reads_personal_data(request, caller.role):
        entries = [scrub_entry(entry) for entry in entries]
    return HistoryPage(lead_id=lead_id, total=total, offset=offset, limit=limit, entries=entries,
                       complete=complete)


@reads.get(
    "/leads/{lead_id}/commands/{key}", response_model=leads.CommandOutcome,
    summary="What became of a command, by its idempotency key",
    description="applied (with its history entries), refused (with the lead's reason) or unknown (never received, "
                "or still waiting for the lead). Roles: all." + _MASKED,
)
async def get_command_outcome(
    lead_id: PathLeadId, request: Request, caller: Annotated[Principal, Depends(allow(*_READERS))],
    key: Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")],
) -> leads.CommandOutcome:
    backends = _backends(request)
    temporal = await backends.temporal()
    store = await run_in_threadpool(backends.store)
    outcome = await leads.command_outcome(temporal, store, lead_id, key)
    if not _reads_personal_data(request, caller.role):
        outcome.entries = [scrub_entry(entry) for entry in outcome.entries]
    return outcome


@reads.get(
    "/leads", response_model=LeadList, summary="Running leads, by stage and owner",
    description=(
        "From Temporal visibility: running leads only (won leads have completed). Visibility follows the "
        "lead's audit writes: stage changes within about a second, a new lead, its owner and its latest "
        "score within LEADFLOW_AUDIT_MAX_LAG. Roles: all."
    ),
)
async def list_leads(
    request: Request, caller: Annotated[Principal, Depends(allow(*_READERS))],
    stage: Stage | None = None,
    owner: Annotated[OwnerName | None, Query(description="e.g. presales-1")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> LeadList:
    temporal = await _backends(request).temporal()
    found = await _temporal_call(
        leads.list_leads(temporal, stage=stage.value if stage else None, owner=owner, limit=limit),
        ANSWER_TIMEOUT, "query",
    )
    return LeadList(count=len(found), leads=[LeadSummaryOut(**vars(lead)) for lead in found])


personal = APIRouter(prefix="/leads/{lead_id}/personal-data", tags=["personal data (GDPR)"],
                     responses={**ERRORS, 404: {"model": Problem, "description": "no such lead"}})


@personal.get(
    "", response_model=leads.PersonalDataExport, summary="Everything kept about the person (GDPR Art. 15)",
    description=(
        "The lead's profile facts (with when each was observed and by which update), its events with their "
        "attributes (those it keeps: its last year), its state, its whole audit history, every outbound message "
        "(acknowledged or not) and its erasures. Facts and events come from the lead's workflow: without "
        "Temporal or a worker, `complete` is false and `notes` says what is missing. Roles: manager."
    ),
)
async def export_personal_data(lead_id: PathLeadId, request: Request,
                               caller: Annotated[Principal, Depends(allow())]) -> leads.PersonalDataExport:
    backends = _backends(request)
    try:
        temporal = await backends.temporal()
    except Unavailable:
        temporal = None
    store = await run_in_threadpool(backends.store)
    return await leads.export_person(temporal, store, lead_id)


@personal.delete(
    "", response_model=ErasureReport, summary="Erase the person's data (GDPR Art. 17)",
    description=(
        "Removes the person's data: profile fact values (but each matched fit rule's own category, so the score "
        "survives), event attributes, notes and the free-text consent source, from the lead's state, the audit "
        "history's details and the outbox; the lead's Temporal history so far is crypto-shredded (its key is "
        "destroyed shortly after: see `history`). Keeps the anonymous funnel facts: stages and times, scores "
        "and rule names, event types, ids and times, channel, owners, consent yes/no. Recorded with the key's "
        "owner as who and when. The lead goes on; data sent after this is new data. Roles: manager."
    ),
    responses={504: {"model": Problem, "description": "the lead did not answer in time (is the worker running?)"}},
)
async def erase_personal_data(lead_id: PathLeadId, request: Request,
                              caller: Annotated[Principal, Depends(allow())]) -> ErasureReport:
    backends = _backends(request)
    temporal = await backends.temporal()
    store = await run_in_threadpool(backends.store)
    return await _temporal_call(leads.erase_person(temporal, store, lead_id, caller.actor), ANSWER_TIMEOUT * 2,
                                "erasure")


@reads.get(
    "/report", response_model=FunnelReport,
    summary="Funnel report: stages per channel, opportunities, presales decisions, SLA compliance",
    description="From the audit store (entries optionally since a time) and the event log (first touch); "
    "`format=csv` gives one `table` for a spreadsheet. Roles: manager.",
    responses={200: {"content": {"text/csv": {}}}},
)
async def get_report(
    request: Request, caller: Annotated[Principal, Depends(allow())],
    since: Annotated[AwareDatetime | None, Query(description="ISO 8601 with a timezone")] = None,
    format: Annotated[Literal["json", "csv"], Query(description="csv: one table for a spreadsheet")] = "json",
    table: Annotated[Literal[CSV_TABLES], Query(description="the table `format=csv` gives")] = "stages",  # type: ignore[valid-type]
    opportunity_days: Annotated[int, Query(ge=1, le=3650, description="lead -> opportunity window, days")] = 84,
    won_days: Annotated[int, Query(ge=1, le=3650, description="opportunity -> won window, days")] = 18,
    cohort: Annotated[Literal["month", "week"], Query(description="cohorts by creation month or week")] = "month",
) -> FunnelReport:
    entries, touches = await _backends(request).in_store(
        lambda store: (store.report_entries(since), store.lead_touches()))
    windows = ReportWindows(lead_to_opportunity_days=opportunity_days, opportunity_to_won_days=won_days, cohort=cohort)
    report = funnel_report(entries, now=datetime.now(timezone.utc), touches=touches, windows=windows)
    if format == "csv":
        return Response(report_csv(report, table), media_type="text/csv; charset=utf-8",  # type: ignore[return-value]
                        headers={"Content-Disposition": f'attachment; filename="funnel-{table}.csv"'})
    return report


# --------------------------------------------------------------------------- outbox


@outbox.get(
    "", response_model=OutboxPage, summary="Pending handovers, nurture steps, escalations, opportunities",
    description=(
        "Messages nobody has acknowledged yet, oldest first, for tools that poll instead of taking the "
        "webhook. Acknowledge them with POST /outbox/ack. Roles: marketing, manager." + _MASKED
    ),
)
async def get_outbox(
    request: Request, caller: Annotated[Principal, Depends(allow(Role.MARKETING))],
    kind: OutboundKind | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> OutboxPage:
    messages = await _backends(request).in_store(lambda store: store.pending_outbox(kind, limit))
    if not _reads_personal_data(request, caller.role):
        messages = [m.model_copy(update={"payload": scrub_payload(m.payload)}) for m in messages]
    return OutboxPage(count=len(messages), messages=messages)


@outbox.post(
    "/ack", response_model=AckResult, summary="Acknowledge outbox messages",
    description="Idempotent: acknowledging again (or an unknown id) changes nothing. Roles: marketing, manager.",
)
async def ack_outbox(
    body: AckIn, request: Request, caller: Annotated[Principal, Depends(allow(Role.MARKETING))]
) -> AckResult:
    ids = list(dict.fromkeys(body.message_ids))
    done = await _backends(request).in_store(lambda store: store.ack_outbox(ids))
    return AckResult(acknowledged=done, unchanged=len(ids) - done)


# --------------------------------------------------------------------------- scoring model versions

MAX_MODEL_BYTES = 256 * 1024


class ModelIn(_Request):
    toml: Annotated[str, StringConstraints(min_length=1, max_length=MAX_MODEL_BYTES)] = Field(
        description="the scoring model file's text (TOML), with a new `version`")
    dry_run: bool = Field(default=False, description="only say how many running leads would change score and stage")
    rate_per_second: float = Field(default=20.0, gt=0, le=1000, description="leads told per second by the rollout")


class ModelVersionOut(BaseModel):
    ref: str
    sha256: str
    applied_by: str
    applied_at: datetime
    active: bool


class ModelApplied(ModelVersionOut):
    rollout: RolloutProgress | None = Field(description="the rollout to running leads (GET /models/{ref} follows it)")


class ModelDetail(ModelVersionOut):
    text: str
    rollout: RolloutProgress | None = None


@models.post(
    "", status_code=202, response_model=ModelApplied | leads.ModelPreview,
    summary="Apply a scoring model version to every lead (or try it: dry_run)",
    description=(
        "Validates the model (422 naming field and line), records it as the active version with the key's owner "
        "and the file's digest, and starts rolling it out to every running lead at `rate_per_second`: each lead "
        "re-scores and audits the change; a lead newly over the threshold becomes MQL, nobody is demoted. New leads "
        "use it at once. The same version again continues its rollout; a version already recorded with other "
        "content is 409. With `dry_run` nothing is recorded: the answer (200) says how many running leads would "
        "change score and stage. Roles: manager."
    ),
    responses={409: {"model": Problem, "description": "this version is recorded with other content"},
               200: {"model": leads.ModelPreview, "description": "dry run: what would change"}},
)
async def apply_model(body: ModelIn, request: Request, caller: Annotated[Principal, Depends(allow())]):
    try:
        model = parse_model(body.toml, "toml")
    except ModelError as err:
        raise RequestValidationError([{"loc": ("body", "toml"), "msg": str(err), "type": "value_error"}]) from None
    backends = _backends(request)
    temporal = await backends.temporal()
    store = await run_in_threadpool(backends.store)
    if body.dry_run:
        preview = await _temporal_call(leads.preview_model(temporal, store, backends.settings, model),
                                       ANSWER_TIMEOUT * 4, "query")
        return JSONResponse(preview.model_dump(mode="json"), status_code=200)
    try:
        version, rollout = await _temporal_call(
            leads.apply_model(temporal, backends.settings, store, body.toml, "toml", by=caller.actor,
                              rate_per_second=body.rate_per_second), ANSWER_TIMEOUT, "model rollout")
    except ModelConflict as err:
        return _problem(409, str(err))
    request.app.state.scoring_model.forget()  # new leads start on the applied version at once
    return ModelApplied(**version.model_dump(exclude={"text"}), rollout=rollout)


@models.get("", response_model=list[ModelVersionOut], summary="Every scoring model version ever applied",
            description="Oldest first; one is active. Roles: manager.")
async def list_models(request: Request, caller: Annotated[Principal, Depends(allow())]) -> list[ModelVersionOut]:
    versions = await _backends(request).in_store(AuditStore.model_versions)
    return [ModelVersionOut(**v.model_dump(exclude={"text"})) for v in versions]


@models.get("/{ref}", response_model=ModelDetail, summary="One version, its text and its rollout",
            description="Roles: manager.", responses={404: {"model": Problem, "description": "no such version"}})
async def get_model(ref: Annotated[str, PathParam(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}@[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")],
                    request: Request, caller: Annotated[Principal, Depends(allow())]) -> ModelDetail:
    backends = _backends(request)
    version = await backends.in_store(AuditStore.model_version, ref)
    if version is None:
        return _problem(404, f"no scoring model {ref}")
    rollout = None
    try:
        rollout = await leads.rollout_progress(await backends.temporal(), backends.settings, ref)
    except Unavailable:
        pass
    return ModelDetail(**version.model_dump(), rollout=rollout)


# =========================================================================== errors and middleware


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())], "msg": _message(e),
             "type": str(e.get("type", "value_error"))}
            for e in exc.errors()
        ]
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        return JSONResponse({"detail": errors, "message": message}, status_code=422)

    @app.exception_handler(leads.LeadNotFound)
    async def not_found(request: Request, exc: leads.LeadNotFound) -> JSONResponse:
        return _problem(404, str(exc))

    @app.exception_handler(leads.LeadStarting)
    async def starting(request: Request, exc: leads.LeadStarting) -> JSONResponse:
        return _problem(503, str(exc), headers={"Retry-After": "2"})

    @app.exception_handler(leads.CommandRefused)
    async def refused(request: Request, exc: leads.CommandRefused) -> JSONResponse:
        return _problem(409, f"refused: {exc}")

    @app.exception_handler(leads.LeadClosed)
    async def closed(request: Request, exc: leads.LeadClosed) -> JSONResponse:
        return _problem(410, str(exc))

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        return _problem(503, str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(leads.TemporalUnavailable)
    async def temporal_unavailable(request: Request, exc: leads.TemporalUnavailable) -> JSONResponse:
        return _problem(503, str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(Behind)
    async def behind(request: Request, exc: Behind) -> JSONResponse:
        return _problem(503, str(exc), headers={"Retry-After": str(BEHIND_RETRY_AFTER)})

    @app.exception_handler(NoAnswer)
    async def no_answer(request: Request, exc: NoAnswer) -> JSONResponse:
        return _problem(504, str(exc), headers=exc.headers)

    @app.exception_handler(RPCError)
    async def temporal_error(request: Request, exc: RPCError) -> JSONResponse:
        return _problem(503, f"Temporal error: {_first_line(exc)}", headers={"Retry-After": "5"})


class BodyLimit:
    """Refuses bodies over `limit` bytes with 413: by Content-Length before reading, and
    by counting while reading (chunked uploads, lying headers)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body larger than {self.limit} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_problem(send, 400, "invalid Content-Length header")
            if int(length) > self.limit:
                return await _send_problem(send, 413, too_large)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI passes HTTPExceptions raised while reading the body through.
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited_receive, send)


async def _send_problem(send, status: int, detail: str) -> None:
    body = JSONResponse({"detail": detail}).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class StartupMessage:
    """A configuration error at startup is one clear line in uvicorn's log, not a traceback."""

    def __init__(self, app, state):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def clean_send(message):
            problem = getattr(self.state, "startup_error", None)
            if message["type"] == "lifespan.startup.failed" and problem:
                message = {**message, "message": f"leadflow api cannot start: {problem}"}
            await send(message)

        await self.app(scope, receive, clean_send)


# =========================================================================== the app

DESCRIPTION = f"""
One HTTP service for the tools around Leadflow's funnel (IQL -> MQL -> SAL -> SQL -> won/lost); each
lead is a durable Temporal workflow.

**Authentication**: an API key, as `Authorization: Bearer <key>` or `X-API-Key: <key>`. Each key is
bound to a name and a role in the configuration; the audit history records that name and role as the
actor of everything done with the key (bodies never name an actor). No valid key: 401; a role that may
not: 403.

| role | may |
|---|---|
| marketing | post events and profile facts; read leads and histories; poll and acknowledge the outbox |
| presales | accept, reject, qualify, log contacts; read leads and histories |
| sales | log contacts, qualify, reject (after acceptance), close won/lost; read leads and histories |
| manager | everything, including reopen, the funnel report, a person's data (export, erasure) and the codec server |

**Personal data** (profile fact values, event attributes, notes) is shown to the roles in
`LEADFLOW_PII_READERS` (default: manager, presales, sales); every other role gets it masked as `***`
in lead states, histories and the outbox (names of facts stay). Managers export a person's data
(`GET /leads/{{id}}/personal-data`, GDPR Art. 15) and erase it (`DELETE`, Art. 17). `/codec/decode` and
`/codec/encode` are the codec server of the Temporal web UI (managers only).

The lead itself checks each command against its stage and the role (409 with its reason).

**Webhooks** are at-least-once: events are idempotent by `event_id`, profile updates by `update_id`.
Bodies are at most {MAX_BODY_BYTES} bytes; batches at most {MAX_BATCH} events. `/healthz` and `/readyz` need no key.
"""


def create_app(settings: Settings | None = None, keys: KeyRing | None = None, temporal: Client | None = None,
               store: AuditStore | None = None) -> FastAPI:
    """The API. Without arguments everything comes from the environment at startup
    (`uvicorn api:app`); tests pass their own settings, keys, client and store."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            cfg = settings or Settings.from_env()
            app.state.keys = keys or KeyRing.from_env()
            app.state.auth_failures = FailedAuthLimiter()
            app.state.scoring_model = _ActiveModel(cfg.model_path)
            model = app.state.scoring_model._file
            if temporal is None:
                PayloadKeyring.from_env()  # no payload keys, no start: nothing may reach Temporal in the clear
        except ValidationError as err:
            app.state.startup_error = f"invalid settings in the environment: {_describe(err)}"
            raise
        except (ConfigError, ModelError, KeyConfigError) as err:
            app.state.startup_error = str(err).replace("\n", " ")
            raise
        app.state.backends = backends = Backends(cfg, temporal, store)
        await backends.warm_up()
        log.info("API with %d key(s), scoring model %s, task queue %r", len(app.state.keys), model.ref,
                 cfg.task_queue)
        try:
            yield
        finally:
            backends.close()

    app = FastAPI(title="Leadflow API", version="1.0", description=DESCRIPTION, lifespan=lifespan,
                  responses={500: {"model": Problem, "description": "a bug: please report it"}},
                  docs_url=None, redoc_url=None)
    for router in (health, ingest, commands, reads, personal, outbox, models):
        app.include_router(router)
    app.include_router(codec_router)
    _install_docs(app)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit)
    app.add_middleware(StartupMessage, state=app.state)
    return app


def _install_docs(app: FastAPI) -> None:
    """/docs, the interactive documentation, working offline: Swagger UI's files come from
    the swagger-ui-bundle package and are served here (FastAPI's default page loads them
    from a CDN). ReDoc has no such package, so there is no /redoc; /openapi.json feeds any
    other viewer."""
    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - docs",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


app = create_app()
