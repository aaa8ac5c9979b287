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
