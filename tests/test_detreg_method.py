"""DETReg's method-side contract: data needs, mock region priors, crop side, frozen-torso
loading through config.detreg.backbone_checkpoint."""

import jax
import numpy as np

from detcon import methods
from detcon.train import experiment as experiment_lib
from detcon.train import loop as train_loop
from detcon.train import mock_data
from detcon.weights import export

from conftest import tiny_config


def test_data_needs_ask_for_the_top_30_regions_and_no_masks():
    config = tiny_config(method="detreg")
    needs = methods.get("detreg").data_needs(config)
    assert needs.masks is False and needs.num_regions == 30


def test_mock_examples_carry_the_boxes_of_their_rectangles_and_keep_other_keys():
    plain = mock_data.mock_example(0, 3, 5, 64, 4)
    with_boxes = mock_data.mock_example(0, 3, 5, 64, 4, num_boxes=6)
    for key, value in plain.items():
        np.testing.assert_array_equal(with_boxes[key], value)  # other methods' data unchanged
    assert with_boxes["pad_mask"].shape == (64, 64) and with_boxes["pad_mask"].all()
    valid, boxes = with_boxes["region_valid"], with_boxes["region_boxes"]
    np.testing.assert_array_equal(valid, [True] * 4 + [False] * 2)
    np.testing.assert_array_equal(boxes[~valid], 0.0)
    # The last rectangle (id 4) is drawn on top: its box is its pixels' bounding box.
    ys, xs = np.nonzero(with_boxes["fh_mask1"] == 4)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    expect = np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]) / 64
    np.testing.assert_allclose(boxes[3], expect, rtol=1e-6)
    batch = mock_data.device_batch(0, 0, 2, 2, 64, 4, num_boxes=30)
    assert batch["region_boxes"].shape == (2, 2, 30, 4) and batch["region_valid"].shape == (
        2,
        2,
        30,
    )


def test_crop_side_is_128_px_scaled_with_small_canvases():
    from detcon.methods import detreg

    config = tiny_config(method="detreg")
    expect = {600: 128, 1000: 128, 224: 48, 64: 32}
    for size, side in expect.items():
        config.data.image_size = size
        assert detreg.crop_side(config) == side, size
    config.detreg.crop_size = 96
    assert detreg.crop_side(config) == 96


def test_backbone_checkpoint_fills_the_frozen_torso_only(tmp_path):
    config = tiny_config(method="detreg")
    state = experiment_lib.build(config, 10).init_state(jax.random.PRNGKey(0))
    torso_params = {k: v for k, v in state.online_params.items() if k.startswith("res_net10")}
    torso_state = {k: v for k, v in state.online_state.items() if k.startswith("res_net10")}
    shifted = jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.5, torso_params)
    path = str(tmp_path / "torso.npz")
    export.write_npz(export.haiku_to_npz(shifted, torso_state, 10), path)
    config.detreg.backbone_checkpoint = path
    loaded = train_loop._maybe_initialise_torso(config, state)
    for module, leaves in loaded.online_params.items():
        for name, value in leaves.items():
            expect = (shifted if module.startswith("res_net10") else state.online_params)[module]
            np.testing.assert_array_equal(value, expect[name])
    assert loaded.target_params == {}  # no target network: none is made up
