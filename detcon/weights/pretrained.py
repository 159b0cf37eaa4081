"""Reads DeepMind-style Haiku checkpoints and matches their ResNet torso onto ours by name."""

import dataclasses
import os
from typing import Any, Mapping, Optional

import numpy as np

from detcon.weights.export import is_state_module, npz_to_haiku

Tree = dict[str, dict[str, Any]]
_SEP = "/~/"
_STEM = "initial_conv"


def load_deepmind_checkpoint(path: str, *, allow_pickle: bool) -> dict:
    """The checkpoint at `path` as nested plain dicts of np.ndarray (wrapping keys kept).

    `.npy`/`.pkl` files (DeepMind's BYOL/DetCon releases: `np.load(path, allow_pickle=True)
    .item()`) are pickles and need allow_pickle=True; our own flat `.npz` exports need no pickle
    and come back as {"params": ..., "state": ...}.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file {path} does not exist.")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as arrays:
            params, state = npz_to_haiku({k: arrays[k] for k in arrays.files})
        return {"params": params, "state": state}
    if not allow_pickle:
        raise ValueError(
            f"{path} is a pickled checkpoint, and unpickling runs whatever code the file holds. "
            f"Load it only if you trust its source, by passing --allow_pickle (allow_pickle=True "
            f"in Python)."
        )
    loaded = np.load(path, allow_pickle=True)
    # np.save of a dict stores a 0-d object array; a plain pickle comes back as the object itself.
    if isinstance(loaded, np.ndarray) and loaded.dtype == object and loaded.shape == ():
        loaded = loaded.item()
    loaded = _plain(loaded)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a dict of Haiku parameters.")
    return loaded


def _plain(obj: Any) -> Any:
    """Mappings and NamedTuples -> dicts, arrays (NumPy or JAX) -> np.ndarray, recursively."""
    if hasattr(obj, "_asdict"):
        obj = obj._asdict()
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return np.asarray(obj)
    return obj


def _is_module_tree(tree: Any) -> bool:
    """True for a flat Haiku tree: {module: {leaf: array}} with no deeper nesting."""
    return (
        isinstance(tree, Mapping)
        and bool(tree)
        and all(
            isinstance(leaves, Mapping) and all(not isinstance(v, Mapping) for v in leaves.values())
            for leaves in tree.values()
        )
    )


def _split_modules(tree: Mapping[str, Mapping[str, Any]]) -> tuple[Tree, Tree]:
    """A flat tree split into (trainable params, EMA state) by its leaf names."""
    params = {m: dict(v) for m, v in tree.items() if not is_state_module(v)}
    state = {m: dict(v) for m, v in tree.items() if is_state_module(v)}
    return params, state


def split_checkpoint(loaded: Mapping[str, Any], network: str = "online") -> tuple[Tree, Tree]:
    """(params, state) as flat {module: {leaf: array}} from a flat or key-wrapped checkpoint."""
    if _is_module_tree(loaded):
        return _split_modules(loaded)
    for params_key, state_key in ((f"{network}_params", f"{network}_state"), ("params", "state")):
        if params_key in loaded and _is_module_tree(loaded[params_key]):
            params, state = _split_modules(loaded[params_key])
            extra = loaded.get(state_key)
            if _is_module_tree(extra):
                state.update(_split_modules(extra)[1])
            return params, state
    # One wrapping level with a single dict inside (e.g. BYOL's "experiment_state"): descend.
    nested = [v for v in loaded.values() if isinstance(v, Mapping)]
    if len(nested) == 1:
        return split_checkpoint(nested[0], network)
    raise ValueError(
        f"Found no Haiku parameters in the checkpoint: top-level keys {sorted(loaded)[:12]}. "
        f"Expected a flat {{module: {{name: array}}}} dict, or one under '{network}_params' / "
        f"'params' (with '{network}_state' / 'state')."
    )


def _torso_roots(tree: Mapping[str, Any]) -> list[str]:
    """Module prefixes that own an initial_conv, e.g. ['res_net50'] or ['encoder/~/res_net50']."""
    return sorted({m[: -len(_SEP + _STEM)] for m in tree if m.endswith(_SEP + _STEM)})


def _pick_source_root(roots: list[str], reference_root: str, network: str) -> Optional[str]:
    """The checkpoint's torso prefix; prefers our own name, then one naming `network`."""
    if len(roots) <= 1:
        return roots[0] if roots else None
    if reference_root in roots:
        return reference_root
    named = [r for r in roots if network in r.split(_SEP)[0]]
    if len(named) == 1:
        return named[0]
    raise ValueError(
        f"The checkpoint holds several ResNet torsos {roots}; cannot tell which is "
        f"the {network} encoder. Pass a checkpoint with one torso."
    )


@dataclasses.dataclass
class MatchReport:
    """How a checkpoint's torso lined up with the model's; names are 'module/leaf'."""

    source_root: Optional[str]
    reference_root: str
    matched: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)  # model names, not loaded
    unexpected: list[str] = dataclasses.field(default_factory=list)  # checkpoint names, unused
    shape_mismatched: list[tuple[str, tuple, tuple]] = dataclasses.field(
        default_factory=list
    )  # (name, ckpt, model shape)
    reshaped: list[str] = dataclasses.field(default_factory=list)  # e.g. BN [C] -> [1,1,1,C]

    @property
    def ok(self) -> bool:
        """True when every torso array of the model was filled from the checkpoint."""
        return not self.missing and not self.shape_mismatched

    def summary(self, limit: int = 20) -> str:
        """Human-readable multi-line account, listing up to `limit` names per category."""
        lines = [
            f"torso '{self.source_root}' -> '{self.reference_root}': "
            f"{len(self.matched)} matched, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.shape_mismatched)} shape "
            f"mismatched, {len(self.reshaped)} reshaped"
        ]
        for title, names in (
            ("missing (kept at model init)", self.missing),
            ("unexpected (ignored)", self.unexpected),
            (
                "shape mismatched (kept at model init)",
                [f"{n}: checkpoint {a} vs model {b}" for n, a, b in self.shape_mismatched],
            ),
        ):
            if names:
                lines.append(f"  {title}:")
                lines += [f"    {n}" for n in names[:limit]]
                if len(names) > limit:
                    lines.append(f"    ... and {len(names) - limit} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        """The summary, so logging '%s' of a report prints names, not the dataclass repr."""
        return self.summary()


def _match_tree(
    source: Mapping[str, Mapping[str, Any]],
    reference: Mapping[str, Mapping[str, Any]],
    source_root: Optional[str],
    reference_root: str,
    report: MatchReport,
) -> Tree:
    """Reference tree with its torso leaves replaced by the renamed source leaves that fit."""
    renamed: dict[str, tuple[str, Any]] = {}  # our 'module/leaf' -> (checkpoint name, array)
    for module, leaves in source.items():
        inside = source_root is not None and (
            module == source_root or module.startswith(source_root + _SEP)
        )
        ours = reference_root + module[len(source_root) :] if inside else None
        for leaf, value in leaves.items():
            if ours is None:
                report.unexpected.append(f"{module}/{leaf}")
            else:
                renamed[f"{ours}/{leaf}"] = (f"{module}/{leaf}", value)
    out: Tree = {}
    for module, leaves in reference.items():
        in_torso = module == reference_root or module.startswith(reference_root + _SEP)
        out[module] = dict(leaves)
        if not in_torso:
            continue  # heads and anything else outside the torso are not this function's business
        for leaf, ref_value in leaves.items():
            name = f"{module}/{leaf}"
            if name not in renamed:
                report.missing.append(name)
                continue
            source_name, value = renamed.pop(name)
            value = np.asarray(value)
            ref_shape = tuple(np.shape(ref_value))
            if value.shape != ref_shape:
                # Older exports store BatchNorm vectors as [C]; same numbers, other broadcast shape.
                if value.size == int(np.prod(ref_shape)) and (
                    tuple(d for d in value.shape if d != 1) == tuple(d for d in ref_shape if d != 1)
                ):
                    value = value.reshape(ref_shape)
                    report.reshaped.append(name)
                else:
                    report.shape_mismatched.append((name, value.shape, ref_shape))
                    continue
            out[module][leaf] = value.astype(np.asarray(ref_value).dtype, copy=True)
            report.matched.append(name)
    report.unexpected.extend(source_name for source_name, _ in renamed.values())
    return out


def match_torso_params(
    loaded: dict,
    reference_params: dict,
    reference_state: Optional[dict],
    *,
    network: str = "online",
) -> tuple[dict, Optional[dict], MatchReport]:
    """(params, state, report): the reference trees with their ResNet torso taken from `loaded`.

    `loaded` is load_deepmind_checkpoint's output (flat, or wrapped under e.g. 'online_params'
    / 'params'); its torso prefix (say 'encoder/~/res_net50') is renamed to the reference's
    ('res_net50'). Torso arrays that are absent or of the wrong shape keep their reference value
    and are reported; modules outside the torso (heads) are passed through untouched.
    """
    reference_roots = _torso_roots(reference_params)
    if len(reference_roots) != 1:
        raise ValueError(
            f"reference_params should hold one ResNet torso (an '{_STEM}' module), "
            f"found {reference_roots or 'none'}."
        )
    reference_root = reference_roots[0]
    src_params, src_state = split_checkpoint(loaded, network)
    source_root = _pick_source_root(_torso_roots(src_params), reference_root, network)
    report = MatchReport(source_root=source_root, reference_root=reference_root)
    params = _match_tree(src_params, reference_params, source_root, reference_root, report)
    state = None
    if reference_state is not None:
        state = _match_tree(src_state, reference_state, source_root, reference_root, report)
    return params, state, report
