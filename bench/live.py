"""Live-leads benchmark: how many leads does one machine hold on the embedded default?

One run starts the embedded default (dev server persisted to a SQLite file, the real
worker, the SQLite audit store) and creates N leads, one event each, with a scoring
model whose first nurture step is due `--timer` after a lead is created: N leads with
a pending timer. It prints:

- how long creating them took (sent, and until every lead had started and written its
  audit), in leads/s;
- memory: the worker process and the dev server, before and after, per live lead, and
  the size of the server's and the store's files;
- the timer: when the step was due for each lead and when it was sent (outbox rows),
  so how late the timers fired (p50/p99/max) with all N due within the same minutes.

Figures only: nothing here passes or fails.

    .venv/bin/python bench/live.py [--leads 100000] [--timer 15m] [--concurrency 32] [--in-flight 500]
                                   [--fire-window 7200]

A run prints where it is about once a minute. `--fire-window S` stops watching the timers
S seconds after the last lead started and projects the rest from the rate seen (100,000
timers take hours to fire here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
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

from sqlalchemy import func  # noqa: E402
from sqlmodel import Session, select  # noqa: E402

import client as leads  # noqa: E402
from activities.lead_activities import LeadActivities  # noqa: E402
from activities.store import AuditRow, AuditStore, OutboxRow  # noqa: E402
from bench.ingest import child_pids, start_embedded  # noqa: E402
from config import DEFAULT_MODEL, Settings  # noqa: E402
from funnel.models import ActivityEvent, AuditKind  # noqa: E402
from worker import ACTIVITY_THREADS, build_worker  # noqa: E402


def rss_mb(pid: int | None = None) -> float:
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def count(store: AuditStore, stmt) -> int:
    with Session(store.engine) as session:
        return session.exec(stmt).one()


async def until(check, every: float = 2.0, timeout: float = 7200.0, label: str = "", progress=None) -> float:
    """Seconds until check() is true (polled); raises TimeoutError after `timeout`.
    `progress()`, if given, returns a line printed about once a minute (a long run shows
    where it is)."""
    start = last = time.perf_counter()
    while not await asyncio.to_thread(check):
        now = time.perf_counter()
        if now - start > timeout:
            raise TimeoutError(label)
        if progress is not None and now - last >= 60:
            last = now
            print(f"  {now - start:6.0f} s {label}: {await asyncio.to_thread(progress)}", file=sys.stderr)
        await asyncio.sleep(every)
    return time.perf_counter() - start


async def main(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="leadflow-live-"))
    model = tmp / "live.toml"
    text = DEFAULT_MODEL.read_text().replace('version = "1"', 'version = "live"', 1)
    model.write_text(text.replace('[[nurture.iql]]\nname = "welcome"\nafter = "1d"',
                                  f'[[nurture.iql]]\nname = "welcome"\nafter = "{args.timer}"', 1))
    database_url = f"sqlite:///{tmp / 'audit.db'}"
    store = AuditStore(database_url)
    env = await start_embedded(tmp, store)
    server = child_pids()
    settings = Settings(task_queue=f"live-{uuid.uuid4().hex[:6]}", database_url=database_url,
                        model_path=model, decision_delay_seconds=5)
    acts = LeadActivities(settings, store)
    result: dict = {"leads": args.leads, "timer": args.timer}
    try:
        with ThreadPoolExecutor(ACTIVITY_THREADS) as executor:
            async with build_worker(env.client, settings, acts, executor):
                worker_before = rss_mb()
                server_before = sum(rss_mb(pid) for pid in server)
                at = datetime.now(timezone.utc)
                # Lead numbers, not events: 100,000 events held up front were ~120 MB of this
                # process's RSS, which is counted as the worker's.
                queue = list(range(args.leads - 1, -1, -1))
                created = select(func.count()).select_from(AuditRow).where(AuditRow.kind == AuditKind.LEAD_CREATED.value)
                steps = select(func.count()).select_from(OutboxRow).where(OutboxRow.kind == "nurture_step")
                started = time.perf_counter()
                sent = 0
                done = 0  # leads started and audited, as last counted

                async def count_created() -> None:
                    nonlocal done
                    while done < args.leads:
                        done = await asyncio.to_thread(count, store, created)
                        await asyncio.sleep(1.0)

                async def sender() -> None:
                    # Paced like the API's back-pressure: at most --in-flight leads sent and not yet
                    # started. Unpaced, the server took ~40 starts/s into its one SQLite writer and
                    # the worker, sharing it, started 2 leads/s (a 100,000-lead run, measured).
                    nonlocal sent
                    while queue:
                        while sent - done >= args.in_flight:
                            await asyncio.sleep(0.2)
                        if not queue:
                            break
                        i = queue.pop()
                        event = ActivityEvent(event_id=f"v-{i}", lead_id=f"V-{i:06d}", type="website_visit",
                                              occurred_at=at, channel="web")
                        sent += 1
                        for attempt in range(20):
                            try:
                                await leads.send_events(env.client, settings, [event], acts.model(None))  # as the API does
                                break
                            except leads.TemporalUnavailable:
                                await asyncio.sleep(0.5 * (attempt + 1))

                counter = asyncio.create_task(count_created())
                await asyncio.gather(*(sender() for _ in range(args.concurrency)))
                sent_s = time.perf_counter() - started
                print(f"sent {args.leads} leads in {sent_s:.0f} s ({args.leads / sent_s:.1f}/s)", file=sys.stderr)

                def progress() -> str:
                    return (f"{count(store, created)} started, {count(store, steps)} timers fired; worker "
                            f"{rss_mb():.0f} MB, server {sum(rss_mb(pid) for pid in server):.0f} MB")

                await until(lambda: count(store, created) >= args.leads, label="leads created", progress=progress)
                counter.cancel()
                created_s = time.perf_counter() - started
                print(f"all {args.leads} started and audited after {created_s:.0f} s", file=sys.stderr)
                worker_after = rss_mb()
                server_after = sum(rss_mb(pid) for pid in server)
                window_start = time.perf_counter()
                try:
                    await until(lambda: count(store, steps) >= args.leads, label="timers fired", progress=progress,
                                timeout=args.fire_window)
                except TimeoutError:
                    pass  # --fire-window: the rate so far says how long the rest takes
                window_s = time.perf_counter() - window_start
                with Session(store.engine) as session:
                    rows = session.exec(select(OutboxRow.created_at, OutboxRow.payload)
                                        .where(OutboxRow.kind == "nurture_step")).all()
                late = sorted((created_at - datetime.fromisoformat(payload["due_at"])).total_seconds()
                              for created_at, payload in rows)
                # The rate while timers fire: from the first step sent to the last (a window that
                # opens before any timer is due must not count the wait for the first one).
                sent_at = sorted(created_at for created_at, _ in rows)
                firing_s = (sent_at[-1] - sent_at[0]).total_seconds() if len(sent_at) > 1 else 0.0
                fired_rate = (len(rows) - 1) / firing_s if firing_s > 0 else 0.0
                result.update({
                    "timers_fired": len(rows), "fire_window_s": round(window_s), "timers_per_s": round(fired_rate, 1),
                    "projected_last_fired_s": (round((args.leads - len(rows)) / fired_rate) if fired_rate and
                                               len(rows) < args.leads else 0),
                })
                result.update({
                    "sent_seconds": round(sent_s, 1), "leads_per_s_sent": round(args.leads / sent_s, 1),
                    "started_seconds": round(created_s, 1), "leads_per_s_started": round(args.leads / created_s, 1),
                    "worker_rss_mb": [round(worker_before), round(worker_after)],
                    "server_rss_mb": [round(server_before), round(server_after)],
                    "worker_kb_per_lead": round((worker_after - worker_before) * 1024 / args.leads, 2),
                    "server_kb_per_lead": round((server_after - server_before) * 1024 / args.leads, 2),
                    "server_db_mb": round(os.path.getsize(tmp / "temporal.db") / 2**20, 1),
                    "store_db_mb": round(os.path.getsize(tmp / "audit.db") / 2**20, 1),
                    "timer_late_s": {"p50": round(statistics.median(late), 1),
                                     "p99": round(late[int(0.99 * (len(late) - 1))], 1),
                                     "max": round(late[-1], 1)} if late else None,
                })
    finally:
        acts.close()
        await env.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.leads} live leads, each with a timer due {args.timer} after its creation:")
    print(f"  created: sent at {result['leads_per_s_sent']}/s, all started and audited after "
          f"{result['started_seconds']} s ({result['leads_per_s_started']}/s)")
    print(f"  memory: worker {result['worker_rss_mb'][0]} -> {result['worker_rss_mb'][1]} MB, dev server "
          f"{result['server_rss_mb'][0]} -> {result['server_rss_mb'][1]} MB ({result['worker_kb_per_lead']} + "
          f"{result['server_kb_per_lead']} KB per lead); files: server {result['server_db_mb']} MB, store "
          f"{result['store_db_mb']} MB")
    late = result["timer_late_s"] or {"p50": "-", "p99": "-", "max": "-"}
    print(f"  the timer fired late by p50 {late['p50']} s, p99 {late['p99']} s, max {late['max']} s "
          f"({result['timers_fired']} fired in a window of {result['fire_window_s']} s, {result['timers_per_s']}/s "
          f"from the first to the last)")
    if not result["timers_fired"]:
        print("  no timer fired within --fire-window")
    elif result["projected_last_fired_s"]:
        print(f"  not all fired within --fire-window: at that rate the last one fires "
              f"{result['projected_last_fired_s']} s later")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--leads", type=int, default=100_000)
    p.add_argument("--timer", default="15m", help="when each lead's first nurture step is due (default 15m)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--in-flight", type=int, default=500,
                   help="most leads sent and not yet started at any time (default 500; the API's back-pressure "
                        "does the same)")
    p.add_argument("--fire-window", type=float, default=7200.0,
                   help="seconds to watch the timers fire after creation before reporting their rate and "
                        "projecting the rest (default 7200)")
    asyncio.run(main(p.parse_args()))
