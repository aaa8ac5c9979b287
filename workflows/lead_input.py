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


class LeadInput(BaseModel):
    """How a lead starts, or goes on after continue-as-new (then `state` is set)."""

    lead_id: str
    state: LeadState | None = None
    model: ScoringModel | None = None
    pending: list[ActivityEvent | ProfileUpdate] = Field(default_factory=list)
    undelivered: list[Outbound] = Field(default_factory=list)  # deliveries still retrying
    max_history_events: int = 2000
    seen_ids_max: int = SEEN_IDS_MAX
