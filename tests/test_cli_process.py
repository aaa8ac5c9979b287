"""The command line as a real process: how it ends, not what it computes.

tests/test_cli.py calls `starter.main([...])` in-process; what can only go wrong
in a process of its own is checked here, by running the installed `leadflow`
console script (or `python starter.py` when it is not installed):

- with Temporal unreachable, every run exits 1 with the one-line message, never
  `Fatal Python error: PyGILState_Release` (temporalio's Rust threads outliving
  interpreter teardown, temporalio/sdk-python#300; the race hits a few runs in
  a hundred to a few in ten, depending on the machine, hence many runs);
- when the reader of stdout goes away early (`leadflow ... | head -c1`), the
  command ends quietly with 141, as if killed by SIGPIPE, never with a
  BrokenPipeError traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import starter
from funnel.models import AuditEntry, AuditKind, Role, Stage

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "leadflow"
NOW = datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc)
RUNS = 20  # processes per check of the teardown race; they run at the same time
PROCESS_TIMEOUT = 120  # seconds; a hung run fails the test instead of blocking it
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for a process killed by SIGPIPE


def leadflow(*args: str) -> list[str]:
    """The command line of one `leadflow` run, as a user would start it."""
    if SCRIPT.exists():
        return [str(SCRIPT), *args]
    return [sys.executable, str(ROOT / "starter.py"), *args]


def cli_env(**settings: str) -> dict[str, str]:
    """This environment without Temporal or Leadflow settings (no profile, TLS or key of
    the developer's shell leaks in), plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "LEADFLOW_"))}
    env["COLUMNS"] = "200"
    env["LEADFLOW_PAYLOAD_KEYS"] = os.environ["LEADFLOW_PAYLOAD_KEYS"]  # the session's (tests/conftest.py)
    env.update(settings)
    return env


@pytest.fixture
def closed_port():
    """A localhost port where nothing listens: bound but never listening, so a connect is
    refused at once and no other process can take the port while the test runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# --------------------------------------------------------------------------- Temporal unreachable


def test_unreachable_temporal_exits_1_with_one_line_every_time(closed_port):
    address = f"127.0.0.1:{closed_port}"
    env = cli_env(TEMPORAL_ADDRESS=address)

    def run_once(_: int) -> subprocess.CompletedProcess:
        return subprocess.run(leadflow("show", "L-1"), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=PROCESS_TIMEOUT)

    with ThreadPoolExecutor(max_workers=RUNS) as pool:
        runs = list(pool.map(run_once, range(RUNS)))

    expected = f"leadflow: {starter.Unreachable(address)}\n"
    assert expected.startswith(f"leadflow: cannot reach Temporal at {address}")
    failures = [(run.returncode, run.stderr) for run in runs
                if run.returncode != 1 or run.stderr != expected or run.stdout]
    crashes = [stderr for _, stderr in failures if "Fatal Python error" in stderr]
    assert not failures, (
        f"{len(failures)} of {RUNS} runs did not exit 1 with the one-line message "
        f"({len(crashes)} with 'Fatal Python error'); the first: exit {failures[0][0]}, stderr:\n{failures[0][1]}"
    )


# --------------------------------------------------------------------------- stdout closed early


def _lead_created(lead_id: str, channel: str) -> AuditEntry:
    return AuditEntry(seq=1, at=NOW, kind=AuditKind.LEAD_CREATED, detail="lead created as iql",
                      to_stage=Stage.IQL, score_total=0, lead_id=lead_id, role=Role.SYSTEM,
                      actor="leadflow", channel=channel, model_ref="default@1")


def _score_changed(lead_id: str, seq: int) -> AuditEntry:
    return AuditEntry(seq=seq, at=NOW + timedelta(minutes=seq), kind=AuditKind.SCORE_CHANGED,
                      detail=f"+1 website_visit (event e{seq})", score_total=seq - 1, lead_id=lead_id,
                      role=Role.SYSTEM, actor="leadflow", channel="organic", model_ref="default@1")


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> str:
    """An audit store whose report and history print far more than a pipe holds (64 KiB):
    100 leads each from a channel of its own (the report has a section per channel), and
    lead L-BIG with 1000 entries."""
    from activities.store import AuditStore

    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'audit.db'}"
    store = AuditStore(url)
    try:
        store.write_audit([_lead_created(f"L-{i}", f"channel-{i:03d}") for i in range(100)])
        store.write_audit([_lead_created("L-BIG", "organic")] + [_score_changed("L-BIG", s) for s in range(2, 1001)])
    finally:
        store.dispose()
    return url


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["report", "--json"], id="report-json"),
        pytest.param(["report"], id="report-tables"),
        # Tries Temporal first (unreachable here: the runtime is made, the warning goes to
        # stderr), then prints the store's 1000 entries.
        pytest.param(["history", "L-BIG", "--json", "--limit", "1000"], id="history-json"),
        pytest.param(["history", "L-BIG", "--limit", "1000"], id="history-table"),
    ],
)
def test_closed_stdout_ends_quietly(args, big_store, closed_port):
    env = cli_env(LEADFLOW_DATABASE_URL=big_store, TEMPORAL_ADDRESS=f"127.0.0.1:{closed_port}")
    with subprocess.Popen(leadflow(*args), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.read(1)
        process.stdout.close()  # like `| head -c1`: the reader is gone, the rest cannot be written
        try:
            stderr = process.stderr.read().decode()
            code = process.wait(timeout=PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert first, f"{args}: no output before the pipe was closed (stderr: {stderr})"
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr, stderr
    assert "Fatal Python error" not in stderr, stderr
    assert code == BROKEN_PIPE_EXIT, f"{args}: exit {code}, stderr:\n{stderr}"
    if args[0] == "history":  # the only line allowed: Temporal is down, the store answers alone
        assert [line for line in stderr.splitlines() if "showing the audit store only" not in line] == []
    else:
        assert stderr == ""
