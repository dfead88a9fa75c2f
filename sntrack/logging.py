"""structlog set-up: JSON lines when stderr is not a terminal, readable console output when it is."""

from __future__ import annotations

import logging
import sys

import structlog

from sntrack.progress import write_line


def configure_logging(json_lines: bool | None = None, level: int = logging.INFO) -> None:
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_: _BarAwareLogger(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # aiormq logs every failed connect; sntrack reports unreachable brokers itself, once, with what to do.
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)


class _BarAwareLogger(structlog.PrintLogger):
    """Prints each rendered line above a progress bar when one is drawn (sntrack.progress)."""

    def msg(self, message: str) -> None:
        write_line(message, self._file)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg
