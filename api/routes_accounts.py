"""Accounts (buying teams, funnel/accounts.py): read from their workflows."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path as PathParam, Query, Request
from fastapi import APIRouter
from pydantic import BaseModel, Field

import client as leads
from funnel.accounts import ACCOUNT_ID_PATTERN, AccountView
from funnel.models import Role

from api.backends import backends_of, temporal_call
from api.keys import allow, Principal
from api.limits import ANSWER_TIMEOUT
from api.schemas import ERRORS, invalid, Problem

accounts = APIRouter(prefix="/accounts", tags=["accounts (buying teams)"], responses=ERRORS)
_ALL = (Role.MARKETING, Role.PRESALES, Role.SALES)


class AccountPage(BaseModel):
    total: int = Field(description="accounts in all (Temporal visibility, within a second or so)")
    mqa: int = Field(description="of them marketing-qualified")
    count: int
    accounts: list[AccountView]
    next_cursor: str | None = None


@accounts.get(
    "/{account_id}", response_model=AccountView, summary="An account: score, buying-team coverage, contacts",
    description=(
        "An account is a company: its leads by `account_id` fact or company e-mail domain. Its score is its "
        "fit (the model's fit rules on account facts) plus its best contacts' engagement; it becomes an MQA "
        "when score and roles pass the model's `[account]` thresholds. No personal data. Roles: all."
    ),
    responses={404: {"model": Problem, "description": "no such account"},
               504: {"model": Problem, "description": "the account did not answer in time"}},
)
async def get_account(account_id: Annotated[str, PathParam(pattern=ACCOUNT_ID_PATTERN)], request: Request,
                      caller: Annotated[Principal, Depends(allow(*_ALL))]) -> AccountView:
    temporal = await backends_of(request).temporal()
    return await temporal_call(leads.get_account(temporal, account_id), ANSWER_TIMEOUT, "query")


@accounts.get("", response_model=AccountPage, summary="Accounts, newest first", description="Roles: all.",
              responses={504: {"model": Problem, "description": "an account did not answer in time"}})
async def list_accounts(
    request: Request, caller: Annotated[Principal, Depends(allow(*_ALL))],
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[str | None, Query(max_length=4000, pattern=r"^[A-Za-z0-9_=-]+$",
                                        description="the previous page's next_cursor")] = None,
) -> AccountPage:
    temporal = await backends_of(request).temporal()
    try:
        views, following = await temporal_call(leads.account_page(temporal, backends_of(request).settings.task_queue, cursor, limit), ANSWER_TIMEOUT * 2,
                                               "query")
    except ValueError as err:
        raise invalid(("query", "cursor"), str(err)) from None
    total, mqa = await temporal_call(leads.account_counts(temporal, backends_of(request).settings.task_queue), ANSWER_TIMEOUT, "query")
    return AccountPage(total=total, mqa=mqa, count=len(views), accounts=views, next_cursor=following)
