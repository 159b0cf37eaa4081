"""The training loop end to end: resume equality, CLI runs, guards, multi-process, --is_test."""

import os
import socket
import subprocess
import sys

import chex
import numpy as np
import pytest

from detcon.train import loop as train_loop
from detcon.workdir import checkpoint as checkpoint_lib

from conftest import REPO, logged, tiny_config


def _steps(workdir) -> list[int]:
    return logged(workdir, "step")


def _losses(workdir) -> list[float]:
    return logged(workdir, "loss")


def _config(max_steps: int):
    config = tiny_config(batch_size=8)  # one example on each of the 8 fake devices
    config.training.max_steps = max_steps
    config.training.checkpoint_every_steps = 2
    config.training.keep_checkpoints = 5
    return config


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    config = _config(6)
    real_batches = train_loop.mock_batches

    def poisoned(config, start_step, local_devices, per_device):
        for step, batch in enumerate(
            real_batches(config, start_step, local_devices, per_device), start=start_step
        ):
            if step >= 3:  # the 4th update sees NaN pixels
                batch["view1"] = np.full_like(batch["view1"], np.nan)
            yield batch

    monkeypatch.setattr(train_loop, "mock_batches", poisoned)
    with pytest.raises(train_loop.NonFiniteLossError, match="Non-finite loss .* step 4"):
        train_loop.run(config, str(tmp_path))
    assert checkpoint_lib.make_manager(str(tmp_path), 5).all_steps() == [2]
    assert _steps(tmp_path) == [1, 2, 3]


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
    config = _config(1)
    config.training.batch_size = 12
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
        train_loop.run(config, str(tmp_path))


def test_missing_dataset_directory_names_path_and_command(tmp_path):
    config = _config(1)
    config.training.mock_data = False
    config.data.demo = False
    config.data.dataset_directory = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere.*generate_fh_masks.py"):
        train_loop.run(config, str(tmp_path / "w"))


def _main_loop(args, devices: int, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    environ = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        **env,
    )
    result = subprocess.run(
        [sys.executable, "-m", "detcon.main_loop", *args],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


TINY_FLAGS = [
    "--config=configs/demo.py",
    "--config.model.depth=10",
    "--config.data.image_size=64",
    "--config.detcon_b.projector_hidden_size=64",
    "--config.detcon_b.predictor_hidden_size=64",
    "--config.detcon_b.projector_output_size=32",
    "--config.detcon_b.num_samples=4",
    "--mock_data",
    "--batch_size=8",
    "--max_steps=2",
    "--log_every_steps=1",
]


@pytest.mark.slow
def test_cli_mock_run_resumes(tmp_path):
    """2 steps, then the same command with --max_steps=4 resumes (no consent needed)."""
    w = str(tmp_path / "w")
    flags = [f for f in TINY_FLAGS if not f.startswith("--max_steps")] + [f"--workdir={w}"]
    _main_loop(flags + ["--max_steps=2"], devices=2)
    assert _steps(w) == [1, 2]
    out = _main_loop(flags + ["--max_steps=4"], devices=2)
    assert "Resumed from" in out.stderr
    assert "training.max_steps: 2 -> 4; the schedules now end at step 4." in out.stderr
    assert _steps(w) == [1, 2, 3, 4]
    assert os.path.isdir(os.path.join(w, "tensorboard"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """2 processes x 2 CPU devices (jax.distributed, gloo) == 1 process x 4 devices."""
    single = str(tmp_path / "single")
    _main_loop(TINY_FLAGS + [f"--workdir={single}"], devices=4)
    multi = str(tmp_path / "multi")
    address = f"localhost:{_free_port()}"
    environ = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO),
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "detcon.main_loop",
                *TINY_FLAGS,
                f"--workdir={multi}",
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=REPO,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    assert _steps(multi) == [1, 2]
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-4, atol=1e-4)
    p_multi, _, _ = checkpoint_lib.load_network(multi)
    p_single, _, _ = checkpoint_lib.load_network(single)
    chex.assert_trees_all_close(p_multi, p_single, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 4])
def test_is_test_smoke_run_and_export(tmp_path, devices):
    """--is_test: one ResNet-50 step on mock data (batch 4), on 1 and 4 devices; it exports."""
    w = str(tmp_path / "w")
    _main_loop(["--is_test", f"--workdir={w}"], devices=devices)
    assert _steps(w) == [1]
    params, state, config = checkpoint_lib.load_network(w)
    assert config["model"]["depth"] == 50 and config["training"]["batch_size"] == 4
    assert "res_net50/~/initial_conv" in params
    if devices > 1:
        return
    # The checkpoint converts to all three formats (the script's code path, in-process).
    from safetensors.numpy import load_file

    from detcon.weights import export

    out = str(tmp_path / "r50")
    for fmt in ("torchvision", "detectron2", "npz"):
        export.export_torso(params, state, 50, fmt, out)
    exported = load_file(out + ".safetensors")
    assert len(exported) == 318  # torchvision resnet50's 320 entries minus fc.weight, fc.bias
    np.testing.assert_array_equal(
        exported["conv1.weight"],
        np.transpose(params["res_net50/~/initial_conv"]["w"], (3, 2, 0, 1)),
    )
    with np.load(out + ".npz") as npz:
        np.testing.assert_array_equal(
            npz["res_net50/~/initial_conv/w"], params["res_net50/~/initial_conv"]["w"]
        )
    assert os.path.getsize(out + ".pkl") > 90e6  # 23.5 M float32 weights plus BN statistics


def test_incomplete_init_checkpoint_is_refused(tmp_path):
    """A torso checkpoint that leaves weights unfilled must not start a run silently."""
    import jax

    from detcon.train import experiment as experiment_lib

    config = _config(1)
    state = experiment_lib.build(config, 1).init_state(jax.random.PRNGKey(0))
    flat = {
        f"{module}/{name}": np.asarray(value)
        for module, leaves in state.online_params.items()
        if module.startswith("res_net10/") and not module.endswith("initial_conv")
        for name, value in leaves.items()
    }
    path = str(tmp_path / "partial.npz")
    np.savez(path, **flat)
    config.training.init_checkpoint = path
    with pytest.raises(ValueError, match="does not fill the torso"):
        train_loop.run(config, str(tmp_path / "w"))
