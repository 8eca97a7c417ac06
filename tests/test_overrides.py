"""Signed override tokens and signed values: nobody without the secret can forge, vary or reuse them elsewhere."""

from __future__ import annotations

import base64
import hmac
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary_router import overrides
from canary_router.overrides import (
    MAX_TOKEN_LENGTH,
    SECRET_ENV,
    OverrideToken,
    create_token,
    decode_pins,
    encode_pins,
    resolve_secret,
    sign_value,
    verify_token,
    verify_value,
)

SECRET = b"override-test-secret-0123456789"
OTHER = b"another-secret-for-the-tests-42"
NOW = 1_700_000_000.0
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def token_for(rollout: str = "checkout", variant: overrides.Variant = "new", ttl: float = 3600) -> str:
    """A token made with the test secret at NOW."""
    return create_token(SECRET, rollout=rollout, variant=variant, ttl=ttl, now=NOW)


def b64(data: bytes) -> str:
    """Unpadded base64url, as the token format uses it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ----------------------------------------------------------------------------------------- round trip and expiry


def test_token_round_trip() -> None:
    """A token verifies to the rollout, variant and expiry it was made for."""
    for variant in ("new", "old"):
        grant = verify_token(SECRET, token_for(variant=variant), now=NOW)
        assert isinstance(grant, OverrideToken)
        assert (grant.rollout, grant.variant, grant.expires) == ("checkout", variant, NOW + 3600)
        assert verify_token(SECRET, token_for(variant=variant), rollout="checkout", now=NOW) is not None


def test_token_format_is_payload_dot_hmac_sha256() -> None:
    """The token is base64url(payload) "." base64url(HMAC-SHA256(secret, payload)), as documented."""
    body, signature = token_for().split(".")
    payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert payload == f"v1|override|checkout|new|{int(NOW + 3600)}".encode()
    assert signature == b64(hmac.new(SECRET, payload, "sha256").digest())
    assert "=" not in body + signature


def test_expiry_is_checked_against_the_given_now() -> None:
    """A token is valid strictly before its expiry and rejected from then on."""
    token = token_for(ttl=60)
    assert verify_token(SECRET, token, now=NOW) is not None
    assert verify_token(SECRET, token, now=NOW + 59.9) is not None
    assert verify_token(SECRET, token, now=NOW + 60) is None
    assert verify_token(SECRET, token, now=NOW + 10**9) is None


def test_default_clock_is_the_wall_clock() -> None:
    """Without ``now``, creation and verification use the wall clock."""
    fresh = create_token(SECRET, rollout="checkout", variant="new", ttl=60)
    assert verify_token(SECRET, fresh) is not None
    assert verify_token(SECRET, token_for(ttl=60)) is None  # made long ago (NOW is in 2023)


# ------------------------------------------------------------------------------------------ forgery and tampering


def test_tampering_with_any_character_is_rejected() -> None:
    """Changing any character of the payload or the signature, to any other base64url character, is rejected."""
    token = token_for()
    assert verify_token(SECRET, token, now=NOW) is not None
    for index, original in enumerate(token):
        if original == ".":
            continue
        for replacement in B64:
            if replacement != original:
                tampered = token[:index] + replacement + token[index + 1 :]
                assert verify_token(SECRET, tampered, now=NOW) is None, (index, replacement)


def test_tampering_with_the_payload_bytes_is_rejected() -> None:
    """Flipping any bit of the decoded payload or signature, re-encoded validly, is rejected."""
    body, signature = token_for().split(".")
    payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    mac = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    for index in range(len(payload)):
        for bit in range(8):
            changed = bytearray(payload)
            changed[index] ^= 1 << bit
            assert verify_token(SECRET, f"{b64(bytes(changed))}.{signature}", now=NOW) is None
    for index in range(len(mac)):
        changed = bytearray(mac)
        changed[index] ^= 0x01
        assert verify_token(SECRET, f"{body}.{b64(bytes(changed))}", now=NOW) is None


def test_padded_or_decorated_encodings_are_rejected() -> None:
    """The same bytes encoded differently (padding, stray characters, spare bits) do not verify: one token, one text."""
    token = token_for()
    body, signature = token.split(".")
    variants = [
        f"{body}=.{signature}",
        f"{body}.{signature}=",
        f"{body}.{signature}==",
        f"{body}!.{signature}",
        f"{body}.{signature[:10]} {signature[10:]}",
        f"{body}.{signature}\n",
        f"{body.replace('-', '+')}.{signature.replace('_', '/')}",
    ]
    for text in variants:
        if text != token:
            assert verify_token(SECRET, text, now=NOW) is None, text


def test_another_secret_does_not_verify() -> None:
    """A token made with another secret, or a forged signature, is rejected."""
    token = create_token(OTHER, rollout="checkout", variant="new", ttl=3600, now=NOW)
    assert verify_token(SECRET, token, now=NOW) is None
    payload = f"v1|override|checkout|new|{int(NOW + 3600)}".encode()
    assert verify_token(SECRET, f"{b64(payload)}.{b64(b'x' * 32)}", now=NOW) is None
    assert verify_token(SECRET, f"{b64(payload)}.", now=NOW) is None


def test_scope_is_one_rollout_and_one_variant() -> None:
    """A token for one rollout grants nothing for another, and its variant cannot be swapped."""
    token = token_for(rollout="checkout")
    assert verify_token(SECRET, token, rollout="search", now=NOW) is None
    body, signature = token.split(".")
    payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    for swapped in (payload.replace("|new|", "|old|"), payload.replace("checkout", "search")):
        assert verify_token(SECRET, f"{b64(swapped.encode())}.{signature}", now=NOW) is None


def test_validly_signed_but_wrong_payloads_are_rejected() -> None:
    """Signed payloads of the wrong version, kind, shape, variant or expiry are rejected."""
    expires = int(NOW + 3600)
    for payload in (
        f"v2|override|checkout|new|{expires}",
        f"v1|pin|checkout|new|{expires}",
        f"v1|override|checkout|blue|{expires}",
        f"v1|override|checkout|new|{expires}|extra",
        "v1|override|checkout|new",
        "v1|override|checkout|new|soon",
        "",
    ):
        data = payload.encode()
        signed = f"{b64(data)}.{b64(hmac.new(SECRET, data, 'sha256').digest())}"
        assert verify_token(SECRET, signed, now=NOW) is None, payload


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "..",
        "abc",
        "a.b.c",
        "no-dot-at-all",
        "%%%.%%%",
        "a.b",
        "abcde.abcde",  # impossible base64 lengths
        "é.é",
        "токен.подпись",
        "\x00.\x00",
        "A" * (MAX_TOKEN_LENGTH + 1),
        "A" * 300 + "." + "B" * 300,
    ],
)
def test_malformed_tokens_are_rejected(text: str) -> None:
    """Malformed base64, a wrong number of dots, non-ASCII and oversized tokens are rejected, not raised."""
    assert verify_token(SECRET, text, now=NOW) is None


def test_oversized_token_is_rejected_even_when_signed() -> None:
    """A correctly signed token longer than MAX_TOKEN_LENGTH is rejected before any decoding."""
    long_name = "r" * 400
    token = create_token(SECRET, rollout=long_name, variant="new", ttl=3600, now=NOW)
    assert len(token) > MAX_TOKEN_LENGTH
    assert verify_token(SECRET, token, now=NOW) is None


def test_no_secret_verifies_nothing() -> None:
    """Without a secret, every token is rejected."""
    assert verify_token(None, token_for(), now=NOW) is None
    assert verify_value(None, "user", sign_value(SECRET, "user", "u-1")) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=700))
def test_arbitrary_text_is_rejected_without_raising(text: str) -> None:
    """Any text is rejected as a token or a signed value, and nothing raises."""
    assert verify_token(SECRET, text, now=NOW) is None
    assert verify_value(SECRET, "user", text) is None


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=B64 + ".", max_size=200))
def test_arbitrary_base64_text_is_rejected_without_raising(text: str) -> None:
    """Text made of the token alphabet (valid-looking shapes) is rejected too, and nothing raises."""
    assert verify_token(SECRET, text, now=NOW) is None
    assert verify_value(SECRET, "pin", text) is None


def test_signatures_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens and signed values compare signatures with hmac.compare_digest."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    assert verify_token(SECRET, token_for(), now=NOW) is not None
    assert len(calls) == 1
    assert len(calls[0][0]) == len(calls[0][1]) == 32
    assert verify_token(SECRET, token_for()[:-2] + "AA", now=NOW) is None
    assert len(calls) == 2
    assert verify_value(SECRET, "user", sign_value(SECRET, "user", "u-1")) == "u-1"
    assert len(calls) == 3


# ----------------------------------------------------------------------------------------------------- secrets


def test_short_secrets_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret shorter than 16 bytes is refused, whether passed or read from the environment."""
    with pytest.raises(ValueError, match="at least 16 bytes"):
        resolve_secret("too-short")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        create_token(b"fifteen-bytes!!", rollout="checkout", variant="new", ttl=60)
    monkeypatch.setenv(SECRET_ENV, "short")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        resolve_secret(None)
    assert resolve_secret("x" * 16) == b"x" * 16
    assert resolve_secret(b"y" * 16) == b"y" * 16


def test_secret_comes_from_the_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit secret, $CANARY_ROUTER_SECRET is used; without either, there is none."""
    monkeypatch.setenv(SECRET_ENV, SECRET.decode())
    assert resolve_secret(None) == SECRET
    assert resolve_secret("explicit-secret-wins-0001") == b"explicit-secret-wins-0001"
    token = create_token(None, rollout="checkout", variant="new", ttl=60, now=NOW)
    assert verify_token(SECRET, token, now=NOW) is not None
    monkeypatch.setenv(SECRET_ENV, "")
    assert resolve_secret(None) is None
    monkeypatch.delenv(SECRET_ENV)
    assert resolve_secret(None) is None
    with pytest.raises(ValueError, match="no signing secret"):
        create_token(None, rollout="checkout", variant="new", ttl=60)


def test_create_token_validates_its_arguments() -> None:
    """A bad variant, rollout name or ttl is a ValueError at creation."""
    with pytest.raises(ValueError, match="variant"):
        create_token(SECRET, rollout="checkout", variant="blue", ttl=60)  # type: ignore[arg-type]
    for name in ("", "a|b"):
        with pytest.raises(ValueError, match="rollout"):
            create_token(SECRET, rollout=name, variant="new", ttl=60)
    for ttl in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ttl"):
            create_token(SECRET, rollout="checkout", variant="new", ttl=ttl)


# -------------------------------------------------------------------------------------------------- signed values


def test_signed_values_round_trip() -> None:
    """sign_value / verify_value round-trip any text for the same kind and secret."""
    for value in ("u-42", "", "ünïcödé", "a.b|c=d,e"):
        assert verify_value(SECRET, "user", sign_value(SECRET, "user", value)) == value


def test_signed_value_kinds_do_not_cross() -> None:
    """A "pin" signature does not verify as "user" (nor the reverse), nor under another secret."""
    pin = sign_value(SECRET, "pin", "u-42")
    assert verify_value(SECRET, "pin", pin) == "u-42"
    assert verify_value(SECRET, "user", pin) is None
    assert verify_value(SECRET, "user", sign_value(SECRET, "user", "u-42")) == "u-42"
    assert verify_value(SECRET, "pin", sign_value(SECRET, "user", "u-42")) is None
    assert verify_value(OTHER, "pin", pin) is None


def test_signed_values_are_not_tokens() -> None:
    """A signed value never verifies as an override token, and a token never as a signed value."""
    value = sign_value(SECRET, "override", f"checkout|new|{int(NOW + 3600)}")
    assert verify_token(SECRET, value, now=NOW) is None
    assert verify_value(SECRET, "override", token_for()) is None


def test_tampered_signed_values_are_rejected() -> None:
    """Changing any character of a signed value is rejected."""
    signed = sign_value(SECRET, "user", "u-42")
    for index, original in enumerate(signed):
        if original == ".":
            continue
        for replacement in B64:
            if replacement != original:
                assert verify_value(SECRET, "user", signed[:index] + replacement + signed[index + 1 :]) is None


def test_oversized_signed_values_are_rejected() -> None:
    """A signed value longer than 4096 characters is rejected before decoding."""
    signed = sign_value(SECRET, "user", "u" * 4000)
    assert len(signed) > 4096
    assert verify_value(SECRET, "user", signed) is None


# ------------------------------------------------------------------------------------------------------------ pins


def test_pins_round_trip() -> None:
    """encode_pins / decode_pins round-trip, sorted by rollout name."""
    pins: dict[str, overrides.Variant] = {"search": "old", "checkout": "new", "a-b.c_d": "new"}
    text = encode_pins(pins)
    assert text == "a-b.c_d=new,checkout=new,search=old"
    assert decode_pins(text) == pins
    assert decode_pins(encode_pins({})) == {}


def test_decode_pins_skips_garbage() -> None:
    """Malformed entries are skipped and the rest kept; nothing raises."""
    assert decode_pins("checkout=new,=old,search,x=blue,,y=old=old,z=old") == {"checkout": "new", "z": "old"}
    assert decode_pins("") == {}
    assert decode_pins(",,,") == {}
    many = ",".join(f"r{i}=new" for i in range(100))
    assert len(decode_pins(many)) == 64


@given(st.text(max_size=300))
def test_decode_pins_never_raises(text: str) -> None:
    """decode_pins accepts any text and returns only valid variants."""
    assert set(decode_pins(text).values()) <= {"old", "new"}


# ----------------------------------------------------------------------------------------- the override-token CLI


def run(*args: str, secret: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed canary-router entry point, with $CANARY_ROUTER_SECRET set to ``secret`` (or unset)."""
    exe = shutil.which("canary-router", path=str(Path(sys.executable).parent))
    assert exe is not None, "the canary-router console script is not installed"
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    if secret is not None:
        env[SECRET_ENV] = secret
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False, env=env)


def test_cli_prints_only_a_token_that_verifies() -> None:
    """override-token prints the token alone on stdout, and it grants the variant for the ttl."""
    import time

    before = time.time()
    result = run("override-token", "--rollout", "checkout", "--variant", "new", "--ttl", "7d", "--secret", "s" * 16)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    token = result.stdout.removesuffix("\n")
    assert "\n" not in token
    assert " " not in token
    grant = verify_token(b"s" * 16, token, rollout="checkout", now=before)
    assert grant is not None
    assert grant.variant == "new"
    assert before + 7 * 86400 - 1 <= grant.expires <= time.time() + 7 * 86400
    assert verify_token(b"s" * 16, token, now=grant.expires) is None


def test_cli_reads_the_secret_from_the_environment() -> None:
    """Without --secret, override-token signs with $CANARY_ROUTER_SECRET; bare numbers are seconds."""
    result = run("override-token", "--rollout", "search", "--variant", "old", "--ttl", "90", secret=SECRET.decode())
    assert result.returncode == 0, result.stderr
    grant = verify_token(SECRET, result.stdout.strip(), rollout="search")
    assert grant is not None
    assert grant.variant == "old"


@pytest.mark.parametrize(
    ("args", "secret", "message"),
    [
        ([], None, "no signing secret: pass --secret or set $CANARY_ROUTER_SECRET"),
        ([], "", "no signing secret: pass --secret or set $CANARY_ROUTER_SECRET"),
        (["--secret", "short"], None, "the signing secret must be at least 16 bytes long"),
        ([], "short", "the signing secret must be at least 16 bytes long"),
        (["--variant", "blue"], SECRET.decode(), "--variant: expected 'new' or 'old', got 'blue'"),
        (["--ttl", "soon"], SECRET.decode(), "--ttl: expected a duration such as"),
        (["--ttl", "0s"], SECRET.decode(), "--ttl: expected a positive duration, got '0s'"),
        (["--ttl", "-1h"], SECRET.decode(), "--ttl: expected a duration such as"),
        (["--rollout", "check|out"], SECRET.decode(), "--rollout: expected a rollout name"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(args: list[str], secret: str | None, message: str) -> None:
    """A missing or short secret, a bad variant, ttl or rollout name: one line on stderr, exit 2, no traceback."""
    options = {"--rollout": "checkout", "--variant": "new", "--ttl": "1h"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        options[flag] = value
    argv = [item for pair in options.items() for item in pair]
    result = run("override-token", *argv, secret=secret)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"canary-router: error: {message}")
    assert "Traceback" not in result.stderr


def test_cli_missing_option_is_a_usage_error() -> None:
    """Leaving out a required option is a usage error (exit 2)."""
    result = run("override-token", "--rollout", "checkout", secret=SECRET.decode())
    assert result.returncode == 2
    assert "--variant" in result.stderr
