"""Payload encryption: what a lead says never reaches Temporal in the clear.

Every payload a Leadflow process hands to Temporal (workflow inputs, signals, updates,
query answers, activity inputs and results, failure messages) passes through
`EncryptionCodec` first: AES-256-GCM, a fresh 96-bit nonce per payload, and the key id
in the payload's metadata (`encryption-key-id`), bound to the ciphertext as associated
data. Temporal stores `binary/encrypted` payloads only; a history read without the keys
shows no profile fact, event attribute or note.

Two kinds of keys:

- **Payload keys** (`PayloadKeyring`): configured, several at once, the first one current.
  New payloads use the current one; any key still in the ring decrypts, so rotating is
  "put the new key first, keep the old ones" and no old history is lost.
- **Per-lead data keys** (`LeadKeys`): each lead's payloads (the serialization context's
  workflow id is `lead-<id>`) are encrypted with a random key of that lead, kept in the
  store wrapped (AES-GCM) by the current payload key. Erasure (GDPR Art. 17) destroys it:
  the lead's earlier Temporal history becomes unreadable for everyone (crypto-shredding),
  while the lead's workflow goes on under a fresh generation of its key. Workflows that
  are no lead (the model rollout) and payloads without a context use the payload key.

The key id says which: `k2` (a payload key) or `lead:3:L-1001` (generation 3 of lead
L-1001's key), so any holder of the keys can decode any payload without knowing which
workflow it came from (the codec server for the Temporal UI relies on that).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import math
import os
import re
import secrets
import threading
import time
import tomllib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import (
    ActivitySerializationContext,
    DataConverter,
    PayloadCodec,
    SerializationContext,
    WithSerializationContext,
    WorkflowSerializationContext,
)

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # no ':' - lead key ids use it
LEAD_KEY_PREFIX = "lead:"
LEAD_WORKFLOW_PREFIX = "lead-"  # workflows.lead.workflow_id
DEFAULT_KEY_FILE = Path("data") / "payload-keys.toml"  # beside the default store data/leadflow.db
DEFAULT_CACHE_SECONDS = 30.0
CACHE_MAX = 100_000  # leads whose keys a process keeps in memory (~0.5 KB each)


class KeyConfigError(Exception):
    """The payload keys are missing or malformed; the message says what to fix."""


class KeyUnavailable(LookupError):
    """A payload cannot be decrypted here: its key is unknown, or it was destroyed (erasure)."""


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def key_spec(key_id: str, key: bytes) -> str:
    """`id:base64` as LEADFLOW_PAYLOAD_KEYS takes it."""
    return f"{key_id}:{base64.b64encode(key).decode()}"


# --------------------------------------------------------------------------- payload keys


class PayloadKeyring:
    """The configured payload keys by id; `current` encrypts, every one decrypts."""

    def __init__(self, keys: dict[str, bytes], current: str, source: str = "configuration"):
        if not keys:
            raise KeyConfigError(f"{source}: no payload keys")
        for key_id, key in keys.items():
            if not KEY_ID_PATTERN.match(key_id):
                raise KeyConfigError(f"{source}: key id {key_id!r} must be 1-64 of A-Z a-z 0-9 _ . - (no ':')")
            if len(key) != KEY_BYTES:
                raise KeyConfigError(f"{source}: key {key_id!r} is {len(key)} bytes; AES-256 needs {KEY_BYTES}")
        if current not in keys:
            raise KeyConfigError(f"{source}: the current key {current!r} is not among the keys")
        self._keys = dict(keys)
        self.current = current
        self.source = source

    def __repr__(self) -> str:  # never the key material
        return f"PayloadKeyring(current={self.current!r}, ids={sorted(self._keys)!r}, source={self.source!r})"

    @property
    def ids(self) -> list[str]:
        return list(self._keys)

    def key(self, key_id: str) -> bytes | None:
        return self._keys.get(key_id)

    @staticmethod
    def _decode_key(key_id: str, text: str, source: str) -> bytes:
        try:
            return base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise KeyConfigError(f"{source}: key {key_id!r} is not valid base64") from None

    @classmethod
    def parse(cls, spec: str, source: str = "LEADFLOW_PAYLOAD_KEYS") -> "PayloadKeyring":
        """`id:base64key,id:base64key,...`, the first one current."""
        keys: dict[str, bytes] = {}
        for number, item in enumerate((i.strip() for i in spec.split(",")), start=1):
            if not item:
                continue
            key_id, sep, text = item.partition(":")
            if not sep:
                raise KeyConfigError(f"{source} entry {number}: expected id:base64key")
            key_id = key_id.strip()
            if key_id in keys:
                raise KeyConfigError(f"{source}: key id {key_id!r} is given twice")
            keys[key_id] = cls._decode_key(key_id, text, source)
        if not keys:
            raise KeyConfigError(f"{source}: no payload keys")
        return cls(keys, current=next(iter(keys)), source=source)

    @classmethod
    def load_file(cls, path: Path) -> "PayloadKeyring":
        """A TOML file: `current = "k2"` and a `[keys]` table of id = "base64key"."""
        source = f"payload key file {path}"
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise KeyConfigError(f"{source}: cannot read it: {err.strerror or err}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise KeyConfigError(f"{source}: not valid TOML: {err}") from None
        raw = data.get("keys")
        if set(data) - {"current", "keys"} or not isinstance(raw, dict) or not raw:
            raise KeyConfigError(f'{source}: expected current = "id" and a [keys] table of id = "base64key"')
        keys = {str(k): cls._decode_key(str(k), str(v), source) for k, v in raw.items()}
        current = data.get("current", next(iter(keys)))
        return cls(keys, current=str(current), source=source)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "PayloadKeyring":
        """LEADFLOW_PAYLOAD_KEYS, else LEADFLOW_PAYLOAD_KEYS_FILE, else the local dev key file
        data/payload-keys.toml (which `scripts/run` generates on its first start)."""
        env = dict(os.environ if env is None else env)
        if env.get("LEADFLOW_PAYLOAD_KEYS", "").strip():
            return cls.parse(env["LEADFLOW_PAYLOAD_KEYS"])
        if env.get("LEADFLOW_PAYLOAD_KEYS_FILE", "").strip():
            return cls.load_file(Path(env["LEADFLOW_PAYLOAD_KEYS_FILE"]))
        if DEFAULT_KEY_FILE.exists():
            return cls.load_file(DEFAULT_KEY_FILE)
        raise KeyConfigError(
            "no payload keys: set LEADFLOW_PAYLOAD_KEYS=id:base64key[,...] (first one current) or "
            f"LEADFLOW_PAYLOAD_KEYS_FILE=keys.toml; {DEFAULT_KEY_FILE} (the local dev key that scripts/run "
            "makes) is not here - run from the project directory. Make a key with: "
            "python -c 'import base64, os; print(\"k1:\" + base64.b64encode(os.urandom(32)).decode())'"
        )

    @staticmethod
    def generate_file(path: Path = DEFAULT_KEY_FILE, key_id: str = "dev1") -> bool:
        """Write a key file with one fresh key, readable by its owner only. Never overwrites:
        False if the file exists (also when another process made it at the same moment)."""
        path = Path(path)
        if path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        text = (
            "# Leadflow payload keys (AES-256, base64). `current` encrypts new payloads; every key\n"
            "# listed decrypts. Losing this file makes every lead's Temporal history unreadable.\n"
            "# Rotate: add a new key, make it current, keep the old ones (see README, Personal data).\n"
            f'current = "{key_id}"\n\n[keys]\n{key_id} = "{base64.b64encode(new_key()).decode()}"\n'
        )
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            try:
                os.link(tmp, path)  # atomic, and fails if another process was first
            except FileExistsError:
                return False
        finally:
            tmp.unlink(missing_ok=True)
        return True


# --------------------------------------------------------------------------- per-lead data keys


def _wrap_aad(lead_id: str, generation: int) -> bytes:
    return f"leadflow lead key {lead_id} #{generation}".encode()


@dataclass(frozen=True)
class LeadKeyRecord:
    """A lead key as the store keeps it: wrapped by payload key `kek_id`; None once destroyed."""

    lead_id: str
    generation: int
    kek_id: str
    wrapped: bytes | None
    erasure_id: str | None = None


class LeadKeys:
    """Each lead's data keys: created on first use, wrapped by the current payload key and
    kept in the store; erasure rotates them and destroys the old generations.

    `store` is an `activities.store.AuditStore` (its `lead_key` table), or a callable that
    makes one on first use. Keys read from the store stay in memory (the last CACHE_MAX
    leads used) until they change: before using them, at most every `cache_seconds`, a
    process reads the store's log of key changes (rotations and destructions, by any
    process) and forgets those leads. So a destroyed key is unreadable in every process at
    most that long after its destruction, a rotation reaches every encoder within that
    time, and a lead that gets an event once a week does not read its key again for each
    one. (Until 2026-11-24 the keys themselves expired after `cache_seconds`: with sparse
    traffic every event read its lead's key two or three times; bench/ingest.py
    --shape sparse --key-cache-seconds 0.05 ran at 0.57 of its baseline then.)
    """

    def __init__(self, keyring: PayloadKeyring, store, cache_seconds: float = DEFAULT_CACHE_SECONDS):
        self.keyring = keyring
        self._store = store if not callable(store) else None
        self._make_store = store if callable(store) else None
        self.cache_seconds = cache_seconds
        # lead -> (its current generation or None if not known, {generation: key, None if destroyed})
        self._leads: OrderedDict[str, tuple[int | None, dict[int, bytes | None]]] = OrderedDict()
        self._looked_at = -math.inf  # when the last look at the change log began (monotonic)
        self._seen: int | None = None  # the last change looked at
        self._changed_at = -1  # where in the log the last look that found changes ended
        self._looking = threading.Lock()
        self._look: asyncio.Task | None = None  # the look under way

    @property
    def store(self):
        if self._store is None:
            self._store = self._make_store()  # type: ignore[misc]
        return self._store

    # ------------------------------------------------------------------ wrapping

    def _wrap(self, lead_id: str, generation: int, key: bytes) -> tuple[str, bytes]:
        kek_id = self.keyring.current
        nonce = os.urandom(NONCE_BYTES)
        kek = self.keyring.key(kek_id)
        assert kek is not None
        return kek_id, nonce + AESGCM(kek).encrypt(nonce, key, _wrap_aad(lead_id, generation))

    def _unwrap(self, record: LeadKeyRecord) -> bytes | None:
        if record.wrapped is None:
            return None
        kek = self.keyring.key(record.kek_id)
        if kek is None:
            raise KeyUnavailable(
                f"the key of lead {record.lead_id} (generation {record.generation}) is wrapped by payload key "
                f"{record.kek_id!r}, which is not configured: keep old payload keys in the ring (or run "
                "`leadflow keys rewrap` while they still are)")
        try:
            return AESGCM(kek).decrypt(record.wrapped[:NONCE_BYTES], record.wrapped[NONCE_BYTES:],
                                       _wrap_aad(record.lead_id, record.generation))
        except InvalidTag:
            raise KeyUnavailable(f"the stored key of lead {record.lead_id} does not open with payload key "
                                 f"{record.kek_id!r}") from None

    # ------------------------------------------------------------------ cache

    def _remember(self, lead_id: str, seen: int | None, generation: int, key: bytes | None,
                  current: bool = False) -> None:
        """Keep what was read, unless a look that ended after the read began found changes
        (`seen`: the log position when it began): the read may be from before a change to this
        lead, and nothing would forget it again. Changes are erasures, rare: a read dropped
        for another lead's change is read again next time."""
        if self._changed_at > (seen if seen is not None else -1):
            return
        known, keys = self._leads.pop(lead_id, (None, {}))
        keys[generation] = key
        self._leads[lead_id] = (generation if current else known, keys)
        while len(self._leads) > CACHE_MAX:
            self._leads.popitem(last=False)

    def _touch(self, lead_id: str) -> None:
        with contextlib.suppress(KeyError):  # forgotten meanwhile on another thread
            self._leads.move_to_end(lead_id)

    def forget(self, lead_id: str) -> None:
        """Drop what this process holds of a lead's keys (after rotating or destroying them)."""
        self._leads.pop(lead_id, None)

    def _look_sync(self) -> None:
        """Forget the leads whose keys changed since the last look (unless a look began less
        than `cache_seconds` ago: another caller has just looked)."""
        with self._looking:
            began = time.monotonic()
            if began - self._looked_at < self.cache_seconds:
                return
            seen, changed = self.store.lead_key_changes(self._seen)
            for lead_id in changed:
                self.forget(lead_id)
            if changed:
                self._changed_at = seen
            self._seen, self._looked_at = seen, began

    async def _look_if_due(self) -> None:
        """One look at a time per event loop: callers that find a look due while one is under
        way wait for that one (each would otherwise take a thread to find it done)."""
        if time.monotonic() - self._looked_at < self.cache_seconds:
            return
        loop = asyncio.get_running_loop()
        look = self._look
        if look is None or look.done() or look.get_loop() is not loop:
            look = self._look = loop.create_task(asyncio.to_thread(self._look_sync))
        await asyncio.shield(look)

    # ------------------------------------------------------------------ blocking store access

    def _current_sync(self, lead_id: str) -> tuple[int, bytes]:
        """The lead's current generation and key, created if it has none alive."""
        for _ in range(5):
            records = self.store.lead_keys(lead_id)
            newest = max(records, key=lambda r: r.generation, default=None)
            if newest is not None and newest.wrapped is not None:
                key = self._unwrap(newest)
                assert key is not None
                return newest.generation, key
            generation = (newest.generation + 1) if newest else 1
            key = new_key()
            kek_id, wrapped = self._wrap(lead_id, generation, key)
            if self.store.add_lead_key(LeadKeyRecord(lead_id, generation, kek_id, wrapped)):
                return generation, key
            # another process made this generation at the same moment: use theirs
        raise RuntimeError(f"could not settle the key of lead {lead_id}")

    def _key_sync(self, lead_id: str, generation: int) -> tuple[bool, bytes | None]:
        """(whether that generation exists, its key or None if destroyed)."""
        record = self.store.lead_key(lead_id, generation)
        return (False, None) if record is None else (True, self._unwrap(record))

    def rotate_sync(self, lead_id: str, erasure_id: str) -> int:
        """A new generation of the lead's key for erasure `erasure_id` (the same one again for
        a retry); from now on the lead's payloads are encrypted with it."""
        for _ in range(5):
            records = self.store.lead_keys(lead_id)
            for record in records:
                if record.erasure_id == erasure_id:
                    self.forget(lead_id)
                    return record.generation
            generation = max((r.generation for r in records), default=0) + 1
            kek_id, wrapped = self._wrap(lead_id, generation, new_key())
            if self.store.add_lead_key(LeadKeyRecord(lead_id, generation, kek_id, wrapped, erasure_id)):
                self.forget(lead_id)
                return generation
        raise RuntimeError(f"could not rotate the key of lead {lead_id}")

    def destroy_sync(self, lead_id: str, below: int | None = None) -> int:
        """Destroy the lead's key generations below `below` (all: None); returns how many."""
        destroyed = self.store.destroy_lead_keys(lead_id, below)
        self.forget(lead_id)
        return destroyed

    def generations_sync(self, lead_id: str) -> list[LeadKeyRecord]:
        return self.store.lead_keys(lead_id)

    def rewrap_sync(self) -> int:
        """Wrap every live lead key with the current payload key (after a rotation, so the old
        payload key can retire as far as lead keys go). Returns how many were re-wrapped."""
        count = 0
        for record in self.store.lead_keys_not_wrapped_by(self.keyring.current):
            key = self._unwrap(record)
            if key is None:
                continue
            kek_id, wrapped = self._wrap(record.lead_id, record.generation, key)
            count += self.store.rewrap_lead_key(record, kek_id, wrapped)
        return count

    # ------------------------------------------------------------------ async, cached (the codec's)

    async def current(self, lead_id: str) -> tuple[int, bytes]:
        await self._look_if_due()
        known, keys = self._leads.get(lead_id, (None, {}))
        key = keys.get(known) if known is not None else None
        if key is not None:
            self._touch(lead_id)
            return known, key  # type: ignore[return-value]
        seen = self._seen
        generation, key = await asyncio.to_thread(self._current_sync, lead_id)
        self._remember(lead_id, seen, generation, key, current=True)
        return generation, key

    async def key(self, lead_id: str, generation: int) -> bytes | None:
        """The key of that generation, or None if it was destroyed (or never existed)."""
        await self._look_if_due()
        _, keys = self._leads.get(lead_id, (None, {}))
        if generation in keys:
            self._touch(lead_id)
            return keys[generation]
        seen = self._seen
        exists, key = await asyncio.to_thread(self._key_sync, lead_id, generation)
        if exists:  # (a generation that does not exist yet is not remembered as missing)
            self._remember(lead_id, seen, generation, key)
        return key

    async def rotate(self, lead_id: str, erasure_id: str) -> int:
        return await asyncio.to_thread(self.rotate_sync, lead_id, erasure_id)

    async def destroy(self, lead_id: str, below: int | None = None) -> int:
        return await asyncio.to_thread(self.destroy_sync, lead_id, below)


# --------------------------------------------------------------------------- the codec


def lead_key_id(lead_id: str, generation: int) -> str:
    return f"{LEAD_KEY_PREFIX}{generation}:{lead_id}"


def parse_lead_key_id(key_id: str) -> tuple[str, int] | None:
    """(lead id, generation) of a lead key id, None for a payload key id."""
    if not key_id.startswith(LEAD_KEY_PREFIX):
        return None
    generation, _, lead_id = key_id[len(LEAD_KEY_PREFIX):].partition(":")
    if not generation.isdigit() or not lead_id:
        raise KeyUnavailable(f"malformed lead key id {key_id!r}")
    return lead_id, int(generation)


def key_id_of(payload: Payload) -> str | None:
    """The key id of an encrypted payload, None if it is not encrypted."""
    if payload.metadata.get("encoding") != ENCODING:
        return None
    return payload.metadata.get(KEY_ID, b"").decode()


def lead_of_workflow(workflow_id: str | None) -> str | None:
    if not workflow_id or not workflow_id.startswith(LEAD_WORKFLOW_PREFIX):
        return None
    from funnel.models import LEAD_ID_PATTERN

    lead_id = workflow_id[len(LEAD_WORKFLOW_PREFIX):]
    return lead_id if re.match(LEAD_ID_PATTERN, lead_id) else None


class EncryptionCodec(PayloadCodec, WithSerializationContext):
    """AES-GCM for every payload: the lead's own key for a lead workflow's payloads (from the
    serialization context's workflow id), the current payload key for everything else."""

    def __init__(self, keyring: PayloadKeyring, lead_keys: LeadKeys | None, workflow_id: str | None = None):
        self.keyring = keyring
        self.lead_keys = lead_keys
        self.workflow_id = workflow_id

    def with_context(self, context: SerializationContext) -> "EncryptionCodec":
        workflow_id = None
        if isinstance(context, (WorkflowSerializationContext, ActivitySerializationContext)):
            workflow_id = context.workflow_id
        if workflow_id == self.workflow_id:
            return self
        return EncryptionCodec(self.keyring, self.lead_keys, workflow_id)

    async def _encryption_key(self) -> tuple[str, bytes]:
        lead_id = lead_of_workflow(self.workflow_id)
        if lead_id is not None and self.lead_keys is not None:
            generation, key = await self.lead_keys.current(lead_id)
            return lead_key_id(lead_id, generation), key
        key = self.keyring.key(self.keyring.current)
        assert key is not None
        return self.keyring.current, key

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        if not payloads:
            return []
        key_id, key = await self._encryption_key()
        aead, aad = AESGCM(key), key_id.encode()
        encoded = []
        for payload in payloads:
            nonce = os.urandom(NONCE_BYTES)
            encoded.append(Payload(
                metadata={"encoding": ENCODING, KEY_ID: aad},
                data=nonce + aead.encrypt(nonce, payload.SerializeToString(), aad),
            ))
        return encoded

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        decoded = []
        for payload in payloads:
            key_id = key_id_of(payload)
            if key_id is None:
                decoded.append(payload)  # not ours (histories from before encryption): as it is
                continue
            key = await self._decryption_key(key_id)
            try:
                plain = AESGCM(key).decrypt(payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:], key_id.encode())
            except InvalidTag:
                raise KeyUnavailable(f"payload encrypted with key {key_id!r} does not decrypt: tampered, or another key "
                                     "of that id") from None
            decoded.append(Payload.FromString(plain))
        return decoded

    async def _decryption_key(self, key_id: str) -> bytes:
        lead = parse_lead_key_id(key_id)
        if lead is None:
            key = self.keyring.key(key_id)
            if key is None:
                raise KeyUnavailable(f"payload key {key_id!r} is not configured (keep old keys in the ring)")
            return key
        if self.lead_keys is None:
            raise KeyUnavailable(f"payload of lead {lead[0]} needs its lead key; this codec has no key store")
        key = await self.lead_keys.key(*lead)
        if key is None:
            raise KeyUnavailable(f"the key {key_id!r} of lead {lead[0]} was destroyed (personal data erased) "
                                 "or never existed: this payload cannot be read any more")
        return key


def key_ids_in(messages) -> set[str]:
    """The key ids of every encrypted payload inside protobuf messages (e.g. a workflow
    history's events): which keys the history needs."""
    from google.protobuf.message import Message

    found: set[str] = set()

    def walk(message: Message) -> None:
        if isinstance(message, Payload):
            key_id = key_id_of(message)
            if key_id:
                found.add(key_id)
            return
        for field, value in message.ListFields():
            if field.type != field.TYPE_MESSAGE:
                continue
            if field.message_type.GetOptions().map_entry:
                for item in value.values():
                    if isinstance(item, Message):
                        walk(item)
            elif _repeated(field):
                for item in value:
                    walk(item)
            else:
                walk(value)

    for message in messages:
        walk(message)
    return found


def _repeated(field) -> bool:
    is_repeated = getattr(field, "is_repeated", None)
    if is_repeated is not None:
        return bool(is_repeated)
    return field.label == field.LABEL_REPEATED


@dataclass(frozen=True)
class PerLeadDataConverter(DataConverter):
    """The SDK's data converter, made cheap to specialise per lead.

    EncryptionCodec takes the serialization context of every workflow task, command,
    query and activity, so the converter is re-made for each of them. The SDK (1.35) does
    that with `dataclasses.replace`, which builds a new pydantic payload converter and
    failure converter each time only to put the old ones back: 16% of the worker's CPU
    under sparse traffic (bench/ingest.py --shape sparse). Here the copy is shallow; every
    part still gets the context the SDK would give it."""

    def with_context(self, context: SerializationContext) -> "PerLeadDataConverter":
        changed = {}
        for name in ("payload_converter", "payload_codec", "failure_converter", "external_storage"):
            part = getattr(self, name)
            if isinstance(part, WithSerializationContext) and (specialised := part.with_context(context)) is not part:
                changed[name] = specialised
        if not changed:
            return self
        clone = copy.copy(self)  # no __post_init__: the parts that did not change are shared
        for name, part in changed.items():
            object.__setattr__(clone, name, part)
        return clone
