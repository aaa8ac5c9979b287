"""Query race: do leads asked by query while their decision timers fire still replay?

Starts an in-memory dev server and the real worker with a small cache, and for each round
sends `--leads` new leads a visit, then a demo request (their decision falls due
`--delay` seconds later), asks every lead by query three times as the timers fire, waits,
and replays every lead's history. Prints how many leads do not replay, and the first
failures. Figures only: nothing here passes or fails.

Why a script and not a test: it found the stale timer stamp (fixed, pinned by
tests/test_workflow_stale_timer_stamp.py), and then, once, on a loaded machine, a second
nondeterminism after an SDK deadlock error ("No command scheduled for event ... Upsert
WorkflowSearchAttributes"), not explained (README, design decisions; the deadlock
detection is off since: worker.let_slow_activations_finish). A race that fails now and
then cannot be a test of the suite.

    .venv/bin/python bench/query_race.py [--rounds 4] [--leads 60] [--cache 10] [--delay 2] [--save DIR]

`--save DIR` keeps each history that does not replay as JSON (`temporal workflow show
--output json` format), to replay and study later. What the SDK's worker logs at WARNING
or above (failed workflow tasks, failed evictions) is counted and the first lines printed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from temporalio.testing import WorkflowEnvironment  # noqa: E402
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner  # noqa: E402

import client as leads  # noqa: E402
from activities.lead_activities import LeadActivities  # noqa: E402
from activities.store import AuditStore  # noqa: E402
from config import Settings, data_converter  # noqa: E402
from funnel.models import ActivityEvent  # noqa: E402
from payload_codec import PayloadKeyring, new_key  # noqa: E402
from worker import build_worker  # noqa: E402
from workflows import search_attributes as sa  # noqa: E402
from workflows.lead import LeadWorkflow, workflow_id  # noqa: E402

BIN = Path(sys.executable).parent


async def _ask(client, lead: str) -> None:
    try:
        await leads.get_view(client, lead)
    except Exception:  # noqa: BLE001 - a failed query is fine here; only the histories count
        pass


class _TaskFailures(logging.Handler):
    """Keeps what the SDK's worker logs at WARNING or above: a failed workflow task (a
    deadlock error, a nondeterminism), a failed eviction."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f": {type(record.exc_info[1]).__name__}: {str(record.exc_info[1])[:200]}"
        self.lines.append(text)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--leads", type=int, default=60)
    p.add_argument("--cache", type=int, default=10, help="workflows the worker caches (fewer than --leads)")
    p.add_argument("--delay", type=float, default=2.0, help="LEADFLOW_DECISION_DELAY, seconds")
    p.add_argument("--save", type=Path, help="folder for the histories that do not replay")
    args = p.parse_args()
    failures = _TaskFailures()
    logging.getLogger("temporalio.worker").addHandler(failures)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="leadflow-race-") as tmp:
        store = AuditStore(f"sqlite:///{Path(tmp) / 'audit.db'}")
        keyring = PayloadKeyring({"race": new_key()}, current="race", source="bench")
        converter = data_converter(Settings(database_url=store.url), keyring=keyring, key_store=store)
        env = await WorkflowEnvironment.start_local(dev_server_existing_path=str(BIN / "temporal"),
                                                    data_converter=converter, search_attributes=sa.ALL)
        client = env.client
        settings = Settings(task_queue=f"race-{uuid.uuid4().hex[:8]}", database_url=store.url,
                            decision_delay_seconds=args.delay)
        replayer = Replayer(workflows=[LeadWorkflow], data_converter=converter,
                            workflow_runner=UnsandboxedWorkflowRunner())
        failed: list[str] = []
        try:
            with ThreadPoolExecutor(16) as executor:
                async with build_worker(client, settings, LeadActivities(settings, store), executor,
                                        max_cached_workflows=args.cache):
                    for round_ in range(args.rounds):
                        ids = [f"race{round_}-{uuid.uuid4().hex[:6]}-{i}" for i in range(args.leads)]
                        now = datetime.now(timezone.utc)

                        async def send(lead: str, n: int, kind: str) -> None:
                            await leads.send_events(client, settings, [ActivityEvent(
                                event_id=f"{lead}-e{n}", lead_id=lead, type=kind, occurred_at=now, channel="website")])

                        await asyncio.gather(*(send(lead, 1, "website_visit") for lead in ids))
                        await asyncio.sleep(1.0)
                        await asyncio.gather(*(send(lead, 2, "demo_request") for lead in ids))
                        await asyncio.sleep(max(0.0, args.delay - 0.5))
                        for _ in range(3):
                            await asyncio.gather(*(_ask(client, lead) for lead in ids))
                        await asyncio.sleep(args.delay + 2.0)
                        for lead in ids:
                            history = await client.get_workflow_handle(workflow_id(lead)).fetch_history()
                            result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
                            if result.replay_failure is not None:
                                failed.append(f"{lead}: {str(result.replay_failure)[:240]}")
                                if args.save:
                                    (args.save / f"{lead}.json").write_text(history.to_json())
                        print(f"round {round_ + 1}: {len(failed)} lead(s) so far do not replay", file=sys.stderr)
        finally:
            await env.shutdown()
            store.dispose()
    print(f"{len(failed)} of {args.rounds * args.leads} leads do not replay")
    for line in failed[:10]:
        print(" ", line)
    print(f"{len(failures.lines)} warning(s) or error(s) logged by the SDK's worker")
    for line in failures.lines[:5]:
        print(" ", line[:300])


if __name__ == "__main__":
    asyncio.run(main())
