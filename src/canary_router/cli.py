"""The ``canary-router`` command line (extra ``cli``: click for parsing, rich for tables and progress).

Exit codes: 0 success; 1 the check failed (invalid config, a demo invariant broken); 2 usage error;
3 a needed extra is not installed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click
from rich.console import Console

from . import __version__
from .bucketing import bucket
from .config import load_file
from .errors import CanaryError, ConfigError

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="canary-router")
def cli() -> None:
    """Canary deployments inside your application: bucket users, route code paths, roll out safely."""


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def validate(files: Sequence[str], as_json: bool) -> None:
    """Validate config FILES (TOML, YAML or JSON); print every problem, exit 1 if any."""
    console = Console(highlight=False, soft_wrap=True)
    results: list[dict[str, Any]] = []
    failed = False
    for file in files:
        try:
            config = load_file(file)
        except ConfigError as exc:
            failed = True
            results.append(
                {
                    "file": file,
                    "ok": False,
                    "errors": [{"path": i.path, "message": i.message, "hint": i.hint} for i in exc.issues],
                }
            )
            if not as_json:
                noun = "problem" if len(exc.issues) == 1 else "problems"
                console.print(f"[bold red]✗ {file}[/]: {len(exc.issues)} {noun}")
                for issue in exc.issues:
                    console.print(f"  {issue}", markup=False)
            continue
        names = list(config.rollouts)
        results.append({"file": file, "ok": True, "rollouts": names, "segments": list(config.segments)})
        if not as_json:
            listing = ", ".join(names) or "none"
            console.print(f"[bold green]✓ {file}[/]: {len(names)} rollout(s): {listing}")
    if as_json:
        click.echo(json.dumps(results, indent=2))
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


@cli.command("import-unleash")
@click.argument("export", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--environment", default=None, help="The Unleash environment to import (needed when there are several).")
@click.option("--feature", "features", multiple=True, help="Import only this feature (repeat for several).")
@click.option("--output", "-o", default="-", show_default=True, help="Write the config to this file ('-': stdout).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["toml", "json"]),
    default=None,
    help="Output format (default: from the output file's suffix, else toml).",
)
def import_unleash(export: str, environment: str | None, features: Sequence[str], output: str, fmt: str | None) -> None:
    """Turn an Unleash feature export (JSON) into canary_router config, keeping every user in the same cohort.

    Each rollout starts paused at the Unleash percentage, with the same salt (groupId) and stickiness, so
    every user keeps the version Unleash gave them. What cannot be carried over exactly is printed on
    stderr as a warning; the config is validated before it is written.
    """
    from pathlib import Path

    from .config import load_config
    from .unleash import convert, load_export, to_toml

    def fail(message: str) -> NoReturn:
        click.echo(f"canary-router: import-unleash: {message}", err=True)
        sys.exit(EXIT_FAILED)

    try:
        text = sys.stdin.read() if export == "-" else Path(export).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {export}: {getattr(exc, 'strerror', None) or exc}")
    try:
        conversion = convert(load_export(text, source=export), environment=environment, features=list(features) or None)
        fmt = fmt or ("json" if output.lower().endswith(".json") else "toml")
        if fmt == "json":
            rendered = json.dumps(conversion.config, indent=2, ensure_ascii=False) + "\n"
            load_config(json.loads(rendered))
        else:
            import tomllib

            rendered = to_toml(conversion.config)
            load_config(tomllib.loads(rendered))
    except ConfigError as exc:
        fail(str(exc))
    for warning in conversion.warnings:
        click.echo(f"warning: {warning}", err=True)
    count = len(conversion.config["rollouts"])
    if output == "-":
        click.echo(rendered, nl=False)
    else:
        try:
            Path(output).write_text(rendered, encoding="utf-8")
        except OSError as exc:
            fail(f"cannot write {output}: {exc.strerror or exc}")
        click.echo(f"wrote {count} rollout(s) to {output}", err=True)


@cli.command("bucket")
@click.argument("salt")
@click.argument("unit_ids", nargs=-1, required=True)
def bucket_command(salt: str, unit_ids: Sequence[str]) -> None:
    """Print the v1 bucket (0..9999) of each UNIT_ID under SALT (the rollout name by default)."""
    for unit in unit_ids:
        click.echo(f"{unit}\t{bucket(salt, unit)}")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.05, 3600), help="Seconds per tick.")
@click.option(
    "--ticks", default=0, type=click.IntRange(0), help="Stop after this many ticks (0: run until interrupted)."
)
@click.option("--json", "as_json", is_flag=True, help="Print each action as a JSON line.")
def controller(config: str, interval: float, ticks: int, as_json: bool) -> None:
    """Run the controller for the rollouts of CONFIG: promote, pause or roll back as the guard says.

    It acts on the state and observations of the store the router uses; the in-memory store only
    sees this process, so run it next to your application with a shared store, or use
    ``router.start_controller()`` inside the application.
    """
    import time as _time

    from .router import Router

    router = Router.from_file(config)
    ctl = router.controller()
    console = Console(highlight=False, soft_wrap=True)
    done = 0
    try:
        while ticks == 0 or done < ticks:
            for action in ctl.tick():
                if as_json:
                    click.echo(
                        json.dumps({"rollout": action.rollout, "action": action.action, "reason": action.reason})
                    )
                elif action.action != "wait":
                    console.print(f"[bold]{action.rollout}[/]: {action.action} — {action.reason}")
            done += 1
            if ticks == 0 or done < ticks:
                _time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        router.close()


@cli.command()
@click.option(
    "--scenario",
    type=click.Choice(["healthy", "faulty"]),
    default="healthy",
    show_default=True,
    help="healthy: the new version is as good as the old; faulty: it fails 3 % of requests in eu-west-1.",
)
@click.option(
    "--users", default=20_000, show_default=True, type=click.IntRange(100, 5_000_000), help="Simulated users."
)
@click.option("--seed", default=7, show_default=True, type=int, help="Seed of the simulated traffic.")
@click.option("--rps", default=100, show_default=True, type=click.IntRange(10, 10_000), help="Simulated requests/s.")
def demo(scenario: str, users: int, seed: int, rps: int) -> None:
    """Run an automated rollout on simulated traffic: expand while healthy, roll back when not.

    Everything is real but the traffic and the clock: a Router with an embedded configuration (rollout
    "recommender", steps 5 → 10 → 25 → 50 → 100 %, bake time 5 min, eu-west-1 expanding at 50 %), a
    decorated function per version, the guard and the controller, on an in-memory store with a compressed
    clock (one simulated hour takes a few seconds).
    """
    from .demo import run_demo

    console = Console(highlight=False, soft_wrap=True)
    sys.exit(run_demo(scenario=scenario, users=users, seed=seed, rps=rps, console=console))


@cli.command("override-token")
@click.option("--rollout", required=True, help="The rollout the token applies to (it grants nothing elsewhere).")
@click.option("--variant", required=True, help="The variant the holder is served: new or old.")
@click.option("--ttl", required=True, help="How long the token is valid: 7d, 12h, 1h30m, ... (or seconds).")
@click.option(
    "--secret",
    default=None,
    help="The signing secret, at least 16 bytes (default: $CANARY_ROUTER_SECRET, which is safer: a command "
    "line is visible to other users of the host and stays in the shell's history).",
)
def override_token(rollout: str, variant: str, ttl: str, secret: str | None) -> None:
    """Print a signed tester override token: its holder gets VARIANT of ROLLOUT until it expires.

    Only the token is printed, so it can be piped or captured. Send it in the X-Canary-Override header or
    the canary_override query parameter; the middleware checks it with the same secret and keeps it in a
    cookie until it expires.
    """
    import re

    from .config import _NAME, parse_duration
    from .overrides import SECRET_ENV, create_token, resolve_secret

    def fail(message: str) -> NoReturn:
        click.echo(f"canary-router: override-token: {message}", err=True)
        sys.exit(EXIT_FAILED)

    if not _NAME.fullmatch(rollout):
        fail(f"--rollout: expected a rollout name of letters, digits, '_', '.' or '-', got {rollout!r}")
    if variant not in ("old", "new"):
        fail(f"--variant: expected 'new' or 'old', got {variant!r}")
    try:
        seconds = parse_duration(float(ttl) if re.fullmatch(r"\d+(?:\.\d+)?", ttl) else ttl)
    except ValueError as exc:
        fail(f"--ttl: {exc}")
    if seconds <= 0:
        fail(f"--ttl: expected a positive duration, got {ttl!r}")
    try:
        key = resolve_secret(secret)
    except ValueError as exc:  # too short to be safe
        fail(str(exc))
    if key is None:
        fail(f"no signing secret: pass --secret or set ${SECRET_ENV}")
    click.echo(create_token(key, rollout=rollout, variant="new" if variant == "new" else "old", ttl=seconds))


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI; library errors become one clear line on stderr (exit 1), never a traceback."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="canary-router", standalone_mode=True)
    except CanaryError as exc:
        click.echo(f"canary-router: {exc}", err=True)
        sys.exit(EXIT_FAILED)
