"""``router.canary(...)``: route calls between the old and the new implementation, and observe them."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any, ParamSpec, TypeAlias, TypeVar, cast

from .context import _EMPTY_CONTEXT, Context, _current
from .model import Decision, Reason
from .shadow import ShadowStats

if TYPE_CHECKING:
    from .router import Router
    from .telemetry import ParentContext, SpanHandle

__all__ = ["ContextSource", "make_canary"]

P = ParamSpec("P")
R = TypeVar("R")

ContextSource: TypeAlias = "str | Sequence[str] | Mapping[str, str] | Callable[..., Mapping[str, Any]]"
"""Where the decorator takes context attributes from the call's arguments:

* ``"user_id"`` — the parameter ``user_id`` becomes the attribute ``user_id``;
* ``("user_id", "region")`` — several parameters, each under its own name;
* ``{"account_id": "account"}`` — attribute ``account_id`` from the parameter ``account``;
* a callable — called with the call's arguments, returns a mapping of attributes.
"""

_MISSING = object()
_SHADOW = Reason.SHADOW
Extractor = Callable[[tuple[Any, ...], dict[str, Any]], Mapping[str, Any]]


def _no_span_end(handle: SpanHandle, error: BaseException | None) -> None:
    """Stand-in for ``Telemetry._span_end`` when the router has no telemetry (never called)."""


def _router_decide() -> Callable[..., Decision]:
    """``Router.decide`` itself, to tell it from a replacement (imported late: the router imports this module)."""
    from .router import Router

    return Router.decide


def _parameter_extractor(func: Callable[..., Any], mapping: Mapping[str, str]) -> Extractor:
    """Build a fast extractor of named parameters, validated against ``func``'s signature now."""
    signature = inspect.signature(func)
    params = list(signature.parameters.values())
    plan: list[tuple[str, str, int | None, Any]] = []
    for attribute, param_name in mapping.items():
        param = signature.parameters.get(param_name)
        if param is None or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            names = ", ".join(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
            raise TypeError(
                f"context_from names parameter {param_name!r}, but {func.__qualname__}() has no such "
                f"parameter (it has: {names or 'none'})"
            )
        position = params.index(param) if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) else None
        default = _MISSING if param.default is param.empty else param.default
        plan.append((attribute, param_name, position, default))
    steps = tuple(plan)

    def extract(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Mapping[str, Any]:
        found: dict[str, Any] = {}
        for attribute, param_name, position, default in steps:
            if param_name in kwargs:
                found[attribute] = kwargs[param_name]
            elif position is not None and position < len(args):
                found[attribute] = args[position]
            elif default is not _MISSING:
                found[attribute] = default
        return found

    return extract


def _extractor(func: Callable[..., Any], source: Any) -> Extractor | None:
    if source is None:
        return None
    if isinstance(source, str):
        return _parameter_extractor(func, {source: source})
    if isinstance(source, Mapping):
        return _parameter_extractor(func, dict(source))
    if callable(source):
        user = source

        def call_user(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Mapping[str, Any]:
            result = user(*args, **kwargs)
            return result if isinstance(result, Mapping) else {}

        return call_user
    if isinstance(source, Sequence) and all(isinstance(s, str) for s in source):
        return _parameter_extractor(func, {s: s for s in source})
    raise TypeError(
        "context_from must be a parameter name, a list of them, a mapping of attribute to parameter "
        f"name, or a callable; got {source!r}"
    )


class _ShadowRun:
    """Joins the old (served) and the new (shadow) result of one call, then compares them once."""

    __slots__ = ("args", "compare", "kwargs", "lock", "new", "old", "pending", "router", "stats")

    def __init__(
        self,
        router: Router,
        stats: ShadowStats,
        compare: Callable[[Any, Any], bool] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.router = router
        self.stats = stats
        self.compare = compare
        self.args = args
        self.kwargs = kwargs
        self.lock = threading.Lock()
        self.pending = 2
        self.old: Any = _MISSING
        self.new: Any = _MISSING

    def done(self, side: str, value: Any) -> None:
        """Record one side's result (``_MISSING`` when it failed); compares when both are in."""
        with self.lock:
            setattr(self, side, value)
            self.pending -= 1
            ready = self.pending == 0
        if not ready or self.old is _MISSING or self.new is _MISSING:
            return
        try:
            same = self.compare(self.old, self.new) if self.compare is not None else self.old == self.new
        except Exception as exc:
            self.router._warn("shadow-compare", f"shadow compare failed: {exc!r}")
            return
        if same:
            self.stats._add(compared=1)
        else:
            self.stats.mismatch(self.router.clock(), self.args, self.kwargs, self.old, self.new)


def make_canary(
    router: Router,
    name: str,
    *,
    old: Callable[P, R],
    context_from: ContextSource | None,
    fallback_on_error: bool,
    mode: str = "route",
    compare: Callable[[Any, Any], bool] | None = None,
    shadow_timeout: float = 5.0,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Build the decorator behind :meth:`Router.canary`."""
    if not callable(old):
        raise TypeError(f"canary({name!r}): old must be a callable, got {old!r}")
    if mode not in ("route", "shadow"):
        raise ValueError(f"canary({name!r}): mode must be 'route' or 'shadow', got {mode!r}")
    if shadow_timeout <= 0:
        raise ValueError(f"canary({name!r}): shadow_timeout must be > 0, got {shadow_timeout!r}")
    always_shadow = mode == "shadow"

    def decorate(new: Callable[P, R]) -> Callable[P, R]:
        is_async = inspect.iscoroutinefunction(new)
        if is_async != inspect.iscoroutinefunction(old):
            kind = "an async" if is_async else "a sync"
            raise TypeError(
                f"canary({name!r}): {getattr(new, '__qualname__', new)!r} is {kind} function, so old "
                f"({getattr(old, '__qualname__', old)!r}) must be one too"
            )
        extract = _extractor(new, context_from)
        observe = router._observe
        telemetry = router._telemetry
        decide: Callable[[str, Context | Mapping[str, Any] | None], Decision] = router.decide
        decided = None
        if always_shadow and telemetry is not None and getattr(decide, "__func__", None) is _router_decide():
            # Router.decide is _decide + telemetry._decided. In shadow mode the decorator calls the two itself, so
            # that a shadowed call is reported with the decision it is served by ("old", reason shadow), not the
            # "new" it was given. (A decide replaced on the instance, a test's spy say, is called as it is.)
            decide = router._decide
            decided = telemetry._decided
        # the fallback run of the old version is timed for the duration histogram only (not for the guard)
        observed = telemetry._observed if telemetry is not None else None
        # Routed-call spans: span_start returns None at once when tracing is off (one check, no span).
        span_start = telemetry._span_start if telemetry is not None else None
        span_end = telemetry._span_end if telemetry is not None else _no_span_end
        capture = telemetry._parent if telemetry is not None else None

        def context_for(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Context | Mapping[str, Any] | None:
            if extract is None:
                return None
            try:
                found = extract(args, kwargs)
            except Exception as exc:
                router._warn("context_from", f"canary({name!r}): context_from failed: {exc!r}")
                return None
            if not found:
                return None
            ambient = _current.get()
            if ambient is _EMPTY_CONTEXT:
                return found
            return ambient.merge(found)

        def shadow_decision(decision: Decision) -> Decision:
            """The decision a shadowed call is served by: "old", reason shadow (bucket and unit kept)."""
            return decision if decision[1] is _SHADOW else decision._replace(variant="old", reason=_SHADOW)

        if is_async:
            new_async = cast(Callable[..., Awaitable[Any]], new)
            old_async = cast(Callable[..., Awaitable[Any]], old)
            tasks: set[asyncio.Task[None]] = set()

            async def fallback_async(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                """Run the old version after the new one failed: a span of its own and a histogram point of "old"."""
                span = span_start(name, "old") if span_start is not None else None
                start = perf_counter()
                try:
                    result = await old_async(*args, **kwargs)
                    elapsed = perf_counter() - start
                except Exception as exc:
                    elapsed = perf_counter() - start
                    if span is not None:
                        span_end(span, exc)
                        span = None
                    if observed is not None:
                        observed(name, "old", elapsed, False, exc)
                    raise
                finally:
                    if span is not None:
                        span_end(span, None)
                if observed is not None:
                    observed(name, "old", elapsed, True, None)
                return result

            async def shadow_new(
                run: _ShadowRun, decision: Decision, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> None:
                span = span_start(name, "new", True) if span_start is not None else None
                start = perf_counter()
                try:
                    value = await asyncio.wait_for(new_async(*args, **kwargs), shadow_timeout)
                    elapsed = perf_counter() - start
                except Exception as exc:
                    elapsed = perf_counter() - start
                    if span is not None:
                        span_end(span, exc)
                        span = None
                    timed_out = isinstance(exc, TimeoutError)
                    run.stats._add(errors=1, timeouts=int(timed_out))
                    observe(name, decision, False, elapsed, exc, variant="new")
                    run.done("new", _MISSING)
                    return
                finally:
                    if span is not None:
                        span_end(span, None)
                observe(name, decision, True, elapsed, variant="new")
                run.done("new", value)

            async def async_shadow(decision: Decision, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                stats = router.shadow_stats(name)
                run: _ShadowRun | None = None
                if len(tasks) < router.shadow_max_pending:
                    run = _ShadowRun(router, stats, compare, args, kwargs)
                    # created before the old version's span starts, so both spans share the caller's parent
                    task = asyncio.get_running_loop().create_task(shadow_new(run, decision, args, kwargs))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                else:
                    stats._add(skipped=1)
                span = span_start(name, "old") if span_start is not None else None
                start = perf_counter()
                try:
                    result = await old_async(*args, **kwargs)
                    elapsed = perf_counter() - start
                except Exception as exc:
                    elapsed = perf_counter() - start
                    if span is not None:
                        span_end(span, exc)
                        span = None
                    observe(name, decision, False, elapsed, exc)
                    if run is not None:
                        run.done("old", _MISSING)
                    raise
                finally:
                    if span is not None:
                        span_end(span, None)
                observe(name, decision, True, elapsed)
                if run is not None:
                    run.done("old", result)
                return result

            @functools.wraps(new)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                decision = decide(name, context_for(args, kwargs) if extract is not None else None)
                if decision[1] is _SHADOW or (always_shadow and decision[0] == "new"):
                    decision = shadow_decision(decision)
                    if decided is not None:
                        decided(name, decision, router)
                    return await async_shadow(decision, args, kwargs)
                if decided is not None:
                    decided(name, decision, router)
                is_new = decision[0] == "new"
                span = span_start(name, decision[0]) if span_start is not None else None
                start = perf_counter()
                try:
                    result = await (new_async if is_new else old_async)(*args, **kwargs)
                    elapsed = perf_counter() - start
                except Exception as exc:
                    elapsed = perf_counter() - start
                    if span is not None:
                        span_end(span, exc)
                        span = None
                    if is_new and fallback_on_error:
                        observe(name, decision, False, elapsed, exc, True)
                        return await fallback_async(args, kwargs)
                    observe(name, decision, False, elapsed, exc)
                    raise
                finally:
                    if span is not None:  # success, or a BaseException such as a cancellation
                        span_end(span, None)
                observe(name, decision, True, elapsed)
                return result

            wrapper: Callable[..., Any] = async_wrapper
        else:
            new_sync = cast(Callable[..., Any], new)
            old_sync = cast(Callable[..., Any], old)

            def fallback_sync(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                """Run the old version after the new one failed: a span of its own and a histogram point of "old"."""
                span = span_start(name, "old") if span_start is not None else None
                start = perf_counter()
                try:
                    result = old_sync(*args, **kwargs)
                    elapsed = perf_counter() - start
                except Exception as exc:
                    elapsed = perf_counter() - start
                    if span is not None:
                        span_end(span, exc)
                        span = None
                    if observed is not None:
                        observed(name, "old", elapsed, False, exc)
                    raise
                finally:
                    if span is not None:
                        span_end(span, None)
                if observed is not None:
                    observed(name, "old", elapsed, True, None)
                return result

            def shadow_new_sync(
                run: _ShadowRun,
                decision: Decision,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                parent: ParentContext | None,
            ) -> None:
                # on a pool thread: the caller's span is passed in, the thread has no context of its own
                span = span_start(name, "new", True, parent) if span_start is not None else None
                start = perf_counter()
                try:
                    value = new_sync(*args, **kwargs)
                    elapsed = perf_counter() - start
                except Exception as exc:
                    elapsed = perf_counter() - start
                    if span is not None:
                        span_end(span, exc)
                        span = None
                    run.stats._add(errors=1)
                    observe(name, decision, False, elapsed, exc, variant="new")
                    run.done("new", _MISSING)
                    return
                finally:
                    if span is not None:
                        span_end(span, None)
                if elapsed > shadow_timeout:
                    run.stats._add(errors=1, timeouts=1)
                    error = TimeoutError(f"shadow run took {elapsed:.3f} s (timeout {shadow_timeout:g} s)")
                    observe(name, decision, False, elapsed, error, variant="new")
                    run.done("new", _MISSING)
                    return
                observe(name, decision, True, elapsed, variant="new")
                run.done("new", value)

            def sync_shadow(decision: Decision, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                stats = router.shadow_stats(name)
                run: _ShadowRun | None = _ShadowRun(router, stats, compare, args, kwargs)
                parent = capture() if capture is not None else None
                # the new version runs on a pool thread in a copy of the caller's context (ambient canary context,
                # tracing context), as the async shadow task does
                caller = contextvars.copy_context()
                if not router.shadow_pool.try_submit(caller.run, shadow_new_sync, run, decision, args, kwargs, parent):
                    stats._add(skipped=1)
                    run = None
                span = span_start(name, "old") if span_start is not None else None
                start = perf_counter()
                try:
                    result = old_sync(*args, **kwargs)
                    elapsed = perf_counter() - start
                except Exception as exc:
                    elapsed = perf_counter() - start
                    if span is not None:
                        span_end(span, exc)
                        span = None
                    observe(name, decision, False, elapsed, exc)
                    if run is not None:
                        run.done("old", _MISSING)
                    raise
                finally:
                    if span is not None:
                        span_end(span, None)
                observe(name, decision, True, elapsed)
                if run is not None:
                    run.done("old", result)
                return result

            @functools.wraps(new)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                decision = decide(name, context_for(args, kwargs) if extract is not None else None)
                if decision[1] is _SHADOW or (always_shadow and decision[0] == "new"):
                    decision = shadow_decision(decision)
                    if decided is not None:
                        decided(name, decision, router)
                    return sync_shadow(decision, args, kwargs)
                if decided is not None:
                    decided(name, decision, router)
                is_new = decision[0] == "new"
                span = span_start(name, decision[0]) if span_start is not None else None
                start = perf_counter()
                try:
                    result = (new_sync if is_new else old_sync)(*args, **kwargs)
                    elapsed = perf_counter() - start
                except Exception as exc:
                    elapsed = perf_counter() - start
                    if span is not None:
                        span_end(span, exc)
                        span = None
                    if is_new and fallback_on_error:
                        observe(name, decision, False, elapsed, exc, True)
                        return fallback_sync(args, kwargs)
                    observe(name, decision, False, elapsed, exc)
                    raise
                finally:
                    if span is not None:  # success, or a BaseException such as KeyboardInterrupt
                        span_end(span, None)
                observe(name, decision, True, elapsed)
                return result

            wrapper = sync_wrapper

        wrapper.__canary_rollout__ = name  # type: ignore[attr-defined]
        wrapper.__canary_old__ = old  # type: ignore[attr-defined]
        wrapper.__canary_new__ = new  # type: ignore[attr-defined]
        return cast(Callable[P, R], wrapper)

    return decorate
