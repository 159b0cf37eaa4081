"""Detection probe: COCO conversion and scoring against hand values, class-agnostic scoring, the
baselines, the head's initialisation from a DETReg run, and the protocol end to end."""

import copy
import json
import os
import sys
from unittest import mock

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from detcon import evaluate
from detcon.data.build import region_priors, scene_render, scenes
from detcon.evaluation import coco_scoring, detection
from detcon.train import experiment as experiment_lib
from detcon.workdir import checkpoint as checkpoint_lib

from conftest import REPO, tiny_config

pytest.importorskip("pycocotools", reason="pycocotools is in requirements.txt")

FLAGS = flags.FLAGS
_SPEC = scenes.SceneDatasetSpec(
    seed=3,
    scene=scene_render.SceneParams(image_size=40),
    num_pretrain=2,
    num_voc_train=6,
    num_voc_val=4,
    num_classification_train=2,
    num_classification_val=2,
    pretrain_shards=1,
    classification_shards=1,
)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> str:
    root = scenes.build(_SPEC, str(tmp_path_factory.mktemp("scenes") / "tiny"))
    return os.path.join(root, scenes.VOC_DIRECTORY)


def _one_image_truth(boxes: list, categories: list) -> dict:
    """A COCO dict of one 100 x 100 image holding xywh `boxes` of `categories`."""
    annotations = [
        {"id": i + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3]}
        for i, (b, c) in enumerate(zip(boxes, categories))
    ]
    for annotation in annotations:
        annotation["iscrowd"] = 0
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 100, "width": 100}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


def _detection(box: list, score: float, category: int = 1) -> dict:
    return {"image_id": 1, "category_id": category, "bbox": box, "score": score}


def test_scores_match_a_hand_computed_case():
    truth = _one_image_truth([[0, 0, 10, 10], [50, 50, 20, 20]], [1, 1])
    # One exact box (score .9) and one covering 62 % of the second object (IoU 0.62, score .8):
    # matched at IoU .50, .55, .60 only.
    found = [_detection([0, 0, 10, 10], 0.9), _detection([50, 50, 20, 12.4], 0.8)]
    got = coco_scoring.score(truth, found)
    assert got["AR@100"] == pytest.approx((3 * 1.0 + 7 * 0.5) / 10)
    assert got["AP50"] == pytest.approx(1.0)
    # Above IoU .60 only the first object is found, with precision 1: 51 of the 101 recall
    # points (0, .01, ..., .50) have precision 1.
    assert got["AP"] == pytest.approx((3 * 1.0 + 7 * 51 / 101) / 10)
    assert coco_scoring.score(truth, []) == {"AP": 0.0, "AP50": 0.0, "AR@100": 0.0}


def test_class_agnostic_scoring_forgets_the_classes_as_pycocotools_use_cats_0():
    from pycocotools import coco, cocoeval

    truth = _one_image_truth([[0, 0, 10, 10], [50, 50, 20, 20], [20, 60, 30, 10]], [1, 2, 2])
    # Right boxes, every class wrong, plus a miss.
    found = [
        _detection([0, 0, 10, 10], 0.9, 2),
        _detection([50, 50, 20, 20], 0.7, 1),
        _detection([80, 0, 10, 10], 0.8, 1),
    ]
    assert coco_scoring.score(truth, found)["AR@100"] == 0.0
    agnostic = coco_scoring.class_agnostic(truth)
    assert {a["category_id"] for a in agnostic["annotations"]} == {1}
    assert truth["annotations"][1]["category_id"] == 2  # the original is left alone
    as_one = [{**d, "category_id": 1} for d in found]
    got = coco_scoring.score(agnostic, as_one)
    assert got["AR@100"] == pytest.approx(2 / 3)
    # The same numbers from pycocotools' own class-agnostic mode on the original ground truth.
    gt = coco.COCO()
    gt.dataset = copy.deepcopy(truth)
    gt.createIndex()
    evaluator = cocoeval.COCOeval(gt, gt.loadRes(copy.deepcopy(found)), "bbox")
    evaluator.params.useCats = 0
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert got["AP"] == pytest.approx(evaluator.stats[0])
    assert got["AR@100"] == pytest.approx(evaluator.stats[8])


def test_ground_truth_through_the_probe_conversion_scores_exactly_one(voc_root):
    data, truth = detection.load_split(voc_root, "val", 64)
    assert data.images.shape == (4, 64, 64, 3) and data.pad_mask.all()
    assert (data.sizes == 40).all() and data.category_ids == tuple(range(1, 7))
    num_queries, k = 10, len(data.category_ids)
    # Each object's class at probability 1 on the first queries; the rest say "no object".
    probs = np.zeros((len(data.images), num_queries, k + 1))
    probs[..., k] = 1.0
    boxes = np.full((len(data.images), num_queries, 4), 0.5)
    for i in range(len(data.images)):
        count = int(data.valid[i].sum())
        probs[i, :count, k] = 0.0
        probs[i, np.arange(count), data.classes[i, :count]] = 1.0
        boxes[i, :count] = data.boxes[i, :count]
    found = detection.class_detections(data, probs, boxes)
    assert len(found) == len(data.images) * num_queries
    # The boxes come back as the json's pixel boxes.
    first = [d for d in found if d["image_id"] == 1 and d["score"] == 1.0]
    expected = [a["bbox"] for a in truth["annotations"] if a["image_id"] == 1]
    np.testing.assert_allclose([d["bbox"] for d in first], expected, atol=1e-9)
    got = coco_scoring.score(truth, found)
    assert got == {"AP": 1.0, "AP50": 1.0, "AR@100": 1.0}
    agnostic = detection.objectness_detections(data, probs, boxes)
    assert coco_scoring.score(coco_scoring.class_agnostic(truth), agnostic)["AR@100"] == 1.0


def test_random_boxes_are_seeded_inside_the_image_and_score_low(voc_root):
    data, truth = detection.load_split(voc_root, "val", 64)
    drawn = detection.random_detections(data, 100, seed=0)
    assert drawn == detection.random_detections(data, 100, seed=0)
    assert drawn != detection.random_detections(data, 100, seed=1)
    boxes = np.array([d["bbox"] for d in drawn])
    assert len(boxes) == 400 and (boxes >= 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= 40).all() and (boxes[:, 1] + boxes[:, 3] <= 40).all()
    got = coco_scoring.score(coco_scoring.class_agnostic(truth), drawn)
    assert got["AP"] < 0.05 and got["AR@100"] < 0.3


def test_region_priors_are_ranked_as_the_pipeline_draws_them(voc_root):
    data, truth = detection.load_split(voc_root, "val", 64)
    priors = [region_priors.selective_search(image) for image in data.stored]
    top = detection.prior_detections(data, priors, 30, seed=5)
    every = detection.prior_detections(data, priors, 0, seed=5)
    rng = np.random.default_rng(5)
    for image_id, p in zip(data.image_ids, priors):
        expected = region_priors.top_regions(p, len(p.boxes), rng)
        mine = [d for d in every if d["image_id"] == image_id]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)]
        np.testing.assert_allclose(xyxy, expected, rtol=1e-6)
        assert [d["score"] for d in mine] == sorted((d["score"] for d in mine), reverse=True)
        first = [d for d in top if d["image_id"] == image_id]
        # The top-30 are the first 30 of the same draw.
        assert len(first) == min(30, len(p.boxes))
        assert [d["bbox"] for d in first] == [d["bbox"] for d in mine[: len(first)]]


def _detreg_run(workdir: str, hidden: int = 32) -> dict:
    """A DETReg run's step-0 checkpoint (tiny sizes) under `workdir`; returns its config dict."""
    config = tiny_config(method="detreg", image_size=32)
    settings = config.detreg
    settings.hidden_dim, settings.dim_feedforward, settings.num_heads = hidden, 64, 2
    settings.num_encoder_layers = settings.num_decoder_layers = 1
    settings.num_queries = 12
    settings.num_regions = 2  # crops only the pretraining step uses: fewer is a faster init
    state = experiment_lib.build(config, 10).init_state(jax.random.PRNGKey(3))
    manager = checkpoint_lib.make_manager(workdir, 1)
    checkpoint_lib.save(manager, state, {"config": config.to_dict()})
    return config.to_dict()


@pytest.mark.slow
def test_a_detreg_run_initialises_all_but_the_class_head(voc_root, tmp_path):
    config = _detreg_run(str(tmp_path / "detreg"))
    source, loaded_config = detection.load_detreg(str(tmp_path / "detreg"))
    assert loaded_config == config
    data, _ = detection.load_split(voc_root, "val", 64)
    spec = detection.spec_from_config(loaded_config, len(data.category_ids))
    assert spec.num_queries == 12 and spec.transformer.hidden_dim == 32
    assert spec.transformer.num_encoder_layers == 1 and spec.num_classes == 6
    maps = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 512)))
    fresh = detection.init_head(spec, maps, data.pad_mask, seed=0)
    loaded = detection.transfer(fresh, source)
    assert set(loaded) == set(fresh)
    for module, leaves in loaded.items():
        transferred = module.split("/")[0] in detection.TRANSFERRED
        assert transferred != (module.split("/")[0] == "class_embed")
        for name, value in leaves.items():
            np.testing.assert_array_equal(value, (source if transferred else fresh)[module][name])
    # The class head is new: 6 classes + no object, not DETReg's 91 + 1.
    assert loaded["class_embed"]["w"].shape == (32, 7)
    assert source["class_embed"]["w"].shape == (32, 92)
    before = detection.predict(spec, fresh, maps, data.pad_mask, 2)
    after = detection.predict(spec, loaded, maps, data.pad_mask, 2)
    assert np.abs(before[1] - after[1]).max() > 1e-3  # the boxes come from the DETReg head
    # A run of other sizes, or another method, is refused by name.
    wide = detection.init_head(
        spec._replace(transformer=spec.transformer._replace(hidden_dim=64)), maps, data.pad_mask, 0
    )
    with pytest.raises(ValueError, match="in the DETReg run but the head needs"):
        detection.transfer(wide, source)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detection.load_detreg(str(tmp_path / "nothing"))


def test_missing_instances_name_the_file_and_the_builder(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_train.json not found.*make_scenes.py"):
        detection.load_split(str(tmp_path), "train", 64)


def _main(argv: list[str]) -> None:
    """Parses argv as the command line and runs evaluate.main, restoring the flags after."""
    with flagsaver.flagsaver(), mock.patch.object(sys, "argv", ["evaluate"] + argv):
        FLAGS.unparse_flags()
        FLAGS(["evaluate"] + argv)
        evaluate.main(["evaluate"])


@pytest.mark.slow
def test_probe_runs_through_evaluate_from_random_and_from_a_detreg_run(voc_root, tmp_path, capsys):
    _detreg_run(str(tmp_path / "detreg"))
    common = [
        "--protocol=detection",
        f"--segmentation_directory={voc_root}",
        "--det_image_size=64",
        "--det_steps=4",
        "--det_batch_size=2",
    ]
    results = {}
    for init in ("random", str(tmp_path / "detreg")):
        output = str(tmp_path / f"{len(results)}.json")
        _main(
            [f"--checkpoint={tmp_path / 'detreg'}", f"--det_init={init}", f"--output={output}"]
            + common
            + (["--nodet_region_priors"] if results else [])
        )
        results[init] = json.load(open(output))["detection"]
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith("detection AP ") and "AR@100" in line
    random, pretrained = results["random"], results[str(tmp_path / "detreg")]
    for result in (random, pretrained):
        for key in ("AP", "AP50", "AR@100"):
            assert 0.0 <= result[key] <= 1.0
        assert result["num_train"] == 6 and result["num_eval"] == 4 and result["num_classes"] == 6
        assert result["num_queries"] == 12 and result["transformer"]["hidden_dim"] == 32
        assert result["steps"] == 4 and np.isfinite(result["final_train_loss"])
    assert random["transferred"] == [] and random["head_torso_is_evaluated_torso"] is None
    assert pretrained["transferred"] == list(detection.TRANSFERRED)
    assert pretrained["head_torso_is_evaluated_torso"] is True
    rows = random["class_agnostic"]
    assert set(rows) == {
        "initial_detector",
        "probe",
        "region_priors_top30",
        "region_priors_all",
        "random_boxes_30",
        "random_boxes_100",
    }
    assert rows["region_priors_top30"]["boxes_per_image"] <= 30
    assert rows["region_priors_all"]["AR@all"] >= rows["region_priors_all"]["AR@100"]
    assert "region_priors_top30" not in pretrained["class_agnostic"]
    # Same seed, same random boxes; the zero-shot detector differs with its DETReg head.
    assert pretrained["class_agnostic"]["random_boxes_100"] == rows["random_boxes_100"]
    assert pretrained["class_agnostic"]["initial_detector"] != rows["initial_detector"]


def test_detection_flags_fail_early(tmp_path):
    argv = [
        "--random_init",
        f"--config={REPO / 'configs' / 'detreg.py'}",
        "--protocol=detection",
        f"--output={tmp_path / 'r.json'}",
    ]
    with pytest.raises(Exception, match="segmentation/detection need"):
        _main(argv)
    with pytest.raises(Exception, match="det_image_size=48"):
        _main(argv + [f"--segmentation_directory={tmp_path}", "--det_image_size=48"])
    # Before the torso is built: the instances are looked for with the flags.
    with pytest.raises(Exception, match="instances_train.json not found.*make_scenes.py"):
        _main(argv + [f"--segmentation_directory={tmp_path}"])
