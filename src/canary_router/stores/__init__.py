"""Where rollout state lives: the :class:`Store` protocol and its implementations."""

from .base import Store, Versioned
from .memory import MemoryStore

__all__ = ["MemoryStore", "Store", "Versioned"]
