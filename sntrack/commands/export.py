"""sntrack export --run STUDY [--curves] --format csv|jsonl|parquet — the study's trials as a flat file."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from datetime import datetime
from pathlib import Path

from common.errors import ConfigurationError
from consumers.export import curve_rows, trial_rows
from consumers.studies import UnknownStudy, resolve
from sntrack.argtypes import output_file
from sntrack.pools import read_pool
from sntrack.settings import Settings

FORMATS = ("csv", "jsonl", "parquet")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export", help="a study's trials (or learning curves) as CSV, JSON lines or Parquet",
        description="One row per trial: identity, flag, status, pair, hyper-parameters as hp.NAME and final "
        "measurements as final.NAME. With --curves: one row per trial and epoch, with the epoch's measurements.",
        epilog="examples:\n  sntrack export --run demo > demo.csv\n"
        "  sntrack export --run demo --curves --format parquet --output curves.parquet")
    parser.add_argument("--run", dest="model_run_id", metavar="STUDY", required=True, help="the study to export")
    parser.add_argument("--curves", action="store_true", help="one row per trial and epoch")
    parser.add_argument("--format", choices=FORMATS, default="csv", help="default csv")
    parser.add_argument("--output", "-o", type=output_file, metavar="FILE",
                        help="write FILE instead of standard output (required for parquet)")
    parser.set_defaults(run=_export)


async def _export(args: argparse.Namespace, settings: Settings) -> int:
    if args.format == "parquet":
        if args.output is None:
            raise ConfigurationError("--format parquet writes a binary file: give --output FILE")
        try:
            import pyarrow  # noqa: F401  (installed with mlflow; optional)
        except ImportError:
            raise ConfigurationError("--format parquet needs pyarrow (pip install pyarrow)") from None
    pool = await read_pool(settings)
    try:
        async with pool.acquire() as conn:
            study = await resolve(conn, args.model_run_id)
            rows = await (curve_rows if args.curves else trial_rows)(conn, study)
    except UnknownStudy as exc:
        raise ConfigurationError(str(exc)) from None
    finally:
        await pool.close()
    try:
        WRITERS[args.format](rows, args.output)
    except OSError as exc:  # a full disk or a device that refuses writes (the path itself was checked already)
        raise ConfigurationError(f"cannot write {args.output or 'standard output'}: {exc.strerror or exc}") from None
    if args.output:
        print(f"wrote {len(rows)} rows to {args.output}", file=sys.stderr)
    return 0


def _columns(rows: list[dict]) -> list[str]:
    """Every key, in first-seen order (trials may differ in their hyper-parameters or measurements)."""
    return list(dict.fromkeys(k for row in rows for k in row))


def _text(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


def _write_csv(rows: list[dict], path: Path | None) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _text(v) for k, v in row.items()} for row in rows)
    _emit(buffer.getvalue(), path)


def _write_jsonl(rows: list[dict], path: Path | None) -> None:
    _emit("".join(json.dumps({k: _text(v) for k, v in row.items()}) + "\n" for row in rows), path)


def _write_parquet(rows: list[dict], path: Path | None) -> None:
    import pyarrow
    import pyarrow.parquet

    columns = _columns(rows)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]), path)


def _emit(text: str, path: Path | None) -> None:
    if path is None:
        sys.stdout.write(text)
    else:
        path.write_text(text)


WRITERS = {"csv": _write_csv, "jsonl": _write_jsonl, "parquet": _write_parquet}
