"""Human-facing messages: the one way the platform talks to a person, always on stderr so stdout
stays machine-readable with --json.

`say` is progress and honours the caller's quiet flag (--json, sweep trials); `warn` is something
the person must see whatever the flag (a changed param on resume, skipped records). Passwords in
URIs are masked in both: logs outlive the shell they were printed in.
"""

import contextlib
import logging
import sys
from collections.abc import Iterator

from lejepa_platform.redact import redact_uri


def say(quiet: bool, message: str) -> None:
    """Print `message` to stderr unless the caller runs quietly (--json, sweep trials)."""
    if not quiet:
        print(redact_uri(message), file=sys.stderr)


def warn(message: str) -> None:
    """Print `message` to stderr as a warning, quiet or not."""
    print(f"lejepa: WARNING: {redact_uri(message)}", file=sys.stderr)


@contextlib.contextmanager
def quieter(logger_name: str, level: int) -> Iterator[None]:
    """Inside: a library's logger shows only records at `level` or above (its chatter about its own
    set-up is not the person's business); its own level afterwards."""
    logger = logging.getLogger(logger_name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)
