"""Process-0 metric writers: metrics.jsonl (one object per logged step) and TensorBoard scalars."""
import json
import math
import os
import tempfile
from typing import Mapping

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends metrics to <workdir>/metrics.jsonl and TensorBoard; a no-op when disabled."""

    def __init__(self, workdir: str, enabled: bool = True):
        self._enabled = enabled
        self._path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter  # pure-Python event writer; no TensorFlow
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops records with step > `step` (logged after the checkpoint a run resumes from)."""
        if not self._enabled or not os.path.exists(self._path):
            return
        with open(self._path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self._path), prefix=".metrics")
        with os.fdopen(fd, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self._path)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Writes one record {step, **metrics}; non-finite values are written as null."""
        if not self._enabled:
            return
        record = {"step": int(step)}
        record.update({k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()})
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
