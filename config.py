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

from pydantic import BaseModel, Field, field_validator, model_validator

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "scoring_models" / "default.toml"
# The worker's exit code when worker.StallWatch gives up on it (EX_TEMPFAIL): start it again.
# scripts/run does; in a deployment, the process manager's restart policy does.
WORKER_STALLED_EXIT = 75

# Dynamic config for the embedded dev server (scripts/run, the tests, the benchmark).
# Eager activity execution: the server hands an activity to the worker that scheduled
# it in its reply to the workflow task, instead of a round trip through matching.
# Clusters enable it the same way (it is off by default in Temporal's own server).
DEV_SERVER_DYNAMIC_CONFIG = {"system.enableActivityEagerExecution": "true"}


# The embedded dev server's SQLite file as a write-ahead log, synced at every commit:
# as durable as SQLite's default rollback journal (a committed write survives a power cut),
# with one sync per commit where the journal needed several, and readers that do not block
# the single writer. Measured with bench/ingest.py (50 leads x 40 events, 2 cores, same
# hour): the baseline 156 -> 254 events/s, the lead workflow 112 -> 191.
DEV_SERVER_SQLITE = {"journal_mode": "wal", "synchronous": "full"}


def dev_server_dynamic_flags(**extra: str) -> list[str]:
    """`--dynamic-config-value KEY=JSON` flags for `temporal server start-dev`."""
    values = {**DEV_SERVER_DYNAMIC_CONFIG, **extra}
    return [flag for key, value in values.items() for flag in ("--dynamic-config-value", f"{key}={value}")]


def dev_server_file_flags(**extra: str) -> list[str]:
    """The flags of a dev server on a SQLite file as scripts/run starts it: DEV_SERVER_SQLITE
    as `--sqlite-pragma`, then the dynamic config (plus `extra`). One place, so the local
    stack, the chaos test and the benchmarks cannot drift apart."""
    pragmas = [flag for key, value in DEV_SERVER_SQLITE.items() for flag in ("--sqlite-pragma", f"{key}={value}")]
    return [*pragmas, *dev_server_dynamic_flags(**extra)]


class Settings(BaseModel):
    # None means: take it from Temporal's env-config (TEMPORAL_ADDRESS, TEMPORAL_PROFILE,
    # temporal.toml), falling back to localhost:7233.
    temporal_address: str | None = None
    temporal_namespace: str | None = None
    task_queue: str = "leadflow"
    database_url: str = "sqlite:///data/leadflow.db"
    model_path: Path = DEFAULT_MODEL
    webhook_url: str | None = None
    # Signs every webhook per the Standard Webhooks convention (webhook-id, -timestamp,
    # -signature: HMAC-SHA256) so the receiver can tell it came from here: "whsec_" + base64.
    webhook_secret: str | None = Field(default=None, pattern=r"^whsec_[A-Za-z0-9+/]{32,}={0,2}$", repr=False)
    # Subscriptions' webhooks (activities/webhook_dispatcher.py): after attempt n fails,
    # attempt n+1 comes the n-th of these seconds later; after the last, the dead letter.
    webhook_retry_seconds: list[float] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0], max_length=20)
    # Inbound connectors (api/routes_connectors.py): each vendor's shared secret (Mautic's
    # webhook secret, HubSpot's app client secret); a connector without one answers 404.
    mautic_secret: str | None = Field(default=None, min_length=8, repr=False)
    hubspot_secret: str | None = Field(default=None, min_length=8, repr=False)
    # The mapping table of vendor events and fields (connectors/default.toml).
    connectors_path: Path | None = None
    # The address vendors call this API at (scheme://host[:port]), when a proxy in front
    # changes it: HubSpot signs the URL it called.
    public_url: str | None = Field(default=None, pattern=r"^https?://[^/]+$")
    presales_team: list[str] = Field(default_factory=lambda: ["presales-1", "presales-2"])
    # Account executives who get a lead when it becomes an SQL, round-robin.
    sales_team: list[str] = Field(default_factory=lambda: ["ae-1", "ae-2"])
    # Continue-as-new when the server suggests it or history passes this many events.
    max_history_events: int = 2000
    # ... or, sooner, once it has this many and has just woken from a sleep of at least
    # `quiet_after_seconds` (0: never sooner). A quiet lead's worker has most likely evicted
    # it, and replays its whole run for each event or timer: ~0.4 ms of CPU per history event
    # (bench/long_leads.py), so a short run makes every later wake-up cheaper.
    quiet_history_events: int = Field(default=50, ge=0)
    quiet_after_seconds: float = Field(default=60.0, ge=0)
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
    # A worker that has neither polled for nor run workflow tasks this long, while lead tasks
    # waited as long, exits (worker.StallWatch) to be started again; 0 turns the watch off.
    worker_stall_seconds: float = Field(default=120.0, ge=0)
    # How long the API waits for a lead to answer a command (then 504: it may still apply).
    command_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    # Roles of API keys that may read personal data (profile facts, event attributes, notes);
    # the others get them masked. Marketing tools write facts but read none of them back.
    pii_readers: list[str] = Field(default_factory=lambda: ["manager", "presales", "sales"])
    # How often a process looks in the store's log of lead-key changes before using a key it
    # keeps in memory (payload_codec.LeadKeys): a rotated key reaches every encoder, and a
    # destroyed one is gone from every process, within this. Unchanged keys stay in memory.
    key_cache_seconds: float = Field(default=30.0, gt=0, le=3600)
    # After an erasure the lead's earlier key generations are destroyed this long after the
    # rotation (longer than the key cache plus the slowest call that may still carry the old key).
    shred_delay_seconds: float = Field(default=120.0, ge=0, le=86400)
    # Failed authentications one address may make per minute before it gets 429 (guessing keys).
    auth_failure_limit: int = Field(default=10, ge=1)
    # Origins of the Temporal web UI allowed to call the codec server (CORS).
    codec_origins: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8233", "http://localhost:8233"])

    @model_validator(mode="after")
    def _checked(self) -> "Settings":
        roles = {"marketing", "presales", "sales", "manager"}
        unknown = [r for r in self.pii_readers if r not in roles]
        if unknown:
            raise ValueError(f"pii_readers: unknown role(s) {', '.join(unknown)}; use {', '.join(sorted(roles))}")
        if self.shred_delay_seconds and self.shred_delay_seconds <= self.key_cache_seconds:
            raise ValueError("shred_delay_seconds must be longer than key_cache_seconds (or 0 in tests)")
        return self

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
            "LEADFLOW_WEBHOOK_SECRET": "webhook_secret",
            "LEADFLOW_MAUTIC_SECRET": "mautic_secret",
            "LEADFLOW_HUBSPOT_SECRET": "hubspot_secret",
            "LEADFLOW_CONNECTORS": "connectors_path",
            "LEADFLOW_PUBLIC_URL": "public_url",
            "LEADFLOW_MAX_HISTORY_EVENTS": "max_history_events",
            "LEADFLOW_QUIET_HISTORY_EVENTS": "quiet_history_events",
            "LEADFLOW_QUIET_AFTER": "quiet_after_seconds",
            "LEADFLOW_AUDIT_MAX_LAG": "audit_max_lag_seconds",
            "LEADFLOW_DECISION_DELAY": "decision_delay_seconds",
            "LEADFLOW_MAX_BACKLOG": "max_backlog_seconds",
            "LEADFLOW_WORKER_STALL": "worker_stall_seconds",
            "LEADFLOW_COMMAND_TIMEOUT": "command_timeout_seconds",
            "LEADFLOW_KEY_CACHE_SECONDS": "key_cache_seconds",
            "LEADFLOW_SHRED_DELAY": "shred_delay_seconds",
            "LEADFLOW_AUTH_FAILURE_LIMIT": "auth_failure_limit",
        }
        for var, field in mapping.items():
            if env.get(var):
                values[field] = env[var]
        for var, field in (("LEADFLOW_PRESALES_TEAM", "presales_team"), ("LEADFLOW_SALES_TEAM", "sales_team"),
                           ("LEADFLOW_PII_READERS", "pii_readers"), ("LEADFLOW_CODEC_ORIGINS", "codec_origins"),
                           ("LEADFLOW_WEBHOOK_RETRY_SECONDS", "webhook_retry_seconds")):
            if env.get(var):
                values[field] = [n.strip() for n in env[var].split(",") if n.strip()]
        return cls.model_validate(values)


def data_converter(settings: Settings | None = None, keyring=None, key_store=None, encrypted: bool = True):
    """The one data converter of every Leadflow process (worker, client, API, CLI, tests):
    pydantic payloads, encrypted by the payload codec (payload_codec.py), failure messages
    and stack traces encrypted too.

    `keyring`: the payload keys (default: from the environment, see PayloadKeyring.from_env).
    `key_store`: where the per-lead data keys live, an AuditStore or a callable making one
    (default: the store at `settings.database_url`, opened on first use; a SQLite file
    that does not exist is an error, not a fresh store with fresh keys).
    `encrypted=False` only for histories recorded as test fixtures (tests/histories)."""
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.converter import DefaultFailureConverterWithEncodedAttributes

    if not encrypted:
        return pydantic_data_converter
    from payload_codec import EncryptionCodec, LeadKeys, PayloadKeyring, PerLeadDataConverter

    settings = settings or Settings.from_env()
    keyring = keyring or PayloadKeyring.from_env()
    codec = EncryptionCodec(keyring, LeadKeys(keyring, key_store or _key_store(settings.database_url),
                                              cache_seconds=settings.key_cache_seconds))
    return PerLeadDataConverter(payload_converter_class=pydantic_data_converter.payload_converter_class,
                                payload_codec=codec, failure_converter_class=DefaultFailureConverterWithEncodedAttributes)


def _key_store(url: str):
    def open_store():
        from sqlalchemy.engine import make_url

        from activities.store import AuditStore
        from payload_codec import KeyConfigError

        parsed = make_url(url)
        database = parsed.database or ""
        if parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:") \
                and not database.startswith("file:") and not Path(database).expanduser().exists():
            raise KeyConfigError(f"no store at {database} for the leads' data keys (LEADFLOW_DATABASE_URL={url}): "
                               "start the worker first, or run from the project directory")
        return AuditStore(url)

    return open_store


async def connect(settings: Settings | None = None):
    """A Temporal client with the data converter (encrypting), honouring env-config profiles."""
    from temporalio.client import Client
    from temporalio.envconfig import ClientConfig

    settings = settings or Settings.from_env()
    connect_config = dict(ClientConfig.load_client_connect_config())
    if settings.temporal_address:
        connect_config["target_host"] = settings.temporal_address
    connect_config.setdefault("target_host", "localhost:7233")
    if settings.temporal_namespace:
        connect_config["namespace"] = settings.temporal_namespace
    connect_config["data_converter"] = data_converter(settings)
    return await Client.connect(**connect_config)
