"""Rolling a scoring model version out to every running lead, as a durable workflow.

`leadflow model apply` (and `POST /models`) record the version in the store; new
leads use it at once. This workflow then tells every running lead that is still on
another version, page by page from Temporal visibility (`LeadModel`), at a bounded
rate so a rollout to 10,000 leads leaves room for event ingestion. It is durable, so
a rollout survives worker and client restarts; applying the same version again
continues it. Each lead re-scores itself and audits the change (funnel.lead.Lead.use_model).

Workflow code: only workflow time, timers and activities.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from funnel.models import Actor

PAGE = 100  # leads per visibility page and per signalling activity
PAGES_PER_RUN = 50  # continue-as-new after this many pages: history stays small
PASSES = 5  # listing again finds leads that started (or had not caught up) meanwhile


class RolloutProgress(BaseModel):
    ref: str
    signalled: int = 0  # leads told to switch (a lead told twice is counted twice)
    passes: int = 0
    behind: int | None = None  # leads still on another version at the last look
    done: bool = False


class RolloutInput(BaseModel):
    ref: str
    by: Actor
    rate_per_second: float = Field(default=20.0, gt=0)
    progress: RolloutProgress | None = None
    page_token: str | None = None  # where the current pass goes on (base64 of visibility's token)


def rollout_id(ref: str, task_queue: str) -> str:
    """One rollout per version and deployment (leads of one task queue)."""
    return f"model-rollout-{task_queue}-{ref}"


@workflow.defn
class ModelRolloutWorkflow:
    def __init__(self) -> None:
        self._progress: RolloutProgress | None = None

    @workflow.run
    async def run(self, inp: RolloutInput) -> RolloutProgress:
        progress = self._progress = inp.progress or RolloutProgress(ref=inp.ref)
        token = inp.page_token
        pages = 0
        while progress.passes < PASSES:
            page = await workflow.execute_activity(
                "leads_behind", args=[inp.ref, token, PAGE], result_type=dict,
                start_to_close_timeout=timedelta(minutes=1), retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=30)),
            )
            ids, token = page["workflow_ids"], page["next_page_token"]
            if ids:
                progress.signalled += await workflow.execute_activity(
                    "signal_model_change", args=[ids, inp.ref, inp.by], result_type=int,
                    start_to_close_timeout=timedelta(minutes=2),
                    retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=30)),
                )
                await workflow.sleep(timedelta(seconds=len(ids) / inp.rate_per_second))
            if token is None:  # the end of this pass: look again for leads still behind
                progress.passes += 1
                progress.behind = await workflow.execute_activity(
                    "count_leads_behind", inp.ref, result_type=int, start_to_close_timeout=timedelta(minutes=1),
                )
                if progress.behind == 0:
                    break
                await workflow.sleep(timedelta(seconds=5))  # leads told just now need a moment to switch
            pages += 1
            if pages >= PAGES_PER_RUN:
                workflow.continue_as_new(inp.model_copy(update={"progress": progress, "page_token": token}))
        progress.done = True
        return progress

    @workflow.query
    def progress(self) -> RolloutProgress | None:
        return self._progress
