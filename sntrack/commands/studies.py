"""sntrack studies list|show|delete|restore — studies (searches) as objects a user can find and remove."""

from __future__ import annotations

import argparse
import getpass
import sys

import asyncpg

from common.errors import ConfigurationError
from common.urls import scrub
from consumers.studies import (
    Deletion,
    UnknownStudy,
    archive,
    hard_delete,
    list_studies,
    record_outside,
    resolve,
    restore,
)
from sntrack.pools import admin_pool, read_pool
from sntrack.settings import Settings

EXAMPLES = """examples:
  sntrack studies list
  sntrack studies show demo
  sntrack studies delete demo           # archive (nothing removed); undo: sntrack studies restore demo
  sntrack studies delete demo --hard    # remove events, read-model rows, the Optuna study and MLflow runs"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("studies", help="list, show, archive, restore or remove studies",
                            description="Studies (Optuna searches; the events' model_run_id) as objects.",
                            epilog=EXAMPLES)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="name, dataset, trials by arm and status, created, last activity",
                            epilog="example:\n  sntrack studies list --all")
    ls.add_argument("--all", action="store_true", help="include archived studies")
    ls.set_defaults(run=_list)
    show = actions.add_parser("show", help="a study's stored settings, search space and trials",
                              epilog="example:\n  sntrack studies show demo")
    show.add_argument("name")
    show.add_argument("--storage", help="Optuna RDB storage URL (default: $SNTRACK_OPTUNA_STORAGE)")
    show.set_defaults(run=_show)
    delete = actions.add_parser(
        "delete", help="archive a study (default) or remove it for good (--hard)",
        description="Without --hard: archive (nothing is removed; `studies list` hides it; `sntrack studies "
        "restore` undoes it). With "
        "--hard: remove its events from the journal and every projection's rows in one transaction, leave a "
        "tombstone so late events are ignored, delete its Optuna study and its MLflow runs, and record it all in "
        "study_audit. A hard delete cannot be undone and the name cannot be reused.",
        epilog="examples:\n  sntrack studies delete demo\n  sntrack studies delete demo --hard")
    delete.add_argument("name")
    delete.add_argument("--hard", action="store_true", help="remove for good (see above)")
    delete.add_argument("--storage", help="Optuna RDB storage URL (default: $SNTRACK_OPTUNA_STORAGE)")
    delete.set_defaults(run=_delete)
    undo = actions.add_parser("restore", help="bring an archived study back into reports",
                              epilog="example:\n  sntrack studies restore demo")
    undo.add_argument("name")
    undo.set_defaults(run=_restore)


async def _connected(settings: Settings, work, *, admin: bool = False):
    """Run `work` on a connection: the read-only login, or (admin=True: archive, restore, remove) the owner's."""
    pool = await (admin_pool if admin else read_pool)(settings)
    try:
        async with pool.acquire() as conn:
            return await work(conn)
    except UnknownStudy as exc:
        raise ConfigurationError(str(exc)) from None
    finally:
        await pool.close()


def _arms(by_arm: dict[str, dict[str, int]]) -> str:
    return "  ".join(f"{arm}: " + ", ".join(f"{n} {status}" for status, n in sorted(by_arm[arm].items()))
                     for arm in ("sn", "baseline") if arm in by_arm)


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    studies = await _connected(settings, lambda conn: list_studies(conn, include_archived=args.all))
    if not studies:
        print("no studies in the read model (run a worker, and `sntrack consume all` to record it)")
        return 0
    rows = [("study", "dataset", "created", "last activity", "trials")] + [
        (s.name + (" (archived)" if s.archived else ""), s.dataset or "-", f"{s.created:%Y-%m-%d %H:%M}",
         f"{s.last_activity:%Y-%m-%d %H:%M}", _arms(s.by_arm)) for s in studies]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[4])
    return 0


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    async def read(conn: asyncpg.Connection):
        name = await resolve(conn, args.name)
        return name, [s for s in await list_studies(conn, include_archived=True) if s.name == name]
    name, found = await _connected(settings, read)
    attrs = _optuna_attrs(args.storage or settings.optuna_storage, name)
    print(f"study {name}" + (" (archived)" if found and found[0].archived else ""))
    if found:
        print(f"  trials     {_arms(found[0].by_arm)}")
        first, last = found[0].created, found[0].last_activity
        print(f"  created    {first:%Y-%m-%d %H:%M:%S %Z}   last activity {last:%Y-%m-%d %H:%M:%S %Z}")
    if attrs is None:
        print("  settings   not found in the Optuna storage (created elsewhere, or deleted)")
        return 0
    print(f"  dataset    {attrs.get('dataset', '-')}   split seed {attrs.get('split_seed', '-')}")
    if space := attrs.get("search_space"):
        from producer.search_space import SearchSpace

        print("  search space (flag SPEC):")
        for dim, dimension in SearchSpace.from_tables(space).dimensions.items():
            print(f"    --{dim.replace('_', '-'):<16} {dimension.spec}")
    return 0


def _optuna_attrs(storage: str, name: str) -> dict | None:
    import optuna

    from producer.study import rdb_storage

    try:
        return optuna.load_study(study_name=name, storage=rdb_storage(storage)).user_attrs
    except KeyError:
        return None
    except Exception as exc:  # SQLAlchemy's errors: the storage is away or not an Optuna database
        raise ConfigurationError(
            f"cannot read the Optuna storage: {scrub(str(exc).splitlines()[0], storage)}") from None


def _delete_optuna(storage: str, name: str) -> str:
    import optuna

    from producer.study import rdb_storage

    try:
        optuna.delete_study(study_name=name, storage=rdb_storage(storage))
    except KeyError:
        return "no Optuna study of that name"
    except Exception as exc:
        return f"Optuna study left in place ({str(exc).splitlines()[0]})"
    return "Optuna study deleted"


async def _delete_mlflow(settings: Settings, run_ids: list[str]) -> tuple[int, str]:
    if not run_ids:
        return 0, "no MLflow runs"
    if not settings.mlflow_enabled:
        return 0, f"{len(run_ids)} MLflow runs left (MLflow is disabled here): {', '.join(run_ids)}"
    from consumers.mlflow.client import MlflowError, MlflowRest

    client = MlflowRest(settings.mlflow_tracking_uri, settings.mlflow_timeout_s)
    deleted, left = 0, []
    try:
        for run_id in run_ids:
            try:
                await client.delete_run(run_id)
                deleted += 1
            except MlflowError:
                left.append(run_id)
    finally:
        await client.close()
    return deleted, f"{deleted} MLflow runs deleted" + (
        f"; {len(left)} left (MLflow unreachable or refused): {', '.join(left)}" if left else "")


async def _delete(args: argparse.Namespace, settings: Settings) -> int:
    actor = getpass.getuser()
    if not args.hard:
        async def soft(conn: asyncpg.Connection) -> bool:
            return await archive(conn, await resolve(conn, args.name), actor)
        done = await _connected(settings, soft, admin=True)
        print(f"archived {args.name}: `sntrack studies list` hides it; `sntrack studies restore {args.name}` undoes it"
              if done else f"{args.name} was archived already")
        return 0

    async def hard(conn: asyncpg.Connection) -> Deletion:
        return await hard_delete(conn, await resolve(conn, args.name), actor)
    deletion = await _connected(settings, hard, admin=True)
    optuna_note = _delete_optuna(args.storage or settings.optuna_storage, deletion.study)
    mlflow_deleted, mlflow_note = await _delete_mlflow(settings, deletion.mlflow_run_ids)
    await _connected(settings, lambda conn: record_outside(conn, deletion, {"mlflow_runs_deleted": mlflow_deleted},
                                                           f"{optuna_note}; {mlflow_note}"), admin=True)
    removed = ", ".join(f"{n} {table}" for table, n in deletion.counts.items() if n)
    print(f"removed {deletion.study} for good: {removed or 'no rows'}; {optuna_note}; {mlflow_note}")
    return 0


async def _restore(args: argparse.Namespace, settings: Settings) -> int:
    async def undo(conn: asyncpg.Connection) -> bool:
        return await restore(conn, await resolve(conn, args.name), getpass.getuser())
    if not await _connected(settings, undo, admin=True):
        print(f"{args.name} is not archived", file=sys.stderr)
        return 1
    print(f"restored {args.name}: reports include it again")
    return 0
