"""Weighted k-nearest-neighbour classification (InstDisc / DINO `eval_knn.py` semantics).

Each query's k most cosine-similar training features vote for their labels with weight
exp(similarity / T); the class with the largest summed weight wins. Pure jnp; no config reads.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from detcon.ops import losses

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def knn_class_scores(
    train_features: jax.Array,
    train_labels: jax.Array,
    query_features: jax.Array,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> jax.Array:
    """Summed vote weights [Q, num_classes] of queries [Q, D] against a bank [N, D], labels [N]."""
    bank = losses.l2_normalize(train_features.astype(jnp.float32))
    queries = losses.l2_normalize(query_features.astype(jnp.float32))
    similarity = queries @ bank.T  # [Q, N]
    top_similarity, top_index = jax.lax.top_k(similarity, min(k, bank.shape[0]))
    weights = jnp.exp(top_similarity / temperature)  # [Q, k]
    votes = jax.nn.one_hot(train_labels[top_index], num_classes, dtype=jnp.float32)  # [Q, k, C]
    return jnp.einsum("qk,qkc->qc", weights, votes)


def knn_scores(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    query_features: np.ndarray,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int = 1024,
) -> np.ndarray:
    """knn_class_scores over query chunks (bounds the [chunk, N] similarity matrix): [Q, C]."""
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs a non-empty labelled training set.")
    bank = jnp.asarray(train_features)
    labels = jnp.asarray(train_labels, jnp.int32)
    chunks = []
    for start in range(0, query_features.shape[0], chunk_size):
        chunk = query_features[start : start + chunk_size]
        # Pad the last chunk to the full size so every chunk reuses one compilation.
        padded = np.zeros((chunk_size,) + chunk.shape[1:], chunk.dtype)
        padded[: len(chunk)] = chunk
        scores = knn_class_scores(bank, labels, jnp.asarray(padded), num_classes, k, temperature)
        chunks.append(np.asarray(scores)[: len(chunk)])
    return np.concatenate(chunks) if chunks else np.zeros((0, num_classes), np.float32)


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows of scores [N, C] whose label [N] is among the k highest scores."""
    if len(labels) == 0:
        raise ValueError("No labelled examples to score.")
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))
