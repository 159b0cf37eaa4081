"""Process-0 metric writers: metrics.jsonl (one object per logged step) and TensorBoard scalars."""

import json
import math
import os
import tempfile
from typing import Iterable, Mapping, Optional

from absl import logging

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends metrics to <workdir>/metrics.jsonl and TensorBoard; a no-op when disabled."""

    def __init__(self, workdir: str, enabled: bool = True, resume_step: Optional[int] = None):
        self._enabled = enabled
        self._path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter  # pure-Python event writer; no TensorFlow

            # purge_step makes TensorBoard hide the points an interrupted run logged after the
            # checkpoint it resumes from, so a resumed curve has no duplicate steps.
            purge = None if resume_step is None else int(resume_step) + 1
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

    def truncate_after(self, step: int) -> None:
        """Drops records with step > `step` (logged after the checkpoint a run resumes from)."""
        if not self._enabled or not os.path.exists(self._path):
            return
        with open(self._path) as f:
            kept = [text for logged, text in read_records(self._path, f) if logged <= step]
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self._path), prefix=".metrics")
        with os.fdopen(fd, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self._path)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Writes one record {step, **metrics}; non-finite values are written as null."""
        if not self._enabled:
            return
        record = {"step": int(step)}
        record.update(
            {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        )
        with open(self._path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step" and value is not None:
                self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer."""
        if self._tb is not None:
            self._tb.close()


def read_records(path: str, lines: Iterable[str]) -> list[tuple[int, str]]:
    """(step, line) of each parseable record; a torn line (crash mid-write) is dropped, warned."""
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            logging.warning(
                "%s:%d: dropping an unreadable record (a write cut short by a crash): %.60r",
                path,
                number,
                line,
            )
            continue
        records.append((step, line if line.endswith("\n") else line + "\n"))
    return records
