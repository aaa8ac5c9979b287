"""The payload codec and its keys, without Temporal: AES-GCM with the key id in the metadata,
a ring of payload keys (one current, all decrypting), per-lead data keys wrapped in the
store, chosen by the serialization context's workflow id, and destroyed by erasure."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import threading

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.converter import ActivitySerializationContext, WorkflowSerializationContext

import config
from activities.store import AuditStore
from config import Settings, data_converter
from payload_codec import (
    ENCODING,
    EncryptionCodec,
    KeyConfigError,
    KeyUnavailable,
    LeadKeys,
    PayloadKeyring,
    key_ids_in,
    key_spec,
    new_key,
)

K1, K2 = new_key(), new_key()


def plain(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=f'"{text}"'.encode())


@pytest.fixture
def key_store(tmp_path) -> AuditStore:
    return AuditStore(f"sqlite:///{tmp_path / 'keys.db'}")


def codec(keyring: PayloadKeyring, key_store: AuditStore, workflow_id: str | None = None) -> EncryptionCodec:
    c = EncryptionCodec(keyring, LeadKeys(keyring, key_store, cache_seconds=60))
    if workflow_id:
        c = c.with_context(WorkflowSerializationContext(namespace="default", workflow_id=workflow_id))
    return c


# --------------------------------------------------------------------------- the keyring


def test_keyring_from_the_environment_first_key_current():
    ring = PayloadKeyring.from_env({"LEADFLOW_PAYLOAD_KEYS": f"{key_spec('k2', K2)}, {key_spec('k1', K1)}"})
    assert ring.current == "k2" and ring.ids == ["k2", "k1"] and ring.key("k1") == K1
    assert "K2" not in repr(ring) and base64.b64encode(K2).decode() not in repr(ring)


@pytest.mark.parametrize("spec, message", [
    ("k1", "expected id:base64key"),
    ("k1:not base64!", "not valid base64"),
    (f"k1:{base64.b64encode(b'short').decode()}", "AES-256 needs 32"),
    (f"{key_spec('k1', K1)},{key_spec('k1', K2)}", "given twice"),
    (f"bad/id:{base64.b64encode(K1).decode()}", "must be 1-64 of"),
    (" , ", "no payload keys"),
])
def test_bad_key_specs_are_refused_with_the_reason(spec, message):
    with pytest.raises(KeyConfigError, match=message):
        PayloadKeyring.parse(spec)


def test_keyring_from_a_file_and_the_generated_dev_file(tmp_path, monkeypatch):
    path = tmp_path / "data" / "payload-keys.toml"
    assert PayloadKeyring.generate_file(path) is True
    assert PayloadKeyring.generate_file(path) is False  # never overwrites a key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ring = PayloadKeyring.load_file(path)
    assert ring.current == "dev1" and len(ring.key("dev1")) == 32
    assert PayloadKeyring.from_env({"LEADFLOW_PAYLOAD_KEYS_FILE": str(path)}).key("dev1") == ring.key("dev1")
    # the embedded default: data/payload-keys.toml beside the store, from the working directory
    monkeypatch.chdir(tmp_path)
    assert PayloadKeyring.from_env({}).key("dev1") == ring.key("dev1")
    monkeypatch.chdir(tmp_path / "data")
    with pytest.raises(KeyConfigError, match="no payload keys.*LEADFLOW_PAYLOAD_KEYS"):
        PayloadKeyring.from_env({})
    bad = tmp_path / "bad.toml"
    bad.write_text('current = "k9"\n[keys]\nk1 = "' + base64.b64encode(K1).decode() + '"\n')
    with pytest.raises(KeyConfigError, match="current key 'k9' is not among"):
        PayloadKeyring.load_file(bad)


# --------------------------------------------------------------------------- the codec


async def test_round_trip_with_the_key_id_in_the_metadata(key_store):
    c = codec(PayloadKeyring({"k1": K1}, "k1"), key_store)
    [encrypted] = await c.encode([plain("ann@example.test")])
    assert encrypted.metadata["encoding"] == ENCODING and encrypted.metadata["encryption-key-id"] == b"k1"
    assert b"ann@example.test" not in encrypted.SerializeToString()
    assert await c.decode([encrypted]) == [plain("ann@example.test")]
    # the same value twice gives different ciphertexts (a fresh nonce each time)
    [again] = await c.encode([plain("ann@example.test")])
    assert again.data != encrypted.data


async def test_unencrypted_payloads_pass_through(key_store):
    """Histories from before encryption (tests/histories) still decode and replay."""
    c = codec(PayloadKeyring({"k1": K1}, "k1"), key_store)
    assert await c.decode([plain("x")]) == [plain("x")]


async def test_tampering_or_a_swapped_key_id_is_detected(key_store):
    c = codec(PayloadKeyring({"k1": K1, "k2": K2}, "k1"), key_store)
    [encrypted] = await c.encode([plain("x")])
    flipped = Payload(metadata=dict(encrypted.metadata), data=encrypted.data[:-1] + bytes([encrypted.data[-1] ^ 1]))
    with pytest.raises(KeyUnavailable, match="does not decrypt"):
        await c.decode([flipped])
    swapped = Payload(metadata={**encrypted.metadata, "encryption-key-id": b"k2"}, data=encrypted.data)
    with pytest.raises(KeyUnavailable, match="does not decrypt"):
        await c.decode([swapped])


async def test_rotation_old_keys_keep_decrypting_new_payloads_use_the_current(key_store):
    old = codec(PayloadKeyring({"k1": K1}, "k1"), key_store)
    [under_k1] = await old.encode([plain("old")])
    rotated = codec(PayloadKeyring({"k2": K2, "k1": K1}, "k2"), key_store)
    assert await rotated.decode([under_k1]) == [plain("old")]
    [under_k2] = await rotated.encode([plain("new")])
    assert under_k2.metadata["encryption-key-id"] == b"k2"
    without_k1 = codec(PayloadKeyring({"k2": K2}, "k2"), key_store)
    with pytest.raises(KeyUnavailable, match="payload key 'k1' is not configured"):
        await without_k1.decode([under_k1])


async def test_a_lead_workflow_uses_the_leads_own_key_others_the_payload_key(key_store):
    ring = PayloadKeyring({"k1": K1}, "k1")
    [lead_payload] = await codec(ring, key_store, "lead-L-7").encode([plain("x")])
    assert lead_payload.metadata["encryption-key-id"] == b"lead:1:L-7"
    activity = codec(ring, key_store).with_context(ActivitySerializationContext(
        namespace="default", activity_id="1", activity_type="record_audit", activity_task_queue="q",
        workflow_id="lead-L-7", workflow_type="LeadWorkflow", is_local=False))
    [from_activity] = await activity.encode([plain("y")])
    assert from_activity.metadata["encryption-key-id"] == b"lead:1:L-7"  # the same key: one lead, one key
    [rollout] = await codec(ring, key_store, "model-rollout-leadflow-default@2").encode([plain("z")])
    assert rollout.metadata["encryption-key-id"] == b"k1"
    [no_context] = await codec(ring, key_store).encode([plain("z")])
    assert no_context.metadata["encryption-key-id"] == b"k1"
    # any holder of the keys decodes any payload, whatever context it has (the codec server has none)
    assert await codec(ring, key_store).decode([lead_payload, from_activity]) == [plain("x"), plain("y")]


async def test_lead_keys_are_stored_wrapped_never_in_the_clear(key_store):
    ring = PayloadKeyring({"k1": K1}, "k1")
    keys = LeadKeys(ring, key_store)
    generation, key = await keys.current("L-1")
    record = key_store.lead_key("L-1", generation)
    assert record.kek_id == "k1" and key not in record.wrapped and len(record.wrapped) == 12 + 32 + 16
    # another process (no cache) gets the same key; one with another payload key cannot open it
    assert await LeadKeys(ring, key_store).key("L-1", 1) == key
    with pytest.raises(KeyUnavailable, match="wrapped by payload key 'k1', which is not configured"):
        await LeadKeys(PayloadKeyring({"k2": K2}, "k2"), key_store).key("L-1", 1)


async def test_processes_racing_for_a_new_leads_key_agree_on_one(key_store):
    ring = PayloadKeyring({"k1": K1}, "k1")
    results = await asyncio.gather(*(LeadKeys(ring, key_store).current("L-race") for _ in range(8)))
    assert len(set(results)) == 1 and [r.generation for r in key_store.lead_keys("L-race")] == [1]


async def test_erasure_rotates_then_destroys_old_generations(key_store):
    ring = PayloadKeyring({"k1": K1}, "k1")
    c = codec(ring, key_store, "lead-L-2")
    [before] = await c.encode([plain("ann")])
    keys = c.lead_keys
    assert keys.rotate_sync("L-2", "L-2/9") == 2
    assert keys.rotate_sync("L-2", "L-2/9") == 2  # a retry of the same erasure makes no third
    [after] = await c.encode([plain("new")])
    assert after.metadata["encryption-key-id"] == b"lead:2:L-2"
    assert await c.decode([before, after]) == [plain("ann"), plain("new")]  # both, until destroyed
    assert keys.destroy_sync("L-2", below=2) == 1
    with pytest.raises(KeyUnavailable, match="destroyed"):
        await c.decode([before])
    with pytest.raises(KeyUnavailable, match="destroyed"):  # in a fresh process too
        await codec(ring, key_store).decode([before])
    assert await c.decode([after]) == [plain("new")]
    assert key_ids_in([before, after]) == {"lead:1:L-2", "lead:2:L-2"}


async def test_a_destroyed_key_is_gone_from_other_processes_within_the_cache_time(key_store):
    ring = PayloadKeyring({"k1": K1}, "k1")
    reader = EncryptionCodec(ring, LeadKeys(ring, key_store, cache_seconds=0.2))
    [payload] = await codec(ring, key_store, "lead-L-3").encode([plain("ann")])
    assert await reader.decode([payload]) == [plain("ann")]  # cached now
    LeadKeys(ring, key_store).destroy_sync("L-3")  # elsewhere
    await asyncio.sleep(0.3)
    with pytest.raises(KeyUnavailable, match="destroyed"):
        await reader.decode([payload])


class CountingStore:
    """The key store, counting the reads of lead keys (what each event would cost)."""

    def __init__(self, store: AuditStore):
        self.store, self.reads = store, 0

    def __getattr__(self, name):
        if name in ("lead_keys", "lead_key"):
            self.reads += 1
        return getattr(self.store, name)


async def test_a_quiet_leads_key_stays_in_memory_past_the_cache_time(key_store):
    """Real leads get an event every few days: a time-limited cache made each of them read
    the lead key from the store again (2-3 reads per event, worker and API). Keys stay in
    memory until the store's log says they changed; the log is read once per cache time."""
    ring = PayloadKeyring({"k1": K1}, "k1")
    counting = CountingStore(key_store)
    c = EncryptionCodec(ring, LeadKeys(ring, counting, cache_seconds=0.1), "lead-L-quiet")
    [payload] = await c.encode([plain("ann")])
    assert await c.decode([payload]) == [plain("ann")]
    read = counting.reads
    for _ in range(3):
        await asyncio.sleep(0.15)  # longer than the cache time, nothing changed
        [again] = await c.encode([plain("bob")])
        assert await c.decode([payload, again]) == [plain("ann"), plain("bob")]
    assert counting.reads == read


async def test_a_rotation_elsewhere_reaches_the_encoder_within_the_cache_time(key_store):
    ring = PayloadKeyring({"k1": K1}, "k1")
    c = EncryptionCodec(ring, LeadKeys(ring, key_store, cache_seconds=0.2), "lead-L-rot")
    [before] = await c.encode([plain("ann")])
    assert LeadKeys(ring, key_store).rotate_sync("L-rot", "L-rot/1") == 2  # elsewhere
    await asyncio.sleep(0.3)
    [after] = await c.encode([plain("new")])
    assert (before.metadata["encryption-key-id"], after.metadata["encryption-key-id"]) == (b"lead:1:L-rot",
                                                                                          b"lead:2:L-rot")


async def test_a_key_read_while_it_is_destroyed_is_not_kept(key_store):
    """The read of a key that another process destroys while it is under way, and whose
    change the log shows before the read returns, must not stay in memory: nothing
    would make this process forget it again."""
    ring = PayloadKeyring({"k1": K1}, "k1")
    [payload] = await codec(ring, key_store, "lead-L-race").encode([plain("ann")])
    read_done, go_on = threading.Event(), threading.Event()

    class SlowStore(CountingStore):
        def __getattr__(self, name):
            got = super().__getattr__(name)
            if name != "lead_key":
                return got

            def lead_key(*args):
                record = got(*args)  # the key as it was ...
                read_done.set()
                go_on.wait(5)  # ... returned after it was destroyed and the change was seen
                return record
            return lead_key

    reader = LeadKeys(ring, SlowStore(key_store), cache_seconds=0.1)
    slow = asyncio.create_task(reader.key("L-race", 1))
    await asyncio.to_thread(read_done.wait, 5)
    LeadKeys(ring, key_store).destroy_sync("L-race")
    await asyncio.sleep(0.15)
    await reader.current("L-other")  # looks at the log: L-race changed
    go_on.set()
    assert await slow is not None  # it was read before the destruction
    await asyncio.sleep(0.15)
    assert await reader.key("L-race", 1) is None


async def test_rewrap_lets_an_old_payload_key_retire(key_store):
    old, new = PayloadKeyring({"k1": K1}, "k1"), PayloadKeyring({"k2": K2, "k1": K1}, "k2")
    [payload] = await codec(old, key_store, "lead-L-4").encode([plain("ann")])
    assert LeadKeys(new, key_store).rewrap_sync() == 1
    assert key_store.lead_key("L-4", 1).kek_id == "k2"
    only_new = codec(PayloadKeyring({"k2": K2}, "k2"), key_store)
    assert await only_new.decode([payload]) == [plain("ann")]


# --------------------------------------------------------------------------- the one converter


async def test_config_builds_the_one_converter_with_the_codec(key_store, monkeypatch):
    monkeypatch.setenv("LEADFLOW_PAYLOAD_KEYS", key_spec("k1", K1))
    converter = data_converter(Settings(), key_store=key_store)
    assert isinstance(converter.payload_codec, EncryptionCodec)
    assert converter.payload_codec.keyring.current == "k1"
    [encoded] = await converter.encode([{"email": "ann@example.test"}])
    assert encoded.metadata["encoding"] == ENCODING
    assert await converter.decode([encoded]) == [{"email": "ann@example.test"}]
    # failures (message and stack trace) are encoded as well
    assert converter.failure_converter_class.__name__ == "DefaultFailureConverterWithEncodedAttributes"
    assert data_converter(encrypted=False).payload_codec is None  # recorded test histories only


async def test_clients_never_make_a_store_for_lead_keys(tmp_path, monkeypatch):
    """A CLI run from the wrong directory must not invent fresh lead keys in a new store
    (the worker could not read what it sends): the store must exist."""
    monkeypatch.setenv("LEADFLOW_PAYLOAD_KEYS", key_spec("k1", K1))
    converter = data_converter(Settings(database_url=f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}"))
    ctx = converter.payload_codec.with_context(WorkflowSerializationContext(namespace="default", workflow_id="lead-L"))
    with pytest.raises(KeyConfigError, match="no store at .* for the leads. data keys"):
        await ctx.encode([plain("x")])
    assert not (tmp_path / "nowhere").exists()


def test_connect_uses_the_converter():
    import inspect

    assert "data_converter(settings)" in inspect.getsource(config.connect)


def test_the_data_converter_specialises_per_lead_without_rebuilding_itself(key_store, monkeypatch):
    """Each workflow task, command and activity of a lead gets the converter for its context:
    the lead's key encrypts, other workflows use the payload key. What does not depend on the
    context (the pydantic payload converter, the failure converter) is shared, not rebuilt
    (rebuilding cost the worker 16% of its CPU under sparse traffic)."""
    from temporalio.contrib.pydantic import PydanticPayloadConverter

    ring = PayloadKeyring({"k1": K1}, "k1")
    converter = data_converter(Settings(), keyring=ring, key_store=key_store)
    built = []
    monkeypatch.setattr(PydanticPayloadConverter, "__init__",
                        lambda self, *a, **kw: built.append(self) or None)
    lead = converter.with_context(WorkflowSerializationContext(namespace="default", workflow_id="lead-A1"))
    other = converter.with_context(WorkflowSerializationContext(namespace="default", workflow_id="model-rollout-x"))
    monkeypatch.undo()
    assert built == []
    assert lead.payload_converter is converter.payload_converter
    assert lead.failure_converter is converter.failure_converter
    assert lead.with_context(WorkflowSerializationContext(namespace="default", workflow_id="lead-A1")) is lead

    async def key_id(c) -> str:
        (payload,) = await c.encode([{"facts": {"email": "a@example.com"}}])
        assert await c.decode([payload]) == [{"facts": {"email": "a@example.com"}}]
        return payload.metadata["encryption-key-id"].decode()

    assert asyncio.run(key_id(lead)) == "lead:1:A1"
    assert asyncio.run(key_id(other)) == "k1"
    assert asyncio.run(key_id(converter)) == "k1"
