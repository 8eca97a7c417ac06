"""canary_router: ship a risky change to a small, deterministic slice of real users first.

Buckets users with the frozen v1 spec (MurmurHash3), routes calls between the old and the new code
path, applies targeting rules, and keeps rollout state in a shared store with an audit trail.
"""

from ._version import __version__
from .analysis import CheckResult, Outcome, Verdict
from .bucketing import bucket
from .config import Config, load_config, load_file
from .context import Context, current_context, use_context
from .controller import Action, Controller
from .errors import (
    CanaryError,
    ConfigError,
    ConfigIssue,
    ConflictError,
    StoreError,
    TransitionError,
    UnknownRolloutError,
)
from .model import (
    AuditRecord,
    Condition,
    Decision,
    GuardConfig,
    Observation,
    Phase,
    Reason,
    Rollout,
    RolloutState,
    RolloutStatus,
    Rule,
    Variant,
)
from .notify import Webhook
from .observe import StepSnapshot, VariantSnapshot
from .router import Router
from .shadow import ShadowStats
from .stores import MemoryStore, Store, Versioned
from .telemetry import Telemetry

__all__ = [
    "Action",
    "AuditRecord",
    "CanaryError",
    "CheckResult",
    "Condition",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "ConflictError",
    "Context",
    "Controller",
    "Decision",
    "GuardConfig",
    "MemoryStore",
    "Observation",
    "Outcome",
    "Phase",
    "Reason",
    "Rollout",
    "RolloutState",
    "RolloutStatus",
    "Router",
    "Rule",
    "ShadowStats",
    "StepSnapshot",
    "Store",
    "StoreError",
    "Telemetry",
    "TransitionError",
    "UnknownRolloutError",
    "Variant",
    "VariantSnapshot",
    "Verdict",
    "Versioned",
    "Webhook",
    "__version__",
    "bucket",
    "current_context",
    "load_config",
    "load_file",
    "use_context",
]
