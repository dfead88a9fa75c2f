"""`sntrack`: one console command; each sub-command is a thin wrapper in sntrack/commands/."""

from __future__ import annotations

import argparse
import asyncio
import sys

from sntrack.commands import COMMAND_MODULES
from sntrack.logging import configure_logging
from sntrack.settings import ConfigurationError, Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sntrack",
        description="Spectral-norm experiment tracking on RabbitMQ + PostgreSQL + MLflow. "
        "Configuration comes from SNTRACK_* environment variables (see README).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_json)
        result = args.run(args, settings)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except ConfigurationError as exc:
        print(f"sntrack: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
