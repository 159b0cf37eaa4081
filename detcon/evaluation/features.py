"""The frozen torso in inference mode: building it from a checkpoint or a config, and running it.

Parameters stay fixed and BatchNorm uses its moving averages (is_training=False); the forward is
pmapped over the local devices and fed `[D, b, S, S, 3]` batches of images in [0, 1].
"""

from typing import Any, Callable, Iterable, Iterator, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from detcon import devices as devices_lib
from detcon.models import networks
from detcon.ops import augment
from detcon.weights.torso import FrozenTorso


def host_tree(tree: Any) -> dict:
    """A Haiku params/state tree as nested dicts of np.ndarray."""
    return jax.tree_util.tree_map(np.asarray, hk.data_structures.to_mutable_dict(tree))


def unit_variance_statistics(state: dict) -> dict:
    """BatchNorm moving variances set to 1 (means stay 0): PyTorch's initial running statistics.

    Haiku's moving averages start at 0, so an untouched network in inference mode would divide by
    sqrt(eps) in every BatchNorm (x316 per layer) and overflow; with variance 1 the random
    baseline's BatchNorms are the identity, as in a freshly built torchvision ResNet.
    """
    out = {}
    for module, leaves in state.items():
        is_variance = module.endswith("var_ema")
        out[module] = {
            name: (np.ones_like(value) if is_variance and name in ("average", "hidden") else value)
            for name, value in leaves.items()
        }
    return out


def random_init(depth: int, width_multiplier: int, seed: int, image_size: int = 64) -> FrozenTorso:
    """A freshly initialised torso (the untrained baseline) with unit BatchNorm statistics."""
    transformed = networks.torso_fn(depth, width_multiplier)
    params, state = transformed.init(
        jax.random.PRNGKey(seed), jnp.zeros((1, image_size, image_size, 3)), is_training=True
    )
    return FrozenTorso(
        depth, width_multiplier, host_tree(params), unit_variance_statistics(host_tree(state))
    )


def _is_moving_average(module: str) -> bool:
    return module.endswith("mean_ema") or module.endswith("var_ema")


def recompute_batch_norm(
    torso: FrozenTorso, images: np.ndarray, batch_size: int = 128, max_images: int = 512
) -> FrozenTorso:
    """The torso with every BatchNorm's statistics measured on `images` [N, S, S, 3] ("precise BN").

    Each chunk of `batch_size` images (the first `max_images`) runs in training mode with every
    moving average emptied (counter 0): Haiku's zero-debiased average after one update is then
    exactly that chunk's statistic, later layers seeing earlier layers normalised by it as in
    training. The chunks' means and variances are averaged. This puts trained and untrained
    torsos under one rule: statistics of the probe's own images, not those of the last augmented
    pretraining batches (or the identity of an untouched network).
    """
    if len(images) == 0:
        raise ValueError("recompute_batch_norm needs at least one image.")
    transformed = networks.torso_fn(torso.depth, torso.width_multiplier)

    @jax.jit
    def chunk_statistics(params, state, chunk):
        emptied = {
            module: (
                {name: jnp.zeros_like(value) for name, value in leaves.items()}
                if _is_moving_average(module)
                else leaves
            )
            for module, leaves in state.items()
        }
        _, new_state = transformed.apply(
            params, emptied, None, augment.normalize(chunk), is_training=True
        )
        return {m: new_state[m]["average"] for m in new_state if _is_moving_average(m)}

    images = images[:max_images]
    sums, count = None, 0
    for start in range(0, len(images), batch_size):
        chunk = np.asarray(images[start : start + batch_size])
        if chunk.dtype == np.uint8:
            chunk = chunk.astype(np.float32) / 255.0
        stats = jax.device_get(chunk_statistics(torso.params, torso.state, chunk))
        weight = len(chunk)  # a short last chunk counts by its size
        sums = (
            {m: v * weight for m, v in stats.items()}
            if sums is None
            else {m: sums[m] + v * weight for m, v in stats.items()}
        )
        count += weight
    state = {module: dict(leaves) for module, leaves in torso.state.items()}
    for module, total in sums.items():
        # Inference reads only `average`; the EMA's hidden value and counter are left as found.
        state[module]["average"] = np.asarray(total / count, np.float32)
    return torso._replace(state=state)


def make_feature_map_fn(torso: FrozenTorso) -> Callable[[Any, Any, jax.Array], jax.Array]:
    """apply(params, state, images [N, S, S, 3] in [0, 1]) -> stride-32 map [N, S/32, S/32, C]."""
    transformed = networks.torso_fn(torso.depth, torso.width_multiplier)

    def feature_map(params, state, images):
        fmap, _ = transformed.apply(
            params, state, None, augment.normalize(images), is_training=False
        )
        return jax.lax.stop_gradient(fmap.astype(jnp.float32))

    return feature_map


def pooled(fmap: jax.Array) -> jax.Array:
    """Global average pooling: [N, h, w, C] -> [N, C]."""
    return fmap.mean(axis=(1, 2))


class Extractor:
    """A pmapped frozen forward, compiled once; weights are placed on the local devices by
    `load` (again for each new checkpoint, without recompiling)."""

    def __init__(self, torso: FrozenTorso, reduce: Optional[Callable] = pooled):
        self._devices = jax.local_devices()
        feature_map = make_feature_map_fn(torso)
        self._forward = jax.pmap(
            lambda p, s, x: (reduce or (lambda f: f))(feature_map(p, s, x)),
            axis_name=devices_lib.AXIS,
        )
        self.load(torso)

    def load(self, torso: FrozenTorso) -> None:
        """Places a torso's weights (same architecture) on the devices for the next calls."""
        self._params = devices_lib.replicate(torso.params, self._devices)
        self._state = devices_lib.replicate(torso.state, self._devices)

    @property
    def num_devices(self) -> int:
        return len(self._devices)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features of a device batch [D, b, S, S, 3] -> [D * b, ...] on the host."""
        out = self._forward(self._params, self._state, devices_lib.shard(images, self._devices))
        out = np.asarray(out)
        return out.reshape((-1,) + out.shape[2:])


def extract(
    extractor: Extractor,
    batches: Iterable[dict[str, np.ndarray]],
    total: Optional[int] = None,
    description: str = "features",
    keep_unlabelled: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, ...], labels [N]) over `batches` of {image [D, b, ...], label [D, b]}.

    Rows with label -1 (batch padding, or unlabelled records) are dropped unless keep_unlabelled.
    """
    features, labels = [], []
    for batch in tqdm(batches, total=total, desc=description, unit="batch", leave=False):
        out = extractor(batch["image"])
        label = np.asarray(batch["label"]).reshape(-1)
        keep = np.ones_like(label, bool) if keep_unlabelled else label >= 0
        features.append(out[keep])
        labels.append(label[keep])
    if not features:
        raise ValueError(f"No batches to extract {description} from.")
    return np.concatenate(features), np.concatenate(labels)


def device_batches(
    images: np.ndarray, labels: np.ndarray, num_devices: int, per_device: int
) -> Iterator[dict[str, np.ndarray]]:
    """Arrays [N, ...] (uint8 or [0, 1]) as float batches {image [D, b, ...], label [D, b]}."""
    step = num_devices * per_device
    for start in range(0, len(images), step):
        chunk, chunk_labels = images[start : start + step], labels[start : start + step]
        pad = step - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            chunk_labels = np.concatenate([chunk_labels, -np.ones((pad,), chunk_labels.dtype)])
        if chunk.dtype == np.uint8:  # converted per batch: a whole uint8 set stays 4x smaller
            chunk = chunk.astype(np.float32) / 255.0
        yield {
            "image": chunk.reshape((num_devices, per_device) + chunk.shape[1:]),
            "label": chunk_labels.reshape(num_devices, per_device),
        }
