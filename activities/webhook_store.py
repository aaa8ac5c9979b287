"""Webhook subscriptions and their deliveries, kept in the audit store.

A subscription names a URL, the kinds of message it wants and its own signing secret. When
the store records something a subscription wants (a stage change or an SLA breach in the
audit, a handover or another outbound message in the outbox, a model activation), it adds
one delivery per subscription in the same transaction: nothing recorded is ever missed by
a subscriber, and nothing is delivered that was not recorded. The worker's dispatcher
(activities/webhook_dispatcher.py) posts them, retries with backoff, and gives up into the
dead letter after the last attempt; a manager replays dead letters.

Functions take the AuditStore (or, inside its transactions, a connection), so the API and
CLI call them as they call the store's own methods.
"""

from __future__ import annotations

import base64
import secrets
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, Column, Index, and_, exists, or_, select, update
from sqlalchemy.engine import Connection
from sqlmodel import Field, Session, SQLModel

from activities.db_types import UtcDateTime
from activities.paging import after_key

if TYPE_CHECKING:
    from activities.store import AuditStore


class SubscriptionKind(StrEnum):
    HANDOVER = "handover"  # MQL to presales (outbox)
    STAGE_CHANGE = "stage_change"  # every stage change (audit): what became of the leads
    SLA_BREACH = "sla_breach"  # a follow-up SLA was missed (audit)
    NURTURE_STEP = "nurture_step"  # (outbox)
    OPPORTUNITY = "opportunity"  # SQL: create the CRM opportunity (outbox)
    ESCALATION = "escalation"  # an SLA breach escalated to the team lead (outbox)
    REVIEW = "review"  # a hand-raiser kept from presales by a fit rule (outbox)
    MODEL_CHANGE = "model_change"  # another scoring model became active
    ACCOUNT_HANDOVER = "account_handover"  # an account became marketing-qualified (outbox)


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"  # the last attempt failed: waits for a replay


def _utc(**kwargs: Any) -> Column:
    return Column(UtcDateTime(), **kwargs)


class SubscriptionRow(SQLModel, table=True):
    __tablename__ = "subscription"

    subscription_id: str = Field(primary_key=True)
    url: str
    kinds: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    secret: str  # whsec_...: signs this subscription's deliveries (Standard Webhooks)
    description: str | None = None
    created_by: str
    created_at: datetime = Field(sa_column=_utc(nullable=False))
    active: bool = True


class DeliveryRow(SQLModel, table=True):
    """One message for one subscription. `delivery_id` is the `webhook-id` the receiver
    sees: the same on every attempt and replay, so a receiver drops what it already has."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (Index("ix_webhook_delivery_due", "status", "next_attempt_at"),
                      Index("ix_webhook_delivery_subscription", "subscription_id", "created_at", "delivery_id"))

    delivery_id: str = Field(primary_key=True)
    subscription_id: str
    kind: str
    lead_id: str | None = Field(default=None, index=True)
    body: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = DeliveryStatus.PENDING.value
    attempts: int = 0
    next_attempt_at: datetime = Field(sa_column=_utc(nullable=False))
    lease_until: datetime | None = Field(default=None, sa_column=_utc(nullable=True))
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: datetime = Field(sa_column=_utc(nullable=False))
    ordinal: int = 0  # place among the messages recorded together: (created_at, ordinal) is the order
    delivered_at: datetime | None = Field(default=None, sa_column=_utc(nullable=True))
    replays: int = 0


SUBSCRIPTIONS = SubscriptionRow.__table__
DELIVERIES = DeliveryRow.__table__
TABLES = [SUBSCRIPTIONS, DELIVERIES]


# --------------------------------------------------------------------------- fan-out (inside the store's writes)

def fan_out(conn: Connection, insert, now: datetime, messages: list[tuple[SubscriptionKind, str, str | None, dict]]
            ) -> int:
    """Add a delivery per active subscription that wants each (kind, source key, lead, body);
    a source key already fanned out (a retried write) adds nothing. Returns how many."""
    if not messages:
        return 0
    subs = conn.execute(select(SUBSCRIPTIONS.c.subscription_id, SUBSCRIPTIONS.c.kinds)
                        .where(SUBSCRIPTIONS.c.active.is_(True))).all()
    rows = [{"delivery_id": f"{sub_id}.{key}", "subscription_id": sub_id, "kind": kind.value, "lead_id": lead_id,
             "body": body, "status": DeliveryStatus.PENDING.value, "attempts": 0, "next_attempt_at": now,
             "created_at": now, "ordinal": ordinal, "replays": 0}
            for ordinal, (kind, key, lead_id, body) in enumerate(messages)
            for sub_id, kinds in subs if kind.value in kinds]
    if rows:
        conn.execute(insert(DELIVERIES).on_conflict_do_nothing(), rows)
    return len(rows)


def envelope(kind: SubscriptionKind, at: datetime, data: dict) -> dict:
    """The body: Standard Webhooks' recommended shape (type, timestamp, data)."""
    return {"type": f"leadflow.{kind.value}", "timestamp": at.isoformat(), "data": data}


def scrubbed(body: dict, scrub) -> dict:
    """A delivery's body with its outbound message's payload scrubbed (erasure)."""
    data = body.get("data")
    if isinstance(data, dict) and isinstance(data.get("payload"), dict):
        return {**body, "data": {**data, "payload": scrub(data["payload"])}}
    return body


def stage_change_data(entry: dict) -> dict:
    """What a subscriber learns of a stage change: no personal data (the free-text detail
    stays in the audit)."""
    return {name: entry.get(name) for name in ("lead_id", "seq", "from_stage", "to_stage", "trigger", "reason",
                                               "actor", "role", "owner", "model_ref")} | {
        "occurred_at": (entry.get("occurred_at") or entry["at"]).isoformat(), "recorded_at": entry["at"].isoformat()}


def sla_breach_data(entry: dict) -> dict:
    return {name: entry.get(name) for name in ("lead_id", "seq", "rule", "owner", "detail")} | {
        "due_at": (entry.get("occurred_at") or entry["at"]).isoformat(), "recorded_at": entry["at"].isoformat()}


# --------------------------------------------------------------------------- subscriptions

def add_subscription(store: "AuditStore", url: str, kinds: list[SubscriptionKind], created_by: str,
                     secret: str | None = None, description: str | None = None) -> SubscriptionRow:
    row = SubscriptionRow(subscription_id=f"sub_{secrets.token_hex(8)}", url=url,
                          kinds=sorted({SubscriptionKind(k).value for k in kinds}),
                          secret=secret or "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
                          description=description, created_by=created_by, created_at=_now(), active=True)
    with store._writing() as session:
        session.add(row)
        session.flush()
        session.expunge_all()
    return row


def subscriptions(store: "AuditStore", include_removed: bool = False) -> list[SubscriptionRow]:
    with Session(store.engine) as session:
        stmt = select(SubscriptionRow)
        if not include_removed:
            stmt = stmt.where(SubscriptionRow.active.is_(True))
        return list(session.exec(stmt.order_by(SubscriptionRow.created_at)).scalars().all())


def subscription(store: "AuditStore", subscription_id: str) -> SubscriptionRow | None:
    with Session(store.engine) as session:
        return session.get(SubscriptionRow, subscription_id)


def remove_subscription(store: "AuditStore", subscription_id: str) -> bool:
    """Deactivate (kept for its delivery log); its pending deliveries are not attempted."""
    with store._writing() as session:
        done = session.exec(update(SUBSCRIPTIONS).where(SUBSCRIPTIONS.c.subscription_id == subscription_id)
                            .values(active=False))
        return done.rowcount > 0


# --------------------------------------------------------------------------- the delivery log

def deliveries(store: "AuditStore", subscription_id: str, status: DeliveryStatus | None = None, limit: int = 100,
               after: tuple[datetime, str] | None = None, since: datetime | None = None) -> list[DeliveryRow]:
    """Oldest first (made at or after `since`), keyset-paged by (created_at, delivery_id) after `after`."""
    with Session(store.engine) as session:
        stmt = select(DeliveryRow).where(DeliveryRow.subscription_id == subscription_id)
        if since is not None:
            stmt = stmt.where(DeliveryRow.created_at >= since)
        if status is not None:
            stmt = stmt.where(DeliveryRow.status == DeliveryStatus(status).value)
        stmt = after_key(stmt, DeliveryRow.created_at, DeliveryRow.delivery_id, after).limit(limit)
        return list(session.exec(stmt).scalars().all())


def replay(store: "AuditStore", subscription_id: str, delivery_ids: list[str] | None = None) -> int:
    """Dead letters (all of the subscription's, or those named) go out again, with a fresh
    count of attempts; returns how many."""
    with store._writing() as session:
        stmt = update(DELIVERIES).where(DELIVERIES.c.subscription_id == subscription_id,
                                        DELIVERIES.c.status == DeliveryStatus.DEAD.value)
        if delivery_ids is not None:
            stmt = stmt.where(DELIVERIES.c.delivery_id.in_(delivery_ids))
        done = session.exec(stmt.values(status=DeliveryStatus.PENDING.value, attempts=0, next_attempt_at=_now(),
                                        lease_until=None, replays=DELIVERIES.c.replays + 1))
        return done.rowcount


# --------------------------------------------------------------------------- the dispatcher's side

def in_order_of(delivery: DeliveryRow) -> tuple[str, str]:
    """What a delivery keeps its order within: its subscription and lead (a delivery of no
    lead, e.g. a model change, is on its own)."""
    return delivery.subscription_id, delivery.lead_id or delivery.delivery_id


def claim_due(store: "AuditStore", now: datetime, lease: timedelta, limit: int = 50, per_lead: int = 5
              ) -> list[tuple[DeliveryRow, SubscriptionRow]]:
    """Deliveries due now for active subscriptions, oldest first, leased to this dispatcher
    (another process sharing the store skips them until the lease ends).

    A lead's deliveries to one subscription go out in the order they were recorded: one
    waits while an earlier one is pending and not claimable now (waiting for its retry, or
    leased elsewhere). A dead letter no longer holds the later ones back. At most
    `per_lead` of a lead are claimed in a round, so a round's posts fit in the lease."""
    earlier = DELIVERIES.alias("earlier")
    held_back = exists().where(
        earlier.c.subscription_id == DeliveryRow.subscription_id, earlier.c.lead_id == DeliveryRow.lead_id,
        earlier.c.status == DeliveryStatus.PENDING.value,
        or_(earlier.c.created_at < DeliveryRow.created_at,
            and_(earlier.c.created_at == DeliveryRow.created_at, earlier.c.ordinal < DeliveryRow.ordinal)),
        or_(earlier.c.next_attempt_at > now, earlier.c.lease_until >= now))
    with Session(store.engine) as session:  # a read first: most rounds find nothing, and take no write lock
        due = session.exec(
            select(DeliveryRow, SubscriptionRow)
            .join(SubscriptionRow, SubscriptionRow.subscription_id == DeliveryRow.subscription_id)
            .where(DeliveryRow.status == DeliveryStatus.PENDING.value, DeliveryRow.next_attempt_at <= now,
                   or_(DeliveryRow.lease_until.is_(None), DeliveryRow.lease_until < now),
                   SubscriptionRow.active.is_(True), ~held_back)
            .order_by(DeliveryRow.created_at, DeliveryRow.ordinal, DeliveryRow.delivery_id).limit(limit)).all()
        session.expunge_all()
    if not due:
        return []
    claimed = []
    skipped: set[tuple[str, str]] = set()  # (subscription, lead) whose next one was not ours to take
    taken_per_lead: dict[tuple[str, str], int] = {}
    with store._writing() as session:
        for delivery, sub in due:
            order = in_order_of(delivery)
            if order in skipped or taken_per_lead.get(order, 0) >= per_lead:
                skipped.add(order)
                continue
            taken = session.exec(update(DELIVERIES).where(
                DELIVERIES.c.delivery_id == delivery.delivery_id, DELIVERIES.c.status == DeliveryStatus.PENDING.value,
                or_(DELIVERIES.c.lease_until.is_(None), DELIVERIES.c.lease_until < now),
            ).values(lease_until=now + lease))
            if taken.rowcount:
                claimed.append((delivery, sub))
                taken_per_lead[order] = taken_per_lead.get(order, 0) + 1
            else:
                skipped.add(order)
    return claimed


def release(store: "AuditStore", delivery_ids: list[str]) -> None:
    """Give back claimed deliveries not attempted (an earlier one of their lead failed)."""
    if delivery_ids:
        with store._writing() as session:
            session.exec(update(DELIVERIES).where(DELIVERIES.c.delivery_id.in_(delivery_ids)).values(lease_until=None))


def record_attempt(store: "AuditStore", delivery_id: str, now: datetime, ok: bool, status_code: int | None,
                   error: str | None, retry_in: timedelta | None) -> None:
    """The outcome of one attempt: delivered, pending again in `retry_in`, or (None) dead."""
    values: dict[str, Any] = {"attempts": DELIVERIES.c.attempts + 1, "lease_until": None,
                              "last_status_code": status_code, "last_error": (error or "")[:500] or None}
    if ok:
        values |= {"status": DeliveryStatus.DELIVERED.value, "delivered_at": now}
    elif retry_in is None:
        values |= {"status": DeliveryStatus.DEAD.value}
    else:
        values |= {"next_attempt_at": now + retry_in}
    with store._writing() as session:
        session.exec(update(DELIVERIES).where(DELIVERIES.c.delivery_id == delivery_id).values(**values))


def _now() -> datetime:
    from activities.store import utcnow
    return utcnow()
