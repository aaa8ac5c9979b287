"""How the service behaves when it is behind: /readyz says how far behind its workers are
(and that none polls, when none does); ingestion answers 503 with Retry-After, taking
nothing, while the oldest waiting lead task is older than LEADFLOW_MAX_BACKLOG; and takes
input again once the workers have caught up."""

from __future__ import annotations

import asyncio
import uuid

from api import create_app
from tests.conftest import running_worker
from tests.test_api import KEYRING, Api, ev, now, serving


async def test_behind_workers_are_said_and_shed(dev_env, settings, store):
    settings = settings.model_copy(update={"max_backlog_seconds": 3.0})
    app = create_app(settings=settings, keys=KEYRING, temporal=dev_env.client, store=store)
    run = uuid.uuid4().hex[:6]
    async with serving(app) as base_url:
        api = Api(base_url)
        mautic, mia = api.as_("mautic"), api.as_("mia")
        try:
            ready = await mia.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["workers"] == {"ok": False,
                                               "detail": f"no worker polls task queue {settings.task_queue!r}"}
            for i in range(5):  # taken: nobody is behind yet
                r = await mautic.post("/events", json=ev(f"{run}-{i}", f"P-{run}-{i}", "website_visit", now()))
                assert r.status_code == 202, r.text
            refused = None
            for _ in range(60):  # the backlog ages past 3 s (Temporal's figures lag a few seconds)
                r = await mautic.post("/events", json=ev(f"{run}-x", f"P-{run}-x", "website_visit", now()))
                if r.status_code == 503:
                    refused = r
                    break
                await asyncio.sleep(0.5)
            assert refused is not None, "the edge never pushed back"
            assert refused.headers["Retry-After"] == "30"
            assert "Leadflow is behind" in refused.json()["detail"] and "workers polling: 0" in refused.json()["detail"]
            batch = await mautic.post("/events/batch", json={"events": [ev(f"{run}-y", f"P-{run}-y", "email_open", now())]})
            assert batch.status_code == 503
            behind = (await mia.get("/readyz")).json()["behind"]
            assert behind["backlog"] >= 5 and behind["oldest_seconds"] > 3

            async with running_worker(dev_env.client, settings, store):
                taken = None
                for _ in range(120):  # the workers catch up; input is taken again
                    r = await mautic.post("/events", json=ev(f"{run}-z", f"P-{run}-z", "website_visit", now()))
                    if r.status_code == 202:
                        taken = r
                        break
                    await asyncio.sleep(0.5)
                assert taken is not None, "input was never taken again"
                ready = await mia.get("/readyz")
                assert ready.status_code == 200 and ready.json()["workers"]["ok"]
            # nothing of the refused requests reached a lead
            assert (await mia.get(f"/leads/P-{run}-y")).status_code == 404
        finally:
            await api.close()
