"""The evaluation context: immutable request/user attributes, and the ambient context.

The ambient context lives in a :class:`contextvars.ContextVar`, so every thread and every asyncio
task sees its own: middleware sets it per request, and decorated functions deep in the call stack
read it without it being passed around.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextvars import ContextVar, Token
from typing import Any, Literal

__all__ = ["Context", "current_context", "use_context"]

Variant = Literal["old", "new"]

_EMPTY: Mapping[str, Variant] = {}


class Context(Mapping[str, Any]):
    """Immutable attributes of one evaluation: ``user_id``, ``account_id``, ``region``, ``email``, ...

    ``Context(user_id="u-42", region="eu-west-1")`` or ``Context({"user_id": "u-42"})``.
    ``overrides`` maps a rollout name to a variant; only trusted code sets it (the middleware does, after
    checking a signed tester token), because it beats every rule and percentage. ``pins`` maps a rollout
    name to the variant a visitor first got (the middleware's session affinity, from a signed cookie); a pin
    beats rules and percentages but not a rollback or a completion.
    """

    __slots__ = ("_attrs", "_overrides", "_pins")

    _attrs: dict[str, Any]
    _overrides: Mapping[str, Variant]
    _pins: Mapping[str, Variant]

    def __init__(
        self,
        attributes: Mapping[str, Any] | None = None,
        /,
        *,
        overrides: Mapping[str, Variant] | None = None,
        pins: Mapping[str, Variant] | None = None,
        **kwargs: Any,
    ) -> None:
        attrs = dict(attributes) if attributes else {}
        if kwargs:
            attrs.update(kwargs)
        object.__setattr__(self, "_attrs", attrs)
        if overrides:
            checked = dict(overrides)
            for rollout, variant in checked.items():
                if variant not in ("old", "new"):
                    raise ValueError(f"override for {rollout!r} must be 'old' or 'new', got {variant!r}")
            object.__setattr__(self, "_overrides", checked)
        else:
            object.__setattr__(self, "_overrides", _EMPTY)
        if pins:
            checked_pins = dict(pins)
            for rollout, variant in checked_pins.items():
                if variant not in ("old", "new"):
                    raise ValueError(f"pin for {rollout!r} must be 'old' or 'new', got {variant!r}")
            object.__setattr__(self, "_pins", checked_pins)
        else:
            object.__setattr__(self, "_pins", _EMPTY)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Context is immutable; use Context.merge() to derive a new one")

    def __getitem__(self, key: str) -> Any:
        return self._attrs[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._attrs)

    def __len__(self) -> int:
        return len(self._attrs)

    def __contains__(self, key: object) -> bool:
        return key in self._attrs

    def get(self, key: str, default: Any = None) -> Any:
        """Return the attribute ``key``, or ``default`` when it is absent."""
        return self._attrs.get(key, default)

    def __repr__(self) -> str:
        extra = f", overrides={dict(self._overrides)!r}" if self._overrides else ""
        return f"Context({self._attrs!r}{extra})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Context):
            return self._attrs == other._attrs and dict(self._overrides) == dict(other._overrides)
        if isinstance(other, Mapping):
            return not self._overrides and self._attrs == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # attribute values may be unhashable

    @property
    def overrides(self) -> Mapping[str, Variant]:
        """Rollout name → variant forced for this context (set only by trusted code)."""
        return self._overrides

    @property
    def pins(self) -> Mapping[str, Variant]:
        """Rollout name → variant pinned by session affinity (set only by trusted code)."""
        return self._pins

    def merge(
        self,
        attributes: Mapping[str, Any] | None = None,
        /,
        *,
        overrides: Mapping[str, Variant] | None = None,
        **kwargs: Any,
    ) -> Context:
        """Return a new context: these attributes and overrides on top of this one's."""
        attrs = dict(self._attrs)
        pins = self._pins
        if attributes:
            if isinstance(attributes, Context):
                if overrides is None and attributes._overrides:
                    overrides = attributes._overrides
                if attributes._pins:
                    pins = {**pins, **attributes._pins}
                attributes = attributes._attrs
            attrs.update(attributes)
        attrs.update(kwargs)
        merged = dict(self._overrides)
        if overrides:
            merged.update(overrides)
        return Context(attrs, overrides=merged, pins=pins)


_new_context = Context.__new__
_set_attrs = Context.__dict__["_attrs"].__set__  # the slots' own setters skip the immutability guard
_set_overrides = Context.__dict__["_overrides"].__set__
_set_pins = Context.__dict__["_pins"].__set__


def _make_context(
    attrs: dict[str, Any], overrides: Mapping[str, Variant] = _EMPTY, pins: Mapping[str, Variant] = _EMPTY
) -> Context:
    """A context that owns ``attrs`` as they are (no copy, no checks): for trusted callers that built them."""
    context = _new_context(Context)
    _set_attrs(context, attrs)
    _set_overrides(context, overrides)
    _set_pins(context, pins)
    return context


IDENTITY_ATTRIBUTES = frozenset({"user_id", "session_id"})
"""The attributes of a web request's identity: a rollout that reads no others is decided without the rest."""

_DEFERRED: set[type] = set()
"""The concrete :class:`_Deferred` types (``type(context) in _DEFERRED`` is the cheap test for one)."""


class _Deferred(Context):
    """A context worked out on first use: the web middleware's per-request context.

    A request that never decides never pays for reading its headers and cookies. It is a :class:`Context`
    (``isinstance`` holds, mapping reads, :meth:`~Context.merge`, ``overrides`` and ``pins`` all work): the
    first use resolves it, once, and every use after that answers from the resolved context, which
    :meth:`_get` returns. ``Router.decide`` and :func:`current_context` use the resolved context itself.
    Subclasses implement :meth:`_resolve`, which must never raise.
    """

    __slots__ = ("_resolved",)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _DEFERRED.add(cls)  # an exact-type lookup: isinstance() on a Mapping subclass goes through ABCMeta

    __setattr__ = object.__setattr__  # type: ignore[assignment]  # the per-request slots are set, not the attributes
    _resolved: Context | None

    def _resolve(self) -> Context:
        """Work the context out (called once, by :meth:`_get`); never raises."""
        raise NotImplementedError

    def _get(self) -> Context:
        """The resolved context (resolving it now, on first use)."""
        resolved = self._resolved
        if resolved is None:
            resolved = self._resolved = self._resolve()
        return resolved

    def _identity(self) -> Context:
        """A context with at least the :data:`IDENTITY_ATTRIBUTES` and the overrides and pins of the resolved one.

        ``Router.decide`` uses it for rollouts that read nothing else. The default is :meth:`_get`; a subclass
        may answer from a cheaper first stage, which must agree with the resolved context on those attributes.
        """
        return self._get()

    @property
    def _attrs(self) -> dict[str, Any]:  # type: ignore[override]
        return self._get()._attrs

    @property
    def _overrides(self) -> Mapping[str, Variant]:  # type: ignore[override]
        return self._get()._overrides

    @property
    def _pins(self) -> Mapping[str, Variant]:  # type: ignore[override]
        return self._get()._pins

    def __repr__(self) -> str:
        return repr(self._get())


_EMPTY_CONTEXT = Context()
_current: ContextVar[Context] = ContextVar("canary_router_context", default=_EMPTY_CONTEXT)


def current_context() -> Context:
    """Return the ambient context of this thread / task (empty when none is set).

    Inside a web request this is the request's context (the same object as the middleware's
    ``canary_context``): reading it resolves the request, as a decision does, so the response then gets
    ``Vary: Cookie`` and any cookie the resolution set.
    """
    context = _current.get()
    if type(context) in _DEFERRED:
        context._get()  # type: ignore[attr-defined]
    return context


class use_context:  # used as a function: ``with use_context(...)``
    """Make a context ambient for the ``with`` block, for this thread or asyncio task only.

    The new attributes are laid over the enclosing ambient context (so a decorator deep inside a
    request sees both the middleware's attributes and yours); ``replace=True`` starts from empty.
    The ``with`` statement yields the context now in force.
    """

    __slots__ = ("_context", "_token")

    def __init__(
        self,
        attributes: Mapping[str, Any] | None = None,
        /,
        *,
        replace: bool = False,
        overrides: Mapping[str, Variant] | None = None,
        **kwargs: Any,
    ) -> None:
        base = _EMPTY_CONTEXT if replace else _current.get()
        if (
            base is _EMPTY_CONTEXT
            and not overrides
            and type(attributes) is not Context
            and type(attributes) not in _DEFERRED
        ):
            if attributes:
                attrs = dict(attributes)
                attrs.update(kwargs)
            else:
                attrs = kwargs
            self._context = _make_context(attrs)
        else:
            self._context = base.merge(attributes, overrides=overrides, **kwargs)
        self._token: Token[Context] | None = None

    def __enter__(self) -> Context:
        self._token = _current.set(self._context)
        return self._context

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None
