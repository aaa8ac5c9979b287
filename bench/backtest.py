"""Backtest benchmark: how long does `leadflow backtest` take on a big logged population?

Generates `--leads` demo leads (funnel/demo.py: ~12 events each) into a SQLite store, then
times what the backtest does: reading the store (audit decisions, event log, profile
updates) into lead logs, and replaying every lead under two models, in one process (the
baseline of this run) and in `--workers` processes; then both at once as `leadflow
backtest` runs them, each process reading its own shard of the leads. Prints events per
second, the wall time per event and model, the speed-ups, and what 100,000 leads x 20
events would take at that pace. Figures only: nothing here passes or fails.

    .venv/bin/python bench/backtest.py [--leads 5000] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from activities.backtest_source import replay_store  # noqa: E402
from activities.store import AuditStore  # noqa: E402
from config import DEFAULT_MODEL  # noqa: E402
from funnel import backtest, demo  # noqa: E402
from funnel.scoring_model import load_model, parse_model  # noqa: E402
from starter import lead_logs_of, write_population  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leads", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    current = load_model(DEFAULT_MODEL)
    candidate = parse_model(DEFAULT_MODEL.read_text().replace('version = "1"', 'version = "2"')
                            .replace("mql = 100 ", "mql = 70 "), "candidate")
    now = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        store = AuditStore(f"sqlite:///{Path(tmp) / 'bench.db'}")
        started = time.monotonic()
        leads = demo.generate(args.leads, current, now, decision_delay=timedelta(seconds=5))
        write_population(store, leads)
        events = sum(len(lead.events) for lead in leads)
        print(f"generated {len(leads)} leads, {events} events ({events / len(leads):.1f} per lead) "
              f"in {time.monotonic() - started:.1f} s")
        del leads

        started = time.monotonic()
        logs = lead_logs_of(store)
        read = time.monotonic() - started
        print(f"read the store into lead logs: {read:.2f} s ({events / read:,.0f} events/s)")

        models = {"current": current, "candidate": candidate}
        timings = {}
        for workers in sorted({1, args.workers}):
            started = time.monotonic()
            backtest.replay_all(logs, models, now, timedelta(seconds=5), workers=workers)
            timings[workers] = time.monotonic() - started
        base = timings[1]
        print(f"\n{'processes':>9} {'replay (2 models)':>18} {'events/s':>10} {'us/event':>9} {'speed-up':>9}")
        for workers, seconds in timings.items():
            print(f"{workers:>9} {seconds:>16.2f} s {2 * events / seconds:>10,.0f} {seconds / (2 * events) * 1e6:>9.1f}"
                  f" {base / seconds:>8.2f}x")
        del logs

        # What `leadflow backtest` does: each process reads its own shard and replays it.
        started = time.monotonic()
        replay_store(store, models, now, None, timedelta(seconds=5), workers=args.workers)
        sharded = time.monotonic() - started
        store.dispose()
        parent = read + min(timings.values())
        print(f"\nread + replay, {args.workers} processes: {parent:.2f} s reading in the parent, "
              f"{sharded:.2f} s each process reading its shard ({parent / sharded:.2f}x)")
        per_event = min(parent, sharded) / events
        print(f"100,000 leads x 20 events at this pace: {per_event * 2_000_000:,.0f} s (goal: under 60 s)")

if __name__ == "__main__":
    main()
