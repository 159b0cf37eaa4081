"""SIGTERM/SIGINT -> a stop request the training loop checks after each step (then saves, exits).

SLURM, Kubernetes and Cloud TPU send SIGTERM some seconds before killing a job; finishing the
current step and saving loses at most one step instead of everything since the last checkpoint.
"""

import contextlib
import signal
import threading
from typing import Iterator, Optional

import numpy as np
from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Records the first stop signal received; `signal_number` is None until one arrives."""

    def __init__(self) -> None:
        self.signal_number: Optional[int] = None

    def handle(self, signal_number: int, frame: object) -> None:
        """Signal handler: the first signal asks for a stop, a second Ctrl-C interrupts now."""
        del frame
        if self.signal_number is not None and signal_number == signal.SIGINT:
            raise KeyboardInterrupt  # the user insists: do not wait for the save
        self.signal_number = signal_number
        logging.warning(
            "Received %s: finishing the current step, then saving a checkpoint.",
            signal.Signals(signal_number).name,
        )


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Installs the handlers for the block (main thread only) and restores the previous ones."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be set from the main thread
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, request.handle)
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # A signal that came when the block had nothing left to stop (the last step) is handed on to
    # an enclosing program's own handler (e.g. the study's), which would otherwise never see it.
    handler = previous.get(request.signal_number) if request.signal_number else None
    if callable(handler) and handler is not signal.default_int_handler:
        signal.raise_signal(request.signal_number)


def agreed_signal(request: StopRequest, process_count: int) -> Optional[int]:
    """The stop signal if any process received one; all processes must stop at the same step."""
    if process_count == 1:
        return request.signal_number
    from jax.experimental import multihost_utils

    received = multihost_utils.process_allgather(np.int32(request.signal_number or 0))
    return int(np.max(received)) or None


def signal_name(signal_number: int) -> str:
    """'SIGTERM' for 15."""
    return signal.Signals(signal_number).name
