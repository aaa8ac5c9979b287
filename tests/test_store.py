"""The audit store and outbox, against SQLite and a real, throwaway PostgreSQL.

The PostgreSQL cluster is started once per session from the local binaries
(Debian: `apt-get install -y postgresql`; scripts/test installs them when run as root).
Without them the postgresql tests fail with instructions: the store runs on PostgreSQL in
production, so its tests always run there too.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from activities.store import AuditStore, ModelConflict
from funnel.models import ActivityEvent, AuditEntry, AuditKind, Outbound, OutboundKind, Role, Stage, Trigger

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)
CEST = timezone(timedelta(hours=2))


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class PostgresServer:
    port: int
    user: str = "postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database, so each test starts from nothing."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _postgres_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl: on PATH, or Debian's versioned directory."""
    found = shutil.which("initdb")
    if found and (Path(found).resolve().parent / "pg_ctl").exists():
        return Path(found).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: drop to the `postgres` user then."""
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.fail("running as root but `runuser` is missing; cannot start PostgreSQL as a non-root user")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root and there is no `postgres` user to run the test PostgreSQL as")
    return [runuser, "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="session")
def postgres_server():
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        pytest.fail(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin. "
            "Install them (Debian/Ubuntu: apt-get update && apt-get install -y postgresql); "
            "scripts/test does when run as root."
        )
    base = Path(tempfile.mkdtemp(prefix="leadflow-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base, user="postgres")
    data, log = base / "data", base / "server.log"
    port = _free_port()
    options = (
        f"-p {port} -c listen_addresses=127.0.0.1 -k {base} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
    )

    def run(*cmd: str) -> None:
        done = subprocess.run(_as_postgres_user(list(cmd)), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{server_log}")

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
        yield PostgresServer(port=port)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                _as_postgres_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/audit.db"
    else:
        url = request.getfixturevalue("postgres_server").new_database()
    audit_store = AuditStore(url)
    yield audit_store
    audit_store.dispose()


def entry(lead_id: str, seq: int, kind: AuditKind = AuditKind.SCORE_CHANGED, **fields) -> AuditEntry:
    values = dict(
        lead_id=lead_id,
        seq=seq,
        at=T0 + timedelta(minutes=seq),
        kind=kind,
        actor="leadflow",
        role=Role.SYSTEM,
        detail=f"entry {seq} of {lead_id}",
    )
    values.update(fields)
    return AuditEntry(**values)


def message(message_id: str, kind: OutboundKind = OutboundKind.HANDOVER, **payload) -> Outbound:
    lead_id = message_id.split("/")[0]
    return Outbound(message_id=message_id, lead_id=lead_id, kind=kind, at=T0, payload=payload)


def seqs(entries: list[AuditEntry]) -> list[int]:
    return [e.seq for e in entries]


# --------------------------------------------------------------------------- audit


def test_write_audit_is_idempotent(store):
    batch = [entry("lead-a", s) for s in range(1, 6)] + [entry("lead-b", s) for s in range(1, 4)]

    assert store.write_audit(batch) == 8
    assert store.write_audit(batch) == 0

    assert seqs(store.history("lead-a")) == [1, 2, 3, 4, 5]
    assert seqs(store.history("lead-b")) == [1, 2, 3]
    assert store.count_history("lead-a") == 5
    assert store.count_history("lead-b") == 3


def test_write_audit_counts_only_new_entries_of_an_overlapping_batch(store):
    assert store.write_audit([entry("lead-a", s) for s in (1, 2, 3)]) == 3
    assert store.write_audit([entry("lead-a", s) for s in (2, 3, 4, 5)]) == 2
    assert seqs(store.history("lead-a")) == [1, 2, 3, 4, 5]


def test_write_audit_with_a_duplicate_inside_one_batch(store):
    assert store.write_audit([entry("lead-a", 1), entry("lead-a", 2), entry("lead-a", 1)]) == 2
    assert seqs(store.history("lead-a")) == [1, 2]


def test_write_audit_keeps_the_first_version_of_an_entry(store):
    store.write_audit([entry("lead-a", 1, detail="first")])
    store.write_audit([entry("lead-a", 1, detail="retried with other text")])
    assert [e.detail for e in store.history("lead-a")] == ["first"]


def test_write_audit_of_nothing(store):
    assert store.write_audit([]) == 0
    assert store.count_history("lead-a") == 0


def test_write_audit_large_batch_in_one_call(store):
    batch = [entry("lead-big", s) for s in range(1, 1301)]  # more than one INSERT chunk
    assert store.write_audit(batch) == 1300
    assert store.write_audit(batch) == 0
    assert store.count_history("lead-big") == 1300


def test_history_is_ordered_by_seq_and_paginated(store):
    shuffled = [entry("lead-a", s) for s in range(1, 26)]
    random.Random(7).shuffle(shuffled)
    store.write_audit(shuffled + [entry("lead-other", s) for s in range(1, 4)])

    assert seqs(store.history("lead-a")) == list(range(1, 26))
    assert seqs(store.history("lead-a", offset=0, limit=10)) == list(range(1, 11))
    assert seqs(store.history("lead-a", offset=10, limit=10)) == list(range(11, 21))
    assert seqs(store.history("lead-a", offset=20, limit=10)) == list(range(21, 26))
    assert store.history("lead-a", offset=30) == []
    assert store.history("nobody") == []
    assert store.count_history("lead-a") == 25
    assert store.count_history("nobody") == 0


def test_every_field_round_trips(store):
    full = AuditEntry(
        lead_id="lead-a",
        seq=7,
        at=datetime(2026, 3, 1, 11, 30, 15, 123456, tzinfo=CEST),
        kind=AuditKind.STAGE_CHANGED,
        actor="Ana Presales",
        role=Role.PRESALES,
        detail="mql -> sal (accept) — über 100 points",
        channel="webinar",
        event_id="evt-19",
        rule="webinar_attended",
        points=50.5,
        score_total=120.25,
        score_fit=40.0,
        score_engagement=80.25,
        model_ref="default@3",
        from_stage=Stage.MQL,
        to_stage=Stage.SAL,
        trigger=Trigger.ACCEPT,
        reason="budget_confirmed",
        occurred_at=datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc),
        owner="ana",
    )
    bare = entry("lead-a", 8)
    store.write_audit([full, bare])

    assert store.history("lead-a") == [full, bare]


def test_datetimes_come_back_aware_utc(store):
    local = datetime(2026, 3, 1, 11, 0, tzinfo=CEST)
    store.write_audit([entry("lead-a", 1, at=local)])
    store.add_outbox(Outbound(message_id="lead-a/handover/1", lead_id="lead-a", kind=OutboundKind.HANDOVER, at=local))

    (got,) = store.history("lead-a")
    assert got.at.tzinfo is not None and got.at.utcoffset() == timedelta(0)
    assert got.at == local  # the same instant
    assert got.at.hour == 9  # expressed in UTC

    (pending,) = store.pending_outbox()
    assert pending.at.utcoffset() == timedelta(0)
    assert pending.at == local


def test_naive_datetimes_are_refused(store):
    with pytest.raises(Exception, match="naive datetime"):
        store.write_audit([entry("lead-a", 1, at=datetime(2026, 3, 1, 9, 0))])
    assert store.count_history("lead-a") == 0


def test_stage_changes_for_funnel_reports(store):
    store.write_audit(
        [
            entry("lead-b", 1, AuditKind.LEAD_CREATED, to_stage=Stage.IQL),
            entry("lead-b", 2, AuditKind.SCORE_CHANGED),
            entry("lead-b", 3, AuditKind.STAGE_CHANGED, from_stage=Stage.IQL, to_stage=Stage.MQL),
            entry("lead-a", 1, AuditKind.LEAD_CREATED, to_stage=Stage.IQL),
            entry("lead-a", 2, AuditKind.OWNER_ASSIGNED),
            entry("lead-a", 30, AuditKind.STAGE_CHANGED, from_stage=Stage.IQL, to_stage=Stage.MQL),
            entry("lead-a", 4, AuditKind.STAGE_CHANGED, from_stage=Stage.MQL, to_stage=Stage.IQL),
        ]
    )

    changes = store.stage_changes()
    assert [(e.lead_id, e.seq) for e in changes] == [
        ("lead-a", 1),
        ("lead-a", 4),
        ("lead-a", 30),
        ("lead-b", 1),
        ("lead-b", 3),
    ]
    assert {e.kind for e in changes} == {AuditKind.LEAD_CREATED, AuditKind.STAGE_CHANGED}

    # `at` is T0 + seq minutes; `since` is inclusive.
    assert [(e.lead_id, e.seq) for e in store.stage_changes(since=T0 + timedelta(minutes=3))] == [
        ("lead-a", 4),
        ("lead-a", 30),
        ("lead-b", 3),
    ]
    assert store.stage_changes(since=T0 + timedelta(days=1)) == []
    # Reports read owners, contacts and SLAs too; never score changes (most of the rows).
    assert [(e.lead_id, e.seq) for e in store.report_entries()] == [
        ("lead-a", 1), ("lead-a", 2), ("lead-a", 4), ("lead-a", 30), ("lead-b", 1), ("lead-b", 3)]


def test_lead_touches_come_from_the_event_log_whatever_arrived_first(store):
    """The first touch is the earliest event by time, also when it arrived late or after a
    profile update created the lead; the last campaign before MQL stops at the first MQL."""
    def event(lead_id, event_id, hours, channel=None, campaign=None):
        return ActivityEvent(event_id=event_id, lead_id=lead_id, type="website_visit",
                             occurred_at=T0 + timedelta(hours=hours), channel=channel, campaign=campaign)

    store.write_audit([entry("P-1", 1, AuditKind.LEAD_CREATED, to_stage=Stage.IQL),  # by a profile update
                       entry("P-1", 2, AuditKind.STAGE_CHANGED, from_stage=Stage.IQL, to_stage=Stage.MQL,
                             occurred_at=T0 + timedelta(hours=5))])
    store.log_events([event("P-1", "p-3", 3, "web", "spring"), event("P-1", "p-9", 9, "email", "autumn")], T0)
    store.log_events([event("P-1", "p-1", 1, None, "intro"), event("P-1", "p-2", 2, "paid_search")], T0)  # late
    store.log_events([event("Q-1", "q-1", 1)], T0)  # no channel, no campaign
    touches = store.lead_touches()
    assert touches["P-1"].model_dump() == {"channel": "paid_search", "campaign": "intro",
                                           "last_campaign_before_mql": "spring"}
    assert "Q-1" not in touches


def test_concurrent_overlapping_writes_store_each_entry_once(store):
    leads = [f"lead-{n}" for n in range(4)]
    universe = [entry(lead, s) for lead in leads for s in range(1, 151)]  # 600 distinct entries
    threads_count = 8
    results: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads_count)
    lock = threading.Lock()

    def writer(n: int) -> None:
        rng = random.Random(n)
        try:
            start.wait()
            for _ in range(6):
                # Overlapping windows plus a retry of the same batch.
                first = rng.randrange(0, len(universe) - 150)
                batch = universe[first : first + rng.randrange(50, 150)]
                rng.shuffle(batch)
                written = store.write_audit(batch) + store.write_audit(batch)
                with lock:
                    results.append(written)
            written = store.write_audit(universe)  # everyone ends with the whole set
            with lock:
                results.append(written)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(threads_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    assert not errors, errors
    assert sum(results) == len(universe)  # every entry counted as new exactly once
    for lead in leads:
        assert store.count_history(lead) == 150
        assert seqs(store.history(lead, limit=1000)) == list(range(1, 151))


# --------------------------------------------------------------------------- owners


def test_round_robin_cycles_through_the_team_and_is_stable_per_assignment(store):
    team = ["ana", "ben", "cy"]
    owners = [store.assign_owner(f"lead-{n}/handover/1", team) for n in range(7)]
    assert owners == ["ana", "ben", "cy", "ana", "ben", "cy", "ana"]

    # A retry gets the same owner and does not use up a turn.
    assert store.assign_owner("lead-0/handover/1", team) == "ana"
    assert store.assign_owner("lead-1/handover/1", team) == "ben"
    assert store.assign_owner("lead-7/handover/1", team) == "ben"
    # ... even if the team changed meanwhile.
    assert store.assign_owner("lead-2/handover/1", ["zoe"]) == "cy"
    assert store.owner_of("lead-2/handover/1") == "cy"
    assert store.owner_of("never-assigned") is None


def test_round_robin_counters_are_per_team(store):
    assert store.assign_owner("x1", ["ana", "ben"], team_name="presales") == "ana"
    assert store.assign_owner("y1", ["sam", "tom"], team_name="sales") == "sam"
    assert store.assign_owner("x2", ["ana", "ben"], team_name="presales") == "ben"
    assert store.assign_owner("y2", ["sam", "tom"], team_name="sales") == "tom"


def test_round_robin_needs_a_team(store):
    with pytest.raises(ValueError, match="no members"):
        store.assign_owner("lead-a/handover/1", [])
    assert store.owner_of("lead-a/handover/1") is None


def test_concurrent_assignments_take_distinct_turns(store):
    team = ["ana", "ben", "cy"]
    ids = [f"lead-{n}/handover/1" for n in range(60)]
    seen: dict[str, set[str]] = {i: set() for i in ids}
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        rng = random.Random(n)
        mine = ids[:]
        rng.shuffle(mine)
        try:
            start.wait()
            for assignment_id in mine[:40]:
                owner = store.assign_owner(assignment_id, team)
                with lock:
                    seen[assignment_id].add(owner)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    assert not errors, errors
    assigned = {i: owners for i, owners in seen.items() if owners}
    assert all(len(owners) == 1 for owners in assigned.values())  # one owner per assignment, ever
    assert all(store.owner_of(i) == next(iter(o)) for i, o in assigned.items())
    # Each new assignment took exactly one turn, so the load is perfectly balanced.
    load = Counter(next(iter(o)) for o in assigned.values())
    assert max(load.values()) - min(load.values()) <= 1
    assert sum(load.values()) == len(assigned)
    assert store.assign_owner("one-more", team) == team[len(assigned) % 3]


# --------------------------------------------------------------------------- outbox


def test_outbox_add_is_idempotent_and_pending_is_oldest_first(store):
    assert store.add_outbox(message("lead-c/handover/1", owner=None, score=120.5, hot=True)) is True
    assert store.add_outbox(message("lead-b/nurture_step/2", OutboundKind.NURTURE_STEP, step="welcome")) is True
    assert store.add_outbox(message("lead-a/handover/1")) is True
    assert store.add_outbox(message("lead-c/handover/1", owner="someone-else")) is False

    pending = store.pending_outbox()
    assert [m.message_id for m in pending] == ["lead-c/handover/1", "lead-b/nurture_step/2", "lead-a/handover/1"]
    assert pending[0].payload == {"owner": None, "score": 120.5, "hot": True}  # the first version wins
    assert pending[0].kind is OutboundKind.HANDOVER and pending[0].lead_id == "lead-c"

    assert [m.message_id for m in store.pending_outbox(OutboundKind.HANDOVER)] == [
        "lead-c/handover/1",
        "lead-a/handover/1",
    ]
    assert [m.message_id for m in store.pending_outbox(limit=1)] == ["lead-c/handover/1"]
    assert store.pending_outbox(OutboundKind.ESCALATION) == []


def test_outbox_ack(store):
    for n in range(1, 5):
        store.add_outbox(message(f"lead-{n}/handover/1"))

    assert store.ack_outbox(["lead-1/handover/1", "lead-3/handover/1", "unknown/handover/9"]) == 2
    assert store.ack_outbox(["lead-1/handover/1"]) == 0
    assert store.ack_outbox([]) == 0
    assert [m.message_id for m in store.pending_outbox()] == ["lead-2/handover/1", "lead-4/handover/1"]
    assert store.add_outbox(message("lead-1/handover/1")) is False  # acked messages are not re-queued


def test_outbox_delivery_mark(store):
    store.add_outbox(message("lead-a/handover/1"))
    assert store.is_delivered("lead-a/handover/1") is False
    store.mark_delivered("lead-a/handover/1")
    assert store.is_delivered("lead-a/handover/1") is True
    assert store.is_delivered("unknown/handover/1") is False
    # Delivered to the webhook is not acknowledged: pollers still see it until they ack.
    assert [m.message_id for m in store.pending_outbox()] == ["lead-a/handover/1"]


def test_ping(store):
    store.ping()


# --------------------------------------------------------------------------- configuration


def test_sqlite_creates_the_directory_and_uses_wal(tmp_path):
    path = tmp_path / "nested" / "dir" / "leadflow.db"
    audit_store = AuditStore(f"sqlite:///{path}")
    try:
        assert path.exists()
        with audit_store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    finally:
        audit_store.dispose()


def test_sqlite_data_survives_a_new_store(tmp_path):
    url = f"sqlite:///{tmp_path}/leadflow.db"
    first = AuditStore(url)
    first.write_audit([entry("lead-a", 1)])
    first.dispose()
    second = AuditStore(url)
    try:
        assert seqs(second.history("lead-a")) == [1]
        assert second.write_audit([entry("lead-a", 1)]) == 0
    finally:
        second.dispose()


def test_unreachable_postgres_raises():
    with pytest.raises(Exception) as caught:
        AuditStore(f"postgresql+psycopg://postgres@127.0.0.1:{_free_port()}/leadflow?connect_timeout=3")
    assert "connection" in str(caught.value).lower()


def test_unsupported_database_is_refused():
    with pytest.raises(ValueError, match="unsupported database"):
        AuditStore("mysql://localhost/leadflow")


# --------------------------------------------------------------------------- schema changes and models


def test_a_store_made_by_older_code_gets_the_new_columns(tmp_path):
    """A database created before audit entries had `occurred_at` keeps working: the column
    is added on start, old rows read back without it, new rows keep it."""
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE audit_entry (entry_id VARCHAR NOT NULL PRIMARY KEY, lead_id VARCHAR NOT NULL, seq INTEGER NOT NULL,"
            " at DATETIME NOT NULL, kind VARCHAR NOT NULL, actor VARCHAR NOT NULL, role VARCHAR NOT NULL, detail TEXT NOT NULL,"
            " channel VARCHAR, event_id VARCHAR, rule VARCHAR, points FLOAT, score_total FLOAT, score_fit FLOAT,"
            " score_engagement FLOAT, model_ref VARCHAR, from_stage VARCHAR, to_stage VARCHAR, trigger VARCHAR, reason TEXT)"
        )
        db.execute("INSERT INTO audit_entry (entry_id, lead_id, seq, at, kind, actor, role, detail) VALUES"
                   " ('old/1', 'old', 1, '2026-03-01 09:00:00.000000', 'lead_created', 'leadflow', 'system', 'created')")
    store = AuditStore(f"sqlite:///{path}")
    store.write_audit([entry("old", 2, occurred_at=T0 - timedelta(hours=1), owner="ana")])
    first, second = store.history("old")
    assert first.occurred_at is None and first.happened_at == first.at and first.owner is None
    assert second.occurred_at == T0 - timedelta(hours=1) and second.owner == "ana"
    AuditStore(f"sqlite:///{path}").dispose()  # starting again finds the column there


def test_model_versions_are_recorded_once_and_one_is_active(store):
    first = store.record_model("default@1", "name = 'default'\n", applied_by="mona")
    assert (first.ref, first.active, first.applied_by) == ("default@1", True, "mona")
    assert len(first.sha256) == 64
    store.record_model("default@2", "name = 'default' # v2\n", applied_by="mona")
    assert store.active_model().ref == "default@2"
    again = store.record_model("default@1", "name = 'default'\n", applied_by="someone else")
    assert again.applied_by == "mona" and store.active_model().ref == "default@1"  # rollback, same record
    with pytest.raises(ModelConflict, match="give the changed model a new version"):
        store.record_model("default@1", "name = 'default' # edited\n", applied_by="mona")
    assert [m.ref for m in store.model_versions()] == ["default@1", "default@2"]
    assert [m.active for m in store.model_versions()] == [True, False]
    assert store.model_version("nope@1") is None


def test_a_lead_touch_is_the_earliest_event_whatever_the_order_and_batches_of_logging(tmp_path):
    """Property: however the same events are split into batches and ordered, the kept first
    touch is the channel (and campaign) of the earliest event by (time, id) that has one."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    event = st.tuples(st.integers(0, 5), st.sampled_from([None, "web", "email", "partner"]),
                      st.sampled_from([None, "spring", "summit"]))

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(event, min_size=1, max_size=12), st.randoms(use_true_random=False))
    def check(items, rnd):
        store = AuditStore(f"sqlite:///{tmp_path}/touch-{uuid.uuid4().hex}.db")
        try:
            events = [ActivityEvent(event_id=f"e-{i:02d}", lead_id="T-1", type="website_visit",
                                    occurred_at=T0 + timedelta(hours=hours), channel=channel, campaign=campaign)
                      for i, (hours, channel, campaign) in enumerate(items)]
            shuffled = rnd.sample(events, len(events))
            while shuffled:
                cut = rnd.randint(1, len(shuffled))
                store.log_events(shuffled[:cut], T0)
                shuffled = shuffled[cut:]
            store.log_events(events[:1], T0)  # a redelivery changes nothing

            def first(what):
                having = sorted((e.occurred_at, e.event_id, getattr(e, what)) for e in events if getattr(e, what))
                return having[0][2] if having else None

            touch = store.lead_touches().get("T-1")
            assert (touch.channel if touch else None, touch.campaign if touch else None) == \
                (first("channel"), first("campaign"))
        finally:
            store.dispose()

    check()


def test_a_store_from_before_lead_touches_derives_them_from_its_event_log(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    store = AuditStore(url)
    store.log_events([ActivityEvent(event_id="b", lead_id="U-1", type="website_visit", occurred_at=T0 + timedelta(hours=2),
                                    channel="email", campaign="autumn"),
                      ActivityEvent(event_id="a", lead_id="U-1", type="website_visit", occurred_at=T0,
                                    channel="partner")], T0)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM lead_touch")  # as older code left it: no touches kept
    store.dispose()
    again = AuditStore(url)
    try:
        assert again.lead_touches()["U-1"].model_dump() == {"channel": "partner", "campaign": "autumn",
                                                             "last_campaign_before_mql": None}
    finally:
        again.dispose()


def test_a_leads_write_logs_the_input_it_took_with_its_entries_once(store):
    """Version 8 leads hand the input they took to their audit write: it reaches the event
    log in the same transaction, once per id, and an edge that logged it first keeps its
    version (and time)."""
    from funnel.models import ProfileUpdate, TakenInput

    edge = ActivityEvent(event_id="t-1", lead_id="TK-1", type="website_visit", occurred_at=T0, channel="web")
    store.log_events([edge], T0 + timedelta(seconds=1))
    late = ActivityEvent(event_id="t-2", lead_id="TK-1", type="webinar_attended", occurred_at=T0 + timedelta(hours=1),
                         channel="email", campaign="summit", attributes={"webinar": "w-9"})
    facts = ProfileUpdate(update_id="f-1", lead_id="TK-1", facts={"title": "CEO"})
    taken = [TakenInput(received_at=T0 + timedelta(seconds=5), items=[edge, late]),
             TakenInput(received_at=T0 + timedelta(seconds=9), items=[facts])]
    assert store.write_audit([entry("TK-1", 1)], taken) == 1
    assert store.write_audit([entry("TK-1", 1)], taken) == 0  # a retried write logs nothing twice
    assert store.write_audit([], taken) == 0  # taken input alone is a write too
    logged = store.event_log("TK-1")
    assert [(row.event_id, row.received_at, row.attributes) for row in logged] == [
        ("t-1", T0 + timedelta(seconds=1), {}), ("t-2", T0 + timedelta(seconds=5), {"webinar": "w-9"})]
    rows = list(store.replay_log("TK-1"))
    # the update (taken at T0 + 9 s, no time of its own) between the events, in time order
    assert [getattr(row, "update_id", None) or row.event_id for row in rows] == ["t-1", "f-1", "t-2"]
    assert store.lead_touches()["TK-1"].channel == "web"


# --------------------------------------------------------------------------- lead key changes


def test_lead_key_changes_are_logged_in_order_and_read_from_a_position(store):
    """What processes caching lead keys read to learn which changed (payload_codec.LeadKeys):
    rotations and destructions, not a lead's first key nor a re-wrap, each once, in order,
    also when several processes change keys at once."""
    from payload_codec import LeadKeyRecord

    start, nothing = store.lead_key_changes(None)
    assert (start, nothing) == (0, [])
    assert store.add_lead_key(LeadKeyRecord("L-1", 1, "k1", b"w1"))  # a first key: nothing to forget
    assert store.add_lead_key(LeadKeyRecord("L-2", 1, "k1", b"w2"))
    assert store.lead_key_changes(start) == (start, [])
    assert store.add_lead_key(LeadKeyRecord("L-1", 2, "k1", b"w3", erasure_id="e1"))  # rotated
    assert not store.add_lead_key(LeadKeyRecord("L-1", 2, "k1", b"w4", erasure_id="e1"))  # a retry: no change
    assert store.destroy_lead_keys("L-1", below=2) == 1
    assert store.destroy_lead_keys("L-1", below=2) == 0  # nothing left to destroy: no change
    record = store.lead_key("L-2", 1)
    assert store.rewrap_lead_key(record, "k2", b"w5") == 1  # the same key, wrapped anew: no change
    seen, changed = store.lead_key_changes(start)
    assert changed == ["L-1", "L-1"] and seen > start
    assert store.lead_key_changes(seen) == (seen, [])
    assert store.lead_key_changes(None) == (seen, [])

    def rotate(n: int) -> None:
        lead = f"M-{n}"
        store.add_lead_key(LeadKeyRecord(lead, 1, "k1", b"w"))
        store.add_lead_key(LeadKeyRecord(lead, 2, "k1", b"w", erasure_id=lead))
        store.destroy_lead_keys(lead, below=2)

    threads = [threading.Thread(target=rotate, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    last, changed = store.lead_key_changes(seen)
    assert Counter(changed) == {f"M-{n}": 2 for n in range(8)}
    assert store.lead_key_changes(last) == (last, [])


def test_a_lead_key_change_waits_for_an_earlier_one_to_commit_on_postgresql(postgres_server):
    """A reader that has seen change n must have seen every change below n: otherwise a change
    whose transaction commits late is never read, and a destroyed key stays usable in memory."""
    from sqlalchemy import insert, text

    from activities.store import LEAD_KEY_CHANGE_LOCK, LeadKeyChangeRow
    from payload_codec import LeadKeyRecord

    store = AuditStore(postgres_server.new_database())
    try:
        seen, _ = store.lead_key_changes(None)
        store.add_lead_key(LeadKeyRecord("L-late", 1, "k1", b"w"))
        with store.engine.connect() as slow:  # another writer's change, drawn first, committed late
            slow.begin()
            slow.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LEAD_KEY_CHANGE_LOCK})
            slow.execute(insert(LeadKeyChangeRow.__table__).values(lead_id="L-slow", changed_at=datetime.now(timezone.utc)))
            rotating = threading.Thread(target=store.add_lead_key,
                                        args=(LeadKeyRecord("L-late", 2, "k1", b"w", erasure_id="e"),))
            rotating.start()
            rotating.join(0.5)
            assert rotating.is_alive()  # waits: it would otherwise commit a higher number first
            assert store.lead_key_changes(seen) == (seen, [])
            slow.commit()
        rotating.join(10)
        assert store.lead_key_changes(seen)[1] == ["L-slow", "L-late"]
    finally:
        store.dispose()


# --------------------------------------------------------------------------- lead keys


def test_lead_keys_first_writer_wins_and_only_a_rotation_is_logged_as_a_change(store):
    from payload_codec import LeadKeyRecord

    first = LeadKeyRecord("lead-k", 1, "k1", b"wrapped-1")
    assert store.lead_keys("lead-k") == [] and store.lead_key("lead-k", 1) is None
    mark, _ = store.lead_key_changes(None)

    assert store.add_lead_key(first) is True
    assert store.add_lead_key(LeadKeyRecord("lead-k", 1, "k1", b"someone else's")) is False
    assert store.lead_key("lead-k", 1) == first
    assert store.lead_key_changes(mark)[1] == []  # a new lead's key changes no one's cache

    rotated = LeadKeyRecord("lead-k", 2, "k2", b"wrapped-2", erasure_id="erasure-1")
    assert store.add_lead_key(rotated) is True
    assert store.lead_keys("lead-k") == [first, rotated]
    assert store.lead_key_changes(mark)[1] == ["lead-k"]
    assert store.lead_key("lead-k", 3) is None and store.lead_keys("lead-other") == []
