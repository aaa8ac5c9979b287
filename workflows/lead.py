"""The lead workflow: one durable workflow per lead, a thin shell around `funnel.lead.Lead`.

Signals bring activity events and profile facts (applied once each; what arrives
together is applied together and scored in `occurred_at` order by the core), and
model changes; updates bring presales/sales commands (validated before anything
is written); the lead's deadlines become one running timer for the next wake-up.
Effects of the core go out through activities: the audit (on a cadence, see
audit_cadence.py) and deliveries beside the loop (deliveries.py).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from funnel.lead import Lead, LeadView
    from funnel.models import (
        Accept,
        ActivityEvent,
        AuditEntry,
        Close,
        LeadState,
        LogContact,
        ProfileUpdate,
        Qualify,
        Refused,
        Reject,
        Reopen,
        Stage,
    )
    from funnel.personal_data import EraseRequest, ErasureReport
    from funnel.scoring_model import ScoringModel
    from workflows import search_attributes as sa
    from workflows.audit_cadence import AuditCadence
    from workflows.deliveries import Deliveries
    from workflows.account_feed import AccountFeed
    from funnel.accounts import contact_snapshot, contact_snapshots
    from workflows.lead_input import CURRENT_VERSION, LeadInput, ModelChange, RunBehaviour, ShredPending, behaviour
    from workflows.wake_timer import WakeTimer

MODEL_RETRY_DELAY = timedelta(minutes=1)
# Inputs applied per round of the loop: each round ends in an audit write (an activity),
# so one workflow task never does more than this much work, whatever the backlog (a task
# that does not yield within 2 s fails on the SDK's deadlock detector, for ever).
INPUT_PER_ROUND = 200
# Inputs a continue-as-new carries into the next run (~500 bytes each, far below the 2 MB
# payload limit); a bigger backlog is worked off a round at a time first.
CARRY_MAX = 1000
ERASURE_TIMEOUT = timedelta(minutes=2)
# A v11 lead is created at its starter's time (so the search attributes it was started with
# hold) when that is this close to its first task; else (a backlog, a skewed clock, a
# time-skipping test server) at the task's time, and it upserts what differs.
START_CLOCK_TOLERANCE = timedelta(minutes=1)


def workflow_id(lead_id: str) -> str:
    return f"lead-{lead_id}"


def core_options(run: RunBehaviour) -> dict:
    """How the core decides for a run of this behaviour (funnel.lead.Lead's flags): one place,
    so a new run and a continued one, and the starter's prediction, always agree."""
    return {"explain": run.explains, "orders_slas": run.orders_slas, "meets_late_slas": run.meets_late_slas}


def new_lead(inp: LeadInput, model: ScoringModel, first: list[ActivityEvent | ProfileUpdate], created: datetime,
             decision_delay: timedelta) -> Lead:
    """A lead as its first run creates it, its channel that of its earliest event that names
    one among the input it starts with. (Its starter predicts its search attributes with it.)"""
    events = sorted((i for i in first if isinstance(i, ActivityEvent) and i.channel), key=lambda e: e.occurred_at)
    return Lead.create(inp.lead_id, model, created, channel=events[0].channel if events else None,
                       seen_ids_max=inp.seen_ids_max, decision_delay=decision_delay,
                       **core_options(behaviour(inp.version)))


def _update_id() -> str | None:
    info = workflow.current_update_info()
    return info.id if info is not None else None


@workflow.defn
class LeadWorkflow:
    @workflow.init
    def __init__(self, inp: LeadInput) -> None:
        self._behaviour = behaviour(inp.version)
        self._inbox: list[ActivityEvent | ProfileUpdate] = list(inp.pending)
        self._model_changes: list[ModelChange] = []
        self._lead: Lead | None = None
        self._work_pending = False  # a command or a delivery left effects for the loop
        self._upserted: dict[str, object] = {}
        lag = None if inp.audit_max_lag_seconds is None else timedelta(seconds=inp.audit_max_lag_seconds)
        self._audit = AuditCadence(lag,
                                   written_seq=inp.state.audit_seq if inp.state else 0,
                                   enabled=self._behaviour.audit_cadence, swept=self._behaviour.swept_audit,
                                   lead_id=inp.lead_id, defers_deadlines=self._behaviour.defers_deadlines)
        self._wake = WakeTimer()
        self._deliveries = Deliveries(self._owner_assigned, assign_first=self._behaviour.decisions_and_owners)
        self._account_feed = (AccountFeed(inp.account, per_account=self._behaviour.departs_accounts)
                              if self._behaviour.feeds_accounts else None)
        # Erasure: inputs taken and applied so far (an erasure waits for what came before it),
        # the old key generations still to destroy, and whether this run must end for a new one.
        self._taken = len(self._inbox)
        self._applied = 0
        self._shred: ShredPending | None = inp.shred
        self._shred_delay = inp.shred_delay_seconds
        self._restart = False
        self._slept = timedelta(0)  # how long the loop last waited for work (v12: a quiet spell?)

    # ------------------------------------------------------------------ the lead's life

    @workflow.run
    async def run(self, inp: LeadInput) -> LeadView:
        lead = self._lead = await self._start_or_go_on(inp)
        if self._behaviour.starts_with_attributes:
            # Set by the starter, or inherited from the run before: upsert only what differs.
            self._upserted = sa.as_set(workflow.info().typed_search_attributes)
        for message in inp.undelivered:
            self._deliveries.start(message)
        if self._account_feed is not None:
            self._account_feed.resume(inp.account_untold)
        if self._shred is not None:
            asyncio.create_task(self._shred_old_keys(inp.lead_id, self._shred))
        while True:
            if self._restart or (self._behaviour.decisions_and_owners
                                 and self._history_is_long(inp.max_history_events)):
                await self._continue_as_new(inp)  # returns only when the backlog is too big to carry
            await self._take_what_arrived()
            await self._carry_out_effects()
            self._feed_account()
            if self._inbox or self._work_pending or self._model_changes:
                continue
            self._refresh_search_attributes()
            if (lead.state.stage == Stage.WON or self._history_is_long(inp.max_history_events)
                    or self._quiet_and_long(inp)):
                if self._audit.waiting:
                    self._audit.flush_requested = True  # nothing stays unwritten past a run
                    continue
                if lead.state.stage == Stage.WON:
                    # Terminal: nothing can happen to a won lead any more. Let running update
                    # handlers return and deliveries finish first.
                    await workflow.wait_condition(
                        lambda: workflow.all_handlers_finished() and not self._deliveries.undelivered
                        and (self._shred is None or self._restart) and self._account_heard())
                    if not self._has_work():
                        return lead.view()
                    continue
                await workflow.wait_condition(workflow.all_handlers_finished)
                if not self._has_work():
                    # Deliveries still retrying are carried over and restarted by the next run.
                    workflow.continue_as_new(self._next_run(inp))
                continue
            asleep_at = workflow.now()
            await self._wait_for_work(lead.next_wakeup())
            self._slept = workflow.now() - asleep_at

    async def _start_or_go_on(self, inp: LeadInput) -> Lead:
        if inp.model is not None and self._behaviour.model_from_input:
            model = inp.model  # see RunBehaviour.model_from_input
        else:
            model = await self._load_model(inp.model)
        now = workflow.now()
        delay = timedelta(seconds=inp.decision_delay_seconds) if self._behaviour.decisions_and_owners else timedelta(0)
        if inp.state is None:
            created = now
            if (self._behaviour.starts_with_attributes and inp.created_at is not None
                    and abs(now - inp.created_at) <= START_CLOCK_TOLERANCE):
                created = min(inp.created_at, now)  # as its starter predicted (never after its first task)
            return new_lead(inp, model, self._inbox, created, delay)
        lead = Lead(inp.state, model, seen_ids_max=inp.seen_ids_max, decision_delay=delay,
                    **core_options(self._behaviour))
        lead.use_model(model, now)
        return lead

    async def _take_what_arrived(self) -> None:
        """Model changes, then the inbox (events of one batch scored together), then timers."""
        assert self._lead is not None
        await self._take_model_changes()
        if self._behaviour.decisions_and_owners:
            batch, self._inbox = self._inbox[:INPUT_PER_ROUND], self._inbox[INPUT_PER_ROUND:]
            if self._inbox:
                self._audit.flush_requested = True  # the round ends in a write: the task yields
        else:
            batch, self._inbox = self._inbox, []
        now = self._now()
        applied: frozenset[str] = frozenset()
        if self._behaviour.decisions_and_owners and (
                forgotten := self._lead.forgets([e.event_id for e in batch if isinstance(e, ActivityEvent)])):
            applied = await self._applied_before(forgotten)
        self._lead.take(batch, now, applied)
        if self._behaviour.logs_input:
            self._audit.log(batch, now)
        self._applied += len(batch)
        self._work_pending = False

    async def _applied_before(self, event_ids: list[str]) -> frozenset[str]:
        """Which of these ids, older than the lead's memory, the audit store shows applied:
        an event id is applied at most once, ever. (Ids not written yet are always within the
        memory: at most a few hundred entries wait for a write.) A regular activity, see
        RunBehaviour.local_reads: only leads past SEEN_IDS_MAX ids pay for it."""
        assert self._lead is not None
        found = await workflow.execute_activity(
            "applied_event_ids", args=[self._lead.state.lead_id, event_ids], result_type=list[str],
            start_to_close_timeout=timedelta(seconds=30), retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10)),
        )
        return frozenset(found)

    async def _take_model_changes(self) -> None:
        assert self._lead is not None
        while self._model_changes:
            change = self._model_changes.pop(0)
            if change.ref != self._lead.state.model_ref:
                model = await self._load_model(self._lead.model, ref=change.ref)
                self._lead.use_model(model, self._now(), by=change.by)

    async def _carry_out_effects(self) -> None:
        """Write the audit when it is due (awaited: history first), then start deliveries."""
        assert self._lead is not None
        while True:
            effects = self._lead.take_effects()
            self._audit.add(effects.audit)
            assigned = None
            if self._audit.due(bool(effects.outbound)):
                assign = ([m for m in effects.outbound if self._deliveries.needs_owner(m)]
                          if self._behaviour.assigns_in_write else [])
                assigned = await self._audit.write(assign)
            for message in effects.outbound:
                self._deliveries.start(message, assigned)
            if not effects.audit and not effects.outbound:
                break
        self._audit.settle()
        if not self._behaviour.audit_cadence:
            self._refresh_search_attributes(always=True)

    def _feed_account(self) -> None:
        """Tell the lead's account (if it has one) what it reads of the lead, when that changed,
        and (v9) the account it left that it is gone."""
        feed = self._account_feed
        if feed is None or self._lead is None:
            return
        s = self._lead.state
        about = (s.lead_id, s.profile, s.profile_seen, s.stage.value, s.score.total, s.score.engagement, s.audit_seq,
                 self._lead.model, self._now())
        departs = self._behaviour.departs_accounts
        told = contact_snapshots(*about, feed.account) if departs else [contact_snapshot(*about)]
        for snapshot in told:
            feed.offer(snapshot)

    def _account_heard(self) -> bool:
        """Whether a won lead may end: (v9) its account has heard its last word."""
        return self._account_feed is None or not self._behaviour.departs_accounts or self._account_feed.idle

    async def _continue_as_new(self, inp: LeadInput) -> None:
        """A long run ends whatever keeps arriving: input not applied yet waits in the inbox
        and goes to the next run; everything decided so far is written first, and running
        command handlers finish. Returns without ending the run only while the inbox is too
        big to carry (the loop then works off a round)."""
        if len(self._inbox) > CARRY_MAX:
            return
        while True:
            await self._take_model_changes()  # few, and they decide: applied in this run
            self._audit.flush_requested = True
            # Cleared before the write, not after: an owner or a command arriving while it
            # is in flight sets it again, and its entries go out before the run ends.
            self._work_pending = False
            await self._carry_out_effects()
            await workflow.wait_condition(
                lambda: workflow.all_handlers_finished() or self._work_pending or bool(self._model_changes))
            if not (self._work_pending or self._model_changes or self._audit.waiting):
                break
        # Deliveries still retrying are carried over and restarted by the next run.
        workflow.continue_as_new(self._next_run(inp))

    async def _wait_for_work(self, wake) -> None:
        def work() -> bool:
            return bool(self._inbox or self._model_changes) or self._work_pending or self._audit.flush_requested

        if self._behaviour.audit_cadence:
            self._wake.arm(wake)
            await workflow.wait_condition(lambda: work() or self._wake.due)
            return
        timeout = max(wake - workflow.now(), timedelta(0)) if wake else None
        try:
            await workflow.wait_condition(work, timeout=timeout)
        except TimeoutError:
            self._wake.note_fired(wake)  # a timer is due: the loop's tick fires it

    def _now(self) -> datetime:
        """Workflow time, never earlier than a wake-up that has fired: see WakeTimer.fired_for
        (a firing the SDK stamped with the previous task's time). With correct stamps, this is
        workflow.now()."""
        now, fired = workflow.now(), self._wake.fired_for
        return fired if fired is not None and fired > now else now

    def _has_work(self) -> bool:
        return bool(self._inbox or self._work_pending or self._audit.waiting or self._model_changes
                    or self._restart)

    def _next_run(self, inp: LeadInput) -> LeadInput:
        assert self._lead is not None
        return LeadInput(
            lead_id=inp.lead_id, state=self._lead.state, model=self._lead.model,
            undelivered=list(self._deliveries.undelivered.values()), max_history_events=inp.max_history_events,
            quiet_history_events=inp.quiet_history_events, quiet_after_seconds=inp.quiet_after_seconds,
            pending=list(self._inbox),
            account=self._account_feed.account if self._account_feed else inp.account,
            account_untold=self._account_feed.untold() if self._account_feed else [],
            seen_ids_max=inp.seen_ids_max, version=CURRENT_VERSION, audit_max_lag_seconds=inp.audit_max_lag_seconds,
            decision_delay_seconds=inp.decision_delay_seconds,
            shred_delay_seconds=inp.shred_delay_seconds, shred=self._shred,
        )

    def _owner_assigned(self, owner: str, team: str) -> None:
        assert self._lead is not None
        self._lead.assign_owner(owner, self._now(), team)
        self._work_pending = True  # the owner's audit entry goes out with the loop

    async def _load_model(self, carried: ScoringModel | None, ref: str | None = None) -> ScoringModel:
        """The active model (or version `ref`); a broken or missing model never fails a lead."""
        # Once per run (and per model change): a regular activity, see RunBehaviour.local_reads.
        load = workflow.execute_local_activity if self._behaviour.local_reads else workflow.execute_activity
        while True:
            try:
                return await load(
                    "load_scoring_model",
                    args=[ref] if ref else [],
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

    def _quiet_and_long(self, inp: LeadInput) -> bool:
        """(v12) Woken after a quiet spell, with a run worth shortening: the worker has most
        likely evicted the lead while it slept and will again, and replays the whole run at
        each wake-up, so the next run starts short (bench/long_leads.py: ~0.4 ms of worker
        CPU per history event replayed; a continue-as-new ~70 ms of worker and server CPU).
        Not while a delivery or an account's feed is under way: its activity would be left
        behind by the run and started again by the next (the test server's clock even stalls
        on it); a later quiet wake-up will do. Deterministic: workflow time, the history's
        length and workflow state, as of this task."""
        return (self._behaviour.continues_when_quiet and inp.quiet_history_events > 0
                and self._slept >= timedelta(seconds=inp.quiet_after_seconds)
                and workflow.info().get_current_history_length() >= inp.quiet_history_events
                and not self._deliveries.undelivered and (self._account_feed is None or self._account_feed.idle))

    def _refresh_search_attributes(self, always: bool = False) -> None:
        """Visibility follows the store: refreshed once caught up after a write (each upsert
        is a visibility write on the server; during a burst the next batch would overwrite it).
        Version 4 leads rarely write themselves (the sweeper does): they refresh when the
        stage, owner, channel or model changed, the score going along; a score change alone
        waits for the next of these or of the lead's own writes (`show` is always live)."""
        wrote = always or self._audit.wrote
        if not (wrote or self._behaviour.swept_audit):
            return
        self._audit.wrote = False
        assert self._lead is not None
        wanted = sa.of_lead(self._lead.state, with_model=self._behaviour.decisions_and_owners,
                            with_created=self._behaviour.created_attribute)
        changed = [key for key, value in wanted.items() if self._upserted.get(key.name, ...) != value]
        if not wrote and all(key is sa.LEAD_SCORE for key in changed):
            return
        updates = []
        for key in changed:
            value = wanted[key]
            updates.append(key.value_set(value) if value is not None else key.value_unset())
            self._upserted[key.name] = value
        if updates:
            workflow.upsert_search_attributes(updates)

    # ------------------------------------------------------------------ signals

    @workflow.signal
    def event(self, event: ActivityEvent) -> None:
        self._inbox.append(event)
        self._taken += 1

    @workflow.signal
    def events(self, events: list[ActivityEvent]) -> None:
        self._inbox.extend(events)
        self._taken += len(events)

    @workflow.signal
    def profile(self, update: ProfileUpdate) -> None:
        self._inbox.append(update)
        self._taken += 1

    @workflow.signal
    def model_changed(self, change: ModelChange) -> None:
        self._model_changes.append(change)

    # ------------------------------------------------------------------ queries

    @workflow.query
    def view(self) -> LeadView:
        if self._lead is None:
            raise ApplicationError("lead is starting; ask again in a moment")
        return self._lead.view()

    @workflow.query
    def state(self) -> LeadState:
        """The lead's whole state, e.g. to try a model on it (`leadflow model apply --dry-run`)."""
        if self._lead is None:
            raise ApplicationError("lead is starting; ask again in a moment")
        return self._lead.state

    @workflow.query
    def command_outcome(self, key: str) -> str | None:
        """What became of the command with this idempotency key, as far as this lead remembers."""
        return self._lead.outcome_of(key) if self._lead is not None else None

    @workflow.query
    def audit_tail(self, after_seq: int = 0) -> list[AuditEntry]:
        """Entries the store may not have yet (waiting or being written), oldest first;
        the sweeper asks only for those after what it wrote."""
        return self._audit.tail_after(after_seq)

    # ------------------------------------------------------------------ updates

    @workflow.update
    async def erase(self, request: EraseRequest) -> ErasureReport:
        """GDPR Art. 17: drop the person's data from the lead's state (the core's
        `erase_personal_data`), from messages still on their way and from the store (an
        activity, after everything so far is written); the lead's payloads get a fresh key
        generation, this run ends for a new one, and the new run destroys the old generations
        (`_shred_old_keys`): the history so far can never be read again. Scores, stages and
        times stay, and so does the lead."""
        await workflow.wait_condition(lambda: self._lead is not None)
        taken = self._taken
        await workflow.wait_condition(lambda: self._applied >= taken)  # what came before is erased too
        assert self._lead is not None
        lead, now = self._lead, workflow.now()
        erased = lead.erase_personal_data(now, request.by)
        self._deliveries.scrub(now)
        seq = lead.state.audit_seq
        await self._written(seq)  # every entry so far is in the store before the store is scrubbed
        report = await workflow.execute_activity(
            "erase_personal_data",
            args=[ErasureReport(lead_id=lead.state.lead_id, erasure_id=f"{lead.state.lead_id}/{seq}",
                                erased_by=request.by.name, erased_at=now, profile_facts=erased.profile_facts,
                                events=erased.events), seq],
            result_type=ErasureReport, start_to_close_timeout=ERASURE_TIMEOUT,
            retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=30)),
        )
        assert report.key_generation is not None
        self._shred = ShredPending(below=report.key_generation, not_before=now + timedelta(
            seconds=self._shred_delay))
        self._restart = True  # the new run's input is encrypted with the new generation
        self._work_pending = True
        return report.model_copy(update={"history": (
            f"crypto-shredded about {self._shred_delay:g} s from now, when the lead's earlier key "
            f"generations are destroyed (it goes on in a new run under generation {report.key_generation})")})

    async def _shred_old_keys(self, lead_id: str, pending: ShredPending) -> None:
        """Destroy the lead's key generations below `pending.below`, once every process encrypts
        with the new one and this run holds no payload under an older one; else this run ends
        for a new one (whose payloads are encrypted anew) that tries again."""
        wait = pending.not_before - workflow.now()
        if wait > timedelta(0):
            await workflow.sleep(wait)
        done = await workflow.execute_activity(
            "shred_lead_keys", args=[lead_id, pending.below], result_type=bool,
            start_to_close_timeout=ERASURE_TIMEOUT, retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=30)),
        )
        if not done:
            self._restart = True
        elif self._shred == pending:
            self._shred = None
        self._work_pending = True

    @workflow.update
    async def flush_audit(self) -> int:
        """Write every audit entry so far to the store now; returns the last seq written."""
        await workflow.wait_condition(lambda: self._lead is not None)
        assert self._lead is not None
        await self._written(self._lead.state.audit_seq)
        return self._audit.written_seq

    async def _written(self, seq: int) -> None:
        """Until the entries up to `seq`, and the input taken so far, are in the store."""
        taken = self._audit.to_log
        self._audit.flush_requested = True
        self._work_pending = True
        await workflow.wait_condition(lambda: self._audit.written_seq >= seq and self._audit.logged >= taken)

    async def _execute(self, command) -> LeadView:
        """Carry out a command once per idempotency key (the update's id): a retry of a key
        the lead knows is answered with that outcome, even after continue-as-new."""
        await workflow.wait_condition(lambda: self._lead is not None)
        assert self._lead is not None
        key = _update_id()
        known = self._lead.outcome_of(key)
        if known is None:
            try:
                self._lead.execute(command, workflow.now(), command_id=key)
            except Refused as refused:
                raise ApplicationError(str(refused), type="Refused", non_retryable=True) from None
        elif known.startswith("refused: "):
            raise ApplicationError(known.removeprefix("refused: "), type="Refused", non_retryable=True)
        await self._written(self._lead.state.audit_seq)  # the caller reads the history it made
        return self._lead.view()

    def _validate(self, command) -> None:
        if self._lead is None or self._lead.outcome_of(_update_id()) is not None:
            return  # still starting, or a retry of a known key: the handler answers
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
