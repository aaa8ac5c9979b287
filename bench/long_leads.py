"""What an event costs a long-lived lead whose events come far apart.

Real leads get their events over weeks, so almost every event reaches a lead the worker has
evicted, and the worker first replays the lead's run from its history. `bench/ingest.py
--shape sparse` measures that on leads with ~11 history events; here the runs are longer:

1. **Replay against run length.** Runs of N events each (one workflow task per event), the
   lead and the counting workflow, replayed in this process with the SDK's Replayer: worker
   CPU per replay, and the slope in ms per history event (least squares).
2. **Sparse traffic to long-lived leads.** `--leads` leads (and as many counting workflows,
   the baseline) take `--events` events each, one round of one event per lead every
   `--pace` s, through a worker whose cache (`--cache`) holds fewer workflows than there
   are leads, so each event is applied after a replay. Worker + dev server CPU per event:
   the counting workflow; the lead going on to the history limit; and the lead continuing
   as new once woken after a quiet spell (`--quiet-after`, below the pace) with a run of
   `--quiet` history events or more (LEADFLOW_QUIET_HISTORY_EVENTS, LEADFLOW_QUIET_AFTER).

Figures only: nothing here passes or fails.

    .venv/bin/python bench/long_leads.py [--sizes 10 40 120] [--leads 12] [--events 60] [--quiet 100 --quiet 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from temporalio.client import Client  # noqa: E402
from temporalio.worker import UnsandboxedWorkflowRunner, Worker  # noqa: E402

import client as leads_client  # noqa: E402
from activities.lead_activities import LeadActivities  # noqa: E402
from activities.store import AuditStore  # noqa: E402
from bench.counting_workflow import CountingWorkflow  # noqa: E402
from bench.ingest import child_pids, cpu_of, cpu_self, make_events, replay_cost, start_embedded  # noqa: E402
from config import Settings  # noqa: E402
from funnel.models import ActivityEvent  # noqa: E402
from worker import ACTIVITY_THREADS, build_worker  # noqa: E402
from workflows.lead import LeadWorkflow, workflow_id  # noqa: E402

class Traffic:
    """Sends events one at a time, as webhooks arrive: to a lead (starting it on the active
    model, as the API does) and to its counting workflow."""

    def __init__(self, client: Client, settings: Settings, activities: LeadActivities, count_queue: str):
        self.client, self.settings, self.activities, self.count_queue = client, settings, activities, count_queue
        self.started: set[str] = set()

    async def to_lead(self, event: ActivityEvent) -> None:
        model = None if event.lead_id in self.started else self.activities.model(None)
        self.started.add(event.lead_id)
        await leads_client.send_events(self.client, self.settings, [event], model)

    async def to_counter(self, event: ActivityEvent) -> None:
        await self.client.start_workflow(CountingWorkflow.run, id=f"count-{event.lead_id}", task_queue=self.count_queue,
                                         start_signal="event", start_signal_args=[event])


def rounds(events: list[ActivityEvent], leads: int) -> list[list[ActivityEvent]]:
    """make_events interleaves: event j of every lead comes before event j + 1 of any."""
    return [events[i:i + leads] for i in range(0, len(events), leads)]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)


async def replay_growth(client: Client, settings: Settings, activities: LeadActivities, sizes: list[int],
                        leads: int, pace: float) -> None:
    count_queue = f"long-count-{uuid.uuid4().hex[:8]}"
    lead_points, count_points = [], []
    print(f"1. replay against run length ({leads} workflows per size, one workflow task per event)")
    print(f"{'events':>7} {'lead: hist':>11} {'ms/replay':>10} {'counting: hist':>15} {'ms/replay':>10} {'ratio':>6}")
    with ThreadPoolExecutor(ACTIVITY_THREADS) as executor:
        async with build_worker(client, settings, activities, executor), \
                Worker(client, task_queue=count_queue, workflows=[CountingWorkflow],
                       workflow_runner=UnsandboxedWorkflowRunner()):
            for size in sizes:
                prefix = f"g{size}-{uuid.uuid4().hex[:6]}"
                traffic = Traffic(client, settings, activities, count_queue)
                for batch in rounds(make_events(prefix, leads, size, seed=size), leads):
                    await asyncio.gather(*(traffic.to_lead(e) for e in batch), *(traffic.to_counter(e) for e in batch))
                    await asyncio.sleep(pace)
                await asyncio.sleep(1.0)
                ids = sorted(traffic.started)
                found = await replay_cost(client, {"lead": (LeadWorkflow, [workflow_id(i) for i in ids]),
                                                   "counting": (CountingWorkflow, [f"count-{i}" for i in ids])})
                lead, count = found["lead"], found["counting"]
                lead_points.append((lead[1], lead[0]))
                count_points.append((count[1], count[0]))
                print(f"{size:>7} {lead[1]:>11.0f} {lead[0]:>10.2f} {count[1]:>15.0f} {count[0]:>10.2f} "
                      f"{count[0] / lead[0]:>6.2f}")
    if len(sizes) > 1:
        print(f"   slope, worker CPU ms per history event replayed: lead {slope(lead_points):.3f}, "
              f"counting workflow {slope(count_points):.3f}")


async def sparse_phase(client: Client, settings: Settings, activities: LeadActivities, kind: str, leads: int,
                       events: int, cache: int, pace: float) -> dict:
    """One phase of paced sparse traffic through a worker of `cache` workflows: CPU per event."""
    count_queue = f"long-count-{uuid.uuid4().hex[:8]}"
    traffic = Traffic(client, settings, activities, count_queue)
    server = child_pids()
    send = traffic.to_counter if kind == "counting" else traffic.to_lead
    worker = (Worker(client, task_queue=count_queue, workflows=[CountingWorkflow], max_cached_workflows=cache,
                     workflow_runner=UnsandboxedWorkflowRunner()) if kind == "counting" else None)
    prefix = f"s-{uuid.uuid4().hex[:6]}"
    with ThreadPoolExecutor(ACTIVITY_THREADS) as executor:
        async with (worker or build_worker(client, settings, activities, executor, max_cached_workflows=cache)):
            bench_cpu, server_cpu = cpu_self(), cpu_of(server)
            for batch in rounds(make_events(prefix, leads, events, seed=7), leads):
                await asyncio.gather(*(send(e) for e in batch))
                await asyncio.sleep(pace)
            await asyncio.sleep(2.0)  # the last round's tasks
            bench_cpu, server_cpu = cpu_self() - bench_cpu, cpu_of(server) - server_cpu
            ids = [f"{prefix}-{i:05d}" for i in range(leads)]  # as make_events names them
            if kind == "counting":
                counts = [await client.get_workflow_handle(f"count-{i}").query(CountingWorkflow.count) for i in ids]
                applied = sum(counts)
            else:
                applied = sum([(await leads_client.get_view(client, i)).events_applied for i in ids])
    runs = 0
    if kind != "counting":
        async for _ in client.list_workflows(f"TaskQueue='{settings.task_queue}'"):  # (its own queue)
            runs += 1
    total = leads * events
    return {"kind": kind, "worker_ms": 1000 * bench_cpu / total, "server_ms": 1000 * server_cpu / total,
            "applied": applied, "sent": total, "runs": runs}


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 40, 120],
                        help="events per run for the replay curve (default 10 40 120)")
    parser.add_argument("--replay-leads", type=int, default=4, help="workflows per size (default 4)")
    parser.add_argument("--leads", type=int, default=12, help="leads of the sparse traffic (default 12)")
    parser.add_argument("--events", type=int, default=60, help="events per lead of the sparse traffic (default 60)")
    parser.add_argument("--cache", type=int, default=2, help="worker cache in the sparse traffic (default 2)")
    parser.add_argument("--pace", type=float, default=1.0,
                        help="seconds between rounds of the sparse traffic, one event per lead (default 1.0)")
    parser.add_argument("--quiet", type=int, action="append",
                        help="LEADFLOW_QUIET_HISTORY_EVENTS of a sparse phase, repeatable (default: the setting's, 50)")
    parser.add_argument("--quiet-after", type=float, default=0.5,
                        help="LEADFLOW_QUIET_AFTER of those phases, below --pace (default 0.5 s)")
    args = parser.parse_args(argv)
    quiet = args.quiet or [Settings().quiet_history_events]
    with tempfile.TemporaryDirectory(prefix="leadflow-bench-long-") as tmp_dir:
        tmp = Path(tmp_dir)
        url = f"sqlite:///{tmp / 'audit.db'}"
        store = AuditStore(url)
        env = await start_embedded(tmp, store)
        try:
            settings = Settings(database_url=url, task_queue=f"long-{uuid.uuid4().hex[:8]}")
            with closing(LeadActivities(settings, store)) as activities:
                await replay_growth(env.client, settings, activities, args.sizes, args.replay_leads, pace=0.1)
            print(f"\n2. sparse traffic: {args.leads} leads x {args.events} events, one round every {args.pace} s, "
                  f"worker cache {args.cache}")
            print(f"{'phase':>22} {'worker ms/event':>16} {'server ms/event':>16} {'total':>7} {'runs':>5} "
                  f"{'applied':>8}")
            phases = [("counting", None), ("lead", 0), *(("lead", events) for events in quiet)]
            base_total = None
            for kind, events in phases:
                phase_settings = settings if events is None else Settings(
                    database_url=url, task_queue=f"long-{uuid.uuid4().hex[:8]}", quiet_history_events=events,
                    quiet_after_seconds=args.quiet_after)
                with closing(LeadActivities(phase_settings, store)) as activities:
                    found = await sparse_phase(env.client, phase_settings, activities, kind, args.leads, args.events,
                                               args.cache, args.pace)
                total = found["worker_ms"] + found["server_ms"]
                base_total = base_total or total
                name = ("counting workflow" if events is None else "lead, to the limit" if not events
                        else f"lead, quiet at {events}")
                print(f"{name:>22} {found['worker_ms']:>16.2f} {found['server_ms']:>16.2f} {total:>7.2f} "
                      f"{found['runs'] or '':>5} {found['applied']:>4}/{found['sent']}"
                      + ("" if events is None else f"   CPU ratio {base_total / total:.2f}"))
        finally:
            await env.shutdown()
            store.dispose()


if __name__ == "__main__":
    asyncio.run(main())
