"""Health: /healthz (the process) and /readyz (Temporal, the store, the backlog)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

import client as leads
from activities.store import AuditStore

from api.limits import PROBE_TIMEOUT
from api.schemas import Check, Readiness
from api.backends import backends_of, first_line


health = APIRouter(tags=["health"])



# --------------------------------------------------------------------------- health


@health.get("/healthz", summary="The process is up", response_model=dict[str, str])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get(
    "/readyz", summary="Temporal and the audit store are reachable", response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready: see which check failed"}},
)
async def readyz(request: Request):
    backends = backends_of(request)

    async def temporal() -> Check:
        try:
            client = await backends.temporal()
            ok = await asyncio.wait_for(client.service_client.check_health(), PROBE_TIMEOUT)
            return Check(ok=bool(ok), detail="reachable" if ok else "serving, but not healthy")
        except Exception as err:  # noqa: BLE001 - a probe reports whatever went wrong
            return Check(ok=False, detail=first_line(err))

    async def store() -> Check:
        try:
            await asyncio.wait_for(backends.in_store(AuditStore.ping), PROBE_TIMEOUT)
            return Check(ok=True, detail="reachable")
        except Exception as err:  # noqa: BLE001 - a probe reports whatever went wrong
            return Check(ok=False, detail=first_line(err))

    async def workers() -> tuple[Check, leads.QueueHealth | None]:
        try:
            health = await backends.queue_health(max_age=0)
        except Exception as err:  # noqa: BLE001 - a probe reports whatever went wrong
            return Check(ok=False, detail=first_line(err)), None
        if not health.workers:
            return Check(ok=False, detail=f"no worker polls task queue {health.task_queue!r}"), health
        return Check(ok=True, detail=f"{health.workers} polling task queue {health.task_queue!r}"), health

    t, s, (w, health) = await asyncio.gather(temporal(), store(), workers())
    body = Readiness(ready=t.ok and s.ok and w.ok, temporal=t, store=s, workers=w, behind=health)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503)


