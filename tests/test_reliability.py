"""Runs that must survive divergence, preemption, corrupt files, changed configs and own data."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from detcon import errors
from detcon.data.build import image_folder, mask_job
from detcon.train import loop as train_loop
from detcon.weights import export
from detcon.workdir import checkpoint as checkpoint_lib
from detcon.workdir import finite
from detcon.workdir import lock as workdir_lock
from detcon.workdir import metrics as metrics_lib

from conftest import REPO, logged, tiny_config


def _config(max_steps: int, every: int = 2):
    config = tiny_config(batch_size=8)
    config.training.max_steps = max_steps
    config.training.checkpoint_every_steps = every
    config.training.keep_checkpoints = 10
    return config


def _steps(workdir) -> list[int]:
    return logged(workdir, "step")


def _losses(workdir) -> list[float]:
    return logged(workdir, "loss")


def _saved_steps(workdir) -> list[int]:
    return sorted(checkpoint_lib.make_manager(str(workdir), 10).all_steps())


def _load_state(workdir, step: int) -> dict:
    import orbax.checkpoint as ocp

    path = os.path.join(str(workdir), "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A finished 6-step mock run with checkpoints at 2, 4, 6 (copied by tests that change it)."""
    workdir = str(tmp_path_factory.mktemp("six") / "w")
    train_loop.run(_config(6), workdir)
    return workdir


def _copy(workdir: str, tmp_path) -> str:
    import shutil

    target = str(tmp_path / "copy")
    shutil.copytree(workdir, target)
    return target


# 1. Divergence -----------------------------------------------------------------------------------


def test_non_finite_state_is_never_saved(tmp_path):
    import jax

    from detcon.train import experiment as experiment_lib

    config = _config(1)
    state = experiment_lib.build(config, 1).init_state(jax.random.PRNGKey(0))
    module = sorted(state.online_state)[0]
    leaf = sorted(state.online_state[module])[0]
    poisoned = jax.tree_util.tree_map(np.asarray, state.online_state)
    poisoned[module][leaf] = np.full_like(poisoned[module][leaf], np.inf)
    manager = checkpoint_lib.make_manager(str(tmp_path), 3)
    with pytest.raises(errors.NonFiniteStateError, match=f"online_state/{module}/{leaf}"):
        checkpoint_lib.save(manager, state._replace(online_state=poisoned), {})
    assert manager.all_steps() == []
    checkpoint_lib.save(manager, state, {})  # the same state, finite, saves
    assert manager.all_steps() == [0]


def test_diverging_run_stops_keeps_only_finite_checkpoints_and_says_how_to_go_back(tmp_path):
    config = _config(8, every=1)
    config.optim.base_learning_rate = 1e9
    with pytest.raises(errors.RunStopped, match=r"--restore_step=\d+") as stopped:
        train_loop.run(config, str(tmp_path))
    saved = _saved_steps(tmp_path)
    assert f"steps {', '.join(map(str, saved))}" in str(stopped.value)
    for step in saved:
        assert finite.non_finite_leaves(_load_state(tmp_path, step)) == []


def test_restore_step_moves_later_checkpoints_aside_and_replays_the_same_run(six_steps, tmp_path):
    workdir = _copy(six_steps, tmp_path)
    config = _config(6)
    config.training.restore_step = 2
    train_loop.run(config, workdir)
    aside = os.path.join(workdir, "checkpoints_after_2")
    assert sorted(os.listdir(aside)) == ["4", "6"]
    assert _saved_steps(workdir) == [2, 4, 6]
    assert _steps(workdir) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(_losses(workdir), _losses(six_steps), rtol=1e-5)
    config.training.restore_step = 3
    with pytest.raises(errors.CheckpointRestoreError, match="kept steps: 2, 4, 6"):
        train_loop.run(config, workdir)


def test_exporter_refuses_non_finite_weights(six_steps, tmp_path):
    params, state, _ = checkpoint_lib.load_network(six_steps)
    module = next(m for m in params if m.endswith("initial_conv"))
    params[module]["w"] = params[module]["w"].copy()
    params[module]["w"][0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf in .*conv1.weight"):
        export.export_torso(
            params,
            state,
            export.infer_torso_architecture(params)[0],
            "torchvision",
            str(tmp_path / "out"),
        )
    assert not os.listdir(tmp_path)


# 4, 5. Corrupt files -----------------------------------------------------------------------------


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(six_steps, tmp_path, caplog):
    workdir = _copy(six_steps, tmp_path)
    state_dir = os.path.join(workdir, "checkpoints", "6", "state")
    biggest = max(
        (os.path.join(d, n) for d, _, names in os.walk(state_dir) for n in names),
        key=os.path.getsize,
    )
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    caplog.set_level(logging.WARNING)
    train_loop.run(_config(6), workdir)
    warnings = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoints/6" in warnings[0]
    assert os.listdir(os.path.join(workdir, "checkpoints_unreadable")) == ["6"]
    assert _saved_steps(workdir) == [2, 4, 6]
    np.testing.assert_allclose(_losses(workdir), _losses(six_steps), rtol=1e-5)


def test_full_disk_is_one_clear_error(six_steps, tmp_path, monkeypatch):
    import errno

    workdir = _copy(six_steps, tmp_path)
    manager = checkpoint_lib.make_manager(workdir, 10)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manager, "save", no_space)
    state = _load_state(workdir, 6)
    from detcon.train.state import TrainState

    with pytest.raises(errors.CheckpointWriteError, match="no space left on .*resumes from step 6"):
        checkpoint_lib.save(manager, TrainState(**state)._replace(step=np.int32(8)), {})


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    writer = metrics_lib.MetricsWriter(str(tmp_path))
    caplog.set_level(logging.WARNING)
    writer.truncate_after(2)
    writer.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert any("metrics.jsonl:3" in r.getMessage() for r in caplog.records)


def _tensorboard_points(logdir: str, tag: str) -> list[int]:
    """Steps TensorBoard shows for `tag`: a SessionLog.START at step s hides earlier points >= s."""
    points = []
    for name in sorted(os.listdir(logdir)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                points = [s for s in points if s < event.step]
            for value in event.summary.value:
                if value.tag == tag:
                    points.append(event.step)
    return points


def test_resumed_run_has_no_duplicate_tensorboard_points(six_steps, tmp_path):
    workdir = _copy(six_steps, tmp_path)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 7, "loss": 1.0}\n')  # logged after checkpoint 6 by a run that then died
    config = _config(8)
    config.training.allow_config_change = True
    import shutil

    shutil.rmtree(os.path.join(workdir, "tensorboard"))
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    for step in range(1, 8):  # what the first run put in TensorBoard: steps 1..7
        writer.add_scalar("loss", 1.0, step)
    writer.close()
    train_loop.run(config, workdir)
    assert _tensorboard_points(os.path.join(workdir, "tensorboard"), "loss") == list(range(1, 9))
    assert _steps(workdir) == list(range(1, 9))


# 6. Changed config on resume ----------------------------------------------------------------------


def test_changed_model_is_refused_and_changed_schedule_needs_consent(six_steps, tmp_path, caplog):
    workdir = _copy(six_steps, tmp_path)
    config = _config(6)
    config.model.depth = 18
    config.model.precision = "bfloat16"
    with pytest.raises(
        errors.ConfigChangeError,
        match=r"model.depth: 10 -> 18; model.precision: 'float32' -> 'bfloat16'",
    ):
        train_loop.run(config, workdir)
    config = _config(6)
    config.optim.base_learning_rate = 0.5
    with pytest.raises(
        errors.ConfigChangeError,
        match=r"optim.base_learning_rate: 0.2 -> 0.5.*allow_config_change=True",
    ):
        train_loop.run(config, workdir)
    config.training.allow_config_change = True
    caplog.set_level(logging.WARNING)
    train_loop.run(config, workdir)  # nothing left to do, but accepted and logged
    assert any("optim.base_learning_rate: 0.2 -> 0.5" in r.getMessage() for r in caplog.records)


# 7. Preemption and the workdir lock ---------------------------------------------------------------


def test_sigterm_finishes_the_step_saves_and_exits_nonzero(tmp_path, monkeypatch):
    config = _config(10, every=100)
    real_batches = train_loop.mock_batches

    def terminated_midway(config, start_step, local_devices, per_device):
        for step, batch in enumerate(
            real_batches(config, start_step, local_devices, per_device), start=start_step
        ):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(train_loop, "mock_batches", terminated_midway)
    with pytest.raises(errors.Preempted, match=r"Stopped by SIGTERM after step (\d+)") as stopped:
        train_loop.run(config, str(tmp_path))
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    saved = _saved_steps(tmp_path)
    assert len(saved) == 1 and 1 <= saved[0] < 10
    assert f"after step {saved[0]};" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.undo()
    train_loop.run(config, str(tmp_path))
    assert _steps(tmp_path) == list(range(1, 11))


def test_second_run_on_a_workdir_is_refused_and_stale_locks_are_replaced(tmp_path):
    path = workdir_lock.acquire(str(tmp_path))
    with pytest.raises(errors.WorkdirLockedError, match=f"pid {os.getpid()} on"):
        workdir_lock.acquire(str(tmp_path))
    with pytest.raises(errors.WorkdirLockedError):
        train_loop.run(_config(1), str(tmp_path))
    workdir_lock.release(path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(path, "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": 0}, f)
    assert workdir_lock.acquire(str(tmp_path)) == path
    with open(path) as f:
        assert json.load(f)["pid"] == os.getpid()
    workdir_lock.release(path)
    assert not os.path.exists(path)


# 2, 3, 8. One's own data --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seven_classes(tmp_path_factory):
    """A dataset of 7 classes x 2 images made by the mask generator (more than tiny_config's 4)."""
    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    for label in range(7):
        (root / "images" / f"class{label}").mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(10, 0).repeat(10, 1)
            Image.fromarray(pixels).save(root / "images" / f"class{label}" / f"{i}.png")
    listing = image_folder.list_images(str(root / "images"))
    mask_job.generate_split(
        "train",
        image_folder.shuffled(listing.files, 0),
        str(root / "fh"),
        num_shards=2,
        params=mask_job.FhParams((100.0,), (20,)),
        seed=0,
        num_workers=1,
        show_progress=False,
        classes=listing.classes,
    )
    return str(root / "fh")


def _real(directory: str, max_steps: int = -1):
    config = _config(max_steps)
    config.training.mock_data = False
    config.data.demo = False
    config.data.dataset_directory = directory
    config.data.shuffle_buffer = 16
    return config


def test_probe_smaller_than_the_dataset_is_refused_before_compiling(seven_classes, tmp_path):
    config = _real(seven_classes, 1)  # tiny_config's num_classes is 4
    with pytest.raises(errors.DatasetMismatchError, match="num_classes=4 but the dataset has 7"):
        train_loop.run(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_classes_and_epochs_come_from_the_dataset_and_runs_are_reproducible(
    seven_classes, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    first = _real(seven_classes, max_steps=2)
    first.model.num_classes = -1
    first.data.num_train_examples = 1_281_167  # ImageNet's: disagrees with the 14 images
    first.data.deterministic = True
    train_loop.run(first, str(tmp_path / "first"))
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "Classes: 7 from" in messages and "fh_masks_train.json" in messages
    assert "num_train_examples=1281167 but the dataset holds 14" in messages

    caplog.clear()
    second = _real(seven_classes)
    second.model.num_classes = -1
    second.data.num_train_examples = -1
    second.training.pretrain_epochs = 1
    second.data.deterministic = True
    train_loop.run(second, str(tmp_path / "second"))
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "Examples per epoch: 14 from the record counts" in messages
    # One epoch of 14 images at batch 8 is 1 step, not 1281167 // 8.
    assert _steps(tmp_path / "second") == [1]
    # Step 1's loss depends on the data and the initial weights only: the same input order and
    # augmentation give the same loss bit for bit.
    assert _losses(tmp_path / "second")[0] == _losses(tmp_path / "first")[0]


# 11. Small things ----------------------------------------------------------------------------------


def test_zero_batch_is_a_clear_error(tmp_path):
    config = _config(1)
    config.training.batch_size = 0
    with pytest.raises(errors.ConfigError, match="--batch_size=0 must be a positive multiple"):
        train_loop.run(config, str(tmp_path))


_DEMO = "--config=configs/demo.py"


@pytest.mark.parametrize(
    "args, message",
    [
        ([_DEMO, "--config.training.bogus=1"], "names no field of the config: bogus"),
        (["--config=configs/nope.py"], "--config=configs/nope.py: no such file"),
        ([_DEMO, "stray"], "Unexpected arguments: ['stray']"),
        # No --config: the default file's overrides apply lazily, later than flag parsing.
        (["--config.model.projector_hidden_size=256"], "names no field of the config: "),
        (["--config=configs/byol.py", "--config.method=simclr"], "no 'simclr' group"),
        ([_DEMO, "--config.model.depth=19"], "--config.model.depth=19: choose from 10, 18"),
    ],
)
def test_command_line_mistakes_are_one_line(args, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "detcon.main_loop", f"--workdir={tmp_path}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "oneDNN" not in line and line.strip()]
    assert len(lines) == 1 and lines[0].startswith("main_loop.py: error: "), result.stderr[-2000:]
    assert message in lines[0]


def test_exporter_prints_no_orbax_chatter(six_steps, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "scripts/export_checkpoint.py",
            f"--checkpoint={six_steps}",
            "--format=npz",
            f"--output={tmp_path / 'r10'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "orbax" not in result.stderr.lower(), result.stderr[-2000:]
    assert os.path.exists(tmp_path / "r10.npz")


# 12. The newcomer path: extending a run, one-line errors, small data, a quiet console ------------


def test_a_longer_run_resumes_and_says_where_the_schedules_end(six_steps, tmp_path, caplog):
    """6 steps, then the same config with max_steps=8: no consent needed, steps 1..8."""
    workdir = _copy(six_steps, tmp_path)
    caplog.set_level(logging.WARNING)
    train_loop.run(_config(8), workdir)
    assert _steps(workdir) == list(range(1, 9))
    lines = [r.getMessage() for r in caplog.records if "schedules now end" in r.getMessage()]
    assert lines == [
        "Resuming step 6 with training.max_steps: 6 -> 8; the schedules now end at step 8."
    ]
    with open(os.path.join(workdir, train_loop.CONFIG_NAME)) as f:
        assert json.load(f)["training"]["max_steps"] == 8


def test_run_length_and_device_count_changes_are_announced_not_refused(six_steps, tmp_path, caplog):
    from detcon.workdir import resume

    workdir = _copy(six_steps, tmp_path)
    meta_path = os.path.join(workdir, "checkpoints", "6", "meta", "metadata")
    with open(meta_path) as f:
        meta = json.load(f)
    assert meta["layout"] == {"devices": 8, "processes": 1}
    meta["layout"]["devices"] = 4  # as if the run had started on 4 devices
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    config = _config(-1)
    config.training.pretrain_epochs = 1  # 1000 examples / batch 8: 125 steps, not 6
    caplog.set_level(logging.WARNING)
    restored = resume.restore_newest_good(
        workdir,
        lambda: checkpoint_lib.make_manager(workdir, 10),
        _load_state_template(),
        config,
        {"devices": 8, "processes": 1},
    )
    restored.manager.close()
    assert int(restored.state.step) == 6
    assert restored.changes == [
        "training.max_steps: 6 -> -1",
        f"training.pretrain_epochs: {_config(6).training.pretrain_epochs} -> 1",
        "devices: 4 -> 8",
    ]
    # The model is still refused, run length or not.
    config.model.depth = 18
    with pytest.raises(errors.ConfigChangeError, match="model.depth: 10 -> 18"):
        resume.restore_newest_good(
            workdir, lambda: checkpoint_lib.make_manager(workdir, 10), None, config
        )


def _load_state_template():
    import jax

    from detcon.train import experiment as experiment_lib

    return experiment_lib.build(_config(6), 6).init_state(jax.random.PRNGKey(0))


def test_config_names_are_checked_before_anything_runs(tmp_path):
    config = _config(1)
    config.method = "simclr"  # the demo config has no simclr group
    with pytest.raises(errors.ConfigError, match="no 'simclr' group; use --config=configs/simclr"):
        train_loop.run(config, str(tmp_path))
    config.method = "nope"
    with pytest.raises(errors.ConfigError, match="--config.method=nope: .*available: byol"):
        train_loop.run(config, str(tmp_path))
    config = _config(1)
    config.model.depth = 19
    with pytest.raises(errors.ConfigError, match="depth=19: choose from 10, 18, 34, 50"):
        train_loop.run(config, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_full_disk_names_device_path_and_free_space_and_hides_library_logs(
    six_steps, tmp_path, monkeypatch, caplog
):
    workdir = _copy(six_steps, tmp_path)
    manager = checkpoint_lib.make_manager(workdir, 10)

    def no_space(*args, **kwargs):
        # What tensorstore raises under orbax (not an OSError), after asyncio logged its task.
        logging.getLogger("asyncio").error("Task exception was never retrieved")
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device")

    monkeypatch.setattr(manager, "save", no_space)
    state = _load_state(workdir, 6)
    from detcon.train.state import TrainState

    caplog.set_level(logging.INFO)
    with pytest.raises(errors.CheckpointWriteError) as stopped:
        checkpoint_lib.save(manager, TrainState(**state)._replace(step=np.int32(8)), {})
    message = str(stopped.value)
    assert "\n" not in message
    target = os.path.join(workdir, "checkpoints", "8")
    assert f"writing {target}: free " in message
    assert " MB or point --workdir elsewhere; the run resumes from step 6" in message
    assert message.startswith("no space left on ")
    assert not any("Task exception" in r.getMessage() for r in caplog.records)


def test_half_written_latest_step_falls_back_for_export_and_evaluation(six_steps, tmp_path, caplog):
    from detcon.weights import torso as torso_lib

    workdir = _copy(six_steps, tmp_path)
    os.remove(os.path.join(workdir, "checkpoints", "6", "meta", "metadata"))  # died mid-save
    caplog.set_level(logging.WARNING)
    loaded = torso_lib.load(workdir)
    expected = checkpoint_lib.load_network(os.path.join(six_steps, "checkpoints", "4"))[0]
    key = next(k for k in expected if k.endswith("initial_conv"))
    np.testing.assert_array_equal(loaded.torso.params[key]["w"], expected[key]["w"])
    warnings = [r.getMessage() for r in caplog.records if "incomplete" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoints/6 (FileNotFoundError" in warnings[0]
    assert warnings[0].endswith("checkpoints/4.")
    # No complete step at all: one line naming each.
    for step in ("2", "4"):
        os.remove(os.path.join(workdir, "checkpoints", step, "meta", "metadata"))
    with pytest.raises(ValueError, match="No checkpoint under .* reads: .*checkpoints/6 ") as error:
        torso_lib.load(workdir)
    assert "\n" not in str(error.value)


def test_batch_larger_than_the_dataset_is_one_warning(seven_classes, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(train_loop, "_train", lambda *args: {})  # the warning comes before it
    caplog.set_level(logging.WARNING)
    config = _real(seven_classes, 1)
    config.model.num_classes = -1
    config.data.num_train_examples = -1  # from the dataset: 14 images
    config.training.batch_size = 16
    train_loop.run(config, str(tmp_path))
    warnings = [
        r.getMessage() for r in caplog.records if "larger than the dataset" in r.getMessage()
    ]
    assert len(warnings) == 1 and "(16)" in warnings[0] and "(14 images)" in warnings[0]
    caplog.clear()
    config.training.batch_size = 8
    train_loop.run(config, str(tmp_path))
    assert not any("larger than the dataset" in r.getMessage() for r in caplog.records)


def test_damaged_shard_is_one_line_naming_it_and_the_fix(seven_classes, tmp_path):
    import shutil

    from detcon.data import pipeline

    directory = str(tmp_path / "fh")
    shutil.copytree(seven_classes, directory)
    shard = os.path.join(directory, "train-00001-of-00002")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)  # a copy cut short
    batches = pipeline.pretrain_batches(
        directory, image_size=64, local_devices=1, per_device_batch=4, shuffle_buffer=4
    )
    with pytest.raises(errors.DamagedDataError) as error:
        for _ in range(8):
            next(batches)
    message = str(error.value)
    assert "\n" not in message
    assert f"damaged TFRecord shard {shard}: " in message
    assert "scripts/generate_fh_masks.py" in message and "rewrites damaged ones" in message


def test_signal_on_the_last_step_is_handed_to_the_enclosing_handler(tmp_path, monkeypatch):
    """The study's handler must hear a SIGTERM that came while the trainer held the signal."""
    config = _config(3, every=100)
    real_batches = train_loop.mock_batches

    def terminated_on_the_last_step(config, start_step, local_devices, per_device):
        for step, batch in enumerate(
            real_batches(config, start_step, local_devices, per_device), start=start_step
        ):
            # Two batches are prefetched: batch 4 is drawn just before the last step (step 2).
            if step == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    heard = []
    monkeypatch.setattr(train_loop, "mock_batches", terminated_on_the_last_step)
    previous = signal.signal(signal.SIGTERM, lambda number, frame: heard.append(number))
    try:
        train_loop.run(config, str(tmp_path))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert heard == [signal.SIGTERM]
    assert _saved_steps(tmp_path) == [3]


def test_readme_commands_say_to_use_the_venv_first():
    text = (REPO / "README.md").read_text()
    activate = text.index("source .venv/bin/activate")
    first_command = text.index("\npython ")  # the first command line of a code block
    assert activate < first_command
    assert "--batch_size=32" in text.split("## Pretrain")[1].split("## Masks")[0]


@pytest.mark.slow  # two subprocess runs
def test_same_command_with_a_larger_max_steps_continues_on_a_quiet_console(tmp_path):
    workdir = tmp_path / "w"
    command = [
        sys.executable,
        "-m",
        "detcon.main_loop",
        "--config=configs/byol.py",
        "--mock_data",
        "--batch_size=8",
        "--config.model.depth=10",
        "--config.data.image_size=64",
        "--config.byol.projector_hidden_size=64",
        "--config.byol.predictor_hidden_size=64",
        f"--workdir={workdir}",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the package must quieten TensorFlow itself
    first = subprocess.run(
        command + ["--max_steps=2"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(
        command + ["--max_steps=4"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600
    )
    assert second.returncode == 0, second.stderr[-3000:]
    steps = _steps(workdir)
    assert steps[-1] == 4 and all(a < b for a, b in zip(steps, steps[1:]))
    assert "the schedules now end at step 4" in second.stderr
    for output in (first.stderr, second.stderr):
        lower = output.lower()
        assert "onednn" not in lower and "libtpu" not in lower and "orbax" not in lower, output
        assert f"Config: {workdir / 'config.json'}" in output
        last = output.strip().splitlines()[-1]
        assert "Done: loss" in last and "python scripts/export_checkpoint.py" in last, last
        assert len(output.strip().splitlines()) < 25, output
    assert json.loads((workdir / "config.json").read_text())["training"]["max_steps"] == 4


@pytest.mark.slow  # one ResNet-50 step
def test_is_test_removes_its_temporary_workdir(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "detcon.main_loop", "--is_test"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), TMPDIR=str(tmp_path)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Smoke test passed" in result.stderr
    assert not [n for n in os.listdir(tmp_path) if n.startswith("detcon_is_test_")]


def test_library_info_lines_are_filtered_and_their_warnings_kept():
    from detcon import cli

    def record(path: str, level: int) -> logging.LogRecord:
        return logging.LogRecord("absl", level, path, 1, "message", None, None)

    probe = "/venv/site-packages/jax/_src/xla_bridge.py"  # "Unable to initialize backend 'tpu'"
    save = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not cli._not_library_info(record(probe, logging.INFO))
    assert not cli._not_library_info(record(save, logging.INFO))
    assert cli._not_library_info(record(save, logging.WARNING))
    assert cli._not_library_info(record("/repo/detcon/train/loop.py", logging.INFO))
