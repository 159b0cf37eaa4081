"""scripts/benchmark.py and detcon.benchmark: the step compiles to one program whatever the batch;
every part runs; config overrides go through ml_collections."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from detcon import cli
from detcon.benchmark import flops as flops_lib
from detcon.benchmark import step as step_lib

from conftest import REPO, load_config, tiny_config

_spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)

# Fast CPU compilation for the smoke run (same arithmetic, less optimised code).
_FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


def test_step_program_does_not_grow_with_the_batch():
    """Same StableHLO op count at per-device batch 2 and 8: no Python loop over examples.

    The compile time of the step therefore does not depend on the batch (the benchmark measures
    it); a per-example loop would add ops in proportion to the batch.
    """
    config = tiny_config(batch_size=8)
    small = step_lib.lower_step(config, per_device_batch=2)
    large = step_lib.lower_step(config, per_device_batch=8)
    assert flops_lib.stablehlo_op_count(small) == flops_lib.stablehlo_op_count(large) > 1000
    # Not vacuous: the two programs really are for different batches.
    assert "x2x64x64x3x" in small.as_text() and "x8x64x64x3x" in large.as_text()


def test_step_and_masks_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = benchmark.main(
        [
            "--what=step,masks",
            "--config=demo,configs/simclr.py",
            "--depth=10",
            "--image_size=32",
            "--devices=1",
            "--per_device_batch=2",
            "--steps=1",
            "--warmup=1",
            "--mask_batch=4",
            "--mask_image_size=64",
            "--mask_repeats=2",
            f"--json={out}",
            *(f"--compiler_option={k}={v}" for k, v in _FAST_COMPILE.items()),
        ]
    )
    written = json.loads(out.read_text())
    assert written["machine"]["local_devices"] == 8 and len(written["step"]) == 2
    printed = capsys.readouterr().out
    assert "update step" in printed and "grid masks" in printed
    row, simclr = results["step"]
    # SimCLR has no target network: 2 views x (forward + backward) = 6 forward-equivalents.
    assert simclr["method"] == "simclr" and simclr["status"] == "ok"
    assert simclr["model_flops_per_image"] == 6 * simclr["counted_forward_flops"]
    assert 4.5 < simclr["step_flops_per_image"] / simclr["counted_forward_flops"] < 9
    assert row["status"] == "ok" and row["devices"] == 1 and row["global_batch"] == 2
    assert row["compiler_options"] == _FAST_COMPILE
    assert np.isfinite(row["loss"])
    assert row["images_per_s"] > 0 and row["compile_s"] > 0
    assert row["images_per_s_per_device"] == pytest.approx(row["images_per_s"])
    assert row["model_flops_per_image"] == 8 * row["counted_forward_flops"]  # not ResNet-50
    # 2 online forwards + backwards and 2 target forwards: about 8 forwards, plus the heads.
    assert 6 < row["step_flops_per_image"] / row["counted_forward_flops"] < 12
    assert row["mfu"] is None  # no peak for CPUs
    fast, dense = results["masks"]
    assert (fast["op"], dense["op"]) == ("binary_masks", "binary_masks_dense")
    assert fast["outputs_equal"] and dense["outputs_equal"]
    # The dense form materialises a [B, S, S, M] float one-hot; the scatter form does not.
    assert dense["peak_mib"] >= 4 * 64 * 64 * 256 * 4 / 2**20 > 10 * fast["peak_mib"]


def test_resnet50_uses_the_published_flop_count():
    flops = flops_lib.forward_flops(50, 224)
    assert flops["model_forward_flops"] == pytest.approx(8.2e9)
    # Counted from the jaxpr: 4.09 GMACs, the figure usually quoted for ResNet-50.
    assert flops["counted_forward_flops"] == pytest.approx(2 * 4.09e9, rel=0.005)


def test_peak_flops_by_device_kind():
    assert flops_lib.peak_flops("NVIDIA H200", None) == 989e12
    assert flops_lib.peak_flops("cpu", None) is None
    assert flops_lib.peak_flops("cpu", 1.5) == 1.5e12


def test_unknown_part_is_rejected(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--what=step,gpu"])
    assert "unknown parts" in capsys.readouterr().err


def test_step_benchmark_imports_no_tensorflow():
    """The script, with the step and model, loads without TensorFlow (a GPU host may lack it)."""
    script = str(REPO / "scripts" / "benchmark.py")
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('b', {script!r}); "
        "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
        "assert 'detcon.train.step' in sys.modules; "
        "assert 'tensorflow' not in sys.modules, 'TensorFlow imported'"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_pipeline_and_fh_rows(tmp_path):
    results = benchmark.main(
        [
            "--what=pipeline,fh",
            "--image_size=32",
            "--photo_side=96",
            "--pipeline_batch=2",
            "--pipeline_batches=2",
            "--pipeline_warmup=1",
            "--num_parallel_calls=1",
            "--fh_scales=100",
            "--fh_min_sizes=50",
            "--fh_workers=1",
            "--fh_rounds=1",
            f"--work_directory={tmp_path}",
        ]
    )
    (row,) = results["pipeline"]
    assert row["num_parallel_calls"] == 1 and row["pairs_per_s"] > 0
    assert row["pairs_per_s_per_core"] == pytest.approx(row["pairs_per_s"])
    bare, writer = results["fh"]
    assert bare["images"] == writer["images"] == 12
    assert bare["images_per_s"] > 0 and writer["images_per_s_per_worker"] > 0


def test_set_overrides_use_the_config_field_types_and_reject_unknown_fields():
    base = load_config("detcon_b")
    changed = cli.override_config(
        base, ["model.one_pass_views=False", "training.batch_size=64", "detcon_b.temperature=0.2"]
    )
    assert changed.model.one_pass_views is False and changed.training.batch_size == 64
    assert changed.detcon_b.temperature == 0.2
    assert base.model.one_pass_views is True and base.training.batch_size == 4096  # a copy
    with pytest.raises(ValueError, match="names no field of the config"):
        cli.override_config(base, ["model.no_such_field=1"])
    with pytest.raises(ValueError, match="batch_size"):
        cli.override_config(base, ["training.batch_size=many"])


@pytest.mark.slow  # ~1 min: 22 small compiles
def test_conv_rows_cover_every_torso_conv_and_agree(capsys):
    results = benchmark.main(
        ["--what=convs", "--depth=10", "--image_size=32", "--conv_batch=2", "--conv_repeats=1"]
    )
    rows = results["convs"]
    # ResNet-10: the stem, two 3x3 convs per group and three projection shortcuts; the two
    # 3x3 convs of group 0 share one shape.
    assert sum(r["count"] for r in rows) == 1 + 4 * 2 + 3 and len(rows) == 11
    assert rows[0]["layer"] == "res_net10/~/initial_conv" and rows[0]["input_shape"] == [32, 32, 3]
    assert rows[-1]["input_shape"] == [1, 1, 512] and rows[-1]["stride"] == 1
    for row in rows:
        assert row["relative_difference"] < 1e-5, row
        assert row["native_ms"] > 0 and row["patch_ms"] > 0
        assert row["speedup"] == pytest.approx(row["native_ms"] / row["patch_ms"])
    assert "conv layers" in capsys.readouterr().out
