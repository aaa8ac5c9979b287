"""The durable audit store and outbox behind the lead activities.

Temporal retries activities, so every write here is idempotent: an audit entry
is keyed by "<lead_id>/<seq>", an outbound message by its message id and an
owner assignment by its assignment id. Writing the same thing twice is a no-op
that reports zero new rows, never a duplicate and never an error.

SQLite (the default, one file) and PostgreSQL (psycopg 3) share this code; only
the upsert and the handling of concurrent writers differ, and both are decided
in `AuditStore.__init__`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
from collections import namedtuple
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from sqlalchemy import (
    JSON, Column, Index, LargeBinary, Text, and_, bindparam, case, delete, event, func, insert, inspect, or_, text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import StaticPool
from pydantic import BaseModel
from sqlmodel import Field, Session, SQLModel, create_engine, select

from activities import report_store, webhook_store
from activities.webhook_store import SubscriptionKind
from activities.db_types import UtcDateTime
from activities.paging import after_key
from activities.report_store import REPORT_KIND_VALUES, REPORT_KINDS
from funnel.accounts import AccountSummary
from funnel.kpis import LeadTouch, ReportWindows, SlaReport
from funnel.models import (
    ActivityEvent, AuditEntry, AuditKind, Outbound, OutboundKind, ProfileUpdate, ReportEntry, Stage, TakenInput,
    event_digest,
)
from funnel.personal_data import ERASED, ErasureReport, scrub_entry, scrub_payload
from funnel.report import FunnelReport

# SQLAlchemy only guarantees rowcount for UPDATE/DELETE; without this option an
# INSERT through psycopg 3 reports -1. We need the number of rows actually
# inserted to tell new entries from already-stored ones.
_ROWCOUNT = {"preserve_rowcount": True}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _utc_column(**kwargs: Any) -> Column:
    return Column(UtcDateTime(), **kwargs)


# --------------------------------------------------------------------------- tables
# Enums are stored as their plain string values (not database enum types), so a
# new AuditKind or Stage needs no schema migration.


class AuditRow(SQLModel, table=True):
    __tablename__ = "audit_entry"
    __table_args__ = (
        Index("ix_audit_entry_lead_seq", "lead_id", "seq", unique=True),
        Index("ix_audit_entry_kind", "kind"),
        Index("ix_audit_entry_to_stage", "to_stage"),
        Index("ix_audit_entry_channel", "channel"),
        Index("ix_audit_entry_at", "at"),  # polling: leads changed since (AuditStore.changed_leads)
    )

    entry_id: str = Field(primary_key=True)
    lead_id: str
    seq: int
    at: datetime = Field(sa_column=_utc_column(nullable=False))
    kind: str
    actor: str
    role: str
    detail: str = Field(sa_column=Column(Text, nullable=False))
    channel: str | None = None
    event_id: str | None = None
    rule: str | None = None
    points: float | None = None
    score_total: float | None = None
    score_fit: float | None = None
    score_engagement: float | None = None
    model_ref: str | None = None
    from_stage: str | None = None
    to_stage: str | None = None
    trigger: str | None = None
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    occurred_at: datetime | None = Field(default=None, sa_column=_utc_column(nullable=True))
    source: str | None = None
    command_id: str | None = Field(default=None, index=True)
    owner: str | None = None


# Columns added after a table was first created: (table, column, SQL type). `create_all`
# never alters an existing table, so a store made by older code gets them on start.
_ADDED_COLUMNS = [
    ("audit_entry", "occurred_at", {"sqlite": "DATETIME", "postgresql": "TIMESTAMP WITH TIME ZONE"}),
    ("audit_entry", "source", {"sqlite": "VARCHAR", "postgresql": "VARCHAR"}),
    ("audit_entry", "command_id", {"sqlite": "VARCHAR", "postgresql": "VARCHAR"}),
    ("audit_entry", "owner", {"sqlite": "VARCHAR", "postgresql": "VARCHAR"}),
    ("webhook_delivery", "ordinal", {"sqlite": "INTEGER NOT NULL DEFAULT 0", "postgresql": "INTEGER NOT NULL DEFAULT 0"}),
]


class OutboxRow(SQLModel, table=True):
    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_acked_kind", "acked_at", "kind"),)

    message_id: str = Field(primary_key=True)
    lead_id: str = Field(index=True)
    kind: str
    at: datetime = Field(sa_column=_utc_column(nullable=False))
    payload: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(sa_column=_utc_column(nullable=False))
    delivered_webhook: bool = False
    acked_at: datetime | None = Field(default=None, sa_column=_utc_column(nullable=True))


class EventLogRow(SQLModel, table=True):
    """Every event taken for a lead, once per id: what the edge answers redeliveries from
    (same content: duplicate; other content: conflict), and the log a backtest replays."""

    __tablename__ = "event_log"
    __table_args__ = (Index("ix_event_log_lead_time", "lead_id", "occurred_at"),)

    lead_id: str = Field(primary_key=True)
    event_id: str = Field(primary_key=True)
    type: str
    occurred_at: datetime = Field(sa_column=_utc_column(nullable=False))
    received_at: datetime = Field(sa_column=_utc_column(nullable=False))
    channel: str | None = None
    campaign: str | None = None
    source: str | None = None
    attributes: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    digest: str


class FactLogRow(SQLModel, table=True):
    """Every profile update taken for a lead, once per id: what a backtest replays beside
    the events, and `leadflow events export` writes out."""

    __tablename__ = "fact_log"
    __table_args__ = (Index("ix_fact_log_lead_time", "lead_id", "received_at"),)

    lead_id: str = Field(primary_key=True)
    update_id: str = Field(primary_key=True)
    observed_at: datetime | None = Field(default=None, sa_column=_utc_column(nullable=True))
    received_at: datetime = Field(sa_column=_utc_column(nullable=False))
    actor: str
    role: str
    facts: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class LeadTouchRow(SQLModel, table=True):
    """Each lead's first touch: the channel and the campaign of its earliest logged event
    that has one, by event time (then id), whatever arrived first. Kept as events are
    logged, so a report reads one row per lead instead of ranking the whole event log."""

    __tablename__ = "lead_touch"

    lead_id: str = Field(primary_key=True)
    channel: str | None = None
    channel_at: datetime | None = Field(default=None, sa_column=_utc_column(nullable=True))
    channel_event: str | None = None
    campaign: str | None = None
    campaign_at: datetime | None = Field(default=None, sa_column=_utc_column(nullable=True))
    campaign_event: str | None = None


class ScoringModelRow(SQLModel, table=True):
    """Every scoring model version ever applied: who applied it, when, and its text."""

    __tablename__ = "scoring_model"

    ref: str = Field(primary_key=True)  # name@version
    text: str = Field(sa_column=Column(Text, nullable=False))
    sha256: str
    applied_by: str
    applied_at: datetime = Field(sa_column=_utc_column(nullable=False))
    active: bool = Field(default=False, index=True)


class ModelVersion(BaseModel):
    ref: str
    sha256: str
    applied_by: str
    applied_at: datetime
    active: bool
    text: str


class ModelConflict(ValueError):
    """A model version that is already recorded with other content: give it a new version."""


class OwnerAssignmentRow(SQLModel, table=True):
    __tablename__ = "owner_assignment"

    assignment_id: str = Field(primary_key=True)
    owner: str
    team_name: str
    assigned_at: datetime = Field(sa_column=_utc_column(nullable=False))


class RoundRobinRow(SQLModel, table=True):
    __tablename__ = "round_robin"

    team_name: str = Field(primary_key=True)
    counter: int = 0


class LeadKeyRow(SQLModel, table=True):
    """A lead's data key (payload_codec.LeadKeys), wrapped by payload key `kek_id`. Erasure
    sets `wrapped` to NULL: the lead's payloads encrypted with it can never be read again."""

    __tablename__ = "lead_key"

    lead_id: str = Field(primary_key=True)
    generation: int = Field(primary_key=True)
    kek_id: str
    wrapped: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    erasure_id: str | None = None  # the erasure that made this generation
    created_at: datetime = Field(sa_column=_utc_column(nullable=False))
    destroyed_at: datetime | None = Field(default=None, sa_column=_utc_column(nullable=True))


class LeadKeyChangeRow(SQLModel, table=True):
    """A lead's key rotated or destroyed, numbered in commit order. Processes keep lead keys in
    memory until they change, and read the changes since their last look (at most every
    key_cache_seconds, payload_codec.LeadKeys) instead of reading every key again."""

    __tablename__ = "lead_key_change"

    id: int | None = Field(default=None, primary_key=True)
    lead_id: str
    changed_at: datetime = Field(sa_column=_utc_column(nullable=False))


class ErasureRow(SQLModel, table=True):
    """Who erased a person's data when (GDPR Art. 17), and what it took; no personal data."""

    __tablename__ = "erasure"

    erasure_id: str = Field(primary_key=True)
    lead_id: str = Field(index=True)
    erased_by: str
    erased_at: datetime = Field(sa_column=_utc_column(nullable=False))
    through_seq: int | None = None  # audit entries up to here were scrubbed (None: all)
    profile_facts: int = 0
    events: int = 0
    audit_entries: int = 0
    outbox_messages: int = 0
    key_generation: int | None = None
    keys_destroyed_at: datetime | None = Field(default=None, sa_column=_utc_column(nullable=True))


class ExternalIdRow(SQLModel, table=True):
    """A lead's id in another system (a Mautic or HubSpot contact id, a CRM id): how a vendor
    webhook finds its lead, and `GET /leads/by-external/{system}/{id}`. One external id names
    one lead for ever (the first link wins); a lead may have ids in several systems."""

    __tablename__ = "external_id"

    system: str = Field(primary_key=True)
    external_id: str = Field(primary_key=True)
    lead_id: str = Field(index=True)
    linked_by: str
    linked_at: datetime = Field(sa_column=_utc_column(nullable=False))


class ConnectorLogRow(SQLModel, table=True):
    """What each item of a vendor webhook became (accepted, duplicate, ignored, rejected) and
    why: the vendor's ids and types only, none of the person's data."""

    __tablename__ = "connector_log"
    __table_args__ = (Index("ix_connector_log_connector_id", "connector", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    connector: str
    received_at: datetime = Field(sa_column=_utc_column(nullable=False))
    vendor_type: str
    vendor_id: str | None = None
    contact_id: str | None = None
    lead_id: str | None = None
    outcome: str
    reason: str | None = None


class AccountMemberRow(SQLModel, table=True):
    """Which leads fed which account (funnel/accounts.py), for the report's account counts."""

    __tablename__ = "account_member"

    account_id: str = Field(primary_key=True)
    lead_id: str = Field(primary_key=True)
    role: str | None = None
    first_at: datetime = Field(sa_column=_utc_column(nullable=False))


# Core tables for the writes (dialect INSERT ... ON CONFLICT, bulk UPDATE).
_AUDIT = AuditRow.__table__
_OUTBOX = OutboxRow.__table__
_OWNERS = OwnerAssignmentRow.__table__
_ROUND_ROBIN = RoundRobinRow.__table__
_MODELS = ScoringModelRow.__table__
_EVENTS = EventLogRow.__table__
_TOUCHES = LeadTouchRow.__table__
_FACTS = FactLogRow.__table__
# `replay_log`'s rows, as named tuples of their table's columns: a database row finds each
# field by name in Python (~0.45 us a field, nine per event: more than the rest of turning a
# row into a backtest's input), a named tuple in C.
_EVENT_TUPLE = namedtuple("event_log_row", [c.name for c in _EVENTS.c])._make  # type: ignore[misc]
_FACT_TUPLE = namedtuple("fact_log_row", [c.name for c in _FACTS.c])._make  # type: ignore[misc]
_LEAD_KEYS = LeadKeyRow.__table__
_LEAD_KEY_CHANGES = LeadKeyChangeRow.__table__
# PostgreSQL advisory lock that writers of lead_key_change hold to commit (see _log_lead_key_change)
LEAD_KEY_CHANGE_LOCK = report_store.advisory_key("leadflow lead_key_change")
_ERASURES = ErasureRow.__table__
_EXTERNAL_IDS = ExternalIdRow.__table__
_CONNECTOR_LOG = ConnectorLogRow.__table__
_ACCOUNT_MEMBERS = AccountMemberRow.__table__


# --------------------------------------------------------------------------- conversions
# The one place each pydantic model meets its row.


def _audit_values(entry: AuditEntry) -> dict[str, Any]:
    values = entry.model_dump(mode="python")
    for name in ("kind", "role", "from_stage", "to_stage", "trigger"):
        if values[name] is not None:
            values[name] = str(values[name].value)
    values["entry_id"] = entry.entry_id
    return values


# A lead's creation is its entry into IQL: subscribers get it as its first stage change.
_ANNOUNCED = {AuditKind.LEAD_CREATED.value, AuditKind.STAGE_CHANGED.value, AuditKind.SLA_BREACHED.value}


def _announcement(row: dict[str, Any]) -> tuple[SubscriptionKind, str, str, dict]:
    """A stage change or SLA breach as subscribers get it (webhook_store says what is in it)."""
    if row["kind"] != AuditKind.SLA_BREACHED.value:
        kind, data = SubscriptionKind.STAGE_CHANGE, webhook_store.stage_change_data(row)
    else:
        kind, data = SubscriptionKind.SLA_BREACH, webhook_store.sla_breach_data(row)
    return kind, f"{row['lead_id']}.{row['seq']}", row["lead_id"], webhook_store.envelope(kind, row["at"], data)


def _audit_entry(row: AuditRow) -> AuditEntry:
    return AuditEntry.model_validate(row.model_dump(exclude={"entry_id"}))


def _outbox_values(message: Outbound) -> dict[str, Any]:
    return {
        "message_id": message.message_id,
        "lead_id": message.lead_id,
        "kind": message.kind.value,
        "at": message.at,
        "payload": message.model_dump(mode="json")["payload"],
        "created_at": utcnow(),
        "delivered_webhook": False,
        "acked_at": None,
    }


def _model_version(row: ScoringModelRow) -> ModelVersion:
    return ModelVersion(ref=row.ref, sha256=row.sha256, applied_by=row.applied_by, applied_at=row.applied_at,
                        active=row.active, text=row.text)


def _erasure_report(row: ErasureRow) -> ErasureReport:
    return ErasureReport(
        lead_id=row.lead_id, erasure_id=row.erasure_id, erased_by=row.erased_by, erased_at=row.erased_at,
        profile_facts=row.profile_facts, events=row.events, audit_entries=row.audit_entries,
        outbox_messages=row.outbox_messages, key_generation=row.key_generation,
        keys_destroyed_at=row.keys_destroyed_at,
        history="crypto-shredded" if row.keys_destroyed_at else "to be crypto-shredded",
    )


def _lead_key(row: LeadKeyRow):
    from payload_codec import LeadKeyRecord

    return LeadKeyRecord(row.lead_id, row.generation, row.kek_id, row.wrapped, row.erasure_id)


def _outbound(row: OutboxRow) -> Outbound:
    return Outbound(message_id=row.message_id, lead_id=row.lead_id, kind=row.kind, at=row.at, payload=row.payload)


# --------------------------------------------------------------------------- store


class AuditStore:
    """Audit history, outbox and owner assignments in one SQL database.

    Safe to share between threads: activities run in a thread pool and call it
    concurrently for many leads.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {url!r}: use sqlite:///... or postgresql+psycopg://...")
        self._insert = sqlite.insert if self.dialect == "sqlite" else postgresql.insert
        if self.dialect == "sqlite":
            self.engine = _sqlite_engine(url)
            # SQLite has one writer at a time; queueing our own threads here
            # beats having them spin on "database is locked".
            self._write_lock: contextlib.AbstractContextManager = threading.Lock()
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
            # PostgreSQL locks rows itself; ON CONFLICT and row locks suffice.
            self._write_lock = contextlib.nullcontext()
        SQLModel.metadata.create_all(self.engine, tables=[_AUDIT, _OUTBOX, _OWNERS, _ROUND_ROBIN, _MODELS, _EVENTS,
                                                           _LEAD_KEYS, _LEAD_KEY_CHANGES, _ERASURES, _TOUCHES, _FACTS,
                                                           _EXTERNAL_IDS, _CONNECTOR_LOG, _ACCOUNT_MEMBERS,
                                                           *webhook_store.TABLES])
        report_store.create_tables(self.engine)
        self._add_missing_columns()
        self.fill_lead_touches()
        self.fill_report_tables()

    def _add_missing_columns(self) -> None:
        inspector = inspect(self.engine)
        for table, column, types in _ADDED_COLUMNS:
            if column not in {c["name"] for c in inspector.get_columns(table)}:
                with self._writing() as session:
                    session.exec(text(f"ALTER TABLE {table} ADD COLUMN {column} {types[self.dialect]}"))
                    if column == "command_id":  # looked up by key: indexed like a fresh table's
                        session.exec(text(f"CREATE INDEX IF NOT EXISTS ix_{table}_{column} ON {table} ({column})"))
        if "ix_audit_entry_at" not in {i["name"] for i in inspector.get_indexes("audit_entry")}:
            with self._writing() as session:  # a store made before polling by time
                session.exec(text("CREATE INDEX IF NOT EXISTS ix_audit_entry_at ON audit_entry (at)"))

    def dispose(self) -> None:
        """Close pooled connections (tests, shutdown)."""
        self.engine.dispose()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Session]:
        """One write transaction: committed on success, rolled back on error."""
        with self._write_lock, Session(self.engine) as session, session.begin():
            yield session

    def ping(self) -> None:
        """Raises if the database cannot be reached (health checks)."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    # ----------------------------------------------------------------- audit

    def write_audit(self, entries: list[AuditEntry], taken: list[TakenInput] | None = None) -> int:
        """Insert the entries in one transaction; returns how many were new.

        Entries already stored (same lead and seq) are skipped, so an activity
        retry after a lost response writes nothing twice. `taken`: the input the
        lead took since its last write, logged (once per id) in the same transaction,
        so the event log holds everything a lead applied even when the edge could
        not log it.
        """
        if not entries and not taken:
            return 0
        with self._writing() as session:
            if taken:
                events = [(item, t.received_at) for t in taken for item in t.items if isinstance(item, ActivityEvent)]
                updates = [(item, t.received_at) for t in taken for item in t.items if isinstance(item, ProfileUpdate)]
                if events:
                    self._log_events(session, [e for e, _ in events], [at for _, at in events])
                if updates:
                    self._log_facts(session, [u for u, _ in updates], [at for _, at in updates])
            return self._write_audit(session, entries)

    def _write_audit(self, session: Session, entries: list[AuditEntry]) -> int:
        if not entries:
            return 0
        # Sorted by key, so concurrent batches that overlap take their row locks
        # in the same order: on PostgreSQL, unsorted overlapping batches can
        # deadlock (each waiting for the other's uncommitted duplicate).
        rows = sorted((_audit_values(e) for e in entries), key=lambda row: (row["lead_id"], row["seq"]))
        # One statement run for many parameter sets: SQLAlchemy sends them as
        # multi-row INSERTs ("insertmanyvalues") from one cached compilation.
        # ON CONFLICT DO NOTHING returns only the rows it inserted: the leads with a new
        # report entry get their report rows derived again, in the same transaction.
        inserted = session.connection().execute(_new_only(self._insert, _AUDIT, ("lead_id", "seq", "kind")),
                                                rows).all()
        report_store.refresh_leads(session.connection(),
                                   {lead_id for lead_id, _, kind in inserted if kind in REPORT_KIND_VALUES})
        announced = {(lead_id, seq) for lead_id, seq, kind in inserted if kind in _ANNOUNCED}
        if announced:  # subscribers learn of it in the same transaction that records it
            webhook_store.fan_out(session.connection(), self._insert, utcnow(), [
                _announcement(row) for row in rows if (row["lead_id"], row["seq"]) in announced])
        return len(inserted)

    def changed_leads(self, since: datetime, limit: int = 100, after: tuple[datetime, str] | None = None
                      ) -> list[tuple[str, datetime]]:
        """(lead, its latest entry's time) of the leads with an entry recorded at or after
        `since`, oldest change first, keyset-paged after the previous page's last (time, lead).
        Entries reach the store within the audit lag of the lead recording them."""
        last = func.max(AuditRow.at).label("last")
        stmt = select(AuditRow.lead_id, last).where(AuditRow.at >= since).group_by(AuditRow.lead_id)
        if after is not None:
            stmt = stmt.having(or_(last > after[0], and_(last == after[0], AuditRow.lead_id > after[1])))
        stmt = stmt.order_by(last, AuditRow.lead_id).limit(limit)
        with Session(self.engine) as session:
            return [(lead_id, at) for lead_id, at in session.exec(stmt).all()]

    def history(self, lead_id: str, offset: int = 0, limit: int = 100) -> list[AuditEntry]:
        stmt = select(AuditRow).where(AuditRow.lead_id == lead_id).order_by(AuditRow.seq).offset(offset).limit(limit)
        with Session(self.engine) as session:
            return [_audit_entry(row) for row in session.exec(stmt)]

    def command_entries(self, lead_id: str, command_id: str) -> list[AuditEntry]:
        stmt = (select(AuditRow).where(AuditRow.lead_id == lead_id, AuditRow.command_id == command_id)
                .order_by(AuditRow.seq))
        with Session(self.engine) as session:
            return [_audit_entry(row) for row in session.exec(stmt)]

    def has_history(self) -> bool:
        """Whether any lead has an audit entry here."""
        with self.engine.connect() as conn:
            return conn.execute(select(_AUDIT.c.lead_id).limit(1)).first() is not None

    def count_history(self, lead_id: str) -> int:
        stmt = select(func.count()).select_from(AuditRow).where(AuditRow.lead_id == lead_id)
        with Session(self.engine) as session:
            return session.exec(stmt).one()

    def applied_ids(self, kind: AuditKind, wanted: dict[str, list[str]]) -> set[tuple[str, str]]:
        """(lead, id) pairs among `wanted` ({lead: ids}) with an entry of `kind`: lets an edge
        tell a redelivery is a duplicate (the lead de-duplicates regardless)."""
        found: set[tuple[str, str]] = set()
        with Session(self.engine) as session:
            for lead_id, ids in wanted.items():
                stmt = select(AuditRow.event_id).where(
                    AuditRow.lead_id == lead_id, AuditRow.kind == kind.value, AuditRow.event_id.in_(ids)
                )
                found.update((lead_id, event_id) for event_id in session.exec(stmt))
        return found

    def stage_changes(self, since: datetime | None = None) -> list[AuditEntry]:
        """Lead creations and stage changes, per lead in order."""
        return self.report_entries(since, kinds=(AuditKind.LEAD_CREATED, AuditKind.STAGE_CHANGED))

    def report_entries(self, since: datetime | None = None,
                       kinds: Iterable[AuditKind] = REPORT_KINDS,
                       leads: tuple[str, str] | None = None) -> list[ReportEntry]:
        """The entries funnel reports read (funnel/report.py), per lead in order, with the
        columns reports use (funnel.models.ReportEntry). Read as plain rows, not validated
        again (each was when written): a report reads hundreds of thousands, and ORM rows
        validated twice cost 50 us each (bench/report.py). `leads`: only lead ids from the
        first to the second, both included (a backtest reads its shards apart)."""
        stmt = report_store.entries_select(_AUDIT, kinds)
        if since is not None:
            stmt = stmt.where(_AUDIT.c.at >= since)
        if leads is not None:
            stmt = stmt.where(_AUDIT.c.lead_id.between(*leads))
        with self.engine.connect() as conn:
            return report_store.read_entries(conn, stmt.order_by(_AUDIT.c.lead_id, _AUDIT.c.seq))

    def created_leads(self, since: datetime | None = None, until: datetime | None = None) -> list[str]:
        """The ids of the leads created from `since` up to (not including) `until`, in the
        database's order: the order its `BETWEEN` goes by (PostgreSQL's may be a locale's,
        not Python's)."""
        stmt = select(_AUDIT.c.lead_id).where(_AUDIT.c.kind == AuditKind.LEAD_CREATED.value)
        if since is not None:
            stmt = stmt.where(_AUDIT.c.at >= since)
        if until is not None:
            stmt = stmt.where(_AUDIT.c.at < until)
        with self.engine.connect() as conn:
            return list(conn.execute(stmt.distinct().order_by(_AUDIT.c.lead_id)).scalars())

    def funnel_report(self, now: datetime, windows: ReportWindows | None = None,
                      since: datetime | None = None) -> FunnelReport:
        """The funnel report (funnel/report.py defines it) over this store: the one place the
        CLI, the API and the dashboard get it from. Aggregated in the database over summary
        tables kept on write (activities/report_store.py); `since`: leads created then or later."""
        with self.engine.connect() as conn:
            return report_store.funnel_report_sql(conn, now, windows, since)

    def sla_report(self) -> SlaReport:
        """The funnel report's SLA part alone, from the same summary tables."""
        with self.engine.connect() as conn:
            return report_store.sla_report_sql(conn)

    def open_slas(self, limit: int = 100) -> tuple[int, list[tuple[str, str, str, bool, datetime | None]]]:
        """SLAs running now and breaches nobody has acted on: how many, and the first `limit`
        (see report_store.open_slas)."""
        with self.engine.connect() as conn:
            return report_store.open_slas(conn, limit)

    def fill_report_tables(self) -> None:
        """Derive the report's summary tables once for a store from before they existed (on
        start); from then on every audit write keeps them."""
        with self.engine.connect() as conn:
            if conn.execute(select(report_store.REPORT_STATE.c.name)).first() is not None:
                return
        self.rebuild_report_tables()

    def rebuild_report_tables(self, chunk: int = 1000) -> int:
        """Derive the report's rows of every lead again (after audit rows were loaded in bulk,
        as bench/report.py does); idempotent. Returns how many leads. In transactions of
        `chunk` leads: PostgreSQL takes an advisory lock per lead, and its lock table is shared
        (64 per connection by default)."""
        with self.engine.connect() as conn:
            leads = report_store.report_leads(conn)
        for i in range(0, len(leads), chunk):
            with self._writing() as session:
                report_store.refresh_leads(session.connection(), leads[i:i + chunk])
        with self._writing() as session:
            session.exec(self._insert(report_store.REPORT_STATE).values(name="filled").on_conflict_do_nothing())
        return len(leads)

    def lead_touches(self) -> dict[str, LeadTouch]:
        """Each logged lead's first touch (kept in `lead_touch` as events are logged) and its
        latest campaign up to its first MQL (one index seek per MQL lead)."""
        e, a = _EVENTS, _AUDIT
        first_mql = (select(a.c.lead_id, func.min(func.coalesce(a.c.occurred_at, a.c.at)).label("at"))
                     .where(a.c.kind == AuditKind.STAGE_CHANGED.value, a.c.to_stage == Stage.MQL.value)
                     .group_by(a.c.lead_id).subquery())
        last_campaign = (select(e.c.campaign)
                         .where(e.c.lead_id == first_mql.c.lead_id, e.c.campaign.is_not(None),
                                e.c.occurred_at <= first_mql.c.at)
                         .order_by(e.c.occurred_at.desc(), e.c.event_id.desc()).limit(1).scalar_subquery())
        with self.engine.connect() as conn:
            touches = {lead_id: LeadTouch(channel=channel, campaign=campaign) for lead_id, channel, campaign
                       in conn.execute(select(_TOUCHES.c.lead_id, _TOUCHES.c.channel, _TOUCHES.c.campaign))}
            for lead_id, campaign in conn.execute(select(first_mql.c.lead_id, last_campaign)):
                if campaign is not None:
                    touches.setdefault(lead_id, LeadTouch()).last_campaign_before_mql = campaign
        return touches

    # ----------------------------------------------------------------- outbox

    def add_outbox(self, message: Outbound) -> bool:
        """Store a message for delivery; False if this message id is already there. A message
        made before its lead's personal data was erased (still retrying then) is stored scrubbed."""
        erased_at = self.erased_at(message.lead_id)
        if erased_at is not None and message.at <= erased_at:
            message = message.model_copy(update={"payload": scrub_payload(message.payload, ERASED)})
        stmt = self._insert(_OUTBOX).values(_outbox_values(message)).on_conflict_do_nothing()
        with self._writing() as session:
            new = session.exec(stmt, execution_options=_ROWCOUNT).rowcount == 1
            if new:
                kind = SubscriptionKind(message.kind.value)
                webhook_store.fan_out(session.connection(), self._insert, utcnow(), [(
                    kind, message.message_id.replace("/", "."), message.lead_id,
                    webhook_store.envelope(kind, message.at, message.model_dump(mode="json")))])
            return new

    def is_delivered(self, message_id: str) -> bool:
        """Whether the webhook has accepted this message (so a retry must not POST again)."""
        stmt = select(OutboxRow.delivered_webhook).where(OutboxRow.message_id == message_id)
        with Session(self.engine) as session:
            return bool(session.exec(stmt).first())

    def mark_delivered(self, message_id: str) -> None:
        stmt = update(_OUTBOX).where(_OUTBOX.c.message_id == message_id).values(delivered_webhook=True)
        with self._writing() as session:
            session.exec(stmt)

    def pending_outbox(self, kind: OutboundKind | None = None, limit: int = 100) -> list[Outbound]:
        """Messages nobody has acknowledged yet, oldest first (for pollers instead of a webhook)."""
        return self.outbox_page(kind, limit)[0]

    def outbox_page(self, kind: OutboundKind | None = None, limit: int = 100,
                    after: tuple[datetime, str] | None = None, since: datetime | None = None,
                    ) -> tuple[list[Outbound], tuple[datetime, str] | None]:
        """A page of the pending messages (stored at or after `since`), oldest first, after the
        key of the previous page's last one; and this page's last key (None when the page is
        not full: no more)."""
        stmt = select(OutboxRow).where(OutboxRow.acked_at.is_(None))
        if since is not None:
            stmt = stmt.where(OutboxRow.created_at >= since)
        if kind is not None:
            stmt = stmt.where(OutboxRow.kind == OutboundKind(kind).value)
        stmt = after_key(stmt, OutboxRow.created_at, OutboxRow.message_id, after).limit(limit)
        with Session(self.engine) as session:
            rows = list(session.exec(stmt))
        last = (rows[-1].created_at, rows[-1].message_id) if rows and len(rows) == limit else None
        return [_outbound(row) for row in rows], last

    def ack_outbox(self, message_ids: list[str]) -> int:
        """Acknowledge messages; returns how many were not acknowledged before."""
        if not message_ids:
            return 0
        stmt = (
            update(_OUTBOX)
            .where(_OUTBOX.c.message_id.in_(list(message_ids)), _OUTBOX.c.acked_at.is_(None))
            .values(acked_at=utcnow())
        )
        with self._writing() as session:
            return session.exec(stmt, execution_options=_ROWCOUNT).rowcount

    # ----------------------------------------------------------------- external ids and connectors

    def link_external(self, system: str, links: dict[str, str], linked_by: str) -> dict[str, str]:
        """Link external ids to leads ({external id: lead}); an id already linked keeps its
        first lead. Returns {external id: lead} as linked now (the first link wins)."""
        if not links:
            return {}
        now = utcnow()
        rows = [{"system": system, "external_id": ext, "lead_id": lead, "linked_by": linked_by, "linked_at": now}
                for ext, lead in sorted(links.items())]
        with self._writing() as session:
            session.exec(self._insert(_EXTERNAL_IDS).on_conflict_do_nothing(), params=rows)
        return self.leads_by_external(system, list(links))

    def leads_by_external(self, system: str, external_ids: list[str]) -> dict[str, str]:
        """{external id: lead} for those of `external_ids` linked in `system`."""
        found: dict[str, str] = {}
        with Session(self.engine) as session:
            for i in range(0, len(external_ids), 500):
                stmt = select(ExternalIdRow.external_id, ExternalIdRow.lead_id).where(
                    ExternalIdRow.system == system, ExternalIdRow.external_id.in_(external_ids[i: i + 500]))
                found.update(session.exec(stmt).all())
        return found

    def external_ids_of(self, lead_id: str) -> list[tuple[str, str]]:
        """(system, external id) of a lead."""
        with Session(self.engine) as session:
            stmt = select(ExternalIdRow.system, ExternalIdRow.external_id).where(
                ExternalIdRow.lead_id == lead_id).order_by(ExternalIdRow.system, ExternalIdRow.external_id)
            return [tuple(row) for row in session.exec(stmt).all()]

    def log_connector(self, rows: list[dict]) -> None:
        """Record what vendor webhook items became (ConnectorLogRow's columns but `id`)."""
        if rows:
            with self._writing() as session:
                session.exec(insert(_CONNECTOR_LOG), params=rows)

    def connector_log(self, connector: str, limit: int = 100, before: int | None = None) -> list[ConnectorLogRow]:
        """Newest first; `before`: the id of the last row of the previous page."""
        with Session(self.engine) as session:
            stmt = select(ConnectorLogRow).where(ConnectorLogRow.connector == connector)
            if before is not None:
                stmt = stmt.where(ConnectorLogRow.id < before)
            return list(session.exec(stmt.order_by(ConnectorLogRow.id.desc()).limit(limit)).all())

    # ----------------------------------------------------------------- accounts

    def note_account_member(self, account_id: str, lead_id: str, role: str | None, at: datetime) -> None:
        """A lead fed its account (idempotent; the role is its latest)."""
        stmt = self._insert(_ACCOUNT_MEMBERS).values(account_id=account_id, lead_id=lead_id, role=role, first_at=at)
        with self._writing() as session:
            session.exec(stmt.on_conflict_do_update(index_elements=["account_id", "lead_id"], set_={"role": role}))

    def forget_account_member(self, account_id: str, lead_id: str) -> None:
        """A lead left its account (idempotent): the report no longer counts it there."""
        with self._writing() as session:
            session.exec(delete(AccountMemberRow).where(AccountMemberRow.account_id == account_id,
                                                        AccountMemberRow.lead_id == lead_id))

    def account_summary(self) -> AccountSummary:
        """The report's account counts: accounts, their contacts, buying teams, MQAs."""
        with Session(self.engine) as session:
            per_account = select(AccountMemberRow.account_id, func.count().label("n")).group_by(
                AccountMemberRow.account_id).subquery()
            accounts, contacts, teams = session.exec(select(
                func.count(), func.coalesce(func.sum(per_account.c.n), 0),
                func.coalesce(func.sum(case((per_account.c.n >= 2, 1), else_=0)), 0))).one()
            mqa = session.exec(select(func.count(func.distinct(OutboxRow.lead_id))).where(
                OutboxRow.kind == OutboundKind.ACCOUNT_HANDOVER.value)).one()
        return AccountSummary(accounts=accounts, contacts=int(contacts), mqa=mqa, multi_contact_accounts=int(teams),
                              mqa_rate=round(mqa / accounts, 4) if accounts else None)

    # ----------------------------------------------------------------- the event log

    def logged_digests(self, events: list[ActivityEvent]) -> dict[tuple[str, str], str]:
        """{(lead, event id): digest} of those among `events` already in the log."""
        found: dict[tuple[str, str], str] = {}
        by_lead: dict[str, list[str]] = {}
        for logged in events:
            by_lead.setdefault(logged.lead_id, []).append(logged.event_id)
        with Session(self.engine) as session:
            for lead_id, ids in by_lead.items():
                for i in range(0, len(ids), 500):
                    stmt = select(EventLogRow.event_id, EventLogRow.digest).where(
                        EventLogRow.lead_id == lead_id, EventLogRow.event_id.in_(ids[i : i + 500]))
                    found.update(((lead_id, event_id), digest) for event_id, digest in session.exec(stmt))
        return found

    def log_events(self, events: list[ActivityEvent], received_at: datetime | list[datetime]) -> int:
        """Log events Temporal has taken (an id already logged keeps its first version), all
        received at one time or each at its own; returns how many were new."""
        if not events:
            return 0
        with self._writing() as session:
            return self._log_events(session, events, received_at)

    def log_facts(self, updates: list[ProfileUpdate], received_at: datetime | list[datetime]) -> int:
        """Log profile updates Temporal has taken (an id already logged keeps its first
        version), as `log_events`; returns how many were new."""
        if not updates:
            return 0
        with self._writing() as session:
            return self._log_facts(session, updates, received_at)

    def _log_events(self, session: Session, events: list[ActivityEvent], received_at: datetime | list[datetime]
                    ) -> int:
        times = received_at if isinstance(received_at, list) else [received_at] * len(events)
        rows = sorted(({
            "lead_id": e.lead_id, "event_id": e.event_id, "type": e.type, "occurred_at": e.occurred_at,
            "received_at": at, "channel": e.channel, "campaign": e.campaign, "source": e.source,
            "attributes": dict(e.attributes), "digest": event_digest(e),
        } for e, at in zip(events, times, strict=True)), key=lambda row: (row["lead_id"], row["event_id"]))
        new = set(session.connection().execute(_new_only(self._insert, _EVENTS, ("lead_id", "event_id")), rows).all())
        # Only new rows touch: a logged event merged its touch when it was logged.
        rows = [row for row in rows if (row["lead_id"], row["event_id"]) in new]
        if rows:
            self._touch(session, rows)
            report_store.resolve_touches(session.connection(), sorted({
                row["lead_id"] for row in rows if row["channel"] or row["campaign"]}))
        return len(new)

    def _log_facts(self, session: Session, updates: list[ProfileUpdate], received_at: datetime | list[datetime]
                   ) -> int:
        times = received_at if isinstance(received_at, list) else [received_at] * len(updates)
        rows = sorted(({
            "lead_id": u.lead_id, "update_id": u.update_id, "observed_at": u.observed_at, "received_at": at,
            "actor": u.actor.name, "role": u.actor.role.value, "facts": dict(u.facts),
        } for u, at in zip(updates, times, strict=True)), key=lambda row: (row["lead_id"], row["update_id"]))
        return len(session.connection().execute(_new_only(self._insert, _FACTS, ("update_id",)), rows).all())

    def replay_log(self, lead_id: str | None = None, since: datetime | None = None,
                   until: datetime | None = None, leads: tuple[str, str] | None = None) -> Iterator[Any]:
        """The logged events and profile updates, per lead, each lead's in the order they
        happened (events by occurred_at, updates by observed_at or else received_at; an
        update before an event of the same instant), streamed as named tuples of the
        columns of `event_log` (they have `event_id`) or `fact_log` (`update_id`): a
        backtest or an export reads millions. `leads`: lead ids from the first to the
        second, both included."""
        queries = []
        for table, at in ((_EVENTS, _EVENTS.c.occurred_at),
                          (_FACTS, func.coalesce(_FACTS.c.observed_at, _FACTS.c.received_at))):
            stmt = select(table)
            if lead_id is not None:
                stmt = stmt.where(table.c.lead_id == lead_id)
            if leads is not None:
                stmt = stmt.where(table.c.lead_id.between(*leads))
            if since is not None:
                stmt = stmt.where(at >= since)
            if until is not None:
                stmt = stmt.where(at < until)
            queries.append(stmt)
        with self.engine.connect() as conn:
            events = map(_EVENT_TUPLE, conn.execution_options(yield_per=5000).execute(
                queries[0].order_by(_EVENTS.c.lead_id, _EVENTS.c.occurred_at, _EVENTS.c.event_id)))
            with self.engine.connect() as conn2:
                facts = map(_FACT_TUPLE, conn2.execution_options(yield_per=5000).execute(
                    queries[1].order_by(_FACTS.c.lead_id, func.coalesce(_FACTS.c.observed_at, _FACTS.c.received_at),
                                        _FACTS.c.update_id)))
                # Each stream keyed by its own time column (asking each row which table it is
                # of would cost more than the merge).
                yield from (row for _, _, row in heapq.merge(
                    ((r.lead_id, r.observed_at or r.received_at, r) for r in facts),
                    ((r.lead_id, r.occurred_at, r) for r in events), key=lambda t: (t[0], t[1])))

    def _touch(self, session: Session, events: list[dict]) -> None:
        """Merge these events into their leads' first touches, in the database (one upsert,
        atomic per row: concurrent writers on PostgreSQL cannot lose an earlier touch)."""
        firsts: dict[str, dict[str, Any]] = {}
        for e in events:
            first = firsts.setdefault(e["lead_id"], {"lead_id": e["lead_id"], "channel": None, "channel_at": None,
                                                     "channel_event": None, "campaign": None, "campaign_at": None,
                                                     "campaign_event": None})
            for what in ("channel", "campaign"):
                if e[what] and (first[what] is None or (e["occurred_at"], e["event_id"]) <
                                (first[f"{what}_at"], first[f"{what}_event"])):
                    first.update({what: e[what], f"{what}_at": e["occurred_at"], f"{what}_event": e["event_id"]})
        rows = [row for row in firsts.values() if row["channel"] or row["campaign"]]
        if rows:
            session.exec(_touch_upsert(self._insert), params=sorted(rows, key=lambda row: row["lead_id"]))

    def fill_lead_touches(self) -> None:
        """Derive `lead_touch` from the event log when it is empty and the log is not: a
        store from before the table existed (on start), or events loaded in bulk."""
        with Session(self.engine) as session:
            if session.exec(select(_TOUCHES.c.lead_id).limit(1)).first() is not None:
                return
            if session.exec(select(_EVENTS.c.lead_id).limit(1)).first() is None:
                return
        columns = (_EVENTS.c.lead_id, _EVENTS.c.event_id, _EVENTS.c.occurred_at, _EVENTS.c.channel,
                   _EVENTS.c.campaign)
        with self.engine.connect() as conn:
            result = conn.execution_options(yield_per=10_000).execute(
                select(*columns).where(or_(_EVENTS.c.channel.is_not(None), _EVENTS.c.campaign.is_not(None))))
            for chunk in result.partitions():
                with self._writing() as session:
                    self._touch(session, [dict(row._mapping) for row in chunk])

    def event_log(self, lead_id: str | None = None, limit: int = 1000) -> list[EventLogRow]:
        """Logged events in (lead, time, id) order, as rows (replay and export stream
        `replay_log`, which has the profile updates too)."""
        stmt = select(EventLogRow)
        if lead_id is not None:
            stmt = stmt.where(EventLogRow.lead_id == lead_id)
        stmt = stmt.order_by(EventLogRow.lead_id, EventLogRow.occurred_at, EventLogRow.event_id).limit(limit)
        with Session(self.engine) as session:
            return list(session.exec(stmt))

    def outbox_of(self, lead_id: str) -> list[Outbound]:
        """Every message of a lead, acknowledged or not, oldest first (export of personal data)."""
        stmt = select(OutboxRow).where(OutboxRow.lead_id == lead_id).order_by(OutboxRow.created_at,
                                                                               OutboxRow.message_id)
        with Session(self.engine) as session:
            return [_outbound(row) for row in session.exec(stmt)]

    # ----------------------------------------------------------------- personal data

    def erase_personal_data(self, report: ErasureReport, through_seq: int | None = None) -> ErasureReport:
        """Scrub the lead's personal data from the store (funnel.personal_data says what that is):
        audit details up to `through_seq` (all: None) and every outbox payload; record the
        erasure. Idempotent by `report.erasure_id`: a retry returns what the first one did."""
        with self._writing() as session:
            done = session.get(ErasureRow, report.erasure_id)
            if done is not None:
                return _erasure_report(done)
            stmt = select(AuditRow).where(AuditRow.lead_id == report.lead_id)
            if through_seq is not None:
                stmt = stmt.where(AuditRow.seq <= through_seq)
            audit = 0
            for row in session.exec(stmt).all():
                entry = _audit_entry(row)
                scrubbed = scrub_entry(entry, ERASED)
                if scrubbed.detail != entry.detail:
                    row.detail = scrubbed.detail
                    session.add(row)
                    audit += 1
            outbox = 0
            for row in session.exec(select(OutboxRow).where(OutboxRow.lead_id == report.lead_id)).all():
                payload = scrub_payload(row.payload, ERASED)
                if payload != row.payload:
                    row.payload = payload
                    session.add(row)
                    outbox += 1
            for row in session.exec(select(webhook_store.DeliveryRow).where(
                    webhook_store.DeliveryRow.lead_id == report.lead_id)).all():
                body = webhook_store.scrubbed(row.body, lambda payload: scrub_payload(payload, ERASED))
                if body != row.body:
                    row.body = body
                    session.add(row)
            # The event log keeps what a backtest replays (types, times, channels) and the
            # digests that recognise a redelivery; the attributes are the person's.
            session.exec(update(_EVENTS).where(_EVENTS.c.lead_id == report.lead_id).values(attributes={}))
            # Logged profile facts keep their names, not the person's values (an erased
            # lead's fit no longer replays).
            for row in session.exec(select(FactLogRow).where(FactLogRow.lead_id == report.lead_id)).all():
                row.facts = {name: ERASED for name in row.facts}
                session.add(row)
            report = report.model_copy(update={"audit_entries": audit, "outbox_messages": outbox})
            session.add(ErasureRow(
                erasure_id=report.erasure_id, lead_id=report.lead_id, erased_by=report.erased_by,
                erased_at=report.erased_at, through_seq=through_seq, profile_facts=report.profile_facts,
                events=report.events, audit_entries=audit, outbox_messages=outbox,
                key_generation=report.key_generation, keys_destroyed_at=report.keys_destroyed_at,
            ))
        return report

    def keys_destroyed(self, lead_id: str, below: int | None, at: datetime) -> None:
        """Record that the lead's key generations below `below` (all: None) are destroyed."""
        stmt = update(_ERASURES).where(_ERASURES.c.lead_id == lead_id, _ERASURES.c.keys_destroyed_at.is_(None))
        if below is not None:
            stmt = stmt.where(_ERASURES.c.key_generation <= below)
        with self._writing() as session:
            session.exec(stmt.values(keys_destroyed_at=at))

    def erasures(self, lead_id: str) -> list[ErasureReport]:
        stmt = select(ErasureRow).where(ErasureRow.lead_id == lead_id).order_by(ErasureRow.erased_at)
        with Session(self.engine) as session:
            return [_erasure_report(row) for row in session.exec(stmt)]

    def erased_at(self, lead_id: str) -> datetime | None:
        stmt = select(func.max(ErasureRow.erased_at)).where(ErasureRow.lead_id == lead_id)
        with Session(self.engine) as session:
            return session.exec(stmt).one()

    # ----------------------------------------------------------------- lead keys (payload_codec.LeadKeys)

    # A new lead's key is read (none yet) and written before its first payload is sent: on the
    # connection with statements built once, ~0.85 -> ~0.3 ms of CPU per new lead (the ORM
    # session's path was most of it; bench/ingest.py's 500 new leads x 4 events paid it 500 times).

    def lead_keys(self, lead_id: str) -> list:
        with self.engine.connect() as conn:
            return [_lead_key(row) for row in conn.execute(_KEYS_OF_LEAD, {"lead_id": lead_id})]

    def lead_key(self, lead_id: str, generation: int):
        with self.engine.connect() as conn:
            row = conn.execute(_LEAD_KEY, {"lead_id": lead_id, "generation": generation}).first()
            return _lead_key(row) if row is not None else None

    def add_lead_key(self, record) -> bool:
        """False if that generation exists already (another process made it first)."""
        values = {"lead_id": record.lead_id, "generation": record.generation, "kek_id": record.kek_id,
                  "wrapped": record.wrapped, "erasure_id": record.erasure_id, "created_at": utcnow(),
                  "destroyed_at": None}
        with self._write_lock, self.engine.begin() as conn:
            added = conn.execute(_add_key(self._insert), values, execution_options=_ROWCOUNT).rowcount == 1
            if added and record.generation > 1:  # a rotation: the lead's current key changed
                self._log_lead_key_change(conn, record.lead_id)
            return added

    def destroy_lead_keys(self, lead_id: str, below: int | None = None) -> int:
        """Forget the key material of the lead's generations below `below` (all: None)."""
        stmt = update(_LEAD_KEYS).where(_LEAD_KEYS.c.lead_id == lead_id, _LEAD_KEYS.c.wrapped.is_not(None))
        if below is not None:
            stmt = stmt.where(_LEAD_KEYS.c.generation < below)
        with self._write_lock, self.engine.begin() as conn:
            destroyed = conn.execute(stmt.values(wrapped=None, destroyed_at=utcnow()),
                                     execution_options=_ROWCOUNT).rowcount
            if destroyed:
                self._log_lead_key_change(conn, lead_id)
            return destroyed

    @staticmethod
    def _log_lead_key_change(conn: Connection, lead_id: str) -> None:
        """A change's number is drawn under a lock held to commit (PostgreSQL: an advisory
        lock, which needs no privilege beyond the insert; SQLite has one writer), so numbers
        commit in order: a reader that has seen number n has seen all below."""
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LEAD_KEY_CHANGE_LOCK})
        conn.execute(insert(_LEAD_KEY_CHANGES).values(lead_id=lead_id, changed_at=utcnow()))

    def lead_key_changes(self, after: int | None) -> tuple[int, list[str]]:
        """(the last change's number, the leads whose keys changed after number `after`).
        `after=None`: just the last number, to start from."""
        with Session(self.engine) as session:
            if after is None:
                return session.exec(select(func.max(LeadKeyChangeRow.id))).one() or 0, []
            rows = session.exec(select(LeadKeyChangeRow.id, LeadKeyChangeRow.lead_id)
                                .where(LeadKeyChangeRow.id > after).order_by(LeadKeyChangeRow.id)).all()
        return (rows[-1][0] if rows else after), [lead_id for _, lead_id in rows]

    def lead_keys_not_wrapped_by(self, kek_id: str) -> list:
        stmt = select(LeadKeyRow).where(LeadKeyRow.kek_id != kek_id, LeadKeyRow.wrapped.is_not(None))
        with Session(self.engine) as session:
            return [_lead_key(row) for row in session.exec(stmt)]

    def rewrap_lead_key(self, record, kek_id: str, wrapped: bytes) -> int:
        stmt = (update(_LEAD_KEYS)
                .where(_LEAD_KEYS.c.lead_id == record.lead_id, _LEAD_KEYS.c.generation == record.generation,
                       _LEAD_KEYS.c.kek_id == record.kek_id, _LEAD_KEYS.c.wrapped.is_not(None))
                .values(kek_id=kek_id, wrapped=wrapped))
        with self._writing() as session:
            return session.exec(stmt, execution_options=_ROWCOUNT).rowcount

    # ----------------------------------------------------------------- scoring models

    def record_model(self, ref: str, text: str, applied_by: str, activate: bool = True) -> ModelVersion:
        """Record a model version (and make it the active one). The same ref with the same
        text again only re-activates it; with other text it is a ModelConflict."""
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        with self._writing() as session:
            row = session.get(ScoringModelRow, ref)
            if row is not None and row.sha256 != digest:
                raise ModelConflict(
                    f"scoring model {ref} is already recorded with other content (sha256 {row.sha256[:12]}…): "
                    "give the changed model a new version"
                )
            if row is None:
                row = ScoringModelRow(ref=ref, text=text, sha256=digest, applied_by=applied_by, applied_at=utcnow())
                session.add(row)
            if activate:
                if not row.active:
                    now = utcnow()
                    webhook_store.fan_out(session.connection(), self._insert, now, [(
                        SubscriptionKind.MODEL_CHANGE, f"model.{ref}.{now.strftime('%Y%m%dT%H%M%S%fZ')}", None,
                        webhook_store.envelope(SubscriptionKind.MODEL_CHANGE, now, {
                            "model_ref": ref, "sha256": digest, "applied_by": applied_by}))])
                session.exec(update(_MODELS).where(_MODELS.c.ref != ref).values(active=False))
                row.active = True
            session.flush()
            return _model_version(row)

    def active_model(self) -> ModelVersion | None:
        with Session(self.engine) as session:
            row = session.exec(select(ScoringModelRow).where(ScoringModelRow.active == True)).first()  # noqa: E712
            return _model_version(row) if row else None

    def model_version(self, ref: str) -> ModelVersion | None:
        with Session(self.engine) as session:
            row = session.get(ScoringModelRow, ref)
            return _model_version(row) if row else None

    def model_versions(self) -> list[ModelVersion]:
        with Session(self.engine) as session:
            rows = session.exec(select(ScoringModelRow).order_by(ScoringModelRow.applied_at))
            return [_model_version(row) for row in rows]

    # ----------------------------------------------------------------- owners

    def owner_of(self, assignment_id: str) -> str | None:
        stmt = select(OwnerAssignmentRow.owner).where(OwnerAssignmentRow.assignment_id == assignment_id)
        with Session(self.engine) as session:
            return session.exec(stmt).first()

    def assign_owner(self, assignment_id: str, team: list[str], team_name: str = "presales") -> str:
        """The next owner of `team` in turn, or the owner already given to `assignment_id`.

        The counter is incremented by an UPDATE first, so concurrent callers
        (threads, or other processes and hosts on PostgreSQL) queue on that row
        and each gets a distinct turn. If another caller recorded this
        assignment id meanwhile, our transaction rolls back (giving the turn
        back) and we return theirs.
        """
        if not team:
            raise ValueError(f"team {team_name!r} has no members to assign {assignment_id!r} to")
        existing = self.owner_of(assignment_id)
        if existing is not None:
            return existing
        try:
            with self._writing() as session:
                session.exec(self._insert(_ROUND_ROBIN).values(team_name=team_name, counter=0).on_conflict_do_nothing())
                session.exec(
                    update(_ROUND_ROBIN)
                    .where(_ROUND_ROBIN.c.team_name == team_name)
                    .values(counter=_ROUND_ROBIN.c.counter + 1)
                )
                counter = session.exec(select(RoundRobinRow.counter).where(RoundRobinRow.team_name == team_name)).one()
                owner = team[(counter - 1) % len(team)]
                recorded = session.exec(
                    self._insert(_OWNERS)
                    .values(assignment_id=assignment_id, owner=owner, team_name=team_name, assigned_at=utcnow())
                    .on_conflict_do_nothing(),
                    execution_options=_ROWCOUNT,
                ).rowcount
                if recorded != 1:
                    raise _AlreadyAssigned  # roll back: the turn goes back to the queue
            return owner
        except _AlreadyAssigned:
            existing = self.owner_of(assignment_id)
            if existing is None:  # pragma: no cover - the row that blocked us cannot vanish
                raise RuntimeError(f"assignment {assignment_id!r} conflicted but is not stored") from None
            return existing


class _AlreadyAssigned(Exception):
    """Another caller recorded the same assignment id while we took a turn."""


def _sqlite_engine(url: str) -> Engine:
    """A SQLite engine for many threads: WAL so readers never block the writer."""
    parsed = make_url(url)
    database = parsed.database or ""
    memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if not memory and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
    if memory:
        kwargs["poolclass"] = StaticPool  # one shared connection, or each thread sees its own empty db
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


# --------------------------------------------------------------------------- write statements
# Built once per dialect, like report_store's (building one per write cost about as much as
# running it); run on the connection: the ORM session's path added ~12% to an audit write,
# for statements that load no ORM objects.


_KEYS_OF_LEAD = select(_LEAD_KEYS).where(_LEAD_KEYS.c.lead_id == bindparam("lead_id")).order_by(_LEAD_KEYS.c.generation)
_LEAD_KEY = select(_LEAD_KEYS).where(_LEAD_KEYS.c.lead_id == bindparam("lead_id"),
                                     _LEAD_KEYS.c.generation == bindparam("generation"))


@functools.cache
def _add_key(insert):
    """INSERT a lead key generation ... ON CONFLICT DO NOTHING (rowcount 0: it exists)."""
    return insert(_LEAD_KEYS).on_conflict_do_nothing()


@functools.cache
def _new_only(insert, table, returned: tuple[str, ...]):
    """INSERT ... ON CONFLICT DO NOTHING RETURNING `returned` of the rows it inserted."""
    return insert(table).on_conflict_do_nothing().returning(*(table.c[name] for name in returned))


@functools.cache
def _touch_upsert(insert_of):
    """The upsert `AuditStore._touch` runs (its CASE expressions and their cache key were
    half the CPU of an audit write when built per write)."""
    upsert = insert_of(_TOUCHES)
    new, old = upsert.excluded, _TOUCHES.c

    def earlier(what: str):
        at, event = f"{what}_at", f"{what}_event"
        return and_(new[what].is_not(None), or_(old[what].is_(None), new[at] < old[at],
                                                 and_(new[at] == old[at], new[event] < old[event])))

    changes = {column: case((earlier(what), new[column]), else_=old[column])
               for what in ("channel", "campaign") for column in (what, f"{what}_at", f"{what}_event")}
    return upsert.on_conflict_do_update(index_elements=["lead_id"], set_=changes)
