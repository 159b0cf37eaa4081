"""A method written outside the detcon package, in the file its config lives in.

SimSiam's objective (Chen & He, CVPR 2021: negative cosine between one view's prediction and the
stop-gradient projection of the other, symmetrised; no target network, no negatives) on BYOL's
heads and views. It shows the plug-in path of the README's "Adding a method"; its optimiser and
sizes are the shared defaults, not SimSiam's recipe.

  python -m detcon.main_loop --config=tests/external_method/simsiam.py --mock_data \
      --max_steps=2 --batch_size=8 --config.model.depth=10 --config.data.image_size=64 \
      --workdir=/tmp/w_simsiam
"""

from typing import Any, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections

from configs import base as base_config
from detcon import methods
from detcon.methods import byol
from detcon.models import heads as model_lib
from detcon.ops import losses


def negative_cosine(prediction: jax.Array, projection: jax.Array) -> jax.Array:
    """Mean over rows of -cos(p, stop_gradient(z)) for [B, D] inputs (SimSiam's D)."""
    z = jax.lax.stop_gradient(projection)
    return -jnp.mean(jnp.sum(losses.l2_normalize(prediction) * losses.l2_normalize(z), axis=-1))


@methods.register
class SimSiam(methods.Method):
    """Symmetrised negative cosine between online predictions and stop-gradient projections."""

    name = "simsiam"
    needs_masks = False
    has_target = False
    hidden_size_fields = ("projector_hidden_size", "predictor_hidden_size")
    output_size_fields = ("projector_output_size",)
    console_metrics = ("simsiam_loss",)

    def make_network(self, axis_name: Optional[str]) -> hk.TransformedWithState:
        s = self.settings
        heads = model_lib.Heads(
            s.projector_hidden_size, s.projector_output_size, s.predictor_hidden_size
        )
        return model_lib.make_network(self.config.model, heads, axis_name, masked=False)

    def view_inputs(self, keys: jax.Array, batch: Any, view: int) -> model_lib.GlobalView:
        return byol.global_view(keys, batch[f"view{view + 1}"], byol.VIEWS[view])

    def loss(
        self,
        online: Sequence[model_lib.ViewOutputs],
        target: Optional[Sequence[model_lib.ViewOutputs]],
        views: Sequence[Any],
        extra: Any,
        axis_name: Optional[str],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        loss = 0.5 * (
            negative_cosine(online[0].prediction, online[1].projection)
            + negative_cosine(online[1].prediction, online[0].projection)
        )
        return loss, dict(simsiam_loss=loss)


def get_config() -> ml_collections.ConfigDict:
    """The shared defaults with SimSiam's heads (projector 2048, predictor bottleneck 512)."""
    c = base_config.get_config(
        "simsiam",
        dict(projector_hidden_size=2048, projector_output_size=2048, predictor_hidden_size=512),
    )
    c.lock()
    return c
