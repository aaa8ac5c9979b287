"""The lead workflow's input: how a lead starts, or goes on after continue-as-new.

It lives outside `workflows/lead.py` so the workflow sandbox can pass it
through: the sandbox re-imports the workflow's own module for every workflow
run, and a pydantic model defined there would be rebuilt each time.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from funnel.lead import SEEN_IDS_MAX
from funnel.models import ActivityEvent, LeadState, Outbound, ProfileUpdate
from funnel.scoring_model import ScoringModel

# How a run behaves, for replay: runs started by older code have no `version` in
# their input and replay as 1 (every audit batch written at once, the model loaded
# by a regular activity). Version 2 writes the audit on a cadence (see
# workflows/lead.py) and loads the model by local activity. (Chosen by input rather than
# `workflow.patched()`: a patch upserts the TemporalChangeVersion search attribute,
# a visibility write for every new lead.)
CURRENT_VERSION = 2


class LeadInput(BaseModel):
    """How a lead starts, or goes on after continue-as-new (then `state` is set)."""

    lead_id: str
    state: LeadState | None = None
    model: ScoringModel | None = None
    pending: list[ActivityEvent | ProfileUpdate] = Field(default_factory=list)
    undelivered: list[Outbound] = Field(default_factory=list)  # deliveries still retrying
    max_history_events: int = 2000
    seen_ids_max: int = SEEN_IDS_MAX
    version: int = 1  # callers and continue-as-new set CURRENT_VERSION
    # Score changes and other deferrable audit entries (workflows/lead.py DEFERRABLE)
    # reach the store at the latest this long after they happen (0: at once).
    audit_max_lag_seconds: float = Field(default=30.0, ge=0)
