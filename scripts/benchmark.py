r"""Benchmarks the DetCon-B update step, the grid-mask op, the input pipeline and FH mask writing.

  python scripts/benchmark.py --what=step --depth=50 --image_size=224 \
      --per_device_batch=64,128,256 --precision=float32,bfloat16 --steps=20 --json=step.json
  python scripts/benchmark.py --what=masks --mask_batch=64 --json=masks.json
  python scripts/benchmark.py --what=pipeline,fh --num_parallel_calls=1,2 --fh_workers=1,2
  python scripts/benchmark.py --what=step --config=detcon_b,byol --set=model.one_pass_views=False
  python scripts/benchmark.py --what=convs --depth=10 --image_size=64 --conv_batch=64

Prints one table per part and writes everything (plus the machine) to --json. Every part runs on
whatever devices are present:
  step      images/s (global and per device), step time, trace/lower and compile time, XLA memory
            and model FLOP utilisation of the pmapped update step, on synthetic data placed on the
            devices once (no TensorFlow is imported for it).
  convs     forward+backward ms of each distinct conv layer of the torso, XLA's native conv
            against the patch matmul the CPU uses (detcon.models.patch_conv), outputs compared.
  masks     time and XLA peak memory of detcon.ops.masks.binary_masks against the dense per-pixel
            one-hot reference binary_masks_dense, on the same id maps (outputs checked equal).
  pipeline  two-view pairs/s of detcon.data.pipeline.pretrain_batches at each --num_parallel_calls
            (TensorFlow, imported only here).
  fh        images/s per worker process of the mask writer (decode, FH, JPEG, serialise through
            detcon.data.build.mask_job's worker pool) against bare skimage felzenszwalb on the same
            images.
Without --dataset_directory the pipeline reads a small set written under --work_directory with the
project's record writer: ImageNet-sized photos (--photo_side) or the demo set (--pipeline_data).
The measuring code lives in detcon/benchmark/; this file holds the command line only.
"""

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import ml_collections

from detcon import cli
from detcon.benchmark import convs as convs_lib
from detcon.benchmark import data as data_lib
from detcon.benchmark import flops as flops_lib
from detcon.benchmark import (
    machine,
    tables,
)
from detcon.benchmark import masks as masks_lib
from detcon.benchmark import step as step_lib

PARTS = ("step", "convs", "masks", "pipeline", "fh")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _option_value(text: str) -> Any:
    """A compiler option's value: bool, int or float when it reads as one, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parallel_list(text: str) -> list[Optional[int]]:
    return [None if x in ("autotune", "0") else int(x) for x in text.split(",") if x]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line; lists are comma-separated."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--what", default="step,masks", help=f"comma-separated parts: {','.join(PARTS)}")
    add(
        "--config",
        default="detcon_b",
        help="configs/<name>.py (or several, comma-separated) giving the method, heads and loss; "
        "depth, size, batch, precision override",
    )
    add(
        "--set",
        action="append",
        default=[],
        metavar="GROUP.FIELD=VALUE",
        help="config override in ml_collections' --config.GROUP.FIELD=VALUE syntax without the "
        "'--config.' prefix, repeatable (e.g. model.one_pass_views=False)",
    )
    add("--depth", type=int, default=50)
    add("--image_size", type=int, default=224)
    add("--per_device_batch", default="64", help="comma-separated list, e.g. 64,128,256")
    add("--devices", type=int, default=0, help="use the first N local devices (0: all)")
    add("--precision", default="float32", help="float32, bfloat16 or both comma-separated")
    add("--steps", type=int, default=20, help="timed steps per row")
    add("--warmup", type=int, default=2, help="untimed steps after compiling")
    add(
        "--skip_after_oom",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip per-device batches at least as large as one that ran out of memory",
    )
    add(
        "--compiler_option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="XLA option for compiling the step, repeatable (e.g. xla_gpu_autotune_level=4)",
    )
    add(
        "--peak_tflops",
        type=float,
        default=None,
        help="peak FLOP/s per device for MFU (default: dense bf16 peak of the device kind)",
    )
    add("--conv_batch", type=int, default=64, help="images per conv call (both views of 32)")
    add("--conv_repeats", type=int, default=3)
    add("--mask_batch", type=int, default=64)
    add("--mask_image_size", type=int, default=None, help="default: --image_size")
    add("--max_mask_id", type=int, default=256)
    add("--mask_repeats", type=int, default=10)
    add("--dataset_directory", default="", help="TFRecords to read; default: built, see below")
    add(
        "--pipeline_data",
        choices=("photos", "demo"),
        default="photos",
        help="without --dataset_directory: resized photos (--photo_side) or the demo set",
    )
    add("--photo_side", type=int, default=500, help="long side of the photos (ImageNet ~500)")
    add("--pipeline_batch", type=int, default=32)
    add("--pipeline_batches", type=int, default=20)
    add("--pipeline_warmup", type=int, default=3)
    add("--num_parallel_calls", default="autotune", help="e.g. 1,2,autotune")
    add("--fh_scales", default="1000")
    add("--fh_min_sizes", default="1000")
    add("--fh_workers", default="1", help="worker processes, e.g. 1,2")
    add("--fh_rounds", type=int, default=2, help="passes over the 12 photos")
    add("--work_directory", default=os.path.join(tempfile.gettempdir(), "detcon_benchmark"))
    add("--json", default="", help="write all rows and the machine here")
    args = parser.parse_args(argv)
    args.parts = [p for p in args.what.split(",") if p]
    try:
        args.compiler_options = {
            k: _option_value(v) for k, v in (o.split("=", 1) for o in args.compiler_option)
        }
    except ValueError:
        parser.error(f"--compiler_option takes KEY=VALUE, got {args.compiler_option}")
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--what: unknown parts {unknown}; choose from {list(PARTS)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Runs the requested parts, prints their tables and returns (and writes) the results."""
    args = parse_args(argv)
    results: dict[str, Any] = dict(machine=machine.machine_info(), args=vars(args))
    print(json.dumps(results["machine"]), flush=True)

    def save() -> None:
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(results, handle, indent=1, default=str)

    if "step" in args.parts:
        peak = flops_lib.peak_flops(results["machine"]["device_kind"], args.peak_tflops)
        flops = flops_lib.forward_flops(args.depth, args.image_size)
        results["step"] = []
        for name in args.config.split(","):
            try:
                base = cli.override_config(step_lib.load_config(name), args.set)
            except ValueError as error:
                cli.fail(f"--set {error}")
            _benchmark_steps(args, name, base, peak, flops, results, save)
        print(tables.format_table("update step", results["step"], tables.STEP_COLUMNS), flush=True)
    if "convs" in args.parts:
        results["convs"] = convs_lib.benchmark_convs(
            args.depth, args.image_size, args.conv_batch, args.conv_repeats
        )
        save()
        print(tables.format_table("conv layers", results["convs"], tables.CONV_COLUMNS), flush=True)
    _host_parts(args, results, save)
    return results


def _benchmark_steps(
    args: argparse.Namespace,
    name: str,
    base: ml_collections.ConfigDict,
    peak: Optional[float],
    flops: dict,
    results: dict,
    save: Callable,
) -> None:
    """Appends one step row per precision and per-device batch of config `name` to results."""
    for precision in args.precision.split(","):
        too_large = None  # smallest per-device batch of this precision that did not fit
        for batch in _int_list(args.per_device_batch):  # in the order given
            if too_large is not None and batch >= too_large and args.skip_after_oom:
                continue
            row = step_lib.benchmark_step(
                args.depth,
                args.image_size,
                batch,
                precision,
                steps=args.steps,
                warmup=args.warmup,
                peak=peak,
                num_devices=args.devices,
                base_config=base,
                flops=flops,
                compiler_options=args.compiler_options,
            )
            row = dict(config=name, overrides=list(args.set), **row)
            results["step"].append(row)
            print(json.dumps(row, default=str), flush=True)
            save()
            if row["status"] != "ok":
                too_large = min(batch, too_large or batch)


def _host_parts(args: argparse.Namespace, results: dict, save: Callable) -> None:
    """The masks, pipeline and fh parts, as requested."""
    if "masks" in args.parts:
        results["masks"] = masks_lib.benchmark_masks(
            args.mask_batch,
            args.mask_image_size or args.image_size,
            args.max_mask_id,
            args.mask_repeats,
        )
        save()
        print(tables.format_table("grid masks", results["masks"], tables.MASK_COLUMNS), flush=True)
    scales = [float(x) for x in args.fh_scales.split(",")]
    min_sizes = _int_list(args.fh_min_sizes)
    if "pipeline" in args.parts:
        directory, dataset = args.dataset_directory, args.dataset_directory
        if not directory and args.pipeline_data == "demo":
            from detcon.data.build import demo

            directory = demo.ensure_demo_dataset(os.path.join(args.work_directory, "demo_fh"))
            dataset = "demo (<=192 px)"
        elif not directory:
            directory = data_lib.photo_dataset(
                os.path.join(args.work_directory, f"photos_{args.photo_side}_fh"),
                args.photo_side,
                scales,
                min_sizes,
            )
            dataset = f"photos ({args.photo_side} px)"
        results["pipeline"] = data_lib.benchmark_pipeline(
            directory,
            args.image_size,
            args.pipeline_batch,
            _parallel_list(args.num_parallel_calls),
            args.pipeline_batches,
            args.pipeline_warmup,
            dataset,
        )
        save()
        print(
            tables.format_table("input pipeline", results["pipeline"], tables.PIPELINE_COLUMNS),
            flush=True,
        )
    if "fh" in args.parts:
        results["fh"] = data_lib.benchmark_fh(
            data_lib.photo_jpegs(args.photo_side),
            scales,
            min_sizes,
            _int_list(args.fh_workers),
            args.fh_rounds,
            args.work_directory,
        )
        save()
        print(tables.format_table("FH masks", results["fh"], tables.FH_COLUMNS), flush=True)


if __name__ == "__main__":
    # A persistent-cache hit would report a cache read as the compile time. (Only here: main()
    # called in-process, e.g. by the tests, leaves the caller's cache settings alone.)
    jax.config.update("jax_enable_compilation_cache", False)
    main()
