"""API keys and roles: the key ring, failed-authentication limits, and the `allow`
dependency every route declares its roles with."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import os
import time
import tomllib
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError, model_validator

from funnel.models import Actor, Role

from api.schemas import describe_errors

log = logging.getLogger("leadflow.api")

MIN_KEY_LENGTH = 16
MIN_KEY_BITS = 64  # estimated: length x Shannon entropy of the characters
DEV_KEYS = {f"dev-{role.value}": role for role in (Role.MARKETING, Role.PRESALES, Role.SALES, Role.MANAGER)}
KEY_ROLES = (Role.MARKETING, Role.PRESALES, Role.SALES, Role.MANAGER)



# =========================================================================== API keys


class ConfigError(Exception):
    """The API cannot start with this configuration; the message says what to fix."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the owner of the key, as configured. Never what a body claims."""

    name: str
    role: Role
    dev: bool = False  # one of the well-known dev keys: taken on a loopback bind only

    @property
    def actor(self) -> Actor:
        return Actor(name=self.name, role=self.role)


@dataclass(frozen=True)
class _StoredKey:
    principal: Principal
    digest: bytes  # sha256 of the key; the plain key is never kept


class _KeyFileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    role: str
    key: str | None = None
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")] | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> _KeyFileEntry:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key or sha256")
        return self


class KeyRing:
    """The configured API keys, by sha256 digest, each bound to a name and a role.

    Made from the environment, it follows LEADFLOW_API_KEYS_FILE: a changed file is read
    again within RELOAD_SECONDS, so keys are added and revoked without a restart (a file
    that no longer parses is reported and the keys in use stay)."""

    RELOAD_SECONDS = 2.0

    def __init__(self, keys: list[_StoredKey], env: dict[str, str] | None = None):
        self._keys = self._checked(keys)
        self._env = env if env and env.get("LEADFLOW_API_KEYS_FILE") else None
        self._stamp = self._file_stamp()
        self._looked = time.monotonic()

    @staticmethod
    def _checked(keys: list[_StoredKey]) -> tuple[_StoredKey, ...]:
        seen: dict[bytes, str] = {}
        for stored in keys:
            if stored.digest in seen:
                raise ConfigError(f"API keys of {seen[stored.digest]} and {stored.principal.name} are the same key")
            seen[stored.digest] = stored.principal.name
        return tuple(keys)

    def _file_stamp(self) -> tuple | None:
        if self._env is None:
            return None
        try:
            info = os.stat(self._env["LEADFLOW_API_KEYS_FILE"])
        except OSError:
            return ("missing",)
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def _follow_file(self) -> None:
        now = time.monotonic()
        if self._env is None or now - self._looked < self.RELOAD_SECONDS:
            return
        self._looked = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            fresh = KeyRing.from_env(self._env)
        except ConfigError as err:
            log.error("API keys not reloaded, the keys in use stay: %s", err)
            return
        self._keys = fresh._keys
        log.info("API keys reloaded from %s: %d key(s)", self._env["LEADFLOW_API_KEYS_FILE"], len(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    @staticmethod
    def digest(key: str) -> bytes:
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()

    @classmethod
    def entry(cls, name: str, role: str, key: str | None = None, sha256: str | None = None,
              min_length: int = MIN_KEY_LENGTH) -> _StoredKey:
        name, role = name.strip(), role.strip()
        if role not in {r.value for r in KEY_ROLES}:
            raise ConfigError(
                f"API key {name!r}: unknown role {role!r}; use one of {', '.join(r.value for r in KEY_ROLES)}"
            )
        try:
            actor = Actor(name=name, role=Role(role))
        except ValidationError:
            raise ConfigError(f"API key {name!r}: the name must be 1-100 characters") from None
        if sha256 is not None:
            digest = bytes.fromhex(sha256)
        else:
            assert key is not None
            if len(key) < min_length or any(c.isspace() for c in key):
                raise ConfigError(
                    f"API key {name!r}: the key must be at least {min_length} characters without spaces "
                    "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
            bits = _entropy_bits(key)
            if min_length > 1 and bits < MIN_KEY_BITS:
                raise ConfigError(
                    f"API key {name!r}: the key is too easy to guess (about {bits:.0f} bits; at least "
                    f"{MIN_KEY_BITS} needed: make one with python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
            digest = cls.digest(key)
        return _StoredKey(Principal(actor.name, actor.role), digest)

    @classmethod
    def parse(cls, spec: str) -> list[_StoredKey]:
        """`name:role:key,name:role:key` (the key itself may contain ':')."""
        keys = []
        for number, item in enumerate(spec.split(","), start=1):
            if not item.strip():
                continue
            parts = item.strip().split(":", 2)
            if len(parts) != 3:
                raise ConfigError(f"LEADFLOW_API_KEYS entry {number}: expected name:role:key")
            keys.append(cls.entry(*parts))
        return keys

    @classmethod
    def parse_file(cls, path: Path) -> list[_StoredKey]:
        """[[keys]] tables with name, role and key or sha256 (hex digest of the key)."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"LEADFLOW_API_KEYS_FILE {path}: cannot read it: {err.strerror or err}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"LEADFLOW_API_KEYS_FILE {path}: not valid TOML: {err}") from None
        unknown = set(data) - {"keys"}
        if unknown or not isinstance(data.get("keys", []), list):
            raise ConfigError(f"LEADFLOW_API_KEYS_FILE {path}: expected only [[keys]] tables")
        keys = []
        for number, raw in enumerate(data.get("keys", []), start=1):
            try:
                item = _KeyFileEntry.model_validate(raw)
            except ValidationError as err:
                raise ConfigError(f"LEADFLOW_API_KEYS_FILE {path}: key {number}: {describe_errors(err)}") from None
            keys.append(cls.entry(item.name, item.role, item.key, item.sha256))
        return keys

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> KeyRing:
        env = dict(os.environ if env is None else env)
        keys = cls.parse(env.get("LEADFLOW_API_KEYS", ""))
        if env.get("LEADFLOW_API_KEYS_FILE"):
            keys += cls.parse_file(Path(env["LEADFLOW_API_KEYS_FILE"]))
        dev = env.get("LEADFLOW_API_DEV_KEYS", "").strip().lower()
        if dev in ("1", "true", "yes"):
            log.warning("LEADFLOW_API_DEV_KEYS is on: the well-known dev keys are accepted (local use only)")
            keys += cls.dev_keys()
        elif dev not in ("", "0", "false", "no"):
            raise ConfigError(f"LEADFLOW_API_DEV_KEYS={dev!r}: use 1 or 0")
        if not keys:
            raise ConfigError(
                "no API keys configured: set LEADFLOW_API_KEYS=name:role:key[,...] (roles: marketing, presales, "
                "sales, manager) or LEADFLOW_API_KEYS_FILE=keys.toml; for local development only, "
                "LEADFLOW_API_DEV_KEYS=1 accepts the keys dev-marketing, dev-presales, dev-sales and dev-manager"
            )
        return cls(keys, env)

    @classmethod
    def dev_keys(cls) -> list[_StoredKey]:
        dev = [cls.entry(key, role.value, key=key, min_length=1) for key, role in DEV_KEYS.items()]
        return [_StoredKey(Principal(k.principal.name, k.principal.role, dev=True), k.digest) for k in dev]

    def lookup(self, presented: str) -> Principal | None:
        """The key's owner, or None. Compares against every stored digest, in constant time each."""
        return self.owner(self.digest(presented))

    def owner(self, digest: bytes) -> Principal | None:
        """The owner of the key with this digest, while it is configured (revoked: None)."""
        self._follow_file()
        found = None
        for stored in self._keys:
            if hmac.compare_digest(digest, stored.digest):
                found = stored.principal
        return found


def _entropy_bits(key: str) -> float:
    """A key's guessability: its length times the Shannon entropy of its characters. A
    random token_urlsafe(32) has about 200 bits; 'aaaa...' has none."""
    counts = Counter(key)
    per_char = -sum(n / len(key) * math.log2(n / len(key)) for n in counts.values())
    return per_char * len(key)


class FailedAuthLimiter:
    """Failed authentications per client address: after `limit` within `window` seconds, 429
    with Retry-After until the oldest of them leaves the window (guessing keys gets slow)."""

    def __init__(self, limit: int = 10, window: float = 60.0, addresses: int = 10_000):
        self.limit, self.window, self.addresses = limit, window, addresses
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, address: str, now: float) -> int | None:
        failures = self._failures.get(address)
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if failures and len(failures) >= self.limit:
            return max(1, math.ceil(failures[0] + self.window - now))
        return None

    def failed(self, address: str, now: float) -> None:
        if address not in self._failures and len(self._failures) >= self.addresses:
            self._failures.pop(next(iter(self._failures)))  # forget the longest-known address
        self._failures.setdefault(address, deque()).append(now)


# =========================================================================== authentication


_bearer = HTTPBearer(auto_error=False, scheme_name="bearer", description="Authorization: Bearer <API key>")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey", description="X-API-Key: <API key>")


def authenticate(request: Request, presented: str | None) -> Principal:
    """The principal of a presented key: 401 (none, unknown, or a dev key off loopback), 429
    after too many failures from the caller's address. For API calls and UI sign-in alike."""
    limiter: FailedAuthLimiter = request.app.state.auth_failures
    address = _address(request)
    if (wait := limiter.retry_after(address, time.monotonic())) is not None:
        raise HTTPException(429, f"too many failed authentications from {address}; retry in {wait} s",
                            headers={"Retry-After": str(wait)})

    def refuse(detail: str) -> HTTPException:
        return failed_authentication(request, 401, detail)

    if not presented:
        raise HTTPException(401, "missing API key: send Authorization: Bearer <key> or X-API-Key: <key>",
                            headers={"WWW-Authenticate": "Bearer"})
    principal = request.app.state.keys.lookup(presented)
    if principal is None:
        raise refuse("invalid API key")
    if principal.dev and not _loopback((request.scope.get("server") or ("", 0))[0]):
        raise refuse("the dev keys are taken on a loopback bind only (127.0.0.1, ::1); configure "
                     "LEADFLOW_API_KEYS for this address")
    request.state.caller = principal.name  # for the access log (api.service.RequestIds)
    return principal


def _address(request: Request) -> str:
    return request.client.host if request.client else "?"


def failed_authentication(request: Request, status: int, detail: str) -> HTTPException:
    """Count a failure against the caller's address (see FailedAuthLimiter) and say why."""
    request.app.state.auth_failures.failed(_address(request), time.monotonic())
    return HTTPException(status, detail, headers={"WWW-Authenticate": "Bearer"})


def may(principal: Principal, roles: frozenset[Role]) -> bool:
    """Managers may do everything; the others what `roles` names."""
    return principal.role in roles or principal.role is Role.MANAGER


def allow(*roles: Role):
    """A dependency: the caller's key must be valid (401) and of one of `roles` (403);
    managers may do everything."""
    allowed = frozenset(roles) | {Role.MANAGER}
    names = ", ".join(r.value for r in KEY_ROLES if r in allowed)

    async def caller(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
        header_key: Annotated[str | None, Security(_api_key)],
    ) -> Principal:
        if bearer is not None and header_key is not None and bearer.credentials != header_key:
            raise failed_authentication(request, 400, "conflicting credentials: Authorization and X-API-Key carry "
                                                      "different keys; send one")
        principal = authenticate(request, bearer.credentials if bearer is not None else header_key)
        if not may(principal, allowed):
            raise HTTPException(403, f"role {principal.role.value} may not do this; allowed: {names}")
        return principal

    return caller


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
