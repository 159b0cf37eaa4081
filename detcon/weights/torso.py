"""The one loader of a ResNet torso's weights, whatever holds them: a training run's workdir, one
checkpoint step directory, a DeepMind-style pickled .npy/.pkl release, or an .npz export.

Used by export (`scripts/export_checkpoint.py`), evaluation (`detcon.evaluate`, the study) and
training's `init_checkpoint`.
"""

import os
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from detcon.models import networks
from detcon.weights import export, pretrained
from detcon.workdir import checkpoint as checkpoint_lib


class FrozenTorso(NamedTuple):
    """A torso's architecture and its weights (host NumPy trees named 'res_net{depth}/...')."""

    depth: int
    width_multiplier: int
    params: dict
    state: dict


class Loaded(NamedTuple):
    """What `load` found: the torso, the run's config (a dict; {} for a weights file) and, for a
    file, how its names lined up with ours."""

    torso: FrozenTorso
    config: dict
    report: Optional[pretrained.MatchReport]


def _torso_subtree(tree: dict, depth: int) -> dict:
    """The modules of `tree` that belong to the torso ('res_net{depth}/...')."""
    root = networks.resnet_name(depth)
    return {k: v for k, v in tree.items() if k == root or k.startswith(root + "/")}


def from_network(params: dict, state: dict, model_config: Any) -> FrozenTorso:
    """The torso part of a whole network's params/state (e.g. a checkpoint's online network)."""
    depth, width = int(model_config["depth"]), int(model_config["width_multiplier"])
    torso_params = _torso_subtree(params, depth)
    if not torso_params:
        raise ValueError(
            f"The network holds no '{networks.resnet_name(depth)}' torso; does the "
            "checkpoint's config.model.depth match its weights?"
        )
    return FrozenTorso(depth, width, torso_params, _torso_subtree(state, depth))


def reference(depth: int, width_multiplier: int = 1) -> tuple[dict, dict]:
    """Zero-filled Haiku (params, state) of our torso; only names, shapes and dtypes matter."""
    images = np.zeros((1, 64, 64, 3), np.float32)
    # eval_shape traces without compiling or drawing random numbers: fast even for ResNet-200.
    shapes = jax.eval_shape(
        lambda x: networks.torso_fn(depth, width_multiplier).init(
            jax.random.PRNGKey(0), x, is_training=True
        ),
        images,
    )
    zeros = lambda tree: {
        m: {k: np.zeros(v.shape, v.dtype) for k, v in leaves.items()} for m, leaves in tree.items()
    }
    return zeros(shapes[0]), zeros(shapes[1])


def _load_run(path: str, network: str) -> Loaded:
    """The torso of a run's checkpoint and the run's config, architecture checked."""
    params, state, config = checkpoint_lib.load_network(path, network)
    if "model" not in config:
        raise ValueError(
            f"{path}: its metadata holds no config.model; it was not written by "
            "python -m detcon.main_loop."
        )
    torso = from_network(params, state, config["model"])
    found = export.infer_torso_architecture(torso.params)
    if found != (torso.depth, torso.width_multiplier):
        raise ValueError(
            f"{path}: config says ResNet-{torso.depth} x{torso.width_multiplier} but "
            f"the parameters hold ResNet-{found[0]} x{found[1]}."
        )
    return Loaded(torso, config, None)


def _load_file(path: str, network: str, allow_pickle: bool) -> Loaded:
    """The torso of a DeepMind-style or .npz checkpoint file, renamed to ours and complete."""
    loaded = pretrained.load_deepmind_checkpoint(path, allow_pickle=allow_pickle)
    source_params, _ = pretrained.split_checkpoint(loaded, network)
    depth, width = export.infer_torso_architecture(source_params)
    ref_params, ref_state = reference(depth, width)
    params, state, report = pretrained.match_torso_params(
        loaded, ref_params, ref_state, network=network
    )
    if not report.ok:
        raise ValueError(
            f"{path}: the ResNet-{depth} torso is incomplete; refusing weights with "
            f"holes in them.\n{report.summary()}"
        )
    return Loaded(FrozenTorso(depth, width, params, state), {}, report)


def load(path: str, network: str = "online", *, allow_pickle: bool = False) -> Loaded:
    """The torso at `path`, from any source listed above.

    Raises FileNotFoundError or ValueError with a one-line cause the caller can show as is.
    """
    if network not in ("online", "target"):
        raise ValueError(f"network must be 'online' or 'target', got {network!r}.")
    if os.path.isdir(path):
        return _load_run(path, network)
    if os.path.isfile(path):
        return _load_file(path, network, allow_pickle)
    raise FileNotFoundError(
        f"{path} does not exist: pass a run's workdir, a checkpoint step "
        "directory, or a .npy/.pkl/.npz torso file."
    )


def into_network(
    torso: FrozenTorso, params: dict, state: Optional[dict]
) -> tuple[dict, Optional[dict], pretrained.MatchReport]:
    """A whole network's (params, state) with its torso replaced by `torso`, and the report."""
    return pretrained.match_torso_params({**torso.params, **torso.state}, params, state)
