"""Projection plugins (entry-point group `sntrack.projections`): the example package examples/sntrack-best-trials,
installed for real with pip, runs under `consume` and `replay` and is listed by `status`; a broken or
ill-namespaced plugin is reported and refused without breaking the other commands."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from consumers.plugins import PluginProjection, discover, require_migrated
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas import RunStopped
from tests.conftest import wait_until
from tests.test_db_roles import prod  # noqa: F401 - the production-like database with roles

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sntrack-best-trials"
QUEUE = "sntrack.plugin.best_trials"
BEST = "SELECT model_run_id, spectral_norm, trial_id, val_accuracy FROM best_trials_by_arm ORDER BY 1, 2"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The example package installed by pip into a folder of its own (the shared venv stays as it is): what
    `pip install ./examples/sntrack-best-trials` puts into site-packages, entry point metadata included."""
    source, target = tmp_path_factory.mktemp("src") / "pkg", tmp_path_factory.mktemp("site")
    shutil.copytree(EXAMPLE, source)  # pip builds in the source tree: keep the checkout clean
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(target), str(source)], check=True, timeout=300)
    assert list(target.glob("sntrack_best_trials-*.dist-info/entry_points.txt"))
    return target


def run_env(env, *paths: Path) -> dict[str, str]:
    return {**os.environ, **env.settings.to_env(), "SNTRACK_LOG_JSON": "true",
            "PYTHONPATH": os.pathsep.join([str(ROOT), *map(str, paths)])}


def sntrack(env, installed: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sntrack", *args], env=run_env(env, installed), capture_output=True,
                          text=True, timeout=180)


def start_daemon(env, installed: Path, *names: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sntrack", "consume", *names], env=run_env(env, installed),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def best_by_arm(study) -> list[tuple]:
    """The rows the projection must hold, computed from the events."""
    best: dict[tuple, tuple] = {}
    for trial in study:
        stop = trial[-1]
        accuracy = stop.payload.measurements.get("final_val_accuracy")
        if isinstance(stop, RunStopped) and stop.payload.status == "completed" and accuracy is not None:
            key = (stop.model_run_id, stop.payload.spectral_norm)
            best[key] = min(best.get(key, (2.0, "")), (-accuracy, stop.trial_id))
    return sorted((*key, trial_id, -negated) for key, (negated, trial_id) in best.items())


async def test_the_example_plugin_runs_under_consume_and_replay_and_is_listed_by_status(env, installed):
    # Installed but not migrated: listed with what to do, and refused by consume rather than failing every event.
    listed = sntrack(env, installed, "status")
    assert listed.returncode == 0, listed.stderr
    assert "best_trials" in listed.stdout and "sntrack-best-trials 0.1.0" in listed.stdout
    assert "migrations pending (plugin:best_trials/001_best_trials.sql)" in listed.stdout
    refused = sntrack(env, installed, "consume", "best_trials")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "sntrack db migrate" in refused.stderr

    migrated = sntrack(env, installed, "db", "migrate")
    assert migrated.returncode == 0 and "plugin:best_trials/001_best_trials.sql" in migrated.stdout, migrated.stderr
    assert "schema is up to date" in sntrack(env, installed, "db", "migrate").stdout
    applied = sntrack(env, installed, "topology", "apply", "--user-prefix", env.vhost)  # the sandbox's users
    assert applied.returncode == 0 and f"binding ml.events -[ml.run.stop]-> {QUEUE}" in applied.stdout, applied.stderr
    [granted] = env.api.request("GET", f"users/{env.vhost}-consumer/permissions")
    assert re.fullmatch(granted["read"], QUEUE) and re.fullmatch(granted["read"], "sntrack.trials")

    studies = [synthetic_study(30, 4, seed=s, producer=producer_info(), model_run_id=f"plugin-{s}") for s in (1, 2)]
    events = [e for study in studies for trial in study for e in trial]
    random.Random(3).shuffle(events)
    stops = sum(isinstance(e, RunStopped) for e in events)
    daemon = start_daemon(env, installed, "journal", "best_trials")
    try:
        await env.publish_events(events, duplicates=40)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM applied_events WHERE projection = $2",
                                              stops, "best_trials"), timeout=120, what="the plugin to apply")
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events)), timeout=120,
                         what="the journal")
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, stderr[-2000:]
    expected = best_by_arm([t for study in studies for t in study])
    assert len(expected) == 4  # two studies, two arms
    assert [tuple(r) for r in await env.fetch(BEST)] == expected
    assert env.queue_depth(f"{QUEUE}.dlq") == 0

    await env.fetchval("UPDATE best_trials_by_arm SET val_accuracy = -1, trial_id = 'wrong'")
    replayed = sntrack(env, installed, "replay", "best_trials")
    assert replayed.returncode == 0, replayed.stderr
    assert [tuple(r) for r in await env.fetch(BEST)] == expected

    listed = sntrack(env, installed, "status")
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.strip().startswith("best_trials"))
    assert f"queue {QUEUE}" in line and "tables best_trials_by_arm" in line and line.endswith("ready")
    assert any(x.strip().startswith(QUEUE + " ") for x in listed.stdout.splitlines())
    as_json = json.loads(sntrack(env, installed, "status", "--format", "json").stdout)
    assert as_json["plugins"] == [{"name": "best_trials", "package": "sntrack-best-trials 0.1.0", "queue": QUEUE,
                                   "tables": ["best_trials_by_arm"], "pending_migrations": [], "problem": None}]
    [row] = [q for q in as_json["queues"] if q["queue"] == QUEUE]
    assert row["consumer"] == "best_trials" and row["lag_events"] == 0  # (queue figures may lag by 5 s)


def test_definitions_json_stays_the_built_in_topology_with_a_plugin_installed(env, installed):
    checked = sntrack(env, installed, "topology", "check")
    assert checked.returncode == 0, checked.stderr
    exported = sntrack(env, installed, "topology", "export", "--output", "-")
    assert QUEUE not in exported.stdout and "sntrack.trials" in exported.stdout
    helped = sntrack(env, installed, "consume", "--help")
    assert "best_trials" in helped.stdout


def fake_distribution(folder: Path, name: str, entry: str, module: str, source: str) -> None:
    """A package as pip leaves it in site-packages: a module and a .dist-info whose entry_points.txt names it."""
    (folder / f"{module}.py").write_text(source)
    info = folder / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[sntrack.projections]\n{entry} = {module}:Plugin\n")


PLUGIN = """
from consumers.plugins import PluginProjection

class Plugin(PluginProjection):
    name = {name!r}
    patterns = {patterns!r}
    tables = {tables!r}

    def project(self, event):
        return []
"""

BROKEN = [
    ("import_fails", "raise ImportError('no such thing')", "cannot be loaded: ImportError: no such thing"),
    ("not_namespaced", PLUGIN.format(name="not_namespaced", patterns=("ml.run.#",), tables=("trials",)),
     "tables trials are not namespaced"),
    ("journal", PLUGIN.format(name="journal", patterns=("ml.run.#",), tables=("journal",)), "is not a free"),
    # Namespaced by the letter, yet built-in tables: a replay of the plugin would rebuild them as its own.
    ("applied", PLUGIN.format(name="applied", patterns=("ml.run.#",), tables=("applied_events",)),
     "tables applied_events are built-in"),
    ("schema", PLUGIN.format(name="schema", patterns=("ml.run.#",), tables=("schema_migrations",)),
     "tables schema_migrations are built-in"),
    ("trial", PLUGIN.format(name="trial", patterns=("ml.run.#",), tables=("trial_metrics",)),
     "tables trial_metrics are built-in"),
    ("no_patterns", PLUGIN.format(name="no_patterns", patterns=(), tables=()), "are not routing patterns"),
    ("other_name", PLUGIN.format(name="renamed", patterns=("ml.run.#",), tables=()), "differs from the entry"),
    # It would record nothing: its lag would be every event for ever, and its replay would never see its catch-up end.
    ("self_dedupe", PLUGIN.format(name="self_dedupe", patterns=("ml.run.#",), tables=()).replace(
        "    def project", "    dedupes_itself = True\n\n    def project"), "must keep its applied_events bookkeeping"),
]


@pytest.mark.parametrize("entry, source, problem", BROKEN, ids=[b[0] for b in BROKEN])
def test_a_plugin_breaking_the_rules_is_reported_not_run(tmp_path, monkeypatch, entry, source, problem):
    fake_distribution(tmp_path, "bad-plugin", entry, f"bad_{entry}", source)
    monkeypatch.syspath_prepend(str(tmp_path))
    [found] = [p for p in discover({"journal", "trials", "comparison", "mlflow"}) if p.distribution == "bad-plugin 1.0"]
    assert found.projection is None and problem in found.problem


def test_a_well_formed_plugin_is_loaded_with_its_namespaced_queue_and_migrations(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "good-plugin", "good", "good_plugin",
                      PLUGIN.format(name="good", patterns=("ml.run.stop",), tables=("good_rows",)))
    monkeypatch.syspath_prepend(str(tmp_path))
    [found] = [p for p in discover({"journal"}) if p.name == "good"]
    assert isinstance(found.projection, PluginProjection) and found.problem is None
    assert found.projection.queue.name == "sntrack.plugin.good"
    assert found.projection.queue.bindings == ("ml.run.stop",)


async def test_consume_and_status_survive_a_broken_plugin(env, tmp_path):
    fake_distribution(tmp_path, "bad-plugin", "import_fails", "bad_import", "raise ImportError('no such thing')")
    daemon_env = run_env(env, tmp_path)
    refused = subprocess.run([sys.executable, "-m", "sntrack", "consume", "import_fails"], env=daemon_env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "projection plugin import_fails (bad-plugin 1.0) cannot be loaded: ImportError" in refused.stderr
    status = subprocess.run([sys.executable, "-m", "sntrack", "status"], env=daemon_env, capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "import_fails" in status.stdout and "cannot run" in status.stdout
    migrated = subprocess.run([sys.executable, "-m", "sntrack", "db", "migrate"], env=daemon_env,
                              capture_output=True, text=True, timeout=60)
    assert migrated.returncode == 0 and "skipped projection plugin import_fails" in migrated.stderr


def test_the_example_plugin_keeps_the_projection_contract(env, installed, monkeypatch):
    """The contract every built-in projection keeps (tests/test_projection_contract.py): any order, duplication and
    batching gives the in-order rows, and so does a replay from the journal."""
    monkeypatch.syspath_prepend(str(installed))
    from sntrack_best_trials import BestTrials

    from consumers.persistence import apply_events, migrate
    from consumers.registry import PROJECTIONS
    from consumers.replay import replay
    from tests.test_projection_contract import EVENTS, _any_delivery_gives, _apply, _rows

    projection, url = BestTrials(), env.settings.database_url

    async def journal_then_replay() -> dict:
        pool = await asyncpg.create_pool(url, min_size=2, max_size=2)
        try:
            async with pool.acquire() as conn:
                await migrate(conn, projection.migration_versions())
                await apply_events(conn, PROJECTIONS["journal"], EVENTS)
            await replay(pool, projection)
            async with pool.acquire() as conn:
                return await _rows(conn, projection)
        finally:
            await pool.close()

    replayed = asyncio.run(journal_then_replay())
    assert len(replayed["best_trials_by_arm"]) == 4  # two studies, two arms
    in_order = asyncio.run(_apply(url, projection, [EVENTS]))
    assert in_order == replayed
    _any_delivery_gives(url, projection, in_order)


async def test_db_migrate_roles_lets_the_writer_upsert_a_plugins_tables(prod, installed, monkeypatch):  # noqa: F811
    """With database roles (tests/test_db_roles.py), the daemons' writer role may run a plugin's upserts, and
    `consume` as the writer (which may not read schema_migrations) still refuses an unmigrated plugin."""
    path = os.pathsep.join([str(ROOT), str(installed)])
    refused = prod.sntrack("consume", "best_trials", PYTHONPATH=path)
    assert refused.returncode == 2 and "sntrack db migrate" in refused.stderr, refused.stderr
    run = prod.sntrack("db", "migrate", "--roles", PYTHONPATH=path)
    assert run.returncode == 0 and "plugin:best_trials/001_best_trials.sql" in run.stdout, run.stderr
    monkeypatch.syspath_prepend(str(installed))
    from sntrack_best_trials import BestTrials
    await require_migrated(prod.writer_url, [BestTrials()])  # now passes, as the writer
    conn = await prod.connect(prod.writer_url)
    try:
        for accuracy in (0.5, 0.7):
            await conn.execute("INSERT INTO best_trials_by_arm VALUES ('s', true, 't', $1, now()) ON CONFLICT "
                               "(model_run_id, spectral_norm) DO UPDATE SET val_accuracy = EXCLUDED.val_accuracy",
                               accuracy)
        assert await conn.fetchval("SELECT val_accuracy FROM best_trials_by_arm") == 0.7
    finally:
        await conn.close()
