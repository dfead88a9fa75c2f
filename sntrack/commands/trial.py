"""sntrack trial show ID — one trial's events, learning curve and singular values."""

from __future__ import annotations

import argparse
import difflib
import json

import asyncpg

from common.errors import ConfigurationError
from sntrack.pools import read_pool
from sntrack.settings import Settings
from sntrack.sparkline import sparkline

CURVES = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("trial", help="inspect one trial", description="Inspect one trial of the read model.",
                            epilog="example:\n  sntrack trial show demo-3f2a9c81d0e4")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="its events, learning curve (sparklines) and singular values",
                              epilog="example:\n  sntrack trial show demo-3f2a9c81d0e4")
    show.add_argument("trial_id", metavar="ID", help="the trial id (`sntrack export --run STUDY` lists them)")
    show.set_defaults(run=_show)


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    pool = await read_pool(settings)
    try:
        async with pool.acquire() as conn:
            trial = await conn.fetchrow("SELECT * FROM trials WHERE id = $1", args.trial_id)
            if trial is None:
                raise ConfigurationError(await _unknown(conn, args.trial_id))
            events = await conn.fetch("SELECT seq, event_type, occurred_at FROM events WHERE trial_id = $1 "
                                      "ORDER BY seq", args.trial_id)
            curve = await conn.fetch("SELECT epoch, train_loss, val_loss, train_accuracy, val_accuracy, "
                                     "spectral_norms::text AS spectral_norms FROM trial_metrics WHERE trial_id = $1 "
                                     "ORDER BY epoch", args.trial_id)
    finally:
        await pool.close()
    print(f"trial {trial['id']}  study {trial['model_run_id']}  spectral_norm={str(trial['spectral_norm']).lower()}"
          f"  {trial['status']}" + (f"  paired with {trial['paired_with']}" if trial["paired_with"] else ""))
    if trial["error_type"]:
        print(f"  error      {trial['error_type']}: {trial['error_message']}")
    print("  hyper-parameters  " + "  ".join(f"{k}={v}" for k, v in json.loads(trial["hyperparams"]).items()))
    print("  final             " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in json.loads(trial["metrics"]).items()))
    print(f"  events ({len(events)} in the journal):")
    for e in events:
        print(f"    {e['seq']:>4}  {e['event_type']:<14} {e['occurred_at']:%Y-%m-%d %H:%M:%S.%f}")
    if curve:
        print(f"  curve over {len(curve)} epochs:")
        for name in CURVES:
            values = [r[name] for r in curve]
            if any(v is not None for v in values):
                shown = [v for v in values if v is not None]
                print(f"    {name:<15} {sparkline(values)}  {shown[0]:.4f} → {shown[-1]:.4f}")
        if norms := next((json.loads(r["spectral_norms"]) for r in reversed(curve) if r["spectral_norms"]), None):
            print("  largest singular value per layer (last epoch measured):")
            for layer, value in norms.items():
                print(f"    {layer:<15} {value:.4f}")
    return 0


async def _unknown(conn: asyncpg.Connection, trial_id: str) -> str:
    """The error for an unknown trial id, with close ids of the same study prefix."""
    candidates = [r["id"] for r in await conn.fetch("SELECT id FROM trials WHERE id LIKE $1 || '%' LIMIT 5000",
                                                     trial_id[:4])]
    close = difflib.get_close_matches(trial_id, candidates, n=3, cutoff=0.6)
    return f"no trial {trial_id!r} in the read model" + (f"; did you mean {', '.join(close)}?" if close else
                                                          " (sntrack export --run STUDY lists a study's trials)")
