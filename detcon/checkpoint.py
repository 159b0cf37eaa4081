"""Orbax checkpoints in <workdir>/checkpoints: atomic save, keep last K, resume, load for export."""
import json
import os
from typing import Any, Optional

import jax
from absl import logging
import numpy as np
import orbax.checkpoint as ocp

from detcon.state import TrainState

CHECKPOINT_DIR = "checkpoints"


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """A manager keeping the last `keep` checkpoints under <workdir>/checkpoints."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> None:
    """Saves a host (unreplicated) state at its step; orbax writes to a temp dir then renames."""
    step = int(state.step)
    host_state = jax.tree_util.tree_map(np.asarray, state._asdict())
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    logging.info("Saved checkpoint %s/%d", manager.directory, step)


def restore(manager: ocp.CheckpointManager, template: TrainState, step: Optional[int] = None
            ) -> tuple[TrainState, dict[str, Any]]:
    """Restores the latest (or given) checkpoint into the structure of `template`."""
    step = manager.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      jax.tree_util.tree_map(np.asarray, template._asdict()))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return TrainState(**restored["state"]), dict(restored["meta"])


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
        f"'{CHECKPOINT_DIR}' directory, or one step directory inside it.")


def load_network(path: str, network: str = "online") -> tuple[dict, dict, dict]:
    """(params, state, config) of the online or target network of a checkpoint, as NumPy dicts."""
    if network not in ("online", "target"):
        raise ValueError(f"--network must be 'online' or 'target', got {network!r}.")
    step_dir = _step_directory(path)
    state = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
        meta = json.load(f)
    to_numpy = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
    return (to_numpy(state[f"{network}_params"]), to_numpy(state[f"{network}_state"]),
            meta.get("config", {}))
