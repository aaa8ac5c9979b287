"""The lead workflow's input: how a lead starts, or goes on after continue-as-new.

It lives outside `workflows/lead.py` so the workflow sandbox can pass it
through: the sandbox re-imports the workflow's own module for every workflow
run, and a pydantic model defined there would be rebuilt each time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, Field

from funnel.accounts import ContactSnapshot
from funnel.lead import SEEN_IDS_MAX
from funnel.models import ActivityEvent, Actor, LeadState, Outbound, ProfileUpdate
from funnel.scoring_model import ScoringModel

# How a run behaves, for replay. Runs keep the behaviour of the code that started them
# (chosen by input rather than `workflow.patched()`: a patch upserts the
# TemporalChangeVersion search attribute, a visibility write for every new lead).
CURRENT_VERSION = 13


@dataclass(frozen=True)
class RunBehaviour:
    """What differs between runs started by different versions of this code."""

    # v2: the audit is written on a cadence (workflows/audit_cadence.py) and the lead
    # sleeps on one running wake-up timer.
    # v1: every batch is written at once, the model by a regular activity, and the lead
    # waits with a timeout.
    audit_cadence: bool
    # v3: the lead's own decisions wait for its decision delay; an owner is assigned
    # before the message that names them goes out (presales on MQL, sales on SQL);
    # model changes arrive as a signal; a workflow task applies a bounded share of what
    # waits, and a long run continues-as-new whatever keeps arriving, carrying it over.
    # v1 and v2 assign the presales owner and post the handover in one activity, decide
    # at once, and apply everything that waits in one task.
    decisions_and_owners: bool
    # v2 reads the model (and nothing else) by local activity. v3 reads by regular
    # activity: a local activity's result is delivered at another workflow time, or in
    # another activation, when the run is evicted from the worker's cache around it
    # (reproduced: `bench/ingest.py --shape sparse --cache 40` failed a lead on replay
    # with a nondeterminism error), and a lead that outgrows the cache must replay alike.
    local_reads: bool = False
    # v4: entries that may wait (score changes, ...) reach the store through the worker's
    # sweeper (activities/audit_sweeper.py), which reads them by query: no lag timer and
    # no write activity per quiet lead. The lead still writes itself what must not wait,
    # and everything before a run ends. v2 and v3 start a lag timer and write on it.
    swept_audit: bool = False
    # v5: a new lead whose starter passed the active model (`LeadInput.model`, the API
    # does) starts on it: no `load_scoring_model` activity and no second workflow task
    # for the lead's creation (6 of its ~13 history events); without one it loads it. A
    # run that goes on after continue-as-new keeps the model it carries (a rollout signals
    # a new one). v1-v4 load the active model for every run, which could switch a lead
    # that had just been told of a new version back to the old one for a moment: the
    # active version is read from a cache up to 2 s old.
    model_from_input: bool = False
    # v6: the lead's creation time is a search attribute (LeadCreated), upserted with the
    # others, so lists filter by it. v1-v5 runs do not upsert it (a changed upsert would not
    # replay); their leads get it with their next run.
    created_attribute: bool = False
    # v7: a lead in an account (an `account_id` fact, or a company e-mail domain) tells the
    # account's workflow what it reads of the lead when that changes (workflows/account_feed.py,
    # funnel/accounts.py). v1-v6 runs do not (an added activity would not replay); their
    # leads feed their account from their next run.
    feeds_accounts: bool = False
    # v8: the lead writes the input it took (events and profile updates, with the time it
    # took them) to the store's event log with its own audit writes, so the log holds
    # everything it applied even when the edge's log write failed (the store down). v1-v7
    # runs do not (an added write would not replay); the edge's log is all they have.
    logs_input: bool = False
    # v8: the history says what a manager would otherwise guess at (funnel.lead.Lead
    # `explain`): a threshold handover held back as backfill, every change of email consent.
    # v1-v7 runs stay silent (an entry written at once would add a write that does not replay).
    explains: bool = False
    # v9: a lead that leaves its account (its facts now name another or none) tells the old
    # account, which drops it as a contact (funnel.accounts.contact_snapshots); what it has not
    # told for sure goes into its next run, and a won lead ends only once its account heard.
    # v7-v8 runs stay as they were (an added feed would not replay): a lead that moved under
    # them stays a contact of its old account.
    departs_accounts: bool = False
    # v10: a handover's owner is assigned, and its outbox row written, by the write that
    # records the stage change before it (`record_audit_and_assign`): per handover one
    # activity and one workflow task less, and the stage and the owner reach visibility in
    # one upsert. v3-v9 runs assign by an activity of their own after the write (a merged
    # activity would not replay).
    assigns_in_write: bool = False
    # v10: a deadline that starts (an SLA_SET entry: a webinar's follow-up) waits for the
    # sweeper like a score change; what comes of it (met, breached) is still written at
    # once. v4-v9 runs write a lone deadline themselves (an activity and a workflow task;
    # fewer writes would not replay).
    defers_deadlines: bool = False
    # v11: a new lead's starter sets its search attributes at the start, as the same core
    # computes them after the lead's first input (`LeadInput.created_at` is its creation
    # time), and the lead upserts only what differs: no visibility write and no history
    # event for most new leads, nor for a run that continues as new with nothing changed
    # (it inherits its attributes). v1-v10 runs upsert everything at their first refresh (an
    # upsert left out would not replay).
    starts_with_attributes: bool = False
    # v12: a lead that wakes after a quiet spell (`LeadInput.quiet_after_seconds`) with a run
    # of `quiet_history_events` or more continues as new once it has taken what woke it: the
    # worker has most likely evicted it by then and replays the whole run at every wake-up
    # (an event, a timer), ~0.4 ms of CPU per history event. v1-v11 runs go on to the
    # history limit (an earlier continue-as-new would not replay).
    continues_when_quiet: bool = False
    # v12: a deadline an event starts (a webinar's follow-up) counts from the earliest such
    # event, whatever order they arrive in (funnel.lead.Lead `orders_slas`). v1-v11 runs
    # count from the first to arrive (a moved deadline arms another timer: it would not replay).
    orders_slas: bool = False
    # v13: a contact meets the follow-up deadline of an event that occurred before it and
    # arrives after it, an event that occurred while a deadline of its kind ran starts none
    # when it arrives after that one ended, and one from before the lead was recycled or
    # closed starts none after that (set and cancelled): what escalates is what would in time order
    # (funnel.lead.Lead `meets_late_slas`). v1-v12 runs open such a deadline on arrival (its
    # timer would not replay).
    meets_late_slas: bool = False


def behaviour(version: int) -> RunBehaviour:
    return RunBehaviour(audit_cadence=version >= 2, decisions_and_owners=version >= 3, local_reads=version == 2,
                        swept_audit=version >= 4, model_from_input=version >= 5, created_attribute=version >= 6,
                        feeds_accounts=version >= 7, logs_input=version >= 8,
                        explains=version >= 8, departs_accounts=version >= 9,
                        assigns_in_write=version >= 10, defers_deadlines=version >= 10,
                        starts_with_attributes=version >= 11, continues_when_quiet=version >= 12,
                        orders_slas=version >= 12, meets_late_slas=version >= 13)


class ModelChange(BaseModel):
    """Signal: use this model version from now on (a rollout, see workflows/rollout.py)."""

    ref: str
    by: Actor


class ShredPending(BaseModel):
    """After an erasure: the lead's key generations below `below` are to be destroyed, not
    before `not_before` (every process then encrypts with `below` or later), and only once
    the current run holds no payload encrypted with them."""

    below: int
    not_before: datetime


class LeadInput(BaseModel):
    """How a lead starts, or goes on after continue-as-new (then `state` is set)."""

    lead_id: str
    state: LeadState | None = None
    # A new lead: the active model as its starter saw it (a rollout catches a lead that
    # started on one just replaced). A run that goes on: the model it has.
    model: ScoringModel | None = None
    pending: list[ActivityEvent | ProfileUpdate] = Field(default_factory=list)
    undelivered: list[Outbound] = Field(default_factory=list)  # deliveries still retrying
    account: str | None = None  # the account the lead last told it belongs to (workflows/account_feed.py)
    account_untold: list[ContactSnapshot] = Field(default_factory=list)  # snapshots it may not have heard
    max_history_events: int = 2000
    # v12: continue as new sooner, past this many history events, on waking after a quiet
    # spell this long (RunBehaviour.continues_when_quiet). 0 events: never sooner (the
    # default, for inputs from callers that predate it).
    quiet_history_events: int = Field(default=0, ge=0)
    quiet_after_seconds: float = Field(default=60.0, ge=0)
    seen_ids_max: int = SEEN_IDS_MAX
    version: int = 1  # callers and continue-as-new set CURRENT_VERSION
    # Score changes and other deferrable audit entries (workflows/audit_cadence.py)
    # reach the store at the latest this long after they happen (0: at once).
    audit_max_lag_seconds: float | None = Field(default=30.0, ge=0)  # None: no time limit
    # The lead decides by itself (threshold, fast track, below threshold) this long after
    # the input that calls for it, so input arriving together is decided together.
    decision_delay_seconds: float = Field(default=0.0, ge=0)
    # Erasure (GDPR Art. 17): old key generations are destroyed this long after the rotation.
    shred_delay_seconds: float = Field(default=120.0, ge=0)
    shred: ShredPending | None = None  # an erasure's key destruction still to do
    # v11, a new lead: when its starter sent the first input (and set the search attributes
    # for that moment); the lead is created then, never later than its first workflow task.
    created_at: datetime | None = None
