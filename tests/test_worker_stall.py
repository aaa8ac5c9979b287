"""A worker whose workflow poller has stopped (seen with temporalio 1.35, README: known
problems) is noticed from what Temporal says of the task queue, exits with
WORKER_STALLED_EXIT, and scripts/run starts it again; a busy worker or an idle one is
never taken for a stalled one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

import client as leads
from config import WORKER_STALLED_EXIT
from tests.conftest import event, running_worker, settle
from worker import StallWatch, WorkflowProgress, stall_verdict

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 60.0


@pytest.mark.parametrize(("backlog", "oldest", "last_poll", "idle", "stalled"), [
    (0, 0.0, None, 500.0, False),  # nothing waits: an idle worker (or one Temporal forgot) is fine
    (0, 500.0, 500.0, 500.0, False),  # (the age of an empty backlog means nothing)
    (3, 30.0, None, 500.0, False),  # tasks wait, but not for long yet
    (3, 500.0, 1.0, 500.0, False),  # behind, and polling: busy, not stalled
    (3, 500.0, 500.0, 1.0, False),  # behind, polls far apart, but running workflow code: busy
    (3, 500.0, LIMIT, 500.0, False),  # at the limit is still within it
    (3, 500.0, 500.0, LIMIT, False),
    (3, 500.0, LIMIT + 1, LIMIT + 1, True),  # behind, silent and idle for longer than the limit
    (3, 500.0, None, 500.0, True),  # behind, idle, and no longer listed as a poller at all
    (1, LIMIT + 0.5, 300.0, 300.0, True),
])
def test_stalled_means_tasks_wait_while_the_worker_neither_polls_nor_runs_them(backlog, oldest, last_poll, idle,
                                                                                stalled):
    verdict = stall_verdict(backlog, oldest, last_poll, idle, LIMIT)
    assert (verdict is not None) == stalled
    if stalled:
        assert f"{backlog} lead task(s)" in verdict and f"limit {LIMIT:g} s" in verdict


async def test_a_verdict_must_hold_for_a_while_before_the_worker_exits(monkeypatch):
    """Temporal's backlog figures lag (a backlog just worked off is counted for a few more
    seconds), so one stalled-looking answer is not enough: the verdict must hold on every
    check for `confirm` seconds; an answer in between that is fine starts the wait again."""
    clock = [0.0]
    answers = iter("SSFSSSSS")  # S: stalled-looking, F: fine; one check per clock second

    async def polling(client, task_queue):
        clock[0] += 1.0
        stalled = next(answers) == "S"
        return leads.WorkflowPolling(backlog=5 if stalled else 0, oldest_seconds=100.0,
                                     last_poll_seconds={"w": 100.0})

    monkeypatch.setattr(leads, "workflow_polling", polling)
    progress = WorkflowProgress()
    progress.last = -1000.0  # idle for long (the watch's clock and the progress's are both fake here)
    monkeypatch.setattr(progress, "idle_seconds", lambda: clock[0] - progress.last)
    fired = []
    watch = StallWatch(None, "q", "w", progress, limit=10.0, interval=0.0, confirm=3.0, clock=lambda: clock[0])
    await asyncio.wait_for(watch.run(lambda: fired.append(clock[0])), timeout=10)
    # S S F: reset; then S at 4, 5, 6, 7: held for 3 s at the check of second 7
    assert fired == [7.0]
    assert "5 lead task(s)" in watch.verdict


async def test_a_worker_that_stopped_polling_is_found_stalled(dev_env, settings, store):
    """A worker took workflow tasks, then stopped polling and running them (here: it is shut
    down, which stops its poller as the SDK fault does; Temporal keeps listing its last
    poll). Input for a lead then waits: the watch finds it stalled, and says what it saw."""
    client = dev_env.client
    lead = f"S-{uuid.uuid4().hex[:6]}"
    async with running_worker(client, settings, store) as worker:
        identity = worker.config().get("identity") or client.identity
        await leads.send_events(client, settings, [event(lead, "1", "website_visit", datetime.now(timezone.utc))])
        await settle(dev_env, client, lead, lambda v: v.events_applied == 1)
    await leads.send_events(client, settings, [event(lead, "2", "email_open", datetime.now(timezone.utc))])

    stalled = asyncio.Event()
    watch = StallWatch(client, settings.task_queue, identity, worker.progress, limit=2.0, interval=0.5, confirm=2.0)
    await asyncio.wait_for(watch.run(stalled.set), timeout=60)
    assert stalled.is_set()
    assert "last polled" in watch.verdict and "lead task(s) have waited" in watch.verdict


async def test_a_busy_worker_is_not_found_stalled(dev_env, settings, store):
    """New leads in waves until lead tasks wait longer than the limit, then until the worker
    has caught up: it runs workflow code all along, so the watch never fires. (Polls alone
    would not show it: with 2,000 leads sent at once from this process, Temporal saw the
    worker's polls up to 6 s apart.) The test checks that the backlog did age past the limit,
    or it would prove nothing."""
    client = dev_env.client
    run = uuid.uuid4().hex[:6]
    limit = 3.0
    stalled = asyncio.Event()
    oldest_seen = 0.0
    sent: list[str] = []
    async with running_worker(client, settings, store) as worker:
        identity = worker.config().get("identity") or client.identity
        watch = StallWatch(client, settings.task_queue, identity, worker.progress, limit=limit, interval=0.25)
        watch_task = asyncio.create_task(watch.run(stalled.set))
        await asyncio.sleep(limit + 0.5)  # the watch is running, the worker idle, before the load comes
        sending: list[asyncio.Future] = []
        senders = asyncio.Semaphore(16)  # as an API with a bounded pool would send them

        async def send(lead: str, now: datetime) -> None:
            async with senders:
                await leads.send_events(client, settings, [event(lead, "1", "website_visit", now)])

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if oldest_seen <= limit and len(sent) < 3000 and all(f.done() for f in sending):  # behind enough?
                wave = [f"B-{run}-{len(sent) + i:04d}" for i in range(200)]
                sent += wave
                now = datetime.now(timezone.utc)
                sending.append(asyncio.gather(*(send(lead, now) for lead in wave)))
            seen = await leads.workflow_polling(client, settings.task_queue)
            oldest_seen = max(oldest_seen, seen.oldest_seconds if seen.backlog else 0.0)
            if oldest_seen > limit and seen.backlog == 0:
                last = await asyncio.gather(*(leads.get_view(client, lead) for lead in sent[-20:]),
                                            return_exceptions=True)
                if all(not isinstance(v, Exception) and v.events_applied == 1 for v in last):
                    break
            await asyncio.sleep(0.5)
        await asyncio.gather(*sending)
        watch_task.cancel()
    assert oldest_seen > limit, f"the backlog never aged past {limit} s (oldest {oldest_seen} s): nothing was shown"
    assert time.monotonic() < deadline, "the worker did not catch up"
    assert not stalled.is_set(), watch.verdict


def test_scripts_run_starts_a_stalled_worker_again(tmp_path):
    """scripts/run's supervisor: a worker exiting with WORKER_STALLED_EXIT is started again;
    any other exit still stops everything (the child reports False)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import run_local

    marker = tmp_path / "runs"
    script = textwrap.dedent(f"""
        import pathlib, sys
        p = pathlib.Path({str(marker)!r}); n = len(p.read_text()) if p.exists() else 0
        p.write_text("x" * (n + 1))
        sys.exit({WORKER_STALLED_EXIT} if n == 0 else 3)
    """)
    child = run_local.Child("worker", [sys.executable, "-c", script], {}, restart_on=WORKER_STALLED_EXIT)
    child.proc.wait()
    assert child.restarted()  # stalled: started again
    assert child.proc.wait() == 3
    assert marker.read_text() == "xx"
    assert not child.restarted()  # any other exit is not restarted
    assert child.restarts == 1


def test_the_worker_process_exits_to_be_started_again_when_stalled(dev_env, settings, tmp_path):
    """`python worker.py`: once the watch finds it stalled, the process exits with
    WORKER_STALLED_EXIT without waiting for a graceful shutdown (that would wait for the
    stuck poller). The verdict is forced here; when it is right is tested above."""
    script = textwrap.dedent("""
        import worker
        worker.stall_verdict = lambda *args: "forced by the test"
        worker.main()
    """)
    env = {**os.environ, "TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
           "LEADFLOW_TASK_QUEUE": settings.task_queue, "LEADFLOW_DATABASE_URL": settings.database_url,
           "LEADFLOW_WORKER_STALL": "1"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == WORKER_STALLED_EXIT, done.stderr[-2000:]
    assert "worker stalled: forced by the test" in done.stderr
    assert time.monotonic() - started < 60
