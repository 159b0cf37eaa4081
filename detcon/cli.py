"""Command-line error reporting: a usage error is one line on stderr, not a page of help first."""

import copy
import functools
import logging
import os
import sys
from typing import Callable, NoReturn, Sequence

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

# JAX's backend probing (libtpu, CUDA) and orbax's per-file lines are INFO chatter in a run's log.
_QUIET_LOGGERS = ("jax._src.xla_bridge", "orbax", "absl.orbax")


def _not_library_info(record: logging.LogRecord) -> bool:
    """False for INFO (and lower) records of orbax or JAX's backend probing; warnings pass."""
    if record.levelno > logging.INFO:
        return True
    return "/orbax/" not in record.pathname and "xla_bridge" not in record.pathname


def quiet_library_logs() -> None:
    """Silences library INFO lines (numerics untouched; TensorFlow's: see detcon.data)."""
    absl_logging.get_absl_handler().addFilter(_not_library_info)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def fail(message: str, exit_code: int = 2) -> NoReturn:
    """Prints `<program>: error: <message>` to stderr and exits with `exit_code`."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(exit_code)


def one_line_usage_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wraps an absl main so app.UsageError prints its message alone (absl prints the docstring)."""

    @functools.wraps(main)
    def wrapped(argv: list[str]) -> None:
        try:
            main(argv)
        except app.UsageError as error:
            fail(str(error), 2)

    return wrapped


def _config_file(argv: list[str]) -> str | None:
    """The PATH of the last --config=PATH (or --config PATH) in argv, without a ':args' suffix."""
    path = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":", 1)[0]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1].split(":", 1)[0]
    return path


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where a bad flag, config file or config field is one line on stderr."""
    path = _config_file(argv)
    if path is not None and not os.path.isfile(path):
        fail(f"--config={path}: no such file; pass a config file such as configs/demo.py")
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        fail(str(error))
    except (KeyError, AttributeError) as error:
        fail_unknown_field(error)


def fail_unknown_field(error: BaseException) -> NoReturn:
    """One line for ml_collections' KeyError/AttributeError (with a did-you-mean hint) on an
    unknown --config.<field>."""
    cause = error.__context__ if isinstance(error, AttributeError) and error.__context__ else error
    field = str(cause.args[0] if cause.args else cause).strip("\"'")
    fail(f"a --config.<group>.<field> override names no field of the config: {field}")


def config_value(holder: flags.FlagHolder) -> ml_collections.ConfigDict:
    """The value of a config-file flag; overrides of the default file (no --config given) apply
    only here, so their unknown-field errors are made one line here too."""
    try:
        return holder.value
    except (KeyError, AttributeError) as error:
        fail_unknown_field(error)


def override_config(
    config: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """A copy of `config` with 'group.field=value' overrides applied by ml_collections' own
    --config.group.field=value parser (typed like the field); an unknown field raises ValueError."""
    if not overrides:
        return config
    argv = ["override"] + [f"--config.{o}" for o in overrides]
    flag_values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict(
            "config", copy.deepcopy(config), flag_values=flag_values, sys_argv=argv
        )
        flag_values(argv)
    except (KeyError, AttributeError) as error:  # ml_collections' unknown-field errors
        raise ValueError(
            f"{' '.join(overrides)}: names no field of the config "
            f"({str(error).strip(chr(34) + chr(39))})"
        ) from None
    except flags.Error as error:
        raise ValueError(f"{' '.join(overrides)}: {error}") from None
    return flag_values.config
