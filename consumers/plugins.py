"""Projection plugins: projections another installed package adds through the entry-point group
`sntrack.projections` (examples/sntrack-best-trials is a worked example; README "Projection plugins").

A plugin is a PluginProjection subclass: a name, the routing patterns its queue is bound with, its migrations and its
`project` function. The runtime gives it what a built-in projection gets: exactly-once application with the
`applied_events` bookkeeping, dead-lettering, `sntrack replay`'s safe rebuild and `sntrack status`.

Namespaced so that no plugin can collide with sntrack or with another plugin:
- its name is a lower-case identifier distinct from every built-in consumer;
- its queue is `sntrack.plugin.<name>` (declared by `sntrack topology apply` while the plugin is installed;
  infra/rabbitmq/definitions.json holds the built-in queues only);
- its tables start with `<name>_` (or are named `<name>`);
- its migrations are recorded in schema_migrations as `plugin:<name>/<file>`, beside the built-in `NNN_x.sql`.
  `sntrack db migrate` applies them; `consume` and `replay` refuse to start a plugin whose migrations are pending,
  rather than dead-letter every event into a missing table.

A plugin that cannot be loaded or breaks these rules does not stop the other commands: it is listed with its problem
by `sntrack status`, and `consume`/`replay` of it fail with that problem in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from importlib.resources import files
from typing import NamedTuple

import asyncpg

from common.errors import ConfigurationError
from consumers.persistence import create_pool
from consumers.projections.base import Projection
from consumers.roles import OWNER_ONLY, WRITER_GRANTS
from consumers.topology import QueueSpec

GROUP = "sntrack.projections"
NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
PATTERN = re.compile(r"[a-z0-9_*#-]+(\.[a-z0-9_*#-]+)*")


class Migration(NamedTuple):
    name: str  # e.g. 001_best.sql; applied in name order
    sql: str


def sql_files(package: str, folder: str = "sql") -> tuple[Migration, ...]:
    """The `*.sql` files of a package's folder, in name order: what a plugin usually gives as `migrations`."""
    root = files(package) / folder
    return tuple(sorted(Migration(f.name, f.read_text()) for f in root.iterdir() if f.name.endswith(".sql")))


class PluginProjection(Projection):
    """Base of a plugin projection: set `name`, `patterns`, `tables`, `migrations` and write `project`."""

    patterns: tuple[str, ...] = ()
    migrations: tuple[Migration, ...] = ()

    @property
    def queue(self) -> QueueSpec:  # type: ignore[override]
        return QueueSpec(f"sntrack.plugin.{self.name}", bindings=tuple(self.patterns))

    def migration_versions(self) -> list[tuple[str, str]]:
        """(schema_migrations version, SQL) of each migration, namespaced by the plugin's name."""
        return [(f"plugin:{self.name}/{m.name}", m.sql) for m in self.migrations]


@dataclass(frozen=True)
class Plugin:
    name: str
    distribution: str  # the package that installed it, with its version
    projection: PluginProjection | None = None
    problem: str | None = None


def _distribution(entry: EntryPoint) -> str:
    dist = entry.dist
    return f"{dist.name} {dist.version}" if dist is not None else "unknown package"


def _check(projection: object, entry: EntryPoint, taken: set[str]) -> str | None:
    """Why `projection` cannot run as plugin `entry.name` (None: it can)."""
    if not isinstance(projection, PluginProjection):
        return f"{entry.value} is not a consumers.plugins.PluginProjection"
    name = projection.name
    if name != entry.name:
        return f"its name {name!r} differs from the entry point's {entry.name!r}"
    if not NAME.fullmatch(name) or name in taken:
        return f"the name {name!r} is not a free lower-case identifier (taken: {', '.join(sorted(taken))})"
    if not projection.patterns or not all(isinstance(p, str) and PATTERN.fullmatch(p) for p in projection.patterns):
        return f"patterns {projection.patterns!r} are not routing patterns such as ml.run.stop or ml.run.#"
    foreign = [t for t in projection.tables if t != name and not t.startswith(f"{name}_")]
    if foreign:
        return f"tables {', '.join(foreign)} are not namespaced: a plugin's tables start with {name}_"
    built_in = [t for t in projection.tables if t in WRITER_GRANTS or t in OWNER_ONLY]  # every built-in relation
    if built_in:  # applied_events, schema_migrations, trial_metrics, ... match their first word's namespace
        return f"tables {', '.join(built_in)} are built-in: choose another plugin name than {name!r}"
    if not projection.replayable:
        return "a plugin projection must be replayable from the journal"
    if projection.dedupes_itself:  # lag and replay read a plugin's progress from its applied_events rows
        return "a plugin projection must keep its applied_events bookkeeping (dedupes_itself is the journal's)"
    return None


def discover(taken: set[str]) -> list[Plugin]:
    """Every installed plugin, loaded or with the reason it cannot run. `taken`: the built-in consumer names."""
    found: list[Plugin] = []
    names = set(taken)
    for entry in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        dist = _distribution(entry)
        try:
            loaded = entry.load()
            projection = loaded() if isinstance(loaded, type) else loaded
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break every sntrack command
            found.append(Plugin(entry.name, dist, problem=f"cannot be loaded: {type(exc).__name__}: {exc}"))
            continue
        problem = _check(projection, entry, names)
        found.append(Plugin(entry.name, dist, None if problem else projection, problem))
        names.add(entry.name)
    return found


async def pending_migrations(conn, projection: Projection) -> list[str]:
    """The plugin's migrations not yet recorded in schema_migrations ([] for a built-in projection)."""
    if not isinstance(projection, PluginProjection):
        return []
    versions = [v for v, _ in projection.migration_versions()]
    if not await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        return versions
    try:
        applied = {r["version"] for r in await conn.fetch(
            "SELECT version FROM schema_migrations WHERE version = ANY($1::text[])", versions)}
    except asyncpg.InsufficientPrivilegeError:  # the daemons' writer role may not read it: the tables tell
        missing = [t for t in projection.tables if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", t)]
        return versions if missing else []
    return [v for v in versions if v not in applied]


async def require_migrated(database_url: str, projections: list[Projection]) -> None:
    """A one-line ConfigurationError when a plugin among `projections` has pending migrations."""
    if not any(isinstance(p, PluginProjection) for p in projections):
        return
    pool = await create_pool(database_url, max_size=1)
    try:
        async with pool.acquire() as conn:
            for projection in projections:
                if pending := await pending_migrations(conn, projection):
                    raise ConfigurationError(f"plugin {projection.name} needs its migrations ({', '.join(pending)});"
                                             " run `sntrack db migrate`")
    finally:
        await pool.close()


async def plugin_status(conn, plugins: list[Plugin]) -> list[dict]:
    """`sntrack status`'s figures of each installed plugin: its package, queue, tables, pending migrations, problem."""
    out = []
    for plugin in plugins:
        projection = plugin.projection
        out.append({"name": plugin.name, "package": plugin.distribution,
                    "queue": projection.queue.name if projection else None,
                    "tables": list(projection.tables) if projection else [],
                    "pending_migrations": await pending_migrations(conn, projection) if projection else [],
                    "problem": plugin.problem})
    return out


def plugin_line(status: dict) -> str:
    """One plugin_status entry as a line of `sntrack status`'s table."""
    if status["problem"]:
        return f"{status['name']:12} {status['package']}: cannot run: {status['problem']}"
    pending = status["pending_migrations"]
    state = f"migrations pending ({', '.join(pending)}): run `sntrack db migrate`" if pending else "ready"
    return (f"{status['name']:12} {status['package']}  queue {status['queue']}  "
            f"tables {', '.join(status['tables']) or '-'}  {state}")
