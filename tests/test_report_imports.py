"""The report's heavy imports are lazy: `sntrack report --help` loads none of numpy, scipy, statsmodels or
matplotlib, a report without --plot loads no matplotlib, and a report builds none of the event models (`schemas`)
(measured with `python -X importtime`)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from consumers.persistence import apply_events
from consumers.projections.comparison_keys import OVERALL
from consumers.registry import PROJECTIONS
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas.events import ALL_SEARCHES

HEAVY = ("numpy", "scipy", "statsmodels", "matplotlib")


def _modules(*args: str, env: dict | None = None) -> set[str]:
    """The modules a fresh `python -X importtime -m sntrack …` imported."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "sntrack", *args], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}


def _imported(*args: str, env: dict | None = None) -> set[str]:
    """The top-level packages a fresh `python -X importtime -m sntrack …` imported."""
    return {name.split(".")[0] for name in _modules(*args, env=env)}


async def _recorded(env, search: str, trials: int, epochs: int, seed: int) -> dict:
    """A paired synthetic study recorded by the journal, trials and comparison projections; the environment a
    `sntrack report` on it needs."""
    events = [e for trial in synthetic_study(trials, epochs, seed=seed, producer=producer_info(),
                                             model_run_id=search, paired=True) for e in trial]
    conn = await env.db()
    try:
        for name in ("journal", "trials", "comparison"):
            await apply_events(conn, PROJECTIONS[name], events)
    finally:
        await conn.close()
    return {**os.environ, "SNTRACK_DATABASE_URL": env.settings.database_url}


def test_report_help_loads_no_statistics_or_plotting_package():
    found = _imported("report", "--help")
    assert "sntrack" in found
    assert not found & set(HEAVY)


def test_the_report_names_the_overall_row_as_the_contract_does():
    assert OVERALL == ALL_SEARCHES


async def test_a_report_without_a_plot_loads_no_matplotlib_and_no_event_models(env):
    environment = await _recorded(env, "paired", 30, 5, 31)
    found = await asyncio.to_thread(_imported, "report", "--run", "paired", env=environment)
    assert "scipy" in found and "matplotlib" not in found and "statsmodels" not in found
    assert "schemas" not in found


async def test_a_report_over_more_than_50_pairs_imports_no_scipy_stats(env):
    """Its statistics come from scipy.special's compiled functions (consumers.report.special_stats): scipy.stats, most
    of a second to import, is left for the small samples where scipy itself uses an exact method, and scipy.special's
    package, which wraps every function for other array libraries, is not run."""
    environment = await _recorded(env, "large", 160, 3, 7)
    modules = await asyncio.to_thread(_modules, "report", "--run", "large", env=environment)
    assert "scipy.special._ufuncs_cxx" in modules  # imported by scipy.special._ufuncs
    assert not [m for m in modules if m.startswith("scipy.stats")]
    assert "scipy.special" not in modules and "scipy.special._support_alternative_backends" not in modules


def test_the_special_functions_import_without_scipy_special_and_are_the_ones_it_exports():
    """import_special_functions leaves no stand-in for scipy.special behind: a later `import scipy.special` runs the
    package, which exports the very function objects the report computed with."""
    code = "\n".join([
        "import sys",
        "from consumers.report.lazy_stats import import_special_functions",
        "functions = import_special_functions()",
        "print(functions.ndtr(0.0), 'scipy.special' in sys.modules)",
        "import scipy.special",
        "names = [n for n in dir(functions) if not n.startswith('_') and hasattr(scipy.special, n)]",
        "print(len(names) > 100, all(getattr(scipy.special, n) is getattr(functions, n) for n in names),",
        "      callable(scipy.special.comb), import_special_functions() is functions)"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["0.5", "False", "True", "True", "True", "True"]


def test_scipy_stats_waits_while_a_bare_package_stands_in_for_scipy_special():
    """The stand-in import_special_functions puts in sys.modules would break scipy.stats' import of scipy.special in
    another thread (the dashboard builds reports in threads): the lazy modules' imports wait for it."""
    code = "\n".join([
        "import importlib.util, sys, threading, time",
        "from consumers.report import lazy_stats",
        "done = []",
        "with lazy_stats._SPECIAL_PACKAGE:",
        "    sys.modules['scipy.special'] = importlib.util.module_from_spec(importlib.util.find_spec('scipy.special'))",
        "    thread = threading.Thread(target=lambda: done.append(float(lazy_stats.stats.norm.cdf(0.0))))",
        "    thread.start()",
        "    time.sleep(0.5)",
        "    waited = not done",
        "    del sys.modules['scipy.special']",
        "thread.join()",
        "print(waited, done)"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["True", "[0.5]"], out.stderr[-2000:]
