"""Managers' webhook subscriptions: who gets which messages, signed with whose secret, and
what became of each delivery (activities/webhook_store.py, webhook_dispatcher.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import AnyHttpUrl, BaseModel, Field

import client as leads
from funnel.models import AwareDatetime
from activities import webhook_store
from activities.webhook_store import DeliveryStatus, SubscriptionKind

from api.backends import backends_of
from api.keys import allow, Principal
from api.limits import MAX_PAGE
from api.schemas import after_outbox_cursor, invalid, ERRORS, outbox_cursor, Problem

subscriptions = APIRouter(prefix="/subscriptions", tags=["webhook subscriptions"], responses=ERRORS)

SubscriptionId = Annotated[str, Field(pattern=r"^sub_[0-9a-f]{16}$")]
_MANAGERS = "Roles: manager."
_NOT_FOUND = {404: {"model": Problem, "description": "no such subscription"}}


class SubscriptionIn(BaseModel):
    url: AnyHttpUrl
    kinds: list[SubscriptionKind] = Field(min_length=1, description="the messages it wants")
    secret: str | None = Field(default=None, pattern=r"^whsec_[A-Za-z0-9+/]{32,}={0,2}$",
                               description="signs its deliveries; made for it when not given")
    description: str | None = Field(default=None, max_length=200)


class SubscriptionOut(BaseModel):
    subscription_id: str
    url: str
    kinds: list[SubscriptionKind]
    description: str | None
    created_by: str
    created_at: datetime
    active: bool
    secret: str = Field(description="in full only in the answer that creates it; masked afterwards")


class DeliveryOut(BaseModel):
    delivery_id: str = Field(description="the webhook-id the receiver sees, the same on every attempt")
    kind: SubscriptionKind
    lead_id: str | None
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    replays: int


class DeliveryPage(BaseModel):
    deliveries: list[DeliveryOut]
    next_cursor: str | None = None


class ReplayIn(BaseModel):
    delivery_ids: list[Annotated[str, Field(max_length=300)]] | None = Field(
        default=None, max_length=MAX_PAGE, description="these dead letters; all of the subscription's when absent")


class ReplayResult(BaseModel):
    replayed: int


def _out(row, reveal: bool = False) -> SubscriptionOut:
    return SubscriptionOut(subscription_id=row.subscription_id, url=row.url, kinds=row.kinds,
                           description=row.description, created_by=row.created_by, created_at=row.created_at,
                           active=row.active, secret=row.secret if reveal else f"whsec_…{row.secret[-4:]}")


async def _existing(request: Request, subscription_id: str):
    row = await backends_of(request).in_store(webhook_store.subscription, subscription_id)
    if row is None:
        raise leads.LeadNotFound(f"no subscription {subscription_id}")
    return row


@subscriptions.post(
    "", status_code=201, response_model=SubscriptionOut, summary="Subscribe a URL to messages",
    description=(
        "Every message of the kinds named, recorded from now on, is posted to the URL as JSON "
        "(`{type, timestamp, data}`) and signed per Standard Webhooks (`webhook-id`, `webhook-timestamp`, "
        "`webhook-signature`: HMAC-SHA256 with the subscription's secret, which this answer shows once). "
        "Retried with backoff; after the last attempt a delivery is a dead letter until replayed. "
        "Kinds: " + ", ".join(k.value for k in SubscriptionKind) + ". " + _MANAGERS
    ),
)
async def add(body: SubscriptionIn, request: Request, caller: Annotated[Principal, Depends(allow())]
              ) -> SubscriptionOut:
    row = await backends_of(request).in_store(webhook_store.add_subscription, str(body.url), body.kinds,
                                              caller.name, body.secret, body.description)
    return _out(row, reveal=True)


@subscriptions.get("", response_model=list[SubscriptionOut], summary="The subscriptions", description=_MANAGERS)
async def list_all(request: Request, caller: Annotated[Principal, Depends(allow())],
                   removed: bool = Query(False, description="include removed ones")) -> list[SubscriptionOut]:
    return [_out(row) for row in await backends_of(request).in_store(webhook_store.subscriptions, removed)]


@subscriptions.get("/{subscription_id}", response_model=SubscriptionOut, summary="One subscription",
                   description=_MANAGERS, responses=_NOT_FOUND)
async def get_one(subscription_id: str, request: Request, caller: Annotated[Principal, Depends(allow())]
                  ) -> SubscriptionOut:
    return _out(await _existing(request, subscription_id))


@subscriptions.delete(
    "/{subscription_id}", status_code=204, summary="Remove a subscription",
    description="Nothing more is posted to it; its delivery log stays readable. " + _MANAGERS,
    responses=_NOT_FOUND,
)
async def remove(subscription_id: str, request: Request, caller: Annotated[Principal, Depends(allow())]) -> Response:
    await _existing(request, subscription_id)
    await backends_of(request).in_store(webhook_store.remove_subscription, subscription_id)
    return Response(status_code=204)


@subscriptions.get(
    "/{subscription_id}/deliveries", response_model=DeliveryPage, summary="The delivery log, oldest first",
    description="Status, attempts and last error of each delivery; `status=dead` is the dead letter. " + _MANAGERS,
    responses=_NOT_FOUND,
)
async def delivery_log(
    subscription_id: str, request: Request, caller: Annotated[Principal, Depends(allow())],
    status: DeliveryStatus | None = None, limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[str | None, Query(max_length=1000, pattern=r"^[A-Za-z0-9_=-]+$",
                                        description="the previous page's next_cursor")] = None,
    updated_since: Annotated[AwareDatetime | None, Query(description="only deliveries made at or after this")] = None,
) -> DeliveryPage:
    try:
        after = after_outbox_cursor(cursor) if cursor else None
    except ValueError as err:
        raise invalid(("query", "cursor"), str(err)) from None
    await _existing(request, subscription_id)
    rows = await backends_of(request).in_store(webhook_store.deliveries, subscription_id, status, limit, after,
                                               updated_since)
    page = [DeliveryOut(**{name: getattr(row, name) for name in DeliveryOut.model_fields}) for row in rows]
    for out in page:
        if out.status is not DeliveryStatus.PENDING:
            out.next_attempt_at = None
    last = rows[-1] if len(rows) == limit else None
    return DeliveryPage(deliveries=page, next_cursor=outbox_cursor((last.created_at, last.delivery_id))
                        if last else None)


@subscriptions.post(
    "/{subscription_id}/replay", response_model=ReplayResult, summary="Send dead letters again",
    description="The dead letters named (or all of the subscription's) go out again, same webhook-id, with a "
                "fresh count of attempts. " + _MANAGERS,
    responses=_NOT_FOUND,
)
async def replay(subscription_id: str, body: ReplayIn, request: Request,
                 caller: Annotated[Principal, Depends(allow())]) -> ReplayResult:
    await _existing(request, subscription_id)
    done = await backends_of(request).in_store(webhook_store.replay, subscription_id, body.delivery_ids)
    return ReplayResult(replayed=done)
