"""The lead workflow: one durable workflow per lead, a thin shell around `funnel.lead.Lead`.

Signals bring activity events and profile facts (applied once each, in
`occurred_at` order within what has arrived); updates bring presales/sales
commands (validated before anything is written); the lead's deadlines become
one running timer for the next wake-up. Effects of the core go out through
activities: audit entries (batched, awaited), handover with owner
assignment, nurture steps, escalations and opportunities.

The audit goes to the store on a cadence. Each write is an activity and costs
the server about as much as taking the event itself, so the entries in DEFERRABLE
(score changes, duplicates, profile facts, ...) wait, up to `audit_max_lag_seconds`
or AUDIT_BATCH_MAX entries; anything else (a stage change, a command, an SLA, an
outbound message) writes everything pending at once, before deliveries start
and before a command returns. Until written, entries are in the lead's state
(rebuilt from Temporal's history like the rest of it) and readable by the
`audit_tail` query, so `client.read_history` always shows all of them.
Search attributes are refreshed with each write.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from funnel.lead import Lead, LeadView
    from funnel.models import (
        Accept,
        ActivityEvent,
        Close,
        LeadState,
        AuditEntry,
        AuditKind,
        LogContact,
        Outbound,
        OutboundKind,
        ProfileUpdate,
        Qualify,
        Refused,
        Reject,
        Reopen,
        Stage,
    )
    from funnel.scoring_model import ScoringModel
    from workflows import search_attributes as sa
    from workflows.lead_input import CURRENT_VERSION, LeadInput

AUDIT_TIMEOUT = timedelta(seconds=30)
DELIVERY_TIMEOUT = timedelta(minutes=2)
# Deliveries retry until the receiver is back (no attempt limit), at most every 10 minutes.
DELIVERY_RETRY = RetryPolicy(maximum_interval=timedelta(minutes=10))
MODEL_RETRY_DELAY = timedelta(minutes=1)
# Entries that may wait for the next audit write; any other kind writes at once. The
# owner comes back from the handover, which has told presales already (webhook and
# outbox carry it), so it need not cost a write of its own.
DEFERRABLE = frozenset({
    AuditKind.LEAD_CREATED, AuditKind.SCORE_CHANGED, AuditKind.PROFILE_UPDATED,
    AuditKind.DUPLICATE_IGNORED, AuditKind.EVENT_IGNORED, AuditKind.OWNER_ASSIGNED,
})
AUDIT_BATCH_MAX = 200  # write when this many entries wait, whatever their age


def _occurred(item: ActivityEvent | ProfileUpdate) -> datetime:
    """Sort key: events by when they happened; profile facts first (they carry no time)."""
    return item.occurred_at if isinstance(item, ActivityEvent) else datetime.min.replace(tzinfo=timezone.utc)


def workflow_id(lead_id: str) -> str:
    return f"lead-{lead_id}"


@workflow.defn
class LeadWorkflow:
    @workflow.init
    def __init__(self, inp: LeadInput) -> None:
        self._inbox: list[ActivityEvent | ProfileUpdate] = list(inp.pending)
        self._lead: Lead | None = None
        self._work_pending = False  # a command or a delivery left effects for the loop
        self._undelivered: dict[str, Outbound] = {}
        self._written_seq = inp.state.audit_seq if inp.state else 0
        self._upserted: dict[str, object] = {}
        # Version 1 runs (started by older code) replay the old way: every audit batch
        # written at once, the model loaded by a regular activity.
        self._lean = inp.version >= 2
        self._audit_max_lag = timedelta(seconds=inp.audit_max_lag_seconds)
        self._unwritten: list[AuditEntry] = []  # produced, not yet sent to the store
        self._writing: list[AuditEntry] = []  # sent, not yet confirmed
        self._flush_requested = False  # a command, the lag timer or flush_audit wants it now
        self._lag_timer: asyncio.Task | None = None
        self._attributes_due = False  # search attributes follow the audit writes
        self._wake_timers: set[datetime] = set()  # running timers for the lead's wake-ups
        self._wake_due = False

    # ------------------------------------------------------------------ main loop

    @workflow.run
    async def run(self, inp: LeadInput) -> LeadView:
        model = await self._load_model(inp.model)
        now = workflow.now()
        if inp.state is None:
            first_touch = next(
                (i.channel for i in sorted(self._inbox, key=_occurred) if isinstance(i, ActivityEvent) and i.channel),
                None,
            )
            self._lead = Lead.create(inp.lead_id, model, now, channel=first_touch, seen_ids_max=inp.seen_ids_max)
        else:
            self._lead = Lead(inp.state, model, seen_ids_max=inp.seen_ids_max)
            self._lead.use_model(model, now)
        lead = self._lead
        for message in inp.undelivered:
            self._start_delivery(message)
        while True:
            self._apply_inbox()
            lead.tick(workflow.now())
            self._work_pending = False
            await self._carry_out_effects()
            if self._inbox or self._work_pending:
                continue
            if self._lean and self._attributes_due:
                # Caught up with all input, and the store has moved on: visibility follows.
                # (Each upsert is a visibility write on the server; during a burst the
                # next batch would overwrite it at once.)
                self._upsert_search_attributes()
                self._attributes_due = False
            if self._unwritten and (lead.state.stage == Stage.WON or self._history_is_long(inp.max_history_events)):
                self._flush_requested = True  # nothing stays unwritten past the end of a run
                continue
            if lead.state.stage == Stage.WON:
                # Terminal: nothing can happen to a won lead any more. Let running
                # update handlers return and deliveries finish first.
                await workflow.wait_condition(lambda: workflow.all_handlers_finished() and not self._undelivered)
                if not (self._inbox or self._work_pending or self._unwritten):
                    return lead.view()
                continue
            if self._history_is_long(inp.max_history_events):
                await workflow.wait_condition(workflow.all_handlers_finished)
                if not (self._inbox or self._work_pending or self._unwritten):
                    # Deliveries still retrying are carried over and restarted by the next run.
                    workflow.continue_as_new(
                        LeadInput(
                            lead_id=inp.lead_id,
                            state=lead.state,
                            model=lead.model,
                            undelivered=list(self._undelivered.values()),
                            max_history_events=inp.max_history_events,
                            seen_ids_max=inp.seen_ids_max,
                            version=CURRENT_VERSION,
                            audit_max_lag_seconds=inp.audit_max_lag_seconds,
                        )
                    )
                continue
            wake = lead.next_wakeup()
            if self._lean:
                if wake:
                    self._arm_wake_timer(wake)
                self._wake_due = False
                await workflow.wait_condition(
                    lambda: bool(self._inbox) or self._work_pending or self._flush_requested or self._wake_due
                )
                continue  # the loop's tick fires whatever is due
            timeout = max(wake - workflow.now(), timedelta(0)) if wake else None
            try:
                await workflow.wait_condition(
                    lambda: bool(self._inbox) or self._work_pending or self._flush_requested, timeout=timeout
                )
            except asyncio.TimeoutError:
                pass  # a timer is due: the loop's tick fires it

    def _apply_inbox(self) -> None:
        """Apply everything that has arrived, in occurred_at order."""
        assert self._lead is not None
        batch, self._inbox = self._inbox, []
        now = workflow.now()
        for item in sorted(batch, key=_occurred):
            if isinstance(item, ActivityEvent):
                self._lead.ingest(item, now)
            else:
                self._lead.update_profile(item, now)

    async def _carry_out_effects(self) -> None:
        """Write the audit when it is due (awaited: history first), then start
        deliveries (not awaited)."""
        assert self._lead is not None
        while True:
            effects = self._lead.take_effects()
            self._unwritten += effects.audit
            if self._unwritten and self._audit_due(bool(effects.outbound)):
                await self._write_audit()
            for message in effects.outbound:
                self._start_delivery(message)
            if not effects.audit and not effects.outbound:
                break
        if not self._unwritten:
            self._flush_requested = False
            if self._lag_timer is not None:  # nothing waits: a firing timer would wake us for nothing
                self._lag_timer.cancel()
                self._lag_timer = None
        elif self._lean:
            self._arm_lag_timer()
        if not self._lean:
            self._upsert_search_attributes()

    def _audit_due(self, outbound: bool) -> bool:
        if not self._lean or self._flush_requested or outbound or not self._audit_max_lag:
            return True
        if len(self._unwritten) >= AUDIT_BATCH_MAX:
            return True
        return any(entry.kind not in DEFERRABLE for entry in self._unwritten)

    async def _write_audit(self) -> None:
        # A regular activity, not a local one: it is scheduled only by a workflow task
        # that completed, so the rows are always decisions Temporal kept. (A local
        # activity runs inside the task; if that task then fails, e.g. a continue-as-new
        # refused because signals came in, its retry decides anew under the same
        # `lead/seq` ids and the store would keep stale rows.)
        self._writing, self._unwritten = self._unwritten, []
        self._flush_requested = False
        await workflow.execute_activity(
            "record_audit",
            self._writing,
            result_type=int,
            start_to_close_timeout=AUDIT_TIMEOUT,
            retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=30)),
        )
        self._written_seq = self._writing[-1].seq
        self._writing = []
        self._attributes_due = True

    def _arm_wake_timer(self, wake: datetime) -> None:
        """Keep a timer for the lead's next wake-up without restarting it on every
        event: a wait with a timeout would start a timer and cancel it again for each
        signal (two history events and two timer writes per event)."""
        if any(pending <= wake for pending in self._wake_timers):
            return  # an earlier or equal timer wakes the loop, which then looks again
        self._wake_timers.add(wake)
        asyncio.create_task(self._wake_at(wake))

    async def _wake_at(self, wake: datetime) -> None:
        await workflow.sleep(max(wake - workflow.now(), timedelta(0)))
        self._wake_timers.discard(wake)
        self._wake_due = True

    def _arm_lag_timer(self) -> None:
        """One timer per write cycle: started by the first entry that waits, cancelled
        when a write leaves nothing waiting, never restarted per event (a timer per
        event would cost as much as the writes it saves)."""
        if self._lag_timer is None:
            self._lag_timer = asyncio.create_task(self._flush_after_lag())

    async def _flush_after_lag(self) -> None:
        await workflow.sleep(self._audit_max_lag)
        self._lag_timer = None
        if self._unwritten:
            self._flush_requested = True

    def _start_delivery(self, message: Outbound) -> None:
        """Deliver beside the main loop: a webhook that is down retries on its own
        and never holds up events, commands or timers of the lead."""
        self._undelivered[message.message_id] = message
        asyncio.create_task(self._deliver(message))

    async def _deliver(self, message: Outbound) -> None:
        if message.kind == OutboundKind.HANDOVER:
            owner = await workflow.execute_activity(
                "hand_over", message, result_type=str, start_to_close_timeout=DELIVERY_TIMEOUT,
                retry_policy=DELIVERY_RETRY,
            )
            assert self._lead is not None
            self._lead.assign_owner(owner, workflow.now())
            self._work_pending = True  # the owner's audit entry goes out with the loop
        else:
            await workflow.execute_activity(
                "deliver", message, start_to_close_timeout=DELIVERY_TIMEOUT, retry_policy=DELIVERY_RETRY
            )
        del self._undelivered[message.message_id]

    async def _load_model(self, carried: ScoringModel | None) -> ScoringModel:
        """The worker's current model; a broken model file never fails a lead."""
        # A local activity: reading the model file is a pure read, so running it inside
        # the workflow task is safe, and it spares every new run a round trip through
        # the server (a regular activity costs four history events and a task).
        load = workflow.execute_local_activity if self._lean else workflow.execute_activity
        while True:
            try:
                return await load(
                    "load_scoring_model",
                    result_type=ScoringModel,
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=RetryPolicy(maximum_attempts=3),
                )
            except ActivityError as err:
                if carried is not None:
                    workflow.logger.warning("keeping scoring model %s: %s", carried.ref, err.cause)
                    return carried
                workflow.logger.error("cannot load scoring model, retrying: %s", err.cause)
                await workflow.sleep(MODEL_RETRY_DELAY)

    def _history_is_long(self, limit: int) -> bool:
        info = workflow.info()
        return info.is_continue_as_new_suggested() or info.get_current_history_length() >= limit

    def _upsert_search_attributes(self) -> None:
        assert self._lead is not None
        s = self._lead.state
        wanted = {
            sa.LEAD_STAGE.name: (sa.LEAD_STAGE, s.stage.value),
            sa.LEAD_SCORE.name: (sa.LEAD_SCORE, float(s.score.total)),
            sa.LEAD_OWNER.name: (sa.LEAD_OWNER, s.owner),
            sa.LEAD_CHANNEL.name: (sa.LEAD_CHANNEL, s.channel),
        }
        updates = []
        for name, (key, value) in wanted.items():
            if self._upserted.get(name, ...) != value:
                updates.append(key.value_set(value) if value is not None else key.value_unset())
                self._upserted[name] = value
        if updates:
            workflow.upsert_search_attributes(updates)

    # ------------------------------------------------------------------ signals

    @workflow.signal
    def event(self, event: ActivityEvent) -> None:
        self._inbox.append(event)

    @workflow.signal
    def events(self, events: list[ActivityEvent]) -> None:
        self._inbox.extend(events)

    @workflow.signal
    def profile(self, update: ProfileUpdate) -> None:
        self._inbox.append(update)

    # ------------------------------------------------------------------ queries

    @workflow.query
    def view(self) -> LeadView:
        if self._lead is None:
            raise ApplicationError("lead is starting; ask again in a moment")
        return self._lead.view()

    @workflow.query
    def audit_tail(self) -> list[AuditEntry]:
        """Entries the store may not have yet (waiting or being written), oldest first."""
        return self._writing + self._unwritten

    # ------------------------------------------------------------------ updates

    @workflow.update
    async def flush_audit(self) -> int:
        """Write every audit entry so far to the store now; returns the last seq written."""
        await workflow.wait_condition(lambda: self._lead is not None)
        assert self._lead is not None
        target = self._lead.state.audit_seq
        self._flush_requested = True
        self._work_pending = True
        await workflow.wait_condition(lambda: self._written_seq >= target)
        return self._written_seq

    async def _execute(self, command) -> LeadView:
        await workflow.wait_condition(lambda: self._lead is not None)
        assert self._lead is not None
        try:
            self._lead.execute(command, workflow.now())
        except Refused as refused:
            raise ApplicationError(str(refused), type="Refused", non_retryable=True) from None
        target = self._lead.state.audit_seq
        self._flush_requested = True  # the caller reads the history it made
        self._work_pending = True
        await workflow.wait_condition(lambda: self._written_seq >= target)
        return self._lead.view()

    def _validate(self, command) -> None:
        if self._lead is None:
            return  # still starting: the handler waits and checks again
        try:
            self._lead.check(command)
        except Refused as refused:
            raise ApplicationError(str(refused), type="Refused", non_retryable=True) from None

    @workflow.update
    async def accept(self, command: Accept) -> LeadView:
        return await self._execute(command)

    @accept.validator
    def _check_accept(self, command: Accept) -> None:
        self._validate(command)

    @workflow.update
    async def reject(self, command: Reject) -> LeadView:
        return await self._execute(command)

    @reject.validator
    def _check_reject(self, command: Reject) -> None:
        self._validate(command)

    @workflow.update
    async def qualify(self, command: Qualify) -> LeadView:
        return await self._execute(command)

    @qualify.validator
    def _check_qualify(self, command: Qualify) -> None:
        self._validate(command)

    @workflow.update
    async def contact(self, command: LogContact) -> LeadView:
        return await self._execute(command)

    @contact.validator
    def _check_contact(self, command: LogContact) -> None:
        self._validate(command)

    @workflow.update
    async def close(self, command: Close) -> LeadView:
        return await self._execute(command)

    @close.validator
    def _check_close(self, command: Close) -> None:
        self._validate(command)

    @workflow.update
    async def reopen(self, command: Reopen) -> LeadView:
        return await self._execute(command)

    @reopen.validator
    def _check_reopen(self, command: Reopen) -> None:
        self._validate(command)


UPDATE_FOR_COMMAND = {
    "accept": LeadWorkflow.accept,
    "reject": LeadWorkflow.reject,
    "qualify": LeadWorkflow.qualify,
    "contact": LeadWorkflow.contact,
    "close": LeadWorkflow.close,
    "reopen": LeadWorkflow.reopen,
}
