"""Report benchmark: how long does the full funnel report take on a big audit store?

Generates a store of `--leads` leads (default 100,000) with about `--rows` audit rows
(default 2,000,000) and one event-log row per scored event, on SQLite (a file) and on
PostgreSQL (a throw-away server started here from Debian's binaries, as the tests do),
derives the report's summary tables (the rows `write_audit` keeps; the bulk load bypasses
it), then times the report as `leadflow report --json` makes it (`store.funnel_report`:
GROUP BY queries over those tables), each part apart, `--repeat` times; and once the
previous path (every report entry read into Python, `funnel.report.funnel_report`) for
the ratio. Figures only: nothing here passes or fails.

The population: channels and campaigns, leads created over a year, ~20 entries each
(creation, score changes for their events, and for some: MQL, owner, SLAs, presales
decision with a reason, qualification, contact, won or lost), so the report has
everything to count.

    .venv/bin/python bench/report.py [--leads 100000] [--rows 2000000] [--db sqlite|postgresql|both]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from activities.report_store import funnel_report_sql  # noqa: E402
from activities.store import _AUDIT, _EVENTS, AuditStore  # noqa: E402
from funnel.report import funnel_report  # noqa: E402

CHANNELS = ["web", "webinar", "paid_search", "partner", "email", "event"]
CAMPAIGNS = [None, None, "spring", "summit", "retarget", "newsletter"]
OWNERS = [f"presales-{i}" for i in range(1, 9)]
REASONS = ["no_budget", "no_need", "not_now", "competitor", "wrong_audience"]
NOW = datetime(2026, 11, 1, tzinfo=timezone.utc)
BLANK = {name: None for name in _AUDIT.columns.keys()}  # one shape for every row: one executemany


def generate(store: AuditStore, leads: int, rows: int, seed: int = 1) -> tuple[int, int]:
    """Fill the store; returns (audit rows, event-log rows)."""
    rng = random.Random(seed)
    per_lead = max(rows // leads, 4)
    audit: list[dict] = []
    events: list[dict] = []
    written = logged = 0

    def flush() -> None:
        nonlocal written, logged, audit, events
        with store.engine.begin() as conn:
            if audit:
                conn.execute(_AUDIT.insert(), audit)
            if events:
                conn.execute(_EVENTS.insert(), events)
        written, logged = written + len(audit), logged + len(events)
        audit, events = [], []

    for n in range(leads):
        lead = f"L-{n:07d}"
        channel, campaign = rng.choice(CHANNELS), rng.choice(CAMPAIGNS)
        t = NOW - timedelta(days=rng.uniform(0, 365))
        seq = 0

        def add(kind: str, at: datetime, **fields) -> None:
            nonlocal seq
            seq += 1
            audit.append({**BLANK, "entry_id": f"{lead}/{seq}", "lead_id": lead, "seq": seq, "at": at, "kind": kind,
                          "actor": fields.pop("actor", "leadflow"), "role": fields.pop("role", "system"),
                          "detail": fields.pop("detail", kind), "channel": channel, "model_ref": "default@1",
                          "score_total": 0.0, **fields})

        add("lead_created", t, to_stage="iql", trigger=None)
        milestones = []
        if rng.random() < 0.4:  # a third or so becomes an MQL, some of them opportunities
            milestones = ["mql"]
            r = rng.random()
            milestones += (["accept"] + (["qualify"] + ([rng.choice(["won", "lost"])] if rng.random() < 0.7 else [])
                                         if rng.random() < 0.5 else []) if r < 0.6 else
                           ["reject"] if r < 0.9 else [])
        scored = per_lead - 1 - 4 * len(milestones)
        for k in range(max(scored, 1)):
            t += timedelta(hours=rng.uniform(1, 72))
            event_id = f"{lead}-e{k}"
            add("score_changed", t, event_id=event_id, rule="website_visit", points=1.0, occurred_at=t)
            events.append({"lead_id": lead, "event_id": event_id, "type": "website_visit", "occurred_at": t,
                           "received_at": t, "channel": channel, "campaign": campaign, "source": "bench",
                           "attributes": {}, "digest": event_id})
        owner = rng.choice(OWNERS)
        stage = "iql"
        for step in milestones:
            t += timedelta(hours=rng.uniform(2, 24 * 10))
            if step == "mql":
                add("stage_changed", t, from_stage="iql", to_stage="mql", trigger="score_threshold", occurred_at=t)
                add("owner_assigned", t, owner=owner)
                add("sla_set", t, rule="presales_decision", occurred_at=t, owner=owner)
                add("contact_logged", t + timedelta(hours=rng.uniform(1, 30)), actor=owner, role="presales",
                    owner=owner)
                stage = "mql"
            elif step in ("accept", "reject"):
                late = rng.random() < 0.2
                add("sla_breached" if late else "sla_met", t, rule="presales_decision", owner=owner)
                target = "sal" if step == "accept" else "disqualified"
                add("stage_changed", t, from_stage=stage, to_stage=target, actor=owner, role="presales", owner=owner,
                    trigger="accept" if step == "accept" else "reject_disqualify",
                    reason=None if step == "accept" else rng.choice(REASONS))
                add("sla_set", t, rule="presales_qualification", owner=owner)
                stage = target
            elif step == "qualify":
                add("sla_met", t, rule="presales_qualification", owner=owner)
                add("stage_changed", t, from_stage="sal", to_stage="sql", trigger="qualify", actor=owner,
                    role="presales", owner=owner)
                add("sla_set", t, rule="first_sales_contact", owner=owner)
                add("contact_logged", t + timedelta(hours=3), actor="ben", role="sales", owner=owner)
                stage = "sql"
            else:
                add("sla_met", t, rule="first_sales_contact", owner=owner)
                add("stage_changed", t, from_stage="sql", to_stage=step, trigger=step, actor="ben", role="sales",
                    owner=owner, reason="price" if step == "lost" else None)
                add("score_changed", t, rule="closed", points=0.0)
                add("score_changed", t, rule="closed", points=0.0)
        if len(audit) >= 50_000:
            flush()
    flush()
    store.fill_lead_touches()  # the events went in by bulk insert, not log_events
    return written, logged


def time_report(store: AuditStore, repeat: int, old: bool) -> dict:
    """The best of `repeat` runs of the full report as the CLI and the API make it
    (`store.funnel_report`), with its parts; and once the previous path (every report
    entry read into Python and `funnel.report.funnel_report`, the reference definition)."""
    best: dict[str, float] = {}
    for _ in range(repeat):
        parts: dict[str, float] = {}
        t0 = time.perf_counter()
        with store.engine.connect() as conn:
            report = funnel_report_sql(conn, NOW, timings=parts)
        parts["total"] = time.perf_counter() - t0
        for name, seconds in parts.items():
            best[name] = min(best.get(name, seconds), seconds)
    t0 = time.perf_counter()
    assert store.funnel_report(NOW).overall.leads == report.overall.leads  # the same, through the entry point
    best["entry_point"] = time.perf_counter() - t0
    best["leads"] = report.overall.leads
    if old:
        t0 = time.perf_counter()
        entries = store.report_entries()
        t1 = time.perf_counter()
        touches = store.lead_touches()
        t2 = time.perf_counter()
        funnel_report(entries, NOW, touches=touches)
        t3 = time.perf_counter()
        best.update({"old_read_entries": t1 - t0, "old_read_touches": t2 - t1, "old_compute": t3 - t2,
                     "old_total": t3 - t0, "entries_read": len(entries)})
        best["speedup"] = best["old_total"] / best["total"]
    return best


@contextlib.contextmanager
def postgres():
    """A throw-away PostgreSQL server (Debian's binaries; run as the `postgres` user when root)."""
    initdb = shutil.which("initdb") or (sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [None])[-1]
    if initdb is None:
        raise SystemExit("no PostgreSQL binaries (apt-get install -y postgresql)")
    bin_dir = Path(initdb).resolve().parent
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="leadflow-bench-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base, user="postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = base / "data"
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                        "--no-sync"], check=True, capture_output=True)
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-o",
                        f"-p {port} -c listen_addresses=127.0.0.1 -k {base} -c fsync=off "
                        "-c synchronous_commit=off", "start"], check=True, capture_output=True)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def run(url: str, args) -> dict:
    store = AuditStore(url)
    try:
        t0 = time.perf_counter()
        audit_rows, event_rows = generate(store, args.leads, args.rows, args.seed)
        generated = time.perf_counter() - t0
        t0 = time.perf_counter()
        store.rebuild_report_tables()  # the audit went in by bulk insert, not write_audit
        derived = time.perf_counter() - t0
        with store.engine.begin() as conn:  # planner statistics, as a live store has them
            conn.exec_driver_sql("ANALYZE")
        figures = time_report(store, args.repeat, args.old)
    finally:
        store.dispose()
    return {"audit_rows": audit_rows, "event_rows": event_rows, "generate_s": round(generated, 1),
            "backfill_s": round(derived, 1),
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--leads", type=int, default=100_000)
    p.add_argument("--rows", type=int, default=2_000_000, help="audit rows, about (default 2,000,000)")
    p.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    p.add_argument("--repeat", type=int, default=3, help="report runs per store; the best is shown (default 3)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-old", dest="old", action="store_false",
                   help="skip the previous path (all entries into Python), timed once for the ratio")
    args = p.parse_args(argv)
    results = {}
    if args.db in ("sqlite", "both"):
        tmp = Path(tempfile.mkdtemp(prefix="leadflow-bench-report-"))
        try:
            print("sqlite: generating ...", file=sys.stderr)
            results["sqlite"] = run(f"sqlite:///{tmp / 'audit.db'}", args)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.db in ("postgresql", "both"):
        with postgres() as url:
            print("postgresql: generating ...", file=sys.stderr)
            results["postgresql"] = run(url, args)
    print(f"\nfunnel report on {args.leads} leads (seconds; report: best of {args.repeat}):")
    names = ["audit_rows", "event_rows", "generate_s", "backfill_s", "leads", "stages", "opportunities", "presales",
             "slas", "total", "entry_point"]
    if args.old:
        names += ["entries_read", "old_read_entries", "old_read_touches", "old_compute", "old_total", "speedup"]
    print(f"  {'':22}" + "".join(f"{db:>14}" for db in results))
    for name in names:
        print(f"  {name:22}" + "".join(f"{results[db][name]:>14}" for db in results))
    for db in results:
        print(f"  {db}: report in {results[db]['total']:.3f} s, "
              f"{'within' if results[db]['total'] < 2 else 'over'} the 2 s goal")
    print(json.dumps({"leads": args.leads, **results}))
    return results


if __name__ == "__main__":
    main()
