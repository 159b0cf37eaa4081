"""Orbax checkpoints in <workdir>/checkpoints: atomic save, keep last K, resume, load for export."""

import contextlib
import errno
import json
import logging as logging_std
import os
import shutil
from typing import Any, Iterator, NamedTuple, Optional, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from detcon import errors
from detcon.workdir import finite

CHECKPOINT_DIR = "checkpoints"
# Any NamedTuple of arrays with a `step` field (the trainer's TrainState); this layer never
# names the trainer's type, so it sits beside the trainer rather than above it.
State = TypeVar("State", bound=NamedTuple)


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """A manager keeping the last `keep` checkpoints under <workdir>/checkpoints."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, state: NamedTuple, meta: dict[str, Any]) -> None:
    """Saves a host (unreplicated) state at its step; orbax writes to a temp dir then renames.

    A state holding NaN or inf is refused (NonFiniteStateError): a diverged run must never leave a
    checkpoint that resumes straight back into divergence.
    """
    step = int(state.step)
    host_state = jax.tree_util.tree_map(np.asarray, state._asdict())
    bad = finite.non_finite_leaves(host_state)
    if bad:
        raise errors.NonFiniteStateError(
            f"The training state at step {step} holds NaN or inf (in {finite.describe(bad)}); it "
            f"was not saved. {kept_steps_advice(manager)}"
        )
    try:
        with _library_errors_silenced():
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(host_state), meta=ocp.args.JsonSave(meta)
                ),
            )
            manager.wait_until_finished()
    except Exception as error:
        target = os.path.join(str(manager.directory), str(step))
        if _disk_full(error):
            raise errors.CheckpointWriteError(
                f"{disk_full_message(target, '--workdir')}; the run resumes from step "
                f"{manager.latest_step()} when re-run."
            ) from None
        os_error = _os_error_in(error)
        if os_error is None:
            raise
        raise errors.CheckpointWriteError(
            f"Could not write checkpoint {step} to {manager.directory}: "
            f"{os_error.strerror or os_error}. Fix the path and re-run the same command; it "
            f"resumes from step {manager.latest_step()}."
        ) from None
    logging.info("Saved checkpoint %s/%d", manager.directory, step)


_FULL_DISK_TEXT = ("No space left on device", "RESOURCE_EXHAUSTED", "Disk quota exceeded")


def _chain(error: Optional[BaseException]) -> Iterator[BaseException]:
    """An exception and its causes/contexts, each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _disk_full(error: BaseException) -> bool:
    """True when the chain holds ENOSPC/EDQUOT, or tensorstore's text for it (not an OSError)."""
    for link in _chain(error):
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(link) for text in _FULL_DISK_TEXT):
            return True
    return False


def _mount_point(path: str) -> str:
    """The mount point holding `path` (its nearest existing ancestor)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _device_of(mount: str) -> str:
    """The device mounted at `mount` per /proc/mounts (e.g. /dev/sda1), else the mount itself."""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 1 and fields[1] == mount:
                    return fields[0]
    except OSError:
        pass
    return mount


def disk_full_message(path: str, flag: str) -> str:
    """'no space left on <device> writing <path>: free N MB or point <flag> elsewhere'."""
    mount = _mount_point(path)
    free_mb = shutil.disk_usage(mount).free / 2**20
    return (
        f"no space left on {_device_of(mount)} ({mount}) writing {path}: free "
        f"{free_mb:.0f} MB or point {flag} elsewhere"
    )


class _DropLibraryRecords(logging_std.Filter):
    """Drops orbax's and asyncio's records (their tracebacks bury a failed save's cause)."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return "/orbax/" not in record.pathname and not record.name.startswith("asyncio")


@contextlib.contextmanager
def _library_errors_silenced() -> Iterator[None]:
    """While saving: orbax and asyncio log nothing; the error raised says what went wrong."""
    drop = _DropLibraryRecords()
    handlers = list(logging_std.getLogger().handlers) + [logging.get_absl_handler()]
    for handler in handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(drop)


def _os_error_in(error: BaseException) -> Optional[OSError]:
    """The first OSError in an exception's cause/context chain, if any."""
    return next((link for link in _chain(error) if isinstance(link, OSError)), None)


def kept_steps_advice(manager: ocp.CheckpointManager) -> str:
    """One sentence listing the kept checkpoint steps and how to resume from one of them."""
    steps = sorted(manager.all_steps())
    if not steps:
        return "No checkpoint was kept; lower the learning rate and start again."
    return (
        f"Kept checkpoints (all finite): steps {', '.join(map(str, steps))} in "
        f"{manager.directory}. Resume from one before the divergence with --restore_step=N "
        f"(e.g. --restore_step={steps[0]}) and a lower --config.optim.base_learning_rate; "
        f"later checkpoints are moved aside, not deleted."
    )


def restore(
    manager: ocp.CheckpointManager, template: State, step: Optional[int] = None
) -> tuple[State, dict[str, Any]]:
    """Restores the latest (or given) checkpoint into the structure and type of `template`."""
    step = manager.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(
        ocp.utils.to_shape_dtype_struct, jax.tree_util.tree_map(np.asarray, template._asdict())
    )
    _check_layout(manager, step, abstract)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    return type(template)(**restored["state"]), dict(restored["meta"])


def _leaf_paths(tree: Any) -> set[tuple[str, ...]]:
    """Key paths of a pytree's leaves as strings: ('opt_state', '2', 'trace', 'linear', 'w')."""

    def name(key: Any) -> str:
        for attribute in ("key", "idx", "name"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(name(k) for k in path) for path, _ in leaves}


def _check_layout(manager: ocp.CheckpointManager, step: int, abstract: dict[str, Any]) -> None:
    """Raises a one-line ValueError when the stored state's layout differs from `abstract`."""
    location = manager.directory / str(step)  # an etils path, as the handler expects
    # Read by the handler: the manager knows item types only after it has saved in this process.
    stored = ocp.StandardCheckpointHandler().metadata(location / "state")
    stored_paths = _leaf_paths(getattr(stored, "tree", stored))
    expected_paths = _leaf_paths(abstract)
    if stored_paths == expected_paths:
        return
    differing = sorted({p[0] for p in stored_paths ^ expected_paths})
    if differing == ["opt_state"]:
        raise ValueError(
            f"Checkpoint {location} was written by an older optimiser (its state layout differs "
            "from the current LARS: learning rate after momentum), so it cannot be resumed; "
            "start a new --workdir, or export its weights with scripts/export_checkpoint.py."
        )
    raise ValueError(
        f"Checkpoint {location} does not match this config (differing state: "
        f"{', '.join(differing)}); resume with the config that wrote it or use a new --workdir."
    )


def _step_directories(path: str) -> list[str]:
    """A workdir or its checkpoints dir -> its step directories, newest first; a step dir -> it."""
    path = os.path.abspath(path)
    for candidate in (os.path.join(path, CHECKPOINT_DIR), path):
        if os.path.isdir(candidate):
            steps = sorted((int(d) for d in os.listdir(candidate) if d.isdigit()), reverse=True)
            if steps:
                return [os.path.join(candidate, str(step)) for step in steps]
    if os.path.isdir(os.path.join(path, "state")):
        return [path]
    raise FileNotFoundError(
        f"No DetCon checkpoint under {path!r}: pass a workdir of `python -m detcon.main_loop`, its "
        f"'{CHECKPOINT_DIR}' directory, or one step directory inside it."
    )


def _read_step(step_dir: str) -> tuple[dict, dict]:
    """(state, meta) of one step directory, as stored."""
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
        meta = json.load(f)
    return ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state")), meta


def _reason(error: BaseException) -> str:
    """An exception as one short line: its type and first line."""
    text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_network(path: str, network: str = "online") -> tuple[dict, dict, dict]:
    """(params, state, config) of the online or target network of a checkpoint, as NumPy dicts.

    Given a workdir, a newest step that does not read (half-written by a crash or a full disk) is
    skipped with one warning and the previous complete one is used, as training does on resume.
    """
    if network not in ("online", "target"):
        raise ValueError(f"--network must be 'online' or 'target', got {network!r}.")
    candidates = _step_directories(path)
    failures = []
    for step_dir in candidates:
        try:
            state, meta = _read_step(step_dir)
            break
        except Exception as error:  # orbax raises many kinds for a truncated or missing file
            failures.append(f"{step_dir} ({_reason(error)})")
    else:
        raise ValueError(
            f"No checkpoint under {path} reads: {'; '.join(failures)}. Point at a run that "
            "finished a save, or retrain."
        )
    if failures:
        logging.warning(
            "Checkpoint %s is incomplete; using the previous complete one, %s.",
            "; ".join(failures),
            step_dir,
        )
    to_numpy = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
    return (
        to_numpy(state[f"{network}_params"]),
        to_numpy(state[f"{network}_state"]),
        meta.get("config", {}),
    )
