"""How the service behaves when it is behind: /readyz says how far behind its workers are
(and that none polls, when none does); ingestion answers 503 with Retry-After, taking
nothing, while the oldest waiting lead task is older than LEADFLOW_MAX_BACKLOG; and takes
input again once the workers have caught up."""

from __future__ import annotations

import asyncio
import uuid

from api import create_app
from tests.conftest import running_worker, until
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
            # the backlog ages past 3 s (Temporal's figures lag a few seconds); the edge pushes back
            refused = await until(lambda: mautic.post("/events", json=ev(f"{run}-x", f"P-{run}-x", "website_visit", now())),
                                  lambda r: r.status_code == 503, timeout=30, every=0.5)
            assert refused.headers["Retry-After"] == "30"
            assert "Leadflow is behind" in refused.json()["detail"] and "workers polling: 0" in refused.json()["detail"]
            batch = await mautic.post("/events/batch", json={"events": [ev(f"{run}-y", f"P-{run}-y", "email_open", now())]})
            assert batch.status_code == 503
            behind = (await mia.get("/readyz")).json()["behind"]
            assert behind["backlog"] >= 5 and behind["oldest_seconds"] > 3

            async with running_worker(dev_env.client, settings, store):
                # the workers catch up; input is taken again
                await until(lambda: mautic.post("/events", json=ev(f"{run}-z", f"P-{run}-z", "website_visit", now())),
                            lambda r: r.status_code == 202, timeout=60, every=0.5)
                ready = await mia.get("/readyz")
                assert ready.status_code == 200 and ready.json()["workers"]["ok"]
            # nothing of the refused requests reached a lead
            assert (await mia.get(f"/leads/P-{run}-y")).status_code == 404
        finally:
            await api.close()


async def test_a_command_the_lead_cannot_answer_is_504_and_its_key_applies_it_once(dev_env, settings, store):
    """Worker paused: the command is 504 (it may still apply), never 500. Sent again with the
    same Idempotency-Key once the worker is back, it is applied once and answered with its
    outcome, however often it is sent; its outcome can be read back by key."""
    settings = settings.model_copy(update={"command_timeout_seconds": 3.0})
    app = create_app(settings=settings, keys=KEYRING, temporal=dev_env.client, store=store)
    lead = f"K-{uuid.uuid4().hex[:6]}"
    async with serving(app) as base_url:
        api = Api(base_url)
        mautic, anna = api.as_("mautic"), api.as_("anna")
        try:
            async with running_worker(dev_env.client, settings, store):
                assert (await mautic.post("/events", json=ev(f"{lead}-1", lead, "demo_request", now()))).status_code == 202
                for _ in range(100):
                    if (await anna.get(f"/leads/{lead}")).json().get("stage") == "mql":
                        break
                    await asyncio.sleep(0.2)
            key = {"Idempotency-Key": f"accept-{lead}"}
            timed_out = await anna.post(f"/leads/{lead}/accept", json={}, headers=key)
            assert timed_out.status_code == 504, timed_out.text
            assert "may still be applied" in timed_out.json()["detail"] and key["Idempotency-Key"] in timed_out.json()["detail"]
            assert timed_out.headers["Idempotency-Key"] == key["Idempotency-Key"]
            async with running_worker(dev_env.client, settings, store):
                # The worker replays the lead first; until it answers, the same key is sent again.
                first = await until(lambda: anna.post(f"/leads/{lead}/accept", json={}, headers=key),
                                    lambda r: r.status_code != 504, timeout=60)
                assert first.status_code == 200 and first.json()["stage"] == "sal", first.text
                again = await anna.post(f"/leads/{lead}/accept", json={}, headers=key)
                assert again.status_code == 200 and again.json()["stage"] == "sal"  # its outcome, not a 409
                other = await anna.post(f"/leads/{lead}/accept", json={}, headers={"Idempotency-Key": "another"})
                assert other.status_code == 409
                outcome = (await anna.get(f"/leads/{lead}/commands/{key['Idempotency-Key']}")).json()
                assert outcome["outcome"] == "applied"
                assert [e["to_stage"] for e in outcome["entries"] if e["kind"] == "stage_changed"] == ["sal"]
                # refused up front (the update's validator) it changed nothing and wrote nothing: not remembered
                assert (await anna.get(f"/leads/{lead}/commands/another")).json()["outcome"] == "unknown"
                assert (await anna.get(f"/leads/{lead}/commands/never-sent")).json()["outcome"] == "unknown"
        finally:
            await api.close()
    moves = [e for e in store.history(lead, limit=1000) if e.kind.value == "stage_changed" and e.to_stage.value == "sal"]
    assert len(moves) == 1 and moves[0].command_id == key["Idempotency-Key"]
