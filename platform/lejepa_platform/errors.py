"""The one exception type the CLI turns into a single clear line and exit code 2.

Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user: the message says what was wrong and what is allowed."""


class RunFailed(RuntimeError):
    """A run that started but could not finish (non-finite loss, failures past the limit).

    The CLI prints its message as one line and exits 1; the run's last good checkpoint stays.
    """
