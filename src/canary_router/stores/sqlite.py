"""The single-host store: one SQLite file (WAL mode) shared by every process of a host.

For pre-fork servers (gunicorn, uWSGI) and several services on one machine, without Redis. Every
process opens the same file; a state change is a ``BEGIN IMMEDIATE`` transaction (compare-and-set,
fence check and audit append together), observation counts are added row by row, and each process
learns about changes by polling SQLite's ``PRAGMA data_version`` every ``poll_interval`` seconds on a
connection of its own.

Only the standard library's :mod:`sqlite3` is used.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .._throttle import Throttled
from ..errors import ConfigError, ConfigIssue, ConflictError, StoreError
from ..model import AuditRecord, RolloutState
from ..observe import HistorySlot, StepSnapshot
from .base import (
    Lease,
    ObservationBatch,
    SlotCounts,
    VariantCounts,
    Versioned,
    history_from_slots,
    snapshot_from_counts,
)

__all__ = ["SQLiteStore"]

_log = logging.getLogger("canary_router")

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (
    name TEXT PRIMARY KEY, version INTEGER NOT NULL, data TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit (
    name TEXT NOT NULL, version INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (name, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS steps (
    rollout TEXT NOT NULL, epoch INTEGER NOT NULL, started_at REAL NOT NULL, level INTEGER NOT NULL,
    PRIMARY KEY (rollout, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (
    rollout TEXT NOT NULL, epoch INTEGER NOT NULL, variant TEXT NOT NULL,
    requests INTEGER NOT NULL, errors INTEGER NOT NULL,
    units INTEGER NOT NULL DEFAULT 0, error_units INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (rollout, epoch, variant)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS histogram (
    rollout TEXT NOT NULL, epoch INTEGER NOT NULL, variant TEXT NOT NULL, bucket INTEGER NOT NULL,
    count INTEGER NOT NULL, PRIMARY KEY (rollout, epoch, variant, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS units (
    rollout TEXT NOT NULL, epoch INTEGER NOT NULL, variant TEXT NOT NULL, hash INTEGER NOT NULL,
    error INTEGER NOT NULL, PRIMARY KEY (rollout, epoch, variant, hash)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slots (
    rollout TEXT NOT NULL, start REAL NOT NULL, variant TEXT NOT NULL, requests INTEGER NOT NULL,
    errors INTEGER NOT NULL, latency TEXT NOT NULL, PRIMARY KEY (rollout, start, variant)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, token INTEGER NOT NULL, expires_at REAL NOT NULL
) WITHOUT ROWID;
"""
_STEP_TABLES = ("steps", "totals", "histogram", "units")
_URL_OPTIONS = {
    "poll_interval": float,
    "busy_timeout": float,
    "max_history": int,
    "max_slots": int,
    "keep_epochs": int,
    "max_units": int,
}

_ABANDONED: list[sqlite3.Connection] = []
"""Connections inherited through ``fork()``: never used nor closed in the child (closing one could
disturb the parent's locks), only kept referenced so that garbage collection does not close them."""


class SQLiteStore:
    """Rollout state, audit log, observation totals and leases in one SQLite file, shared by the processes of a host.

    ``SQLiteStore("/var/run/app/canary.db")`` — or ``open_store("sqlite:////var/run/app/canary.db")`` —
    in every process (or once before a pre-fork server forks its workers). The file is created when
    missing; its directory must exist. Every process sees a change made by any other within about
    ``poll_interval`` seconds, and compare-and-set is atomic across processes.

    ``path`` is the database file; keep it on a local filesystem (SQLite's locking is not reliable over
    NFS or SMB). ``poll_interval`` is the seconds between two checks for changes made by other processes,
    ``busy_timeout`` the seconds a write waits for another process's write before failing.
    ``max_history`` audit records, ``max_slots`` history time slots and ``keep_epochs`` steps of
    observation totals are kept per rollout (the oldest are deleted); beyond ``max_units`` distinct unit
    hashes per variant and step, the unit sample is halved (as a router's own sample is). ``clock``
    (POSIX seconds) times lease expiry.

    Thread-safe and fork-safe: a process that inherits the store through ``fork()`` opens connections
    of its own and restarts the change watcher. Every SQLite failure is raised as
    :class:`~canary_router.StoreError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        poll_interval: float = 0.05,
        busy_timeout: float = 5.0,
        max_history: int = 1000,
        max_slots: int = 8640,
        keep_epochs: int = 4,
        max_units: int = 50_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        if not busy_timeout >= 0:
            raise ValueError(f"busy_timeout must be >= 0, got {busy_timeout!r}")
        if max_history < 1 or max_slots < 1 or keep_epochs < 1 or max_units < 1:
            raise ValueError("max_history, max_slots, keep_epochs and max_units must be at least 1")
        self._path = Path(path)
        if str(path) in ("", ":memory:") or str(path).startswith("file:"):
            raise ValueError(f"SQLiteStore needs a file path shared by the processes, got {str(path)!r}")
        directory = self._path.absolute().parent
        if not directory.is_dir():
            raise StoreError(
                f"cannot open the SQLite store {str(self._path)!r}: directory {str(directory)!r} does not exist"
            )
        self._poll_interval = float(poll_interval)
        self._busy_timeout = float(busy_timeout)
        self._max_history = max_history
        self._max_slots = max_slots
        self._keep_epochs = keep_epochs
        self._max_units = max_units
        self._clock = clock
        self._closed = False
        self._subscribers: tuple[Callable[[str, Versioned], None], ...] = ()
        self._known: dict[str, int] = {}
        """The version of each rollout last announced to subscribers (under ``_notify_lock``)."""
        self._warn = Throttled(_log, "canary_router: ")
        self._init_process_state()
        try:
            with self._errors("open"):
                self._create_schema()
        except BaseException:
            self.close()
            raise
        _STORES.add(self)

    def _init_process_state(self) -> None:
        """Locks, connection and watcher owned by this process (called again in a forked child)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._notify_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._watch_conn: sqlite3.Connection | None = None
        self._data_version: int | None = None
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteStore:
        """Open the store a ``sqlite:`` URL names, following SQLAlchemy's convention.

        - ``sqlite:///state.db`` — ``state.db`` relative to the working directory (three slashes);
        - ``sqlite:////var/run/app/state.db`` — the absolute path ``/var/run/app/state.db`` (four slashes);
        - query options: ``poll_interval``, ``busy_timeout`` (seconds), ``max_history``, ``max_slots``,
          ``keep_epochs``, ``max_units``, e.g. ``sqlite:///state.db?poll_interval=0.02``.

        Raises :class:`~canary_router.ConfigError` for a URL it cannot use.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() != "sqlite":
            raise ConfigError(ConfigIssue("store", f"expected a sqlite:/// URL, got {url!r}"))
        if parts.netloc:
            raise ConfigError(
                ConfigIssue(
                    "store",
                    f"a sqlite URL names a local file and has no host, got {url!r}",
                    "write sqlite:///relative/path.db or sqlite:////absolute/path.db",
                )
            )
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if not path or path == ":memory:":
            raise ConfigError(
                ConfigIssue(
                    "store",
                    f"a sqlite store needs a file shared by the processes, got {url!r}",
                    "e.g. sqlite:///canary.db",
                )
            )
        kwargs: dict[str, Any] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            convert = _URL_OPTIONS.get(key)
            if convert is None:
                known = ", ".join(sorted(_URL_OPTIONS))
                raise ConfigError(
                    ConfigIssue(f"store.{key}", f"unknown sqlite store option in {url!r}", f"known: {known}")
                )
            try:
                kwargs[key] = convert(value)
            except ValueError:
                raise ConfigError(
                    ConfigIssue(
                        f"store.{key}", f"expected {'a number' if convert is float else 'an integer'}, got {value!r}"
                    )
                ) from None
        kwargs.update(options)
        try:
            return cls(path, **kwargs)
        except ValueError as exc:
            raise ConfigError(ConfigIssue("store", f"{exc} (in {url!r})")) from None

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    # ------------------------------------------------------------------ connections

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout,  # SQLite's busy handler: wait for another process's write
            isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
            check_same_thread=False,  # used under self._lock, or by the watcher thread alone
        )
        try:
            conn.execute("PRAGMA synchronous = NORMAL")  # in WAL mode: consistent after any crash, fewer fsyncs
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_pid(self) -> None:
        """In a process forked after this store was made, drop the inherited connections (never use them)."""
        if self._pid != os.getpid():
            with _FORK_LOCK:  # two threads of the child may notice at once: one reinitialises
                if self._pid != os.getpid():
                    self._after_fork()

    def _connection(self) -> sqlite3.Connection:
        """Return the connection of this process (call with ``self._lock`` held)."""
        if self._closed:
            raise StoreError(f"the SQLite store {str(self._path)!r} is closed")
        conn = self._conn
        if conn is None:
            conn = self._conn = self._connect()
        return conn

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Raise every SQLite failure as :class:`StoreError`, naming the file and what was being done."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {str(self._path)!r}: cannot {action}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"SQLite store {str(self._path)!r}: cannot {action}: {exc}") from exc

    @contextmanager
    def _read(self, action: str) -> Iterator[sqlite3.Connection]:
        """Hold this process's connection for reads: each statement reads its own snapshot of the file."""
        self._check_pid()
        with self._errors(action), self._lock:
            yield self._connection()

    @contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: committed when the block ends, rolled back when it raises."""
        self._check_pid()
        with self._errors(action), self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

    def _create_schema(self) -> None:
        with self._lock:
            conn = self._connection()
            deadline = time.monotonic() + max(self._busy_timeout, 1.0)
            while True:
                try:  # switching to WAL takes an exclusive lock that the busy handler may not wait for
                    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            if str(mode).lower() != "wal":
                raise StoreError(f"SQLite store {str(self._path)!r}: cannot switch to WAL mode (got {mode!r})")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if row is None:
                    conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(_SCHEMA_VERSION),))
                elif int(row[0]) > _SCHEMA_VERSION:
                    raise StoreError(
                        f"SQLite store {str(self._path)!r} has schema version {row[0]}, newer than this "
                        f"canary_router understands ({_SCHEMA_VERSION}); upgrade canary_router"
                    )
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

    # ------------------------------------------------------------------ state

    def get(self, name: str) -> Versioned | None:
        """Return the state of ``name`` and its version, or ``None``."""
        with self._read(f"read rollout {name!r}") as conn:
            row = conn.execute("SELECT version, data FROM state WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._versioned(name, row[0], row[1])

    def get_all(self) -> dict[str, Versioned]:
        """Return every rollout's state and version."""
        with self._read("read the rollouts") as conn:
            rows = conn.execute("SELECT name, version, data FROM state").fetchall()
        return {name: self._versioned(name, version, data) for name, version, data in rows}

    def _versioned(self, name: str, version: int, data: str) -> Versioned:
        try:
            return Versioned(RolloutState.from_dict(json.loads(data)), int(version))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(
                f"SQLite store {str(self._path)!r}: the state of rollout {name!r} is unreadable: {exc}"
            ) from exc

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

        One ``BEGIN IMMEDIATE`` transaction: the fence check, the version check, the write and the audit
        append happen together or not at all, whichever process races.
        """
        data = json.dumps(state.to_dict())
        with self._write(f"write rollout {name!r}") as conn:
            if fence is not None and not self._holds(conn, fence):
                raise ConflictError(
                    f"lease {fence.name!r} (token {fence.token}) is no longer held by {fence.owner!r}; "
                    f"rollout {name!r} was not changed"
                )
            row = conn.execute("SELECT version FROM state WHERE name = ?", (name,)).fetchone()
            found = None if row is None else int(row[0])
            if found != expected_version:
                raise ConflictError(
                    f"rollout {name!r} changed concurrently: expected version {expected_version}, "
                    f"found {found}; nothing was applied"
                )
            version = 1 if found is None else found + 1
            conn.execute(
                "INSERT INTO state (name, version, data) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET version = excluded.version, data = excluded.data",
                (name, version, data),
            )
            audit = json.dumps(replace(record, version=version).to_dict(), default=str)
            conn.execute("INSERT OR REPLACE INTO audit (name, version, data) VALUES (?, ?, ?)", (name, version, audit))
            if version > self._max_history:
                conn.execute("DELETE FROM audit WHERE name = ? AND version <= ?", (name, version - self._max_history))
        self._announce(name, Versioned(state, version))
        return version

    def history(self, name: str, limit: int | None = None) -> list[AuditRecord]:
        """Return the audit records of ``name``, oldest first (the newest ``limit`` when given)."""
        if limit is not None and limit <= 0:
            return []
        with self._read(f"read the history of {name!r}") as conn:
            rows = conn.execute(
                "SELECT data FROM audit WHERE name = ? ORDER BY version DESC LIMIT ?",
                (name, -1 if limit is None else limit),
            ).fetchall()
        try:
            return [AuditRecord.from_dict(json.loads(data)) for (data,) in reversed(rows)]
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"SQLite store {str(self._path)!r}: the history of {name!r} is unreadable: {exc}") from exc

    # ------------------------------------------------------------------ change notifications

    def subscribe(self, callback: Callable[[str, Versioned], None]) -> Callable[[], None]:
        """Call ``callback(name, versioned)`` after every change, made by this process or any other.

        Changes made here are announced at once; changes made by other processes within about
        ``poll_interval`` seconds, by a background thread that the first subscription starts. Never
        raises for an unreachable file: the thread keeps trying.
        """
        self._check_pid()
        with self._notify_lock:
            self._subscribers = (*self._subscribers, callback)
        self._start_watcher()

        def unsubscribe() -> None:
            with self._notify_lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not callback)

        return unsubscribe

    def _announce(self, name: str, versioned: Versioned) -> None:
        """Tell the subscribers about ``versioned`` unless they have heard of it (or of a later version)."""
        with self._notify_lock:
            known = self._known.get(name)
            if known is not None and versioned.version <= known:
                return
            self._known[name] = versioned.version
            subscribers = self._subscribers
        self._deliver(subscribers, name, versioned)

    @staticmethod
    def _deliver(subscribers: tuple[Callable[[str, Versioned], None], ...], name: str, versioned: Versioned) -> None:
        for callback in subscribers:
            try:
                callback(name, versioned)
            except Exception:
                _log.exception("canary_router: a store subscriber failed")

    def _start_watcher(self) -> None:
        with self._lock:
            if self._watcher is not None or self._closed:
                return
            # The first look happens here, before subscribe() returns: a change made after it is announced.
            # Should the file not answer now, the watcher keeps trying, and announces what it then finds.
            try:
                with self._errors("watch for changes"):
                    self._poll(initial=True)
            except StoreError as exc:
                self._warn("watch", str(exc))
            stop = self._stop
            ref = weakref.ref(self)
            interval = self._poll_interval

            def watch() -> None:  # holds only a weak reference: a dropped store ends its thread
                while not stop.wait(interval):
                    store = ref()
                    if store is None:
                        return
                    try:
                        store._poll()
                    except Exception as exc:
                        store._warn("watch", f"cannot check the SQLite store {str(store._path)!r} for changes: {exc}")
                    del store

            thread = threading.Thread(target=watch, name="canary-router-sqlite-watch", daemon=True)
            self._watcher = thread
            thread.start()

    def _poll(self, *, initial: bool = False) -> None:
        """Announce the rollouts whose version changed since the last look (only the watcher calls this)."""
        if self._closed:
            return
        conn = self._watch_conn
        if conn is None:
            conn = self._watch_conn = self._connect()
        data_version = conn.execute("PRAGMA data_version").fetchone()[0]
        if data_version == self._data_version and not initial:
            return
        self._data_version = data_version
        present = {name: int(version) for name, version in conn.execute("SELECT name, version FROM state")}
        changed: list[tuple[str, Versioned]] = []
        with self._notify_lock:  # local writers announce under this lock too: no stale version slips in
            for name in [name for name in self._known if name not in present]:
                del self._known[name]  # deleted (a wiped store): whatever appears next is news
            for name, version in present.items():
                known = self._known.get(name)
                if known == version:
                    continue
                if known is None and initial:  # what was there before the first subscription is not a change
                    self._known[name] = version
                    continue
                # Read the row again now: a version lower than the one announced means the state was
                # re-created (a restore after lost state), not a stale read.
                row = conn.execute("SELECT version, data FROM state WHERE name = ?", (name,)).fetchone()
                if row is None or int(row[0]) == known:
                    continue
                try:
                    versioned = self._versioned(name, int(row[0]), row[1])
                except StoreError as exc:
                    self._warn("unreadable", str(exc))
                    continue
                self._known[name] = versioned.version
                changed.append((name, versioned))
            subscribers = self._subscribers
        for name, versioned in changed:
            self._deliver(subscribers, name, versioned)

    # ------------------------------------------------------------------ observations

    def add_observations(self, batch: ObservationBatch) -> None:
        """Add ``batch`` to the totals of its rollout and epoch, in one transaction."""
        rollout, epoch = batch.rollout, batch.epoch
        with self._write(f"add observations of {rollout!r}") as conn:
            row = conn.execute(
                "SELECT started_at, level FROM steps WHERE rollout = ? AND epoch = ?", (rollout, epoch)
            ).fetchone()
            level = batch.unit_sample_level
            if row is None:
                conn.execute(
                    "INSERT INTO steps (rollout, epoch, started_at, level) VALUES (?, ?, ?, ?)",
                    (rollout, epoch, batch.started_at, level),
                )
                self._drop_old_epochs(conn, rollout)
            else:
                started_at, stored_level = float(row[0]), int(row[1])
                if batch.started_at < started_at or level > stored_level:
                    conn.execute(
                        "UPDATE steps SET started_at = ?, level = ? WHERE rollout = ? AND epoch = ?",
                        (min(started_at, batch.started_at), max(level, stored_level), rollout, epoch),
                    )
                if level > stored_level:  # keep only the hashes of the smaller sample: bounded like a router's
                    self._drop_units_outside(conn, rollout, epoch, level)
                level = max(level, stored_level)
            mask = (1 << level) - 1
            for variant, counts in batch.variants.items():
                self._add_variant(conn, rollout, epoch, variant, counts, mask)
            if any(counts.units or counts.error_units for counts in batch.variants.values()):
                self._cap_units(conn, rollout, epoch, level)
            if batch.slots:
                self._add_slots(conn, rollout, batch.slots)

    def _cap_units(self, conn: sqlite3.Connection, rollout: str, epoch: int, level: int) -> None:
        """Halve the unit sample (one level up) until no variant keeps more than ``max_units`` hashes."""
        key = (rollout, epoch)
        start = level
        while level < 31:
            row = conn.execute("SELECT max(units) FROM totals WHERE rollout = ? AND epoch = ?", key).fetchone()
            if row is None or row[0] is None or int(row[0]) <= self._max_units:
                break
            level += 1
            self._drop_units_outside(conn, rollout, epoch, level)
        if level != start:
            conn.execute("UPDATE steps SET level = ? WHERE rollout = ? AND epoch = ?", (level, *key))

    @staticmethod
    def _drop_units_outside(conn: sqlite3.Connection, rollout: str, epoch: int, level: int) -> None:
        """Delete the unit hashes outside the ``1 / 2**level`` sample, and count the ones left."""
        key = (rollout, epoch)
        conn.execute("DELETE FROM units WHERE rollout = ? AND epoch = ? AND (hash & ?) != 0", (*key, (1 << level) - 1))
        conn.execute(
            "UPDATE totals SET (units, error_units) = (SELECT count(*), total(error) FROM units AS u "
            "WHERE u.rollout = totals.rollout AND u.epoch = totals.epoch AND u.variant = totals.variant) "
            "WHERE rollout = ? AND epoch = ?",
            key,
        )

    def _drop_old_epochs(self, conn: sqlite3.Connection, rollout: str) -> None:
        rows = conn.execute(
            "SELECT epoch FROM steps WHERE rollout = ? ORDER BY epoch DESC LIMIT -1 OFFSET ?",
            (rollout, self._keep_epochs),
        ).fetchall()
        for (epoch,) in rows:
            for table in _STEP_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE rollout = ? AND epoch = ?", (rollout, epoch))  # noqa: S608 - table names are constants

    @staticmethod
    def _add_variant(
        conn: sqlite3.Connection, rollout: str, epoch: int, variant: str, counts: VariantCounts, mask: int
    ) -> None:
        conn.execute(
            "INSERT INTO totals (rollout, epoch, variant, requests, errors) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT DO UPDATE SET requests = requests + excluded.requests, errors = errors + excluded.errors",
            (rollout, epoch, variant, int(counts.requests), int(counts.errors)),
        )
        if counts.histogram:
            conn.executemany(
                "INSERT INTO histogram (rollout, epoch, variant, bucket, count) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT DO UPDATE SET count = count + excluded.count",
                [(rollout, epoch, variant, int(index), int(count)) for index, count in counts.histogram.items()],
            )
        # Distinct units are counted as they are inserted (rowcount of the inserts that did insert), so
        # neither the cap check of each flush nor the guard's read has to count the hashes.
        failed = [(rollout, epoch, variant, int(h)) for h in counts.error_units if not h & mask]
        fine = [(rollout, epoch, variant, int(h)) for h in counts.units - counts.error_units if not h & mask]
        new_failed = new_units = 0
        if failed:
            new_failed = conn.executemany(  # stored units that saw their first error
                "UPDATE units SET error = 1 WHERE rollout = ? AND epoch = ? AND variant = ? AND hash = ? AND error = 0",
                failed,
            ).rowcount
            inserted = conn.executemany(
                "INSERT OR IGNORE INTO units (rollout, epoch, variant, hash, error) VALUES (?, ?, ?, ?, 1)", failed
            ).rowcount
            new_failed += inserted
            new_units += inserted
        if fine:
            new_units += conn.executemany(
                "INSERT OR IGNORE INTO units (rollout, epoch, variant, hash, error) VALUES (?, ?, ?, ?, 0)", fine
            ).rowcount
        if new_units > 0 or new_failed > 0:
            conn.execute(
                "UPDATE totals SET units = units + ?, error_units = error_units + ? "
                "WHERE rollout = ? AND epoch = ? AND variant = ?",
                (new_units, new_failed, rollout, epoch, variant),
            )

    def _add_slots(self, conn: sqlite3.Connection, rollout: str, slots: tuple[SlotCounts, ...]) -> None:
        created = False
        for item in slots:
            row = conn.execute(
                "SELECT requests, errors, latency FROM slots WHERE rollout = ? AND start = ? AND variant = ?",
                (rollout, item.start, item.variant),
            ).fetchone()
            latency = {int(k): int(v) for k, v in item.latency.items()}
            if row is None:
                created = True
                requests, errors = item.requests, item.errors
            else:
                requests, errors = int(row[0]) + item.requests, int(row[1]) + item.errors
                for key, count in json.loads(row[2]).items():
                    latency[int(key)] = latency.get(int(key), 0) + int(count)
            conn.execute(
                "INSERT OR REPLACE INTO slots (rollout, start, variant, requests, errors, latency) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (rollout, item.start, item.variant, requests, errors, json.dumps(latency)),
            )
        if created:
            row = conn.execute(
                "SELECT DISTINCT start FROM slots WHERE rollout = ? ORDER BY start DESC LIMIT 1 OFFSET ?",
                (rollout, self._max_slots),
            ).fetchone()
            if row is not None:
                conn.execute("DELETE FROM slots WHERE rollout = ? AND start <= ?", (rollout, row[0]))

    def observations(self, rollout: str, epoch: int) -> StepSnapshot | None:
        """Return the totals of step ``epoch`` of ``rollout`` across every process, or ``None``."""
        key = (rollout, epoch)
        with self._read(f"read observations of {rollout!r}") as conn:
            conn.execute("BEGIN")  # one snapshot for the three reads
            try:
                step = conn.execute(
                    "SELECT started_at, level FROM steps WHERE rollout = ? AND epoch = ?", key
                ).fetchone()
                totals = conn.execute(
                    "SELECT variant, requests, errors, units, error_units FROM totals WHERE rollout = ? AND epoch = ?",
                    key,
                ).fetchall()
                buckets = conn.execute(
                    "SELECT variant, bucket, count FROM histogram WHERE rollout = ? AND epoch = ?", key
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        if step is None:
            return None
        level = int(step[1])
        requests = {variant: (int(r), int(e)) for variant, r, e, _, _ in totals}
        histograms: dict[str, dict[int, int]] = {}
        for variant, index, count in buckets:
            histograms.setdefault(variant, {})[int(index)] = int(count)
        variants = {
            variant: VariantCounts(*requests.get(variant, (0, 0)), histograms.get(variant, {}))
            for variant in set(requests) | set(histograms)
        }
        snap = snapshot_from_counts(rollout, epoch, float(step[0]), level, variants)
        scale = 1 << level
        counted = {variant: (int(n) * scale, int(e) * scale) for variant, _, _, n, e in totals}
        old_units, old_failed = counted.get("old", (0, 0))
        new_units, new_failed = counted.get("new", (0, 0))
        return replace(
            snap,
            old=replace(snap.old, units=old_units, units_with_errors=old_failed),
            new=replace(snap.new, units=new_units, units_with_errors=new_failed),
        )

    def observation_history(self, rollout: str, since: float = 0.0) -> list[HistorySlot]:
        """Return the history slots of ``rollout`` from ``since`` on, oldest first, summed across processes."""
        with self._read(f"read the observation history of {rollout!r}") as conn:
            rows = conn.execute(
                "SELECT start, variant, requests, errors, latency FROM slots WHERE rollout = ? AND start >= ? "
                "ORDER BY start",
                (rollout, since),
            ).fetchall()
        items = [
            SlotCounts(float(start), variant, int(r), int(e), {int(k): int(v) for k, v in json.loads(latency).items()})
            for start, variant, r, e, latency in rows
        ]
        return history_from_slots(items)

    # ------------------------------------------------------------------ leases

    def _holds(self, conn: sqlite3.Connection, lease: Lease) -> bool:
        row = conn.execute("SELECT owner, token, expires_at FROM leases WHERE name = ?", (lease.name,)).fetchone()
        return (
            row is not None and row[0] == lease.owner and int(row[1]) == lease.token and float(row[2]) > self._clock()
        )

    def acquire_lease(self, name: str, owner: str, ttl: float) -> Lease | None:
        """Take or renew lease ``name`` for ``ttl`` seconds; ``None`` while another owner holds it."""
        if ttl <= 0:
            raise ValueError(f"ttl must be > 0, got {ttl!r}")
        with self._write(f"take lease {name!r}") as conn:
            now = self._clock()
            row = conn.execute("SELECT owner, token, expires_at FROM leases WHERE name = ?", (name,)).fetchone()
            if row is None:
                token = 1
            else:
                held = float(row[2]) > now
                if held and row[0] != owner:
                    return None
                token = int(row[1]) if held else int(row[1]) + 1
            lease = Lease(name, owner, token, now + ttl)
            conn.execute(
                "INSERT OR REPLACE INTO leases (name, owner, token, expires_at) VALUES (?, ?, ?, ?)",
                (name, owner, token, lease.expires_at),
            )
        return lease

    def release_lease(self, lease: Lease) -> None:
        """Give ``lease`` up if it is still the current one (its token is kept, so the next holder's is higher)."""
        with self._write(f"release lease {lease.name!r}") as conn:
            conn.execute(
                "UPDATE leases SET expires_at = 0 WHERE name = ? AND owner = ? AND token = ?",
                (lease.name, lease.owner, lease.token),
            )

    # ------------------------------------------------------------------ life cycle

    def ping(self) -> None:
        """Check that the database file answers; raise :class:`~canary_router.StoreError` otherwise."""
        with self._read("answer a ping") as conn:
            conn.execute("SELECT 1 FROM meta LIMIT 1").fetchall()

    def close(self) -> None:
        """Stop the watcher, drop the subscribers and close the connections. Idempotent."""
        self._closed = True  # first: a forked child does not restart the watcher only to stop it
        self._check_pid()
        with self._notify_lock:
            self._subscribers = ()
        self._stop.set()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=max(1.0, 4 * self._poll_interval))
        with self._lock:
            for conn in (self._conn, self._watch_conn):
                if conn is not None:
                    conn.close()
            self._conn = self._watch_conn = None
            self._watcher = None

    def _after_fork(self) -> None:
        """In a forked child: fresh locks, new connections on first use, and the watcher restarted."""
        for conn in (self._conn, self._watch_conn):
            if conn is not None:
                _ABANDONED.append(conn)
        had_watcher = self._watcher is not None
        self._init_process_state()
        if had_watcher and not self._closed:
            try:
                self._start_watcher()
            except StoreError as exc:
                _log.warning("canary_router: cannot restart the SQLite store watcher after fork: %s", exc)

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self._path)!r})"


def _rollback(conn: sqlite3.Connection) -> None:
    """End the open transaction, if any, without raising (the original error is the one to report)."""
    if conn.in_transaction:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


_STORES: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()
_FORK_LOCK = threading.Lock()


def _reinit_after_fork() -> None:
    global _FORK_LOCK  # noqa: PLW0603 - a lock inherited through fork may be held by a thread that is gone
    _FORK_LOCK = threading.Lock()
    with _FORK_LOCK:
        for store in list(_STORES):
            if store._pid != os.getpid():
                store._after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_reinit_after_fork)
