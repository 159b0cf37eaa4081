"""Synthetic scenes: geometry, ground truth, statistics, determinism, and the three written parts."""

import dataclasses
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from detcon import errors
from detcon.data import pipeline, shards
from detcon.data.build import mask_job, scene_render, scenes, voc

K = len(scene_render.SHAPES)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TINY = scenes.SceneDatasetSpec(
    seed=7,
    scene=scene_render.SceneParams(image_size=40),
    num_pretrain=12,
    num_voc_train=6,
    num_voc_val=4,
    num_classification_train=12,
    num_classification_val=18,
    pretrain_shards=3,
    classification_shards=2,
)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return scenes.build(_TINY, str(tmp_path_factory.mktemp("scenes") / "tiny"))


@pytest.fixture(scope="module")
def many_scenes():
    params = scene_render.SceneParams(image_size=48)
    return [scene_render.random_scene(np.random.default_rng([1, i]), params) for i in range(400)]


def _object(shape: str, angle: float = 0.3, radius: float = 80.0, size: int = 256):
    texture = scene_render.Texture("flat", ((0, 0, 0), (0, 0, 0)), 4.0, 0.0)
    centre = (size / 2 - 0.5, size / 2 - 0.5)
    return scene_render.SceneObject(
        scene_render.SHAPES.index(shape), centre, radius, angle, texture
    )


# Areas at radius 1 from the shapes' definitions, by hand.
_HAND_AREAS = {
    "disc": np.pi * 0.9**2,
    "square": 1.7**2,
    "triangle": 3 * np.sqrt(3) / 4 * 1.25**2,
    "ring": np.pi * (1.0 - 0.55**2),
    "cross": 2 * (2 * 0.66) - 0.66**2,
    "star": 10 * 0.5 * 1.25 * 0.5 * np.sin(np.pi / 5),
}


@pytest.mark.parametrize("shape", scene_render.SHAPES)
def test_rasterised_area_matches_the_shapes_definition(shape):
    index = scene_render.SHAPES.index(shape)
    assert scene_render.shape_area(index) == pytest.approx(_HAND_AREAS[shape], rel=1e-9)
    pixels = np.count_nonzero(scene_render.object_mask(_object(shape), 256))
    assert pixels / 80.0**2 == pytest.approx(_HAND_AREAS[shape], rel=0.02)


@pytest.mark.parametrize(
    "shape, symmetry, not_symmetry",
    [("square", 90, 45), ("triangle", 120, 60), ("cross", 90, 45), ("star", 72, 36)],
)
def test_rotation_by_a_symmetry_keeps_the_mask(shape, symmetry, not_symmetry):
    base = scene_render.object_mask(_object(shape, angle=0.2), 256)
    same = scene_render.object_mask(_object(shape, angle=0.2 + np.radians(symmetry)), 256)
    other = scene_render.object_mask(_object(shape, angle=0.2 + np.radians(not_symmetry)), 256)
    assert np.mean(base != same) < 0.002  # boundary pixels only
    assert np.mean(base != other) > 0.02


def test_ring_has_a_hole_and_disc_does_not():
    ring = scene_render.object_mask(_object("ring"), 256)
    disc = scene_render.object_mask(_object("disc"), 256)
    assert not ring[126:130, 126:130].any() and disc[126:130, 126:130].all()


def test_label_maps_are_the_paint_order_composite(many_scenes):
    for scene in many_scenes[:100]:
        expected_class = np.zeros_like(scene.class_map)
        expected_instance = np.zeros_like(scene.instance_map)
        # Walk objects from the top down: a pixel belongs to the last-painted object covering it.
        for index in range(len(scene.objects), 0, -1):
            obj = scene.objects[index - 1]
            free = (expected_instance == 0) & scene_render.object_mask(obj, 48)
            expected_instance[free] = index
            expected_class[free] = obj.shape + 1
        np.testing.assert_array_equal(scene.instance_map, expected_instance)
        np.testing.assert_array_equal(scene.class_map, expected_class)


def _region_matches_texture(pixels: np.ndarray, texture: scene_render.Texture) -> bool:
    """Whether `[N, 3]` pixels look like `texture`: exact colours, or noise around colour one."""
    colours = np.asarray(texture.colours)
    if texture.kind == "flat":
        return bool((pixels == colours[0]).all())
    if texture.kind in ("stripes", "checker"):
        return bool(((pixels == colours[0]).all(1) | (pixels == colours[1]).all(1)).all())
    mid = (colours[0] > 40) & (colours[0] < 215)  # channels that clipping leaves unbiased
    centre = np.median(pixels[:, mid], axis=0) if len(pixels) >= 20 else colours[0][mid]
    return bool((np.abs(centre - colours[0][mid]) < 12).all())


def test_every_region_has_its_objects_colours_and_objects_stay_visible(many_scenes):
    for scene in many_scenes[:150]:
        background = scene.background
        assert _region_matches_texture(scene.image[scene.instance_map == 0], background)
        for index, obj in enumerate(scene.objects, start=1):
            region = scene.instance_map == index
            assert _region_matches_texture(scene.image[region], obj.texture)
            full = np.count_nonzero(scene_render.object_mask(obj, 48))
            assert np.count_nonzero(region) >= 0.35 * full
            for colour in obj.texture.colours:
                for other in background.colours:
                    assert np.linalg.norm(np.subtract(colour, other)) >= 60.0


def test_classes_are_balanced_and_colour_is_independent_of_class(many_scenes):
    objects = [obj for scene in many_scenes for obj in scene.objects]
    counts = np.bincount([o.shape for o in objects], minlength=K)
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
    pixels = np.bincount(
        np.concatenate([s.class_map.ravel() for s in many_scenes]), minlength=K + 1
    )
    assert pixels[1:].max() < 2.0 * pixels[1:].min()

    colours = np.array([o.texture.colours[0] for o in objects], np.float64)
    shapes = np.array([o.shape for o in objects])
    overall = colours.mean(0)
    for k in range(K):
        # ~270 objects per class: the standard error of a channel mean is ~4.5 grey levels.
        assert np.abs(colours[shapes == k].mean(0) - overall).max() < 20
        kinds = [o.texture.kind for o in objects if o.shape == k]
        share = np.array([kinds.count(t) for t in scene_render.TEXTURES]) / len(kinds)
        assert np.abs(share - 1 / len(scene_render.TEXTURES)).max() < 0.1
    # The painted pixels too: the mean colour of each class region is the mean of all regions.
    images = np.stack([s.image for s in many_scenes]).reshape(-1, 3).astype(np.float64)
    labels = np.stack([s.class_map for s in many_scenes]).ravel()
    painted = images[labels > 0].mean(0)
    for k in range(1, K + 1):
        assert np.abs(images[labels == k].mean(0) - painted).max() < 20


def test_scenes_are_deterministic_per_seed():
    params = scene_render.SceneParams(image_size=32)
    first = scene_render.random_scene(np.random.default_rng([3, 0]), params)
    again = scene_render.random_scene(np.random.default_rng([3, 0]), params)
    other = scene_render.random_scene(np.random.default_rng([4, 0]), params)
    assert first.image.tobytes() == again.image.tobytes()
    assert first.class_map.tobytes() == again.class_map.tobytes()
    assert first.image.tobytes() != other.image.tobytes()


def _digests(directory: str) -> dict[str, str]:
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, directory)] = hashlib.sha256(handle.read()).hexdigest()
    return found


def test_build_is_byte_identical_per_seed_and_differs_across_seeds(tiny_dataset, tmp_path):
    again = scenes.build(_TINY, str(tmp_path / "again"))
    reference = _digests(tiny_dataset)
    assert _digests(again) == reference
    other = scenes.build(dataclasses.replace(_TINY, seed=8), str(tmp_path / "other"))
    other_digests = _digests(other)
    assert other_digests.keys() == reference.keys()
    images = [k for k in reference if k.endswith((".jpg", ".png")) or "-of-" in k]
    assert all(other_digests[k] != reference[k] for k in images)


def test_build_keeps_an_equal_dataset_and_refuses_others(tiny_dataset, tmp_path):
    stamps = {k: os.stat(os.path.join(tiny_dataset, k)).st_mtime_ns for k in _digests(tiny_dataset)}
    assert scenes.build(_TINY, tiny_dataset) == tiny_dataset
    assert {k: os.stat(os.path.join(tiny_dataset, k)).st_mtime_ns for k in stamps} == stamps
    with pytest.raises(ValueError, match="differs in: num_pretrain.*--output_directory"):
        scenes.build(dataclasses.replace(_TINY, num_pretrain=13), tiny_dataset)
    bigger = dataclasses.replace(_TINY, scene=scene_render.SceneParams(image_size=48))
    with pytest.raises(ValueError, match=r"differs in: fh.min_sizes, scene.image_size;"):
        scenes.build(bigger, tiny_dataset)
    (tmp_path / "photos").mkdir()
    with pytest.raises(ValueError, match="holds no scenes.json"):
        scenes.build(_TINY, str(tmp_path / "photos"))
    assert sorted(os.listdir(os.path.dirname(tiny_dataset))) == ["tiny"]  # no staging left


@pytest.mark.parametrize(
    "change, flag",
    [
        (dict(num_pretrain=0), "--num_pretrain"),
        (dict(pretrain_shards=20), "--pretrain_shards"),
        (dict(classification_shards=13), "--classification_shards"),
    ],
)
def test_bad_spec_names_the_flag(change, flag):
    with pytest.raises(ValueError, match=flag):
        dataclasses.replace(_TINY, **change)


def test_bad_scene_params_name_the_flag():
    with pytest.raises(ValueError, match="--max_objects"):
        scene_render.SceneParams(min_objects=4, max_objects=3)
    with pytest.raises(ValueError, match="--max_radius"):
        scene_render.SceneParams(max_radius=0.7)


def test_voc_palette_is_the_devkit_one():
    colours = voc.palette()
    assert colours[0].tolist() == [0, 0, 0]
    assert colours[1].tolist() == [128, 0, 0]
    assert colours[2].tolist() == [0, 128, 0]
    assert colours[3].tolist() == [128, 128, 0]
    assert colours[4].tolist() == [0, 0, 128]
    assert colours[15].tolist() == [192, 128, 128]  # 'person'
    assert colours[255].tolist() == [224, 224, 192]  # the boundary / ignore colour


def test_voc_layout_holds_the_ground_truth(tiny_dataset):
    root = os.path.join(tiny_dataset, scenes.VOC_DIRECTORY)
    for split, count in (("train", 6), ("val", 4)):
        ids = voc.read_image_set(root, split)
        assert ids == [f"{split}_{i:06d}" for i in range(count)]
        for index, image_id in enumerate(ids):
            scene = scenes.voc_scene(_TINY, split, index)
            with Image.open(os.path.join(root, "SegmentationClass", f"{image_id}.png")) as png:
                assert png.mode == "P"
                palette = np.array(png.getpalette()[: 3 * (K + 1)]).reshape(-1, 3)
                np.testing.assert_array_equal(palette, voc.palette()[: K + 1])
                np.testing.assert_array_equal(np.asarray(png), scene.class_map)
            with Image.open(os.path.join(root, "JPEGImages", f"{image_id}.jpg")) as jpeg:
                assert jpeg.format == "JPEG" and jpeg.size == (40, 40)
                error = np.abs(np.asarray(jpeg, np.float64) - scene.image)
            # Outside noise textures (which JPEG smooths by design) the pixels survive closely.
            kinds = [scene.background.kind] + [o.texture.kind for o in scene.objects]
            textured = np.array([kind != "noise" for kind in kinds])[scene.instance_map]
            if textured.any():
                assert error[textured].mean() < 5
    labels = [voc.read_label_png(p) for p in _files(root, "SegmentationClass")]
    assert set(np.unique(np.concatenate([a.ravel() for a in labels]))) <= set(range(K + 1))


def _files(root: str, folder: str) -> list[str]:
    directory = os.path.join(root, folder)
    return [os.path.join(directory, n) for n in sorted(os.listdir(directory))]


def test_pretraining_records_feed_the_pipeline(tiny_dataset):
    directory = os.path.join(tiny_dataset, scenes.PRETRAIN_DIRECTORY)
    assert pipeline.num_examples(directory, "train") == 12
    assert len(pipeline.list_shards(directory, "train")) == 3
    assert os.path.isfile(mask_job.manifest_path(directory, "train"))
    purities = []
    records = [
        r for p in shards.list_shards(directory, "train") for r in tf.data.TFRecordDataset(p)
    ]
    for index, record in enumerate(records):
        example = pipeline.decode_example(record)
        scene = scenes.pretrain_scene(_TINY, index)
        assert example["fh"].shape == (1, 40, 40)
        assert int(example["label"]) == scenes.dominant_class(scene) - 1
        # FH segments follow the painted objects: most of each segment is one object.
        fh = example["fh"].numpy()[0]
        covered = sum(np.bincount(scene.instance_map[fh == s]).max() for s in np.unique(fh))
        purities.append(covered / fh.size)
    assert np.mean(purities) > 0.85
    batch = next(
        pipeline.pretrain_batches(
            directory,
            image_size=32,
            local_devices=2,
            per_device_batch=3,
            deterministic=True,
            shuffle_buffer=12,
        )
    )
    assert batch["view1"].shape == (2, 3, 32, 32, 3)
    assert batch["fh_mask2"].shape == (2, 3, 32, 32)
    assert batch["label"].min() >= 0 and batch["label"].max() < K


def test_classification_records_carry_the_shape_labels(tiny_dataset):
    directory = os.path.join(tiny_dataset, scenes.CLASSIFICATION_DIRECTORY)
    for split, count in (("train", 12), ("validation", 18)):
        records = [
            r for p in shards.list_shards(directory, split) for r in tf.data.TFRecordDataset(p)
        ]
        assert len(records) == count
        for index, record in enumerate(records):
            example = pipeline.decode_example(record)
            scene = scenes.classification_scene(_TINY, split, index)
            assert len(scene.objects) == 1
            assert int(example["label"]) == scene.objects[0].shape == index % K
    batches = list(
        pipeline.eval_batches(
            directory, split="validation", image_size=32, local_devices=1, per_device_batch=8
        )
    )
    labels = np.concatenate([b["label"].ravel() for b in batches])
    assert np.bincount(labels[labels >= 0], minlength=K).tolist() == [3] * K


def test_single_objects_lie_inside_the_evaluation_crop():
    spec = dataclasses.replace(_TINY, scene=scene_render.SceneParams(image_size=64))
    margin = round(64 * (1 - 0.875) / 2)
    for index in range(60):
        scene = scenes.classification_scene(spec, "train", index)
        rows, cols = np.nonzero(scene.class_map)
        assert rows.min() >= margin and cols.min() >= margin
        assert rows.max() < 64 - margin and cols.max() < 64 - margin


def test_cli_writes_the_dataset_with_the_given_fh_parameters(tmp_path):
    command = [
        sys.executable,
        os.path.join(_REPO, "scripts", "make_scenes.py"),
        f"--output_directory={tmp_path / 'cli'}",
        "--image_size=32",
        "--num_pretrain=6",
        "--num_voc_train=2",
        "--num_voc_val=2",
        "--num_classification_train=6",
        "--num_classification_val=6",
        "--pretrain_shards=2",
        "--fh_scales=100",
        "--fh_min_sizes=10",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "6 pretraining scenes" in done.stdout
    directory = str(tmp_path / "cli" / scenes.PRETRAIN_DIRECTORY)
    record = next(iter(tf.data.TFRecordDataset(pipeline.list_shards(directory, "train"))))
    features = tf.train.Example.FromString(record.numpy()).features.feature
    assert list(features["image/felzenszwalb_scales"].float_list.value) == [100.0]


def test_voc_label_png_round_trips_and_a_colour_png_is_refused(tmp_path):
    labels = np.random.default_rng(0).integers(0, K + 1, (9, 13), dtype=np.uint8)
    labels[0, 0] = voc.IGNORE_INDEX
    path = str(tmp_path / "labels.png")
    voc.write_label_png(path, labels)
    np.testing.assert_array_equal(voc.read_label_png(path), labels)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb.png: expected a palette"):
        voc.read_label_png(str(tmp_path / "rgb.png"))


def test_coco_instances_load_in_pycocotools_with_the_right_counts(tiny_dataset):
    coco_api = pytest.importorskip("pycocotools.coco", reason="pycocotools is in requirements.txt")
    for split, count in (("train", 6), ("val", 4)):
        dataset = coco_api.COCO(scenes.coco_path(tiny_dataset, split))
        assert sorted(dataset.getCatIds()) == list(range(1, K + 1))
        assert [c["name"] for c in dataset.loadCats(dataset.getCatIds())] == scenes.class_names()
        assert len(dataset.getImgIds()) == count
        total = 0
        for index in range(count):
            scene = scenes.voc_scene(_TINY, split, index)
            (info,) = dataset.loadImgs(index + 1)
            assert info["file_name"] == f"{split}_{index:06d}.jpg"
            assert (info["height"], info["width"]) == scene.class_map.shape
            annotations = dataset.loadAnns(dataset.getAnnIds(imgIds=index + 1))
            visible = [
                i for i in range(1, len(scene.objects) + 1) if (scene.instance_map == i).any()
            ]
            assert len(annotations) == len(visible)
            for annotation, instance in zip(annotations, visible):
                mask = scene.instance_map == instance
                np.testing.assert_array_equal(dataset.annToMask(annotation), mask)
                assert annotation["category_id"] == scene.objects[instance - 1].shape + 1
                rows, cols = np.nonzero(mask)
                x, y, w, h = annotation["bbox"]
                assert (x, y, x + w, y + h) == (
                    cols.min(),
                    rows.min(),
                    cols.max() + 1,
                    rows.max() + 1,
                )
                assert annotation["area"] == mask.sum()
            total += len(annotations)
        assert len(dataset.getAnnIds()) == total


def test_region_priors_reach_the_detreg_pipeline(tmp_path):
    spec = dataclasses.replace(
        _TINY,
        num_pretrain=3,
        pretrain_shards=1,
        num_voc_train=1,
        num_voc_val=1,
        num_classification_train=2,
        num_classification_val=2,
        classification_shards=1,
        region_priors=True,
    )
    directory = os.path.join(scenes.build(spec, str(tmp_path / "priors")), "pretrain")
    assert shards.read_manifest(directory, "train")["region_priors"] is True
    batch = next(
        pipeline.pretrain_batches(
            directory,
            image_size=32,
            local_devices=1,
            per_device_batch=3,
            with_masks=False,
            num_regions=30,
            shuffle_buffer=3,
        )
    )
    assert batch["region_boxes"].shape == (1, 3, 30, 4)
    assert (batch["region_valid"].sum(-1) >= 2).all()
    # Without the flag the same data is refused by name.
    plain_root = scenes.build(
        dataclasses.replace(spec, region_priors=False), str(tmp_path / "plain")
    )
    plain = os.path.join(plain_root, "pretrain")
    with pytest.raises(errors.DatasetMismatchError, match="--region_priors"):
        pipeline.pretrain_batches(
            plain, image_size=32, local_devices=1, per_device_batch=3, num_regions=30
        )
