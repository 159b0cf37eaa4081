"""How spread out a set of features is: a collapse check beside the probes' scores."""

import numpy as np


def feature_spread(features: np.ndarray) -> dict[str, float]:
    """Spread of features [N, D] after L2 normalisation (as kNN compares them).

    - `mean_dimension_std`: the per-dimension standard deviation averaged over dimensions
      (0 when every feature is the same direction; 1/sqrt(D) for isotropic unit vectors);
    - `effective_rank`: exp(entropy of the singular values of the centred features normalised to
      sum 1) (Roy & Vetterli 2007): k for k equal, orthogonal directions of variation, 0 when
      every feature is the same.
    """
    x = np.asarray(features, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centred = x - x.mean(axis=0)
    singular = np.linalg.svd(centred, compute_uv=False)
    # Unit-norm rows bound the singular values by sqrt(N); below 1e-9 of that is rounding.
    singular = singular[singular > 1e-9 * np.sqrt(len(x))]
    if singular.size == 0:
        rank = 0.0
    else:
        p = singular / singular.sum()
        rank = float(np.exp(-(p * np.log(p)).sum()))
    return {"mean_dimension_std": float(x.std(axis=0).mean()), "effective_rank": rank}
