"""The ``canary-router`` command line (extra ``cli``: click for parsing, rich for tables and live views).

Every command that reads or changes rollouts builds a :class:`~canary_router.Router` from the
configuration (``--config``, ``$CANARY_ROUTER_CONFIG``, or ``canary.toml`` in the working directory) on the
store that ``--store`` names (``$CANARY_ROUTER_STORE``, else ``memory://``), opened with
:func:`~canary_router.stores.open_store`. Code that embeds the CLI, and tests, pass an :class:`Environment`
as click's ``obj`` to lend a router or a store instead.

Exit codes (docs/reference/cli.md): 0 success; 1 failure (an invalid configuration or input, a failed
check, a change not confirmed); 2 usage error; 3 an optional dependency is missing; 4 unknown rollout;
5 transition not allowed; 6 conflict (the rollout changed meanwhile; nothing was applied); 7 store
unreachable. Errors are one line on stderr, ``canary-router: error: ...``, never a traceback.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import getpass
import importlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from ._cli_output import (
    RolloutView,
    change_dict,
    history_table,
    jsonable,
    status_details,
    status_dict,
    status_table,
    where,
)
from .bucketing import bucket
from .config import Config, load_file
from .errors import (
    CanaryError,
    ConfigError,
    ConflictError,
    StoreError,
    TransitionError,
    UnknownRolloutError,
)
from .model import AuditRecord, Phase, Rollout, RolloutState, RolloutStatus
from .observe import HistorySlot, StepSnapshot
from .router import Router
from .stores import ENV_VAR as STORE_ENV
from .stores import MemoryStore, Store, open_store
from .stores.base import Lease, ObservationBatch, SharedStore, Versioned

__all__ = ["CliError", "Environment", "cli", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
"""A check failed: an invalid configuration or input, a demo invariant broken, a change not confirmed."""
EXIT_USAGE = 2
"""A usage error: an unknown command or option, a bad option value, a change without --yes off a terminal."""
EXIT_MISSING = 3
"""An optional dependency (an extra, a store module) is not installed."""
EXIT_UNKNOWN_ROLLOUT = 4
"""The configuration has no rollout of that name."""
EXIT_TRANSITION = 5
"""The change is not allowed in the rollout's current phase."""
EXIT_CONFLICT = 6
"""The rollout changed since it was read (or is not at ``--if-version``): nothing was applied."""
EXIT_STORE = 7
"""The store cannot be reached."""

CONFIG_ENV = "CANARY_ROUTER_CONFIG"
"""The environment variable naming the configuration file."""
ACTOR_ENV = "CANARY_ROUTER_ACTOR"
"""The environment variable naming who makes changes (recorded as ``cli:<name>``)."""
DEFAULT_CONFIG = "canary.toml"
"""The configuration file used when neither ``--config`` nor ``$CANARY_ROUTER_CONFIG`` names one."""


@dataclass
class Environment:
    """What the commands act on, for code that embeds the CLI and for tests: pass one as click's ``obj``.

    ``CliRunner().invoke(cli, ["status"], obj=Environment(store=store))`` runs ``status`` on ``store``
    (a store of your own, shared with your routers) instead of the one ``--store`` names; with
    ``router=`` the commands use that router itself and ``--config`` / ``--store`` are ignored (except by
    ``cohort --at-percent / --at-step``, which reads the configuration when there is one). A lent store
    or router is never closed by the command. ``clock`` is the clock of the routers the commands build.
    """

    router: Router | None = None
    store: Store | None = None
    clock: Callable[[], float] | None = None


class CliError(click.ClickException):
    """An error shown as one line on stderr, ``canary-router: error: MESSAGE``, with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = exit_code

    @property
    def exit_code(self) -> int:  # type: ignore[override]  # click's is a class attribute; each error has its own
        """The process exit code."""
        return self.code

    def show(self, file: IO[Any] | None = None) -> None:
        """Print the one line."""
        click.echo(f"canary-router: error: {self.format_message()}", err=True, file=file)


_LIBRARY_ERRORS: tuple[tuple[type[CanaryError], int], ...] = (
    (UnknownRolloutError, EXIT_UNKNOWN_ROLLOUT),
    (TransitionError, EXIT_TRANSITION),
    (ConflictError, EXIT_CONFLICT),
    (StoreError, EXIT_STORE),
)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


class _Group(click.Group):
    """The command group: library errors become exit codes, and every error is one line on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CanaryError as exc:
            code = next((code for kind, code in _LIBRARY_ERRORS if isinstance(exc, kind)), EXIT_FAILED)
            raise CliError(_one_line(str(exc)), code) from exc

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            message = _one_line(exc.format_message()).removesuffix(".")
            click.echo(f"canary-router: error: {message}{hint}", err=True)
            code = exc.exit_code
        except click.ClickException as exc:
            exc.show()
            code = exc.exit_code
        except click.Abort:
            click.echo("canary-router: aborted", err=True)
            code = EXIT_FAILED
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            _silence_stdout()  # the reader went away (`| head`): stop quietly
            code = EXIT_FAILED
        else:
            code = result if isinstance(result, int) else EXIT_OK
        sys.exit(code)


def _silence_stdout() -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


@click.group(
    name="canary-router", cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="canary-router")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Canary deployments inside your application: bucket users, route code paths, roll out safely.

    Commands that read or change rollouts take --config PATH ($CANARY_ROUTER_CONFIG, default
    canary.toml) and --store URL ($CANARY_ROUTER_STORE, default memory://, this process only).

    Exit codes: 0 ok; 1 failed (invalid configuration or input, check failed, not confirmed); 2 usage
    error; 3 optional dependency missing; 4 unknown rollout; 5 transition not allowed; 6 conflict (it
    changed meanwhile, nothing applied); 7 store unreachable.
    """
    ctx.ensure_object(Environment)


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _warn(message: str) -> None:
    click.echo(f"canary-router: warning: {message}", err=True)


# ---------------------------------------------------------------------- configuration, store, router


def _config_path(given: str | None, *, required: bool = True) -> str | None:
    """The configuration file: ``--config`` / ``$CANARY_ROUTER_CONFIG``, else ``canary.toml`` if present."""
    if given:
        return given
    if Path(DEFAULT_CONFIG).is_file():
        return DEFAULT_CONFIG
    if not required:
        return None
    raise CliError(
        f"no configuration: pass --config PATH or set ${CONFIG_ENV} ({DEFAULT_CONFIG} is not in the working directory)",
        EXIT_USAGE,
    )


def _load_config(path: str) -> Config:
    try:
        return load_file(path)
    except ConfigError as exc:
        first = exc.issues[0] if exc.issues else None
        text = str(first) if first is not None else str(exc)
        if not text.startswith(path):
            text = f"{path}: {text}"
        more = len(exc.issues) - 1
        if more > 0:
            text += f" (and {more} more: canary-router validate {path} lists them)"
        raise CliError(text, EXIT_FAILED) from None


def _redact(url: str) -> str:
    """The URL without its password, fit to print."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host += f":{parts.port}"
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<unparsable URL>"


class _Lent:
    """A store lent by the caller: every call passes through, except :meth:`close`."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def get(self, name: str) -> Versioned | None:
        """Pass through."""
        return self._store.get(name)

    def get_all(self) -> dict[str, Versioned]:
        """Pass through."""
        return self._store.get_all()

    def compare_and_set(self, name: str, expected_version: int | None, *args: Any, **kwargs: Any) -> int:
        """Pass through."""
        return self._store.compare_and_set(name, expected_version, *args, **kwargs)

    def history(self, name: str, limit: int | None = None) -> list[AuditRecord]:
        """Pass through."""
        return self._store.history(name, limit)

    def subscribe(self, callback: Callable[[str, Versioned], None]) -> Callable[[], None]:
        """Pass through."""
        return self._store.subscribe(callback)

    def close(self) -> None:
        """Leave the store open: it belongs to the caller."""


class _LentShared(_Lent):
    """A lent :class:`~canary_router.stores.SharedStore`: observation totals and leases pass through too."""

    def __init__(self, store: SharedStore) -> None:
        super().__init__(store)
        self._shared = store

    def add_observations(self, batch: ObservationBatch) -> None:
        """Pass through."""
        self._shared.add_observations(batch)

    def observations(self, rollout: str, epoch: int) -> StepSnapshot | None:
        """Pass through."""
        return self._shared.observations(rollout, epoch)

    def observation_history(self, rollout: str, since: float = 0.0) -> list[HistorySlot]:
        """Pass through."""
        return self._shared.observation_history(rollout, since)

    def acquire_lease(self, name: str, owner: str, ttl: float) -> Lease | None:
        """Pass through."""
        return self._shared.acquire_lease(name, owner, ttl)

    def release_lease(self, lease: Lease) -> None:
        """Pass through."""
        self._shared.release_lease(lease)

    def ping(self) -> None:
        """Pass through."""
        self._shared.ping()


def _lend(store: Store) -> Store:
    """Wrap a store lent by the caller so that the command's router cannot close it."""
    return _LentShared(store) if isinstance(store, SharedStore) else _Lent(store)


def _open_store(env: Environment, url: str | None, configured: str | None = None) -> Store:
    """Open the store (or lend ``env.store``); one clear error when it cannot be used.

    The URL is ``--store``, else the configuration's ``[store] url`` (``configured``), else
    ``$CANARY_ROUTER_STORE``, else ``memory://``: the order :meth:`Router.from_config` follows, with the
    command line first.
    """
    if env.store is not None:
        return _lend(env.store)
    resolved = url or configured or os.environ.get(STORE_ENV) or "memory://"
    label = "--store" if url else "[store] url" if configured else f"${STORE_ENV}"
    shown = _redact(resolved)
    scheme = urlsplit(resolved).scheme.lower() if "://" in resolved else ""
    try:
        store = open_store(resolved)
    except ConfigError as exc:
        message = exc.issues[0].message if exc.issues else str(exc)
        raise CliError(f"{label}: {message.replace(resolved, shown)}", EXIT_USAGE) from None
    except ModuleNotFoundError as exc:
        missing = exc.name or str(exc)
        if missing.startswith("canary_router"):
            message = f"{label}: this installation has no {scheme} store ({missing} is missing)"
            raise CliError(message, EXIT_MISSING) from None
        raise CliError(
            f"{label}: the {scheme} store needs {missing}, which is not installed: "
            f"pip install 'canary-router[{'redis' if scheme in ('redis', 'rediss', 'unix') else scheme}]'",
            EXIT_MISSING,
        ) from None
    except ValueError as exc:
        raise CliError(f"{label}: {exc}".replace(resolved, shown), EXIT_USAGE) from None
    except Exception as exc:
        raise CliError(f"cannot open the store {shown}: {exc}".replace(resolved, shown), EXIT_STORE) from None
    ping = getattr(store, "ping", None)
    if callable(ping):
        try:
            ping()
        except Exception as exc:
            with contextlib.suppress(Exception):
                store.close()
            raise CliError(f"the store {shown} does not answer: {exc}".replace(resolved, shown), EXIT_STORE) from None
    if isinstance(store, MemoryStore) and not (url or configured or os.environ.get(STORE_ENV)):  # by default
        _warn(
            f"the store is {shown}, which only this process sees: nothing is shared with your application "
            f"(pass --store URL or set ${STORE_ENV})"
        )
    return store


@contextlib.contextmanager
def _router(env: Environment, config: str | None, store_url: str | None) -> Iterator[Router]:
    """The router the command acts on: the lent one, or one built from the configuration on the store."""
    if env.router is not None:
        yield env.router
        return
    path = _config_path(config)
    assert path is not None  # noqa: S101  # required=True
    loaded = _load_config(path)
    store = _open_store(env, store_url, loaded.store_url)
    try:
        router = Router.from_config(loaded, store=store, clock=env.clock, telemetry=None)
    except BaseException:
        store.close()
        raise
    try:
        yield router
    finally:
        router.close()


def _router_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config`` and ``--store`` to a command."""
    func = click.option(
        "--store",
        "store_url",
        metavar="URL",
        help="The store holding rollout state: memory://, sqlite:///path/state.db, redis://host:6379/0?prefix=app "
        f"(default: the configuration's [store] url, else ${STORE_ENV}, else memory://, which only this process "
        "sees).",
    )(func)
    return click.option(
        "--config",
        "config",
        metavar="PATH",
        envvar=CONFIG_ENV,
        show_envvar=True,
        help=f"The configuration file (TOML, YAML or JSON; default: {DEFAULT_CONFIG} in the working directory).",
    )(func)


def _names(router: Router, given: Sequence[str]) -> list[str]:
    """The rollouts named (each must exist), or every rollout in configuration order."""
    known = router.rollouts
    for name in given:
        if name not in known:
            raise UnknownRolloutError(name, tuple(known))
    return list(dict.fromkeys(given)) if given else list(known)


# ---------------------------------------------------------------------- configuration files


@cli.command(short_help="Check configuration files and print every problem.")
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


@cli.command("import-unleash", short_help="Turn an Unleash feature export into configuration.")
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


@cli.command("bucket", short_help="Print the v1 bucket of unit ids under a salt.")
@click.argument("salt")
@click.argument("unit_ids", nargs=-1, required=True)
def bucket_command(salt: str, unit_ids: Sequence[str]) -> None:
    """Print the v1 bucket (0..9999) of each UNIT_ID under SALT (the rollout name by default)."""
    for unit in unit_ids:
        click.echo(f"{unit}\t{bucket(salt, unit)}")


# ---------------------------------------------------------------------- reading: status, watch, history


def _print_table(console: Console, table: Table) -> None:
    """Print ``table`` unsqueezed: off a terminal (a pipe, a log) it takes the width it needs, up to 200."""
    needed = min(console.measure(table, options=console.options.update_width(10_000)).maximum, 200)
    if console.is_terminal or needed <= console.width:
        console.print(table)
    else:
        Console(highlight=False, soft_wrap=True, width=needed, no_color=console.no_color).print(table)


def _print_status(console: Console, views: Sequence[RolloutView]) -> None:
    """Print the status table (never squeezed: off a terminal it takes the width it needs) and the details."""
    _print_table(console, status_table(views))
    console.print(status_details(views))


def _views(router: Router, names: Sequence[str]) -> list[RolloutView]:
    now = router.clock()
    return [
        RolloutView(router.status(name, history=1), router.observations(name), router.verdict(name), now)
        for name in names
    ]


@cli.command(short_help="Show every rollout: phase, step, numbers per variant, verdict.")
@click.argument("rollouts", nargs=-1, metavar="[ROLLOUT]...")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per rollout.")
@_router_options
@click.pass_obj
def status(env: Environment, rollouts: Sequence[str], as_json: bool, config: str | None, store_url: str | None) -> None:
    """Show every rollout (or the ROLLOUTs named): phase, step, percent, per-variant numbers and the verdict.

    Per variant: the current step's requests, errors, error rate and p95 latency; then, per rollout, the
    last change and the guard's verdict with each check and its confidence bounds.
    """
    with _router(env, config, store_url) as router:
        views = _views(router, _names(router, rollouts))
        if as_json:
            click.echo(json.dumps([status_dict(view) for view in views], indent=2))
        else:
            _print_status(_console(), views)


@cli.command(short_help="Show the status live.")
@click.argument("rollouts", nargs=-1, metavar="[ROLLOUT]...")
@click.option(
    "--interval", default=2.0, show_default=True, type=click.FloatRange(0.05, 3600), help="Seconds between refreshes."
)
@click.option(
    "--iterations", default=0, type=click.IntRange(0), help="Stop after this many refreshes (0: until interrupted)."
)
@click.option("--json", "as_json", is_flag=True, help="Print each refresh as one JSON line (the status array).")
@_router_options
@click.pass_obj
def watch(
    env: Environment,
    rollouts: Sequence[str],
    interval: float,
    iterations: int,
    as_json: bool,
    config: str | None,
    store_url: str | None,
) -> None:
    """Show the status live, refreshed every --interval seconds, until interrupted (Ctrl-C) or --iterations."""
    from rich.console import Group
    from rich.live import Live

    with _router(env, config, store_url) as router:
        names = _names(router, rollouts)
        console = _console()
        live = console.is_terminal and not as_json
        done = 0
        try:
            with Live(console=console, auto_refresh=False) if live else contextlib.nullcontext() as screen:
                while True:
                    views = _views(router, names)
                    if as_json:
                        click.echo(json.dumps([status_dict(view) for view in views]))
                    elif isinstance(screen, Live):
                        screen.update(Group(status_table(views), status_details(views)), refresh=True)
                    else:  # not a terminal: one screen after another, for logs
                        if done:
                            console.print()
                        _print_status(console, views)
                    done += 1
                    if iterations and done >= iterations:
                        break
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass


@cli.command(short_help="Show the audit log: who changed what, when, and why.")
@click.argument("rollouts", nargs=-1, metavar="[ROLLOUT]...")
@click.option(
    "--limit", default=20, show_default=True, type=click.IntRange(1), help="Show the newest this many transitions."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of audit records, oldest first.")
@_router_options
@click.pass_obj
def history(
    env: Environment, rollouts: Sequence[str], limit: int, as_json: bool, config: str | None, store_url: str | None
) -> None:
    """Show the audit log of every rollout (or the ROLLOUTs named): who changed what, when, and why."""
    with _router(env, config, store_url) as router:
        records: list[AuditRecord] = []
        for name in _names(router, rollouts):
            records.extend(router.status(name, history=limit).history)
        records.sort(key=lambda r: (r.time, r.version, r.rollout))
        records = records[-limit:]
        if as_json:
            click.echo(json.dumps([jsonable(record.to_dict()) for record in records], indent=2))
        else:
            _print_table(_console(), history_table(records))


# ---------------------------------------------------------------------- changing: promote, pause, ..., set


def _actor(given: str | None) -> str:
    """Who makes the change: ``--actor`` / ``$CANARY_ROUTER_ACTOR``, else ``user@host``; recorded as ``cli:...``."""
    name = (given or "").strip()
    if not name:
        try:
            user = getpass.getuser()
        except Exception:  # no login name (a container without a passwd entry)
            user = "unknown"
        name = f"{user}@{socket.gethostname() or 'localhost'}"
    return name if name.startswith("cli:") else f"cli:{name}"


def _confirm(yes: bool, question: str) -> None:
    """Ask ``question`` on the terminal unless ``--yes``; refuse (exit 2) when stdin is not a terminal."""
    if yes:
        return
    if sys.stdin is None or not sys.stdin.isatty():
        raise CliError(f"{question[:-1]}: this needs confirmation, but stdin is not a terminal: pass --yes", EXIT_USAGE)
    if not click.confirm(question, default=False, err=True):
        raise CliError("not confirmed: nothing was changed", EXIT_FAILED)


def _change_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options every state change takes."""
    for option in reversed(
        (
            click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation."),
            click.option("--reason", default="", help="Why: recorded in the audit log (a default says what was done)."),
            click.option(
                "--actor",
                metavar="NAME",
                envvar=ACTOR_ENV,
                show_envvar=True,
                help="Who makes the change, recorded as cli:NAME (default: $USER@hostname).",
            ),
            click.option(
                "--if-version",
                type=click.IntRange(1),
                metavar="N",
                help="Apply only if the rollout's state is still at version N (see status); else exit 6.",
            ),
            click.option("--json", "as_json", is_flag=True, help="Print the change as a JSON object."),
        )
    ):
        func = option(func)
    return _router_options(func)


def _change(
    env: Environment,
    action: str,
    name: str,
    *,
    target: Callable[[RolloutStatus], str | None],
    apply: Callable[[Router, str, str, int], RolloutStatus],
    options: Mapping[str, Any],
) -> None:
    """Read the rollout, say what will change, confirm, apply with compare-and-set, report.

    ``target(before)`` describes the state after the change, or returns ``None`` when there is nothing to
    do (raising :class:`TransitionError` when the change is not allowed); ``apply(router, actor, reason,
    expected_version)`` makes it.
    """
    actor = _actor(options["actor"])
    reason: str = options["reason"]
    with _router(env, options["config"], options["store_url"]) as router:
        before = router.status(name, history=0)
        expected: int | None = options["if_version"]
        if expected is not None and before.version != expected:
            raise ConflictError(
                f"rollout {name!r} is at version {before.version}, not {expected}: it changed since you looked; "
                "nothing was applied"
            )
        after_text = target(before)
        if after_text is None:
            after = before
        else:
            _confirm(options["yes"], f"{action} {name}: {where(before)} → {after_text}?")
            after = apply(router, actor, reason, before.version)
        if options["as_json"]:
            click.echo(json.dumps(change_dict(action, before, after, actor, reason), indent=2))
        elif after.version == before.version:
            click.echo(f"{name}: {where(before)}; nothing to do")
        else:
            click.echo(f"{name}: {where(before)} → {where(after)} (version {after.version}, by {actor})")


def _not_final(status: RolloutStatus, action: str) -> None:
    if status.phase is Phase.COMPLETED:
        raise TransitionError(f"rollout {status.name!r} is completed: nothing to {action} (restart begins again)")
    if status.phase is Phase.ROLLED_BACK:
        raise TransitionError(f"rollout {status.name!r} is rolled back: nothing to {action} (restart begins again)")


def _at(phase: str, status: RolloutStatus, index: int) -> str:
    steps = status.steps
    return f"{phase} at {steps[index]:g} % (step {index + 1} of {len(steps)})"


@cli.command(short_help="Move a rollout to its next step (or complete it).")
@click.argument("rollout")
@_change_options
@click.pass_obj
def promote(env: Environment, /, rollout: str, **options: Any) -> None:
    """Move ROLLOUT to its next step; after the last step, complete it (everyone gets the new version)."""

    def target(before: RolloutStatus) -> str:
        _not_final(before, "promote")
        nxt = before.step_index + 1
        return "completed (everyone gets new)" if nxt >= len(before.steps) else _at("running", before, nxt)

    _change(
        env,
        "promote",
        rollout,
        target=target,
        apply=lambda r, actor, why, v: r.promote(rollout, actor=actor, reason=why, expected_version=v),
        options=options,
    )


@cli.command(short_help="Freeze a rollout at its current percentage.")
@click.argument("rollout")
@_change_options
@click.pass_obj
def pause(env: Environment, /, rollout: str, **options: Any) -> None:
    """Freeze ROLLOUT at its current percentage: the controller stops promoting it (it still rolls back)."""

    def target(before: RolloutStatus) -> str | None:
        if before.phase is Phase.PAUSED:
            return None
        _not_final(before, "pause")
        return f"paused at {before.percent:g} %"

    _change(
        env,
        "pause",
        rollout,
        target=target,
        apply=lambda r, actor, why, v: r.pause(rollout, actor=actor, reason=why, expected_version=v),
        options=options,
    )


@cli.command(short_help="Set a paused rollout running again.")
@click.argument("rollout")
@_change_options
@click.pass_obj
def resume(env: Environment, /, rollout: str, **options: Any) -> None:
    """Set a paused ROLLOUT running again: the controller promotes it when healthy."""

    def target(before: RolloutStatus) -> str | None:
        if before.phase is Phase.RUNNING:
            return None
        _not_final(before, "resume")
        return f"running at {before.percent:g} %"

    _change(
        env,
        "resume",
        rollout,
        target=target,
        apply=lambda r, actor, why, v: r.resume(rollout, actor=actor, reason=why, expected_version=v),
        options=options,
    )


@cli.command(short_help="Give everyone the old version.")
@click.argument("rollout")
@_change_options
@click.pass_obj
def rollback(env: Environment, /, rollout: str, **options: Any) -> None:
    """Roll ROLLOUT back: everyone gets the old version, rule-targeted users included."""

    def target(before: RolloutStatus) -> str | None:
        return None if before.phase is Phase.ROLLED_BACK else "rolled back (everyone gets old)"

    _change(
        env,
        "rollback",
        rollout,
        target=target,
        apply=lambda r, actor, why, v: r.rollback(rollout, why, actor=actor, expected_version=v),
        options=options,
    )


@cli.command(short_help="Start a rollout again at its first step.")
@click.argument("rollout")
@_change_options
@click.pass_obj
def restart(env: Environment, /, rollout: str, **options: Any) -> None:
    """Start ROLLOUT again at its first step, running (after a rollback or a completion, or at any time)."""

    def target(before: RolloutStatus) -> str:
        return _at("running", before, 0)

    _change(
        env,
        "restart",
        rollout,
        target=target,
        apply=lambda r, actor, why, v: r.restart(rollout, actor=actor, reason=why, expected_version=v),
        options=options,
    )


def _percent(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """Parse a percentage of traffic: 0 to 100 in steps of 0.01, with or without a trailing ``%``."""
    if value is None:
        return None
    text = value.strip().removesuffix("%").strip()
    try:
        number = float(text)
    except ValueError:
        raise click.BadParameter(f"expected a percentage from 0 to 100 (such as 12.5), got {value!r}") from None
    if not 0 <= number <= 100:
        raise click.BadParameter(f"expected a percentage from 0 to 100, got {value!r}")
    if abs(number * 100 - round(number * 100)) > 1e-6:
        raise click.BadParameter(f"percentages have a resolution of 0.01, got {value!r}")
    return round(number, 2)


@cli.command("set", short_help="Serve the new version to a given percentage.")
@click.argument("rollout")
@click.argument("percent", callback=_percent)
@_change_options
@click.pass_obj
def set_command(env: Environment, /, rollout: str, percent: float, **options: Any) -> None:
    """Serve the new version to PERCENT % of ROLLOUT's units (0 to 100, in steps of 0.01).

    A paused rollout stays paused at the new percentage; any other becomes running at it. Everyone who
    has the new version at a lower percentage keeps it.
    """

    def target(before: RolloutStatus) -> str | None:
        phase = "paused" if before.phase is Phase.PAUSED else "running"
        if before.percent == percent and before.phase.value == phase:
            return None
        return f"{phase} at {percent:g} %"

    _change(
        env,
        "set",
        rollout,
        target=target,
        apply=lambda r, actor, why, v: r.set_percent(rollout, percent, actor=actor, reason=why, expected_version=v),
        options=options,
    )


# ---------------------------------------------------------------------- cohort


class _Rows:
    """Writes cohort rows as CSV (with a header) or as a JSON array, one row at a time."""

    FIELDS = ("id", "variant", "bucket", "reason")

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.count = 0
        if not as_json:
            self.writer = csv.writer(self, lineterminator="\n")
            self.writer.writerow(self.FIELDS)

    def write(self, text: str) -> None:
        """File protocol, for csv.writer."""
        click.echo(text, nl=False)

    def add(self, unit: str | None, variant: str, bucket_: int | None, reason: str) -> None:
        """Write one row."""
        if self.as_json:
            row = dict(zip(self.FIELDS, (unit, variant, bucket_, reason), strict=True))
            click.echo(("[\n  " if self.count == 0 else ",\n  ") + json.dumps(row), nl=False)
        else:
            self.writer.writerow(("" if unit is None else unit, variant, "" if bucket_ is None else bucket_, reason))
        self.count += 1

    def close(self) -> None:
        """End the output."""
        if self.as_json:
            click.echo("[]" if self.count == 0 else "\n]")


def _attributes(line: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise CliError(f"{where}: expected a JSON object of attributes: {exc}") from None
    if not isinstance(value, dict):
        raise CliError(f"{where}: expected a JSON object of attributes, got {type(value).__name__}")
    return value


def _write_cohort(
    router: Router, name: str, source: IO[str], *, attributes: bool, only: str | None, as_json: bool
) -> None:
    rollout = router.rollouts[name]
    salt, stickiness = rollout.effective_salt, rollout.stickiness
    label = getattr(source, "name", "<stdin>")
    rows = _Rows(as_json)
    for number, line in enumerate(source, 1):
        text = line.strip()
        if not text:
            continue
        unit: str | None
        if attributes:
            context = _attributes(text, f"{label}:{number}")
            value = next((context[a] for a in stickiness if context.get(a) is not None and context[a] != ""), None)
            unit = None if value is None else str(value)
        else:
            context = {stickiness[0]: text}
            unit = text
        decision = router.decide(name, context)
        if only is not None and decision.variant != only:
            continue
        rows.add(unit, decision.variant, None if unit is None else bucket(salt, unit), str(decision.reason))
    rows.close()


@contextlib.contextmanager
def _what_if(
    env: Environment, config: str | None, name: str, percent: float | None, step: int | None
) -> Iterator[Router]:
    """A private router on a memory store with rollout ``name`` running at ``percent`` (or step ``step``)."""
    path = _config_path(config, required=env.router is None)
    clock = env.clock if env.router is None else env.router.clock
    if path is not None:
        router = Router.from_config(_load_config(path), store=MemoryStore(), clock=clock, telemetry=None, record=False)
    else:
        assert env.router is not None  # noqa: S101  # required=False only with a lent router
        known = env.router.rollouts
        if name not in known:
            raise UnknownRolloutError(name, tuple(known))
        try:
            router = Router([known[name]], store=MemoryStore(), clock=clock, telemetry=None, record=False)
        except ConfigError:
            raise CliError(f"rollout {name!r} uses segments: pass --config so that they are known") from None
    try:
        _names(router, [name])
        steps = router.rollouts[name].steps
        if step is not None:
            if step > len(steps):
                raise CliError(f"--at-step: rollout {name!r} has {len(steps)} steps, got {step}", EXIT_USAGE)
            percent = steps[step - 1]
        assert percent is not None  # noqa: S101  # the command passes one of the two
        at = percent
        index = max((i for i, p in enumerate(steps) if p <= at + 1e-9), default=-1)

        def running_there(state: RolloutState, rollout: Rollout) -> RolloutState:
            return replace(
                state, phase=Phase.RUNNING, percent=at, step_index=index, shadow=False, epoch=state.epoch + 1
            )

        router.transition(name, "what_if", running_there, actor="cli:cohort")
        yield router
    finally:
        router.close()


@cli.command(short_help="Say which variant each id gets, now or at a step (CSV, JSON).")
@click.argument("source", type=click.File("r", encoding="utf-8"), default="-", metavar="[FILE]")
@click.option("--rollout", "-r", "name", required=True, metavar="NAME", help="The rollout to answer for.")
@click.option(
    "--at-percent", callback=_percent, metavar="P", help="Answer as if the rollout were running at this percentage."
)
@click.option(
    "--at-step", type=click.IntRange(1), metavar="N", help="Answer as if it were running at step N (1 is the first)."
)
@click.option(
    "--attributes",
    is_flag=True,
    help="Each line is a JSON object of context attributes (so that rules can match), not an id.",
)
@click.option("--variant", "only", type=click.Choice(["new", "old"]), help="Print only the units on this variant.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of CSV.")
@_router_options
@click.pass_obj
def cohort(
    env: Environment,
    source: IO[str],
    name: str,
    at_percent: float | None,
    at_step: int | None,
    attributes: bool,
    only: str | None,
    as_json: bool,
    config: str | None,
    store_url: str | None,
) -> None:
    """Say which variant each unit of FILE (default: stdin) gets: who is in the canary now, or at a step.

    FILE has one id per line (the value of the rollout's stickiness attribute, e.g. a user id); with
    --attributes, one JSON object of attributes per line. Prints CSV with the columns id, variant, bucket
    and reason, exactly as the router decides. Rules apply, but with ids alone the context holds only the
    stickiness attribute, so rules on other attributes find them missing. Without --at-percent /
    --at-step, the rollout's current state decides (paused, rolled back and completed included).
    """
    if at_percent is not None and at_step is not None:
        raise CliError("--at-percent and --at-step exclude each other", EXIT_USAGE)
    if source.isatty():
        _warn("reading ids from the terminal; end with Ctrl-D")
    if at_percent is None and at_step is None:
        with _router(env, config, store_url) as router:
            _names(router, [name])
            _write_cohort(router, name, source, attributes=attributes, only=only, as_json=as_json)
    else:
        with _what_if(env, config, name, at_percent, at_step) as router:
            _names(router, [name])
            _write_cohort(router, name, source, attributes=attributes, only=only, as_json=as_json)


# ---------------------------------------------------------------------- running: controller, dashboard, demo


@cli.command(short_help="Run the controller: promote, pause or roll back per the guard.")
@click.argument("config_file", required=False, type=click.Path(dir_okay=False), metavar="[CONFIG]")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.05, 3600), help="Seconds per tick.")
@click.option(
    "--ticks", default=0, type=click.IntRange(0), help="Stop after this many ticks (0: run until interrupted)."
)
@click.option("--json", "as_json", is_flag=True, help="Print each action as a JSON line.")
@_router_options
@click.pass_obj
def controller(
    env: Environment,
    config_file: str | None,
    interval: float,
    ticks: int,
    as_json: bool,
    config: str | None,
    store_url: str | None,
) -> None:
    """Run the controller: promote, pause or roll back the rollouts as the guard says.

    It acts on the state of the store (--store), so it reaches every application sharing that store.
    CONFIG, if given, is the configuration file (the same as --config).
    """
    if config_file and config and config_file != config:
        raise CliError("give the configuration once: as CONFIG or as --config", EXIT_USAGE)
    console = _console()
    with _router(env, config_file or config, store_url) as router:
        ctl = router.controller()
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
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass


DASHBOARD_TOKEN_ENV = "CANARY_ROUTER_DASHBOARD_TOKEN"  # noqa: S105  # a variable name, not a secret
"""The default environment variable holding the dashboard's bearer token."""


@cli.command(short_help="Serve the web dashboard.")
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option("--port", default=8411, show_default=True, type=click.IntRange(1, 65535), help="The port to listen on.")
@click.option(
    "--token-env",
    default=DASHBOARD_TOKEN_ENV,
    show_default=True,
    metavar="NAME",
    help="The environment variable holding the token that allows changes; without it the dashboard is read-only.",
)
@_router_options
@click.pass_obj
def dashboard(
    env: Environment, host: str, port: int, token_env: str, config: str | None, store_url: str | None
) -> None:
    """Serve the web dashboard: status, charts and the audit log; changes need the token."""
    try:
        module = importlib.import_module(f"{__package__}.dashboard")
    except ModuleNotFoundError as exc:
        missing = exc.name or str(exc)
        if missing.startswith(f"{__package__}.dashboard"):
            raise CliError(f"this installation has no dashboard ({missing} is missing)", EXIT_MISSING) from None
        raise CliError(f"the dashboard needs {missing}, which is not installed", EXIT_MISSING) from None
    serve: Callable[..., None] = module.serve
    token = os.environ.get(token_env) or None
    if token is None:
        _warn(f"${token_env} is not set: the dashboard is read-only")
    with _router(env, config, store_url) as router:
        serve(router, host=host, port=port, token=token)


@cli.command(short_help="Run an automated rollout on simulated traffic.")
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


@cli.command("override-token", short_help="Print a signed tester override token.")
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
        raise CliError(message, EXIT_USAGE)

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
    """Run the CLI (``argv``: the arguments, default ``sys.argv[1:]``); exits with the documented code."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="canary-router")
