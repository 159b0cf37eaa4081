r"""Exports the pretrained ResNet encoder for PyTorch fine-tuning (torchvision, detectron2) or npz.

  python scripts/export_checkpoint.py --checkpoint=/path/to/workdir --format=torchvision \
      --output=/tmp/detcon_r50            # -> detcon_r50.safetensors (+ detcon_r50.pth with torch)
  python scripts/export_checkpoint.py --checkpoint=/path/to/workdir --format=detectron2 \
      --output=/tmp/detcon_r50.pkl
  python scripts/export_checkpoint.py --checkpoint=detcon_b_imagenet.npy --allow_pickle \
      --format=npz --output=/tmp/detcon_r50.npz   # a DeepMind release file as input
  python scripts/export_checkpoint.py --checkpoint=/path/to/detreg_workdir --format=detr \
      --output=/tmp/detreg_detr.pth   # a DETReg run -> facebookresearch/detr {'model': ...}

--checkpoint is a run's workdir (its latest checkpoint), one checkpoint step directory, or a
single file: DeepMind's pickled .npy/.pkl releases (need --allow_pickle) or an .npz from this
script. Depth and width come from the run's config (files: from the parameter shapes). See
docs/finetune.md for the detectron2 / MMSegmentation settings these weights need. --format=detr
takes a DETReg run (workdir or step directory) and needs torch; see docs/detreg.md.
"""

import os
from typing import Any

from absl import app, flags, logging

from detcon import cli
from detcon.weights import export
from detcon.weights import torso as torso_lib

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "Run workdir (latest checkpoint), checkpoint step directory, or a "
    ".npy/.pkl/.npz checkpoint file.",
    required=True,
)
_FORMAT = flags.DEFINE_enum("format", None, list(export.FORMATS), "Output format.", required=True)
_OUTPUT = flags.DEFINE_string(
    "output",
    None,
    "Output path. torchvision writes PATH.safetensors and, when torch is "
    "importable, PATH.pth; detectron2 writes PATH.pkl; npz writes PATH.npz; detr writes PATH.pth.",
    required=True,
)
_NETWORK = flags.DEFINE_enum(
    "network",
    "online",
    ["online", "target"],
    "Which encoder to export: the online one or its EMA target.",
)
_ALLOW_PICKLE = flags.DEFINE_bool(
    "allow_pickle",
    False,
    "Permit loading a pickled .npy/.pkl checkpoint (e.g. DeepMind's "
    "released BYOL/DetCon weights). Unpickling EXECUTES CODE stored in the file: pass this only "
    "for files from a source you trust.",
)


def _width_hint(fmt: str, depth: int, width: int) -> str:
    """What to set downstream when the torso is wider than torchvision/detectron2 defaults."""
    if width == 1:
        return ""
    out = 256 if export.RESNET_DEPTHS[depth][1] else 64
    if fmt == "torchvision":
        return (
            f"note: width x{width} does not fit torchvision's stock resnet{depth} (64-channel "
            f"stem); MMSegmentation's ResNet loads it with stem_channels={64 * width}, "
            f"base_channels={64 * width}."
        )
    if fmt == "detectron2":
        return (
            f"note: width x{width}: set MODEL.RESNETS.STEM_OUT_CHANNELS {64 * width} "
            f"MODEL.RESNETS.RES2_OUT_CHANNELS {out * width} "
            f"MODEL.RESNETS.WIDTH_PER_GROUP {64 * width}."
        )
    return ""


def _export_detr(path: str, network: str, output: str) -> list[str]:
    """A DETReg run's detector -> facebookresearch/detr's {'model': state_dict} .pth."""
    from detcon.workdir import checkpoint as checkpoint_lib

    if not os.path.isdir(path):
        raise ValueError(
            f"--format=detr needs a DETReg run's workdir or step directory; {path} is not one."
        )
    if not export.torch_available():
        raise ValueError("--format=detr writes a torch .pth: install torch, or use --format=npz.")
    paths = export.output_paths(output, "detr", with_torch=True)
    params, state, config = checkpoint_lib.load_network(path, network)
    depth = int(config.get("model", {}).get("depth", 0))
    tensors = export.refuse_non_finite(export.haiku_to_detr(params, state, depth))
    export.write_detr(tensors, paths[0])
    return paths


@cli.one_line_usage_errors
def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)  # orbax logs each file it reads at INFO
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    path = _CHECKPOINT.value
    try:
        # Fail on a bad --output before spending time loading the checkpoint.
        export.output_paths(_OUTPUT.value, _FORMAT.value, with_torch=False)
        if _FORMAT.value == "detr":
            for p in _export_detr(path, _NETWORK.value, _OUTPUT.value):
                print(f"wrote {p} ({os.path.getsize(p) / 2**20:.1f} MiB)")
            return
        loaded = torso_lib.load(path, _NETWORK.value, allow_pickle=_ALLOW_PICKLE.value)
        if loaded.report is not None:
            print(loaded.report.summary())
        torso = loaded.torso
        params, state, depth, width = (
            torso.params,
            torso.state,
            torso.depth,
            torso.width_multiplier,
        )
        metadata: dict[str, Any] = {
            "format": "pt",
            "source": "detcon",
            "checkpoint": path,
            "network": _NETWORK.value,
            "depth": str(depth),
            "width_multiplier": str(width),
        }
        written = export.export_torso(params, state, depth, _FORMAT.value, _OUTPUT.value, metadata)
    except (ValueError, KeyError, FileNotFoundError) as e:
        # These carry a message meant for the user; a traceback would only bury it.
        # An OSError's args[0] is its errno ("error: 2"): show its whole text instead.
        text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        raise SystemExit(f"export_checkpoint: error: {text}") from e
    for p in written:
        print(f"wrote {p} ({os.path.getsize(p) / 2**20:.1f} MiB)")
    if _FORMAT.value == "torchvision" and not written[-1].endswith(".pth"):
        print(
            "torch is not importable here, so no .pth was written; in PyTorch use "
            "safetensors.torch.load_file() on the .safetensors file."
        )
    hint = _width_hint(_FORMAT.value, depth, width)
    if hint:
        print(hint)


if __name__ == "__main__":
    app.run(main)
