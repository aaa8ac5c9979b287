"""Activities of a model rollout (workflows/rollout.py): find the running leads (and
accounts, whose rules come from the model too) still on another model version in Temporal
visibility, and tell them to switch."""

from __future__ import annotations

import asyncio
import base64

from temporalio import activity
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from funnel.models import Actor
from workflows import search_attributes as sa
from workflows.lead_input import ModelChange

SIGNAL_CONCURRENCY = 10


def behind_query(ref: str, task_queue: str) -> str:
    """Running leads and accounts of this task queue (this deployment) not on model version `ref`."""
    for value in (ref, task_queue):
        if "'" in value or "\\" in value:
            raise ValueError(f"invalid value {value!r}")
    return (f"WorkflowType IN ('LeadWorkflow', 'AccountWorkflow') AND ExecutionStatus = 'Running' AND "
            f"TaskQueue = '{task_queue}' AND "
            f"({sa.LEAD_MODEL.name} != '{ref}' OR {sa.LEAD_MODEL.name} IS NULL)")


class RolloutActivities:
    def __init__(self, client: Client):
        self.client = client

    @activity.defn(name="leads_behind")
    async def leads_behind(self, ref: str, page_token: str | None, page_size: int) -> dict:
        """One page of running leads not on `ref`, and the token of the next page (None: last page)."""
        token = base64.b64decode(page_token) if page_token else None
        query = behind_query(ref, activity.info().task_queue)
        pages = self.client.list_workflows(query, page_size=page_size, next_page_token=token)
        await pages.fetch_next_page()
        ids = [execution.id for execution in pages.current_page or []]
        following = pages.next_page_token
        return {"workflow_ids": ids, "next_page_token": base64.b64encode(following).decode() if following else None}

    @activity.defn(name="count_leads_behind")
    async def count_leads_behind(self, ref: str) -> int:
        return (await self.client.count_workflows(behind_query(ref, activity.info().task_queue))).count

    @activity.defn(name="signal_model_change")
    async def signal_model_change(self, workflow_ids: list[str], ref: str, by: Actor) -> int:
        """Signal each lead; a lead that has completed meanwhile is skipped. Returns how many were told."""
        gate = asyncio.Semaphore(SIGNAL_CONCURRENCY)
        change = ModelChange(ref=ref, by=by)

        async def tell(workflow_id: str) -> int:
            async with gate:
                try:
                    await self.client.get_workflow_handle(workflow_id).signal("model_changed", change)
                    return 1
                except RPCError as err:
                    if err.status == RPCStatusCode.NOT_FOUND:
                        return 0  # won (completed) since it was listed
                    raise

        return sum(await asyncio.gather(*(tell(workflow_id) for workflow_id in workflow_ids)))

    def all(self) -> list:
        return [self.leads_behind, self.count_leads_behind, self.signal_model_change]
