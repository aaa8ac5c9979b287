"""Settings for every Leadflow process, read from the environment, and the one
way to connect to Temporal.

Defaults are the embedded setup: a local dev server on localhost:7233 and a
SQLite file under ./data. Point the same code at a Temporal cluster and
PostgreSQL by setting TEMPORAL_ADDRESS (or a Temporal env-config profile) and
LEADFLOW_DATABASE_URL.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "scoring_models" / "default.toml"

# Dynamic config for the embedded dev server (scripts/run, the tests, the benchmark).
# Eager activity execution: the server hands an activity to the worker that scheduled
# it in its reply to the workflow task, instead of a round trip through matching.
# Clusters enable it the same way (it is off by default in Temporal's own server).
DEV_SERVER_DYNAMIC_CONFIG = {"system.enableActivityEagerExecution": "true"}


def dev_server_dynamic_flags(**extra: str) -> list[str]:
    """`--dynamic-config-value KEY=JSON` flags for `temporal server start-dev`."""
    values = {**DEV_SERVER_DYNAMIC_CONFIG, **extra}
    return [flag for key, value in values.items() for flag in ("--dynamic-config-value", f"{key}={value}")]


class Settings(BaseModel):
    # None means: take it from Temporal's env-config (TEMPORAL_ADDRESS, TEMPORAL_PROFILE,
    # temporal.toml), falling back to localhost:7233.
    temporal_address: str | None = None
    temporal_namespace: str | None = None
    task_queue: str = "leadflow"
    database_url: str = "sqlite:///data/leadflow.db"
    model_path: Path = DEFAULT_MODEL
    webhook_url: str | None = None
    presales_team: list[str] = Field(default_factory=lambda: ["presales-1", "presales-2"])
    # Account executives who get a lead when it becomes an SQL, round-robin.
    sales_team: list[str] = Field(default_factory=lambda: ["ae-1", "ae-2"])
    # Continue-as-new when the server suggests it or history passes this many events.
    max_history_events: int = 2000
    # Score changes and owner assignments reach the audit store (and visibility) at the
    # latest this many seconds after they happen; stage changes, commands, SLAs at once.
    # "never" (None): no time limit, they go with the lead's next other write (a stage change,
    # a command, 200 waiting, continue-as-new): the cheapest for sparse traffic; reads merge
    # what waits, so histories stay complete while Temporal answers.
    audit_max_lag_seconds: float | None = Field(default=30.0, ge=0)

    @field_validator("audit_max_lag_seconds", mode="before")
    @classmethod
    def _never(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() == "never" else value
    # A lead decides by itself (threshold, fast track, below threshold) this long after the
    # input that calls for it: webhooks that arrive out of order within it are decided together.
    decision_delay_seconds: float = Field(default=5.0, ge=0, le=3600)
    # Back-pressure: the API refuses input (503, Retry-After) while the oldest lead task
    # waiting for a worker is older than this.
    max_backlog_seconds: float = Field(default=120.0, gt=0)
    # How long the API waits for a lead to answer a command (then 504: it may still apply).
    command_timeout_seconds: float = Field(default=30.0, gt=0, le=600)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = {}
        mapping = {
            "TEMPORAL_ADDRESS": "temporal_address",
            "TEMPORAL_NAMESPACE": "temporal_namespace",
            "LEADFLOW_TASK_QUEUE": "task_queue",
            "LEADFLOW_DATABASE_URL": "database_url",
            "LEADFLOW_MODEL": "model_path",
            "LEADFLOW_WEBHOOK_URL": "webhook_url",
            "LEADFLOW_MAX_HISTORY_EVENTS": "max_history_events",
            "LEADFLOW_AUDIT_MAX_LAG": "audit_max_lag_seconds",
            "LEADFLOW_DECISION_DELAY": "decision_delay_seconds",
            "LEADFLOW_MAX_BACKLOG": "max_backlog_seconds",
            "LEADFLOW_COMMAND_TIMEOUT": "command_timeout_seconds",
        }
        for var, field in mapping.items():
            if env.get(var):
                values[field] = env[var]
        for var, field in (("LEADFLOW_PRESALES_TEAM", "presales_team"), ("LEADFLOW_SALES_TEAM", "sales_team")):
            if env.get(var):
                values[field] = [n.strip() for n in env[var].split(",") if n.strip()]
        return cls.model_validate(values)


async def connect(settings: Settings | None = None):
    """A Temporal client with the pydantic converter, honouring env-config profiles."""
    from temporalio.client import Client
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.envconfig import ClientConfig

    settings = settings or Settings.from_env()
    connect_config = dict(ClientConfig.load_client_connect_config())
    if settings.temporal_address:
        connect_config["target_host"] = settings.temporal_address
    connect_config.setdefault("target_host", "localhost:7233")
    if settings.temporal_namespace:
        connect_config["namespace"] = settings.temporal_namespace
    connect_config["data_converter"] = pydantic_data_converter
    return await Client.connect(**connect_config)
