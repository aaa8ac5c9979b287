"""A worker on a server that lacks a search attribute the leads upsert: it adds it (a dev
server started with `--search-attribute` registers them only on a new database, so an
upgrade that adds one would otherwise wedge every lead), or, where it may not, says which to
create and does not start."""

from __future__ import annotations

import pytest
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from tests.conftest import binary
from worker import MissingSearchAttributes, ensure_search_attributes
from workflows import search_attributes as sa


async def names(client) -> set[str]:
    found = await client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace=client.namespace))
    return set(found.custom_attributes)


async def test_the_worker_adds_the_search_attributes_a_server_lacks(monkeypatch):
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=binary("temporal"),
                                                search_attributes=[sa.LEAD_STAGE])  # as an older version made it
    try:
        client = env.client
        assert sa.LEAD_CREATED.name not in await names(client)
        added = await ensure_search_attributes(client)
        assert set(added) == {key.name for key in sa.ALL} - {sa.LEAD_STAGE.name}
        assert {key.name for key in sa.ALL} <= await names(client)
        assert await ensure_search_attributes(client) == []  # nothing more to do

        async def refused(*args, **kwargs):
            raise RPCError("permission denied", RPCStatusCode.PERMISSION_DENIED, b"")

        monkeypatch.setattr(sa, "ALL", [*sa.ALL, sa.SearchAttributeKey.for_keyword("LeadNewThing")])
        monkeypatch.setattr(type(client.operator_service), "add_search_attributes", refused)
        with pytest.raises(MissingSearchAttributes, match=r"lacks the search attributes LeadNewThing \(Keyword\)"):
            await ensure_search_attributes(client)
    finally:
        await env.shutdown()


def test_a_started_worker_hides_what_it_holds_for_good_from_the_collector():
    """worker.freeze_heap: what is alive then is frozen (full collections no longer walk
    it), and what was already garbage is collected first rather than kept for ever."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent("""
        import gc, weakref
        import worker

        class Node:
            pass

        kept = Node()
        dead = Node()
        dead.me = dead  # a cycle only the collector frees
        gone = weakref.ref(dead)
        del dead
        gc.disable()  # nothing collects it before freeze_heap does
        worker.freeze_heap()
        assert gone() is None, "garbage made before the freeze was kept"
        assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
        assert not any(o is kept for g in range(3) for o in gc.get_objects(g)), "a live object is still walked"
        print("ok")
    """)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
