"""Managers' routes for scoring model versions: apply (or preview), list, read."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

import client as leads
from activities.store import AuditStore, ModelConflict
from funnel.scoring_model import ModelError, parse_model

from api.limits import ANSWER_TIMEOUT
from api.keys import allow, Principal
from api.schemas import ERRORS, ModelApplied, ModelDetail, ModelIn, ModelVersionOut, Problem, problem_response
from api.backends import backends_of, temporal_call, Unavailable


models = APIRouter(prefix="/models", tags=["scoring model versions"], responses=ERRORS)


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
    backends = backends_of(request)
    temporal = await backends.temporal()
    store = await run_in_threadpool(backends.store)
    if body.dry_run:
        preview = await temporal_call(leads.preview_model(temporal, store, backends.settings, model),
                                       ANSWER_TIMEOUT * 4, "query")
        return JSONResponse(preview.model_dump(mode="json"), status_code=200)
    try:
        version, rollout = await temporal_call(
            leads.apply_model(temporal, backends.settings, store, body.toml, "toml", by=caller.actor,
                              rate_per_second=body.rate_per_second), ANSWER_TIMEOUT, "model rollout")
    except ModelConflict as err:
        return problem_response(409, str(err))
    request.app.state.scoring_model.forget()  # new leads start on the applied version at once
    return ModelApplied(**version.model_dump(exclude={"text"}), rollout=rollout)


@models.get("", response_model=list[ModelVersionOut], summary="Every scoring model version ever applied",
            description="Oldest first; one is active. Roles: manager.")
async def list_models(request: Request, caller: Annotated[Principal, Depends(allow())]) -> list[ModelVersionOut]:
    versions = await backends_of(request).in_store(AuditStore.model_versions)
    return [ModelVersionOut(**v.model_dump(exclude={"text"})) for v in versions]


@models.get("/{ref}", response_model=ModelDetail, summary="One version, its text and its rollout",
            description="Roles: manager.", responses={404: {"model": Problem, "description": "no such version"}})
async def get_model(ref: Annotated[str, PathParam(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}@[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")],
                    request: Request, caller: Annotated[Principal, Depends(allow())]) -> ModelDetail:
    backends = backends_of(request)
    version = await backends.in_store(AuditStore.model_version, ref)
    if version is None:
        return problem_response(404, f"no scoring model {ref}")
    rollout = None
    try:
        rollout = await leads.rollout_progress(await backends.temporal(), backends.settings, ref)
    except Unavailable:
        pass
    return ModelDetail(**version.model_dump(), rollout=rollout)

