"""The baseline of bench/ingest.py: a workflow that only counts `event` signals.

It receives the same ActivityEvent payload as the lead workflow (so the data
converter does the same work) and does nothing else: no activities, no search
attributes, no timers. It never finishes; the benchmark reads `count`.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from funnel.models import ActivityEvent


@workflow.defn
class CountingWorkflow:
    def __init__(self) -> None:
        self._count = 0

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False)

    @workflow.signal
    def event(self, event: ActivityEvent) -> None:
        self._count += 1

    @workflow.query
    def count(self) -> int:
        return self._count
