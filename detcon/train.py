"""The training loop: init or restore state, feed batches, call the pmapped step, log, checkpoint."""
import math
import time
from typing import Any, Iterator, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from detcon import checkpoint as checkpoint_lib
from detcon import devices as devices_lib
from detcon import experiment as experiment_lib
from detcon import metrics as metrics_lib
from detcon import mock_data
from detcon import state as state_lib
from detcon import step as step_lib

class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN or infinite."""


def batch_layout(global_batch: int) -> tuple[int, int]:
    """(local devices, per-device batch); a clear error if the batch does not split evenly."""
    devices = jax.device_count()
    if global_batch % devices:
        raise ValueError(
            f"--batch_size={global_batch} is not divisible by the {devices} devices of this run; "
            f"use a multiple of {devices}.")
    return jax.local_device_count(), global_batch // devices


def total_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
    """max_steps if set, else pretrain_epochs * examples / global batch."""
    if config.training.max_steps > 0:
        return int(config.training.max_steps)
    return max(1, int(config.training.pretrain_epochs * num_examples // config.training.batch_size))


def _local_indices(local_devices: int, per_device: int) -> np.ndarray:
    """Global example positions [D, b] of this process's slice of the global batch."""
    local = local_devices * per_device
    start = jax.process_index() * local
    return np.arange(start, start + local, dtype=np.int32).reshape(local_devices, per_device)


def mock_batches(config: ml_collections.ConfigDict, start_step: int, local_devices: int,
                 per_device: int) -> Iterator[dict[str, np.ndarray]]:
    """Deterministic synthetic batches [D, b, ...]: step t's data depends only on t."""
    step = start_step
    while True:
        idx = _local_indices(local_devices, per_device)
        flat = mock_data.mock_batch(config.training.seed, step, idx.ravel(), config.data.image_size,
                                    config.model.num_classes)
        yield {k: v.reshape(idx.shape + v.shape[1:]) for k, v in flat.items()}
        step += 1


def dataset_directory(config: ml_collections.ConfigDict) -> str:
    """The TFRecord directory to read: the demo set (built on first use) or the configured one."""
    if config.data.demo and not config.data.dataset_directory:
        from detcon.data import demo  # TensorFlow lives in detcon.data
        return demo.ensure_demo_dataset()
    directory = config.data.dataset_directory
    if not directory:
        raise ValueError("No data: set --dataset_directory (TFRecords with FH masks, made by "
                         "scripts/generate_fh_masks.py), or use --mock_data.")
    from detcon.data import shards
    shards.list_shards(directory, "train")  # fails early, naming the path and the command
    return directory


def real_batches(config: ml_collections.ConfigDict, directory: str, start_step: int,
                 local_devices: int, per_device: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches from the tf.data pipeline with global example positions added."""
    from detcon.data import pipeline
    batches = pipeline.pretrain_batches(
        directory, image_size=config.data.image_size, local_devices=local_devices,
        per_device_batch=per_device, process_index=jax.process_index(),
        process_count=jax.process_count(), fh_mask_index=config.data.fh_mask_index,
        seed=config.data.seed, start_step=start_step, shuffle_buffer=config.data.shuffle_buffer,
        crop_min_area=config.data.crop_min_area)
    index = _local_indices(local_devices, per_device)
    for batch in batches:
        batch["index"] = index
        yield batch


def num_train_examples(config: ml_collections.ConfigDict, directory: Optional[str]) -> int:
    """Examples per epoch: the config's figure, or counted from the dataset when it is <= 0."""
    if config.data.num_train_examples > 0 or directory is None:
        return max(1, config.data.num_train_examples)
    from detcon.data import pipeline
    return pipeline.num_examples(directory, "train")


def _prefetch_to_devices(batches: Iterator[dict[str, np.ndarray]], devices: list, depth: int = 2
                         ) -> Iterator[dict[str, jax.Array]]:
    """Keeps `depth` batches in flight to the devices so host-to-device copies overlap compute."""
    queue = []
    for batch in batches:
        queue.append(devices_lib.shard(batch, devices))
        if len(queue) > depth:
            yield queue.pop(0)
    yield from queue


def _maybe_initialise_torso(config: ml_collections.ConfigDict, state: state_lib.TrainState
                            ) -> state_lib.TrainState:
    """Loads DeepMind-released torso weights into online and target networks when configured."""
    if not config.training.init_checkpoint:
        return state
    from detcon import pretrained
    loaded = pretrained.load_deepmind_checkpoint(config.training.init_checkpoint,
                                                 allow_pickle=config.training.allow_pickle)
    params, net_state, report = pretrained.match_torso_params(loaded, state.online_params,
                                                              state.online_state)
    if not report.ok:  # a half-loaded torso would train silently from a different start
        raise ValueError(f"--config.training.init_checkpoint={config.training.init_checkpoint!r} "
                         f"does not fill the torso:\n{report.summary()}")
    logging.info("Initialised torso from %s: %s", config.training.init_checkpoint, report)
    return state._replace(online_params=params, online_state=net_state, target_params=params,
                          target_state=net_state)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains until the configured step count; returns the last logged metrics."""
    local_devices, per_device = batch_layout(config.training.batch_size)
    is_chief = jax.process_index() == 0
    directory = None if config.training.mock_data else dataset_directory(config)
    steps = total_steps(config, num_train_examples(config, directory))

    experiment = experiment_lib.build(config, steps)
    state = experiment.init_state(jax.random.PRNGKey(config.training.seed))

    manager = checkpoint_lib.make_manager(workdir, config.training.keep_checkpoints)
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_chief)
    meta = {"config": config.to_dict()}
    if manager.latest_step() is not None:
        state, _ = checkpoint_lib.restore(manager, state)
        logging.info("Resumed from %s at step %d.", manager.directory, int(state.step))
        writer.truncate_after(int(state.step))
    else:
        state = _maybe_initialise_torso(config, state)
        logging.info("Starting a new run in %s: %d steps, %d params in the online network.",
                     workdir, steps, state_lib.count_params(state.online_params))
    start = int(state.step)
    if start >= steps:
        logging.info("Nothing to do: checkpoint step %d >= %d steps.", start, steps)
        return {}

    devices = jax.local_devices()
    p_step = step_lib.pmap_update_step(experiment.update_step)
    replicated = devices_lib.replicate(state, devices)
    batches = (mock_batches(config, start, local_devices, per_device) if directory is None
               else real_batches(config, directory, start, local_devices, per_device))
    batches = _prefetch_to_devices(batches, devices)

    logger = _StepLogger(config, steps, writer, is_chief, start,
                         experiment.method.console_metrics)
    try:
        pending = None  # (step, device metrics): read one step late so dispatch never waits
        for step in range(start, steps):
            replicated, metrics = p_step(replicated, next(batches))
            done = step + 1
            if pending is not None:
                logger.process(*pending, manager)
                pending = None
            if done % config.training.checkpoint_every_steps == 0 or done == steps:
                logger.process(done, metrics, manager)  # a non-finite loss is never saved
                checkpoint_lib.save(manager, devices_lib.unreplicate(replicated), meta)
            else:
                pending = (done, metrics)
    finally:
        writer.close()
        manager.close()
    return logger.last


class _StepLogger:
    """Checks each step's loss and logs to console and the writer every N steps or T seconds."""

    def __init__(self, config: ml_collections.ConfigDict, steps: int,
                 writer: metrics_lib.MetricsWriter, is_chief: bool, start: int,
                 console_metrics: tuple[str, ...] = ()):
        self._every = config.training.log_every_steps
        self._interval = config.training.log_tensors_interval
        self._batch = config.training.batch_size
        self._steps, self._writer, self._is_chief = steps, writer, is_chief
        self._time, self._step = time.time(), start
        self._console = console_metrics
        self.last: dict[str, float] = {}

    def process(self, step: int, device_metrics: dict, manager: Any) -> None:
        """Raises on a non-finite loss; logs step `step` when due."""
        host = {k: float(v) for k, v in devices_lib.unreplicate(device_metrics).items()}
        if not math.isfinite(host["loss"]):
            raise NonFiniteLossError(
                f"Non-finite loss ({host['loss']}) at step {step}; stopping. The last good "
                f"checkpoint is kept in {manager.directory} (step {manager.latest_step()}). "
                "Lower the learning rate or check the data.")
        now = time.time()
        if not (step % self._every == 0 or step == self._steps
                or now - self._time >= self._interval):
            return
        elapsed = max(now - self._time, 1e-9)
        host["images_per_sec"] = (step - self._step) * self._batch / elapsed
        eta = (self._steps - step) * elapsed / max(step - self._step, 1)
        if self._is_chief:
            own = "".join(f" {name} {host[name]:.4f}" for name in self._console)
            tau = f" tau {host['tau']:.5f}" if "tau" in host else ""
            logging.info("step %d/%d loss %.4f%s top1 %.3f lr %.4g%s | %.1f img/s ETA %s", step,
                         self._steps, host["loss"], own, host["top1"], host["learning_rate"], tau,
                         host["images_per_sec"], _format_eta(eta))
        self._writer.write(step, host)
        self._time, self._step = now, step
        self.last = host


def _format_eta(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
