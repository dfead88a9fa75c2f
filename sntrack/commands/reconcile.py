"""sntrack reconcile [--run ID] [--repair] — does MLflow tell the same story as the read model?"""

from __future__ import annotations

import argparse
import difflib

from common.errors import ConfigurationError
from common.urls import redact
from consumers.mlflow.client import MlflowRest, MlflowUnavailable, check_tracking_uri
from consumers.mlflow.reconcile import Divergence, reconcile, studies
from sntrack.pools import read_pool, writer_pool
from sntrack.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "reconcile", help="compare trials with their MLflow runs; --repair fixes them",
        description="For every trial in the read model, find its MLflow run(s) by the trial_id tag in the "
        "study's experiment (SNTRACK_MLFLOW_EXPERIMENT, default sntrack/{study}) and report: missing or deleted "
        "run, duplicate runs, wrong or missing tags (trial_id, model_run_id, spectral_norm, constraint_method, "
        "status), params, learning curves (measurements and singular values by epoch), final metrics, run state, "
        "and a read model linking another run. Exits 1 when anything diverges (with --repair: when anything "
        "could not be repaired), 2 for an unknown --run. See docs/mlflow.md.\n\n"
        "example: sntrack reconcile --run wine-sn --repair",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", dest="model_run_id", metavar="ID",
                        help="only this search (model_run_id); default: every trial")
    parser.add_argument("--repair", action="store_true",
                        help="create or restore missing runs, delete (restorably) duplicates, set tags, final "
                        "metrics and state, record the link; then check again")
    parser.set_defaults(run=_reconcile)


def _table(rows: list[Divergence], last: str, values: list[str]) -> str:
    header = ("trial_id", "kind", "run_id", last)
    cells = [header] + [(d.trial_id, d.kind, d.run_id or "-", v) for d, v in zip(rows, values, strict=True)]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3] for c in cells)


async def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.mlflow_enabled:
        raise ConfigurationError("MLflow is disabled (SNTRACK_MLFLOW_ENABLED=false); nothing to reconcile")
    check_tracking_uri(settings.mlflow_tracking_uri)
    # Checking only reads; --repair records the links it fixes (mlflow_runs), as the mlflow consumer does.
    pool = await (writer_pool if args.repair else read_pool)(settings)
    client = MlflowRest(settings.mlflow_tracking_uri, settings.mlflow_timeout_s)
    try:
        async with pool.acquire() as conn:
            known = await studies(conn)
            if args.model_run_id is not None and args.model_run_id not in known:
                raise ConfigurationError(_unknown(args.model_run_id, known))
            outcome = await reconcile(conn, client, settings.mlflow_experiment, model_run_id=args.model_run_id,
                                      fix=args.repair)
    except MlflowUnavailable as exc:
        raise ConfigurationError(f"cannot reach MLflow at {redact(settings.mlflow_tracking_uri)}: {exc}") from None
    finally:
        await client.close()
        await pool.close()
    where = f"experiment {settings.mlflow_experiment!r} at {redact(settings.mlflow_tracking_uri)}"
    if outcome.checked == 0:
        print("no trials in the read model: nothing to check (are the journal and trials consumers running?)")
        return 0
    if not outcome.divergences:
        print(f"{outcome.checked} trials checked against {where} (tags, params, curves, final metrics, state): "
              "MLflow matches the read model")
        return 0
    trials = len({d.trial_id for d in outcome.divergences})
    if not args.repair:
        print(_table(outcome.divergences, "detail", [d.detail for d in outcome.divergences]))
        print(f"{len(outcome.divergences)} divergences in {trials} of {outcome.checked} trials ({where}); "
              "run with --repair to fix them")
        return 1
    done = outcome.repaired + outcome.unrepaired
    print(_table(done, "result", ["repaired: " + d.detail for d in outcome.repaired]
                 + ["NOT repaired: " + d.detail for d in outcome.unrepaired]))
    print(f"{len(outcome.divergences)} divergences in {trials} of {outcome.checked} trials ({where}): "
          f"{len(outcome.repaired)} repaired, {len(outcome.unrepaired)} not")
    return 1 if outcome.unrepaired else 0


def _unknown(study: str, known: list[str]) -> str:
    close = difflib.get_close_matches(study, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known[:10]) or 'none'}"
    return f"no trials of study {study!r} in the read model; {hint}"
