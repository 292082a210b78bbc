"""Human-facing progress messages: stderr, so stdout stays machine-readable with --json."""

import sys


def say(quiet: bool, message: str) -> None:
    """Print `message` to stderr unless the caller runs quietly (--json, sweep trials)."""
    if not quiet:
        print(message, file=sys.stderr)
