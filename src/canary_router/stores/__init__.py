"""Where rollout state lives: the :class:`Store` protocol and its implementations."""

from ._url import ENV_VAR, open_store
from .base import (
    Lease,
    ObservationBatch,
    SharedStore,
    SlotCounts,
    Store,
    VariantCounts,
    Versioned,
    history_from_slots,
    merge_counts,
    snapshot_from_counts,
)
from .memory import MemoryStore
from .sqlite import SQLiteStore  # imported with the package: its after-fork hook must run before the router's

__all__ = [
    "ENV_VAR",
    "Lease",
    "MemoryStore",
    "ObservationBatch",
    "SQLiteStore",
    "SharedStore",
    "SlotCounts",
    "Store",
    "VariantCounts",
    "Versioned",
    "history_from_slots",
    "merge_counts",
    "open_store",
    "snapshot_from_counts",
]
