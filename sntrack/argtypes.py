"""argparse types that refuse a bad value at parse time, before any work starts (tests/test_config_errors.py)."""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path


def seconds(text: str) -> float:
    """A duration: a finite number ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds ≥ 0: {text!r}")
    return value


def output_file(text: str) -> Path:
    """A file the command will write: its folder must exist and be writable now, not after minutes of work."""
    path = Path(text).expanduser()
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder {str(folder)!r} does not exist: {text!r}")
    if not os.access(folder, os.W_OK) or path.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}")
    return path


def user_prefix(text: str) -> str:
    """The start of broker user names (PREFIX-worker, …): letters, digits, '.', '_' and '-', starting with a letter
    or digit."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"must be 1-64 of letters, digits, '.', '_' and '-': {text!r}")
    return text
