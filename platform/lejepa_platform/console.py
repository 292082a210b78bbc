"""Human-facing messages: the one way the platform talks to a person, always on stderr so stdout
stays machine-readable with --json.

`say` is progress and honours the caller's quiet flag (--json, sweep trials); `warn` is something
the person must see whatever the flag (a changed param on resume, skipped records). Passwords in
URIs are masked in both: logs outlive the shell they were printed in.
"""

import sys

from lejepa_platform.redact import redact_uri


def say(quiet: bool, message: str) -> None:
    """Print `message` to stderr unless the caller runs quietly (--json, sweep trials)."""
    if not quiet:
        print(redact_uri(message), file=sys.stderr)


def warn(message: str) -> None:
    """Print `message` to stderr as a warning, quiet or not."""
    print(f"lejepa: WARNING: {redact_uri(message)}", file=sys.stderr)
