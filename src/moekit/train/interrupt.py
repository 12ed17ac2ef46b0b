"""Ctrl-C during training: finish the step, save a checkpoint, then stop."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopOnInterrupt:
    """While active (in the main thread), the first Ctrl-C only sets `requested`, so the loop can
    finish its step and save; a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self, say: Any) -> None:
        self.requested = False
        self._say = say
        self._previous: Any = None

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._say("\nCtrl-C: saving a checkpoint after this step (press again to abort at once)")
