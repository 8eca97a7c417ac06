"""SQLiteStore: the store contract on a real file, across real processes, forks and a real gunicorn."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
import time
import warnings
from pathlib import Path

import pytest

import sqlite_workers
from canary_router import ConfigError, ConflictError, StoreError
from canary_router.stores import SharedStore, Versioned, open_store
from canary_router.stores.sqlite import SQLiteStore
from canary_router.testing import SharedStoreConformance

SPAWN = multiprocessing.get_context("spawn")


class TestSQLiteStore(SharedStoreConformance):
    """SQLiteStore keeps the Store and SharedStore contracts; the peer is a second client of the same file."""

    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: Path) -> None:
        self.path = tmp_path / "state.db"

    def make_store(self) -> SharedStore:
        return SQLiteStore(self.path, poll_interval=0.02)

    def make_peer(self, store: SharedStore) -> SharedStore:
        assert isinstance(store, SQLiteStore)
        return SQLiteStore(store.path, poll_interval=0.02)
