"""`sntrack`: one console command; each sub-command is a thin wrapper in sntrack/commands/."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import sys
import typing

from common.errors import ConfigurationError
from sntrack import __version__
from sntrack.commands import COMMANDS, command_module
from sntrack.errors import configuration_message
from sntrack.examples import add_examples
from sntrack.logging import configure_logging
from sntrack.settings import Settings


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake is one line on stderr and exit 2, like every other configuration mistake; sub-command
    parsers inherit the class (tests/test_config_errors.py)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of the command `only` alone (one of COMMANDS): the same parser for the
    arguments of that command, without importing the others' modules."""
    parser = OneLineParser(
        prog="sntrack",
        epilog="example:\n  sntrack worker --study demo --n-trials 4 --epochs 5\n  sntrack report --run demo",
        description="Spectral-norm experiment tracking on RabbitMQ + PostgreSQL + MLflow. "
        "Configuration comes from SNTRACK_* environment variables (see README).",
    )
    parser.add_argument("--version", action="version", version=f"sntrack {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        command_module(name).register(sub)
    add_examples(parser)
    return parser


# Writing the output failed: a full disk or device, a closed pipe. Said in one line, like a configuration mistake.
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EFBIG, errno.EDQUOT)


def _command(argv: list[str]) -> str | None:
    """The command the arguments name when they start with one (the top-level parser has options only before it);
    None for anything else (--help, --version, a mistake), which needs the parser of every command."""
    return argv[0] if argv and argv[0] in COMMANDS else None


def main(argv: list[str] | None = None, *, process: bool = False) -> int:
    """Run the command `argv` names and return its exit status. `process`: this is the whole process (`run`), so a
    command that asks for it (`exit_early`) ends it once its output is flushed."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command(argv)).parse_args(argv)
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_json)
        result = args.run(args, settings)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        if sys.stdout is not None:  # None: started with it closed (`>&-`)
            sys.stdout.flush()  # here, not at exit, so that a failed write is reported below
        if process and getattr(args, "exit_early", False):
            _exit_now(int(result or 0))
        return int(result or 0)
    except OSError as exc:
        if exc.errno not in OUTPUT_ERRNOS:
            raise
        sys.stdout = None  # nothing more may be flushed to it at exit
        print(f"sntrack: cannot write the output: {exc.strerror}", file=sys.stderr)
        return 2
    except ConfigurationError as exc:
        print(f"sntrack: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if (message := configuration_message(exc)) is None:
            raise
        print(f"sntrack: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _exit_now(status: int) -> typing.NoReturn:
    """End the process without tearing the interpreter down: freeing the objects of a report over 100,000 trials and
    finalizing numpy's and scipy's modules took about 0.07 s after the report was printed. Only for commands that
    leave no thread, child or exit handler with work to do; the log and stderr are flushed first."""
    logging.shutdown()
    if sys.stderr is not None:
        sys.stderr.flush()
    os._exit(status)


def run() -> typing.NoReturn:
    """The console command (`sntrack`, `python -m sntrack`)."""
    sys.exit(main(process=True))


if __name__ == "__main__":
    run()
