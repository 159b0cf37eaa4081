"""Converts the Haiku ResNet torso to torchvision, detectron2 and flat-npz weights, and a DETReg
detector to facebookresearch/detr's state dict (no TensorFlow).

Haiku layout: params `{module: {"w" | "scale" | "offset": array}}`, BatchNorm statistics in state
`{module/~/mean_ema | var_ema: {"average", "hidden", "counter"}}`. Eval-mode BatchNorm reads
`average` (already zero-debiased), so that is what becomes PyTorch's `running_mean`/`running_var`.
"""

import dataclasses
import os
import pickle
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from detcon.models.networks import RESNET_DEPTHS, resnet_name
from detcon.weights.atomic import atomic_write
from detcon.workdir import finite

Params = Mapping[str, Mapping[str, Any]]
FORMATS = ("torchvision", "detectron2", "npz", "detr")
EMA_LEAVES = frozenset({"average", "hidden", "counter"})
_SEP = "/~/"


@dataclasses.dataclass(frozen=True)
class TorsoLayer:
    """One conv + BatchNorm pair of the torso, addressed in Haiku and in PyTorch terms."""

    conv: str  # Haiku module path of the conv, e.g. res_net50/~/initial_conv
    batchnorm: str  # Haiku module path of the BatchNorm that follows it
    stage: Optional[int]  # 0..3 for block groups; None for the stem
    block: Optional[int]
    role: str  # "stem", "shortcut", or "conv{i}" with i counted from 1


def torso_layers(depth: int) -> list[TorsoLayer]:
    """Every conv/BatchNorm pair of a ResNet-`depth` torso, in PyTorch's registration order."""
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}.")
    blocks, bottleneck = RESNET_DEPTHS[depth]
    root = resnet_name(depth)
    layers = [
        TorsoLayer(
            f"{root}{_SEP}initial_conv", f"{root}{_SEP}initial_batchnorm", None, None, "stem"
        )
    ]
    for stage, num_blocks in enumerate(blocks):
        for block in range(num_blocks):
            prefix = f"{root}{_SEP}block_group_{stage}{_SEP}block_{block}{_SEP}"
            for i in range(3 if bottleneck else 2):
                layers.append(
                    TorsoLayer(
                        f"{prefix}conv_{i}", f"{prefix}batchnorm_{i}", stage, block, f"conv{i + 1}"
                    )
                )
            # Same rule as networks.ResNetTorso: bottlenecks always project in block 0; basic
            # blocks only where the stride or width changes (stages 1..3).
            if block == 0 and (bottleneck or stage > 0):
                layers.append(
                    TorsoLayer(
                        f"{prefix}shortcut_conv",
                        f"{prefix}shortcut_batchnorm",
                        stage,
                        block,
                        "shortcut",
                    )
                )
    return layers


def torchvision_names(layer: TorsoLayer) -> tuple[str, str]:
    """(conv weight key, BatchNorm key prefix) in torchvision.models.resnet* naming."""
    if layer.role == "stem":
        return "conv1.weight", "bn1."
    block = f"layer{layer.stage + 1}.{layer.block}."
    if layer.role == "shortcut":
        return block + "downsample.0.weight", block + "downsample.1."
    i = layer.role[len("conv") :]
    return f"{block}conv{i}.weight", f"{block}bn{i}."


def detectron2_names(layer: TorsoLayer) -> tuple[str, str]:
    """(conv weight key, BatchNorm key prefix) in detectron2's ResNet naming (res2..res5)."""
    if layer.role == "stem":
        return "stem.conv1.weight", "stem.conv1.norm."
    conv = f"res{layer.stage + 2}.{layer.block}.{layer.role}"
    return conv + ".weight", conv + ".norm."


def _missing(tree: Params, what: str, needed: str, depth: int) -> KeyError:
    """A KeyError naming what a ResNet-`depth` export needed and which torso `tree` does hold."""
    stem = _SEP + "initial_conv"
    roots = sorted({m[: -len(stem)] for m in tree if m.endswith(stem)})
    return KeyError(
        f"Haiku {what} lack {needed}, needed for a ResNet-{depth} torso; torso roots present: "
        f"{roots or 'none'}. Check the run's config.model.depth, or pass a checkpoint of that "
        f"depth."
    )


def _lookup(tree: Params, module: str, leaf: str, what: str, depth: int) -> np.ndarray:
    """tree[module][leaf] as numpy, or a KeyError that says which torso the tree does hold."""
    try:
        return np.asarray(tree[module][leaf])
    except KeyError:
        raise _missing(tree, what, f"'{module}' ['{leaf}']", depth) from None


def _vector(tree: Params, module: str, leaf: str, what: str, depth: int) -> np.ndarray:
    """A BatchNorm vector as [C]: Haiku keeps [1, 1, 1, C] so it broadcasts over NHWC."""
    return _lookup(tree, module, leaf, what, depth).reshape(-1)


def _hwio_to_oihw(w: np.ndarray) -> np.ndarray:
    """Haiku conv kernel [kh, kw, in, out] -> PyTorch [out, in, kh, kw]."""
    return np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1)))


def _torch_style(
    params: Params,
    state: Params,
    depth: int,
    namer: Callable[[TorsoLayer], tuple[str, str]],
    with_batch_count: bool,
) -> dict[str, np.ndarray]:
    """Shared body of the torchvision/detectron2 converters: conv OIHW + BN weight/bias/stats."""
    out: dict[str, np.ndarray] = {}
    for layer in torso_layers(depth):
        conv_key, bn = namer(layer)
        mean_ema, var_ema = layer.batchnorm + _SEP + "mean_ema", layer.batchnorm + _SEP + "var_ema"
        out[conv_key] = _hwio_to_oihw(_lookup(params, layer.conv, "w", "params", depth))
        out[bn + "weight"] = _vector(params, layer.batchnorm, "scale", "params", depth)
        out[bn + "bias"] = _vector(params, layer.batchnorm, "offset", "params", depth)
        # Eval-mode Haiku BatchNorm normalises with the debiased EMA `average`, not `hidden`.
        out[bn + "running_mean"] = _vector(state, mean_ema, "average", "state", depth)
        out[bn + "running_var"] = _vector(state, var_ema, "average", "state", depth)
        if with_batch_count:
            counter = _lookup(state, mean_ema, "counter", "state", depth)
            out[bn + "num_batches_tracked"] = np.asarray(counter, dtype=np.int64).reshape(())
    # asarray(order="C"), not ascontiguousarray: the latter turns the 0-d counters into [1].
    return {k: np.asarray(v, order="C") for k, v in out.items()}


def haiku_to_torchvision(params: Params, state: Params, depth: int) -> dict[str, np.ndarray]:
    """State dict for torchvision.models.resnet{depth} minus fc.*; conv [O, I, kh, kw], BN [C]."""
    return _torch_style(params, state, depth, torchvision_names, with_batch_count=True)


def haiku_to_detectron2(params: Params, state: Params, depth: int) -> dict[str, np.ndarray]:
    """detectron2 ResNet backbone weights (stem.*, res2..res5.*); no num_batches_tracked.

    detectron2's default backbone norm, FrozenBatchNorm2d, has no num_batches_tracked buffer,
    so writing one would only produce "unexpected key" noise at load time.
    """
    return _torch_style(params, state, depth, detectron2_names, with_batch_count=False)


def detectron2_checkpoint(model: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The dict detectron2's DetectionCheckpointer reads from a .pkl, with name matching on."""
    # Any author except "Caffe2": that one would make detectron2 apply Caffe2 renaming rules.
    return {"model": dict(model), "__author__": "detcon", "matching_heuristics": True}


def _linear(params: Params, module: str, prefix: str) -> dict[str, np.ndarray]:
    """A Haiku Linear [in, out] as torch Linear `prefix`.weight [out, in] and .bias."""
    return {
        prefix + "weight": np.ascontiguousarray(np.asarray(params[module]["w"]).T),
        prefix + "bias": np.asarray(params[module]["b"]),
    }


def _layer_norm(params: Params, module: str, prefix: str) -> dict[str, np.ndarray]:
    """A Haiku LayerNorm as torch LayerNorm `prefix`.weight / .bias."""
    return {
        prefix + "weight": np.asarray(params[module]["scale"]),
        prefix + "bias": np.asarray(params[module]["offset"]),
    }


def _attention(params: Params, module: str, prefix: str) -> dict[str, np.ndarray]:
    """Our q/k/v/out projections as nn.MultiheadAttention's fused in_proj [3d, d] and out_proj."""
    q, k, v = (params[f"{module}/{n}_proj"] for n in ("q", "k", "v"))
    out = {
        prefix + "in_proj_weight": np.concatenate([np.asarray(x["w"]).T for x in (q, k, v)]),
        prefix + "in_proj_bias": np.concatenate([np.asarray(x["b"]) for x in (q, k, v)]),
    }
    out.update(_linear(params, f"{module}/out_proj", prefix + "out_proj."))
    return out


def _count(params: Params, stem: str) -> int:
    """How many modules `stem`0, `stem`1, ... the tree holds (their sub-modules included)."""
    n = 0
    while any(m == f"{stem}{n}" or m.startswith(f"{stem}{n}/") for m in params):
        n += 1
    return n


def haiku_to_detr(params: Params, state: Params, depth: int) -> dict[str, np.ndarray]:
    """facebookresearch/detr's `model` state dict from a DETReg detector's Haiku params/state.

    backbone.0.body.* (torchvision names, FrozenBatchNorm2d: no num_batches_tracked),
    input_proj, query_embed, transformer.{encoder,decoder}.layers.N.*, the final norms,
    class_embed and bbox_embed.layers.N. The object-embedding head (feature_embed) and the
    online probe are dropped, as DETReg's fine-tuning drops them.
    """
    if "transformer/decoder_norm" not in params:
        raise ValueError(
            "--format=detr needs a DETReg run (config detreg); this checkpoint holds no DETR "
            "transformer. Use --format=torchvision for a torso."
        )
    sd = {
        "backbone.0.body." + k: v
        for k, v in haiku_to_torchvision(params, state, depth).items()
        if not k.endswith("num_batches_tracked")
    }
    sd["input_proj.weight"] = _hwio_to_oihw(np.asarray(params["input_proj"]["w"]))
    sd["input_proj.bias"] = np.asarray(params["input_proj"]["b"])
    sd["query_embed.weight"] = np.asarray(params["query_embed"]["embeddings"])
    for i in range(_count(params, "transformer/encoder_layer_")):
        m, p = f"transformer/encoder_layer_{i}", f"transformer.encoder.layers.{i}."
        sd.update(_attention(params, f"{m}/self_attn", p + "self_attn."))
        sd.update(_linear(params, f"{m}/ffn/linear1", p + "linear1."))
        sd.update(_linear(params, f"{m}/ffn/linear2", p + "linear2."))
        for n in (1, 2):
            sd.update(_layer_norm(params, f"{m}/norm{n}", f"{p}norm{n}."))
    if "transformer/encoder_norm" in params:  # pre-norm only
        sd.update(_layer_norm(params, "transformer/encoder_norm", "transformer.encoder.norm."))
    for i in range(_count(params, "transformer/decoder_layer_")):
        m, p = f"transformer/decoder_layer_{i}", f"transformer.decoder.layers.{i}."
        sd.update(_attention(params, f"{m}/self_attn", p + "self_attn."))
        sd.update(_attention(params, f"{m}/multihead_attn", p + "multihead_attn."))
        sd.update(_linear(params, f"{m}/ffn/linear1", p + "linear1."))
        sd.update(_linear(params, f"{m}/ffn/linear2", p + "linear2."))
        for n in (1, 2, 3):
            sd.update(_layer_norm(params, f"{m}/norm{n}", f"{p}norm{n}."))
    sd.update(_layer_norm(params, "transformer/decoder_norm", "transformer.decoder.norm."))
    sd.update(_linear(params, "class_embed", "class_embed."))
    for i in range(_count(params, "bbox_embed/layers_")):
        sd.update(_linear(params, f"bbox_embed/layers_{i}", f"bbox_embed.layers.{i}."))
    return {k: np.asarray(v, np.float32, order="C") for k, v in sd.items()}


def write_detr(tensors: Mapping[str, np.ndarray], path: str) -> None:
    """Writes torch.save({'model': state_dict}) as facebookresearch/detr's main.py loads it."""
    import collections

    import torch

    state_dict = collections.OrderedDict(
        (k, torch.from_numpy(np.array(v, copy=True))) for k, v in tensors.items()
    )
    atomic_write(path, lambda f: torch.save({"model": state_dict}, f))


def _torso_modules(tree: Params, depth: int) -> Iterator[str]:
    """Module names of `tree` that belong to the ResNet-`depth` torso (heads are skipped)."""
    root = resnet_name(depth)
    return (m for m in tree if m == root or m.startswith(root + _SEP))


def haiku_to_npz(params: Params, state: Params, depth: int) -> dict[str, np.ndarray]:
    """Flat torso arrays keyed 'module/leaf' (e.g. 'res_net50/~/initial_conv/w'), params+state."""
    out: dict[str, np.ndarray] = {}
    for tree, what in ((params, "params"), (state, "state")):
        modules = list(_torso_modules(tree, depth))
        if not modules:
            raise _missing(tree, what, f"any '{resnet_name(depth)}' module", depth)
        for module in modules:
            for leaf, value in tree[module].items():
                out[f"{module}/{leaf}"] = np.asarray(value)
    return out


def is_state_module(leaves: Mapping[str, Any]) -> bool:
    """True for Haiku EMA state modules (leaves average/hidden/counter), not trainable params."""
    return bool(leaves) and set(leaves) <= EMA_LEAVES


def npz_to_haiku(arrays: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """Inverse of haiku_to_npz: (params, state) as {module: {leaf: array}}."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        module, sep, leaf = key.rpartition("/")
        if not sep or not module:
            raise ValueError(f"npz key '{key}' is not of the form 'module/leaf'.")
        modules.setdefault(module, {})[leaf] = np.asarray(value)
    params = {m: v for m, v in modules.items() if not is_state_module(v)}
    state = {m: v for m, v in modules.items() if is_state_module(v)}
    return params, state


def infer_torso_architecture(params: Params) -> tuple[int, int]:
    """(depth, width_multiplier) of the single ResNet torso found in Haiku `params`."""
    stem = _SEP + "initial_conv"
    roots = sorted({m[: -len(stem)] for m in params if m.endswith(stem)})
    if len(roots) != 1:
        raise ValueError(
            f"Expected exactly one ResNet torso (a '...{stem}' module), found {roots or 'none'}."
        )
    root = roots[0]
    counts = [0, 0, 0, 0]
    bottleneck = False
    for module in params:
        if not module.startswith(root + _SEP):
            continue
        parts = module[len(root + _SEP) :].split(_SEP)
        if len(parts) < 3 or not parts[0].startswith("block_group_"):
            continue
        stage, block = int(parts[0][len("block_group_") :]), int(parts[1][len("block_") :])
        if stage < len(counts):
            counts[stage] = max(counts[stage], block + 1)
        bottleneck |= parts[2] == "conv_2"
    matches = [
        d
        for d, (blocks, is_bottleneck) in RESNET_DEPTHS.items()
        if tuple(blocks) == tuple(counts) and is_bottleneck == bottleneck
    ]
    if not matches:
        raise ValueError(
            f"Torso '{root}' has blocks {counts} (bottleneck={bottleneck}), which is "
            f"no ResNet depth in {sorted(RESNET_DEPTHS)}."
        )
    stem_channels = np.shape(params[root + stem]["w"])[-1]
    return matches[0], int(stem_channels) // 64


# ----------------------------------------------------------------------------------------------
# Writing files, each atomically (weights.atomic): an interrupted export never leaves a truncated
# checkpoint under the final name.


def write_safetensors(
    tensors: Mapping[str, np.ndarray], path: str, metadata: Optional[Mapping[str, str]] = None
) -> None:
    """Writes a .safetensors file through safetensors' NumPy API (no torch needed)."""
    from safetensors.numpy import save

    blob = save(
        {k: np.asarray(v, order="C") for k, v in tensors.items()}, metadata=dict(metadata or {})
    )
    atomic_write(path, lambda f: f.write(blob))


def write_torch(tensors: Mapping[str, np.ndarray], path: str) -> None:
    """Writes a torch.save'd state dict (OrderedDict of tensors); needs torch importable."""
    import collections

    import torch

    state_dict = collections.OrderedDict(
        (k, torch.from_numpy(np.array(v, copy=True))) for k, v in tensors.items()
    )
    atomic_write(path, lambda f: torch.save(state_dict, f))


def _portable_array(array: np.ndarray) -> tuple[Any, tuple]:
    """Pickle reduction of an ndarray that names only numpy.ndarray and builtins."""
    array = np.asarray(array, order="C")
    return np.ndarray, (array.shape, array.dtype.str, bytearray(array.tobytes()))


class _PortablePickler(pickle.Pickler):
    """Pickler whose arrays unpickle under NumPy 1.x and 2.x alike.

    NumPy 2 pickles arrays through `numpy._core.multiarray`, which NumPy < 1.26.1 (still common in
    detectron2 environments) cannot import; `numpy.ndarray(shape, dtype, buffer)` exists in both.
    The bytearray buffer keeps the loaded arrays writable (torch.from_numpy warns otherwise).
    """

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray:
            return _portable_array(obj)
        return NotImplemented


def write_detectron2(model: Mapping[str, np.ndarray], path: str) -> None:
    """Writes detectron2's .pkl format: {'model', '__author__', 'matching_heuristics'}."""
    checkpoint = detectron2_checkpoint(model)
    atomic_write(path, lambda f: _PortablePickler(f, protocol=4).dump(checkpoint))


def write_npz(arrays: Mapping[str, np.ndarray], path: str) -> None:
    """Writes an uncompressed .npz readable with np.load(path) (no pickle)."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def output_paths(output: str, fmt: str, with_torch: bool) -> list[str]:
    """Files an export writes: torchvision -> [.safetensors, .pth?], detectron2 .pkl, npz .npz."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got '{fmt}'.")
    root, suffix = os.path.splitext(output)
    allowed = {
        "torchvision": (".safetensors", ".pth"),
        "detectron2": (".pkl",),
        "npz": (".npz",),
        "detr": (".pth",),
    }[fmt]
    if suffix and suffix not in allowed:
        raise ValueError(
            f"--output={output}: a {fmt} export is written as "
            f"{' and '.join(allowed)}; give a path ending in one of those, or none."
        )
    if fmt != "torchvision":
        return [root + allowed[0]]
    return [root + ".safetensors"] + ([root + ".pth"] if with_torch else [])


def torch_available() -> bool:
    """Whether `import torch` works here (decides if a .pth is written besides .safetensors)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def export_torso(
    params: Params,
    state: Params,
    depth: int,
    fmt: str,
    output: str,
    metadata: Optional[Mapping[str, str]] = None,
) -> list[str]:
    """Converts the torso in (params, state) to `fmt` and writes it; returns the paths written."""
    with_torch = fmt == "torchvision" and torch_available()
    paths = output_paths(output, fmt, with_torch)
    if fmt == "torchvision":
        tensors = refuse_non_finite(haiku_to_torchvision(params, state, depth))
        write_safetensors(tensors, paths[0], metadata)
        if with_torch:
            write_torch(tensors, paths[1])
    elif fmt == "detr":
        raise ValueError("--format=detr exports a whole detector: use export_detr")
    elif fmt == "detectron2":
        write_detectron2(refuse_non_finite(haiku_to_detectron2(params, state, depth)), paths[0])
    else:
        write_npz(refuse_non_finite(haiku_to_npz(params, state, depth)), paths[0])
    return paths


def refuse_non_finite(arrays: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """Returns `arrays` unchanged; ValueError naming the tensors if any holds NaN or inf."""
    bad = finite.non_finite_leaves(dict(arrays))
    if bad:
        raise ValueError(
            f"the checkpoint holds NaN or inf in {finite.describe(bad)} (a diverged "
            "run); export an earlier checkpoint step directory instead"
        )
    return arrays
