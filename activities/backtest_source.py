"""A backtest's leads, read from the store in shards by the processes that replay them.

Reading the store is about a seventh of a backtest's CPU (bench/backtest.py). Read in the
parent and replayed in workers, it runs on one core while the others wait; read by each worker
for its own range of lead ids, it runs beside the replays, and no lead log crosses a
process boundary. A store only this process can open (in-memory SQLite) is read here.
"""

from __future__ import annotations

import gc
from datetime import datetime, timedelta
from typing import Sequence

from sqlalchemy.engine import make_url

from funnel import backtest
from funnel.scoring_model import ScoringModel

SHARDS_PER_WORKER = 8  # small enough that one slow shard does not leave a core idle at the end
MIN_SHARD = 200  # leads: fewer cost more in queries and process hand-offs than they save

# In each worker process: its own store (opened on first use) and the models, sent once.
_STORE: dict[str, object] = {}
_MODELS: dict[str, ScoringModel] = {}


def shareable(url: str) -> bool:
    """Whether another process can open the store at `url` (not an in-memory SQLite)."""
    parsed = make_url(url)
    database = parsed.database or ""
    return not (parsed.get_backend_name() == "sqlite" and (database in ("", ":memory:") or "mode=memory" in url))


def shards(lead_ids: Sequence[str], count: int) -> list[tuple[str, str]]:
    """Contiguous ranges (first id, last id) of `lead_ids`, sorted as the database sorts them
    (AuditStore.created_leads), about `count` of them, each with at least MIN_SHARD leads
    (but the last)."""
    if not lead_ids:
        return []
    size = max(MIN_SHARD, -(-len(lead_ids) // max(1, count)))
    return [(lead_ids[i], lead_ids[min(i + size, len(lead_ids)) - 1]) for i in range(0, len(lead_ids), size)]


def lead_logs_of(store, leads: tuple[str, str] | None = None) -> list[backtest.LeadLog]:
    """Every logged lead (with an id in `leads`, when given) as the backtest replays it
    (funnel/backtest.py): its decisions from the audit, its events and profile updates
    from the event log. With the cyclic garbage collector paused: reading builds about ten
    objects per row and keeps them all, so its passes over them free nothing (reading took
    ~15% longer with it)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        return backtest.lead_logs(store.report_entries(kinds=backtest.DECISION_KINDS, leads=leads),
                                  store.replay_log(leads=leads))
    finally:
        if paused:
            gc.enable()


def read_shard(store, leads: tuple[str, str] | None, since: datetime | None, until: datetime
               ) -> list[backtest.LeadLog]:
    """The logs of the leads with ids in `leads` (all when None) created from `since` to `until`."""
    return [log for log in lead_logs_of(store, leads)
            if (since is None or log.created_at >= since) and log.created_at < until]


def _start(url: str, models: dict[str, ScoringModel]) -> None:
    _MODELS.clear()
    _MODELS.update(models)
    _STORE.pop(url, None)


def _replay_shard(url: str, leads: tuple[str, str], since: datetime | None, until: datetime,
                  delay: timedelta) -> dict[str, list[backtest.Replay]]:
    from activities.store import AuditStore

    store = _STORE.get(url)
    if store is None:
        store = _STORE[url] = AuditStore(url)
    logs = read_shard(store, leads, since, until)
    return {name: [backtest.replay(log, model, until, delay) for log in logs] for name, model in _MODELS.items()}


def replay_store(store, models: dict[str, ScoringModel], until: datetime, since: datetime | None = None,
                 decision_delay: timedelta = timedelta(0), workers: int = 1) -> dict[str, list[backtest.Replay]]:
    """Every lead created from `since` to `until` in `store` (an AuditStore), replayed under
    every model up to `until`: funnel.backtest.replay_all over the same logs, read in shards
    by `workers` processes. Runs in lead id order, as replay_all's are."""
    if workers <= 1 or not shareable(store.url):
        return backtest.replay_all(read_shard(store, None, since, until), models, until, decision_delay)
    lead_ids = store.created_leads(since, until)
    parts = shards(lead_ids, workers * SHARDS_PER_WORKER)
    if len(parts) <= 1:
        return backtest.replay_all(read_shard(store, None, since, until), models, until, decision_delay)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    found: dict[str, list[backtest.Replay]] = {name: [] for name in models}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(), initializer=_start,
                             initargs=(store.url, models)) as pool:
        count = len(parts)
        for part in pool.map(_replay_shard, [store.url] * count, parts, [since] * count, [until] * count,
                             [decision_delay] * count):
            for name, runs in part.items():
                found[name] += runs
    return found
