"""Contract breaks found by hostile testing (issue "Hold under faults and load", section 1):
every bad item is rejected on its own with a clear message, never a 500."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from funnel.models import ActivityEvent, ProfileUpdate

OVERFLOWING = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"]


@pytest.mark.parametrize("stamp", OVERFLOWING)
def test_a_timestamp_that_overflows_in_utc_is_a_validation_error(stamp):
    with pytest.raises(ValidationError, match="out of range"):
        ActivityEvent(event_id="e", lead_id="L", type="website_visit", occurred_at=stamp)
    with pytest.raises(ValidationError, match="out of range"):
        ProfileUpdate(update_id="p", lead_id="L", facts={"x": 1}, observed_at=stamp)
    with pytest.raises(ValidationError, match="out of range"):
        ProfileUpdate(update_id="p", lead_id="L", facts={"email_consent": True, "email_consent_at": stamp})


@pytest.mark.parametrize("stamp", OVERFLOWING)
def test_the_cli_refuses_it_too(stamp):
    import starter

    with pytest.raises(starter.BadInput, match="out of range"):
        starter.parse_timestamp(stamp)
