"""Errors that stop a run with a one-line message for the user (main_loop prints it, no traceback)."""


class RunStopped(RuntimeError):
    """A run ended on purpose or for a reason the message explains; `exit_code` is for the shell."""

    exit_code = 1


class NonFiniteLossError(RunStopped):
    """The loss became NaN or infinite."""


class NonFiniteStateError(RunStopped):
    """Parameters, network state or optimiser state hold NaN or inf; such a state is never saved."""


class CheckpointWriteError(RunStopped):
    """A checkpoint could not be written (e.g. the disk is full)."""


class CheckpointRestoreError(RunStopped):
    """No checkpoint of the workdir can be restored, or --restore_step names none of them."""


class ConfigChangeError(RunStopped):
    """The config differs from the checkpoint's in a way that needs the user's consent or a new run."""


class DatasetMismatchError(RunStopped):
    """The dataset does not fit the config (e.g. more classes than the linear probe has)."""


class DamagedDataError(RunStopped):
    """A dataset file is cut short or corrupt (the message names it and how to rewrite it)."""


class WorkdirLockedError(RunStopped):
    """Another live run writes to the same workdir."""


class Preempted(RunStopped):
    """SIGTERM or SIGINT arrived; the run saved a checkpoint and stopped (exit 128 + signal)."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number


class ConfigError(RunStopped, ValueError):
    """A config value or flag that cannot work (e.g. a batch size of 0)."""
