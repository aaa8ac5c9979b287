"""Fuzz the HTTP API from its own OpenAPI document: no server error, every answer as documented.

schemathesis generates valid and invalid requests for every operation (bounded:
25 examples per operation and generation mode) and sends them with a manager key
to the real service: `uvicorn api:app` and `worker.py` as subprocesses (as
scripts/run starts them) against the session's Temporal dev server, with their
own task queue and SQLite audit store. Subprocesses, because schemathesis' test
functions are synchronous: a server in pytest's event loop would not run while
they wait for its answers. No answer may be a server error: every answer
must be below 500 (503/504 would mean Temporal, the store or the worker is
missing, which must not happen here either), and with all of schemathesis' other checks
every answer must be what the document says (status, headers, content type, body).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import schemathesis

import api

ROOT = Path(__file__).resolve().parent.parent
KEY = secrets.token_urlsafe(24)
# Per operation; LEADFLOW_FUZZ_EXAMPLES=500 for a deeper (slower) hunt.
MAX_EXAMPLES = int(os.environ.get("LEADFLOW_FUZZ_EXAMPLES") or 25)
START_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a child we started (its own process group), politely first."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def fuzz_api(dev_env, tmp_path_factory):
    """Base URL of a running API with a worker behind it."""
    data = tmp_path_factory.mktemp("fuzz")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_")}
    env.update(
        TEMPORAL_ADDRESS=dev_env.client.service_client.config.target_host,
        TEMPORAL_NAMESPACE=dev_env.client.namespace,
        LEADFLOW_TASK_QUEUE=f"fuzz-{uuid.uuid4().hex[:8]}",
        LEADFLOW_DATABASE_URL=f"sqlite:///{data / 'audit.db'}",
        LEADFLOW_API_KEYS=f"fuzzer:manager:{KEY}",
        # The fuzzer tries bad keys on purpose (schemathesis' ignored_auth check): one address
        # guessing that often would be throttled (429) and the rest of the run would test nothing.
        LEADFLOW_AUTH_FAILURE_LIMIT="1000000",
        LEADFLOW_PAYLOAD_KEYS=os.environ["LEADFLOW_PAYLOAD_KEYS"],  # the session's (tests/conftest.py)
        PYTHONUNBUFFERED="1",
    )
    with contextlib.ExitStack() as stack:
        logs = {name: stack.enter_context(open(data / f"{name}.log", "w")) for name in ("worker", "api")}
        worker = subprocess.Popen([sys.executable, "worker.py"], cwd=ROOT, env=env, stdout=logs["worker"],
                                  stderr=subprocess.STDOUT, start_new_session=True)
        stack.callback(_stop, worker)
        api_server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api:app", "--host", "127.0.0.1", "--port", str(port), "--log-level",
             "warning"],
            cwd=ROOT, env=env, stdout=logs["api"], stderr=subprocess.STDOUT, start_new_session=True,
        )
        stack.callback(_stop, api_server)
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for name, proc in (("worker", worker), ("api", api_server)):
                if proc.poll() is not None:
                    raise RuntimeError(f"the {name} exited: {(data / f'{name}.log').read_text()}")
            try:
                if httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not get ready: {(data / 'api.log').read_text()}")
            time.sleep(0.2)
        yield base_url


# The document is the app's own (what /openapi.json serves, checked below), so the
# operations are known when tests are collected. (schemathesis.pytest.from_fixture,
# which would load it from the running service, does not work with pytest 9.)
schema = schemathesis.openapi.from_dict(api.app.openapi())
# Bounded so the run takes a couple of minutes on 2 cores; no example database in the repo.
schema.config.generation.update(max_examples=MAX_EXAMPLES, database="none")
# Input the document allows may still be refused for what no schema can say: an event type
# the active scoring model does not know, a time too far in the future, TOML that does not
# parse (422), a lead that is closed (410). Every other refusal of schema-valid input fails.
schema.config.checks.positive_data_acceptance.expected_statuses = [
    *schema.config.checks.positive_data_acceptance.expected_statuses, "410", "422"]
# A body over the limit is refused (413) before anything reads it, valid or not.
schema.config.checks.negative_data_rejection.expected_statuses = [
    *schema.config.checks.negative_data_rejection.expected_statuses, "413"]


def test_the_service_serves_this_document(fuzz_api):
    assert httpx.get(f"{fuzz_api}/openapi.json").json() == api.app.openapi()


@schema.parametrize()
def test_every_answer_conforms_to_the_document(case, fuzz_api):
    """All of schemathesis' checks: no 5xx, every status, header, content type and body as
    documented, schema-violating input refused, schema-valid input not refused for its form."""
    case.call_and_validate(base_url=fuzz_api, timeout=60,
                           headers={"Authorization": f"Bearer {KEY}", "X-API-Key": KEY})
