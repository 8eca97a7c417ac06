"""RedisStore against a real Redis: the store contract, its URL, errors, bounds, and races between processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import redis

from canary_router import ConfigError, StoreError
from canary_router.model import AuditRecord, Phase, RolloutState
from canary_router.stores import ObservationBatch, SharedStore, SlotCounts, VariantCounts, open_store
from canary_router.stores.redis import RedisStore
from canary_router.testing import SharedStoreConformance
from redisserver import delete_prefix, free_port, new_prefix, shared_url


def _state(percent: float = 5.0, version_hint: int = 1) -> RolloutState:
    return RolloutState(Phase.RUNNING, 0, percent, 1_000.0 + version_hint, "why", "tester", 1, 1_000.0)


def _record(name: str, action: str = "start") -> AuditRecord:
    return AuditRecord(1_000.0, name, "tester", action, None, "running", None, 5.0, "why", {})


class TestRedisStore(SharedStoreConformance):
    """RedisStore keeps the Store and SharedStore contracts; the peer is a second client on the same prefix."""

    def setup_method(self) -> None:
        self.url = shared_url()
        self.prefix = new_prefix("conformance")

    def teardown_method(self) -> None:
        super().teardown_method()
        delete_prefix(self.url, self.prefix)

    def make_store(self) -> SharedStore:
        return RedisStore(self.url, prefix=self.prefix)

    def make_peer(self, store: SharedStore) -> SharedStore:
        return RedisStore(self.url, prefix=self.prefix)


@pytest.fixture
def store() -> object:
    """A RedisStore on the shared server under a fresh prefix (its keys deleted afterwards)."""
    url, prefix = shared_url(), new_prefix()
    made = RedisStore(url, prefix=prefix)
    yield made
    made.close()
    delete_prefix(url, prefix)


def test_url_sets_prefix_and_options() -> None:
    """open_store(redis://…?prefix=…) builds a RedisStore with that prefix and passes connection options on."""
    url = shared_url()
    prefix = new_prefix("url")
    opened = open_store(f"{url}?prefix={prefix}&refresh_interval=2.5&max_history=7&socket_timeout=0.25")
    try:
        assert isinstance(opened, RedisStore)
        assert (opened.prefix, opened.refresh_interval) == (prefix, 2.5)
        assert opened.client.get_connection_kwargs()["socket_timeout"] == 0.25
        assert opened.client.get_connection_kwargs()["socket_connect_timeout"] == 0.5
        opened.ping()
    finally:
        opened.close()
        delete_prefix(url, prefix)


def test_environment_variable_names_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """CANARY_ROUTER_STORE=redis://… is used when code names no store."""
    prefix = new_prefix("env")
    monkeypatch.setenv("CANARY_ROUTER_STORE", f"{shared_url()}?prefix={prefix}")
    opened = open_store()
    try:
        assert isinstance(opened, RedisStore)
        assert opened.prefix == prefix
    finally:
        opened.close()


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0?prefix=", "redis://127.0.0.1:6379/0?refresh_interval=soon", "redis://h/0?max_history=0"],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    """A store URL with an unusable value stops the boot with a ConfigError that names the store."""
    with pytest.raises(ConfigError, match="store"):
        RedisStore.from_url(url)


def test_every_failure_is_a_store_error_and_quick() -> None:
    """With nothing listening, every call raises StoreError (never a redis-py error) within a second."""
    dead = RedisStore(f"redis://127.0.0.1:{free_port()}/0", prefix=new_prefix("dead"))
    batch = ObservationBatch("r", 1, 0.0, 0, {"old": VariantCounts(1)})
    calls = [
        dead.ping,
        lambda: dead.get("r"),
        dead.get_all,
        lambda: dead.compare_and_set("r", None, _state(), _record("r")),
        lambda: dead.history("r"),
        lambda: dead.add_observations(batch),
        lambda: dead.observations("r", 1),
        lambda: dead.observation_history("r"),
        lambda: dead.acquire_lease("l", "me", 5.0),
    ]
    try:
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreError) as caught:
                call()
            assert not isinstance(caught.value, redis.RedisError)
            assert time.monotonic() - started < 1.0
    finally:
        dead.close()


def test_audit_stream_is_bounded(store: RedisStore) -> None:
    """The audit stream is trimmed near max_history; history() returns at most that many, newest kept."""
    bounded = RedisStore(store.client, prefix=store.prefix, max_history=5)
    bounded.compare_and_set("r", None, _state(), _record("r"))
    for version in range(1, 300):
        bounded.compare_and_set("r", version, _state(), _record("r", f"a{version}"))
    assert [r.action for r in bounded.history("r")] == [f"a{v}" for v in range(295, 300)]
    assert store.client.xlen(f"{store.prefix}:audit:r") < 200


def test_observation_keys_expire(store: RedisStore) -> None:
    """Totals, unit sets and history slots carry a TTL, so old steps leave Redis on their own."""
    short = RedisStore(store.client, prefix=store.prefix, observation_ttl=60)
    short.add_observations(
        ObservationBatch(
            "r",
            3,
            10.0,
            0,
            {"new": VariantCounts(2, 1, {4: 2}, frozenset({8}), frozenset({8}))},
            (SlotCounts(100.0, "new", 2, 1, {1: 2}),),
        )
    )
    keys = list(store.client.scan_iter(match=f"{store.prefix}:*"))
    assert len(keys) >= 5
    for key in keys:
        if b":batch:" in key:
            continue
        assert 0 < store.client.ttl(key) <= 60, key


def test_unit_sets_below_the_sample_level_are_dropped(store: RedisStore) -> None:
    """When the sample level rises, unit hashes outside the sample are deleted and the count is scaled."""
    store.add_observations(ObservationBatch("r", 1, 0.0, 0, {"old": VariantCounts(4, 0, {}, frozenset({1, 2, 3, 4}))}))
    assert store.observations("r", 1).old.units == 4  # type: ignore[union-attr]
    store.add_observations(ObservationBatch("r", 1, 0.0, 2, {"old": VariantCounts(1, 0, {}, frozenset({8}))}))
    snap = store.observations("r", 1)
    assert snap is not None
    assert snap.unit_sample_level == 2
    assert snap.old.units == 2 * 4, "hashes 4 and 8 are in the 1/4 sample"
    members = set(store.client.scan_iter(match=f"{store.prefix}:units:*"))
    assert all(int(k.rsplit(b":", 1)[1]) >= 2 for k in members)


def test_rollout_names_with_separators_stay_apart(store: RedisStore) -> None:
    """Names containing ':' or spaces cannot collide with another rollout's keys."""
    store.add_observations(ObservationBatch("a:1", 2, 0.0, 0, {"old": VariantCounts(5)}))
    store.add_observations(ObservationBatch("a", 1, 0.0, 0, {"old": VariantCounts(7)}))
    one, other = store.observations("a:1", 2), store.observations("a", 1)
    assert one is not None
    assert other is not None
    assert (one.old.requests, other.old.requests) == (5, 7)
    assert store.observations("a", 12) is None


def test_lease_expiry_is_on_the_server_clock(store: RedisStore) -> None:
    """Lease.expires_at is the server's time plus the TTL."""
    lease = store.acquire_lease("controller", "me", 5.0)
    server_now = float(".".join(str(int(x)) for x in store.client.time()))
    assert lease is not None
    assert 4.0 < lease.expires_at - server_now <= 5.01


_RACER = textwrap.dedent(
    """
    import json, sys
    import redis
    from canary_router import ConflictError
    from canary_router.stores.redis import RedisStore
    from canary_router.model import AuditRecord, Phase, RolloutState

    url, prefix, me = sys.argv[1], sys.argv[2], sys.argv[3]
    store = RedisStore(url, prefix=prefix)
    redis.Redis.from_url(url).blpop([prefix + ":test-go"], timeout=30)
    out = {}
    lease = store.acquire_lease("controller", me, 30.0)
    out["lease"] = lease is not None
    state = RolloutState(Phase.RUNNING, 1, 10.0, 2000.0, "by " + me, me, 2, 2000.0)
    record = AuditRecord(2000.0, "r", me, "promote", "running", "running", 5.0, 10.0, "by " + me)
    try:
        out["version"] = store.compare_and_set("r", 1, state, record)
        out["outcome"] = "ok"
    except ConflictError as exc:
        out["outcome"], out["message"] = "conflict", str(exc)
    print(json.dumps(out))
    store.close()
    """
)


def test_processes_racing_apply_exactly_one_change(store: RedisStore) -> None:
    """Six processes released at once write from version 1: one applies, five get a ConflictError; one lease holder."""
    store.compare_and_set("r", None, _state(), _record("r"))
    url = shared_url()
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACER, url, store.prefix, f"p{i}"], stdout=subprocess.PIPE, text=True)
        for i in range(6)
    ]
    time.sleep(1.5)  # every process is waiting on the list by now (or soon: BLPOP picks the token up then)
    store.client.rpush(f"{store.prefix}:test-go", *["go"] * 6)
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert sorted(r["outcome"] for r in results) == ["conflict"] * 5 + ["ok"]
    assert sum(r["lease"] for r in results) == 1
    assert all("changed concurrently" in r["message"] for r in results if r["outcome"] == "conflict")
    current = store.get("r")
    assert current is not None
    assert current.version == 2
    assert [r.action for r in store.history("r")] == ["start", "promote"]


def test_corrupt_data_is_a_store_error(store: RedisStore) -> None:
    """Values that are not what the store wrote raise StoreError (which the router handles), not ValueError."""
    store.client.hset(f"{store.prefix}:state", "r", "not json")
    store.client.hset(f"{store.prefix}:obs:r:1", mapping={"old:r": "many", "level": "0"})
    with pytest.raises(StoreError, match="corrupt state"):
        store.get("r")
    with pytest.raises(StoreError, match="corrupt observations"):
        store.observations("r", 1)
