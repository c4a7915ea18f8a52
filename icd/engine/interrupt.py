"""Ctrl-C as a clean stop of a run: the first SIGINT asks the loop to stop after its current step
(the run then writes a checkpoint and says how to resume); a second one interrupts at once."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType


class StopRequest:
    """While entered (in the main thread), SIGINT sets :attr:`requested` instead of raising
    KeyboardInterrupt; the loop checks it between steps. ``enabled=False`` (a torchrun rank,
    whose peers would wait for it) leaves SIGINT as it is."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("icd: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again: at once, "
              "without one)", file=sys.stderr, flush=True)  # fmt: skip

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)
