"""Search attributes a lead upserts so leads can be listed by stage, owner, score.

Stage, owner and channel are keywords; no PII ever goes here (they are stored
unencrypted by Temporal). Servers must know them before a lead upserts them:
the dev server gets `--search-attribute NAME=TYPE`, tests register them.
"""

from __future__ import annotations

from typing import Any

from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

from funnel.models import LeadState

LEAD_STAGE = SearchAttributeKey.for_keyword("LeadStage")
LEAD_OWNER = SearchAttributeKey.for_keyword("LeadOwner")
LEAD_CHANNEL = SearchAttributeKey.for_keyword("LeadChannel")
LEAD_SCORE = SearchAttributeKey.for_float("LeadScore")
LEAD_MODEL = SearchAttributeKey.for_keyword("LeadModel")  # scoring model ref: a rollout finds who is behind
# When the lead was created: lists filter by it. Temporal's own StartTime is each run's, and
# a lead continues-as-new.
LEAD_CREATED = SearchAttributeKey.for_datetime("LeadCreated")

ALL = [LEAD_STAGE, LEAD_OWNER, LEAD_CHANNEL, LEAD_SCORE, LEAD_MODEL, LEAD_CREATED]


def of_lead(state: LeadState, with_model: bool = True, with_created: bool = True) -> dict[SearchAttributeKey, Any]:
    """The attributes that show this lead state (None: unset). Older runs leave out the model
    or the creation time (see workflows/lead_input.RunBehaviour)."""
    wanted: dict[SearchAttributeKey, Any] = {
        LEAD_STAGE: state.stage.value,
        LEAD_SCORE: float(state.score.total),
        LEAD_OWNER: state.owner,
        LEAD_CHANNEL: state.channel,
    }
    if with_model:
        wanted[LEAD_MODEL] = state.model_ref
    if with_created:
        wanted[LEAD_CREATED] = state.created_at
    return wanted


def typed(wanted: dict[SearchAttributeKey, Any]) -> TypedSearchAttributes:
    """The set ones, as a workflow start takes them."""
    return TypedSearchAttributes([SearchAttributePair(key, value) for key, value in wanted.items() if value is not None])


def as_set(attributes: TypedSearchAttributes) -> dict[str, Any]:
    """{name: value} of every lead attribute, None where unset: what a run starts with."""
    return {key.name: attributes.get(key) for key in ALL}


def type_name(key: SearchAttributeKey) -> str:
    """The attribute's type as the Temporal CLI names it: KEYWORD -> Keyword."""
    return key.indexed_value_type.name.removeprefix("INDEXED_VALUE_TYPE_").title()


def dev_server_flags() -> list[str]:
    """`--search-attribute` flags for `temporal server start-dev` (they take effect on a new
    database only: the worker adds what an existing one lacks, see worker.ensure_search_attributes)."""
    flags: list[str] = []
    for key in ALL:
        flags += ["--search-attribute", f"{key.name}={type_name(key)}"]
    return flags
