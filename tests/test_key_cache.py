"""The per-worker API-key cache: its bounds and expiry, and revocation within one second
on every worker of one host (SQLite) and on two hosts (PostgreSQL)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from sessions_app.corridor.keycache import KeyCache
from storage_backends import ApiKey, ApiKeyNotFound
from storage_backends.codec import utcnow

from .conftest import postgres_schema, require_server
from .servers import Server, cli, serving
from .test_gunicorn import UNLIMITED

AGENT = "support-bot"
SCOPES = "sessions:create,sessions:read,sessions:update,sessions:delete"


# Unit: bounds and expiry


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Store:
    """get_api_key as the storage has it, counting reads."""

    def __init__(self) -> None:
        self.keys: dict[str, ApiKey] = {}
        self.reads = 0

    def add(self, key_id: str) -> ApiKey:
        key = ApiKey(id=key_id, name="n", secret_hash="h", grants=[], created_at=utcnow())
        self.keys[key_id] = key
        return key

    def get_api_key(self, *, key_id: str) -> ApiKey:
        self.reads += 1
        try:
            return self.keys[key_id]
        except KeyError:
            raise ApiKeyNotFound(key_id) from None


def test_an_entry_is_used_for_less_than_its_ttl_and_then_read_again():
    clock, store = Clock(), Store()
    store.add("ak_1")
    cache = KeyCache(ttl=1.0, clock=clock)
    cache.get(store, "ak_1")
    clock.now += 0.999
    cache.get(store, "ak_1")
    assert store.reads == 1
    clock.now += 0.001  # exactly one second after the read began: stale
    cache.get(store, "ak_1")
    assert store.reads == 2


def test_a_miss_is_never_kept_so_a_new_key_is_found_at_once():
    store = Store()
    cache = KeyCache(clock=Clock())
    with pytest.raises(ApiKeyNotFound):
        cache.get(store, "ak_new")
    store.add("ak_new")
    assert cache.get(store, "ak_new").id == "ak_new"
    assert len(cache) == 1


def test_the_cache_never_holds_more_than_its_bound():
    clock, store = Clock(), Store()
    cache = KeyCache(max_entries=8, clock=clock)
    for n in range(50):
        store.add(f"ak_{n}")
        cache.get(store, f"ak_{n}")
        clock.now += 0.01
        assert len(cache) <= 8
    # the newest survive eviction
    reads = store.reads
    cache.get(store, "ak_49")
    assert store.reads == reads


def test_forget_and_clear_drop_entries_and_a_read_in_flight_stores_nothing():
    clock, store = Clock(), Store()
    store.add("ak_1")
    cache = KeyCache(clock=clock)
    cache.get(store, "ak_1")
    cache.forget("ak_1")
    assert len(cache) == 0

    class Racing(Store):
        def get_api_key(self, *, key_id: str) -> ApiKey:
            found = super().get_api_key(key_id=key_id)
            cache.clear()  # a change made here while the read was under way
            return found

    racing = Racing()
    racing.add("ak_2")
    cache.get(racing, "ak_2")
    assert len(cache) == 0


def test_a_ttl_past_the_contract_is_refused():
    with pytest.raises(ValueError):
        KeyCache(ttl=1.5)


# Process: real gunicorn workers


def sweep(urls: list[str], path: str, headers: dict[str, str], count: int = 160) -> list[int]:
    """``count`` requests spread over the servers, each on a new connection, from 8 threads
    at once, so every worker of every server takes some."""

    def one(n: int) -> int:
        url = urls[n % len(urls)] + path
        return requests.get(url, headers={**headers, "Connection": "close"}, timeout=10).status_code

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def check_revocation(urls: list[str], env: dict[str, str]) -> None:
    """Create a key, use it at once, warm every worker, revoke, and 401 everywhere 1 s later."""
    out = cli("keys", "create", "--name", "k", "--grant", f"{AGENT}={SCOPES}", env=env).stdout
    token = out.strip().splitlines()[-1]
    key_id = token.partition(".")[0]
    headers = {"x-api-key": token}
    path = f"/v2/agents/{AGENT}/sessions"
    # usable at once, on every server, never a 401
    assert set(sweep(urls, path, headers)) == {200}
    start = time.monotonic()
    cli("keys", "revoke", key_id, env=env)
    revoked = time.monotonic()
    time.sleep(max(0.0, revoked + 1.0 - time.monotonic()))
    assert set(sweep(urls, path, headers, count=240)) == {401}, revoked - start


@pytest.mark.slow
def test_revocation_and_grants_within_one_second_on_every_worker_sqlite(tmp_path: Path):
    env = {"AGENT_SESSIONS_STORAGE_URL": f"sqlite:///{tmp_path}/keys.db", **UNLIMITED}
    cli("agents", "create", AGENT, "--name", AGENT, env=env)
    with serving(env, tmp_path, workers=4) as server:
        check_revocation([server.url], env)

        # a grant removed (the agent deleted and made again) is gone within 1 s everywhere
        admin_out = cli("keys", "create", "--name", "a", "--admin", env=env).stdout
        admin = {"x-api-key": admin_out.strip().splitlines()[-1]}
        out = cli("keys", "create", "--name", "g", "--grant", f"{AGENT}={SCOPES}", env=env).stdout
        headers = {"x-api-key": out.strip().splitlines()[-1]}
        path = f"/v2/agents/{AGENT}/sessions"
        assert set(sweep([server.url], path, headers)) == {200}
        cli("agents", "delete", AGENT, "--yes", env=env)
        done = time.monotonic()
        made = requests.post(
            server.url + "/v2/agents", json={"key": AGENT, "name": "again"}, headers=admin
        )
        assert made.status_code == 201
        time.sleep(max(0.0, done + 1.0 - time.monotonic()))
        assert set(sweep([server.url], path, headers, count=240)) == {403}


@pytest.mark.slow
@pytest.mark.postgres
def test_revocation_within_one_second_on_two_hosts_postgres(tmp_path: Path):
    require_server("PostgreSQL", "127.0.0.1", 5432)
    with postgres_schema() as url:
        env = {"AGENT_SESSIONS_STORAGE_URL": url, **UNLIMITED}
        cli("agents", "create", AGENT, "--name", AGENT, env=env)
        logs = tmp_path / "a.log", tmp_path / "b.log"
        with (
            Server(env, workers=2, log_path=logs[0]) as one,
            Server(env, workers=2, log_path=logs[1]) as two,
        ):
            check_revocation([one.url, two.url], env)
