"""The training loop: init or restore state, feed batches, call the pmapped step, log, checkpoint."""

import copy
import json
import math
import os
import time
from typing import Any, Iterator, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from detcon import devices as devices_lib
from detcon import errors
from detcon import methods as methods_lib
from detcon.models import networks
from detcon.train import dataset_fit, mock_data
from detcon.train import experiment as experiment_lib
from detcon.train import state as state_lib
from detcon.train import step as step_lib
from detcon.workdir import checkpoint as checkpoint_lib
from detcon.workdir import lock as workdir_lock
from detcon.workdir import metrics as metrics_lib
from detcon.workdir import preemption, resume

NonFiniteLossError = errors.NonFiniteLossError  # raised on a NaN or infinite loss
CONFIG_NAME = "config.json"  # the full config of a run's latest start, in its workdir


def batch_layout(global_batch: int) -> tuple[int, int]:
    """(local devices, per-device batch); a clear error if the batch does not split evenly."""
    devices = jax.device_count()
    if global_batch < 1:
        raise errors.ConfigError(
            f"--batch_size={global_batch} must be a positive multiple of the "
            f"{devices} devices of this run."
        )
    if global_batch % devices:
        raise errors.ConfigError(
            f"--batch_size={global_batch} is not divisible by the {devices} devices of this run; "
            f"use a multiple of {devices}."
        )
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


def mock_batches(
    config: ml_collections.ConfigDict, start_step: int, local_devices: int, per_device: int
) -> Iterator[dict[str, np.ndarray]]:
    """Deterministic synthetic batches [D, b, ...]: step t's data depends only on t."""
    step = start_step
    first = int(_local_indices(local_devices, per_device)[0, 0])
    num_boxes = methods_lib.get(config.method).data_needs(config).num_regions
    while True:
        yield mock_data.device_batch(
            config.training.seed,
            step,
            local_devices,
            per_device,
            config.data.image_size,
            config.model.num_classes,
            first,
            num_boxes,
        )
        step += 1


def dataset_directory(config: ml_collections.ConfigDict) -> str:
    """The TFRecord directory to read: the demo set (built on first use) or the configured one."""
    if config.data.demo and not config.data.dataset_directory:
        from detcon.data.build import demo  # TensorFlow lives in detcon.data

        return demo.ensure_demo_dataset()
    directory = config.data.dataset_directory
    if not directory:
        raise ValueError(
            "No data: set --dataset_directory (TFRecords with FH masks, made by "
            "scripts/generate_fh_masks.py), or use --mock_data."
        )
    from detcon.data import shards

    shards.list_shards(directory, "train")  # fails early, naming the path and the command
    return directory


def real_batches(
    config: ml_collections.ConfigDict,
    directory: str,
    start_step: int,
    local_devices: int,
    per_device: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches from the tf.data pipeline with global example positions added."""
    from detcon.data import pipeline

    needs = methods_lib.get(config.method).data_needs(config)
    batches = pipeline.pretrain_batches(
        directory,
        image_size=config.data.image_size,
        local_devices=local_devices,
        per_device_batch=per_device,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        fh_mask_index=config.data.fh_mask_index,
        max_mask_id=needs.max_mask_id,
        seed=config.data.seed,
        start_step=start_step,
        shuffle_buffer=config.data.shuffle_buffer,
        deterministic=config.data.deterministic,
        with_masks=needs.masks,
        crop_min_area=config.data.crop_min_area,
        num_regions=needs.num_regions,
        crop_sampler=config.data.crop_sampler,
        jigsaw_size=needs.jigsaw_size,
    )
    index = _local_indices(local_devices, per_device)
    for batch in batches:
        dataset_fit.check_labels(batch["label"], config.model.num_classes)  # else NaN at step 1
        batch["index"] = index
        yield batch


def fit_to_dataset(
    config: ml_collections.ConfigDict, directory: Optional[str]
) -> ml_collections.ConfigDict:
    """A copy of the config with the probe's class count and the epoch size taken from the data."""
    config = copy.deepcopy(config)
    if directory is None:  # mock data
        config.model.num_classes = (
            config.model.num_classes
            if config.model.num_classes > 0
            else dataset_fit.MOCK_NUM_CLASSES
        )
        config.data.num_train_examples = max(1, config.data.num_train_examples)
        return config
    from detcon.data import dataset_info  # TensorFlow lives in detcon.data

    info = dataset_info.read(directory, "train")
    config.model.num_classes = dataset_fit.num_classes(
        config.model.num_classes, info.num_classes, info.classes_source
    )
    config.data.num_train_examples = dataset_fit.num_examples(
        config.data.num_train_examples, info.num_examples, info.examples_source
    )
    return config


def warn_if_batch_exceeds_dataset(batch_size: int, num_examples: int) -> bool:
    """One warning (returns True) when the global batch holds more examples than the dataset."""
    if batch_size <= num_examples:
        return False
    logging.warning(
        "The global batch (%d) is larger than the dataset (%d images): every batch repeats each "
        "image about %.0f times, and memory grows with the batch. For small data use "
        "--batch_size=%d or less (e.g. --batch_size=32 --config.model.depth=18 "
        "--config.data.image_size=96, as configs/demo.py does).",
        batch_size,
        num_examples,
        batch_size / max(num_examples, 1),
        num_examples,
    )
    return True


def _prefetch_to_devices(
    batches: Iterator[dict[str, np.ndarray]], devices: list, depth: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Keeps `depth` batches in flight to the devices so host-to-device copies overlap compute."""
    queue = []
    for batch in batches:
        queue.append(devices_lib.shard(batch, devices))
        if len(queue) > depth:
            yield queue.pop(0)
    yield from queue


def _torso_checkpoint(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """(path, flag) of the torso to start from: training.init_checkpoint, or the method's own
    backbone_checkpoint (DETReg's frozen torso); ('', '') for none."""
    if config.training.init_checkpoint:
        return config.training.init_checkpoint, "--config.training.init_checkpoint"
    own = config[config.method].get("backbone_checkpoint", "")
    return own, f"--config.{config.method}.backbone_checkpoint"


def _maybe_initialise_torso(
    config: ml_collections.ConfigDict, state: state_lib.TrainState
) -> state_lib.TrainState:
    """Loads a torso (a run, an .npz export or a DeepMind release) into online and target
    networks when configured."""
    path, flag = _torso_checkpoint(config)
    if not path:
        return state
    from detcon.weights import torso as torso_lib

    try:
        torso = torso_lib.load(path, allow_pickle=config.training.allow_pickle).torso
    except ValueError as error:  # an incomplete torso file
        raise ValueError(f"{flag}={path!r} does not fill the torso: {error}") from None
    params, net_state, report = torso_lib.into_network(
        torso, state.online_params, state.online_state
    )
    if not report.ok:  # a half-loaded torso would train silently from a different start
        raise ValueError(f"{flag}={path!r} does not fill the torso:\n{report.summary()}")
    logging.info("Initialised torso from %s: %s", path, report)
    state = state._replace(online_params=params, online_state=net_state)
    if methods_lib.get(config.method).has_target:  # no target tree for methods without one
        state = state._replace(target_params=params, target_state=net_state)
    return state


def check_names(config: ml_collections.ConfigDict) -> None:
    """ConfigError (one line) for a method that is not registered or has no config group in this
    file, or a ResNet depth that does not exist."""
    try:
        methods_lib.get(config.method)
    except ValueError as error:
        raise errors.ConfigError(f"--config.method={config.method}: {error}") from None
    if config.method not in config:
        raise errors.ConfigError(
            f"--config.method={config.method}: this config file has no '{config.method}' group; "
            f"use --config=configs/{config.method}.py (each method's file holds its recipe)."
        )
    if config.model.depth not in networks.RESNET_DEPTHS:
        raise errors.ConfigError(
            f"--config.model.depth={config.model.depth}: choose from "
            f"{', '.join(map(str, sorted(networks.RESNET_DEPTHS)))}."
        )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains until the configured step count; returns the last logged metrics."""
    check_names(config)
    batch_layout(config.training.batch_size)  # a bad batch fails before any data is read
    directory = None if config.training.mock_data else dataset_directory(config)
    config = fit_to_dataset(config, directory)
    if directory is not None:
        warn_if_batch_exceeds_dataset(config.training.batch_size, config.data.num_train_examples)
    with (
        workdir_lock.hold(workdir, enabled=jax.process_index() == 0),
        preemption.stop_on_signals() as stop,
    ):
        return _train(config, workdir, directory, stop)


def _train(
    config: ml_collections.ConfigDict,
    workdir: str,
    directory: Optional[str],
    stop: preemption.StopRequest,
) -> dict[str, float]:
    """The loop of `run`, on a config already fitted to the dataset and a locked workdir."""
    local_devices, per_device = batch_layout(config.training.batch_size)
    is_chief = jax.process_index() == 0
    steps = total_steps(config, config.data.num_train_examples)

    experiment = experiment_lib.build(config, steps)
    state = experiment.init_state(jax.random.PRNGKey(config.training.seed))

    if config.training.restore_step >= 0 and is_chief:
        resume.rewind(workdir, config.training.restore_step)
    layout = {"devices": jax.device_count(), "processes": jax.process_count()}
    manager, restored, changes = resume.restore_newest_good(
        workdir,
        lambda: checkpoint_lib.make_manager(workdir, config.training.keep_checkpoints),
        state,
        config,
        layout,
    )
    writer = metrics_lib.MetricsWriter(
        workdir, enabled=is_chief, resume_step=None if restored is None else int(restored.step)
    )
    meta = {"config": config.to_dict(), "layout": layout}
    if is_chief:
        _write_config(config, workdir)
    if restored is not None:
        state = restored
        if changes:  # a longer or shorter run, or another device count: continue, and say so
            logging.warning(
                "Resuming step %d with %s; the schedules now end at step %d.",
                int(state.step),
                "; ".join(changes),
                steps,
            )
        logging.info("Resumed from %s at step %d.", manager.directory, int(state.step))
        writer.truncate_after(int(state.step))
    else:
        state = _maybe_initialise_torso(config, state)
        logging.info(
            "Starting a new run in %s: %d steps, %d params in the online network.",
            workdir,
            steps,
            state_lib.count_params(state.online_params),
        )
    start = int(state.step)
    if start >= steps:
        logging.info("Nothing to do: checkpoint step %d >= %d steps.", start, steps)
        writer.close()
        manager.close()
        return {}

    devices = jax.local_devices()
    p_step = step_lib.pmap_update_step(experiment.update_step)
    replicated = devices_lib.replicate(state, devices)
    batches = (
        mock_batches(config, start, local_devices, per_device)
        if directory is None
        else real_batches(config, directory, start, local_devices, per_device)
    )
    batches = _prefetch_to_devices(batches, devices)

    monitor = _knn_monitor(config, directory)
    logger = _StepLogger(config, steps, writer, is_chief, start, experiment.method.console_metrics)
    try:
        pending = None  # (step, device metrics): read one step late so dispatch never waits
        for step in range(start, steps):
            replicated, metrics = p_step(replicated, next(batches))
            done = step + 1
            if pending is not None:
                logger.process(*pending, manager)
                pending = None
            signal_number = preemption.agreed_signal(stop, jax.process_count())
            if done % config.training.checkpoint_every_steps == 0 or done == steps or signal_number:
                logger.process(done, metrics, manager)  # a non-finite loss is never saved
                checkpoint_lib.save(manager, devices_lib.unreplicate(replicated), meta)
                if signal_number and done < steps:
                    raise errors.Preempted(
                        f"Stopped by {preemption.signal_name(signal_number)} after step {done}; "
                        f"saved checkpoint {done} in {manager.directory}. Run the same command "
                        "to resume.",
                        signal_number,
                    )
            else:
                pending = (done, metrics)
            if monitor is not None and done % config.evaluation.every_steps == 0:
                online = devices_lib.unreplicate(
                    (replicated.online_params, replicated.online_state)
                )
                _log_monitor(done, monitor(*online), writer, is_chief)
    finally:
        writer.close()
        manager.close()
    return logger.last


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The full config as <workdir>/config.json (the console gets one line saying where)."""
    from detcon.weights import atomic

    path = os.path.join(os.path.abspath(workdir), CONFIG_NAME)
    atomic.write_text(path, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    logging.info("Config: %s", path)


def _knn_monitor(config: ml_collections.ConfigDict, directory: Optional[str]) -> Optional[Any]:
    """The kNN monitor when config.evaluation.every_steps > 0 (checked before the first step)."""
    if config.evaluation.every_steps <= 0:
        return None
    if jax.process_count() > 1:
        raise ValueError(
            "config.evaluation.every_steps > 0 runs on single-process runs only; on "
            "multi-host runs evaluate checkpoints with `python -m detcon.evaluate`."
        )
    from detcon.evaluation import monitor  # reads TFRecords: TensorFlow stays out of the step

    return monitor.make_knn_monitor(config, directory)


def _log_monitor(
    step: int, metrics: dict[str, float], writer: metrics_lib.MetricsWriter, is_chief: bool
) -> None:
    """Logs the monitor's metrics to the console, metrics.jsonl and TensorBoard."""
    if is_chief:
        logging.info("step %d knn_top1 %.4f", step, metrics["knn_top1"])
    writer.write(step, metrics)


class _StepLogger:
    """Checks each step's loss and logs to console and the writer every N steps or T seconds."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        steps: int,
        writer: metrics_lib.MetricsWriter,
        is_chief: bool,
        start: int,
        console_metrics: tuple[str, ...] = (),
    ):
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
                f"Non-finite loss ({host['loss']}) at step {step}; stopping. "
                f"{checkpoint_lib.kept_steps_advice(manager)}"
            )
        now = time.time()
        if not (
            step % self._every == 0 or step == self._steps or now - self._time >= self._interval
        ):
            return
        elapsed = max(now - self._time, 1e-9)
        host["images_per_sec"] = (step - self._step) * self._batch / elapsed
        eta = (self._steps - step) * elapsed / max(step - self._step, 1)
        if self._is_chief:
            own = "".join(f" {name} {host[name]:.4f}" for name in self._console)
            tau = f" tau {host['tau']:.5f}" if "tau" in host else ""
            logging.info(
                "step %d/%d loss %.4f%s top1 %.3f lr %.4g%s | %.1f img/s ETA %s",
                step,
                self._steps,
                host["loss"],
                own,
                host["top1"],
                host["learning_rate"],
                tau,
                host["images_per_sec"],
                _format_eta(eta),
            )
        self._writer.write(step, host)
        self._time, self._step = now, step
        self.last = host


def _format_eta(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
