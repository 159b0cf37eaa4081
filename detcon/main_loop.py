"""Pretraining entry point: flags -> config -> train_loop.run(config, workdir).

  python -m detcon.main_loop --config=configs/demo.py --workdir=/tmp/detcon_demo
  python -m detcon.main_loop --config=configs/byol.py --mock_data --max_steps=2 --workdir=/tmp/w
  python -m detcon.main_loop --dataset_directory=/data/imagenet-fh --pretrain_epochs=1000 \\
      --batch_size=4096 --workdir=/ckpt/detcon_b
"""

import os
import shutil
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from detcon import cli, errors

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "detcon_b.py"
)
try:  # without --config, ml_collections applies --config.<field> overrides here, at definition
    _CONFIG = config_flags.DEFINE_config_file(
        "config", _DEFAULT_CONFIG, "Config file (ml_collections)."
    )
except (KeyError, AttributeError) as error:
    cli.fail_unknown_field(error)
# The official release's flags; when given they override the config.
flags.DEFINE_string(
    "dataset_directory", None, "TFRecords with FH masks (scripts/generate_fh_masks.py)."
)
flags.DEFINE_integer("pretrain_epochs", None, "Pretraining epochs.")
flags.DEFINE_integer("batch_size", None, "Global batch size over all devices and hosts.")
flags.DEFINE_bool("is_test", False, "Selects configs/is_test.py: one ResNet-50 step on mock data.")
flags.DEFINE_float("log_tensors_interval", None, "Log at least every this many seconds.")
# Ours.
flags.DEFINE_string(
    "workdir", None, "Checkpoints, metrics.jsonl and TensorBoard logs; resumes if present."
)
flags.DEFINE_integer("max_steps", None, "Overrides the step count derived from epochs.")
flags.DEFINE_integer(
    "restore_step",
    None,
    "Resume from this checkpoint step (after divergence); "
    "later checkpoints are moved to <workdir>/checkpoints_after_<N>.",
)
flags.DEFINE_bool("mock_data", None, "Synthetic batches; no dataset needed.")
flags.DEFINE_integer("log_every_steps", None, "Log every this many steps.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
FLAGS = flags.FLAGS

_OVERRIDES = {  # flag -> (config group, field)
    "dataset_directory": ("data", "dataset_directory"),
    "pretrain_epochs": ("training", "pretrain_epochs"),
    "batch_size": ("training", "batch_size"),
    "log_tensors_interval": ("training", "log_tensors_interval"),
    "max_steps": ("training", "max_steps"),
    "restore_step": ("training", "restore_step"),
    "mock_data": ("training", "mock_data"),
    "log_every_steps": ("training", "log_every_steps"),
}


def _initialise_distributed() -> None:
    """Joins a multi-host run: explicit flags, or auto-detection on SLURM / Cloud TPU pods."""
    import jax

    explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise app.UsageError(
                "--coordinator_address, --num_processes and --process_id go "
                "together; give all three or none."
            )
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ:
        jax.distributed.initialize()  # JAX reads the cluster from the environment


def _next_step(config, workdir: str, result: dict[str, float]) -> str:
    """One line: how the run ended and the command to run next (evaluate, export)."""
    last = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k in ("loss", "top1"))
    done = f"Done: {last} " if last else "Done "
    if config.training.mock_data:
        follow = (
            f"export the torso with: python scripts/export_checkpoint.py --checkpoint={workdir} "
            f"--format=npz --output={os.path.join(workdir, 'torso')}"
        )
    else:
        follow = (
            f"evaluate with: python -m detcon.evaluate --checkpoint={workdir} --protocol=knn "
            f"--dataset_directory=DIR --output={os.path.join(workdir, 'eval.json')}"
        )
    return f"{done}(workdir {workdir}); {follow}"


@cli.one_line_usage_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    config = cli.config_value(_CONFIG)
    if FLAGS.is_test:
        from configs import is_test

        config = is_test.get_config()
    for flag, (group, field) in _OVERRIDES.items():
        if FLAGS[flag].value is not None:
            config[group][field] = FLAGS[flag].value
    workdir = FLAGS.workdir
    _initialise_distributed()
    import jax  # after distributed init

    temporary = None
    if FLAGS.is_test:
        devices = jax.device_count()  # 4, or one example per device where there are more
        config.training.batch_size = -(-config.training.batch_size // devices) * devices
        if not workdir:  # a smoke test leaves nothing behind (a ResNet-50 checkpoint is ~400 MB)
            workdir = temporary = tempfile.mkdtemp(prefix="detcon_is_test_")
    if not workdir:
        raise app.UsageError("--workdir is required (checkpoints, metrics and logs go there).")
    from detcon.train import compilation_cache
    from detcon.train import loop as train_loop

    try:
        train_loop.check_names(config)  # a user mistake: a usage error before any work
    except errors.ConfigError as error:
        cli.fail(str(error), 2)
    compilation_cache.enable(config.training.compilation_cache)
    try:
        result = train_loop.run(config, workdir)
    except errors.ConfigError as error:
        cli.fail(str(error), 2)
    except (errors.RunStopped, FileNotFoundError) as error:
        logging.error("%s", error)  # the message says what happened and what to do; no traceback
        sys.exit(getattr(error, "exit_code", 1))
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    if temporary is not None:
        logging.info("Smoke test passed: %s (temporary workdir removed).", _round(result))
    else:
        logging.info("%s", _next_step(config, workdir, result))


def _round(result: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in result.items()}


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
