"""SIGTERM/SIGINT for the study: stop at any point, keep what is finished, say how to resume.

During a method's pretraining the trainer's own handler takes over (it finishes the step, saves
a checkpoint and raises Preempted, or, on the last step, hands the signal back here); anywhere
else (building scenes, probing) the handler below raises Preempted at once.
"""

import contextlib
import os
import signal
from typing import Iterator

from detcon import errors

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _raise_preempted(signal_number: int, frame: object) -> None:
    del frame
    raise errors.Preempted(f"Stopped by {signal.Signals(signal_number).name}", signal_number)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT raise errors.Preempted (exit code 128 + signal)."""
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _raise_preempted)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resume_hint(output_directory: str, stop: errors.Preempted) -> str:
    """One line: the stop, what was kept and how to go on."""
    stopped = str(stop).rstrip(".")  # the trainer's message may already end a sentence
    return (
        f"{stopped}. Finished methods are kept in {os.path.join(output_directory, 'results')}; "
        "unfinished pretraining runs resume from their checkpoints in "
        f"{os.path.join(output_directory, 'runs')}: run the same command to resume."
    )
