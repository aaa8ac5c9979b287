"""A lead workflow whose code changed incompatibly: it sleeps before loading the
model. Replaying a saved history with it must fail (test of the replay test)."""

from datetime import timedelta

from temporalio import workflow


@workflow.defn(name="LeadWorkflow")
class LeadWorkflow:
    @workflow.run
    async def run(self, inp: dict) -> None:
        await workflow.sleep(timedelta(hours=1))
