"""The controller: one evaluation of every rollout per tick — promote, wait, pause or roll back.

A state machine over the Store with the router's injected clock. At each step it waits for ``bake_time``
*and* a passing verdict, then promotes; it completes after the last step; it rolls back at once on a
failing verdict (the circuit breaker included); it pauses with a reason on a sample-ratio mismatch, when
still inconclusive after ``max_bake_time``, or before a step that requires approval. Every transition
is a compare-and-set with an audit record; two controllers racing apply one transition, never two.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .analysis import Outcome, Verdict, evaluate
from .errors import CanaryError, ConflictError
from .model import Phase, Rollout, RolloutState
from .stores.base import Lease

if TYPE_CHECKING:
    from .router import Router

__all__ = ["LEASE_NAME", "Action", "Controller"]

LEASE_NAME = "controller"
"""The name of the lease that lets one controller act at a time on a shared store."""

_log = logging.getLogger("canary_router")


@dataclass(frozen=True, slots=True)
class Action:
    """What one tick did for one rollout.

    ``action`` is ``"promote"`` (completing after the last step), ``"rollback"``, ``"pause"`` or ``"wait"``.
    """

    rollout: str
    action: str
    reason: str
    verdict: Verdict | None = None


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    if seconds >= 60:
        return f"{seconds / 60:.3g} min"
    return f"{seconds:.3g} s"


class Controller:
    """Evaluates the guard for every running rollout of ``router`` and moves the schedule.

    ``Controller(router).tick()`` does one evaluation (for tests, with the router's fake clock);
    ``start(interval)`` runs it on a background thread. ``actor`` names it in the audit log.
    """

    def __init__(self, router: Router, *, actor: str = "controller", lease_ttl: float = 5.0) -> None:
        if lease_ttl <= 0:
            raise ValueError(f"lease_ttl must be > 0, got {lease_ttl!r}")
        self.router = router
        self.actor = actor
        self.lease_ttl = lease_ttl
        """Seconds the controller lease lasts without renewal (with a shared store); a standby takes over after it."""
        self.lease: Lease | None = None
        """The controller lease this instance holds (shared stores only), or ``None``."""
        self._nonce = uuid.uuid4().hex[:8]
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.last_verdicts: dict[str, Verdict] = {}
        """The verdict of each rollout at the last tick."""

    def verdict(self, name: str) -> Verdict:
        """Evaluate the guard of rollout ``name`` on its current step, without acting."""
        rollout = self.router._require(name)
        state = self.router._read(name).state
        return self._verdict(rollout, state)

    def _verdict(self, rollout: Rollout, state: RolloutState) -> Verdict:
        snapshot = self.router.observations(rollout.name, state.epoch)
        percent = 0.0 if state.shadow else state.percent
        return evaluate(rollout.guard, snapshot, percent, self.router.checks(rollout.name))

    @property
    def owner(self) -> str:
        """The identity this controller holds the lease under: host, process and instance."""
        return f"{socket.gethostname()}:{os.getpid()}:{self._nonce}"

    def _take_lease(self) -> tuple[bool, str]:
        """With a shared store, take or renew the controller lease; ``(acting, why not)``."""
        shared = self.router._shared
        if shared is None:
            return True, ""
        try:
            self.lease = shared.acquire_lease(LEASE_NAME, self.owner, self.lease_ttl)
        except Exception as exc:
            self.lease = None
            return False, f"cannot reach the store to renew the controller lease: {exc}"
        if self.lease is None:
            return False, "standby: another controller holds the lease"
        return True, ""

    def tick(self) -> list[Action]:
        """Evaluate every rollout once and apply at most one transition to each; returns what was done.

        With a shared store only the holder of the controller lease acts (each tick renews it); other
        controllers return a "wait" action per rollout and take over once the lease expires.
        """
        actions: list[Action] = []
        acting, why_not = self._take_lease()
        if not acting:
            return [Action(name, "wait", why_not) for name in self.router.rollouts]
        for name in self.router.rollouts:
            try:
                action = self._tick_one(name)
            except ConflictError:
                action = Action(name, "wait", "another writer changed the rollout during this tick")
            except CanaryError as exc:
                _log.warning("canary_router: controller could not act on %r: %s", name, exc)
                action = Action(name, "wait", f"error: {exc}")
            except Exception as exc:  # one broken rollout (or store) must not stop the others
                _log.exception("canary_router: controller tick failed for %r", name)
                action = Action(name, "wait", f"error: {exc!r}")
            if action is not None:
                actions.append(action)
        return actions

    def _tick_one(self, name: str) -> Action | None:
        router = self.router
        rollout = router._require(name)
        versioned = router._read(name)
        state = versioned.state
        if state.phase in (Phase.COMPLETED, Phase.ROLLED_BACK):
            return None
        verdict = self._verdict(rollout, state)
        self.last_verdicts[name] = verdict
        now = router.clock()
        elapsed = now - state.step_started_at
        step_label = "shadow step" if state.shadow else f"{state.percent:g} %"

        def act(action: str, reason: str, change: Callable[[RolloutState, Rollout], RolloutState | None]) -> Action:
            router.transition(
                name,
                action,
                change,
                actor=self.actor,
                reason=reason,
                details={"verdict": verdict.to_dict(), "elapsed": elapsed},
                expected_version=versioned.version,
                fence=self.lease,
            )
            return Action(name, action, reason, verdict)

        if verdict.outcome is Outcome.FAIL:
            reason = f"guard failed at {step_label}: {verdict.message}"
            return act(
                "rollback",
                reason,
                lambda s, r: router._state(
                    s, phase=Phase.ROLLED_BACK, percent=0.0, shadow=False, reason=reason, actor=self.actor
                ),
            )
        if state.phase is Phase.PAUSED:
            return Action(name, "wait", "paused: waiting for resume or promote (the guard still watches)", verdict)
        if verdict.outcome is Outcome.MISMATCH:
            reason = f"paused at {step_label}: {verdict.message}"
            return act(
                "pause", reason, lambda s, r: router._state(s, phase=Phase.PAUSED, reason=reason, actor=self.actor)
            )
        at_full = not state.shadow and state.percent >= 100
        baked = elapsed >= rollout.bake_time
        if baked and (verdict.outcome is Outcome.PASS or at_full):
            return self._promote(name, rollout, state, verdict, act, step_label, elapsed)
        max_bake = rollout.max_bake_time
        waited = now - max(state.step_started_at, state.resumed_at)  # a resume gives the step a new window
        if max_bake is not None and waited >= max_bake and verdict.outcome is not Outcome.PASS:
            reason = (
                f"paused at {step_label}: still inconclusive after {_duration(max_bake)} "
                f"(max_bake_time): {verdict.message}"
            )
            return act(
                "pause", reason, lambda s, r: router._state(s, phase=Phase.PAUSED, reason=reason, actor=self.actor)
            )
        waiting = "bake time" if verdict.outcome is Outcome.PASS else "a passing verdict"
        return Action(name, "wait", f"waiting for {waiting} at {step_label} ({_duration(elapsed)} elapsed)", verdict)

    def _promote(
        self,
        name: str,
        rollout: Rollout,
        state: RolloutState,
        verdict: Verdict,
        act: Callable[[str, str, Callable[[RolloutState, Rollout], RolloutState | None]], Action],
        step_label: str,
        elapsed: float,
    ) -> Action:
        router = self.router
        nxt = state.step_index + 1
        if nxt >= len(rollout.steps):
            if state.percent >= 100:
                basis = "no failure seen, and no old traffic is left to compare with"
            else:
                basis = verdict.message
            reason = f"completed after {_duration(elapsed)} at {step_label}: {basis}"
            return act(
                "promote",
                reason,
                lambda s, r: router._new_step(s, phase=Phase.COMPLETED, percent=100.0, reason=reason, actor=self.actor),
            )
        target = rollout.steps[nxt]
        if any(abs(target - gate) < 1e-9 for gate in rollout.require_approval):
            reason = (
                f"paused at {step_label}: healthy, and the next step ({target:g} %) requires approval — "
                f"promote it manually"
            )
            return act(
                "pause", reason, lambda s, r: router._state(s, phase=Phase.PAUSED, reason=reason, actor=self.actor)
            )
        reason = f"promoted to {target:g} % after {_duration(elapsed)} at {step_label}: {verdict.message}"
        return act(
            "promote",
            reason,
            lambda s, r: router._new_step(
                s, phase=Phase.RUNNING, step_index=nxt, percent=target, reason=reason, actor=self.actor
            ),
        )

    # ------------------------------------------------------------------ background loop

    def start(self, interval: float = 1.0) -> None:
        """Run :meth:`tick` every ``interval`` seconds on a daemon thread until :meth:`stop`."""
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval!r}")
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(interval,), name="canary-router-controller", daemon=True
        )
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must survive anything a tick meets
                _log.exception("canary_router: controller tick failed")
            self._stop.wait(interval)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background loop (if running) and wait for it."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._thread = None
        lease, shared = self.lease, self.router._shared
        if lease is not None and shared is not None:
            self.lease = None
            try:
                shared.release_lease(lease)
            except Exception as exc:  # it expires on its own
                _log.warning("canary_router: could not release the controller lease: %s", exc)

    @property
    def running(self) -> bool:
        """Whether the background loop is running."""
        return self._thread is not None and self._thread.is_alive()

    def __repr__(self) -> str:
        return f"Controller(router={self.router!r}, running={self.running})"
