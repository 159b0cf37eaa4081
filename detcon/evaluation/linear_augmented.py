"""BYOL/DetCon ImageNet linear protocol: a linear classifier on the frozen torso, trained on random
resized crops with flips by SGD (Nesterov momentum 0.9, lr 0.2 x batch/256, cosine to zero, no
weight decay), pmapped over all local devices like pretraining. The BYOL release trains 80 epochs;
the default here is the 90 of the standard ImageNet linear protocol (MoCo, SimCLR, DetCon's tables).
"""

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from detcon import devices as devices_lib
from detcon.evaluation import features as features_lib
from detcon.weights import torso as torso_lib

BASE_LEARNING_RATE = 0.2
MOMENTUM = 0.9
DEFAULT_EPOCHS = 90


def make_optimizer(batch_size: int, total_steps: int) -> optax.GradientTransformation:
    """SGD with Nesterov momentum and a cosine schedule from 0.2 x batch/256."""
    peak = BASE_LEARNING_RATE * batch_size / 256
    return optax.sgd(
        optax.cosine_decay_schedule(peak, max(total_steps, 1)), momentum=MOMENTUM, nesterov=True
    )


def make_train_step(
    torso: torso_lib.FrozenTorso, optimizer: optax.GradientTransformation
) -> Callable:
    """pmapped (head, opt_state, torso params, torso state, images [D, b, ...], labels [D, b])
    -> (head, opt_state, loss); the torso runs in inference mode and receives no gradient."""
    feature_map = features_lib.make_feature_map_fn(torso)

    def step(head, opt_state, params, state, images, labels):
        features = features_lib.pooled(feature_map(params, state, images))  # stop-gradient inside

        def loss_fn(h):
            logits = features @ h["w"] + h["b"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(head)
        grads = jax.lax.pmean(grads, devices_lib.AXIS)
        updates, opt_state = optimizer.update(grads, opt_state, head)
        return (
            optax.apply_updates(head, updates),
            opt_state,
            jax.lax.pmean(loss, devices_lib.AXIS),
        )

    return jax.pmap(step, axis_name=devices_lib.AXIS)


def train(
    torso: torso_lib.FrozenTorso,
    batches: Iterator[dict[str, np.ndarray]],
    num_classes: int,
    feature_size: int,
    batch_size: int,
    total_steps: int,
) -> tuple[dict, float]:
    """Trains the head for total_steps batches; returns (host head {w [C, K], b [K]}, last loss)."""
    devices = jax.local_devices()
    optimizer = make_optimizer(batch_size, total_steps)
    head = {
        "w": jnp.zeros((feature_size, num_classes), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }
    p_step = make_train_step(torso, optimizer)
    replicated = devices_lib.replicate((head, optimizer.init(head)), devices)
    params = devices_lib.replicate(torso.params, devices)
    state = devices_lib.replicate(torso.state, devices)
    head_r, opt_r = replicated
    if total_steps < 1:
        raise ValueError(f"The augmented linear probe needs >= 1 step, got {total_steps}.")
    for _ in tqdm(range(total_steps), desc="linear (augmented)", unit="step", leave=False):
        batch = devices_lib.shard(next(batches), devices)
        head_r, opt_r, loss_r = p_step(head_r, opt_r, params, state, batch["image"], batch["label"])
    return devices_lib.unreplicate(head_r), float(devices_lib.unreplicate(loss_r))


def scores(head: dict, features: np.ndarray) -> np.ndarray:
    """Class scores [N, K] of pooled features [N, C]."""
    return features @ np.asarray(head["w"]) + np.asarray(head["b"])


def settings(epochs: int, batch_size: int, total_steps: int) -> dict[str, Any]:
    """The protocol's settings as written to the results file."""
    return {
        "mode": "augmented",
        "epochs": epochs,
        "batch_size": batch_size,
        "steps": total_steps,
        "optimizer": "sgd_nesterov",
        "momentum": MOMENTUM,
        "learning_rate": BASE_LEARNING_RATE * batch_size / 256,
        "schedule": "cosine",
        "augmentation": "random_resized_crop(0.08-1)+flip",
    }
