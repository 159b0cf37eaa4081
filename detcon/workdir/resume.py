"""Resuming a run: config comparison with the checkpoint's, --restore_step, fallback past bad files.

Nothing is deleted here: checkpoints after a chosen --restore_step go to
<workdir>/checkpoints_after_<N>/, ones that fail to restore to <workdir>/checkpoints_unreadable/.
"""

import json
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import ml_collections
from absl import logging

from detcon import errors
from detcon.workdir import checkpoint as checkpoint_lib

# Changing these changes the parameters' structure or meaning: the checkpoint cannot continue.
ARCHITECTURE_PREFIXES = ("method", "model.")
# Changing these is harmless bookkeeping; anything not listed here or above changes the schedule
# or the data and needs --config.training.allow_config_change=True.
BOOKKEEPING_FIELDS = frozenset(
    {
        "training.log_every_steps",
        "training.log_tensors_interval",
        "training.checkpoint_every_steps",
        "training.keep_checkpoints",
        "training.allow_config_change",
        "training.restore_step",
        "training.init_checkpoint",
        "training.allow_pickle",
    }
)
# Changing these only moves where the schedules end: the run continues and says so.
RUN_LENGTH_FIELDS = frozenset({"training.max_steps", "training.pretrain_epochs"})


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model.depth": 50, ...} from a nested config dict."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(
    saved: dict[str, Any], current: dict[str, Any]
) -> tuple[list[str], list[str], list[str]]:
    """(architecture, schedule/data, run length) changes as "field: old -> new" strings."""
    old, new = flatten(saved), flatten(current)
    architecture, schedule, length = [], [], []
    for field in sorted(set(old) | set(new)):
        if field not in old or field not in new or old[field] == new[field]:
            continue  # a field added or removed by a newer version of the code is not a change
        if field in BOOKKEEPING_FIELDS:
            continue
        change = f"{field}: {old[field]!r} -> {new[field]!r}"
        if field.startswith(ARCHITECTURE_PREFIXES):
            architecture.append(change)
        elif field in RUN_LENGTH_FIELDS:
            length.append(change)
        else:
            schedule.append(change)
    return architecture, schedule, length


def check_config(saved: dict[str, Any], config: ml_collections.ConfigDict, step: int) -> list[str]:
    """Raises ConfigChangeError on a changed model/method, or a schedule change not allowed;
    returns the run-length changes (max_steps, pretrain_epochs), which need no consent."""
    # Through JSON, as the checkpoint stored it: a tuple field reads back as a list.
    current = json.loads(json.dumps(config.to_dict()))
    architecture, schedule, length = config_changes(saved, current)
    if architecture:
        raise errors.ConfigChangeError(
            f"The checkpoint at step {step} was trained with a different model or method "
            f"({'; '.join(architecture)}); use a new --workdir for a different model."
        )
    if not schedule:
        return length
    if not config.training.allow_config_change:
        raise errors.ConfigChangeError(
            f"The config differs from the checkpoint's at step {step} ({'; '.join(schedule)}); "
            "pass --config.training.allow_config_change=True to resume with the new values."
        )
    logging.warning("Resuming step %d with a changed config: %s", step, "; ".join(schedule))
    return length


def layout_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """ "devices: 8 -> 4"-style strings for the device/host counts that differ from the saved run's
    (meta["layout"]; absent in older checkpoints, then nothing is reported)."""
    return [
        f"{key}: {saved[key]} -> {current[key]}"
        for key in sorted(current)
        if key in saved and saved[key] != current[key]
    ]


def read_meta(checkpoint_directory: str, step: int) -> dict[str, Any]:
    """The JSON meta (with "config") saved beside the state of one checkpoint step."""
    with open(os.path.join(checkpoint_directory, str(step), "meta", "metadata")) as f:
        return json.load(f)


def move_aside(checkpoint_directory: str, step: int, destination: str) -> str:
    """Moves step directory `step` into `destination`; returns its new path."""
    os.makedirs(destination, exist_ok=True)
    target = os.path.join(destination, str(step))
    if os.path.exists(target):  # an earlier rewind already parked a step of that number
        target = f"{target}.{int(time.time())}"
    os.replace(os.path.join(checkpoint_directory, str(step)), target)
    return target


def rewind(workdir: str, restore_step: int) -> None:
    """Moves checkpoints after `restore_step` to <workdir>/checkpoints_after_<N>/ (kept, not lost)."""
    directory = os.path.join(os.path.abspath(workdir), checkpoint_lib.CHECKPOINT_DIR)
    steps = _steps(directory)
    if restore_step not in steps:
        raise errors.CheckpointRestoreError(
            f"--restore_step={restore_step} is not a checkpoint in {directory}; kept steps: "
            f"{', '.join(map(str, steps)) or 'none'}."
        )
    later = [s for s in steps if s > restore_step]
    aside = os.path.join(os.path.abspath(workdir), f"checkpoints_after_{restore_step}")
    for step in later:
        move_aside(directory, step, aside)
    if later:
        logging.warning(
            "Resuming from step %d: moved checkpoints %s to %s.",
            restore_step,
            ", ".join(map(str, later)),
            aside,
        )


def _steps(directory: str) -> list[int]:
    """Finished checkpoint steps in a checkpoints directory, ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


class Restored(NamedTuple):
    """What `restore_newest_good` found: the manager, the state (None for a new run) and what
    changed since the checkpoint without needing consent (run length, device/host counts)."""

    manager: Any
    state: Optional[checkpoint_lib.State]
    changes: list[str]


def restore_newest_good(
    workdir: str,
    make_manager: Callable[[], Any],
    template: checkpoint_lib.State,
    config: ml_collections.ConfigDict,
    layout: Optional[dict[str, int]] = None,
) -> Restored:
    """The newest checkpoint that restores; its state is None for a new run.

    The config is compared with each candidate's saved config before its arrays are read, so a
    changed model is a short message rather than a structure dump. A checkpoint that fails to
    read (a truncated file after a crash or a full disk) is moved to
    <workdir>/checkpoints_unreadable/ with one warning, and the previous one is tried. `layout`
    ({"devices": 8, "processes": 1}) is compared with the one saved in the checkpoint's meta.
    """
    directory = os.path.join(os.path.abspath(workdir), checkpoint_lib.CHECKPOINT_DIR)
    unreadable = os.path.join(os.path.abspath(workdir), "checkpoints_unreadable")
    bad_steps = []
    for step in reversed(_steps(directory)):
        try:
            meta = read_meta(directory, step)
        except (OSError, ValueError) as error:
            _set_aside(directory, step, unreadable, error)
            bad_steps.append(step)
            continue
        changes = check_config(meta.get("config", {}), config, step)
        changes += layout_changes(meta.get("layout", {}), layout or {})
        manager = make_manager()
        try:
            state, _ = checkpoint_lib.restore(manager, template, step)
            return Restored(manager, state, changes)
        except Exception as error:
            manager.close()
            _set_aside(directory, step, unreadable, error)
            bad_steps.append(step)
    if bad_steps:
        raise errors.CheckpointRestoreError(
            f"No checkpoint in {directory} restores (moved {bad_steps} to {unreadable}); re-run "
            "to start the run afresh, or use a new --workdir."
        )
    return Restored(make_manager(), None, [])


def _set_aside(directory: str, step: int, destination: str, error: BaseException) -> None:
    """Moves an unreadable checkpoint away, with one warning line naming it and why."""
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    target = move_aside(directory, step, destination)
    logging.warning(
        "Checkpoint %s/%d does not restore (%s: %s); moved it to %s and trying the previous one.",
        directory,
        step,
        type(error).__name__,
        reason,
        target,
    )
