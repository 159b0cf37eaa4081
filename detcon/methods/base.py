"""The method interface: what a self-supervised objective brings to the shared update step.

A new method (inside or outside this package) writes one `Method` subclass, decorated with
`@detcon.methods.register`, and a config whose `method` field names it. It must define:
`name`, `needs_masks`, `has_target`; `make_network` (whose outputs carry `.logits` for the online
probe, see `ProbeOutputs`); `view_inputs`; `loss`. It may override `data_needs`, `target_decay`,
`init_extra`/`update_extra` (queues), `target_forward`, `batch_metrics`, `resize` (its head sizes
for small runs) and `flops_per_image`. It gets for free: the pmapped step (keys, gradient mean,
optimiser, target EMA), checkpoints and resume, the online linear probe, logging, the tf.data
pipeline, export, and the registry's contract tests (finite step, 1 vs 4 devices, one trace,
exact resume). The trainer (`detcon.train.step`) owns the sequence around the hooks:
keys -> inputs -> target forward -> grad of the loss -> pmean -> optimiser -> target update.
"""

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Optional, Protocol, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections

from detcon.ops import losses

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class ProbeOutputs(Protocol):
    """What every network's per-view outputs must carry: the online probe's logits [b, classes]
    (computed on stop-gradient torso features, so the probe never trains the torso)."""

    logits: jax.Array


class DataNeeds(NamedTuple):
    """What a method needs from the input pipeline."""

    masks: bool  # batches carry FH masks fh_mask1/fh_mask2 [b, S, S]
    max_mask_id: int = 256  # mask ids per view are renumbered below this; more fold into the last
    # Region-prior boxes per example (DETReg's top-k selective-search boxes); 0: none. Batches
    # then carry region_boxes [b, k, 4] (cxcywh, normalised to the unpadded image) and
    # region_valid [b, k] bool, and pad_mask [b, S, S] bool (True on image pixels).
    num_regions: int = 0
    # DetCo's local branch: each view also gets its own jigsaw crop jigsaw1/jigsaw2 [b, J, J, 3]
    # (area 0.6-1 of the image, flipped, resized to J px); 0: none.
    jigsaw_size: int = 0


@dataclasses.dataclass(frozen=True)
class HeadSizes:
    """Head and buffer sizes of a run smaller than the recipe's (tests, study budgets)."""

    hidden: Callable[[int], int]  # recipe hidden-layer width -> this run's width
    output: Optional[int] = None  # projection output width; None keeps the recipe's
    num_samples: Optional[int] = None  # masks sampled per view (DetCon)
    queue_size: Optional[int] = None  # queue length, whole global batches (MoCo family)
    patch_size: Optional[int] = None  # jigsaw cell side in pixels (DetCo)


class Forward(NamedTuple):
    """A network's outputs for the views of one step and its updated state (BatchNorm averages)."""

    outputs: tuple[Any, ...]  # one outputs NamedTuple per view
    state: hk.State


class Method(abc.ABC):
    """One self-supervised objective; instantiated with the run's config and step count."""

    name: ClassVar[str]
    needs_masks: ClassVar[bool]  # whether batches must carry FH masks (fh_mask1/fh_mask2)
    has_target: ClassVar[bool]  # whether a target (EMA / momentum) network is kept
    target_init: ClassVar[str] = "copy"  # "copy": target = online at init; "own_key": own draw
    console_metrics: ClassVar[tuple[str, ...]] = ()  # shown on the console besides loss and top1
    keys_per_view: ClassVar[int] = 1  # per-example PRNG keys each view's inputs use
    # Which views each network encodes: both by default; MoCo's asymmetric loss encodes view 0
    # with the online (query) network only and view 1 with the target (key) network only.
    online_views: ClassVar[tuple[int, ...]] = (0, 1)
    target_views: ClassVar[tuple[int, ...]] = (0, 1)
    # The method's own config fields that `resize` maps: hidden widths, projection output width.
    hidden_size_fields: ClassVar[tuple[str, ...]] = ()
    output_size_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ml_collections.ConfigDict, total_steps: int):
        self.config = config
        self.settings = config[self.name]  # the method's own config group
        self.total_steps = total_steps

    @classmethod
    def data_needs(cls, config: ml_collections.ConfigDict) -> DataNeeds:
        """What the input pipeline must give this method under `config`."""
        return DataNeeds(
            masks=cls.needs_masks, max_mask_id=config[cls.name].get("max_mask_id", 256)
        )

    @classmethod
    def resize(cls, settings: ml_collections.ConfigDict, sizes: HeadSizes) -> None:
        """Sets the method's head widths and buffers in its config group `settings` to `sizes`."""
        for field in cls.hidden_size_fields:
            if settings[field] > 0:  # 0 means no such layer
                settings[field] = max(1, sizes.hidden(settings[field]))
        if sizes.output is not None:
            for field in cls.output_size_fields:
                settings[field] = sizes.output
        for field in ("num_samples", "queue_size", "patch_size"):
            value = getattr(sizes, field)
            if value is not None and field in settings:
                settings[field] = value

    # ---------------------------------------------------------------------------------- networks

    @abc.abstractmethod
    def make_network(self, axis_name: Optional[str]) -> hk.TransformedWithState:
        """init/apply of `forward(view_inputs, is_training, online)` -> `ProbeOutputs` per view.

        `online=False` builds the target network's view (e.g. without predictor); both share
        parameter names so the target is a copy of the online parameters' structure.
        """

    @abc.abstractmethod
    def view_inputs(self, keys: jax.Array, batch: Batch, view: int) -> NamedTuple:
        """The network inputs of view 0 or 1 from a per-device batch; keys [b, keys_per_view, 2]."""

    def dummy_view(self) -> NamedTuple:
        """View inputs of one blank example, for initialisation."""
        size = self.config.data.image_size
        batch = {
            "view1": jnp.zeros((1, size, size, 3)),
            "view2": jnp.zeros((1, size, size, 3)),
            "fh_mask1": jnp.zeros((1, size, size), jnp.int32),
            "fh_mask2": jnp.zeros((1, size, size), jnp.int32),
        }
        keys = jnp.zeros((1, self.keys_per_view, 2), jnp.uint32)
        return self.view_inputs(keys, batch, 0)

    # ------------------------------------------------------------------------------------- loss

    @abc.abstractmethod
    def loss(
        self,
        online: Sequence[Any],
        target: Optional[Sequence[Any]],
        views: Sequence[Any],
        extra: Any,
        axis_name: Optional[str],
    ) -> tuple[jax.Array, Metrics]:
        """(scalar loss, metrics) from the online outputs of `online_views` and the stop-gradient
        target outputs of `target_views` (one per view, in that order); `views` holds all inputs."""

    def batch_metrics(self, batch: Batch) -> Metrics:
        """Metrics read from the per-device batch itself (e.g. folded mask ids); none by default."""
        del batch
        return {}

    # ------------------------------------------------------------------------ target and extra

    def target_decay(self, step: jax.Array) -> jax.Array:
        """EMA decay of the target network at `step` (BYOL's cosine ramp to 1 by default)."""
        return target_ema(step, base_ema=self.settings.base_ema, total_steps=self.total_steps)

    def init_extra(self) -> Any:
        """Extra state carried in TrainState.extra (e.g. queues); an empty dict by default."""
        return {}

    def update_extra(
        self,
        extra: Any,
        online: Sequence[Any],
        target: Optional[Sequence[Any]],
        step_key: jax.Array,
        axis_name: Optional[str],
    ) -> Any:
        """The extra state after this step (e.g. keys enqueued); unchanged by default."""
        del online, target, step_key, axis_name
        return extra

    def sync_online_state(self, state: hk.State, axis_name: Optional[str]) -> hk.State:
        """The online BatchNorm averages to keep; unchanged (cross-replica BN is already equal)."""
        del axis_name
        return state

    def target_forward(
        self,
        network: hk.TransformedWithState,
        params: hk.Params,
        state: hk.State,
        views: Sequence[Any],
        step_key: jax.Array,
        axis_name: Optional[str],
    ) -> Forward:
        """The target network on each of `views` (target_views), BatchNorm in training mode."""
        del step_key, axis_name
        return forward_views(
            network,
            params,
            state,
            views,
            self.config.model.one_pass_views,
            is_training=True,
            online=False,
        )

    # ---------------------------------------------------------------------------- benchmarking

    def flops_per_image(self, torso_forward_flops: float) -> float:
        """Model FLOPs per image of one step, from the torso's forward FLOPs at this image size.

        Each online view forward and backward (3 forward-equivalents), plus a forward per target
        view when there is a target network; heads are small and left out.
        """
        target = len(self.target_views) if self.has_target else 0
        return (3.0 * len(self.online_views) + target) * torso_forward_flops


def forward_views(
    network: hk.TransformedWithState,
    params: hk.Params,
    state: hk.State,
    views: Sequence[Any],
    one_pass: bool = True,
    **kwargs: Any,
) -> Forward:
    """Applies `network` to every view with BatchNorm statistics per view.

    one_pass: the views go through as one stacked batch (networks.batch_norm_mode keeps the
    statistics per view), else one apply per view, threading the state; both give equal results.
    """
    if one_pass and len(views) > 1:
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *views)
        out, state = network.apply(params, state, None, stacked, num_views=len(views), **kwargs)
        split = lambda x: None if x is None else jnp.split(x, len(views), axis=0)
        per_leaf = [split(x) for x in out]
        return Forward(
            tuple(
                type(out)(*(None if p is None else p[v] for p in per_leaf))
                for v in range(len(views))
            ),
            state,
        )
    outputs = []
    for view in views:
        out, state = network.apply(params, state, None, view, **kwargs)
        outputs.append(out)
    return Forward(tuple(outputs), state)


def feature_std(x: jax.Array) -> jax.Array:
    """Mean over dims of the std over rows of L2-normalised features [..., D] (collapse check)."""
    x = losses.l2_normalize(x.reshape(-1, x.shape[-1]).astype(jnp.float32))
    return jnp.mean(jnp.std(x, axis=0))


def mean_over_devices(state: hk.State, axis_name: str) -> hk.State:
    """BatchNorm state averaged over `axis_name`; integer leaves (EMA counters, equal on every
    device) keep their value and dtype, so the state's types stay those it was compiled for."""
    return jax.tree_util.tree_map(
        lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x, state
    )


def target_ema(step: Union[int, jax.Array], *, base_ema: float, total_steps: int) -> jax.Array:
    """Scalar float32 EMA decay rising from base_ema at step 0 to 1 at total_steps (cosine)."""
    progress = jnp.minimum(jnp.asarray(step, jnp.float32), float(total_steps)) / total_steps
    return 1.0 - (1.0 - base_ema) * (1.0 + jnp.cos(jnp.pi * progress)) / 2.0
