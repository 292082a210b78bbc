"""Graceful stop: SIGTERM (what a scheduler or a spot-instance notice sends) or Ctrl-C while a run
trains asks the workers to write a checkpoint at the next step boundary and end; a second signal
stops at once.

`TorchTrainer.fit()` runs in a helper thread so that the driver's main thread keeps the signal
handlers (Ray Train installs its own SIGINT handler, which aborts without a checkpoint, only when
fit() runs on the main thread). The request reaches the workers through the progress board actor,
which rank 0 polls every step.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from lejepa_platform.console import say

SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""Exit codes of a run stopped by a signal (128 + the signal's number, as shells report it)."""


class StopSignals:
    """While active, the first SIGTERM or SIGINT posts a stop request to `board`; the next one raises
    KeyboardInterrupt in the main thread. `received` is the first signal's number, or None."""

    def __init__(self, board: Any, *, quiet: bool = False) -> None:
        self.board, self.quiet = board, quiet
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for signum in SIGNAL_EXIT_CODES:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        self.board.request_stop.remote()
        say(self.quiet, f"\n{signal.Signals(signum).name}: writing a checkpoint at the next step, then stopping "
                        "(send it again to stop at once)")


def fit_with_stop_signals(trainer: Any, board: Any, *, quiet: bool = False) -> tuple[Any, int | None]:
    """(trainer.fit()'s result, the signal that asked for a stop or None). Exceptions of fit() are
    raised here; without a main thread to hold the handlers (Ray Tune trials), fit() runs directly."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit(), None
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the main thread as is
            outcome["error"] = err

    worker = threading.Thread(target=fit, name="lejepa-fit", daemon=True)
    with StopSignals(board, quiet=quiet) as signals:
        worker.start()
        while worker.is_alive():
            worker.join(timeout=0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], signals.received
