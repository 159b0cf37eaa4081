"""Linear probe on precomputed frozen features: multinomial logistic regression with an L2 sweep.

Features are standardised with the training set's statistics, each L2 weight of the sweep is fitted
to convergence with full-batch L-BFGS on 80 % of train and scored on the held-out 20 %, and the best
weight is refitted on all of train (the transfer linear evaluation of SimCLR and of Kornblith et
al., 'Do Better ImageNet Models Transfer Better?').
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from detcon.evaluation import knn

DEFAULT_L2_WEIGHTS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HELD_OUT_FRACTION = 0.2


def _objective(
    params: dict, features: jax.Array, labels: jax.Array, weights: jax.Array, l2_weight: jax.Array
) -> jax.Array:
    """Weighted mean cross-entropy of softmax(features @ w + b) plus l2_weight/2 * ||w||^2."""
    logits = features @ params["w"] + params["b"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    data = jnp.sum(weights * losses) / jnp.sum(weights)
    return data + 0.5 * l2_weight * jnp.sum(jnp.square(params["w"]))


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iterations"))
def fit_logistic_regression(
    features: jax.Array,
    labels: jax.Array,
    l2_weight: jax.Array,
    num_classes: int,
    weights: jax.Array | None = None,
    max_iterations: int = 500,
) -> dict:
    """L-BFGS fit of {w [D, K], b [K]} on standardised features [N, D], labels [N].

    weights [N] (default ones) select examples; 0/1 weights fit a subset with the same shapes,
    so the held-out sweep and the final fit share one compilation.
    """
    weights = jnp.ones(labels.shape, jnp.float32) if weights is None else weights
    objective = functools.partial(
        _objective, features=features, labels=labels, weights=weights, l2_weight=l2_weight
    )
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)
    params = {
        "w": jnp.zeros((features.shape[1], num_classes), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }

    def body(carry):
        params, state, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(
            grad, state, params, value=value, grad=grad, value_fn=objective
        )
        return optax.apply_updates(params, updates), state, optax.tree.norm(grad)

    def keep_going(carry):
        _, state, grad_norm = carry
        count = optax.tree_utils.tree_get(state, "count")
        return (count < max_iterations) & (grad_norm > 1e-6)

    init = (params, solver.init(params), jnp.asarray(jnp.inf, jnp.float32))
    params, _, _ = jax.lax.while_loop(keep_going, body, init)
    return params


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Each array [N, D] shifted and scaled by the per-dimension mean and std of `train`."""
    mean = train.mean(0)
    std = train.std(0) + 1e-6
    return [((x - mean) / std).astype(np.float32) for x in (train,) + others]


def predict_scores(params: dict, features: np.ndarray) -> np.ndarray:
    """Class scores [N, K] of standardised features [N, D]."""
    return np.asarray(features @ np.asarray(params["w"]) + np.asarray(params["b"]))


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    eval_features: np.ndarray,
    eval_labels: np.ndarray,
    num_classes: int,
    l2_weights: Sequence[float] = DEFAULT_L2_WEIGHTS,
    seed: int = 0,
) -> dict[str, Any]:
    """top1 (and top5 if >= 5 classes) on eval of the sweep-selected classifier; + sweep scores."""
    if len(train_labels) < 2:
        raise ValueError("The linear probe needs at least two labelled training examples.")
    train, evaluation = standardise(train_features, eval_features)
    order = np.random.default_rng(seed).permutation(len(train))
    held = max(1, int(round(HELD_OUT_FRACTION * len(train))))
    held_index = order[:held]
    fit_weights = np.ones(len(train), np.float32)
    fit_weights[held_index] = 0.0
    sweep = {}
    for l2 in l2_weights:
        params = fit_logistic_regression(
            train, train_labels, jnp.float32(l2), num_classes, jnp.asarray(fit_weights)
        )
        sweep[l2] = knn.top_k_accuracy(
            predict_scores(params, train[held_index]), train_labels[held_index]
        )
    best = max(l2_weights, key=lambda l2: (sweep[l2], l2))  # ties: the stronger regulariser
    params = fit_logistic_regression(
        train, train_labels, jnp.float32(best), num_classes, jnp.ones(len(train), jnp.float32)
    )
    scores = predict_scores(params, evaluation)
    result = {
        "top1": knn.top_k_accuracy(scores, eval_labels, 1),
        "l2_weight": best,
        "held_out_top1": {str(k): v for k, v in sweep.items()},
    }
    if num_classes >= 5:
        result["top5"] = knn.top_k_accuracy(scores, eval_labels, 5)
    return result
