"""Rollout benchmark: does rolling a scoring model version out to many running leads
stall event ingestion?

One run starts one Temporal dev server (SQLite file) and the real worker, creates N
leads (one event each, then their audit flushed so visibility knows their model),
and measures ingestion of M events into other leads twice on the same server:

1. quiet: nothing else happens;
2. during a rollout: `client.apply_model` of a new version to the N leads, at
   `--rate` leads per second, while the same number of events is sent.

It prints events/s of both, their ratio, how long the rollout took and how many
leads it told, and a JSON line. Figures only: nothing here passes or fails.

    .venv/bin/python bench/rollout.py [--leads 2000] [--events 1000] [--rate 20] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

from temporalio.testing import WorkflowEnvironment  # noqa: E402

import client as leads  # noqa: E402
from activities.lead_activities import LeadActivities  # noqa: E402
from activities.store import AuditStore  # noqa: E402
from bench.ingest import BIN  # noqa: E402
from config import DEFAULT_MODEL, Settings, data_converter, dev_server_file_flags  # noqa: E402
from payload_codec import PayloadKeyring, new_key  # noqa: E402
from funnel.models import ActivityEvent, Actor, Role  # noqa: E402
from worker import ACTIVITY_THREADS, build_worker  # noqa: E402
from workflows import search_attributes as sa  # noqa: E402


def now() -> datetime:
    return datetime.now(timezone.utc)


async def send_many(client, settings, events: list[ActivityEvent], concurrency: int) -> float:
    """Send one event per call from `concurrency` tasks; seconds taken."""
    queue: asyncio.Queue = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)

    async def sender() -> None:
        while not queue.empty():
            await leads.send_events(client, settings, [queue.get_nowait()])

    start = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return time.perf_counter() - start


async def applied(client, lead_ids: list[str], count: int) -> None:
    gate = asyncio.Semaphore(32)

    async def one(lead: str) -> None:
        async with gate:
            while True:
                try:
                    if (await leads.get_view(client, lead)).events_applied >= count:
                        return
                except (leads.LeadNotFound, leads.LeadStarting):
                    pass
                await asyncio.sleep(0.2)

    await asyncio.gather(*(one(lead) for lead in lead_ids))


def events_for(prefix: str, leads_n: int, per_lead: int) -> list[ActivityEvent]:
    at = now()
    return [ActivityEvent(event_id=f"{prefix}-{i}-{j}", lead_id=f"{prefix}-{i}", type="website_visit",
                          occurred_at=at, channel="web")
            for j in range(per_lead) for i in range(leads_n)]


async def main(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="leadflow-rollout-"))
    database_url = f"sqlite:///{tmp / 'audit.db'}"
    env = await WorkflowEnvironment.start_local(
        # Encrypted as in production (a throwaway key; the lead keys in the run's own store).
        dev_server_existing_path=str(BIN / "temporal"), data_converter=data_converter(
            Settings(database_url=database_url), keyring=PayloadKeyring({"bench": new_key()}, "bench"),
            key_store=AuditStore(database_url)),
        dev_server_database_filename=str(tmp / "temporal.db"), search_attributes=sa.ALL,
        dev_server_extra_args=dev_server_file_flags(),
    )
    settings = Settings(task_queue=f"bench-rollout-{uuid.uuid4().hex[:6]}", database_url=database_url,
                        audit_max_lag_seconds=5)
    store = AuditStore(settings.database_url)
    client = env.client
    try:
        with ThreadPoolExecutor(ACTIVITY_THREADS) as executor:
            async with build_worker(client, settings, LeadActivities(settings, store), executor):
                print(f"creating {args.leads} leads ...", file=sys.stderr)
                created = events_for("R", args.leads, 1)
                t = await send_many(client, settings, created, args.concurrency)
                await applied(client, [e.lead_id for e in created], 1)
                print(f"  {args.leads / t:.1f} leads/s sent; waiting for visibility ...", file=sys.stderr)
                while (await client.count_workflows(
                        "WorkflowType = 'LeadWorkflow' AND LeadModel = 'default@1'")).count < args.leads:
                    await asyncio.sleep(1)

                per_lead = max(1, args.events // 50)
                print("phase 1: ingestion, quiet ...", file=sys.stderr)
                quiet_events = events_for("Q", 50, per_lead)
                quiet_s = await send_many(client, settings, quiet_events, args.concurrency)
                await applied(client, [f"Q-{i}" for i in range(50)], per_lead)

                print(f"phase 2: ingestion during a rollout at {args.rate}/s ...", file=sys.stderr)
                v2 = DEFAULT_MODEL.read_text().replace('version = "1"', 'version = "2"', 1)
                started = time.perf_counter()
                await leads.apply_model(client, settings, store, v2, "bench", by=Actor(name="bench", role=Role.MANAGER),
                                        rate_per_second=args.rate)
                busy_events = events_for("B", 50, per_lead)
                busy_s = await send_many(client, settings, busy_events, args.concurrency)
                await applied(client, [f"B-{i}" for i in range(50)], per_lead)
                while not (progress := await leads.rollout_progress(client, settings, "default@2")) or not progress.done:
                    await asyncio.sleep(1)
                rollout_s = time.perf_counter() - started
    finally:
        await env.shutdown()
    quiet_eps, busy_eps = len(quiet_events) / quiet_s, len(busy_events) / busy_s
    result = {"leads": args.leads, "events": len(quiet_events), "rate": args.rate,
              "quiet_eps": round(quiet_eps, 1), "during_rollout_eps": round(busy_eps, 1),
              "ratio": round(busy_eps / quiet_eps, 3), "rollout_seconds": round(rollout_s, 1),
              "leads_told": progress.signalled, "behind_at_end": progress.behind}
    print(f"\ningestion quiet {quiet_eps:.1f} events/s, during the rollout {busy_eps:.1f} events/s "
          f"(ratio {busy_eps / quiet_eps:.2f}); rollout of {args.leads} leads at {args.rate}/s took "
          f"{rollout_s:.0f} s, {progress.signalled} told, {progress.behind} behind at the end")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--leads", type=int, default=2000)
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=16)
    asyncio.run(main(p.parse_args()))
