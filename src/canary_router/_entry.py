"""Console entry point: runs the CLI, or says which extra to install when it is missing."""

from __future__ import annotations

import sys


def main() -> None:
    """Run ``canary-router``; without the ``cli`` extra, print how to install it and exit 3."""
    try:
        from .cli import main as cli_main
    except ImportError as exc:  # click / rich missing
        sys.stderr.write(
            f"canary-router: the command line needs the 'cli' extra ({exc.name or exc} is not installed):\n"
            "    pip install 'canary-router[cli]'\n"
        )
        raise SystemExit(3) from None
    cli_main()
