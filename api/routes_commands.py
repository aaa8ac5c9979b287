"""Presales' and sales' routes: decisions and contacts, each a workflow update
answered with the lead's new state."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from temporalio.service import RPCError

import client as leads
from funnel.lead import LeadView
from funnel.models import Accept, Close, LogContact, Qualify, Reject, Reopen, Role
from funnel.personal_data import mask_view

from api.keys import allow, Principal
from api.schemas import AcceptIn, CloseIn, ContactIn, LEAD_ERRORS, PathLeadId, QualifyIn, RejectIn, ReopenIn
from api.backends import backends_of, first_line, NoAnswer, reads_personal_data, Unavailable


commands = APIRouter(prefix="/leads/{lead_id}", tags=["commands"], responses=LEAD_ERRORS)

# --------------------------------------------------------------------------- commands


IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$",
    description="the command's idempotency key: sent again with the same key, it is applied at most once and "
                "answered with its outcome (default: a fresh key, returned in the Idempotency-Key header)")]


async def _command(request: Request, response: Response, lead_id: str, command, key: str | None) -> LeadView:
    backends = backends_of(request)
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
        raise Unavailable(f"Temporal error: {first_line(err)}") from None
    return view if reads_personal_data(request, command.by.role) else mask_view(view)


_COMMAND_NOTE = (
    " Executed as a workflow update: 200 with the lead's new state; 409 with the lead's reason if its stage "
    "(or the stage's rules for your role) does not allow it; 404 for an unknown lead; 410 for a won lead; "
    "504 if the lead did not answer in time (it may still apply: send it again with the same Idempotency-Key, "
    "which is applied at most once and answered with its outcome). "
    "The actor recorded is the API key's owner. Profile fact values are masked (\"***\") for roles not in "
    "LEADFLOW_PII_READERS."
)


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


