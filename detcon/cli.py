"""Command-line error reporting: a usage error is one line on stderr, not a page of help first."""
import functools
import os
import sys
from typing import Callable, NoReturn

from absl import app
from absl import flags


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
        # ml_collections raises these (with a did-you-mean hint) for an unknown --config.<field>.
        cause = error.__context__ if isinstance(error, AttributeError) and error.__context__ else error
        field = str(cause.args[0] if cause.args else cause).strip("\"'")
        fail(f"a --config.<group>.<field> override names no field of the config: {field}")
