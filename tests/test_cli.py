"""The canary-router command line: every command, its exit codes and its output, on real routers and stores."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pty
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from canary_router import MemoryStore, Phase, Router, StoreError, bucket
from canary_router.cli import Environment, cli

GOOD = """
[rollouts.recommender]
steps = [5, 10, 25, 50, 100]
bake_time = "1h"
"""

BAD = """
[rollouts.recommender]
stikiness = "user_id"
steps = [5, 25, 20]
bake_time = "soon"
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed canary-router entry point."""
    exe = shutil.which("canary-router", path=str(Path(sys.executable).parent))
    assert exe is not None, "the canary-router console script is not installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False)


def test_validate_accepts_a_good_file(tmp_path: Path) -> None:
    """Validate exits 0 and names the rollouts of a valid file."""
    path = tmp_path / "canary.toml"
    path.write_text(GOOD)
    result = run("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert "recommender" in result.stdout


def test_validate_prints_every_error_and_exits_1(tmp_path: Path) -> None:
    """Validate lists every problem (not just the first) with its path, and exits 1."""
    path = tmp_path / "canary.toml"
    path.write_text(BAD)
    result = run("validate", str(path))
    assert result.returncode == 1
    assert "rollouts.recommender.stikiness: unknown key (did you mean 'stickiness'?)" in result.stdout
    assert "rollouts.recommender.steps[2]" in result.stdout
    assert "rollouts.recommender.bake_time" in result.stdout
    assert "3 problems" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_validate_json_output(tmp_path: Path) -> None:
    """Validate --json reports each file's errors as data for scripts."""
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(GOOD)
    bad.write_text(BAD)
    result = run("validate", "--json", str(good), str(bad))
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data[0] == {"file": str(good), "ok": True, "rollouts": ["recommender"], "segments": []}
    assert data[1]["ok"] is False
    assert {e["path"] for e in data[1]["errors"]} == {
        "rollouts.recommender.stikiness",
        "rollouts.recommender.steps[2]",
        "rollouts.recommender.bake_time",
    }


def test_validate_missing_file_is_one_clear_line(tmp_path: Path) -> None:
    """A missing file is reported in one line, without a traceback."""
    result = run("validate", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert "cannot read the file" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_bucket_command_prints_spec_buckets() -> None:
    """The bucket command prints bucket(salt, id) for each id."""
    result = run("bucket", "recommender", "user-1", "user-2")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        f"user-1\t{bucket('recommender', 'user-1')}",
        f"user-2\t{bucket('recommender', 'user-2')}",
    ]


def test_demo_healthy_completes_every_step() -> None:
    """The healthy demo is promoted 5 → 10 → 25 → 50 → 100 % by the controller and completes, sticky throughout."""
    result = run("demo", "--users", "3000", "--seed", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for target in ("10", "25", "50", "100"):
        assert f"promoted to {target} %" in out
    assert "final phase: completed" in out
    assert "nobody who got the new version went back to the old one" in out


def test_demo_faulty_is_rolled_back_with_numbers() -> None:
    """The faulty demo is rolled back automatically, and the reason carries the error rates and bounds."""
    result = run("demo", "--scenario", "faulty", "--seed", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "rollback: guard failed at" in out
    assert "exceeds the tolerance (1 pp)" in out
    assert "final phase: rolled_back" in out


def test_usage_error_exits_2() -> None:
    """An unknown command is a usage error (exit 2)."""
    result = run("no-such-command")
    assert result.returncode == 2


@pytest.mark.parametrize("argv", [["--version"], ["--help"]])
def test_version_and_help(argv: list[str]) -> None:
    """--version and --help work."""
    result = run(*argv)
    assert result.returncode == 0
    assert "canary-router" in result.stdout or "Usage" in result.stdout


def test_controller_command_ticks_and_reports(tmp_path: Path) -> None:
    """canary-router controller runs the given number of ticks and prints each action as JSON."""
    path = tmp_path / "canary.toml"
    path.write_text(GOOD)
    result = run("controller", str(path), "--ticks", "2", "--interval", "0.05", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(line["rollout"], line["action"]) for line in lines] == [("recommender", "wait")] * 2
    assert "waiting for a passing verdict at 5 %" in lines[0]["reason"]


# ---------------------------------------------------------------------- the operator commands


OPERATED = """
[rollouts.recommender]
steps = [5, 10, 25, 50, 100]
bake_time = "1h"

[rollouts.checkout]
stickiness = ["account_id", "user_id"]
steps = [1, 50, 100]

[[rollouts.checkout.rules]]
when  = [{ attribute = "email", operator = "STR_ENDS_WITH", values = ["@example.com"] }]
serve = "new"

[[rollouts.checkout.rules]]
when    = [{ attribute = "region", operator = "IN", values = ["eu-west-1"] }]
percent = 50

[[rollouts.checkout.rules]]
when  = [{ attribute = "account_id", operator = "IN", values = ["vip-1", "vip-2"] }]
serve = "old"
"""

START = 1_800_000_000.0


class Clock:
    """A fake clock: POSIX seconds that only move when the test says so."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A configuration with a plain rollout and one with rules and a list of stickiness attributes."""
    path = tmp_path / "canary.toml"
    path.write_text(OPERATED)
    return path


def invoke(env: Environment, *args: str, stdin: str | None = None) -> Result:
    """Run the CLI in this process on ``env`` (a lent store or router)."""
    return CliRunner().invoke(cli, list(args), obj=env, input=stdin, catch_exceptions=False)


def test_a_promotion_from_the_cli_reaches_a_router_sharing_the_store(config: Path) -> None:
    """A promote --yes on a shared store moves the application's router: its users enter the next step."""
    store = MemoryStore()
    clock = Clock()
    with Router.from_file(config, store=store, clock=clock, telemetry=None) as app:
        env = Environment(store=store, clock=clock)
        joining = [f"u{i}" for i in range(5000) if 500 <= bucket("recommender", f"u{i}") < 1000]
        assert joining
        assert all(app.decide("recommender", {"user_id": u}).variant == "old" for u in joining)

        result = invoke(env, "promote", "recommender", "--config", str(config), "--yes", "--actor", "alice")

        assert result.exit_code == 0, result.output
        assert result.stdout == (
            "recommender: running at 5 % (step 1 of 5) → running at 10 % (step 2 of 5) (version 2, by cli:alice)\n"
        )
        assert all(app.decide("recommender", {"user_id": u}).variant == "new" for u in joining)
        record = app.status("recommender").history[-1]
        assert (record.actor, record.action, record.from_percent, record.to_percent) == ("cli:alice", "promote", 5, 10)

        # the command closed its own router, not the lent store: the application still hears every change
        assert invoke(env, "pause", "recommender", "--config", str(config), "-y").exit_code == 0
        assert app.decide("recommender", {"user_id": joining[0]}).variant == "new"
        assert invoke(env, "rollback", "recommender", "--config", str(config), "-y", "--reason", "p99").exit_code == 0
        assert app.decide("recommender", {"user_id": joining[0]}).variant == "old"
        assert app.status("recommender").reason == "p99"


def test_every_state_change_command_records_its_actor_and_reports_json(config: Path) -> None:
    """set, pause, resume, promote, rollback and restart each apply one audited transition and print it as JSON."""
    store = MemoryStore()
    env = Environment(store=store, clock=Clock())
    steps = [
        (["set", "recommender", "12.5%"], "set", "running", 12.5),
        (["pause", "recommender"], "pause", "paused", 12.5),
        (["resume", "recommender"], "resume", "running", 12.5),
        (["promote", "recommender"], "promote", "running", 25.0),
        (["rollback", "recommender"], "rollback", "rolled_back", 0.0),
        (["restart", "recommender"], "restart", "running", 5.0),
    ]
    for version, (args, action, phase, percent) in enumerate(steps, start=2):
        result = invoke(env, *args, "--config", str(config), "--yes", "--json", "--actor", "bob")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["rollout"] == "recommender"
        assert data["action"] == action
        assert data["changed"] is True
        assert data["actor"] == "cli:bob"
        assert data["before"]["version"] == version - 1
        assert data["after"] == {
            "phase": phase,
            "percent": percent,
            "step_index": data["after"]["step_index"],
            "version": version,
        }
    records = store.history("recommender")
    assert [r.action for r in records] == ["start", "set_percent", "pause", "resume", "promote", "rollback", "restart"]
    assert {r.actor for r in records[1:]} == {"cli:bob"}


def test_a_change_that_changes_nothing_says_so_and_asks_nothing(config: Path) -> None:
    """Pausing a paused rollout is not a transition: no prompt, no audit record, exit 0, changed false."""
    store = MemoryStore()
    env = Environment(store=store)
    assert invoke(env, "pause", "recommender", "--config", str(config), "-y").exit_code == 0
    result = invoke(env, "pause", "recommender", "--config", str(config), "--json")  # no --yes, no terminal
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["changed"] is False
    assert len(store.history("recommender")) == 2


def test_without_yes_and_without_a_terminal_a_change_is_refused(config: Path) -> None:
    """Off a terminal, a change without --yes exits 2 with one line saying so, and changes nothing."""
    store = MemoryStore()
    result = invoke(Environment(store=store), "promote", "recommender", "--config", str(config), stdin="y\n")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "needs confirmation, but stdin is not a terminal: pass --yes" in result.stderr
    versioned = store.get("recommender")
    assert versioned is not None
    assert versioned.version == 1


def test_the_actor_defaults_to_user_at_host(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --actor or $CANARY_ROUTER_ACTOR the change is recorded as cli:user@hostname."""
    import getpass
    import socket

    monkeypatch.delenv("CANARY_ROUTER_ACTOR", raising=False)
    store = MemoryStore()
    assert invoke(Environment(store=store), "promote", "recommender", "--config", str(config), "-y").exit_code == 0
    assert store.history("recommender")[-1].actor == f"cli:{getpass.getuser()}@{socket.gethostname()}"
    monkeypatch.setenv("CANARY_ROUTER_ACTOR", "deploy-bot")
    assert invoke(Environment(store=store), "promote", "recommender", "--config", str(config), "-y").exit_code == 0
    assert store.history("recommender")[-1].actor == "cli:deploy-bot"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["promote", "nope", "-y"], 4, "unknown rollout 'nope' (known: checkout, recommender)"),
        (["status", "recommender", "recomender"], 4, "unknown rollout 'recomender'; did you mean 'recommender'?"),
        (["promote", "recommender", "-y", "--if-version", "7"], 6, "is at version 1, not 7"),
        (["set", "recommender", "abc", "-y"], 2, "expected a percentage from 0 to 100"),
        (["set", "recommender", "12.345", "-y"], 2, "resolution of 0.01"),
        (["set", "recommender", "101", "-y"], 2, "expected a percentage from 0 to 100"),
        (["status", "--frobnicate"], 2, "No such option"),
        (["cohort", "-r", "recommender", "--at-step", "6"], 2, "rollout 'recommender' has 5 steps, got 6"),
        (["cohort", "-r", "recommender", "--at-step", "1", "--at-percent", "5"], 2, "exclude each other"),
    ],
)
def test_user_mistakes_are_one_line_and_a_documented_exit_code(
    config: Path, args: list[str], code: int, message: str
) -> None:
    """Unknown rollouts (4), stale versions (6), bad values (2): one line on stderr, never a traceback."""
    result = invoke(Environment(store=MemoryStore()), *args, "--config", str(config), stdin="")
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("canary-router: error: ")
    assert result.stderr.count("\n") == 1
    assert message in result.stderr


def test_a_transition_not_allowed_exits_5(config: Path) -> None:
    """Promoting a rolled-back rollout is refused before any prompt: exit 5, state unchanged."""
    store = MemoryStore()
    env = Environment(store=store)
    assert invoke(env, "rollback", "recommender", "--config", str(config), "-y").exit_code == 0
    for command in ("promote", "pause", "resume"):
        result = invoke(env, command, "recommender", "--config", str(config))
        assert result.exit_code == 5, result.output
        assert f"rollout 'recommender' is rolled back: nothing to {command}" in result.stderr
    assert len(store.history("recommender")) == 2


class DownStore(MemoryStore):
    """A store whose backend stopped answering (every read fails as a dropped connection does)."""

    def get(self, name: str):  # type: ignore[no-untyped-def]
        raise ConnectionRefusedError(111, "Connection refused")


def test_a_store_that_does_not_answer_exits_7(config: Path) -> None:
    """When the store cannot be read, status says so in one line and exits 7."""
    result = invoke(Environment(store=DownStore()), "status", "--config", str(config))
    assert result.exit_code == 7, result.output
    assert result.stderr == (
        "canary-router: error: cannot read the state of rollout 'recommender': [Errno 111] Connection refused\n"
    )
    assert StoreError.__name__ not in result.stderr


def test_a_bad_store_url_is_a_usage_error(config: Path) -> None:
    """--store with an unknown scheme is exit 2, and a password in the URL is never printed."""
    result = invoke(Environment(), "status", "--config", str(config), "--store", "mongodb://u:hunter2@db/x")
    assert result.exit_code == 2
    assert "--store: expected a URL starting with memory://, sqlite:/// or redis://" in result.stderr
    assert "hunter2" not in result.stderr
    assert "u:***@db" in result.stderr


def test_configuration_problems_exit_1_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An invalid configuration is exit 1 with its first problem; no configuration at all is a usage error."""
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD)
    result = invoke(Environment(), "status", "--config", str(bad))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"canary-router: error: {bad}: rollouts.recommender.stikiness: unknown key")
    assert result.stderr.rstrip().endswith(f"(and 2 more: canary-router validate {bad} lists them)")
    assert result.stderr.count("\n") == 1
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CANARY_ROUTER_CONFIG", raising=False)
    result = invoke(Environment(), "status")
    assert result.exit_code == 2
    assert "no configuration: pass --config PATH or set $CANARY_ROUTER_CONFIG" in result.stderr


def _traffic(router: Router, clock: Clock) -> None:
    """Serve 4000 users through the decorator; the new version fails for one user in eight."""

    def old(user_id: str) -> str:
        return "old"

    @router.canary("recommender", old=old, context_from="user_id")
    def new(user_id: str) -> str:
        if bucket("x", user_id) % 8 == 0:
            raise RuntimeError("boom")
        return "new"

    for i in range(4000):
        with contextlib.suppress(RuntimeError):
            new(f"user-{i}")
    clock.now += 120


def test_status_shows_each_variants_numbers_and_the_verdict_with_its_bounds(config: Path) -> None:
    """The status --json output carries the router's observations and verdict: counts, p95, checks, bounds."""
    clock = Clock()
    with Router.from_file(config, store=MemoryStore(), clock=clock, telemetry=None) as router:
        router.set_percent("recommender", 50, actor="test")
        _traffic(router, clock)
        observed = router.observations("recommender")
        verdict = router.verdict("recommender")
        assert observed is not None

        result = invoke(Environment(router=router), "status", "recommender", "--json")

        assert result.exit_code == 0, result.output
        (data,) = json.loads(result.stdout)
        assert data["rollout"] == "recommender"
        assert (data["phase"], data["percent"], data["step"], data["version"]) == ("running", 50.0, 4, 2)
        for name, snap in (("old", observed.old), ("new", observed.new)):
            assert data["variants"][name] == {
                "requests": snap.requests,
                "errors": snap.errors,
                "error_rate": snap.error_rate,
                "p95": snap.percentile(95),
            }
        assert data["variants"]["new"]["errors"] > 0 == data["variants"]["old"]["errors"]
        assert data["verdict"]["outcome"] == verdict.outcome.value == "fail"
        error_rate = next(c for c in data["verdict"]["checks"] if c["name"] == "error_rate")
        low, high = error_rate["numbers"]["difference_bounds"]
        assert 0 < low < high
        assert data["last_change"]["actor"] == "test"

        text = invoke(Environment(router=router), "status")
        assert text.exit_code == 0
        lines = text.stdout.splitlines()
        assert lines[0].split() == [
            "rollout", "phase", "percent", "step", "variant", "requests", "errors", "error", "rate", "p95", "verdict"
        ]  # fmt: skip
        assert lines[1].split()[:7] == ["recommender", "running", "50", "%", "4/5", "old", f"{observed.old.requests:,}"]
        assert lines[1].split()[-1] == "fail"
        assert "recommender: running at 50 % (step 4 of 5) for 2 min, version 2" in text.stdout
        assert "error_rate    fail" in text.stdout
        assert "exceeds the tolerance (1 pp)" in " ".join(text.stdout.split())  # folded at 80 columns


def test_history_lists_transitions_oldest_first_with_actor_and_reason(config: Path) -> None:
    """The history command merges every rollout's audit log by time; --limit keeps the newest; --json is the records."""
    store = MemoryStore()
    clock = Clock()
    env = Environment(store=store, clock=clock)
    for args in (["promote", "recommender"], ["pause", "checkout"], ["rollback", "recommender"]):
        clock.now += 60
        assert invoke(env, *args, "--config", str(config), "-y", "--actor", "carol", "--reason", "r").exit_code == 0
    result = invoke(env, "history", "--config", str(config), "--json", "--limit", "3")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [(r["rollout"], r["action"], r["actor"]) for r in records] == [
        ("recommender", "promote", "cli:carol"),
        ("checkout", "pause", "cli:carol"),
        ("recommender", "rollback", "cli:carol"),
    ]
    assert set(records[0]) == {
        "time", "rollout", "actor", "action", "from_phase", "to_phase", "from_percent", "to_percent", "reason",
        "details", "version",
    }  # fmt: skip
    text = invoke(env, "history", "recommender", "--config", str(config))
    lines = text.stdout.splitlines()
    assert lines[0].split()[:4] == ["time", "(UTC)", "rollout", "version"]
    assert lines[1].split()[:5] == ["2027-01-15T08:01:00Z", "recommender", "1", "router", "start"]
    assert lines[3].split()[:6] == ["2027-01-15T08:03:00Z", "recommender", "3", "cli:carol", "rollback", "running"]
    assert len(lines) == 4


def test_watch_refreshes_the_given_number_of_times(config: Path) -> None:
    """The watch command with --iterations N prints N screens (off a terminal) or N JSON lines, then exits 0."""
    env = Environment(store=MemoryStore())
    result = invoke(env, "watch", "--config", str(config), "--iterations", "2", "--interval", "0.05")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("recommender: running at 5 % (step 1 of 5)") == 2
    result = invoke(
        env, "watch", "checkout", "--config", str(config), "--iterations", "3", "--interval", "0.05", "--json"
    )
    assert [[r["rollout"] for r in json.loads(line)] for line in result.stdout.splitlines()] == [["checkout"]] * 3


# ---------------------------------------------------------------------- cohort


def _cohort(env: Environment, config: Path, ids: str, *args: str) -> list[dict[str, str]]:
    result = invoke(env, "cohort", "--config", str(config), *args, stdin=ids)
    assert result.exit_code == 0, result.output
    return list(csv.DictReader(io.StringIO(result.stdout)))


def _expected(router: Router, name: str, contexts: list[dict[str, object]], unit_of: str) -> list[dict[str, str]]:
    rows = []
    for context in contexts:
        decision = router.decide(name, context)
        unit = context.get(unit_of)
        rows.append(
            {
                "id": "" if unit is None else str(unit),
                "variant": decision.variant,
                "bucket": "" if unit is None else str(bucket(name, str(unit))),
                "reason": str(decision.reason),
            }
        )
    return rows


IDS = [f"user-{i}" for i in range(3000)]


def test_cohort_agrees_with_decide_in_every_state(config: Path) -> None:
    """For 3000 ids the cohort is router.decide and canary_router.bucket: running, paused, rolled back, completed."""
    store = MemoryStore()
    env = Environment(store=store)
    text = "\n".join(IDS) + "\n"
    with Router.from_file(config, store=store, telemetry=None) as app:
        contexts: list[dict[str, object]] = [{"user_id": u} for u in IDS]
        for change in (["set", "recommender", "37.5"], ["pause", "recommender"], ["rollback", "recommender"]):
            assert invoke(env, *change, "--config", str(config), "-y").exit_code == 0
            rows = _cohort(env, config, text, "--rollout", "recommender")
            assert rows == _expected(app, "recommender", contexts, "user_id")
        app.set_percent("recommender", 100)
        app.promote("recommender")
        assert app.status("recommender").phase is Phase.COMPLETED
        rows = _cohort(env, config, text, "--rollout", "recommender")
        assert rows == _expected(app, "recommender", contexts, "user_id")
        assert {r["reason"] for r in rows} == {"completed"}
    new = _cohort(env, config, text, "--rollout", "recommender", "--variant", "new")
    assert len(new) == 3000


def test_cohort_at_a_step_is_the_cohort_the_rollout_will_have_there(config: Path) -> None:
    """--at-step N and --at-percent P answer as the router will once it runs there, whatever its state now."""
    store = MemoryStore()
    env = Environment(store=store)
    text = "\n".join(IDS)
    assert invoke(env, "rollback", "recommender", "--config", str(config), "-y").exit_code == 0
    with Router.from_file(config, store=MemoryStore(), telemetry=None) as later:
        contexts: list[dict[str, object]] = [{"user_id": u} for u in IDS]
        later.set_percent("recommender", 25)
        assert _cohort(env, config, text, "-r", "recommender", "--at-step", "3") == _expected(
            later, "recommender", contexts, "user_id"
        )
        later.set_percent("recommender", 12.34)
        at = _cohort(env, config, text, "-r", "recommender", "--at-percent", "12.34")
        assert at == _expected(later, "recommender", contexts, "user_id")
        share = sum(r["variant"] == "new" for r in at) / len(at)
        assert 0.10 < share < 0.15
        assert all((r["variant"] == "new") == (int(r["bucket"]) < 1234) for r in at)
    assert store.get("recommender").state.phase is Phase.ROLLED_BACK  # type: ignore[union-attr]


def test_cohort_with_attributes_applies_the_rules(config: Path) -> None:
    """With --attributes each line is a context: rules match, stickiness falls back, units without id get no_unit."""
    contexts: list[dict[str, object]] = []
    for i in range(1500):
        context: dict[str, object] = {"user_id": f"user-{i}"}
        if i % 3 == 0:
            context["account_id"] = f"acct-{i % 97}"
        if i % 5 == 0:
            context["region"] = "eu-west-1"
        if i % 11 == 0:
            context["email"] = f"u{i}@example.com"
        contexts.append(context)
    contexts += [{"account_id": "vip-1", "email": "boss@example.com"}, {"region": "eu-west-1"}, {"account_id": 7}]
    text = "\n".join(json.dumps(c) for c in contexts)
    store = MemoryStore()
    with Router.from_file(config, store=store, telemetry=None) as app:
        app.set_percent("checkout", 10)
        rows = _cohort(Environment(store=store), config, text, "-r", "checkout", "--attributes")
        expected = []
        for context in contexts:
            decision = app.decide("checkout", context)
            unit = context.get("account_id", context.get("user_id"))
            expected.append(
                {
                    "id": "" if unit is None else str(unit),
                    "variant": decision.variant,
                    "bucket": "" if unit is None else str(bucket("checkout", str(unit))),
                    "reason": str(decision.reason),
                }
            )
        assert rows == expected
    reasons = {r["reason"] for r in rows}
    assert {"rule_match", "rule_split", "split", "no_unit"} <= reasons
    assert (rows[-3]["variant"], rows[-3]["reason"]) == ("new", "rule_match")  # the first matching rule wins
    assert rows[-1] == {"id": "7", "variant": "old", "bucket": str(bucket("checkout", "7")), "reason": "split"}


def test_cohort_json_and_input_errors(config: Path, tmp_path: Path) -> None:
    """--json prints an array of {id, variant, bucket, reason}; ids come from a file; a bad line is exit 1."""
    ids = tmp_path / "ids.txt"
    ids.write_text("user-42\n\n  user-7  \n")
    result = invoke(
        Environment(store=MemoryStore()), "cohort", str(ids), "-r", "recommender", "--config", str(config), "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [  # at 5 % only buckets below 500 get the new version
        {"id": "user-42", "variant": "old", "bucket": bucket("recommender", "user-42"), "reason": "split"},
        {"id": "user-7", "variant": "old", "bucket": bucket("recommender", "user-7"), "reason": "split"},
    ]
    result = invoke(
        Environment(store=MemoryStore()), "cohort", "-r", "recommender", "--config", str(config), "--json", stdin=""
    )
    assert json.loads(result.stdout) == []
    result = invoke(
        Environment(store=MemoryStore()), "cohort", "-r", "checkout", "--attributes", "--config", str(config),
        stdin='{"user_id": "a"}\n["user_id", "b"]\n',
    )  # fmt: skip
    assert result.exit_code == 1
    assert "<stdin>:2: expected a JSON object of attributes, got list" in result.stderr


# ---------------------------------------------------------------------- the installed entry point


def test_the_installed_command_reads_config_and_store_from_the_environment(tmp_path: Path) -> None:
    """canary-router finds canary.toml in the working directory and warns that memory:// is not shared."""
    (tmp_path / "canary.toml").write_text(OPERATED)
    exe = shutil.which("canary-router", path=str(Path(sys.executable).parent))
    assert exe is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANARY_ROUTER_")}
    result = subprocess.run(
        [exe, "status", "--json"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert [r["rollout"] for r in json.loads(result.stdout)] == ["recommender", "checkout"]
    assert result.stderr.startswith("canary-router: warning: the store is memory://, which only this process sees")
    env["CANARY_ROUTER_STORE"] = "nope://"
    result = subprocess.run(
        [exe, "promote", "checkout", "-y"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("canary-router: error: $CANARY_ROUTER_STORE: expected a URL")
    assert "Traceback" not in result.stderr


def test_a_closed_pipe_ends_the_output_quietly(config: Path) -> None:
    """canary-router cohort ... | head: when the reader goes away, no traceback is printed."""
    exe = shutil.which("canary-router", path=str(Path(sys.executable).parent))
    assert exe is not None
    ids = "\n".join(f"user-{i}" for i in range(200_000))
    command = f"'{exe}' cohort -r recommender --at-step 1 --config '{config}' | head -n 2"
    result = subprocess.run(["sh", "-c", command], input=ids, capture_output=True, text=True, timeout=120, check=False)
    assert result.stdout.splitlines()[0] == "id,variant,bucket,reason"
    assert "Traceback" not in result.stderr
    assert "BrokenPipe" not in result.stderr


def _on_a_terminal(args: list[str], answer: bytes, cwd: Path) -> tuple[int, str]:
    """Run the installed command with a pseudo-terminal as stdin and stderr; type ``answer`` at the prompt."""
    exe = shutil.which("canary-router", path=str(Path(sys.executable).parent))
    assert exe is not None
    leader, follower = pty.openpty()
    process = subprocess.Popen([exe, *args], stdin=follower, stdout=subprocess.PIPE, stderr=follower, cwd=cwd)
    os.close(follower)
    seen = b""
    try:
        while b"[y/N]" not in seen:
            ready, _, _ = select.select([leader], [], [], 30)
            assert ready, f"no prompt: {seen!r}"
            seen += os.read(leader, 1024)
        os.write(leader, answer)
        out, _ = process.communicate(timeout=60)
        while select.select([leader], [], [], 0.5)[0]:
            try:
                chunk = os.read(leader, 1024)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
    return process.returncode, seen.decode() + out.decode()


def test_on_a_terminal_a_change_asks_first(config: Path) -> None:
    """On a terminal, promote asks "[y/N]": "y" applies it, anything else exits 1 with nothing changed."""
    code, text = _on_a_terminal(["promote", "recommender", "--config", str(config)], b"y\n", config.parent)
    assert code == 0, text
    assert "promote recommender: running at 5 % (step 1 of 5) → running at 10 % (step 2 of 5)? [y/N]" in text
    assert "(version 2, by cli:" in text
    code, text = _on_a_terminal(["rollback", "checkout", "--config", str(config)], b"n\n", config.parent)
    assert code == 1, text
    assert "not confirmed: nothing was changed" in text


@pytest.mark.parametrize("command", ["status", "watch", "history", "promote", "set", "cohort", "dashboard", "restart"])
def test_every_command_has_help(command: str) -> None:
    """--help describes each command (the dashboard is only checked this far here)."""
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert f"Usage: canary-router {command}" in result.stdout


# ---------------------------------------------------------------------- stores that land as modules


def test_two_processes_share_state_through_sqlite(config: Path, tmp_path: Path) -> None:
    """With --store sqlite:///..., a change made by one canary-router process is seen by the next."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    first = run("promote", "recommender", "--config", str(config), "--store", url, "-y", "--actor", "dave")
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    second = run("status", "recommender", "--config", str(config), "--store", url, "--json")
    (data,) = json.loads(second.stdout)
    assert (data["percent"], data["last_change"]["actor"]) == (10.0, "cli:dave")


def test_an_unreachable_redis_exits_7(config: Path) -> None:
    """--store redis://... with nothing listening is one line and exit 7."""
    result = run("status", "--config", str(config), "--store", "redis://127.0.0.1:1/0")
    assert result.returncode == 7, result.stderr
    assert result.stderr.startswith("canary-router: error: ")
    assert "Traceback" not in result.stderr


def test_a_store_whose_extra_is_not_installed_exits_3(config: Path) -> None:
    """A redis:// store without the redis package is exit 3, naming the extra to install."""
    code = (
        "import sys; sys.modules['redis'] = None\n"  # as if the redis extra were not installed
        "from canary_router.cli import main\n"
        f"main(['status', '--config', {str(config)!r}, '--store', 'redis://127.0.0.1:6379/0'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 3, result.stderr
    assert "pip install 'canary-router[redis]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_cohort_at_the_first_step_of_a_shadow_rollout_serves_the_new_version(tmp_path: Path) -> None:
    """In the shadow step everyone is served old (reason shadow); --at-step 1 answers for the first served step."""
    path = tmp_path / "canary.toml"
    path.write_text("[rollouts.search]\nsteps = [20, 100]\nshadow = true\n")
    text = "\n".join(IDS[:500])
    now = _cohort(Environment(store=MemoryStore()), path, text, "-r", "search")
    assert {r["variant"] for r in now} == {"old"}
    assert {r["reason"] for r in now} == {"shadow", "split"}
    first = _cohort(Environment(store=MemoryStore()), path, text, "-r", "search", "--at-step", "1")
    assert [r["variant"] == "new" for r in first] == [int(r["bucket"]) < 2000 for r in first]
    assert {r["reason"] for r in first} == {"split"}


def test_watch_on_a_terminal_redraws_in_place(config: Path) -> None:
    """On a terminal, watch draws a live screen (cursor hidden while it runs, restored at the end)."""
    exe = shutil.which("canary-router", path=str(Path(sys.executable).parent))
    assert exe is not None
    leader, follower = pty.openpty()
    args = [exe, "watch", "--iterations", "3", "--interval", "0.05", "--config", str(config), "--store", "memory://"]
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    process = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    seen = b""
    try:
        while True:
            if not select.select([leader], [], [], 30)[0]:
                break
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the command ended
                break
            if not chunk:
                break
            seen += chunk
        assert process.wait(timeout=60) == 0, seen
    finally:
        os.close(leader)
    text = seen.decode()
    assert "\x1b[?25l" in text  # cursor hidden: a live display, not lines printed one after another
    assert "\x1b[?25h" in text
    assert "recommender" in text
    assert "Traceback" not in text


def test_a_lent_store_keeps_its_kind_and_stays_open() -> None:
    """The wrapper that keeps a lent store open is a SharedStore exactly when the lent store is one."""
    from canary_router.cli import _lend
    from canary_router.stores import SharedStore, Store

    class PlainStore(MemoryStore):
        """Only the Store part: no observation totals, no leases."""

        add_observations = observations = observation_history = acquire_lease = release_lease = ping = None

    shared = MemoryStore()
    seen: list[str] = []
    shared.subscribe(lambda name, versioned: seen.append(name))
    lent = _lend(shared)
    assert isinstance(lent, SharedStore)
    lent.close()
    with Router({"r": {"steps": [5, 100]}}, store=shared, telemetry=None):
        pass
    assert seen == ["r"]  # closing the wrapper left the store's subscribers in place
    plain = _lend(PlainStore())
    assert isinstance(plain, Store)
    assert not isinstance(plain, SharedStore)


def test_the_store_is_the_option_then_the_configuration_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--store wins; without it the configuration's [store] url, as Router.from_config does; then the variable."""
    path = tmp_path / "canary.toml"
    path.write_text(OPERATED + '\n[store]\nurl = "redis://127.0.0.1:1/0"\n')
    monkeypatch.setenv("CANARY_ROUTER_STORE", "memory://")
    result = invoke(Environment(), "status", "--config", str(path), "--json")
    assert result.exit_code in (3, 7), result.output  # the configured redis: not installed, or not answering
    assert "redis://127.0.0.1:1/0" in result.stderr or "error: [store] url: " in result.stderr
    result = invoke(Environment(), "status", "--config", str(path), "--json", "--store", "memory://")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_status_sums_the_observations_of_every_router_sharing_the_store(config: Path) -> None:
    """Two application routers share counts through the store; status, on a router of its own, shows their sum."""
    store = MemoryStore()
    clock = Clock()
    apps = [
        Router.from_file(config, store=store, clock=clock, telemetry=None, share_observations=True) for _ in range(2)
    ]
    try:
        apps[0].set_percent("recommender", 50, actor="test")
        for app in apps:
            _traffic(app, clock)
            app.flush()
        totals = store.observations("recommender", apps[0].status("recommender").epoch)
        assert totals is not None
        assert totals.old.requests + totals.new.requests == 8000

        result = invoke(
            Environment(store=store, clock=clock), "status", "recommender", "--json", "--config", str(config)
        )

        assert result.exit_code == 0, result.output
        (data,) = json.loads(result.stdout)
        assert data["variants"]["old"]["requests"] == totals.old.requests
        assert data["variants"]["new"]["requests"] == totals.new.requests
        assert data["variants"]["new"]["errors"] == totals.new.errors > 0
        assert data["verdict"]["outcome"] == "fail"
    finally:
        for app in apps:
            app.close()
