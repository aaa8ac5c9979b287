"""`funnel.models.built` is `model_construct` for every field given, only cheaper: pinned
here for each model the core builds with it (a pydantic upgrade that changed what a model
instance holds would show here first)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from funnel.models import ActivityEvent, Actor, ProfileUpdate, Role, WindowEvent, built

AT = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
CASES = [
    (WindowEvent, {"event_id": "e-1", "type": "website_visit", "occurred_at": AT, "channel": "web",
                   "attributes": {"page": "/pricing", "n": 2}}),
    (WindowEvent, {"event_id": "e-2", "type": "demo_request", "occurred_at": AT, "channel": None, "attributes": {}}),
    (ActivityEvent, {"event_id": "e-1", "lead_id": "l-1", "type": "website_visit", "occurred_at": AT,
                     "channel": None, "campaign": "spring", "attributes": {}, "source": "cli"}),
    (Actor, {"name": "ann", "role": Role.PRESALES}),
    (ProfileUpdate, {"update_id": "u-1", "lead_id": "l-1", "facts": {"industry": "software"},
                     "actor": Actor(name="ann", role=Role.PRESALES), "observed_at": None}),
]


@pytest.mark.parametrize("cls, values", CASES)
def test_built_is_model_construct(cls, values):
    assert list(values) == list(cls.model_fields), "every field, in the declared order"
    assert not cls.__private_attributes__ and not cls.__pydantic_post_init__ and not cls.__pydantic_root_model__
    fast, slow = built(cls, dict(values)), cls.model_construct(**values)
    assert type(fast) is type(slow)
    assert list(fast.__dict__.items()) == list(slow.__dict__.items())
    assert fast.model_fields_set == slow.model_fields_set
    assert fast.__pydantic_extra__ == slow.__pydantic_extra__ and fast.__pydantic_private__ == slow.__pydantic_private__
    assert fast == slow and fast.model_dump_json() == slow.model_dump_json()
