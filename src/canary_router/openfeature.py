"""OpenFeature provider: evaluate canary_router rollouts through the OpenFeature SDK (the ``openfeature`` extra).

::

    from openfeature import api
    from openfeature.evaluation_context import EvaluationContext

    from canary_router import Router
    from canary_router.openfeature import CanaryRouterProvider

    router = Router.from_file("canary.toml")
    api.set_provider(CanaryRouterProvider(router))
    client = api.get_client()
    on_new = client.get_boolean_value("recommender", False, EvaluationContext("user-42", {"region": "eu-west-1"}))

The flag key is the rollout name. A boolean flag answers "is this unit on the new version?" (``True`` iff the
variant is ``"new"``); a string flag answers the variant itself (``"old"`` or ``"new"``). Every answer comes
from :meth:`Router.decide <canary_router.Router.decide>`, so it is the same decision the decorator and the
middleware make, with the same telemetry. Integer, float and object flags are a ``TYPE_MISMATCH``; an unknown
rollout is ``FLAG_NOT_FOUND``; both return the caller's default value. The provider never raises.

This module imports ``openfeature`` (``pip install 'canary-router[openfeature]'``); the core never imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import FlagResolutionDetails
from openfeature.flag_evaluation import Reason as OpenFeatureReason
from openfeature.provider import AbstractProvider, Metadata

from .model import Reason, Variant

if TYPE_CHECKING:
    from openfeature.evaluation_context import EvaluationContext
    from openfeature.flag_evaluation import FlagMetadata, FlagValueType

    from .model import Decision
    from .router import Router

__all__ = ["PROVIDER_NAME", "CanaryRouterProvider"]

PROVIDER_NAME = "canary_router"
"""The provider's metadata name (also the ``feature_flag.provider.name`` of the router's telemetry)."""

_log = logging.getLogger("canary_router")

T = TypeVar("T")


def _sdk_reason(name: str) -> OpenFeatureReason | str:
    """The SDK's :class:`~openfeature.flag_evaluation.Reason` member for ``name``, or ``name`` if it has none."""
    try:
        return OpenFeatureReason(name)
    except ValueError:  # pragma: no cover - every Reason.openfeature value is a member of the SDK's enum today
        return name


_REASONS: dict[str, OpenFeatureReason | str] = {reason.value: _sdk_reason(reason.openfeature) for reason in Reason}
"""``Decision.reason`` → the SDK's reason (via :attr:`Reason.openfeature <canary_router.Reason.openfeature>`)."""


def _is_new(variant: Variant) -> bool:
    return variant == "new"


def _variant(variant: Variant) -> str:
    return variant


class CanaryRouterProvider(AbstractProvider):
    """An OpenFeature provider answering from a :class:`~canary_router.Router`: one flag per rollout.

    ``CanaryRouterProvider(router)`` or ``CanaryRouterProvider(router, unit_attribute="account_id")``.
    The evaluation context's ``targeting_key`` is the unit id: it is put under ``unit_attribute`` when given,
    else under the rollout's first stickiness attribute (``user_id`` by default), replacing an attribute of that
    name; the context's other attributes are the decision's context attributes (targeting rules see them).
    Without a targeting key (and without a stickiness attribute among the attributes) a partial rollout cannot
    bucket the unit: it answers ``"old"`` with reason ``DEFAULT``, as :meth:`Router.decide` does. The ambient
    context of the middleware is not consulted: OpenFeature's own (merged) evaluation context is the input.

    Each resolution carries the variant (``"old"`` / ``"new"``), the reason mapped from
    :attr:`Reason.openfeature <canary_router.Reason.openfeature>`, and ``flag_metadata`` with the router's own
    ``decisionReason``, the unit's ``bucket`` when one was computed and the rollout state's ``version``.
    """

    def __init__(self, router: Router, *, unit_attribute: str | None = None) -> None:
        if unit_attribute is not None and (not isinstance(unit_attribute, str) or not unit_attribute):
            raise ValueError(f"unit_attribute must be a non-empty string or None, got {unit_attribute!r}")
        super().__init__()
        self._router = router
        self._unit_attribute = unit_attribute
        # A router's rollout definitions are fixed at construction, so the unit attribute per rollout is too.
        self._units: dict[str, str] = {
            name: unit_attribute or rollout.stickiness[0] for name, rollout in router.rollouts.items()
        }
        self._metadata = Metadata(name=PROVIDER_NAME)

    @property
    def router(self) -> Router:
        """The router the flags are evaluated by."""
        return self._router

    @property
    def unit_attribute(self) -> str | None:
        """The attribute the targeting key is put under (``None``: each rollout's first stickiness attribute)."""
        return self._unit_attribute

    def get_metadata(self) -> Metadata:
        """The provider's metadata: its name, ``"canary_router"``."""
        return self._metadata

    def __repr__(self) -> str:
        return f"CanaryRouterProvider(rollouts={sorted(self._units)!r}, unit_attribute={self._unit_attribute!r})"

    # ------------------------------------------------------------------ resolution

    def _attributes(self, flag_key: str, evaluation_context: EvaluationContext | None) -> dict[str, Any]:
        """The router context for ``evaluation_context``: its attributes, plus the targeting key as the unit id."""
        if evaluation_context is None:
            return {}
        attributes = dict(evaluation_context.attributes or {})
        key = evaluation_context.targeting_key
        if key is not None and key != "":
            attribute = self._units.get(flag_key)
            if attribute is not None:
                attributes[attribute] = key
        return attributes

    def _flag_metadata(self, flag_key: str, decision: Decision) -> FlagMetadata:
        metadata: dict[str, bool | int | float | str] = {"decisionReason": str(decision.reason)}
        if decision.bucket is not None:
            metadata["bucket"] = decision.bucket
        try:  # the version of the state decisions are made from (as the telemetry's feature_flag.version)
            compiled = self._router._compiled.get(flag_key)
            version = 0 if compiled is None else compiled.live.version
        except Exception:  # an internal detail: without it the answer stands, just without a version
            version = 0
        if version:
            metadata["version"] = version
        return metadata

    def _resolve(
        self,
        flag_key: str,
        default_value: T,
        evaluation_context: EvaluationContext | None,
        value_of: Callable[[Variant], T],
    ) -> FlagResolutionDetails[T]:
        """Decide rollout ``flag_key`` and express the decision with ``value_of(variant)``; never raises."""
        try:
            decision = self._router.decide(flag_key, self._attributes(flag_key, evaluation_context))
            reason = decision.reason
            if reason == Reason.UNKNOWN_ROLLOUT:
                return _error(default_value, ErrorCode.FLAG_NOT_FOUND, f"canary_router has no rollout {flag_key!r}")
            if reason == Reason.ERROR:
                return _error(default_value, ErrorCode.GENERAL, f"canary_router could not decide {flag_key!r}")
            variant = decision.variant
            return FlagResolutionDetails(
                value=value_of(variant),
                reason=_REASONS.get(reason, OpenFeatureReason.UNKNOWN),
                variant=variant,
                flag_metadata=self._flag_metadata(flag_key, decision),
            )
        except Exception as exc:
            _log.warning("openfeature: cannot resolve %r: %r", flag_key, exc)
            return _error(default_value, ErrorCode.GENERAL, f"canary_router failed to resolve {flag_key!r}: {exc!r}")

    def _mismatch(self, flag_key: str, default_value: T, kind: str) -> FlagResolutionDetails[T]:
        """The answer to an integer, float or object flag: ``TYPE_MISMATCH`` (``FLAG_NOT_FOUND`` when unknown)."""
        if flag_key not in self._units:
            return _error(default_value, ErrorCode.FLAG_NOT_FOUND, f"canary_router has no rollout {flag_key!r}")
        return _error(
            default_value,
            ErrorCode.TYPE_MISMATCH,
            f"canary_router rollout {flag_key!r} is a boolean or string flag, not {kind}",
        )

    def resolve_boolean_details(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        """``True`` when rollout ``flag_key`` serves the new version to this context, else ``False``."""
        return self._resolve(flag_key, default_value, evaluation_context, _is_new)

    def resolve_string_details(
        self,
        flag_key: str,
        default_value: str,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[str]:
        """The variant rollout ``flag_key`` serves to this context: ``"old"`` or ``"new"``."""
        return self._resolve(flag_key, default_value, evaluation_context, _variant)

    def resolve_integer_details(
        self,
        flag_key: str,
        default_value: int,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[int]:
        """A ``TYPE_MISMATCH`` error with the default value: rollouts are not integer flags."""
        return self._mismatch(flag_key, default_value, "an integer")

    def resolve_float_details(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        """A ``TYPE_MISMATCH`` error with the default value: rollouts are not float flags."""
        return self._mismatch(flag_key, default_value, "a float")

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Sequence[FlagValueType] | Mapping[str, FlagValueType],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[FlagValueType] | Mapping[str, FlagValueType]]:
        """A ``TYPE_MISMATCH`` error with the default value: rollouts are not object flags."""
        return self._mismatch(flag_key, default_value, "an object")

    # Deciding never does I/O (state changes arrive from the store in the background), so the async
    # variants answer at once from the synchronous ones; they are spelled out for SDKs without defaults.

    async def resolve_boolean_details_async(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        """As :meth:`resolve_boolean_details` (deciding does no I/O, so it never blocks the event loop)."""
        return self.resolve_boolean_details(flag_key, default_value, evaluation_context)

    async def resolve_string_details_async(
        self,
        flag_key: str,
        default_value: str,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[str]:
        """As :meth:`resolve_string_details`."""
        return self.resolve_string_details(flag_key, default_value, evaluation_context)

    async def resolve_integer_details_async(
        self,
        flag_key: str,
        default_value: int,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[int]:
        """As :meth:`resolve_integer_details`."""
        return self.resolve_integer_details(flag_key, default_value, evaluation_context)

    async def resolve_float_details_async(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        """As :meth:`resolve_float_details`."""
        return self.resolve_float_details(flag_key, default_value, evaluation_context)

    async def resolve_object_details_async(
        self,
        flag_key: str,
        default_value: Sequence[FlagValueType] | Mapping[str, FlagValueType],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[FlagValueType] | Mapping[str, FlagValueType]]:
        """As :meth:`resolve_object_details`."""
        return self.resolve_object_details(flag_key, default_value, evaluation_context)


def _error(default_value: T, code: ErrorCode, message: str) -> FlagResolutionDetails[T]:
    """An error resolution: the caller's default value, reason ``ERROR``, ``code`` and ``message``."""
    return FlagResolutionDetails(
        value=default_value, error_code=code, error_message=message, reason=OpenFeatureReason.ERROR
    )
