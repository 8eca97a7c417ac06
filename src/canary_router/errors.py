"""The exception tree. Every error the library raises derives from :class:`CanaryError`."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CanaryError",
    "ConfigError",
    "ConfigIssue",
    "ConflictError",
    "StoreError",
    "TransitionError",
    "UnknownRolloutError",
]


class CanaryError(Exception):
    """Base class of every error raised by canary_router."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem found in a configuration: where it is, what is wrong, and a hint."""

    path: str
    """Dotted path to the offending value, e.g. ``rollouts.recommender.steps[2]``."""
    message: str
    """What was expected and what was found."""
    hint: str | None = None
    """A suggestion, e.g. the key that a misspelled one was probably meant to be."""

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class ConfigError(CanaryError, ValueError):
    """A configuration is invalid. ``issues`` lists every problem found, not just the first."""

    issues: tuple[ConfigIssue, ...]

    def __init__(self, issues: ConfigIssue | list[ConfigIssue] | tuple[ConfigIssue, ...] | str) -> None:
        if isinstance(issues, str):
            issues = (ConfigIssue("", issues),)
        elif isinstance(issues, ConfigIssue):
            issues = (issues,)
        self.issues = tuple(issues)
        if len(self.issues) == 1:
            message = str(self.issues[0])
        else:
            lines = "\n".join(f"  - {issue}" for issue in self.issues)
            message = f"{len(self.issues)} problems in the configuration:\n{lines}"
        super().__init__(message)


class UnknownRolloutError(CanaryError, LookupError):
    """A control method named a rollout that the router does not know."""

    def __init__(self, name: str, known: tuple[str, ...] = ()) -> None:
        self.name = name
        from difflib import get_close_matches

        close = get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        listing = ", ".join(sorted(known)) or "none"
        super().__init__(f"unknown rollout {name!r}{hint} (known: {listing})")


class TransitionError(CanaryError):
    """A control action is not allowed in the rollout's current phase (e.g. promoting a rolled-back rollout)."""


class ConflictError(CanaryError):
    """A compare-and-set lost a race: someone else changed the rollout first. Nothing was applied."""


class StoreError(CanaryError):
    """The state store failed (unreachable, corrupt data, ...)."""
