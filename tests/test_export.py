"""Checkpoint export: torchvision/detectron2/npz names and shapes, round trips, PyTorch numerics."""

import functools
import math
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from detcon.models.networks import torso_fn
from detcon.weights import export, pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = 64  # even: every stride-2 SAME padding in Haiku is asymmetric at this size
ODD_IMAGE = 65  # 32m + 1: every stride-2 layer sees an odd size, where SAME is symmetric
# Written here from the ResNet papers / torchvision, not read from detcon.models.networks.
BLOCKS = {18: ((2, 2, 2, 2), False), 50: ((3, 4, 6, 3), True)}


# ------------------------------------------------------------------------------------------------
# Haiku torsos with non-trivial weights and BatchNorm statistics.


def _random_params(shapes: dict, rng: np.random.RandomState) -> dict:
    """He-scaled conv kernels; BN scale in [0.5, 1.5] (not Haiku's zero init), offset ~0.1."""
    params = {}
    for module, leaves in shapes.items():
        params[module] = {}
        for name, leaf in leaves.items():
            if name == "w":
                std = math.sqrt(2.0 / np.prod(leaf.shape[:-1]))
                value = rng.normal(0.0, std, leaf.shape)
            elif name == "scale":
                value = rng.uniform(0.5, 1.5, leaf.shape)
            else:
                value = rng.normal(0.0, 0.1, leaf.shape)
            params[module][name] = value.astype(leaf.dtype)
    return params


@functools.lru_cache(maxsize=None)
def haiku_torso(depth: int) -> tuple[dict, dict, np.ndarray]:
    """(params, state, images [2, 64, 64, 3]) with real-then-perturbed BatchNorm statistics."""
    forward = torso_fn(depth)
    rng = np.random.RandomState(depth)
    images = rng.uniform(0.0, 1.0, (2, IMAGE, IMAGE, 3)).astype(np.float32)
    # Names, shapes and dtypes from the real init; values from NumPy (compiling init's truncated
    # normal sampler costs ~20 s of CPU here, and the values are replaced anyway).
    param_shapes, state_shapes = jax.eval_shape(
        lambda x: forward.init(jax.random.PRNGKey(0), x, is_training=True), images
    )
    params = _random_params(param_shapes, rng)
    state = {
        m: {k: np.zeros(v.shape, v.dtype) for k, v in leaves.items()}
        for m, leaves in state_shapes.items()
    }
    # One training-mode step sets each EMA average to that layer's batch statistics, so features
    # stay O(1) through 16 blocks; then perturb them so they are not exactly the batch stats.
    _, state = jax.jit(lambda p, s, x: forward.apply(p, s, None, x, is_training=True))(
        params, state, images
    )
    state = jax.tree_util.tree_map(np.asarray, state)
    for module, leaves in state.items():
        average = leaves["average"]
        if module.endswith("mean_ema"):
            average = average + rng.normal(0.0, 0.05, average.shape)
        else:
            average = average * rng.uniform(0.8, 1.25, average.shape)
        leaves["average"] = average.astype(np.float32)
        leaves["hidden"] = rng.normal(0.0, 1.0, average.shape).astype(np.float32)
        leaves["counter"] = np.asarray(rng.randint(1, 10_000), np.int32)
    return params, state, images


@functools.lru_cache(maxsize=None)
def haiku_features(depth: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [2, size, size, 3], eval-mode Haiku features [2, h, w, C]) for haiku_torso.

    Computed in float64 from the (float32-valued) weights, so a comparison with a float64 PyTorch
    forward measures the conversion, not float32 rounding (which alone reaches ~1e-4 relative
    over 50 layers).
    """
    params, state, _ = haiku_torso(depth)
    images = np.random.RandomState(size).uniform(0.0, 1.0, (2, size, size, 3))
    to64 = lambda x: x.astype(np.float64) if x.dtype == np.float32 else x
    with jax.enable_x64(True):
        features, _ = jax.jit(
            lambda p, s, x: torso_fn(depth).apply(p, s, None, x, is_training=False)
        )(jax.tree_util.tree_map(to64, params), jax.tree_util.tree_map(to64, state), images)
        features = np.asarray(features)
    assert features.dtype == np.float64
    return images, features


# ------------------------------------------------------------------------------------------------
# What torchvision's resnet50().state_dict() holds, reasoned from its architecture: a 7x7 stem
# conv + bn1, then layer1..4 of 3/4/6/3 Bottlenecks (conv1 1x1, conv2 3x3, conv3 1x1 with 4x
# expansion, bn after each), a downsample (1x1 conv + bn) in block 0 of each layer, and fc.


def torchvision_resnet50_shapes() -> dict[str, tuple]:
    """Every key of torchvision.models.resnet50().state_dict() with its shape."""
    shapes: dict[str, tuple] = {"conv1.weight": (64, 3, 7, 7)}

    def batchnorm(prefix: str, channels: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    batchnorm("bn1", 64)
    inplanes = 64
    for layer, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            p = f"layer{layer}.{block}."
            shapes[p + "conv1.weight"] = (planes, inplanes, 1, 1)
            batchnorm(p + "bn1", planes)
            shapes[p + "conv2.weight"] = (planes, planes, 3, 3)
            batchnorm(p + "bn2", planes)
            shapes[p + "conv3.weight"] = (4 * planes, planes, 1, 1)
            batchnorm(p + "bn3", 4 * planes)
            if block == 0:
                shapes[p + "downsample.0.weight"] = (4 * planes, inplanes, 1, 1)
                batchnorm(p + "downsample.1", 4 * planes)
            inplanes = 4 * planes
    shapes["fc.weight"] = (1000, 2048)
    shapes["fc.bias"] = (1000,)
    return shapes


def test_expected_torchvision_list_is_what_the_architecture_implies():
    shapes = torchvision_resnet50_shapes()
    # 53 convs (1 stem + 16 blocks x 3 + 4 downsamples), 53 BNs x 5 entries, fc weight + bias.
    assert len(shapes) == 53 + 53 * 5 + 2 == 320
    assert shapes["layer3.5.conv2.weight"] == (256, 256, 3, 3)
    assert shapes["layer4.0.downsample.0.weight"] == (2048, 1024, 1, 1)
    assert shapes["layer1.0.conv1.weight"] == (64, 64, 1, 1)
    assert "layer2.1.downsample.0.weight" not in shapes


def test_torchvision_export_matches_resnet50_state_dict(tmp_path):
    params, state, _ = haiku_torso(50)
    tensors = export.haiku_to_torchvision(params, state, 50)
    expected = torchvision_resnet50_shapes()
    del expected["fc.weight"], expected["fc.bias"]
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert len(tensors) == 318
    assert tensors["bn1.num_batches_tracked"].dtype == np.int64
    # Conv kernels go HWIO -> OIHW: PyTorch [o, i, y, x] == Haiku [y, x, i, o].
    hk_w = params["res_net50/~/block_group_2/~/block_5/~/conv_1"]["w"]
    np.testing.assert_array_equal(tensors["layer3.5.conv2.weight"][7, 3], hk_w[:, :, 3, 7])
    np.testing.assert_array_equal(
        tensors["layer4.0.downsample.1.running_var"],
        state["res_net50/~/block_group_3/~/block_0/~/shortcut_batchnorm/~/var_ema"][
            "average"
        ].reshape(-1),
    )
    assert int(tensors["layer2.0.bn3.num_batches_tracked"]) == int(
        state["res_net50/~/block_group_1/~/block_0/~/batchnorm_2/~/mean_ema"]["counter"]
    )

    paths = export.export_torso(
        params, state, 50, "torchvision", str(tmp_path / "r50.pth"), {"depth": "50"}
    )
    assert paths[0] == str(tmp_path / "r50.safetensors")
    from safetensors.numpy import load_file

    loaded = load_file(paths[0])
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        np.testing.assert_array_equal(loaded[k], v, err_msg=k)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(paths[0]).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_pth_loads_into_a_torchvision_shaped_resnet50(tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: .pth export untested")
    nn = torch.nn
    params, state, _ = haiku_torso(50)
    paths = export.export_torso(params, state, 50, "torchvision", str(tmp_path / "r50"))
    assert paths == [str(tmp_path / "r50.safetensors"), str(tmp_path / "r50.pth")]
    state_dict = torch.load(paths[1], weights_only=True)
    tensors = export.haiku_to_torchvision(params, state, 50)
    assert list(state_dict) == list(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(state_dict[k].numpy(), v, err_msg=k)

    # torchvision itself is not installable here; this replica has torchvision's module names.
    class Bottleneck(nn.Module):
        def __init__(self, inplanes: int, planes: int, project: bool):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(4 * planes)
            if project:
                self.downsample = nn.Sequential(
                    nn.Conv2d(inplanes, 4 * planes, 1, bias=False), nn.BatchNorm2d(4 * planes)
                )

    model = nn.Module()
    model.conv1, model.bn1 = nn.Conv2d(3, 64, 7, bias=False), nn.BatchNorm2d(64)
    inplanes = 64
    for i, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        layer = [Bottleneck(inplanes, planes, True)]
        layer += [Bottleneck(4 * planes, planes, False) for _ in range(blocks - 1)]
        setattr(model, f"layer{i}", nn.Sequential(*layer))
        inplanes = 4 * planes
    model.fc = nn.Linear(2048, 1000)
    assert len(model.state_dict()) == 320
    result = model.load_state_dict(state_dict, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []


# ------------------------------------------------------------------------------------------------
# A functional PyTorch ResNet over the exported torchvision weights.


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/Haiku 'SAME' padding (before, after): the odd pixel of padding goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def torch_resnet_forward(
    weights: dict, images_nhwc: np.ndarray, depth: int, same_padding: bool, dtype: type = np.float64
) -> np.ndarray:
    """Eval-mode ResNet torso in torch.nn.functional: [N, H, W, 3] -> [N, h, w, C].

    same_padding=True pads like Haiku (explicit, possibly asymmetric F.pad); False is plain
    PyTorch/torchvision (padding=k//2 on both sides, max-pool padding 1).
    """
    import torch

    F = torch.nn.functional
    w = {
        k: torch.from_numpy(np.asarray(v, dtype))
        for k, v in weights.items()
        if not k.endswith("num_batches_tracked")
    }

    def pad(x, kernel, stride, value=0.0):
        top, bottom = _same_pads(x.shape[2], kernel, stride)
        left, right = _same_pads(x.shape[3], kernel, stride)
        return F.pad(x, (left, right, top, bottom), value=value)

    def conv(x, key, stride):
        kernel = w[key].shape[-1]
        if same_padding:
            return F.conv2d(pad(x, kernel, stride), w[key], stride=stride)
        return F.conv2d(x, w[key], stride=stride, padding=kernel // 2)

    def bn(x, prefix):
        return F.batch_norm(
            x,
            w[prefix + ".running_mean"],
            w[prefix + ".running_var"],
            w[prefix + ".weight"],
            w[prefix + ".bias"],
            training=False,
            eps=1e-5,
        )

    x = torch.from_numpy(np.asarray(images_nhwc, dtype)).permute(0, 3, 1, 2)
    x = F.relu(bn(conv(x, "conv1.weight", 2), "bn1"))
    if same_padding:
        x = F.max_pool2d(pad(x, 3, 2, value=-math.inf), 3, 2)
    else:
        x = F.max_pool2d(x, 3, 2, padding=1)
    blocks, bottleneck = BLOCKS[depth]
    for layer, num_blocks in enumerate(blocks, start=1):
        for block in range(num_blocks):
            p = f"layer{layer}.{block}."
            stride = 2 if layer > 1 and block == 0 else 1
            # Stride sits in the 3x3 conv: conv2 of a bottleneck, conv1 of a basic block.
            strides = (1, stride, 1) if bottleneck else (stride, 1)
            out = x
            for i, s in enumerate(strides, start=1):
                out = bn(conv(out, f"{p}conv{i}.weight", s), f"{p}bn{i}")
                if i < len(strides):
                    out = F.relu(out)
            shortcut = x
            if p + "downsample.0.weight" in w:
                shortcut = bn(conv(x, p + "downsample.0.weight", stride), p + "downsample.1")
            x = F.relu(out + shortcut)
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("depth", [18, 50])
def test_pytorch_forward_reproduces_haiku_features(depth):
    pytest.importorskip("torch", reason="PyTorch not installed: numerical export check skipped")
    params, state, _ = haiku_torso(depth)
    images, expected = haiku_features(depth, IMAGE)
    weights = export.haiku_to_torchvision(params, state, depth)
    same = torch_resnet_forward(weights, images, depth, same_padding=True)
    same32 = torch_resnet_forward(weights, images, depth, same_padding=True, dtype=np.float32)
    plain = torch_resnet_forward(weights, images, depth, same_padding=False)
    assert same.shape == expected.shape == (2, 2, 2, 512 if depth == 18 else 2048)
    scale = float(np.abs(expected).max())
    err_same = float(np.abs(same - expected).max())
    err_same32 = float(np.abs(same32 - expected).max())
    err_plain = float(np.abs(plain - expected).max())
    print(
        f"ResNet-{depth} @ {IMAGE}px: max|feature| {scale:.3f}, mean|feature| "
        f"{float(np.abs(expected).mean()):.3f}; max abs error vs Haiku: SAME-padded torch "
        f"float64 {err_same:.2e}, float32 {err_same32:.2e}; symmetric-padded torch "
        f"{err_plain:.3e} (mean abs {float(np.abs(plain - expected).mean()):.3e})"
    )
    assert 0.5 < scale < 100.0  # features neither vanished nor exploded: the check has teeth
    assert err_same < 1e-4  # float64 on both sides: in practice ~1e-12
    assert err_same32 < 1e-3 * scale  # what a float32 PyTorch model sees: rounding only
    # Plain PyTorch padding shifts every stride-2 layer by one input pixel at even sizes.
    assert err_plain > 1e-2 * scale


def test_symmetric_padding_is_exact_at_32m_plus_1_pixels():
    pytest.importorskip("torch", reason="PyTorch not installed: numerical export check skipped")
    params, state, _ = haiku_torso(18)
    images, expected = haiku_features(18, ODD_IMAGE)
    weights = export.haiku_to_torchvision(params, state, 18)
    plain = torch_resnet_forward(weights, images, 18, same_padding=False)
    assert plain.shape == expected.shape == (2, 3, 3, 512)
    err = float(np.abs(plain - expected).max())
    print(f"ResNet-18 @ {ODD_IMAGE}px: symmetric-padded torch vs Haiku max abs error {err:.2e}")
    assert err < 1e-4


# ------------------------------------------------------------------------------------------------
# detectron2 and npz.


def test_detectron2_names_shapes_and_portable_pickle(tmp_path):
    params, state, _ = haiku_torso(50)
    model = export.haiku_to_detectron2(params, state, 50)
    shapes = {k: tuple(v.shape) for k, v in model.items()}
    expected = {"stem.conv1.weight": (64, 3, 7, 7)}
    for conv, cin, cout, k in (
        ("res2.0.conv1", 64, 64, 1),
        ("res2.0.conv2", 64, 64, 3),
        ("res2.0.conv3", 64, 256, 1),
        ("res2.0.shortcut", 64, 256, 1),
        ("res5.2.conv1", 2048, 512, 1),
        ("res5.2.conv2", 512, 512, 3),
        ("res5.2.conv3", 512, 2048, 1),
    ):
        expected[conv + ".weight"] = (cout, cin, k, k)
        for name in ("weight", "bias", "running_mean", "running_var"):
            expected[f"{conv}.norm.{name}"] = (cout,)
    for name in ("weight", "bias", "running_mean", "running_var"):
        expected[f"stem.conv1.norm.{name}"] = (64,)
    assert {k: shapes[k] for k in expected} == expected
    assert "res5.2.shortcut.weight" not in model and "res2.1.shortcut.weight" not in model
    assert shapes["res4.5.conv2.weight"] == (256, 256, 3, 3)
    assert not any(k.endswith("num_batches_tracked") for k in model)
    assert len(model) == 53 * 5 == 265  # 53 convs, each with a 4-buffer norm
    tv = export.haiku_to_torchvision(params, state, 50)
    np.testing.assert_array_equal(model["res5.2.conv2.weight"], tv["layer4.2.conv2.weight"])
    np.testing.assert_array_equal(model["stem.conv1.norm.running_var"], tv["bn1.running_var"])
    np.testing.assert_array_equal(
        model["res3.0.shortcut.norm.bias"], tv["layer2.0.downsample.1.bias"]
    )

    path = export.export_torso(params, state, 50, "detectron2", str(tmp_path / "r50"))[0]
    assert path.endswith("r50.pkl")

    class OnlyArrays(pickle.Unpickler):
        """Refuses any global but numpy.ndarray and bytearray: NumPy-1.x-proof and inert."""

        def find_class(self, module, name):
            if (module, name) in (("numpy", "ndarray"), ("builtins", "bytearray")):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"pickle references {module}.{name}")

    with open(path, "rb") as f:
        checkpoint = OnlyArrays(f, encoding="latin1").load()  # as detectron2 reads .pkl
    assert checkpoint["__author__"] == "detcon" and checkpoint["matching_heuristics"] is True
    assert list(checkpoint["model"]) == list(model)
    for k, v in model.items():
        np.testing.assert_array_equal(checkpoint["model"][k], v, err_msg=k)
        assert checkpoint["model"][k].dtype == v.dtype and checkpoint["model"][k].flags.writeable


def test_npz_round_trip_is_exact(tmp_path):
    params, state, _ = haiku_torso(18)
    heads = {"projector/~/linear": {"w": np.ones((512, 8), np.float32)}}
    arrays = export.haiku_to_npz({**params, **heads}, state, 18)
    assert "res_net18/~/initial_conv/w" in arrays
    assert "res_net18/~/initial_batchnorm/~/mean_ema/counter" in arrays
    assert not any(k.startswith("projector") for k in arrays)  # heads are not the torso
    path = export.export_torso({**params, **heads}, state, 18, "npz", str(tmp_path / "r18"))[0]
    with np.load(path, allow_pickle=False) as f:
        back_params, back_state = export.npz_to_haiku({k: f[k] for k in f.files})
    from_loader = pretrained.load_deepmind_checkpoint(path, allow_pickle=False)
    for got_params, got_state in (
        (back_params, back_state),
        (from_loader["params"], from_loader["state"]),
    ):
        assert got_params.keys() == params.keys() and got_state.keys() == state.keys()
        for tree, got in ((params, got_params), (state, got_state)):
            for module, leaves in tree.items():
                assert got[module].keys() == leaves.keys(), module
                for name, value in leaves.items():
                    assert got[module][name].dtype == value.dtype
                    np.testing.assert_array_equal(got[module][name], value, err_msg=module)


def test_conversion_errors_name_the_problem():
    params, state, _ = haiku_torso(18)
    with pytest.raises(KeyError, match=r"ResNet-50 torso.*roots present: \['res_net18'\]"):
        export.haiku_to_torchvision(params, state, 50)
    with pytest.raises(ValueError, match=r"--output=x\.pth: a detectron2 export is written as"):
        export.output_paths("x.pth", "detectron2", with_torch=True)
    assert export.output_paths("out/r50", "torchvision", with_torch=False) == [
        "out/r50.safetensors"
    ]
    assert export.infer_torso_architecture(params) == (18, 1)
    assert export.infer_torso_architecture(haiku_torso(50)[0]) == (50, 1)


# ------------------------------------------------------------------------------------------------
# DeepMind-style checkpoints.


def test_pickled_checkpoint_needs_allow_pickle(tmp_path):
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "release.pkl"
    with open(path, "wb") as f:
        pickle.dump({"params": Payload()}, f)
    with pytest.raises(ValueError, match=r"release\.pkl is a pickled checkpoint.*--allow_pickle"):
        pretrained.load_deepmind_checkpoint(str(path), allow_pickle=False)
    assert not marker.exists()
    npy = tmp_path / "release.npy"
    np.save(npy, {"res_net18/~/initial_conv": {"w": np.zeros((7, 7, 3, 64), np.float32)}})
    with pytest.raises(ValueError, match="--allow_pickle"):
        pretrained.load_deepmind_checkpoint(str(npy), allow_pickle=False)
    loaded = pretrained.load_deepmind_checkpoint(str(npy), allow_pickle=True)
    assert loaded["res_net18/~/initial_conv"]["w"].shape == (7, 7, 3, 64)


def _rename(tree: dict, old: str, new: str) -> dict:
    """Copy of a Haiku tree with module prefix `old` replaced by `new`."""
    return {new + m[len(old) :]: dict(v) for m, v in tree.items()}


def test_match_reports_missing_unexpected_and_mismatched(tmp_path):
    params, state, _ = haiku_torso(18)
    online_params = _rename(params, "res_net18", "encoder/~/res_net18")
    online_state = _rename(state, "res_net18", "encoder/~/res_net18")
    g1 = "encoder/~/res_net18/~/block_group_1/~/block_0/~/"
    del online_params[g1 + "conv_1"]  # missing
    online_params[g1 + "conv_0"]["w"] = np.zeros((3, 3, 64, 99), np.float32)  # wrong shape
    online_params[g1 + "batchnorm_0"]["scale"] = (  # [C], reshaped
        params["res_net18/~/block_group_1/~/block_0/~/batchnorm_0"]["scale"].reshape(-1)
    )
    online_params[g1 + "batchnorm_0"]["extra"] = np.zeros(3, np.float32)  # unexpected leaf
    online_params["projector/~/linear"] = {"w": np.zeros((512, 8), np.float32)}  # a head
    del online_state[g1 + "batchnorm_1/~/var_ema"]["hidden"]  # missing state
    target_params = jax.tree_util.tree_map(lambda x: x + 1.0, online_params)
    path = tmp_path / "byol_like.npy"
    np.save(
        path,
        {
            "online_params": online_params,
            "online_state": online_state,
            "target_params": target_params,
            "step": 1000,
        },
    )

    loaded = pretrained.load_deepmind_checkpoint(str(path), allow_pickle=True)
    ref_params = jax.tree_util.tree_map(np.zeros_like, params)
    ref_state = jax.tree_util.tree_map(np.zeros_like, state)
    ref_params["classifier"] = {"w": np.full((512, 10), 7.0, np.float32)}
    new_params, new_state, report = pretrained.match_torso_params(loaded, ref_params, ref_state)

    ours = "res_net18/~/block_group_1/~/block_0/~/"
    assert report.source_root == "encoder/~/res_net18" and report.reference_root == "res_net18"
    assert report.missing == [ours + "conv_1/w", ours + "batchnorm_1/~/var_ema/hidden"]
    assert sorted(report.unexpected) == [
        "encoder/~/res_net18/~/block_group_1/~/block_0/~/batchnorm_0/extra",
        "projector/~/linear/w",
    ]
    assert report.shape_mismatched == [(ours + "conv_0/w", (3, 3, 64, 99), (3, 3, 64, 128))]
    assert report.reshaped == [ours + "batchnorm_0/scale"]
    total = sum(len(v) for v in params.values()) + sum(len(v) for v in state.values())
    assert len(report.matched) == total - 3 and not report.ok
    assert "2 missing" in str(report) and "conv_1/w" in str(report)
    # Matched arrays come from the online network (target = online + 1), with our names.
    np.testing.assert_array_equal(
        new_params["res_net18/~/initial_conv"]["w"], params["res_net18/~/initial_conv"]["w"]
    )
    np.testing.assert_array_equal(
        new_params[ours + "batchnorm_0"]["scale"], params[ours + "batchnorm_0"]["scale"]
    )
    np.testing.assert_array_equal(
        new_state[ours + "batchnorm_0/~/mean_ema"]["average"],
        state[ours + "batchnorm_0/~/mean_ema"]["average"],
    )
    assert not new_params[ours + "conv_1"]["w"].any()  # missing: kept at reference value
    assert not new_params[ours + "conv_0"]["w"].any()  # mismatched: kept at reference value
    assert (new_params["classifier"]["w"] == 7.0).all()  # outside the torso: untouched

    # network="target" reads target_params; this file has no target_state, so all EMAs are missing.
    target_params, _, target_report = pretrained.match_torso_params(
        loaded, ref_params, ref_state, network="target"
    )
    np.testing.assert_array_equal(
        target_params["res_net18/~/initial_conv"]["w"],
        params["res_net18/~/initial_conv"]["w"] + 1.0,
    )
    assert sum("_ema/" in n for n in target_report.missing) == 40 * 3


def test_match_flat_checkpoint_with_our_prefix_is_complete():
    params, state, _ = haiku_torso(18)
    flat = {**params, **state}  # DeepMind-style flat {module: {name: array}}, params and state
    ref_params = jax.tree_util.tree_map(np.zeros_like, params)
    ref_state = jax.tree_util.tree_map(np.zeros_like, state)
    new_params, new_state, report = pretrained.match_torso_params(flat, ref_params, ref_state)
    assert report.ok and not report.unexpected and not report.reshaped
    # 20 conv kernels, 20 BatchNorms x (scale, offset), 40 EMAs x (average, hidden, counter).
    assert len(report.matched) == 20 + 20 * 2 + 40 * 3
    for module in state:
        assert new_state[module]["counter"].dtype == np.int32
        np.testing.assert_array_equal(new_state[module]["hidden"], state[module]["hidden"])


# ------------------------------------------------------------------------------------------------
# The command line.


def _run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "export_checkpoint.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_script_exports_a_checkpoint_file_and_refuses_pickles(tmp_path):
    params, state, _ = haiku_torso(18)
    npz = tmp_path / "r18.npz"
    export.write_npz(export.haiku_to_npz(params, state, 18), str(npz))
    run = _run_script(
        f"--checkpoint={npz}", "--format=torchvision", f"--output={tmp_path / 'tv' / 'r18'}"
    )
    assert run.returncode == 0, run.stderr
    assert "0 missing" in run.stdout and "wrote" in run.stdout
    from safetensors.numpy import load_file

    got = load_file(str(tmp_path / "tv" / "r18.safetensors"))
    expected = export.haiku_to_torchvision(params, state, 18)
    assert got.keys() == expected.keys() and len(got) == 120
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)

    npy = tmp_path / "release.npy"
    np.save(npy, {"params": {**params, **state}})
    refused = _run_script(f"--checkpoint={npy}", "--format=npz", f"--output={tmp_path / 'o'}")
    assert refused.returncode != 0
    assert "--allow_pickle" in refused.stderr and not (tmp_path / "o.npz").exists()
