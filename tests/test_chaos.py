"""Chaos: leads hold under faults (issue "Hold under faults and load", section 3).

One run of the whole system as it is deployed, each part a process of its own that the
test breaks while events are coming in:

- a Temporal dev server persisted to a SQLite file, SIGKILLed and started again on the
  same port and file;
- a throwaway PostgreSQL as the audit store (started like tests/test_store.py's), stopped
  with `pg_ctl -m immediate` (a crash: no checkpoint, connections cut) while most
  handovers are being made, and started again;
- the real worker (`python worker.py`), SIGKILLed and started again, once while Temporal
  is down and once while the store is down (it must wait for them, worker.py
  `_when_reachable`);
- a webhook receiver in this process that answers 503 while "down", and then "loses
  answers" (takes the POST, then drops the connection without answering, so the sender
  cannot know it arrived and must send it again), each until it has hit a few handovers.

30 leads get a fixed, seeded set of 15 events each (timestamps in the last two hours, some
sent out of time order, one id per lead sent twice on purpose), one event per call as
webhooks arrive, through `client.send_events` with four concurrent senders. A send that
failed (Temporal down) may or may not have been taken: it is sent again with the same
event id, and the lead de-duplicates. Ten leads raise their hand (demo request), ten
collect more than 100 points, ten stay below 100 whatever arrives (only capped low-value
types, and one negative event each).

When every fault has healed, the test waits until every lead has applied all its events
and taken its decisions, has every lead flush its audit, and asserts:

- score (total, fit, engagement, breakdown) and stage equal a fault-free run's. The
  fault-free run is the pure core (`funnel.lead.Lead`) fed the same events in one call:
  it is what the workflow wraps, with no Temporal, store or clock, and its result does
  not depend on the order, batching or redelivery of events (README "Event time is the
  truth", proved by tests/test_event_time_properties.py). A second pass through the same
  worker would share any bug of the shell it is meant to check, and double the run. Stage
  is deterministic by construction: the hand-raisers and scorers get positive events only
  (the score only grows, so once over 100 it stays there), the others cannot reach 100
  even with all their positive events; decisions wait LEADFLOW_DECISION_DELAY=1 s, and no
  timer of the model (hours, days) comes due during the run;
- every event applied exactly once: `events_applied` is the number of distinct events,
  each event id has exactly one SCORE_CHANGED entry in the store, the points of the
  lead's SCORE_CHANGED entries add up to its score, and each duplicate the lead counted
  has one DUPLICATE_IGNORED entry;
- the store holds each audit entry once: seqs 1..N without gap or duplicate, N being the
  last seq the lead says it wrote; one LEAD_CREATED, one stage change and one owner
  assignment per MQL;
- every handover delivered exactly once by Idempotency-Key: the handovers in the outbox
  are exactly the expected ones (one per MQL lead, naming the lead's owner), the receiver
  got each of them at least once, the keys it got are exactly the outbox's, and all POSTs
  of one key carry the same body.

It also checks that every fault bit (sends failed, the worker waited for Temporal and for
the store, the receiver refused and lost POSTs): a chaos run whose faults stopped landing
would prove nothing. A failure names the lead, its events, what the store holds for it and
the tails of the worker's and server's logs; the logs stay in the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from sqlalchemy.exc import SQLAlchemyError
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter
from temporalio.service import RPCError
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

import client as leads
from activities.store import AuditStore
from config import DEFAULT_MODEL, Settings, data_converter, dev_server_file_flags
from funnel.lead import Lead
from funnel.models import ActivityEvent, AuditKind, OutboundKind, Stage
from funnel.scoring_model import load_model
from tests.conftest import Receiver, binary
from tests.test_store import _as_postgres_user, _free_port, _postgres_bin_dir
from workflows import search_attributes as sa
from workflows.lead import LeadWorkflow, workflow_id

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parent.parent
LEADS = 30
EVENTS_PER_LEAD = 15
SEND_SECONDS = 45.0  # the sends are spread over this long; the faults happen meanwhile
SENDERS = 4
DECISION_DELAY = 1.0
AUDIT_MAX_LAG = 2.0
SEND_TIMEOUT = 4.0  # s a caller waits for one send_events call (its own retries included); then it sends again
# Leads continue-as-new after this many history events (a lead with 15 events makes ~100):
# each goes through a couple of runs during the faults, carrying what it has not applied
# yet and the deliveries still retrying.
MAX_HISTORY_EVENTS = 50
SETTLE_SECONDS = 150.0  # after the faults: for leads to catch up and handovers to arrive


# --------------------------------------------------------------------------- the event set


MILD = ["website_visit", "pricing_page_visit", "email_open", "email_click", "content_download",
        "social_interaction", "video_view", "webinar_registration"]
STRONG = ["webinar_attended", "live_chat", "content_download", "pricing_page_visit", "email_click"]
# Capped low-value types: all of them together are worth at most 30 + 20 + 15 = 65 points.
LOW = ["website_visit", "email_open", "social_interaction", "video_view"]
NEGATIVE = ["unsubscribe", "email_bounced"]


@dataclass
class LeadPlan:
    lead_id: str
    group: str  # "hand-raiser", "scorer", "below"
    events: list[ActivityEvent]  # distinct, in time order
    sends: list[ActivityEvent]  # in the order they are sent, one id twice


def plan_leads(t0: datetime) -> list[LeadPlan]:
    """The fixed event set: the same leads, types, times (relative to t0) and send order
    every run (seeded)."""
    plans = []
    for n in range(LEADS):
        rng = random.Random(1000 + n)
        lead_id = f"C-{n:02d}"
        group = ("hand-raiser", "scorer", "below")[n % 3]
        if group == "hand-raiser":
            kinds = [rng.choice(MILD) for _ in range(EVENTS_PER_LEAD - 1)] + ["demo_request"]
        elif group == "scorer":
            kinds = ["webinar_attended", "live_chat"] + [rng.choice(STRONG + MILD) for _ in range(EVENTS_PER_LEAD - 2)]
        else:
            kinds = [rng.choice(LOW) for _ in range(EVENTS_PER_LEAD - 1)] + [rng.choice(NEGATIVE)]
        rng.shuffle(kinds)
        minutes = sorted(rng.sample(range(1, 110), EVENTS_PER_LEAD))
        events = [
            ActivityEvent(event_id=f"{lead_id}-e{i:02d}", lead_id=lead_id, type=kind,
                          occurred_at=t0 + timedelta(minutes=m, seconds=rng.randrange(60)),
                          channel=rng.choice(["website", "email", "webinar", "social"]))
            for i, (kind, m) in enumerate(zip(kinds, minutes))
        ]
        # Mostly in time order, some late: swap a few neighbours; then one redelivery.
        sends = list(events)
        for _ in range(3):
            i = rng.randrange(len(sends) - 1)
            sends[i], sends[i + 1] = sends[i + 1], sends[i]
        if group == "hand-raiser":  # early: their handovers meet the webhook outage
            hand = next(e for e in sends if e.type == "demo_request")
            sends.remove(hand)
            sends.insert(rng.randrange(1, 4), hand)
        sends.insert(rng.randrange(len(sends) // 2, len(sends) + 1), sends[rng.randrange(len(sends) // 2)])
        plans.append(LeadPlan(lead_id, group, events, sends))
    return plans


def send_order(plans: list[LeadPlan]) -> list[ActivityEvent]:
    """Round robin over the leads: the first 30 sends create every lead (before any fault:
    a lead started while the store is down waits a minute for its model)."""
    order = []
    for i in range(max(len(p.sends) for p in plans)):
        order += [p.sends[i] for p in plans if i < len(p.sends)]
    return order


@dataclass
class Expected:
    score: dict
    stage: Stage
    handovers: int


def fault_free(plan: LeadPlan, now: datetime) -> Expected:
    """The pure core, all events at once, then past the decision delay."""
    lead = Lead.create(plan.lead_id, load_model(DEFAULT_MODEL), now,
                       decision_delay=timedelta(seconds=DECISION_DELAY))
    lead.ingest_many(plan.events, now)
    lead.tick(now + timedelta(seconds=2 * DECISION_DELAY))
    handovers = lead.state.outbound_seq.get(OutboundKind.HANDOVER.value, 0)
    return Expected(score=lead.view().score, stage=lead.state.stage, handovers=handovers)


# --------------------------------------------------------------------------- the processes


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.lines: list[str] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def note(self, what: str) -> None:
        line = f"{self.now():6.1f}s  {what}"
        self.lines.append(line)
        print(line, flush=True)

    async def until(self, second: float) -> None:
        await asyncio.sleep(max(0.0, second - self.now()))


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            _kill(proc)


def _tail(path: Path, lines: int) -> str:
    """The last log lines, without traceback bodies (those are in the file)."""
    if not path.exists():
        return f"({path} does not exist)"
    kept = [line for line in path.read_text(errors="replace").splitlines() if line[:1].isdigit() or
            line.startswith(("---", "temporalio.exceptions", "Traceback"))]
    return "\n".join(line[:300] for line in kept[-lines:])


class DevServer:
    """`temporal server start-dev` on a SQLite file, as scripts/run starts it."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.db = directory / "temporal.db"
        self.log = directory / "temporal.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [binary("temporal"), "server", "start-dev", "--db-filename", str(self.db), "--ip", "127.0.0.1",
               "--port", str(self.port), "--headless", "--namespace", "default", "--log-level", "warn",
               *sa.dev_server_flags(), *dev_server_file_flags()]
        with self.log.open("ab") as out:
            out.write(f"--- started at {time.strftime('%X')}\n".encode())
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        _kill(self.proc)

    async def ready(self, converter: DataConverter = pydantic_data_converter, timeout: float = 60.0) -> Client:
        """A client once the server answers. A server that exits while starting is started
        again, twice at most: once in a full test run it exited 1 at once, writing nothing
        (not seen when the test ran alone); the faults this test injects come later."""
        deadline = time.monotonic() + timeout
        starts_left = 2
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                if starts_left == 0:
                    raise RuntimeError(f"the dev server exited ({self.proc.returncode}):\n{_tail(self.log, 30)}")
                starts_left -= 1
                with self.log.open("ab") as out:
                    out.write(f"--- exited ({self.proc.returncode}) while starting: started again\n".encode())
                self.start()
            try:
                client = await Client.connect(self.address, data_converter=converter)
                await client.count_workflows()  # the namespace and visibility answer
                return client
            except Exception:  # noqa: BLE001 - not up yet, whatever it says
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)


class Postgres:
    """A throwaway cluster from the local binaries (as tests/test_store.py starts one),
    with commits that survive a crash of the server (no synchronous_commit=off): the
    test crashes it on purpose and must not lose what it acknowledged."""

    def __init__(self) -> None:
        self.bin = _postgres_bin_dir()
        if self.bin is None:
            pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: install them "
                        "(Debian/Ubuntu: apt-get install -y postgresql); scripts/test does when root")
        self.base = Path(tempfile.mkdtemp(prefix="leadflow-chaos-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.base, user="postgres")
        self.data, self.log = self.base / "data", self.base / "server.log"
        self.port = _free_port()

    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/leadflow?connect_timeout=5"

    def _run(self, *cmd: str) -> None:
        done = subprocess.run(_as_postgres_user(list(cmd)), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n"
                               f"{_tail(self.log, 30)}")

    def init(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-sync")
        self.start()
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE leadflow")

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} "
                   "-c fsync=off -c full_page_writes=off -c max_connections=100")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "-t", "60", "start")

    def crash(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(_as_postgres_user([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                                              "-w", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)


class WorkerProcess:
    """`python worker.py`, as scripts/run starts it."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.env = env
        self.log = directory / "worker.log"
        self.proc: subprocess.Popen | None = None
        self.exited: list[str] = []  # a worker that ended by itself (it must wait instead)

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"--- started at {time.strftime('%X')}\n".encode())
            self.proc = subprocess.Popen([sys.executable, "worker.py"], cwd=ROOT, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def check(self, when: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self.exited.append(f"{when}: the worker had exited by itself ({self.proc.returncode})")

    def kill(self, when: str) -> None:
        self.check(when)
        _kill(self.proc)




# --------------------------------------------------------------------------- the test


@dataclass
class SendStats:
    sent: int = 0
    retries: int = 0
    errors: Counter = field(default_factory=Counter)


async def test_leads_hold_under_faults(tmp_path):
    timeline = Timeline()
    t0 = (datetime.now(timezone.utc) - timedelta(hours=2)).replace(microsecond=0)
    plans = plan_leads(t0)
    by_id = {p.lead_id: p for p in plans}
    order = send_order(plans)
    # The event set does what it is meant to (checked on the core before anything runs).
    expected = {p.lead_id: fault_free(p, datetime.now(timezone.utc)) for p in plans}
    for p in plans:
        want = Stage.IQL if p.group == "below" else Stage.MQL
        assert expected[p.lead_id].stage == want, f"event set: {p.lead_id} ({p.group}) ends {expected[p.lead_id]}"

    task_queue = "chaos"
    settings = Settings(task_queue=task_queue, decision_delay_seconds=DECISION_DELAY,
                        audit_max_lag_seconds=AUDIT_MAX_LAG, max_history_events=MAX_HISTORY_EVENTS)
    server = DevServer(tmp_path)
    postgres = Postgres()
    receiver = Receiver()
    worker: WorkerProcess | None = None
    store: AuditStore | None = None
    stats = SendStats()
    report: list[str] = []  # logs, printed if the test ends with an error (pytest shows them)

    def logs() -> str:
        return ("\n\ntimeline:\n" + "\n".join(timeline.lines)
                + (f"\n\nworker log (tail; whole file {worker.log}):\n{_tail(worker.log, 40)}" if worker else "")
                + f"\n\ndev server log (tail; {server.log}):\n{_tail(server.log, 15)}"
                + f"\n\nPostgreSQL log (tail):\n{_tail(postgres.log, 10)}")

    try:
        await asyncio.to_thread(postgres.init)
        server.start()
        # The client encrypts as the API does: lead keys in the store, so while PostgreSQL is
        # down a new lead cannot be sent (the API answers 503) and the sender tries again.
        client = await server.ready(data_converter(Settings(database_url=postgres.url())))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LEADFLOW_", "TEMPORAL_"))}
        # The tests' payload key (conftest.py), never a data/payload-keys.toml that only a
        # checkout where scripts/run ran has: without a key the worker refuses to start.
        env["LEADFLOW_PAYLOAD_KEYS"] = os.environ["LEADFLOW_PAYLOAD_KEYS"]
        env.update(TEMPORAL_ADDRESS=server.address, TEMPORAL_NAMESPACE="default", LEADFLOW_TASK_QUEUE=task_queue,
                   LEADFLOW_DATABASE_URL=postgres.url(), LEADFLOW_WEBHOOK_URL=receiver.url,
                   LEADFLOW_DECISION_DELAY=str(DECISION_DELAY), LEADFLOW_AUDIT_MAX_LAG=str(AUDIT_MAX_LAG),
                   PYTHONUNBUFFERED="1")
        worker = WorkerProcess(tmp_path, env)
        worker.start()
        timeline.note(f"up: dev server {server.address}, PostgreSQL :{postgres.port}, worker, receiver; "
                      f"{len(order)} sends to {LEADS} leads over {SEND_SECONDS:g} s")

        # ------------------------------------------------------------ sending, with faults
        start = timeline.now()
        next_send = iter(range(len(order)))

        async def send_one(event: ActivityEvent) -> None:
            while True:
                try:
                    await asyncio.wait_for(leads.send_events(client, settings, [event]), SEND_TIMEOUT)
                    stats.sent += 1
                    return
                except (leads.TemporalUnavailable, RPCError, TimeoutError, SQLAlchemyError) as err:
                    # It may have been taken or not: the same id again, the lead applies it once.
                    stats.retries += 1
                    stats.errors[type(err).__name__] += 1
                    if timeline.now() - start > SEND_SECONDS + SETTLE_SECONDS:
                        raise AssertionError(f"event {event.event_id} could not be sent: {err}") from err
                    await asyncio.sleep(0.5)

        async def sender() -> None:
            for i in next_send:
                await timeline.until(start + i * SEND_SECONDS / len(order))
                await send_one(order[i])

        async def faults() -> None:
            at = timeline.until

            await at(start + 5)
            worker.kill("before the first kill")
            timeline.note("SIGKILL worker (events queue up in Temporal)")
            await at(start + 7)
            worker.start()
            timeline.note("worker started")
            await at(start + 14)  # when most handovers are being made
            await asyncio.to_thread(postgres.crash)
            timeline.note("PostgreSQL stopped (-m immediate)")
            await at(start + 16)
            worker.kill("with the store down")
            timeline.note("SIGKILL worker")
            await at(start + 17)
            worker.start()
            timeline.note("worker started while the store is down")
            await at(start + 22)
            await asyncio.to_thread(postgres.start)
            timeline.note("PostgreSQL started again")
            await at(start + 25)
            server.kill()
            timeline.note("SIGKILL dev server (sends fail and are sent again)")
            await at(start + 26)
            worker.kill("with the dev server down")
            timeline.note("SIGKILL worker")
            await at(start + 27)
            worker.start()
            timeline.note("worker started while Temporal is down")
            await at(start + 33)
            server.start()
            await server.ready()
            timeline.note("dev server restarted on the same port and file, ready")
            await at(start + 44)
            server.kill()
            timeline.note("SIGKILL dev server (the worker stays)")
            await at(start + 45)
            server.start()
            await server.ready()
            timeline.note("dev server restarted, ready")

        async def webhook_faults() -> None:
            """Down, then losing answers, each until it has hit a few handovers (when they go
            out depends on how long the leads took to recover from the worker's SIGKILL),
            overlapping the other faults if it must (handovers wait while the store or
            Temporal is down); up again by 55 s at the latest."""
            await timeline.until(start + 8)
            for mode, hits, latest in (("down", 3, 45), ("lossy", 3, 55)):
                receiver.mode = mode
                timeline.note(f"webhook receiver {'down (503)' if mode == 'down' else 'back, but losing its answers'}")
                while receiver.answers[mode] < hits and timeline.now() < start + latest:
                    await asyncio.sleep(0.1)
            receiver.mode = "up"
            timeline.note("webhook receiver up")

        await asyncio.gather(faults(), webhook_faults(), *(sender() for _ in range(SENDERS)))
        worker.check("after the faults")
        timeline.note(f"all sent: {stats.sent} sends, {stats.retries} retried ({dict(stats.errors)}); "
                      f"receiver answers so far {dict(receiver.answers)}")

        # ------------------------------------------------------------ everything catches up
        problems: list[str] = []
        settle_until = timeline.now() + SETTLE_SECONDS
        views, stuck = await settled_views(client, plans, settle_until, timeline)
        if stuck:
            store = AuditStore(postgres.url())
            pytest.fail(f"{len(stuck)} lead(s) stuck after the faults healed:\n\n"
                        + "\n\n".join(f"{line}\n{describe(by_id[lead], store)}" for lead, line in stuck[:10])
                        + logs(), pytrace=False)
        timeline.note("every lead has applied its events and decided")
        handover_ids = {f"{p.lead_id}/handover/{n}" for p in plans for n in range(1, expected[p.lead_id].handovers + 1)}
        while not handover_ids <= receiver.keys() and timeline.now() < settle_until:
            await asyncio.sleep(0.5)
        timeline.note(f"receiver has {len(receiver.keys() & handover_ids)} of {len(handover_ids)} handovers")
        last_seq = {}
        for p in plans:
            last_seq[p.lead_id] = await flush(client, p.lead_id)
        timeline.note("every lead flushed its audit")
        views, _ = await settled_views(client, plans, timeline.now() + 30, timeline)  # as they are now
        worker.check("at the end")
        problems += worker.exited
        log = worker.log.read_text()
        bit = {"sends failed or timed out while the dev server was down": stats.retries,
               "the worker, started while Temporal was down, waited for it": f"Temporal at {server.address} unreachable"
               in log,
               "the worker, started while the store was down, waited for it": re.search(r"the audit store \S+ unreachable",
                                                                                       log),
               "the receiver answered 503": receiver.answers["down"],
               "the receiver lost answers": receiver.answers["lossy"]}
        problems += [f"a fault did not bite, so the run proves less than it should: {what}"
                     for what, seen in bit.items() if not seen]

        # ------------------------------------------------------------ the checks
        store = AuditStore(postgres.url())
        outbox = store.pending_outbox(limit=100_000)
        outbox_handovers = {m.message_id: m for m in outbox if m.kind == OutboundKind.HANDOVER}
        failed_tasks, lengths, unreplayable = await workflow_histories(client, plans)
        problems += unreplayable
        for p in plans:
            problems += check_lead(p, expected[p.lead_id], views[p.lead_id], store, last_seq[p.lead_id],
                                   outbox_handovers, receiver)
        problems += check_deliveries(handover_ids, outbox, outbox_handovers, receiver, store)
        summary = (f"{stats.sent} sends ({stats.retries} retried), receiver answers {dict(receiver.answers)}, "
                   f"{len(receiver.taken)} POSTs taken for {len(receiver.keys())} keys, "
                   f"duplicates ignored {sum(v.duplicates_ignored for v in views.values())}, "
                   f"worker waits for Temporal or the store {log.count('leadflow.worker WARNING')}, "
                   f"failed workflow tasks {dict(failed_tasks) or 0}, {len(lengths)} runs of "
                   f"{min(lengths.values())}-{max(lengths.values())} history events")
        timeline.note(summary)
        if problems:
            pytest.fail(
                f"{len(problems)} problem(s) after the faults:\n\n" + "\n\n".join(problems[:12])
                + (f"\n\n... and {len(problems) - 12} more" if len(problems) > 12 else "") + logs(),
                pytrace=False,
            )
    except pytest.fail.Exception:
        raise  # its message has the logs
    except BaseException:
        report = [logs()]
        raise
    finally:
        if report:
            print(report[0])
        if store is not None:
            store.dispose()
        if worker is not None:
            _stop(worker.proc)
        _kill(server.proc)
        receiver.close()
        await asyncio.to_thread(postgres.remove)


# --------------------------------------------------------------------------- waiting


async def view_of(client: Client, lead_id: str):
    try:
        return await asyncio.wait_for(leads.get_view(client, lead_id), 5)
    except (leads.LeadNotFound, leads.LeadStarting, RPCError, TimeoutError):
        return None  # asked again until the deadline, then reported as not answering


def caught_up(view, plan: LeadPlan) -> bool:
    return view is not None and view.events_applied >= len(plan.events) and view.decision_due_at is None


async def settled_views(client, plans, until: float, timeline: Timeline) -> tuple[dict, list[tuple[str, str]]]:
    """Each lead's view once it has applied all its events and decided; at the deadline,
    also the leads that did not, with what they show."""
    views: dict = {}
    while True:
        pending = [p for p in plans if not caught_up(views.get(p.lead_id), p)]
        for p, view in zip(pending, await asyncio.gather(*(view_of(client, p.lead_id) for p in pending))):
            views[p.lead_id] = view
        stuck = [p for p in pending if not caught_up(views[p.lead_id], p)]
        if not stuck:
            return views, []
        if timeline.now() > until:
            return views, [(p.lead_id, f"lead {p.lead_id} ({p.group}): " + (
                "does not answer" if views[p.lead_id] is None else
                f"applied {views[p.lead_id].events_applied} of {len(p.events)} events, stage "
                f"{views[p.lead_id].stage.value}, decision due {views[p.lead_id].decision_due_at}")) for p in stuck]
        await asyncio.sleep(1.0)


async def flush(client: Client, lead_id: str) -> int:
    """The lead writes everything now; returns its last seq (tries again for a while)."""
    for attempt in range(10):
        try:
            return await asyncio.wait_for(leads.flush_audit(client, lead_id), 30)
        except (RPCError, TimeoutError):
            if attempt == 9:
                raise
            await asyncio.sleep(1)
    raise AssertionError("unreachable")


async def workflow_histories(client: Client, plans) -> tuple[Counter, Counter, list[str]]:
    """Failed workflow tasks by cause and history events per run, over every run of every
    lead: reported, not judged (a task can fail legitimately, e.g. a continue-as-new
    refused because a signal came). And the runs that do not replay, judged: a lead that
    decided differently live than on replay wedges at its next restart or eviction."""
    causes: Counter = Counter()
    lengths: Counter = Counter()
    unreplayable: list[str] = []
    replayer = Replayer(workflows=[LeadWorkflow], data_converter=client.data_converter,
                        workflow_runner=UnsandboxedWorkflowRunner())
    for p in plans:
        async for run in client.list_workflows(f"WorkflowId = '{workflow_id(p.lead_id)}'"):
            history = await client.get_workflow_handle(run.id, run_id=run.run_id).fetch_history()
            lengths[f"{p.lead_id}/{run.run_id[:8]}"] = len(history.events)
            for e in history.events:
                if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                    causes[WorkflowTaskFailedCause.Name(e.workflow_task_failed_event_attributes.cause)
                           .removeprefix("WORKFLOW_TASK_FAILED_CAUSE_").lower()] += 1
            replayed = await replayer.replay_workflow(history, raise_on_replay_failure=False)
            if replayed.replay_failure is not None:
                unreplayable.append(f"lead {p.lead_id} run {run.run_id[:8]} does not replay: "
                                    f"{str(replayed.replay_failure)[:300]}")
    return causes, lengths, unreplayable


# --------------------------------------------------------------------------- checking


def describe(plan: LeadPlan, store: AuditStore) -> str:
    events = ", ".join(f"{e.event_id} {e.type} @{e.occurred_at:%H:%M:%S}" for e in plan.events)
    sent = " ".join(e.event_id.rsplit("-", 1)[1] for e in plan.sends)
    history = "\n".join(
        f"    {e.seq:3d} {e.kind.value:18s} {e.event_id or '':12s} {e.points if e.points is not None else '':>7} "
        f"{e.detail[:90]}" for e in store.history(plan.lead_id, limit=10_000))
    return f"  events: {events}\n  send order: {sent}\n  store:\n{history}"


def check_lead(plan: LeadPlan, want: Expected, view, store: AuditStore, last_seq: int, outbox_handovers,
               receiver: Receiver) -> list[str]:
    wrong: list[str] = []
    lead = plan.lead_id
    if view is None:
        return [f"lead {lead} ({plan.group}) does not answer a query\n" + describe(plan, store)]
    ids = {e.event_id for e in plan.events}
    if view.events_applied != len(ids):
        wrong.append(f"applied {view.events_applied} events, not {len(ids)}")
    if view.score != want.score:
        got, exp = view.score, want.score
        keys = sorted(set(got["breakdown"]) | set(exp["breakdown"]))
        diff = {k: (got["breakdown"].get(k), exp["breakdown"].get(k)) for k in keys
                if got["breakdown"].get(k) != exp["breakdown"].get(k)}
        wrong.append(f"score {got['total']} (engagement {got['engagement']}, fit {got['fit']}), fault-free "
                     f"{exp['total']} ({exp['engagement']}, {exp['fit']}); breakdown (got, fault-free): {diff}")
    if view.stage != want.stage:
        wrong.append(f"stage {view.stage.value}, fault-free {want.stage.value}")

    history = store.history(lead, limit=100_000)
    seqs = [e.seq for e in history]
    if seqs != list(range(1, len(seqs) + 1)):
        dupes = sorted(s for s, c in Counter(seqs).items() if c > 1)
        gaps = sorted(set(range(1, max(seqs, default=0) + 1)) - set(seqs))
        wrong.append(f"audit seqs are not 1..{len(seqs)}: duplicated {dupes}, missing {gaps}")
    if last_seq != len(seqs):
        wrong.append(f"the lead says it wrote up to seq {last_seq}, the store holds {len(seqs)} entries")
    scored = Counter(e.event_id for e in history if e.kind == AuditKind.SCORE_CHANGED and e.event_id)
    if scored != Counter(ids):
        wrong.append("SCORE_CHANGED entries per event id are not one each: "
                     f"twice or more {sorted(i for i, c in scored.items() if c > 1)}, "
                     f"never {sorted(ids - set(scored))}, unknown {sorted(set(scored) - ids)}")
    points = sum(e.points or 0.0 for e in history if e.kind == AuditKind.SCORE_CHANGED)
    if abs(points - view.score["total"]) > 0.01 * len(history) + 1e-6:
        wrong.append(f"the SCORE_CHANGED points add up to {points:g}, the score is {view.score['total']:g}")
    kinds = Counter(e.kind for e in history)
    if kinds[AuditKind.DUPLICATE_IGNORED] != view.duplicates_ignored:
        wrong.append(f"{view.duplicates_ignored} duplicates ignored, {kinds[AuditKind.DUPLICATE_IGNORED]} "
                     "DUPLICATE_IGNORED entries")
    mql = want.stage == Stage.MQL
    if kinds[AuditKind.LEAD_CREATED] != 1:
        wrong.append(f"{kinds[AuditKind.LEAD_CREATED]} LEAD_CREATED entries")
    if kinds[AuditKind.STAGE_CHANGED] != int(mql):
        wrong.append(f"{kinds[AuditKind.STAGE_CHANGED]} STAGE_CHANGED entries, expected {int(mql)}")
    owners = [e for e in history if e.kind == AuditKind.OWNER_ASSIGNED]
    if len(owners) != int(mql) or (mql and f"owner {view.owner} " not in owners[0].detail):
        wrong.append(f"owner {view.owner}, OWNER_ASSIGNED entries {[e.detail for e in owners]}")

    mine = {k: m for k, m in outbox_handovers.items() if m.lead_id == lead}
    want_ids = {f"{lead}/handover/{n}" for n in range(1, want.handovers + 1)}
    if set(mine) != want_ids:
        wrong.append(f"handovers in the outbox {sorted(mine)}, expected {sorted(want_ids)}")
    for message in mine.values():
        if message.payload.get("owner") != view.owner:
            wrong.append(f"{message.message_id} names owner {message.payload.get('owner')}, the lead {view.owner}")
    if wrong:
        posts = [(k, b.get("kind")) for k, b in receiver.taken if b.get("lead_id") == lead]
        return [f"lead {lead} ({plan.group}):\n  " + "\n  ".join(wrong) + f"\n  webhook POSTs taken: {posts}\n"
                + describe(plan, store)]
    return []


def check_deliveries(handover_ids: set[str], outbox, outbox_handovers, receiver: Receiver,
                     store: AuditStore) -> list[str]:
    wrong = []
    with receiver.lock:
        taken = list(receiver.taken)
    bodies: dict[str, list[dict]] = defaultdict(list)
    for key, body in taken:
        bodies[key].append(body)
    handover_keys = {k for k, b in taken if b.get("kind") == OutboundKind.HANDOVER.value}
    if set(outbox_handovers) != handover_ids:
        wrong.append(f"outbox handovers differ from the expected: extra {sorted(set(outbox_handovers) - handover_ids)}, "
                     f"missing {sorted(handover_ids - set(outbox_handovers))}")
    if handover_keys != set(outbox_handovers):
        wrong.append(f"handover keys the receiver got differ from the outbox's: never delivered "
                     f"{sorted(set(outbox_handovers) - handover_keys)}, not in the outbox "
                     f"{sorted(handover_keys - set(outbox_handovers))}")
    unknown = set(bodies) - {m.message_id for m in outbox}
    if unknown:
        wrong.append(f"POSTs with keys that are no outbox message: {sorted(unknown)}")
    for key, posted in bodies.items():
        if any(b != posted[0] for b in posted[1:]):
            wrong.append(f"{key} was POSTed {len(posted)} times with different bodies: "
                         + "\n".join(json.dumps(b, sort_keys=True)[:400] for b in posted))
        if posted[0].get("message_id") != key:
            wrong.append(f"{key}: the body says message_id {posted[0].get('message_id')}")
        if key in outbox_handovers and posted[0].get("payload", {}).get("owner") != \
                outbox_handovers[key].payload.get("owner"):
            wrong.append(f"{key}: POSTed owner {posted[0]['payload'].get('owner')}, outbox owner "
                         f"{outbox_handovers[key].payload.get('owner')}")
    undelivered = sorted(k for k in outbox_handovers if not store.is_delivered(k))
    if undelivered:
        wrong.append(f"handovers not marked delivered in the outbox: {undelivered}")
    return wrong
