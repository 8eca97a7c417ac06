"""The Redis store: rollout state, observation totals and leases shared by every process of every host.

Install the extra: ``pip install "canary-router[redis]"``; open it with
``RedisStore.from_url("redis://host:6379/0?prefix=shop-prod")`` or ``open_store(url)``.

Every key lives under ``prefix`` (default ``"canary"``), so several apps and environments share one Redis:

============================================  =====================================================
``{prefix}:state``                            hash: rollout → ``{"version": n, "state": {...}}``
``{prefix}:audit:{rollout}``                  stream of audit records (trimmed to about ``max_history``)
``{prefix}:changes``                          pub/sub channel: one message per change, with the new state
``{prefix}:lease:{name}``                     ``"{token}:{owner}"`` with a TTL; ``…:lease-token:{name}`` counts tokens
``{prefix}:obs:{rollout}:{epoch}``            hash: requests, errors and histogram per variant; step start; level
``{prefix}:units:{rollout}:{epoch}:…``        sets of unit hashes, one per sample level (see below)
``{prefix}:slots:{rollout}``                  sorted set of history slot starts; ``…:slot:{rollout}:{start}`` hashes
============================================  =====================================================

A write (compare-and-set, fence check, audit append and publish) is one Lua script, so it is atomic. So is
adding an observation batch, which also carries a one-off id: a batch retried after a lost reply is not
counted twice. Observation keys expire ``observation_ttl`` seconds after their last update (7 days).

Unit hashes are kept in one set per number of trailing zero bits, so the count of the ``1 / 2**level``
sample is a sum of set sizes (no scan), and sets below the current level are dropped as it rises.

Nothing here blocks for long: connect and read timeouts are 0.5 s unless the URL or client says otherwise,
and every Redis failure surfaces as :class:`~canary_router.StoreError`. Change notifications arrive on one
background thread per store (started by the first :meth:`RedisStore.subscribe`, restarted in a forked child)
that also re-reads every state each ``refresh_interval`` seconds, as a safety net for lost messages.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ChildDeadlockedError
from redis.retry import Retry

from .._throttle import Throttled
from ..errors import ConfigError, ConfigIssue, ConflictError, StoreError
from ..model import AuditRecord, RolloutState
from ..observe import BOUNDS, HistorySlot, StepSnapshot, VariantSnapshot
from .base import Lease, ObservationBatch, Versioned

__all__ = ["RedisStore"]

_log = logging.getLogger("canary_router")

_NBUCKETS = len(BOUNDS) + 1
_MAX_LEVEL = 32
_CHUNK = 500
_BATCH_MARK_TTL = 600

# KEYS: state hash, audit stream, lease key (or any key when unfenced)
# ARGV: name, expected version ("" = absent), new version, stored value, record, maxlen, channel, message, fence
_CAS = """
if ARGV[9] ~= '' then
  local holder = redis.call('GET', KEYS[3])
  if holder ~= ARGV[9] then
    return {-2, holder or ''}
  end
end
local current = redis.call('HGET', KEYS[1], ARGV[1])
local found = ''
if current then
  found = string.match(current, '^{"version": (%d+)')
end
if found ~= ARGV[2] then
  return {-1, found}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'r', ARGV[5])
redis.call('PUBLISH', ARGV[7], ARGV[8])
return {1, ARGV[3]}
"""

# KEYS: lease key, token counter.  ARGV: owner, ttl in ms.  Returns {token, expires_at_ms} or nil.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
local ms = tonumber(ARGV[2])
local t = redis.call('TIME')
local expires = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ms
if current then
  local sep = string.find(current, ':', 1, true)
  if string.sub(current, sep + 1) ~= ARGV[1] then
    return false
  end
  redis.call('SET', KEYS[1], current, 'PX', ms)
  return {string.sub(current, 1, sep - 1), expires}
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ':' .. ARGV[1], 'PX', ms)
return {tostring(token), expires}
"""

# KEYS: lease key.  ARGV: "{token}:{owner}".
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: observation hash, slot index, batch marker.
# ARGV: payload (JSON), ttl seconds, max slots, unit key base, slot key base, marker ttl.
# Payload: {"started_at": "<float>", "level": n, "variants": {"old": {"r": n, "e": n, "h": [[i, n], ...],
#   "u": [[tz, [h, ...]], ...], "eu": [[tz, [h, ...]], ...]}}, "slots": [["<start>", "old", r, e, [[i, n], ...]]]}
_ADD = """
if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[6]) then
  return 0
end
local p = cjson.decode(ARGV[1])
local ttl = ARGV[2]
local obs = KEYS[1]
local started = redis.call('HGET', obs, 'started_at')
if (not started) or tonumber(p.started_at) < tonumber(started) then
  redis.call('HSET', obs, 'started_at', p.started_at)
end
local level = tonumber(redis.call('HGET', obs, 'level') or '-1')
if p.level > level then
  redis.call('HSET', obs, 'level', p.level)
  for _, v in ipairs({'old', 'new'}) do
    for tz = 0, p.level - 1 do
      redis.call('DEL', ARGV[4] .. v .. ':u:' .. tz, ARGV[4] .. v .. ':e:' .. tz)
    end
  end
  level = p.level
end
for v, c in pairs(p.variants) do
  if c.r ~= 0 then redis.call('HINCRBY', obs, v .. ':r', c.r) end
  if c.e ~= 0 then redis.call('HINCRBY', obs, v .. ':e', c.e) end
  for _, item in ipairs(c.h) do
    redis.call('HINCRBY', obs, v .. ':h:' .. item[1], item[2])
  end
  for kind, sets in pairs({u = c.u, e = c.eu}) do
    for _, item in ipairs(sets) do
      if item[1] >= level then
        local key = ARGV[4] .. v .. ':' .. kind .. ':' .. item[1]
        redis.call('SADD', key, unpack(item[2]))
        redis.call('EXPIRE', key, ttl)
      end
    end
  end
end
redis.call('EXPIRE', obs, ttl)
for _, s in ipairs(p.slots) do
  local key = ARGV[5] .. s[1]
  if s[3] ~= 0 then redis.call('HINCRBY', key, s[2] .. ':r', s[3]) end
  if s[4] ~= 0 then redis.call('HINCRBY', key, s[2] .. ':e', s[4]) end
  for _, item in ipairs(s[5]) do
    redis.call('HINCRBY', key, s[2] .. ':l:' .. item[1], item[2])
  end
  redis.call('EXPIRE', key, ttl)
  redis.call('ZADD', KEYS[2], s[1], s[1])
end
if #p.slots > 0 then
  local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
  if extra > 0 then
    for _, start in ipairs(redis.call('ZRANGE', KEYS[2], 0, extra - 1)) do
      redis.call('DEL', ARGV[5] .. start)
    end
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
  end
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"""

# KEYS: observation hash.  ARGV: unit key base.  Returns {hash fields flat, {variant, units, error units}, ...}.
_READ = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then
  return {}
end
local level = tonumber(redis.call('HGET', KEYS[1], 'level') or '0')
local counts = {}
for _, v in ipairs({'old', 'new'}) do
  local units, errors = 0, 0
  for tz = level, 32 do
    units = units + redis.call('SCARD', ARGV[1] .. v .. ':u:' .. tz)
    errors = errors + redis.call('SCARD', ARGV[1] .. v .. ':e:' .. tz)
  end
  table.insert(counts, {v, units, errors})
end
return {fields, counts}
"""

_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()
_ABANDONED: list[redis.Redis] = []
"""Clients inherited through fork() and replaced in the child (see ``RedisStore._after_fork``)."""
_FORK_HOOK = threading.Lock()
_fork_hook_installed = False


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        store._after_fork()


def _install_fork_hook() -> None:
    global _fork_hook_installed  # noqa: PLW0603 - registered once per interpreter
    with _FORK_HOOK:
        if not _fork_hook_installed and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _fork_hook_installed = True


def _trailing_zeros(value: int) -> int:
    """Number of trailing zero bits of a 32-bit hash (32 for zero): its deepest sample level."""
    if value == 0:
        return _MAX_LEVEL
    return min((value & -value).bit_length() - 1, _MAX_LEVEL)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    """Rollout state, audit log, change notifications, observation totals and leases in Redis.

    ``client`` is a ``redis.Redis`` (used as it is) or a URL (``redis://``, ``rediss://``, ``unix://``; the
    store then owns the client and sets 0.5 s connect and read timeouts unless the URL sets them).
    ``prefix`` starts every key and the change channel. ``refresh_interval`` is how often, in seconds, the
    listener re-reads every state as a safety net for lost change messages. ``max_history`` bounds each
    rollout's audit stream (approximately, as Redis trims whole nodes; :meth:`history` returns at most that
    many). Observation totals and history slots expire ``observation_ttl`` seconds after their last
    update; at most ``max_slots`` history slots are kept per rollout.

    Thread-safe and fork-safe: in a forked child a store opened from a URL makes a new client, and the
    listener is restarted (with a client passed in, redis-py's own fork detection re-creates its pool on
    first use, which can deadlock when the fork happened while another thread held the pool's lock: pass a
    URL, or build the store after the fork, in pre-fork servers). Every Redis failure raises
    :class:`~canary_router.StoreError`; nothing raises a redis-py exception. Implements
    :class:`~canary_router.stores.SharedStore`.
    """

    def __init__(
        self,
        client: redis.Redis | str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "canary",
        refresh_interval: float = 5.0,
        max_history: int = 1000,
        observation_ttl: float = 7 * 86400,
        max_slots: int = 8640,
    ) -> None:
        if not prefix or any(ch.isspace() for ch in prefix):
            raise ConfigError(
                ConfigIssue("store.prefix", f"expected a non-empty prefix without spaces, got {prefix!r}")
            )
        if refresh_interval <= 0:
            raise ValueError(f"refresh_interval must be > 0, got {refresh_interval!r}")
        if max_history < 1 or max_slots < 1:
            raise ValueError("max_history and max_slots must be at least 1")
        if observation_ttl < 1:
            raise ValueError(f"observation_ttl must be at least 1 second, got {observation_ttl!r}")
        self._url = client if isinstance(client, str) else None
        self._client = _client_from_url(client) if isinstance(client, str) else client
        self._owns_client = self._url is not None
        self.prefix = prefix
        """The prefix of every key and of the change channel."""
        self.refresh_interval = float(refresh_interval)
        self._max_history = max_history
        self._ttl = max(1, int(observation_ttl))
        self._max_slots = max_slots
        self._state_key = f"{prefix}:state"
        self._channel = f"{prefix}:changes"
        self._register_scripts()
        self._warn = Throttled(_log, "canary_router: redis store: ")
        self._subscribers: tuple[Callable[[str, Versioned], None], ...] = ()
        self._closed = False
        self._reset_background()
        _STORES.add(self)
        _install_fork_hook()

    def _register_scripts(self) -> None:
        self._cas = self._client.register_script(_CAS)
        self._acquire = self._client.register_script(_ACQUIRE)
        self._release = self._client.register_script(_RELEASE)
        self._add = self._client.register_script(_ADD)
        self._read = self._client.register_script(_READ)

    def _reset_background(self) -> None:
        """Fresh locks and no listener (at construction, and in a forked child)."""
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._subscribed = threading.Event()

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """Open a store from ``redis://[[user]:password@]host[:port][/db][?prefix=app&...]``.

        The query may set ``prefix``, ``refresh_interval``, ``max_history``, ``observation_ttl`` and
        ``max_slots`` (the keywords of :class:`RedisStore`) and any redis-py connection option
        (``socket_timeout``, ``socket_connect_timeout``, ``health_check_interval``, ...).
        Raises :class:`~canary_router.ConfigError` for a value it cannot use.
        """
        parts = urlsplit(url)
        ours: dict[str, str] = {}
        theirs: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in ("prefix", "refresh_interval", "max_history", "observation_ttl", "max_slots"):
                ours[key] = value
            else:
                theirs.append((key, value))
        connection_url = urlunsplit(parts._replace(query=urlencode(theirs)))
        try:
            options: dict[str, Any] = {}
            if "prefix" in ours:
                options["prefix"] = ours["prefix"]
            for key in ("refresh_interval", "observation_ttl"):
                if key in ours:
                    options[key] = float(ours[key])
            for key in ("max_history", "max_slots"):
                if key in ours:
                    options[key] = int(ours[key])
            return cls(connection_url, **options)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(ConfigIssue("store", f"cannot use the store URL {_redact(url)!r}: {exc}")) from exc

    @property
    def client(self) -> redis.Redis:
        """The redis-py client the store talks through."""
        return self._client

    def __repr__(self) -> str:
        kwargs = self._client.get_connection_kwargs()
        where = kwargs.get("path") or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
        return f"RedisStore({where!r}, prefix={self.prefix!r})"

    # ------------------------------------------------------------------ keys

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{quote(name, safe='')}"

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn every redis-py (and socket) failure into a StoreError that says what was being done."""
        try:
            yield
        except (redis.RedisError, OSError, ChildDeadlockedError) as exc:
            raise StoreError(f"redis store ({self.prefix!r}): cannot {what}: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ state

    def get(self, name: str) -> Versioned | None:
        """Return the state of ``name`` and its version, or ``None``."""
        with self._errors(f"read rollout {name!r}"):
            raw = self._client.hget(self._state_key, name)
        return None if raw is None else self._decode_state(name, raw)

    def get_all(self) -> dict[str, Versioned]:
        """Return every rollout's state and version."""
        with self._errors("read the rollout states"):
            raw = self._client.hgetall(self._state_key)
        return {_text(name): self._decode_state(_text(name), value) for name, value in raw.items()}

    def _decode_state(self, name: str, raw: bytes | str) -> Versioned:
        try:
            data = json.loads(raw)
            return Versioned(RolloutState.from_dict(data["state"]), int(data["version"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"redis store ({self.prefix!r}): corrupt state for rollout {name!r}: {exc}") from exc

    def compare_and_set(
        self,
        name: str,
        expected_version: int | None,
        state: RolloutState,
        record: AuditRecord,
        *,
        fence: Lease | None = None,
    ) -> int:
        """Write ``state`` and append ``record`` if the version still is ``expected_version`` (and ``fence`` holds).

        One Lua script checks the fence and the version, writes the state, appends the audit record and
        publishes the change, so either all of it happens or none of it.
        """
        version = 1 if expected_version is None else expected_version + 1
        state_data = state.to_dict()
        stored = json.dumps({"version": version, "state": state_data})
        message = json.dumps({"name": name, "version": version, "state": state_data})
        entry = json.dumps(replace(record, version=version).to_dict(), default=str)
        fence_key = self._key("lease", fence.name) if fence is not None else self._state_key
        fence_value = f"{fence.token}:{fence.owner}" if fence is not None else ""
        with self._errors(f"write rollout {name!r}"):
            result = self._cas(
                keys=[self._state_key, self._key("audit", name), fence_key],
                args=[
                    name,
                    "" if expected_version is None else str(expected_version),
                    str(version),
                    stored,
                    entry,
                    str(self._max_history),
                    self._channel,
                    message,
                    fence_value,
                ],
            )
        code, detail = int(result[0]), _text(result[1])
        if code == -2 and fence is not None:
            raise ConflictError(
                f"lease {fence.name!r} (token {fence.token}) is no longer held by {fence.owner!r}; "
                f"rollout {name!r} was not changed"
            )
        if code != 1:
            found = detail or None
            raise ConflictError(
                f"rollout {name!r} changed concurrently: expected version {expected_version}, "
                f"found {found}; nothing was applied"
            )
        self._deliver(name, Versioned(state, version), newer_only=True)
        return version

    def history(self, name: str, limit: int | None = None) -> list[AuditRecord]:
        """Return the audit records of ``name``, oldest first (the newest ``limit`` when given)."""
        count = self._max_history if limit is None else min(limit, self._max_history)
        if count <= 0:
            return []
        with self._errors(f"read the audit log of rollout {name!r}"):
            entries = self._client.xrevrange(self._key("audit", name), count=count)
        records: list[AuditRecord] = []
        for _, fields in reversed(entries or []):
            raw = (fields or {}).get(b"r") or (fields or {}).get("r") or b""
            try:
                records.append(AuditRecord.from_dict(json.loads(raw)))
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreError(f"redis store ({self.prefix!r}): corrupt audit record of {name!r}: {exc}") from exc
        return records

    # ------------------------------------------------------------------ change notifications

    def subscribe(self, callback: Callable[[str, Versioned], None]) -> Callable[[], None]:
        """Call ``callback(name, versioned)`` after every change, from whichever process made it.

        Starts the listener thread on first use and waits (up to a second) until it is subscribed, so a
        change made after this returns is heard. Changes made through this store are delivered at once.
        """
        with self._lock:
            self._subscribers = (*self._subscribers, callback)
            self._start_listener()
        self._subscribed.wait(1.0)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not callback)

        return unsubscribe

    def _start_listener(self) -> None:
        """Start the listener thread unless it runs (call with ``self._lock`` held)."""
        if self._closed or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop = threading.Event()
        thread = threading.Thread(
            target=self._listen, args=(self._stop,), name=f"canary-router-redis-{self.prefix}", daemon=True
        )
        self._thread = thread
        thread.start()

    def _deliver(self, name: str, versioned: Versioned, *, newer_only: bool) -> None:
        """Call the subscribers, once per version (``newer_only``: skip what is not newer than seen)."""
        with self._lock:
            seen = self._seen.get(name)
            if seen is not None and (versioned.version <= seen if newer_only else versioned.version == seen):
                return
            self._seen[name] = versioned.version
            subscribers = self._subscribers
        for callback in subscribers:
            try:
                callback(name, versioned)
            except Exception:
                _log.exception("canary_router: a store subscriber failed")

    def _on_message(self, data: bytes | str) -> None:
        try:
            message = json.loads(data)
            name = str(message["name"])
            versioned = Versioned(RolloutState.from_dict(message["state"]), int(message["version"]))
        except (ValueError, KeyError, TypeError) as exc:
            self._warn("message", f"ignoring a malformed change message: {exc!r}")
            return
        # Messages arrive in the order the writes happened, so any version not yet seen is news (a lower
        # one too: the state was lost and written again).
        self._deliver(name, versioned, newer_only=False)

    def _refresh_now(self) -> None:
        """Re-read every state; deliver any version the subscribers have not seen (also a lower one: a reset)."""
        everything = self.get_all()
        for name, versioned in everything.items():
            self._deliver(name, versioned, newer_only=False)
        with self._lock:
            for name in [n for n in self._seen if n not in everything]:
                del self._seen[name]

    def _listen(self, stop: threading.Event) -> None:
        """The listener thread: pub/sub messages, a full refresh every ``refresh_interval``, reconnecting."""
        backoff = 0.05
        while not stop.is_set():
            pubsub = None
            try:
                pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
                pubsub.subscribe(self._channel)
                next_refresh = 0.0  # refresh at once: changes may have been missed while (re)connecting
                give_up = time.monotonic() + 2.0
                while not stop.is_set():
                    now = time.monotonic()
                    if not self._subscribed.is_set():
                        if now > give_up:
                            raise StoreError("no subscription confirmation within 2 s")
                        wait = 0.25
                    else:
                        if now >= next_refresh:
                            self._refresh_now()
                            next_refresh = now + self.refresh_interval
                            backoff = 0.05
                        wait = max(0.0, min(0.25, next_refresh - now))
                    message = pubsub.get_message(timeout=wait)
                    if message is None:
                        continue
                    kind = _text(message.get("type"))
                    if kind == "subscribe":
                        self._subscribed.set()
                        next_refresh = 0.0
                    elif kind == "message":
                        self._on_message(message["data"])
            except Exception as exc:
                self._subscribed.clear()
                if not stop.is_set():
                    self._warn("listen", f"change listener lost Redis ({exc}); reconnecting")
            finally:
                if pubsub is not None:
                    with suppress(Exception):  # closing a broken connection may fail; nothing to do
                        pubsub.close()
            stop.wait(backoff * (0.5 + random.random()))  # noqa: S311 - jitter, not cryptography
            backoff = min(backoff * 2, 2.0)

    def _after_fork(self) -> None:
        """In a forked child: fresh connections, locks and listener (restarted when there are subscribers)."""
        if self._url is not None and not self._closed:
            # A new client: the parent's pool may be locked by a thread that does not exist here, and
            # resetting it would wait forever. The old client is kept referenced, never closed or
            # collected here: its sockets belong to the parent (redis-py only shuts them down in the
            # process that opened them).
            _ABANDONED.append(self._client)
            self._client = _client_from_url(self._url)
            self._register_scripts()
        self._reset_background()
        if self._subscribers and not self._closed:
            with self._lock:
                self._start_listener()

    # ------------------------------------------------------------------ observations

    def add_observations(self, batch: ObservationBatch) -> None:
        """Add ``batch`` to the totals of its rollout and epoch, atomically (one Lua script).

        The batch carries a one-off id, so a retry after a lost reply does not count it twice.
        """
        variants: dict[str, Any] = {}
        for variant, counts in batch.variants.items():
            variants[variant] = {
                "r": int(counts.requests),
                "e": int(counts.errors),
                "h": [[int(i), int(c)] for i, c in counts.histogram.items() if c],
                "u": _unit_sets(counts.units),
                "eu": _unit_sets(counts.error_units),
            }
        slots = [
            [
                repr(float(s.start)),
                s.variant,
                int(s.requests),
                int(s.errors),
                [[int(i), int(c)] for i, c in s.latency.items() if c],
            ]
            for s in batch.slots
        ]
        payload = {
            "started_at": repr(float(batch.started_at)),
            "level": int(batch.unit_sample_level),
            "variants": variants,
            "slots": slots,
        }
        text = json.dumps(payload)  # Lua's cjson reads {} and [] alike as an empty table: both iterate fine
        step = f"{self._key('obs', batch.rollout)}:{batch.epoch}"
        unit_base = f"{self._key('units', batch.rollout)}:{batch.epoch}:"
        with self._errors(f"add observations of rollout {batch.rollout!r}"):
            self._add(
                keys=[step, self._key("slots", batch.rollout), f"{self.prefix}:batch:{uuid.uuid4().hex}"],
                args=[
                    text,
                    str(self._ttl),
                    str(self._max_slots),
                    unit_base,
                    self._key("slot", batch.rollout) + ":",
                    str(_BATCH_MARK_TTL),
                ],
            )

    def observations(self, rollout: str, epoch: int) -> StepSnapshot | None:
        """Return the totals of step ``epoch`` of ``rollout`` across every process, or ``None``."""
        step = f"{self._key('obs', rollout)}:{epoch}"
        unit_base = f"{self._key('units', rollout)}:{epoch}:"
        with self._errors(f"read the observations of rollout {rollout!r}"):
            result = self._read(keys=[step], args=[unit_base])
        if not result:
            return None
        try:
            return _snapshot(rollout, epoch, result)
        except (ValueError, TypeError) as exc:
            raise StoreError(f"redis store ({self.prefix!r}): corrupt observations of {rollout!r}: {exc}") from exc

    def observation_history(self, rollout: str, since: float = 0.0) -> list[HistorySlot]:
        """Return the history slots of ``rollout`` from ``since`` on, oldest first, summed across processes."""
        base = self._key("slot", rollout) + ":"
        with self._errors(f"read the history of rollout {rollout!r}"):
            starts = [_text(s) for s in self._client.zrangebyscore(self._key("slots", rollout), since, "+inf")]
            pipe = self._client.pipeline(transaction=False)
            for start in starts:
                pipe.hgetall(base + start)
            contents = pipe.execute() if starts else []
        slots: list[HistorySlot] = []
        for start, raw in zip(starts, contents, strict=True):
            if not raw:
                continue  # expired between the two reads
            slot = HistorySlot(float(start))
            for key, value in raw.items():
                variant, _, rest = _text(key).partition(":")
                if variant not in slot.requests:
                    continue
                if rest == "r":
                    slot.requests[variant] += int(value)
                elif rest == "e":
                    slot.errors[variant] += int(value)
                elif rest.startswith("l:"):
                    index = int(rest[2:])
                    slot.latency[variant][index] = slot.latency[variant].get(index, 0) + int(value)
            slots.append(slot)
        return slots

    # ------------------------------------------------------------------ leases

    def acquire_lease(self, name: str, owner: str, ttl: float) -> Lease | None:
        """Take or renew lease ``name`` for ``ttl`` seconds; ``None`` while another owner holds it.

        A new holder gets the next fencing token (a counter in Redis); a renewal keeps the token.
        ``expires_at`` is on the Redis server's clock.
        """
        if ttl <= 0:
            raise ValueError(f"ttl must be > 0, got {ttl!r}")
        with self._errors(f"take the lease {name!r}"):
            result = self._acquire(
                keys=[self._key("lease", name), self._key("lease-token", name)],
                args=[owner, str(max(1, round(ttl * 1000)))],
            )
        if result is None:
            return None
        token, expires_ms = result
        return Lease(name, owner, int(_text(token)), int(expires_ms) / 1000)

    def release_lease(self, lease: Lease) -> None:
        """Give ``lease`` up if it is still the current one (otherwise do nothing)."""
        with self._errors(f"release the lease {lease.name!r}"):
            self._release(keys=[self._key("lease", lease.name)], args=[f"{lease.token}:{lease.owner}"])

    # ------------------------------------------------------------------ lifecycle

    def ping(self) -> None:
        """Check that Redis answers; raise :class:`~canary_router.StoreError` when it does not."""
        with self._errors("reach Redis"):
            self._client.ping()

    def close(self) -> None:
        """Stop the listener and, when the store opened the client itself, close its connections. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._subscribers = ()
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        _STORES.discard(self)
        if self._owns_client:
            with suppress(Exception):  # closing is best effort
                self._client.close()


def _snapshot(rollout: str, epoch: int, result: Any) -> StepSnapshot:
    """Build the step snapshot from the read script's answer (hash fields, unit counts per variant)."""
    flat, unit_counts = result
    fields = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
    level = int(fields.get("level", "0"))
    units = {_text(v): (int(u), int(e)) for v, u, e in unit_counts}
    scale = 1 << level

    def one(variant: str) -> VariantSnapshot:
        histogram = [0] * _NBUCKETS
        head = f"{variant}:h:"
        for key, value in fields.items():
            if key.startswith(head):
                index = int(key[len(head) :])
                if 0 <= index < _NBUCKETS:
                    histogram[index] += int(value)
        n_units, n_errors = units.get(variant, (0, 0))
        return VariantSnapshot(
            int(fields.get(f"{variant}:r", "0")),
            int(fields.get(f"{variant}:e", "0")),
            tuple(histogram),
            n_units * scale,
            n_errors * scale,
        )

    started_at = float(fields.get("started_at", "0"))
    return StepSnapshot(rollout, epoch, started_at, one("old"), one("new"), level)


def _unit_sets(hashes: frozenset[int]) -> list[list[Any]]:
    """Group unit hashes by sample level (trailing zero bits), in chunks small enough for one SADD."""
    by_level: dict[int, list[str]] = {}
    for value in hashes:
        by_level.setdefault(_trailing_zeros(int(value)), []).append(str(int(value)))
    out: list[list[Any]] = []
    for level, members in sorted(by_level.items()):
        for i in range(0, len(members), _CHUNK):
            out.append([level, members[i : i + _CHUNK]])
    return out


def _client_from_url(url: str) -> redis.Redis:
    """A client for ``url`` with short timeouts and one quick retry, so nothing waits long on a dead or hung Redis."""
    query = dict(parse_qsl(urlsplit(url).query))
    # one retry, on a broken connection only (a pooled connection to a Redis that restarted): a timeout is
    # not retried, so a hung Redis costs one timeout per call
    options: dict[str, Any] = {"retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))}
    if "socket_timeout" not in query:
        options["socket_timeout"] = 0.5
    if "socket_connect_timeout" not in query:
        options["socket_connect_timeout"] = 0.5
    try:
        return redis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise ConfigError(ConfigIssue("store", f"cannot use the store URL {_redact(url)!r}: {exc}")) from exc


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
