"""API keys as an attacker would try them: weak keys refused at start, conflicting
credentials refused, failed authentication slowed down (429), the well-known dev keys
taken on a loopback bind only, enforced in the API itself."""

from __future__ import annotations

import secrets

import pytest
from fastapi.testclient import TestClient

from activities.store import AuditStore
from api import ConfigError, KeyRing, create_app

MANAGER = secrets.token_urlsafe(32)


@pytest.fixture
def app_client(tmp_path, settings):
    ring = KeyRing(KeyRing.parse(f"mia:manager:{MANAGER}") + KeyRing.dev_keys())
    app = create_app(settings=settings, keys=ring, temporal=object(), store=AuditStore(f"sqlite:///{tmp_path}/a.db"))
    with TestClient(app) as client:  # Starlette's test server says it is "testserver": not loopback
        yield client


@pytest.mark.parametrize("key", ["a" * 40, "abababababababababab", "0123456789" + "0" * 10, "mk-" + "m" * 24])
def test_keys_that_are_easy_to_guess_are_refused_at_start(key):
    with pytest.raises(ConfigError, match="too easy to guess"):
        KeyRing.parse(f"x:sales:{key}")


def test_a_random_key_is_taken():
    assert len(KeyRing.parse(f"x:sales:{secrets.token_urlsafe(24)}")) == 1


def test_conflicting_credentials_are_refused(app_client):
    ok = app_client.get("/models", headers={"Authorization": f"Bearer {MANAGER}", "X-API-Key": MANAGER})
    assert ok.status_code == 200  # the same key twice is no conflict
    r = app_client.get("/models", headers={"Authorization": f"Bearer {MANAGER}", "X-API-Key": "dev-manager"})
    assert r.status_code == 400 and "conflicting credentials" in r.json()["detail"]


def test_failed_authentication_is_slowed_down(app_client):
    for i in range(10):
        assert app_client.get("/models", headers={"X-API-Key": f"guess-{i}"}).status_code == 401
    blocked = app_client.get("/models", headers={"X-API-Key": "guess-10"})
    assert blocked.status_code == 429 and 1 <= int(blocked.headers["Retry-After"]) <= 60
    # while blocked, even the right key waits: guessing gets no faster by mixing in a good one
    assert app_client.get("/models", headers={"X-API-Key": MANAGER}).status_code == 429


def test_dev_keys_are_taken_on_a_loopback_bind_only(app_client):
    r = app_client.get("/models", headers={"Authorization": "Bearer dev-manager"})
    assert r.status_code == 401 and "loopback bind only" in r.json()["detail"]
    assert app_client.get("/models", headers={"Authorization": f"Bearer {MANAGER}"}).status_code == 200


def test_keys_are_added_and_revoked_without_a_restart(tmp_path, settings, monkeypatch, caplog):
    """The key file is followed: a key added works, a key removed (and its dashboard
    sessions) stops working, a broken file keeps the keys in use."""
    first, second = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    path = tmp_path / "keys.toml"

    def keys(*entries: tuple[str, str]) -> None:
        path.write_text("".join(f'[[keys]]\nname = "{name}"\nrole = "manager"\nkey = "{key}"\n\n'
                                for name, key in entries))

    keys(("mia", first))
    monkeypatch.setenv("LEADFLOW_API_KEYS_FILE", str(path))
    monkeypatch.delenv("LEADFLOW_API_KEYS", raising=False)
    monkeypatch.setattr(KeyRing, "RELOAD_SECONDS", 0.0)
    app = create_app(settings=settings, temporal=object(), store=AuditStore(f"sqlite:///{tmp_path}/a.db"))
    with TestClient(app, follow_redirects=False) as client:
        def status(key: str) -> int:
            return client.get("/models", headers={"X-API-Key": key}).status_code

        assert (status(first), status(second)) == (200, 401)
        signed = client.post("/ui/sign-in", content=f"key={first}&next=/ui/slas",
                             headers={"content-type": "application/x-www-form-urlencoded"})
        assert signed.status_code == 303 and client.get("/ui/slas").status_code == 200

        keys(("mia", first), ("ole", second))  # added
        assert (status(first), status(second)) == (200, 200)
        keys(("ole", second))  # mia's key revoked: her API calls and her dashboard session end
        assert (status(first), status(second)) == (401, 200)
        assert client.get("/ui/slas").headers["location"].startswith("/ui/sign-in")
        path.write_text("[[keys]\nbroken")
        with caplog.at_level("ERROR", logger="leadflow.api"):
            assert status(second) == 200
        assert "API keys not reloaded, the keys in use stay" in caplog.text
