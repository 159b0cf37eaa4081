"""A deterministic synthetic-scenes dataset for learning-signal studies: pretraining, VOC, kNN.

From one seed it writes, under one directory:

    scenes.json                        the generation settings, class names and counts
    pretrain/train-NNNNN-of-NNNNN      multi-object scenes with FH masks (the real-data schema and
    pretrain/fh_masks_train.json       writer), label = class with the most visible pixels
    voc/JPEGImages, SegmentationClass, ImageSets/Segmentation/{train,val}.txt
                                       other scenes with ground truth (0 background, 1..K shapes)
    voc/instances_{train,val}.json     the same scenes' objects, COCO-style (boxes, classes,
                                       RLE masks; file_name in voc/JPEGImages), for pycocotools
    classification/{train,validation}-NNNNN-of-NNNNN
                                       one centred object per image, label = shape class (1..K),
                                       classes balanced, for kNN and linear probes

Every image is drawn from its own generator seeded by (seed, part, index), so the parts never share
an image and any image can be re-rendered alone.  The directory is built in a staging folder and
renamed when complete; asking again with the same settings returns it untouched.
With `region_priors` the pretraining records also hold DETReg's selective-search regions
(detcon/data/build/region_priors.py; ~0.4 s per image, so off by default).
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable

import numpy as np

from detcon.data import image_codec, shards
from detcon.data.build import coco, fh_records, mask_job, publish, scene_render, voc

MANIFEST_NAME = "scenes.json"
MANIFEST_VERSION = 2  # 2: COCO-style instances beside the VOC set
PRETRAIN_DIRECTORY = "pretrain"
VOC_DIRECTORY = "voc"
CLASSIFICATION_DIRECTORY = "classification"
# Distinct streams per part: no image appears in two parts.
_STREAMS = {"pretrain": 0, "voc_train": 1, "voc_val": 2, "cls_train": 3, "cls_validation": 4}
# Single objects are larger than scene objects, so they fill an evaluation crop like a photo's
# subject; the star's tips (1.25 radii) still fit inside the 87.5 % centre crop.
_SINGLE_OBJECT_RADIUS = (0.18, 0.3)


@dataclasses.dataclass(frozen=True)
class SceneDatasetSpec:
    """Everything that determines the dataset; equal specs give byte-identical files."""

    seed: int = 0
    scene: scene_render.SceneParams = scene_render.SceneParams()
    num_pretrain: int = 2048
    num_voc_train: int = 512
    num_voc_val: int = 256
    num_classification_train: int = 1200
    num_classification_val: int = 600
    pretrain_shards: int = 4
    classification_shards: int = 2
    # None: scale 200 and a minimum segment of 30 pixels at 64 px, the minimum growing with area
    # (ImageNet's 1000/1000 would merge most objects into the background).  On the default
    # scenes: median 20 segments (5-95 %: 7-50), 94 % of pixels in a segment's majority object.
    fh: mask_job.FhParams | None = None
    # DETReg's region priors in the pretraining records (scripts/make_scenes.py --region_priors).
    region_priors: bool = False

    def __post_init__(self) -> None:
        counts = {
            "num_pretrain": self.num_pretrain,
            "num_voc_train": self.num_voc_train,
            "num_voc_val": self.num_voc_val,
            "num_classification_train": self.num_classification_train,
            "num_classification_val": self.num_classification_val,
            "pretrain_shards": self.pretrain_shards,
            "classification_shards": self.classification_shards,
        }
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if self.pretrain_shards > self.num_pretrain:
            raise ValueError(
                f"--pretrain_shards={self.pretrain_shards} exceeds --num_pretrain="
                f"{self.num_pretrain}; use at most one shard per image"
            )
        smallest = min(self.num_classification_train, self.num_classification_val)
        if self.classification_shards > smallest:
            raise ValueError(
                f"--classification_shards={self.classification_shards} exceeds the smaller "
                f"classification split ({smallest} images); use fewer shards"
            )

    def fh_params(self) -> mask_job.FhParams:
        """Returns the FH parameters: the given ones, or the defaults scaled to the image size."""
        if self.fh is not None:
            return self.fh
        min_size = max(1, round(30 * (self.scene.image_size / 64) ** 2))
        return mask_job.FhParams(scales=(200.0,), min_sizes=(min_size,))

    def to_json(self) -> dict:
        """Returns the spec as JSON-able data (the FH parameters resolved)."""
        fh = self.fh_params()
        fields = dataclasses.asdict(self)
        fields["fh"] = {"scales": list(fh.scales), "min_sizes": list(fh.min_sizes)}
        return fields


def coco_path(root: str, split: str) -> str:
    """Returns the COCO-style annotations of VOC split `split` of the dataset at `root`."""
    return os.path.join(root, VOC_DIRECTORY, f"instances_{split}.json")


def class_names() -> list[str]:
    """Returns the class names in label order: label k (1..K) is `class_names()[k - 1]`."""
    return list(scene_render.SHAPES)


def image_rng(seed: int, part: str, index: int) -> np.random.Generator:
    """Returns the generator of image `index` of `part` (one of the dataset's parts)."""
    return np.random.default_rng([seed, _STREAMS[part], index])


def pretrain_scene(spec: SceneDatasetSpec, index: int) -> scene_render.Scene:
    """Returns pretraining scene `index`."""
    return scene_render.random_scene(image_rng(spec.seed, "pretrain", index), spec.scene)


def voc_scene(spec: SceneDatasetSpec, split: str, index: int) -> scene_render.Scene:
    """Returns scene `index` of the VOC `split` ('train' or 'val')."""
    return scene_render.random_scene(image_rng(spec.seed, f"voc_{split}", index), spec.scene)


def classification_scene(spec: SceneDatasetSpec, split: str, index: int) -> scene_render.Scene:
    """Returns image `index` of classification `split`: one object of class `index % K`."""
    low, high = _SINGLE_OBJECT_RADIUS
    params = dataclasses.replace(spec.scene, min_radius=low, max_radius=high)
    rng = image_rng(spec.seed, f"cls_{split}", index)
    return scene_render.single_object_scene(rng, params, index % len(scene_render.SHAPES))


def dominant_class(scene: scene_render.Scene) -> int:
    """Returns the class (1..K) with the most pixels in `scene`, or 0 if it shows no object."""
    counts = np.bincount(scene.class_map.ravel(), minlength=len(scene_render.SHAPES) + 1)
    counts[0] = 0
    return int(np.argmax(counts)) if counts.any() else 0


def _jpeg(scene: scene_render.Scene) -> bytes:
    """Returns the JPEG bytes stored for a scene (the same in records and the VOC set)."""
    # 4:4:4 chroma: 4:2:0 smears the colour edges and textures of 64 px scenes (mean error 13.6
    # grey levels against 2.6, outside noise textures).
    return image_codec.encode_jpeg(scene.image, full_chroma=True)


def _record(
    jpeg: bytes, name: str, label: int, fh: mask_job.FhParams, region_priors: bool = False
) -> bytes:
    """Returns the serialized record of one image, made by the real-data writer."""
    synset = class_names()[label - 1] if label else ""
    return fh_records.encode_record(
        jpeg,
        filename=f"{name}.jpg",
        label=label,
        synset=synset,
        text=synset or None,
        scales=fh.scales,
        min_sizes=fh.min_sizes,
        with_region_priors=region_priors,
    )


def _write_shards(
    directory: str, split: str, num_records: int, num_shards: int, record: Callable[[int], bytes]
) -> None:
    """Writes records 0..num_records-1 of `split` into `num_shards` contiguous shards."""
    for index, (start, end) in enumerate(mask_job.shard_bounds(num_records, num_shards)):
        path = os.path.join(directory, shards.shard_name(split, index, num_shards))
        with fh_records.atomic_shard(path) as writer:
            for i in range(start, end):
                writer.write(record(i))


def _split_manifest(
    spec: SceneDatasetSpec, split: str, num_files: int, num_shards: int, region_priors: bool = False
) -> dict:
    """Returns the per-split manifest in mask_job's format (the input digest is the spec's)."""
    fh = spec.fh_params()
    digest = hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode()).hexdigest()
    return {
        "version": mask_job.MANIFEST_VERSION,
        "split": split,
        "num_files": num_files,
        "files_digest": digest,
        "num_shards": num_shards,
        "fh_scales": list(fh.scales),
        "fh_min_sizes": list(fh.min_sizes),
        "region_priors": region_priors,
        "seed": spec.seed,
        "generator": "detcon.data.build.scenes",
    }


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _write_pretrain(spec: SceneDatasetSpec, root: str) -> None:
    directory = os.path.join(root, PRETRAIN_DIRECTORY)
    os.makedirs(directory)
    fh = spec.fh_params()

    def record(index: int) -> bytes:
        scene = pretrain_scene(spec, index)
        jpeg = _jpeg(scene)
        name = f"scene_{index:06d}"
        return _record(jpeg, name, dominant_class(scene), fh, spec.region_priors)

    _write_shards(directory, "train", spec.num_pretrain, spec.pretrain_shards, record)
    _write_json(
        mask_job.manifest_path(directory, "train"),
        _split_manifest(spec, "train", spec.num_pretrain, spec.pretrain_shards, spec.region_priors),
    )


def _write_voc(spec: SceneDatasetSpec, root: str) -> None:
    directory = os.path.join(root, VOC_DIRECTORY)
    for folder in voc.layout_paths(directory).values():
        os.makedirs(folder)
    paths = voc.layout_paths(directory)
    for split, count in (("train", spec.num_voc_train), ("val", spec.num_voc_val)):
        ids = [f"{split}_{i:06d}" for i in range(count)]
        instances = []
        for index, image_id in enumerate(ids):
            scene = voc_scene(spec, split, index)
            with open(os.path.join(paths["images"], f"{image_id}.jpg"), "wb") as handle:
                handle.write(_jpeg(scene))
            voc.write_label_png(os.path.join(paths["labels"], f"{image_id}.png"), scene.class_map)
            categories = [obj.shape + 1 for obj in scene.objects]
            instances.append((f"{image_id}.jpg", scene.instance_map, categories))
        voc.write_image_set(directory, split, ids)
        _write_json(coco_path(root, split), coco.dataset(instances, class_names()))


def _write_classification(spec: SceneDatasetSpec, root: str) -> None:
    directory = os.path.join(root, CLASSIFICATION_DIRECTORY)
    os.makedirs(directory)
    fh = spec.fh_params()
    for split, count in (
        ("train", spec.num_classification_train),
        ("validation", spec.num_classification_val),
    ):

        def record(index: int, split: str = split) -> bytes:
            scene = classification_scene(spec, split, index)
            jpeg = _jpeg(scene)
            return _record(jpeg, f"{split}_{index:06d}", scene.objects[0].shape + 1, fh)

        _write_shards(directory, split, count, spec.classification_shards, record)
        _write_json(
            mask_job.manifest_path(directory, split),
            _split_manifest(spec, split, count, spec.classification_shards),
        )


def manifest(spec: SceneDatasetSpec) -> dict:
    """Returns the content of `scenes.json` for `spec`."""
    return {
        "version": MANIFEST_VERSION,
        "spec": spec.to_json(),
        "class_names": class_names(),
        "label_values": "0 = background (VOC) / no label (records); k = class_names[k - 1]",
    }


def _differing_keys(wanted: dict, found: dict, prefix: str = "") -> list[str]:
    """Returns the dotted names of the settings whose values differ (nested dicts walked)."""
    differing = []
    for key, value in sorted(wanted.items()):
        other = found.get(key) if isinstance(found, dict) else None
        if isinstance(value, dict) and isinstance(other, dict):
            differing += _differing_keys(value, other, f"{prefix}{key}.")
        elif value != other:
            differing.append(f"{prefix}{key}")
    return differing


def build(
    spec: SceneDatasetSpec, directory: str, progress: Callable[[str], None] | None = None
) -> str:
    """Returns `directory` holding the dataset of `spec`, built if absent (atomically).

    An existing directory made with the same spec is returned untouched; one made otherwise (or not
    by this tool) is refused, so two datasets are never mixed.
    """
    directory = os.path.abspath(directory)
    wanted = json.loads(json.dumps(manifest(spec)))  # tuples as lists, as read back from disk
    if os.path.exists(directory):
        path = os.path.join(directory, MANIFEST_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"--output_directory {directory!r} exists but holds no {MANIFEST_NAME}, so it was "
                "not made by scripts/make_scenes.py; choose a new --output_directory"
            )
        with open(path, encoding="utf-8") as handle:
            found = json.load(handle)
        if found != wanted:
            differing = _differing_keys(wanted["spec"], found.get("spec", {}))
            raise ValueError(
                f"--output_directory {directory!r} holds scenes made with other settings "
                f"(differs in: {', '.join(differing) or 'version'}; see {path}); re-run with those "
                "settings or choose a new --output_directory"
            )
        return directory

    def write_all(staging: str) -> None:
        for part, write in (
            (PRETRAIN_DIRECTORY, _write_pretrain),
            (VOC_DIRECTORY, _write_voc),
            (CLASSIFICATION_DIRECTORY, _write_classification),
        ):
            if progress:
                progress(part)
            write(spec, staging)
        _write_json(os.path.join(staging, MANIFEST_NAME), wanted)

    if not publish.publish_directory(directory, write_all):
        return build(spec, directory)  # another process finished first: check its settings
    return directory
