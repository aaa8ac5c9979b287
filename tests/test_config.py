"""Settings from the environment: names, defaults, and the values that are not numbers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from config import Settings


def test_defaults_are_the_embedded_setup():
    s = Settings.from_env({})
    assert (s.database_url, s.task_queue, s.audit_max_lag_seconds, s.decision_delay_seconds) == (
        "sqlite:///data/leadflow.db", "leadflow", 30.0, 5.0)
    assert s.presales_team == ["presales-1", "presales-2"] and s.sales_team == ["ae-1", "ae-2"]


def test_every_variable_is_read():
    s = Settings.from_env({"LEADFLOW_AUDIT_MAX_LAG": "never", "LEADFLOW_DECISION_DELAY": "0",
                           "LEADFLOW_SALES_TEAM": "ann, bo", "LEADFLOW_MAX_BACKLOG": "60",
                           "LEADFLOW_COMMAND_TIMEOUT": "10"})
    assert s.audit_max_lag_seconds is None  # no time limit
    assert (s.decision_delay_seconds, s.sales_team, s.max_backlog_seconds, s.command_timeout_seconds) == (
        0.0, ["ann", "bo"], 60.0, 10.0)


@pytest.mark.parametrize("var,value", [("LEADFLOW_AUDIT_MAX_LAG", "soon"), ("LEADFLOW_DECISION_DELAY", "-1"),
                                       ("LEADFLOW_MAX_BACKLOG", "0")])
def test_bad_values_name_the_setting(var, value):
    with pytest.raises(ValidationError):
        Settings.from_env({var: value})
