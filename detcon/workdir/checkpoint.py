"""Orbax checkpoints in <workdir>/checkpoints: atomic save, keep last K, resume, load for export."""

import errno
import json
import os
from typing import Any, NamedTuple, Optional, TypeVar

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
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(host_state), meta=ocp.args.JsonSave(meta)
            ),
        )
        manager.wait_until_finished()
    except Exception as error:
        os_error = _os_error_in(error)
        if os_error is None:
            raise
        reason = (
            "the disk is full"
            if os_error.errno in (errno.ENOSPC, errno.EDQUOT)
            else os_error.strerror or str(os_error)
        )
        raise errors.CheckpointWriteError(
            f"Could not write checkpoint {step} to {manager.directory}: {reason}. Free space (or "
            f"fix the path) and re-run the same command; it resumes from step "
            f"{manager.latest_step()}."
        ) from None
    logging.info("Saved checkpoint %s/%d", manager.directory, step)


def _os_error_in(error: BaseException) -> Optional[OSError]:
    """The first OSError in an exception's cause/context chain, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


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


def _step_directory(path: str) -> str:
    """Resolves a workdir, its checkpoints dir, or a step dir to one step directory."""
    path = os.path.abspath(path)
    for candidate in (os.path.join(path, CHECKPOINT_DIR), path):
        if os.path.isdir(candidate):
            steps = [int(d) for d in os.listdir(candidate) if d.isdigit()]
            if steps:
                return os.path.join(candidate, str(max(steps)))
    if os.path.isdir(os.path.join(path, "state")):
        return path
    raise FileNotFoundError(
        f"No DetCon checkpoint under {path!r}: pass a workdir of `python -m detcon.main_loop`, its "
        f"'{CHECKPOINT_DIR}' directory, or one step directory inside it."
    )


def load_network(path: str, network: str = "online") -> tuple[dict, dict, dict]:
    """(params, state, config) of the online or target network of a checkpoint, as NumPy dicts."""
    if network not in ("online", "target"):
        raise ValueError(f"--network must be 'online' or 'target', got {network!r}.")
    step_dir = _step_directory(path)
    state = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
        meta = json.load(f)
    to_numpy = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
    return (
        to_numpy(state[f"{network}_params"]),
        to_numpy(state[f"{network}_state"]),
        meta.get("config", {}),
    )
