"""Black-box test of the README run path: `scripts/run`, then the CLI, end to end.

Starts `scripts/run` (Temporal dev server + worker [+ API]) as a subprocess in
its own session, on free ports and with the audit store in a temporary SQLite
file, drives one lead through the funnel with `python starter.py ...`
subprocesses, and finally presses Ctrl-C (SIGINT to the process group) and
checks that everything it started is gone.

scripts/run_local.py keeps Temporal's state in <project>/data/temporal.db with
no setting to move it, so the run happens in a temporary working copy of the
project (sources copied, `.venv` linked): the test never touches the
developer's data/ or a Leadflow already running from the project directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 90.0  # seconds until the CLI reaches the dev server
OWNER_TIMEOUT = 20.0  # seconds for an MQL to get its owner
STOP_TIMEOUT = 30.0  # seconds scripts/run may take to stop after Ctrl-C
CLI_TIMEOUT = 60.0

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to check processes")

_COPY_IGNORE = shutil.ignore_patterns(
    ".venv", "data", ".git", "__pycache__", ".pytest_cache", "*.egg-info", "build", ".mypy_cache", ".ruff_cache",
)


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_stat(pid: int) -> dict | None:
    """ppid, pgrp, session, starttime and state of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return {"state": fields[0], "ppid": int(fields[1]), "pgrp": int(fields[2]), "session": int(fields[3]),
            "start": int(fields[19])}


def all_processes() -> dict[int, dict]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def descendants(root: int) -> dict[int, dict]:
    """Every process below `root` (children start their own sessions, so walk parents)."""
    procs = all_processes()
    below: dict[int, dict] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, stat in procs.items():
            if stat["ppid"] == parent and pid not in below:
                below[pid] = stat
                frontier.append(pid)
    return below


def alive(pid: int, start: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat["start"] == start and stat["state"] != "Z"


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


class Cli:
    """Runs `python starter.py ...` against the dev server of this test."""

    def __init__(self, workdir: Path, env: dict[str, str], log: Path):
        self.workdir = workdir
        self.env = env
        self.log = log

    def __call__(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(self.workdir / "starter.py"), *args],
            cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout,
        )

    def ok(self, *args: str) -> subprocess.CompletedProcess:
        result = self(*args)
        assert result.returncode == 0, (
            f"leadflow {' '.join(args)} -> exit {result.returncode}\nstdout: {result.stdout}\n"
            f"stderr: {result.stderr}\n--- scripts/run output ---\n{tail(self.log)}"
        )
        return result

    def json(self, *args: str):
        return json.loads(self.ok(*args, "--json").stdout)


def poll(what: str, check, timeout: float, log: Path, interval: float = 0.5):
    """check() until it returns something truthy; the last value is in the failure message."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last and last[0]:
            return last[1]
        time.sleep(interval)
    pytest.fail(f"{what}: not within {timeout:.0f} s; last: {last}\n--- scripts/run output ---\n{tail(log)}")


# --------------------------------------------------------------------------- fixture


@pytest.fixture
def running(tmp_path):
    """scripts/run in a working copy; yields (cli, run process, log); always stops what it started."""
    # Set-up the README way: scripts/run creates/updates .venv. `--help` does that
    # part and exits without starting anything.
    setup = subprocess.run([str(ROOT / "scripts" / "run"), "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
    assert setup.returncode == 0, f"scripts/run --help failed:\n{setup.stdout}\n{setup.stderr}"

    work = tmp_path / "leadflow"
    shutil.copytree(ROOT, work, ignore=_COPY_IGNORE, symlinks=True)
    (work / ".venv").symlink_to(ROOT / ".venv", target_is_directory=True)
    # scripts/run reinstalls (editable, into the shared .venv) when pyproject.toml
    # differs from its stamp; from the copy that would re-point the venv at tmp.
    stamp = (ROOT / ".venv" / ".leadflow-run.stamp").read_text().strip()
    if hashlib.sha256((work / "pyproject.toml").read_bytes()).hexdigest() != stamp:
        pytest.fail("pyproject.toml changed while the test set up; run it again")

    temporal_port, ui_port, api_port = free_port(), free_port(), free_port()
    database = tmp_path / "audit.db"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "LEADFLOW_WORKER_CMD", "LEADFLOW_MODEL",
                        "LEADFLOW_WEBHOOK_URL", "LEADFLOW_TASK_QUEUE", "COLUMNS",
                        # scripts/run makes its own dev payload key, as on a fresh machine
                        "LEADFLOW_PAYLOAD_KEYS", "LEADFLOW_PAYLOAD_KEYS_FILE")}
    env |= {
        "LEADFLOW_TEMPORAL_PORT": str(temporal_port),
        "LEADFLOW_UI_PORT": str(ui_port),
        "LEADFLOW_API_PORT": str(api_port),
        "LEADFLOW_DATABASE_URL": f"sqlite:///{database}",
    }
    cli_env = env | {"TEMPORAL_ADDRESS": f"127.0.0.1:{temporal_port}", "COLUMNS": "200"}

    log = tmp_path / "run.log"
    with log.open("wb") as out:
        run = subprocess.Popen([str(work / "scripts" / "run")], cwd=work, env=env, stdin=subprocess.DEVNULL,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, dict] = {}
    try:
        yield Cli(work, cli_env, log), run, log, seen
    finally:
        # Whatever happened: nothing this test started may outlive it.
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGINT)
            try:
                run.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        seen.update(descendants(run.pid) if run.poll() is None else {})
        for pid, stat in seen.items():
            if alive(pid, stat["start"]):
                try:
                    os.killpg(stat["pgrp"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()


# --------------------------------------------------------------------------- the test


def test_readme_run_path(running):
    cli, run, log, seen = running

    # 1. Up: the CLI can reach Temporal (and the worker is started right after).
    def reachable():
        if run.poll() is not None:
            pytest.fail(f"scripts/run exited early (code {run.returncode}):\n{tail(log)}")
        result = cli("list", "--json", timeout=30)
        return result.returncode == 0, result.stderr.strip()

    poll("`leadflow list` reaches Temporal", reachable, READY_TIMEOUT, log, interval=1.0)

    # 1a. Temporal's state file is a write-ahead log (config.DEV_SERVER_SQLITE; its `synchronous`
    # is a setting of the server's own connections, which another connection cannot read).
    with closing(sqlite3.connect(f"file:{cli.workdir / 'data' / 'temporal.db'}?mode=ro", uri=True)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    # 1b. Every example in the README does what its comment says, on a fresh store as a newcomer runs them.
    check_readme_examples(cli, log)

    lead = f"T-{uuid.uuid4().hex[:10]}"

    # 2. Marketing: profile facts and activities make the lead an MQL with an owner.
    cli.ok("profile", lead, "target_account=true")
    cli.ok("event", lead, "website_visit", "--channel", "webinar")
    cli.ok("event", lead, "webinar_attended", "--channel", "webinar", "--attr", "webinar_id=w42")
    cli.ok("event", lead, "demo_request")

    def mql_with_owner():
        result = cli("show", lead, "--json")
        if result.returncode != 0:  # the lead may still be starting
            return False, result.stderr.strip()
        view = json.loads(result.stdout)
        done = view["stage"] == "mql" and view["score"]["total"] >= 100 and bool(view["owner"])
        return done, view

    view = poll("lead becomes mql with score >= 100 and an owner", mql_with_owner, OWNER_TIMEOUT + 10, log)
    assert view["lead_id"] == lead
    assert view["score"]["fit"] == 20
    assert view["channel"] == "webinar"
    assert view["owner"].startswith("presales-")

    # The human-readable show has the same facts.
    shown = cli.ok("show", lead).stdout
    assert "mql" in shown and view["owner"] in shown and "demo_request" in shown

    # 3. Presales accepts; accepting again is refused with the lead's reason.
    assert cli.json("accept", lead, "--by", "anna")["stage"] == "sal"
    again = cli("accept", lead, "--by", "anna")
    assert again.returncode == 4, (again.returncode, again.stdout, again.stderr)
    assert f"refused: cannot accept lead {lead}: it is sal, not mql" in again.stderr
    assert "Traceback" not in again.stderr

    # 4. Qualified (BANT 3/4), contacted, won.
    qualified = cli.json("qualify", lead, "--by", "anna", "--budget", "--authority", "--need")
    assert qualified["stage"] == "sql"
    assert qualified["qualified_by"].startswith("bant 3/4")

    def listed_as_sql():
        result = cli("list", "--stage", "sql", "--json")
        leads = json.loads(result.stdout) if result.returncode == 0 else []
        return any(x["lead_id"] == lead for x in leads), result.stdout or result.stderr

    poll("`leadflow list --stage sql` shows the lead", listed_as_sql, 15, log)

    cli.ok("contact", lead, "--by", "ben", "--channel", "meeting")
    assert cli.json("close", lead, "won", "--by", "ben")["stage"] == "won"

    # 5. A won lead takes nothing more: exit 5 (closed), for events and commands.
    # Checked at the very end, so a wrong code does not hide the rest of the run.
    after_won = {what: cli(*argv) for what, argv in {
        "event": ("event", lead, "website_visit"),
        "command": ("contact", lead, "--by", "ben"),
    }.items()}

    # 6. The audit history (from the store, also for the completed workflow).
    history = cli.json("history", lead, "--limit", "1000")
    moves = [(e["from_stage"], e["to_stage"], e["actor"], e["role"]) for e in history if e["kind"] == "stage_changed"]
    assert moves == [
        ("iql", "mql", "leadflow", "system"),
        ("mql", "sal", "anna", "presales"),
        ("sal", "sql", "anna", "presales"),
        ("sql", "won", "ben", "sales"),
    ], moves
    kinds = {e["kind"] for e in history}
    assert {"lead_created", "profile_updated", "score_changed", "owner_assigned", "contact_logged"} <= kinds
    assert [e["seq"] for e in history] == sorted(e["seq"] for e in history)
    assert history[-1]["score_total"] >= 100

    report = cli.json("report")
    stages = {s["stage"]: s for s in report["overall"]["stages"]}
    assert stages["won"]["reached"] >= 1

    # 7. Ctrl-C: scripts/run stops within 30 s and leaves nothing running.
    started = descendants(run.pid)
    seen.update(started)
    names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
             for pid in started if Path(f"/proc/{pid}/cmdline").exists()}
    assert any("temporal" in cmd and "start-dev" in cmd for cmd in names.values()), names
    assert any("worker.py" in cmd for cmd in names.values()), names
    groups = {stat["pgrp"] for stat in started.values()} | {run.pid}

    os.killpg(run.pid, signal.SIGINT)
    try:
        code = run.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"scripts/run did not stop within {STOP_TIMEOUT:.0f} s of Ctrl-C:\n{tail(log)}")
    assert code == 0, f"scripts/run exit code {code} after Ctrl-C:\n{tail(log)}"

    deadline = time.monotonic() + 5  # orphans are reaped by init a moment later
    while time.monotonic() < deadline:
        left = {pid: names.get(pid, "?") for pid, stat in started.items() if alive(pid, stat["start"])}
        left |= {pid: "(in a group it started)" for pid, stat in all_processes().items()
                 if stat["pgrp"] in groups and stat["state"] != "Z"}
        if not left:
            break
        time.sleep(0.2)
    assert not left, f"still running after scripts/run stopped: {left}\n{tail(log)}"
    assert "stopped" in tail(log)

    wrong = {what: (r.returncode, r.stderr.strip()) for what, r in after_won.items() if r.returncode != 5}
    assert not wrong, f"input for a won lead must exit 5 (lead closed); got {wrong}"



# --------------------------------------------------------------------------- the README's examples

README = ROOT / "README.md"


def readme_blocks() -> list[tuple[str, str, list[str]]]:
    """(section, language, lines) of every fenced code block of the README."""
    blocks, section, fence, lines = [], "", None, []
    for line in README.read_text(encoding="utf-8").splitlines():
        if fence is None and line.startswith("## "):
            section = line[3:].strip()
        elif fence is None and line.startswith("```"):
            fence, lines = line[3:].strip(), []
        elif fence is not None and line.startswith("```"):
            blocks.append((section, fence, lines))
            fence = None
        elif fence is not None:
            lines.append(line)
    return blocks


def commands(lines: list[str]) -> list[tuple[str, str]]:
    """(command, comment) per shell command: continuation lines joined, comment-only lines left out."""
    out, pending = [], ""
    for line in lines:
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        quoted = False
        for i, char in enumerate(line):  # a comment starts at " #" outside quotes
            if char == "'":
                quoted = not quoted
            if not quoted and line[i : i + 2] == " #" and "  " in line[max(0, i - 2) : i + 1]:
                out.append((" ".join(line[:i].split()), line[i + 2 :].strip()))
                break
        else:
            out.append((" ".join(line.split()), ""))
    return out


def bash(cli: Cli, command: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    env = cli.env | {"PATH": f"{cli.workdir / '.venv' / 'bin'}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", command], cwd=cli.workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)


def shows(*needles: str, timeout: float = 30.0):
    """A check: the command succeeds and its output has every needle (polled: leads settle)."""

    def check(cli: Cli, command: str, log: Path) -> None:
        def once():
            result = bash(cli, command)
            text = result.stdout + result.stderr
            return result.returncode == 0 and all(n in text for n in needles), text

        poll(f"`{command}` shows {needles}", once, timeout, log)

    return check


def once(*needles: str):
    """A check for a command that must not run twice (it refuses then): it succeeds, and its
    output has every needle."""
    def check(cli: Cli, command: str, log: Path) -> None:
        result = bash(cli, command, timeout=120)
        text = result.stdout + result.stderr
        assert result.returncode == 0 and all(n in text for n in needles), f"{command} -> {result.returncode}\n{text}"

    return check


def refused(code: int, *needles: str):
    """A check for a command the README shows refusing: this exit code, and a message with every needle."""
    def check(cli: Cli, command: str, log: Path) -> None:
        result = bash(cli, command, timeout=120)
        assert result.returncode == code and all(n in result.stderr for n in needles), (
            f"{command} -> {result.returncode}\n{result.stdout}\n{result.stderr}")

    return check


def lacks(*absent: str, needs: tuple[str, ...] = (), timeout: float = 30.0):
    """The command succeeds, its output shows all of `needs` and none of `absent`."""
    def check(cli: Cli, command: str, log: Path) -> None:
        def once() -> tuple[bool, str]:
            result = bash(cli, command)
            text = result.stdout + result.stderr
            return (result.returncode == 0 and all(n in text for n in needs)
                    and not any(a in text for a in absent)), text

        poll(f"`{command}` shows {needs} and none of {absent}", once, timeout, log)

    return check


def ok(cli: Cli, command: str, log: Path) -> None:
    result = bash(cli, command)
    assert result.returncode == 0, f"{command} -> {result.returncode}\n{result.stdout}\n{result.stderr}\n{tail(log)}"


# The README's shell examples in order, each with what its comment promises. A README
# example that is not here (or one here that the README lost) fails the test.
WALKTHROUGH = [
    ("export PATH=$PWD/.venv/bin:$PATH", ok),
    ("leadflow profile L-1001 target_account=true industry=software", ok),
    ("leadflow event L-1001 website_visit --channel website", ok),
    ("leadflow event L-1001 website_visit --channel website", ok),
    ("leadflow event L-1001 webinar_attended --channel webinar", ok),
    ("leadflow show L-1001", shows("iql", "82.5", "fit:target_account", "webinar_follow_up")),
    ("leadflow event L-1001 demo_request", ok),
    ("sleep 6", ok),
    ("leadflow show L-1001", shows("mql", "presales-1", "presales_decision")),
    ("leadflow accept L-1001 --by anna", shows("sal")),
    ("leadflow qualify L-1001 --by anna --budget --authority --need", shows("sql", "bant 3/4")),
    ("leadflow contact L-1001 --by ben --channel phone", ok),
    ("leadflow close L-1001 won --by ben", shows("won")),
    ("leadflow history L-1001", shows("stage_changed", "owner_assigned", "ae-1", "anna/presales")),
    ("leadflow report", shows("won")),
    ("leadflow event L-1003 newsletter_signup --channel email", ok),
    ("leadflow event L-1003 unsubscribe", ok),
    ("leadflow show L-1003", shows("NOT to be mailed", "unsubscribe")),
    ("leadflow event L-1004 webinar_attended --at $(date -u -d '400 days ago' +%Y-%m-%dT%H:%M:%SZ)", ok),
    ("leadflow event L-1004 demo_request --at $(date -u -d '399 days ago' +%Y-%m-%dT%H:%M:%SZ)", ok),
    ("leadflow history L-1004", shows("not_handed_over", "sla_late_data", "inactivity")),
    ("sed -e 's/^version = \"1\"/version = \"2\"/' -e '/^\\[events.live_chat\\]/{n;s/= 15/= 30/}' "
     "scoring_models/default.toml > my-model.toml", ok),
    ("leadflow model apply my-model.toml --by mona --dry-run", shows("default@2 would change the score of")),
    ("leadflow model apply my-model.toml --by mona", shows("default@2 recorded", "rolled out")),
    ("leadflow model status", shows("default@2", "yes", "mona")),
    ("leadflow profile L-1005 email=ann@example.com name=Ann target_account=true", ok),
    ("leadflow export-person L-1005", shows('"email": "ann@example.com"', '"name": "Ann"', "profile: ")),
    ("leadflow erase L-1005 --by mona", shows("erased by mona", "crypto-shredded")),
    ("leadflow export-person L-1005", lacks("ann@example.com", '"Ann"', needs=("personal_data_erased",
                                                                              '"target_account": true'))),
    ("LEADFLOW_DATABASE_URL=sqlite:///demo.db leadflow demo-data --leads 1000",
     once("1000 demo leads", "became MQL", "won")),
    ("sed -e 's/^version = \"1\"/version = \"2\"/' -e 's/^mql = 100 /mql = 70 /' "
     "scoring_models/default.toml > candidate.toml", ok),
    ("LEADFLOW_DATABASE_URL=sqlite:///demo.db leadflow backtest --model candidate.toml --chart backtest.png",
     once("default@2", "MQLs (presales load)", "chart written to backtest.png")),
    ("LEADFLOW_DATABASE_URL=sqlite:///demo.db leadflow events export --out log.jsonl", once("exported to log.jsonl")),
    ("LEADFLOW_DATABASE_URL=sqlite:///demo.db leadflow suggest --out suggested.toml",
     refused(2, "too few closed leads to learn from", "are needed")),
]
# Shell blocks run somewhere else: the two commands (CI runs scripts/test; this test runs
# scripts/run), and the benchmark (run by hand; its figures are in the README).
ELSEWHERE = {"scripts/run", "scripts/test", ".venv/bin/python bench/ingest.py",
             ".venv/bin/python bench/ingest.py --in-memory --rounds 3",
             ".venv/bin/python bench/ingest.py --pin --rounds 4", ".venv/bin/python bench/shapes.py --repeat 2",
             ".venv/bin/python bench/long_leads.py"}
# A section that repeats walkthrough commands as a reference ([optional] arguments shown).
REFERENCE = "Changing the model under running leads"


def check_readme_examples(cli: Cli, log: Path) -> None:
    shell, api_blocks, consoles = [], [], []
    for section, language, lines in readme_blocks():
        if language == "console":
            consoles.append(lines)
        elif language == "bash" and section == "The HTTP API":
            api_blocks.append(lines)
        elif language == "bash" and section == REFERENCE:
            for cmd, _ in commands(lines):
                assert cmd.split(" [")[0] in {c for c, _ in WALKTHROUGH}, f"README reference {cmd!r} is not checked"
        elif language == "bash":
            shell += [cmd for cmd, _ in commands(lines) if cmd not in ELSEWHERE]
    assert shell == [cmd for cmd, _ in WALKTHROUGH], "README examples changed: update WALKTHROUGH with checks"
    for command, check in WALKTHROUGH:
        if not command.startswith("export "):
            check(cli, command, log)

    # `$ command` lines, then the output shown (`...` stands for ids and times)
    assert len(consoles) == 1
    expected: list[tuple[str, list[str]]] = []
    for line in consoles[0]:
        if line.startswith("$ "):
            expected.append((line[2:], []))
        else:
            expected[-1][1].append(line)
    for command, output in expected:
        result = bash(cli, command)
        got = (result.stdout + result.stderr).strip().splitlines()
        patterns = [re.escape(line).replace(re.escape("..."), ".*") for line in output]
        assert len(got) == len(patterns) and all(re.fullmatch(p, g) for p, g in zip(patterns, got)), (command, got)

    # the API's curl examples, as one script against the API scripts/run serves
    [api_lines] = api_blocks
    port = cli.env["LEADFLOW_API_PORT"]
    script = "\n".join(["set -e", *[line.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for line in api_lines]])
    result = bash(cli, script, timeout=120)
    assert result.returncode == 0, (result.stdout, result.stderr)
    answers = [line.rsplit(" ", 1) for line in result.stdout.strip().splitlines()]
    codes = [int(code) for _, code in answers]
    assert codes == [202, 202, 202, 200, 200, 409, 200, 200, 200, 200, 200, 200], result.stdout
    bodies = [json.loads(body) for body, _ in answers]
    assert bodies[0]["outcome"] == "accepted"
    assert [r["outcome"] for r in bodies[1]["results"]] == ["accepted", "rejected"]
    assert "unknown event type 'no_such_type'" in bodies[1]["results"][1]["reason"]
    assert bodies[3]["stage"] == "mql" and bodies[3]["owner"] == "presales-2", bodies[3]  # after L-1001's presales-1
    assert bodies[4]["stage"] == "sal"
    assert bodies[5] == {"detail": "refused: cannot accept lead L-2001: it is sal, not mql"}
    assert [bodies[i]["stage"] for i in (6, 8)] == ["sql", "won"]
    assert bodies[9]["total"] == len(bodies[9]["entries"]) > 5
    assert any(m["lead_id"] == "L-2001" for m in bodies[10]["messages"])
    assert bodies[11]["ready"] is True
