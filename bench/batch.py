"""Batch benchmark: how long does one `POST /events/batch` of N events for N new leads
take to answer, and until every one of those leads answers?

One run starts the embedded default (dev server on a SQLite file, the real worker, the
SQLite audit store) and serves the real API in this process. It posts the same batch
shape (N events, each for a lead that does not exist yet) once per setting of the
API's send concurrency (`api.limits.SEND_CONCURRENCY`: how many leads of one batch are
signalled-with-start at the same time), one lead per call first (the baseline: what
a batch cost when the API sent lead after lead), in the same run and on the same
server, and prints per setting:

- seconds until the POST answered (every lead's events taken by Temporal),
- seconds until every lead had started (its creation in the audit store),
- the ratio against the one-at-a-time baseline.

Figures only: nothing here passes or fails.

    .venv/bin/python bench/batch.py [--leads 500] [--concurrency 1,16,64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import func  # noqa: E402
from sqlmodel import Session, select  # noqa: E402

import api  # noqa: E402
from activities.lead_activities import LeadActivities  # noqa: E402
from activities.store import AuditRow, AuditStore  # noqa: E402
from bench.ingest import start_embedded  # noqa: E402
from config import Settings  # noqa: E402
from funnel.models import AuditKind  # noqa: E402
from worker import ACTIVITY_THREADS, build_worker  # noqa: E402

KEY = "mk-bench-" + uuid.uuid4().hex


async def one_batch(http: httpx.AsyncClient, store: AuditStore, leads: int, concurrency: int) -> dict:
    api.limits.SEND_CONCURRENCY = concurrency  # read by each batch as it starts
    run = uuid.uuid4().hex[:6]
    at = datetime.now(timezone.utc).isoformat()
    events = [{"event_id": f"{run}-{i}", "lead_id": f"B-{run}-{i:05d}", "type": "website_visit", "occurred_at": at,
               "channel": "web"} for i in range(leads)]
    started = time.perf_counter()
    response = await http.post("/events/batch", json={"events": events})
    answered = time.perf_counter() - started
    body = response.json()
    if response.status_code != 202 or body.get("accepted") != leads:
        raise RuntimeError(f"batch not taken: {response.status_code} {str(body)[:300]}")
    # Started = its creation is in the store (written at once: audit lag 0). Read from the
    # store, not by asking 500 leads again and again, which would load the server measured.
    created = (select(func.count()).select_from(AuditRow)
               .where(AuditRow.kind == AuditKind.LEAD_CREATED.value, AuditRow.lead_id.startswith(f"B-{run}-")))
    while True:
        with Session(store.engine) as session:
            if session.exec(created).one() >= leads:
                break
        await asyncio.sleep(0.2)
    return {"concurrency": concurrency, "answered_s": round(answered, 2),
            "all_started_s": round(time.perf_counter() - started, 2)}


async def main(args: argparse.Namespace) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="leadflow-batch-"))
    database_url = f"sqlite:///{tmp / 'audit.db'}"
    store = AuditStore(database_url)
    env = await start_embedded(tmp, store)
    settings = Settings(task_queue=f"batch-{uuid.uuid4().hex[:6]}", database_url=database_url, audit_max_lag_seconds=0)
    acts = LeadActivities(settings, store)
    app = api.create_app(settings=settings, keys=api.KeyRing(api.KeyRing.parse(f"bench:marketing:{KEY}")),
                         temporal=env.client, store=store)
    results = []
    try:
        with ThreadPoolExecutor(ACTIVITY_THREADS) as executor:
            async with build_worker(env.client, settings, acts, executor):
                async with app.router.lifespan_context(app), httpx.AsyncClient(
                        transport=httpx.ASGITransport(app=app), base_url="http://bench",
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as http:
                    await one_batch(http, store, 20, 16)  # warm-up: connections, caches, first polls
                    for concurrency in args.concurrency:
                        print(f"{args.leads} new leads, send concurrency {concurrency} ...", file=sys.stderr)
                        results.append(await one_batch(http, store, args.leads, concurrency))
    finally:
        acts.close()
        await env.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    base = results[0]
    print(f"\nPOST /events/batch of {args.leads} events for {args.leads} new leads "
          f"(embedded default, {os.cpu_count()} CPUs; baseline: concurrency {base['concurrency']}, same run)")
    print(f"  {'concurrency':>11}  {'POST answered s':>15}  {'ratio':>5}  {'all leads started s':>19}  {'ratio':>5}")
    for r in results:
        r["answered_ratio"] = round(base["answered_s"] / r["answered_s"], 2)
        r["all_ratio"] = round(base["all_started_s"] / r["all_started_s"], 2)
        print(f"  {r['concurrency']:>11}  {r['answered_s']:>15.2f}  {r['answered_ratio']:>5.2f}  "
              f"{r['all_started_s']:>19.2f}  {r['all_ratio']:>5.2f}")
    print("  (ratio: the baseline's seconds / this setting's; higher is faster)")
    print(json.dumps({"leads": args.leads, "cpus": os.cpu_count(), "results": results}))
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--leads", type=int, default=500)
    p.add_argument("--concurrency", default="1,16,64", type=lambda v: [int(c) for c in v.split(",")],
                   help="send concurrencies to compare, the first is the baseline (default 1,16,64)")
    asyncio.run(main(p.parse_args()))
