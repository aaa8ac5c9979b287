"""Search attributes a lead upserts so leads can be listed by stage, owner, score.

Stage, owner and channel are keywords; no PII ever goes here (they are stored
unencrypted by Temporal). Servers must know them before a lead upserts them:
the dev server gets `--search-attribute NAME=TYPE`, tests register them.
"""

from temporalio.common import SearchAttributeKey

LEAD_STAGE = SearchAttributeKey.for_keyword("LeadStage")
LEAD_OWNER = SearchAttributeKey.for_keyword("LeadOwner")
LEAD_CHANNEL = SearchAttributeKey.for_keyword("LeadChannel")
LEAD_SCORE = SearchAttributeKey.for_float("LeadScore")
LEAD_MODEL = SearchAttributeKey.for_keyword("LeadModel")  # scoring model ref: a rollout finds who is behind
# When the lead was created: lists filter by it. Temporal's own StartTime is each run's, and
# a lead continues-as-new.
LEAD_CREATED = SearchAttributeKey.for_datetime("LeadCreated")

ALL = [LEAD_STAGE, LEAD_OWNER, LEAD_CHANNEL, LEAD_SCORE, LEAD_MODEL, LEAD_CREATED]


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
