"""Detection probe: a DETR head on a frozen torso's C5 map, trained on COCO-style boxes and classes.

The torso runs once per image (BatchNorm in inference mode, no gradient), so the head trains on
precomputed C5 maps: input projection -> sine encoding -> transformer -> class and box heads
(`detcon.models.detr.detection_head`, the modules and names of the DETReg detector). The head
starts random or from a DETReg run: its input projection, queries, transformer and box MLP are
copied, its class head is new (DETReg's fine-tuning loads everything but `class_embed`,
amirbar/DETReg main.py:152-161), as the class count differs. Training is DETR's criterion with
auxiliary losses and its fine-tuning optimiser (AdamW 1e-4, weight decay 1e-4, clip 0.1,
matcher class 1 / L1 5 / GIoU 2, no-object weight 0.1), on the images as they are (no
augmentation) at a constant rate.
"""

import json
import os
from typing import Callable, Iterator, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from detcon.data.build import region_priors
from detcon.evaluation import coco_scoring, voc
from detcon.models import detr
from detcon.ops import losses
from detcon.workdir import checkpoint as checkpoint_lib

WEIGHT_DECAY = 1e-4  # facebookresearch/detr main.py defaults, as DETReg fine-tunes
CLIP_NORM = 0.1
# The DETReg detector's modules that initialise the head; 'class_embed' is always new.
TRANSFERRED = ("input_proj", "query_embed", "transformer", "bbox_embed")
HEAD_MODULES = TRANSFERRED + ("class_embed",)
MAX_DETECTIONS = 100  # per image, COCO's AR@100 budget


class DetectionSet(NamedTuple):
    """One split's images (enlarged for the torso) and objects, padded to T per image."""

    images: np.ndarray  # uint8 [N, S, S, 3], resized (aspect kept), padded bottom/right
    pad_mask: np.ndarray  # bool [N, S, S], True on image pixels
    boxes: np.ndarray  # float32 [N, T, 4] cxcywh normalised by the image
    classes: np.ndarray  # int32 [N, T] index into category_ids
    valid: np.ndarray  # bool [N, T]
    image_ids: np.ndarray  # int64 [N] COCO image ids
    sizes: np.ndarray  # int64 [N, 2] (height, width) of the stored image
    stored: list  # uint8 [h, w, 3] per image, as stored (for the region priors)
    category_ids: tuple  # class index k -> COCO category id


class HeadSpec(NamedTuple):
    """The head's sizes."""

    num_queries: int
    num_classes: int  # real classes; the class head has one more logit (no object, last)
    transformer: detr.TransformerConfig


def instances_path(root: str, split: str) -> str:
    """The COCO-style instances of `split` beside a VOC-layout root (scenes.coco_path's file)."""
    return os.path.join(root, f"instances_{split}.json")


def read_instances(root: str, split: str, check_only: bool = False) -> dict:
    """The COCO dict of `split` ({} with check_only: the file is only looked for); a missing
    file is a one-line FileNotFoundError naming it."""
    path = instances_path(root, split)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: the detection probe needs COCO-style instances beside the VOC "
            "set; rebuild the scenes with scripts/make_scenes.py (it writes "
            "voc/instances_{train,val}.json)."
        )
    if check_only:
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def load_split(root: str, split: str, image_size: int) -> tuple[DetectionSet, dict]:
    """(DetectionSet, COCO dict) of `split`: images read from root/JPEGImages, resized so the
    longer side is image_size (a multiple of 32) and padded square."""
    if image_size % 32 or image_size <= 0:
        raise ValueError(f"--det_image_size={image_size} must be a positive multiple of 32.")
    dataset = read_instances(root, split)
    category_ids = tuple(sorted(int(c["id"]) for c in dataset["categories"]))
    class_of = {c: k for k, c in enumerate(category_ids)}
    objects = {image["id"]: [] for image in dataset["images"]}
    for annotation in dataset["annotations"]:
        if not annotation.get("iscrowd", 0):  # crowd regions are never targets
            objects[annotation["image_id"]].append(annotation)
    num = len(dataset["images"])
    if not num:
        raise ValueError(f"{instances_path(root, split)} lists no images.")
    most = max(1, max(len(v) for v in objects.values()))
    images = np.zeros((num, image_size, image_size, 3), np.uint8)
    pad_mask = np.zeros((num, image_size, image_size), bool)
    boxes = np.zeros((num, most, 4), np.float32)
    classes = np.zeros((num, most), np.int32)
    valid = np.zeros((num, most), bool)
    sizes = np.zeros((num, 2), np.int64)
    stored = []
    for i, info in enumerate(dataset["images"]):
        path = os.path.join(root, "JPEGImages", info["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is listed in {instances_path(root, split)} but missing."
            )
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        height, width = pixels.shape[:2]
        # A zero label marks the image pixels once resize_and_pad has padded it with 255.
        images[i], marker = voc.resize_and_pad(
            pixels, np.zeros((height, width), np.uint8), image_size
        )
        pad_mask[i] = marker == 0
        sizes[i] = height, width
        stored.append(pixels)
        for j, annotation in enumerate(objects[info["id"]]):
            x, y, w, h = (float(v) for v in annotation["bbox"])
            boxes[i, j] = (x + w / 2) / width, (y + h / 2) / height, w / width, h / height
            classes[i, j] = class_of[int(annotation["category_id"])]
            valid[i, j] = True
    image_ids = np.array([image["id"] for image in dataset["images"]], np.int64)
    data = DetectionSet(
        images, pad_mask, boxes, classes, valid, image_ids, sizes, stored, category_ids
    )
    return data, dataset


def spec_from_config(config: dict, num_classes: int) -> HeadSpec:
    """The head's sizes: those of a DETReg run's config (its 'detreg' group), else DETR's."""
    settings = config.get("detreg") or {}
    default = detr.TransformerConfig()
    fields = {
        f: type(getattr(default, f))(settings.get(f, getattr(default, f))) for f in default._fields
    }
    return HeadSpec(
        int(settings.get("num_queries", 100)), num_classes, detr.TransformerConfig(**fields)
    )


def make_head(spec: HeadSpec) -> hk.Transformed:
    """init/apply of (c5 [b, h, w, C], pad_mask [b, S, S], dropout keys [b, 2] or None) ->
    (logits [L, b, Q, C+1], boxes [L, b, Q, 4])."""

    def forward(c5, pad_mask, dropout_keys):
        logits, boxes, _ = detr.detection_head(
            c5, pad_mask, dropout_keys, spec.num_queries, spec.num_classes, spec.transformer
        )
        return logits, boxes

    return hk.transform(forward)


def init_head(spec: HeadSpec, maps: np.ndarray, pad_mask: np.ndarray, seed: int) -> dict:
    """Freshly initialised head parameters (DETR's initialisers) for maps like `maps`."""
    # Jitted: Haiku's eager init dispatches every op of the transformer's init one by one.
    init = jax.jit(lambda key, x, mask: make_head(spec).init(key, x, mask, None))
    params = init(jax.random.PRNGKey(seed), maps[:1], pad_mask[:1])
    return jax.tree_util.tree_map(np.asarray, hk.data_structures.to_mutable_dict(params))


def _top_module(name: str) -> str:
    return name.split("/")[0]


def head_params(network_params: dict) -> dict:
    """The detector-head modules (HEAD_MODULES) of a whole DETReg network's params."""
    return {m: v for m, v in network_params.items() if _top_module(m) in HEAD_MODULES}


def transfer(params: dict, source: dict) -> dict:
    """`params` with every TRANSFERRED module's leaves taken from `source` (a DETReg network's
    params); the class head stays as it is. Missing or differently shaped leaves are an error."""
    out = {}
    for module, leaves in params.items():
        if _top_module(module) not in TRANSFERRED:
            out[module] = leaves
            continue
        theirs = source.get(module, {})
        for name, value in leaves.items():
            if name not in theirs or np.shape(theirs[name]) != np.shape(value):
                found = np.shape(theirs[name]) if name in theirs else "nothing"
                raise ValueError(
                    f"--det_init: {module}/{name} is {found} in the DETReg run but the head "
                    f"needs {np.shape(value)}."
                )
        out[module] = {name: np.asarray(theirs[name]) for name in leaves}
    return out


def load_detreg(path: str) -> tuple[dict, dict]:
    """(network params, config) of a DETReg run's workdir or step directory."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--det_init={path} does not exist: give a DETReg run or 'random'.")
    params, _, config = checkpoint_lib.load_network(path, "online")
    if config.get("method") != "detreg":
        raise ValueError(
            f"--det_init={path} is a {config.get('method')!r} run; the head comes from a "
            "DETReg run (configs/detreg.py) or 'random'."
        )
    return params, config


def _batches(num: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """`steps` index batches of `batch_size`, drawn epoch by epoch without replacement."""
    rng = np.random.default_rng(seed)
    order = np.zeros((0,), np.int64)
    for _ in range(steps):
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(num)])
        yield order[:batch_size]
        order = order[batch_size:]


def train_head(
    spec: HeadSpec,
    params: dict,
    maps: np.ndarray,
    data: DetectionSet,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    on_progress: Optional[Callable[[int, float], None]] = None,
) -> tuple[dict, float]:
    """(trained params, mean loss of the last tenth of the steps): DETR's criterion with
    auxiliary losses on maps [N, h, w, C] and `data`'s boxes, AdamW with clipping, dropout on."""
    head = make_head(spec)
    optimizer = optax.chain(
        optax.clip_by_global_norm(CLIP_NORM),
        optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY),
    )
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, maps, pad_mask, boxes, classes, valid, key):
        keys = jax.random.split(key, maps.shape[0])

        def loss_fn(p):
            logits, pred_boxes = head.apply(p, None, maps, pad_mask, keys)
            total, _, _ = losses.detr_loss(logits, pred_boxes, boxes, classes, valid)
            return total

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch_size = min(batch_size, len(maps))
    every = max(1, steps // 10)
    key = jax.random.PRNGKey(seed + 1)
    recent = []
    for i, index in enumerate(_batches(len(maps), batch_size, steps, seed), start=1):
        key, step_key = jax.random.split(key)
        params, opt_state, loss = step(
            params,
            opt_state,
            maps[index],
            data.pad_mask[index],
            data.boxes[index],
            data.classes[index],
            data.valid[index],
            step_key,
        )
        recent = (recent + [loss])[-every:]
        if on_progress is not None and (i % every == 0 or i == steps):
            on_progress(i, float(np.mean(jax.device_get(recent))))
    final = float(np.mean(jax.device_get(recent))) if recent else float("nan")
    return jax.tree_util.tree_map(np.asarray, params), final


def predict(
    spec: HeadSpec, params: dict, maps: np.ndarray, pad_mask: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The last decoder layer's class probabilities [N, Q, C+1] and boxes [N, Q, 4] (cxcywh
    normalised), dropout off."""
    head = make_head(spec)

    @jax.jit
    def forward(x, mask):
        logits, boxes = head.apply(params, None, x, mask, None)
        return jax.nn.softmax(logits[-1].astype(jnp.float32), axis=-1), boxes[-1]

    probs, boxes = [], []
    for start in range(0, len(maps), batch_size):
        x, mask = maps[start : start + batch_size], pad_mask[start : start + batch_size]
        count = len(x)
        if count < batch_size:  # one compiled shape
            x = np.concatenate([x, np.repeat(x[-1:], batch_size - count, 0)])
            mask = np.concatenate([mask, np.repeat(mask[-1:], batch_size - count, 0)])
        p, b = jax.device_get(forward(x, mask))
        probs.append(p[:count])
        boxes.append(b[:count])
    return np.concatenate(probs), np.concatenate(boxes)


def _ranked(
    data: DetectionSet, scores: np.ndarray, boxes: np.ndarray, categories: np.ndarray
) -> list[dict]:
    """COCO results of per-query scores [N, Q], boxes [N, Q, 4] (cxcywh normalised) and
    categories [N, Q]: the MAX_DETECTIONS best per image, in the stored image's pixels."""
    per_image = [[], [], []]
    for i, (height, width) in enumerate(data.sizes):
        order = np.argsort(-scores[i], kind="stable")[:MAX_DETECTIONS]
        per_image[0].append(coco_scoring.normalised_to_pixels(boxes[i, order], height, width))
        per_image[1].append(scores[i, order])
        per_image[2].append(categories[i, order])
    return coco_scoring.results(data.image_ids, *per_image)


def class_detections(data: DetectionSet, probs: np.ndarray, boxes: np.ndarray) -> list[dict]:
    """DETR's PostProcess: each query's most likely real class, scored by its probability."""
    real = probs[..., :-1]
    categories = np.asarray(data.category_ids)[np.argmax(real, axis=-1)]
    return _ranked(data, np.max(real, axis=-1), boxes, categories)


def objectness_detections(data: DetectionSet, probs: np.ndarray, boxes: np.ndarray) -> list[dict]:
    """Class-agnostic detections: every query scored 1 - p(no object), category 1."""
    scores = 1.0 - probs[..., -1]
    return _ranked(data, scores, boxes, np.full(scores.shape, coco_scoring.AGNOSTIC_CATEGORY))


def prior_detections(
    data: DetectionSet, priors: list[region_priors.RegionPriors], top_k: int, seed: int
) -> list[dict]:
    """Class-agnostic detections of each image's region priors (`priors`, one per stored image),
    ranked by one pipeline draw: the first top_k, or all when 0."""
    rng = np.random.default_rng(seed)
    drawn = [coco_scoring.ranked_priors(p, rng, top_k) for p in priors]
    agnostic = [np.full(len(s), coco_scoring.AGNOSTIC_CATEGORY) for _, s in drawn]
    boxes, scores = [b for b, _ in drawn], [s for _, s in drawn]
    return coco_scoring.results(data.image_ids, boxes, scores, agnostic)


def random_detections(data: DetectionSet, count: int, seed: int) -> list[dict]:
    """Class-agnostic detections of `count` uniform random boxes per image."""
    rng = np.random.default_rng(seed)
    drawn = [coco_scoring.random_boxes(rng, h, w, count) for h, w in data.sizes]
    agnostic = [np.full(count, coco_scoring.AGNOSTIC_CATEGORY)] * len(drawn)
    return coco_scoring.results(
        data.image_ids, [b for b, _ in drawn], [s for _, s in drawn], agnostic
    )
