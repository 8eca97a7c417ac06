"""Stores chosen by URL: ``memory://``, ``sqlite:///path/to/file.db``, ``redis://host:port/db?prefix=app``."""

from __future__ import annotations

import importlib
import os
from typing import cast
from urllib.parse import urlsplit

from ..errors import ConfigError, ConfigIssue
from .base import Store

__all__ = ["ENV_VAR", "open_store"]

ENV_VAR = "CANARY_ROUTER_STORE"
"""The environment variable naming the store URL when neither code nor config names one."""


def open_store(url: str | None = None) -> Store:
    """Open the store that ``url`` names (``None``: the ``CANARY_ROUTER_STORE`` variable, else ``memory://``).

    - ``memory://`` — :class:`~canary_router.MemoryStore`, this process only;
    - ``sqlite:///path/to/state.db`` — :class:`~canary_router.stores.sqlite.SQLiteStore`, every process of one host;
    - ``redis://[:password@]host[:port][/db][?prefix=app]`` (or ``rediss://``, ``unix://``) —
      :class:`~canary_router.stores.redis.RedisStore`, every process of every host (extra ``redis``).

    Raises :class:`~canary_router.ConfigError` for a URL it cannot use.
    """
    if url is None:
        url = os.environ.get(ENV_VAR) or "memory://"
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        return _load("sqlite", "SQLiteStore", url)
    if scheme in ("redis", "rediss", "unix"):
        return _load("redis", "RedisStore", url)
    expected = "a URL starting with memory://, sqlite:/// or redis://"
    raise ConfigError(ConfigIssue("store", f"expected {expected}, got {url!r}"))


def _load(module: str, cls: str, url: str) -> Store:
    """Import the store module only when its scheme is used (``redis`` is an optional extra)."""
    store_class = getattr(importlib.import_module(f"{__package__}.{module}"), cls)
    return cast(Store, store_class.from_url(url))
