"""Shared fixtures for workflow tests: real Temporal servers from the PyPI wheels.

`ts_env` is the time-skipping test server (timers of days run in
milliseconds); `dev_env` is the real dev server, for what the Java test server
does not do (continue-as-new suggestion, visibility). Each test gets its own
task queue and SQLite audit store, so tests never see each other's leads.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from collections import Counter
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncio

import pytest
from temporalio.api.enums.v1 import EventType, IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import client as leads  # noqa: E402
from activities.lead_activities import LeadActivities  # noqa: E402
from activities.store import AuditStore  # noqa: E402
from config import Settings, data_converter, dev_server_dynamic_flags  # noqa: E402
from funnel.models import ActivityEvent, Actor, Role  # noqa: E402
from payload_codec import PayloadKeyring, key_spec, new_key  # noqa: E402
from worker import build_worker  # noqa: E402
from workflows import search_attributes as sa  # noqa: E402

BIN = Path(sys.executable).parent


def binary(name: str) -> str:
    path = shutil.which(name) or (BIN / name if (BIN / name).exists() else None)
    if path is None:
        raise RuntimeError(f"{name} not found: install the project (pip install -e '.[test]')")
    return str(path)


async def register_search_attributes(client: Client) -> None:
    """The Java test server starts without our custom attributes; an upsert of an
    unknown one would fail the workflow task forever."""
    await client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=client.namespace,
            search_attributes={
                key.name: IndexedValueType.ValueType(key.indexed_value_type) for key in sa.ALL
            },
        )
    )


# Every test server speaks through the one data converter of config.py: payloads encrypted,
# lead keys in a store of their own for the session (tests' audit stores come and go).
TEST_KEYRING = PayloadKeyring({"test-1": new_key()}, current="test-1", source="tests")
KEY_CACHE_SECONDS = 1.0
# What connects from the environment in these tests (the API without a given client, the CLI,
# processes they start) uses the same payload key.
os.environ["LEADFLOW_PAYLOAD_KEYS"] = key_spec("test-1", TEST_KEYRING.key("test-1"))
os.environ.pop("LEADFLOW_PAYLOAD_KEYS_FILE", None)


@pytest.fixture(scope="session")
def key_store(tmp_path_factory) -> AuditStore:
    return AuditStore(f"sqlite:///{tmp_path_factory.mktemp('keys') / 'keys.db'}")


@pytest.fixture(scope="session")
def converter(key_store):
    return data_converter(Settings(key_cache_seconds=KEY_CACHE_SECONDS, shred_delay_seconds=0), keyring=TEST_KEYRING,
                          key_store=key_store)


@pytest.fixture
async def ts_env(converter):
    """A fresh server per test (it starts in ~0.1 s): leads of other tests would keep
    timers that no worker serves, and skipping time past them stalls."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=binary("temporal-test-server"), data_converter=converter
    )
    await register_search_attributes(env.client)
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def dev_env(converter):
    """The real dev server, told to suggest continue-as-new after 40 history events."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=binary("temporal"),
        data_converter=converter,
        search_attributes=sa.ALL,
        dev_server_extra_args=dev_server_dynamic_flags(**{"limit.historyCount.suggestContinueAsNew": "40"}),
    )
    yield env
    await env.shutdown()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        task_queue=f"leads-{uuid.uuid4().hex[:8]}",
        database_url=f"sqlite:///{tmp_path / 'audit.db'}",
        decision_delay_seconds=1.0,
        key_cache_seconds=KEY_CACHE_SECONDS,
        shred_delay_seconds=2 * KEY_CACHE_SECONDS,
    )


@pytest.fixture
def store(settings) -> AuditStore:
    return AuditStore(settings.database_url)


@asynccontextmanager
async def running_worker(client: Client, settings: Settings, store: AuditStore, sandboxed: bool = False,
                         activities: LeadActivities | None = None):
    """The worker as worker.py builds it; `activities`: a test's own (e.g. held or slowed)."""
    with ThreadPoolExecutor(16) as executor:
        async with build_worker(client, settings, activities or LeadActivities(settings, store), executor,
                                sandboxed=sandboxed) as worker:
            yield worker


def hours(n: float) -> timedelta:
    return timedelta(hours=n)


ANNA = Actor(name="anna", role=Role.PRESALES)
BEN = Actor(name="ben", role=Role.SALES)
MIA = Actor(name="mia", role=Role.MANAGER)


def event(lead: str, n: str, kind: str, at, channel: str | None = "website") -> ActivityEvent:
    return ActivityEvent(event_id=f"{lead}-{n}", lead_id=lead, type=kind, occurred_at=at, channel=channel)


async def until(fetch, check, timeout: float = 60.0, every: float = 0.1):
    """Call `fetch` until `check(result)` holds (wall-clock time); the last result otherwise
    fails the test."""
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while asyncio.get_running_loop().time() < deadline:
        last = await fetch()
        if check(last):
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s; last: {getattr(last, 'text', last)}")


async def account_when(client, account_id: str, check, timeout: float = 60.0):
    """Poll an account's view (it starts with its first lead's feed) until `check` holds."""
    async def fetch():
        try:
            return await leads.get_account(client, account_id)
        except (leads.LeadStarting, leads.LeadNotFound):
            return None

    return await until(fetch, lambda view: view is not None and check(view), timeout)


async def settle(env, client, lead: str, until, tries: int = 400):
    """Let the worker catch up: poll the lead's view every 50 ms (of server time,
    so the time-skipping server moves on too) until it satisfies `until`."""
    view = None
    for _ in range(tries):
        try:
            view = await leads.get_view(client, lead)
            if until(view):
                return view
        except (leads.LeadNotFound, leads.LeadStarting):
            pass
        await env.sleep(timedelta(milliseconds=50))
    raise AssertionError(f"lead {lead} never reached the expected state; last: {view}")


def history_kinds(history) -> list[str]:
    """A workflow history's event types, e.g. "timer_started"."""
    return [EventType.Name(e.event_type).removeprefix("EVENT_TYPE_").lower() for e in history.events]


def scheduled_activities(history) -> list[str]:
    """The activity types a workflow history scheduled, in order."""
    return [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events
            if e.HasField("activity_task_scheduled_event_attributes")]


class Receiver:
    """A webhook receiver on a free local port: "up" (200), "down" (503) or "lossy" (takes
    the POST, records it, and drops the connection without an answer). `taken` holds the
    (Idempotency-Key, body) of every POST it took, i.e. not while down."""

    def __init__(self, mode: str = "up") -> None:
        self.mode = mode
        self.lock = threading.Lock()
        self.taken: list[tuple[str, dict]] = []  # (Idempotency-Key, body) of every POST it took
        self.answers: Counter = Counter()
        self.raw: list[tuple[dict[str, str], bytes]] = []  # (headers, body) as sent, of every POST it took
        self.refused_leads: set[str] = set()  # answered 503 (and not taken) whatever the mode
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                mode = receiver.mode
                lead = body.get("data", {}).get("lead_id") if isinstance(body, dict) else None
                if lead is not None and lead in receiver.refused_leads:
                    mode = "down"
                with receiver.lock:
                    receiver.answers[mode] += 1
                    if mode != "down":
                        receiver.taken.append((self.headers.get("Idempotency-Key"), body))
                        receiver.raw.append(({k.lower(): v for k, v in self.headers.items()}, raw))
                if mode == "lossy":
                    self.close_connection = True  # the answer is lost: no status line at all
                    return
                self.send_response(200 if mode == "up" else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def keys(self) -> set[str]:
        with self.lock:
            return {key for key, _ in self.taken}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cli(dev_env, settings, monkeypatch, capsys):
    """Run `leadflow ARGS` against the dev server in a thread (its own event loop, as the
    command would have): (exit code, stdout, stderr)."""
    import starter

    monkeypatch.setenv("LEADFLOW_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("LEADFLOW_TASK_QUEUE", settings.task_queue)
    target, converter = dev_env.client.service_client.config.target_host, dev_env.client.data_converter

    async def connect(_settings=None):
        return await Client.connect(target, namespace=dev_env.client.namespace, data_converter=converter)

    monkeypatch.setattr(starter, "connect", connect)

    async def run(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(starter.main, list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run
