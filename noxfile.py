"""Developer tasks: ``nox`` runs lint, typecheck and tests; ``docs``, ``bench`` and ``simulate`` on demand."""

from __future__ import annotations

import re

import nox

nox.needs_version = ">=2024.4"
nox.options.sessions = ["lint", "typecheck", "tests"]

PYTHON = "3.11"
LINT_PATHS = ("src", "tests", "bench", "noxfile.py", "docs", "integrations")
PYPROJECT = nox.project.load_toml("pyproject.toml")


def requirement_from_extra(extra: str, name: str) -> str:
    """Return the requirement for ``name`` as pinned in the project's ``extra``, so pins live in one place."""
    for requirement in PYPROJECT["project"]["optional-dependencies"][extra]:
        match = re.match(r"[A-Za-z0-9._-]+", requirement)
        if match and match.group(0).lower() == name.lower():
            return str(requirement)
    raise LookupError(f"pyproject.toml: the {extra!r} extra has no requirement for {name!r}")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite with pytest; arguments after ``--`` go to pytest (``nox -s tests -- -k bucket``)."""
    session.install(".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff (no changes are made)."""
    session.install(requirement_from_extra("test", "ruff"))
    session.run("ruff", "check", *LINT_PATHS)
    session.run("ruff", "format", "--check", *LINT_PATHS)


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """Type-check the package with mypy in strict mode (configuration in pyproject.toml)."""
    session.install(".[test]")
    session.run("mypy", "--strict", *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site with mkdocs, failing on any warning."""
    session.install(".[test]")
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run the decide/decorator/recording/verdict/telemetry benchmarks and rewrite their sections of docs/benchmarks.md.

    Extra arguments after ``--`` go to the script, e.g. ``nox -s bench -- --repeats 51 --json bench.json``.
    """
    session.install(".[otel]")  # the SDK is installed but left unconfigured, except by bench_telemetry
    session.run("python", "bench/bench_decide.py", "--write", "docs/benchmarks.md", *session.posargs)
    session.run("python", "bench/bench_guard.py", "--write", "docs/benchmarks.md")
    session.run("python", "bench/bench_telemetry.py", "--write", "docs/benchmarks.md")
    session.run("python", "bench/bench_propagation_sqlite.py", "--write", "docs/benchmarks.md")


@nox.session(name="bench-web", python=PYTHON)
def bench_web(session: nox.Session) -> None:
    """Run the ASGI and WSGI middleware benchmarks and rewrite their sections of docs/benchmarks.md."""
    session.install(".", "starlette>=0.37", "Flask>=3.0")
    session.run("python", "bench/bench_asgi.py", "--quiet", "--write", "docs/benchmarks.md", *session.posargs)
    session.run("python", "bench/bench_wsgi.py", "--quiet", "--write", "docs/benchmarks.md")


@nox.session(name="bench-instructions", python=PYTHON)
def bench_instructions(session: nox.Session) -> None:
    """Count the web middleware's instructions per request with callgrind; rewrite their section of docs/benchmarks.md.

    Needs ``valgrind`` on PATH; takes several minutes. Arguments after ``--`` go to the script (``--batches 5``).
    """
    session.install(".", "starlette>=0.37", "Flask>=3.0")
    script = "bench/bench_web_instructions.py"
    session.run("python", script, "--quiet", "--write", "docs/benchmarks.md", *session.posargs)


@nox.session(python=PYTHON)
def simulate(session: nox.Session) -> None:
    """Run the full guard simulation (1,000 rollouts per scenario) and rewrite docs/guard-simulation.md.

    Takes several minutes on two cores; the test suite runs a seeded subset. Arguments after ``--`` go
    to the script, e.g. ``nox -s simulate -- --runs 200``.
    """
    session.install(".", "numpy")
    session.run("python", "bench/guard_simulation.py", "--write", "docs/guard-simulation.md", *session.posargs)


@nox.session(name="bench-redis", python=PYTHON)
def bench_redis(session: nox.Session) -> None:
    """Run the Redis benchmarks (propagation of a rollback, load) and rewrite their sections of docs/benchmarks.md.

    Needs a Redis: ``CANARY_BENCH_REDIS`` (default ``redis://127.0.0.1:6379/0``); each run uses its own key
    prefix and deletes it afterwards. Arguments after ``--`` go to the propagation script (``--trials 500``).
    """
    session.install(".[redis]")
    session.run("python", "bench/bench_propagation.py", "--quiet", "--write", "docs/benchmarks.md", *session.posargs)
    session.run("python", "bench/load_redis.py", "--write", "docs/benchmarks.md")
