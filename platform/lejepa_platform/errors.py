"""The one exception type the CLI turns into a single clear line and exit code 2.

Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user: the message says what was wrong and what is allowed."""


class ConfigError(UserError):
    """A config value or key that is not allowed."""


class RunFailed(RuntimeError):
    """A run that started but could not finish (non-finite loss, failures past the limit).

    The CLI prints its message as one line and exits 1; the run's last good checkpoint stays.
    """


class RunStopped(RuntimeError):
    """A run stopped on request (SIGTERM, Ctrl-C) after writing a checkpoint it can be resumed from.

    The CLI prints its message (which names the `--resume` command) and exits with `exit_code`.
    """

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrackingError(RuntimeError):
    """The MLflow store could not be reached, or refused to record something.

    The message names the store and the cause in one line; the CLI prints it and exits 1.
    """
