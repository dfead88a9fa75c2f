"""sn_comparison against the trials it summarizes (live, with duplicates, replayed), and the report's contract."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import random
import subprocess
import sys
import urllib.parse

import aio_pika
import numpy as np
import pytest

from common.urls import with_login
from consumers.persistence import apply_events
from consumers.projections.sn_comparison import OVERALL
from consumers.registry import PROJECTIONS
from consumers.report.queries import COMPARISON_COLUMNS, COMPARISON_FROM_TRIALS
from consumers.report.render import RENDERERS, arm_rows, finding_lines, flatten
from consumers.report.report import REPORT_VERSION, build_report
from consumers.report.snapshot import ComparisonData, TrialRecord, load
from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas import EXCHANGE, RunStopped
from tests.conftest import wait_until
from tests.tls import pump

SN_ROWS = f"SELECT {', '.join(COMPARISON_COLUMNS)} FROM sn_comparison ORDER BY model_run_id, spectral_norm, status"
FROM_TRIALS = f"SELECT * FROM ({COMPARISON_FROM_TRIALS}) AS x ORDER BY model_run_id, spectral_norm, status"

# Every field of the JSON report (docs/report.md); list items as `[]`. Changing it means a new REPORT_VERSION.
_SUMMARY = ("n", "mean", "median", "std", "ci_low", "ci_high", "min", "max")
_DIFF = ("estimate", "se", "df", "ci_low", "ci_high")
_TEST = ("statistic", "p_value", "df")
_POWER = ("effect", "standardized_effect", "power", "required_n", "additional")
_RATE = ("spectral_norm", "baseline", "p_value", "test", "differs")
GOLDEN = {
    "report_version", "generated_at", "filters.model_run_id", "filters.dataset", "metric", "alpha", "source",
    *(f"arms.{arm}.{leaf}" for arm in ("spectral_norm", "baseline") for leaf in (
        *(f"trials.{s}" for s in ("completed", "pruned", "failed", "running", "total")),
        *(f"{m}.{f}" for m in ("final_val_accuracy", "train_val_gap", "duration_ms") for f in _SUMMARY),
        "best.trial_id", "best.final_val_accuracy")),
    *(f"difference.{f}" for f in _DIFF),
    *(f"tests.welch_t.{f}" for f in _TEST), *(f"tests.mann_whitney_u.{f}" for f in _TEST),
    "tests.paired.n_pairs", "tests.paired.n_linked_pairs", *(f"tests.paired.mean_difference.{f}" for f in _DIFF),
    *(f"tests.paired.{t}.{f}" for t in ("t_test", "wilcoxon_signed_rank") for f in _TEST),
    "effect_sizes.hedges_g", "effect_sizes.cliffs_delta",
    "training_time.overhead", *(f"training_time.difference_ms.{f}" for f in _DIFF),
    *(f"rates.{s}.{f}" for s in ("pruned", "failed") for f in _RATE),
    "confounding[]", *(f"confounding[].{f}" for f in ("hyperparam", "test", "statistic", "p_value", "differs")),
    "power.design", "power.alpha", "power.target_power", "power.unit",
    *(f"power.{b}.{f}" for b in ("observed", "min_effect") for f in _POWER),
    "verdict.text", "verdict.significant", "verdict.test", "verdict.p_value", "warnings[]",
    *(f"curves.{arm}{leaf}" for arm in ("spectral_norm", "baseline")
      for leaf in ("[]", *(f"[].{f}" for f in ("epoch", "n", "mean", "ci_low", "ci_high", "elapsed_s")))),
}
# What report_version 2 added; the version-1 fields above keep their meaning.
_ANALYSIS = ("design", "n_trials", "n_pairs", "test", "p_value", "significant", *(f"difference.{f}" for f in _DIFF))
_SIGMAS = ("trials_measured", "layers[]", "layers[].layer", "layers[].median", "layers[].max",
           "lipschitz_bound.median", "lipschitz_bound.max")
GOLDEN |= {
    "min_effect", "journal_trials", "power.observed_caveat",
    "design.primary", "design.completed_trials", "design.trials_in_complete_pairs", "design.rule",
    *(f"{a}.{f}" for a in ("primary", "subset") for f in _ANALYSIS),
    "equivalence.margin", *(f"equivalence.tost.{f}" for f in ("margin", "p_value", "p_lower", "p_upper", "df",
                                                               "design")),
    *(f"equivalence.aso.{f}" for f in ("epsilon_min", "violation_ratio", "bootstrap", "confidence", "design")),
    *(f"equivalence.bayes_signed_rank.{f}" for f in ("rope", "n_pairs", "p_sn_better", "p_equivalent",
                                                      "p_baseline_better", "samples")),
    *(f"training_time.ratio.{f}" for f in ("estimate", "ci_low", "ci_high", "n", "design")),
    "manipulation.tolerance", "manipulation.sn_trials_over_tolerance", "manipulation.baseline_trials_all_at_most_one",
    "manipulation.examples.spectral_norm[]", "manipulation.examples.baseline[]", "manipulation.passed",
    *(f"manipulation.{arm}.{f}" for arm in ("spectral_norm", "baseline") for f in _SIGMAS),
    "where_it_helps.exploratory", "where_it_helps.design", "where_it_helps.correction",
    "where_it_helps.most_related", "where_it_helps.related[]", "where_it_helps.parameters[]",
    *(f"where_it_helps.parameters[].{f}" for f in ("hyperparam", "test", "scale", "statistic", "p_value", "p_holm",
                                                   "buckets[]", "buckets[].label", "buckets[].n",
                                                   *(f"buckets[].{d}" for d in _DIFF))),
    *(f"stability.variance_ratio.{f}" for f in ("ratio", "ci_low", "ci_high")),
    *(f"stability.brown_forsythe.{f}" for f in _TEST), "stability.paired.n_pairs", "stability.paired.variance_ratio",
    *(f"stability.paired.pitman_morgan.{f}" for f in _TEST),
    "convergence.threshold", *(f"convergence.{arm}.{f}" for arm in ("spectral_norm", "baseline") for f in _SUMMARY),
    *(f"convergence.difference.{f}" for f in _DIFF),
    "strata.design", "strata.signs_disagree", "strata.significant_strata", "strata.items[]",
    *(f"strata.items[].{f}" for f in ("model_run_id", "dataset", "n_sn", "n_baseline", "p_value", "p_holm",
                                      *(f"difference.{d}" for d in _DIFF))),
    *(f"strata.pooled.{f}" for f in ("estimate", "se", "ci_low", "ci_high", "p_value", "q", "q_p_value",
                                     "i_squared", "strata")),
    *(f"verdict.{f}" for f in ("outcome", "design", "n_trials", "margin", "tost_p_value", "additional", "unit",
                               "disagreement")),
}


def shape(obj, prefix: str = "") -> set[str]:
    if isinstance(obj, dict):
        return {p for k, v in obj.items() for p in shape(v, f"{prefix}{k}.")}
    if isinstance(obj, list):
        return {f"{prefix[:-1]}[]", *(p for item in obj for p in shape(item, f"{prefix[:-1]}[]."))}
    return {prefix[:-1]}


async def publish_in_order(env, events) -> None:
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        for e in events:
            await exchange.publish(aio_pika.Message(e.to_json(), message_id=str(e.event_id),
                                                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                   routing_key=e.event_type)
    finally:
        await connection.close()


async def test_sn_comparison_equals_trials_live_with_duplicates_and_after_replay(env):
    rng = random.Random(7)
    studies = [synthetic_study(16, 3, seed=21, producer=producer_info(), paired=True),
               synthetic_study(12, 3, seed=22, producer=producer_info())]
    events = [e for study in studies for trial in study for e in trial]
    stops = [e for e in events if isinstance(e, RunStopped)]
    mixed = events + rng.sample(stops, len(stops) // 3) + rng.sample(events, 20)  # redelivered duplicates
    rng.shuffle(mixed)
    async with running_consumers(env.settings.consumer(), ["trials", "comparison"]):
        await publish_in_order(env, mixed)
        await wait_until(lambda: env.fetchval(
            "SELECT count(*) = $1 FROM applied_events WHERE projection = 'comparison'", len(stops)),
            what="comparison caught up")
        await wait_until(lambda: env.fetchval(
            "SELECT count(*) = $1 FROM applied_events WHERE projection = 'trials'", len(events)),
            what="trials caught up")

    live = [tuple(r) for r in await env.fetch(SN_ROWS)]
    expected = [tuple(r) for r in await env.fetch(FROM_TRIALS)]
    assert live == expected  # exact: numeric sums, whatever the order and the duplicates
    overall = {(r[1], r[2]): r[3] for r in live if r[0] == OVERALL}
    assert sum(overall.values()) == len(stops)

    conn = await env.db()
    try:
        # The journal was not running: fill it from the same events so that replay has a source.
        await apply_events(conn, PROJECTIONS["journal"], events)
    finally:
        await conn.close()
    await env.replay("comparison")
    assert [tuple(r) for r in await env.fetch(SN_ROWS)] == live


def _apply(env, *studies):
    async def run():
        conn = await env.db()
        try:
            events = [e for study in studies for trial in study for e in trial]
            for name in ("trials", "comparison"):
                await apply_events(conn, PROJECTIONS[name], events)
        finally:
            await conn.close()
    return run()


async def test_report_contract_in_process_and_from_the_command_line(env, tmp_path):
    study = synthetic_study(40, 4, seed=5, producer=producer_info(), model_run_id="independent")
    paired_study = synthetic_study(24, 4, seed=6, producer=producer_info(), model_run_id="paired", paired=True)
    await _apply(env, study, paired_study)
    conn = await env.db()
    try:
        data = await load(conn, "independent")
        report = build_report(data, min_effect=0.005)
        paired = build_report(await load(conn, "paired"))
        by_dataset = build_report(await load(conn, None, "digits"))
    finally:
        await conn.close()

    assert shape(report) == GOLDEN
    assert report["manipulation"]["passed"] and paired["manipulation"]["passed"]
    assert report["convergence"]["spectral_norm"]["n"] == report["arms"]["spectral_norm"]["final_val_accuracy"]["n"]
    assert all(p["elapsed_s"] is not None for p in report["curves"]["baseline"])
    assert report["report_version"] == REPORT_VERSION and report["source"] == "sn_comparison"
    assert by_dataset["source"] == "trials"
    for name, flag in (("spectral_norm", True), ("baseline", False)):
        finished = [t for t in data.trials if t.spectral_norm is flag]
        assert report["arms"][name]["trials"]["total"] == len(finished)
        assert report["arms"][name]["final_val_accuracy"]["n"] == len(data.completed_values(flag))
    # The per-arm figures read from sn_comparison equal those computed from the trials.
    from_trials = build_report(ComparisonData(data.trials, None, data.curves, "independent"))
    for arm in ("spectral_norm", "baseline"):
        for field, value in from_trials["arms"][arm]["final_val_accuracy"].items():
            assert report["arms"][arm]["final_val_accuracy"][field] == (
                value if value is None or isinstance(value, int) else pytest.approx(value, abs=1e-9))
    assert paired["power"]["design"] == "paired" and paired["tests"]["paired"]["n_pairs"] >= 2
    assert paired["confounding"] == []
    rows, findings = arm_rows(report), finding_lines(report)
    table = RENDERERS["table"](report).splitlines()
    assert len(table) == len(rows) + 1 + 1 + len(findings) + 1 + len(report["warnings"]) + 1
    assert [line.split()[0] for line in table[1:len(rows) + 1]] == [r[0].split()[0] for r in rows]
    assert table[-1] == f"verdict: {report['verdict']['text']}" and all(line in table for line in findings)
    markdown = RENDERERS["markdown"](report).splitlines()
    assert markdown[0] == "## Spectral norm vs baseline (model_run_id = `independent`)"
    assert markdown[4:4 + len(rows)] == [f"| {a.strip()} | {b} | {c} |" for a, b, c in rows]
    assert markdown[-1] == f"**Verdict:** {report['verdict']['text']}"
    parsed = list(csv.reader(io.StringIO(RENDERERS["csv"](report))))
    assert parsed[0] == ["field", "value"] and len(parsed) == len(list(flatten(report))) + 1
    n = report["arms"]["spectral_norm"]["final_val_accuracy"]["n"]
    assert ["arms.spectral_norm.final_val_accuracy.n", str(n)] in parsed and n > 0

    env_vars = {**os.environ, "SNTRACK_DATABASE_URL": env.settings.database_url}
    command = [sys.executable, "-m", "sntrack", "report", "--run", "independent", "--min-effect", "0.005"]
    plot = tmp_path / "comparison.png"
    out = await asyncio.to_thread(subprocess.run, [*command, "--format", "json", "--plot", str(plot)],
                                  env=env_vars, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert shape(cli) == GOLDEN
    assert {k: v for k, v in cli.items() if k != "generated_at"} == {
        k: v for k, v in report.items() if k != "generated_at"}
    assert plot.stat().st_size > 1000
    assert out.stderr == f"wrote {plot}\n"  # flushed before the command's early exit (sntrack.cli._exit_now)
    # The command's forked worker (from 5,000 trials; here from any number) gives the same report.
    forking = ("import sys; import sntrack.commands.report as r; r.FORK_MIN_TRIALS = 0; from sntrack.cli import run; "
               "sys.argv[0] = 'sntrack'; run()")
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", forking, *command[3:], "--format", "json"],
                                  env=env_vars, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert {k: v for k, v in json.loads(out.stdout).items() if k != "generated_at"} == {
        k: v for k, v in report.items() if k != "generated_at"}


async def test_a_login_allowed_one_connection_gets_the_same_report(env):
    """`sntrack report` reads on two or three connections at once; a login at its connection limit reads everything
    on one, in turn, and reports the same; a login with no connection free is told so in one line."""
    await _apply(env, synthetic_study(16, 4, seed=9, producer=producer_info(), model_run_id="limited", paired=True))
    role, password = f"{env.database}_one", "one-connection"
    conn = await env.db()
    try:
        await conn.execute(f'CREATE ROLE "{role}" LOGIN PASSWORD \'{password}\' CONNECTION LIMIT 1; '
                           f'GRANT pg_read_all_data TO "{role}"; '
                           f'GRANT CONNECT ON DATABASE "{env.database}" TO "{role}"')
        outputs = []
        for url in (env.settings.database_url, with_login(env.settings.database_url, role, password)):
            for form in ("table", "json"):
                out = await asyncio.to_thread(
                    subprocess.run, [sys.executable, "-m", "sntrack", "report", "--run", "limited", "--format", form],
                    env={**os.environ, "SNTRACK_DATABASE_URL": url}, capture_output=True, text=True, timeout=60)
                assert (out.returncode, out.stderr) == (0, ""), out.stderr
                outputs.append(out.stdout if form == "table" else
                               {k: v for k, v in json.loads(out.stdout).items() if k != "generated_at"})
        await conn.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 0')  # no connection at all: one line, exit 2
        refused = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "sntrack", "report", "--run", "limited"],
            env={**os.environ, "SNTRACK_DATABASE_URL": with_login(env.settings.database_url, role, password)},
            capture_output=True, text=True, timeout=60)
    finally:
        await conn.execute(f'DROP OWNED BY "{role}"; DROP ROLE IF EXISTS "{role}"')
        await conn.close()
    assert outputs[:2] == outputs[2:] and outputs[1]["tests"]["paired"]["n_pairs"] >= 2
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == (f'sntrack: PostgreSQL has no connection free: too many connections for role "{role}"; '
                              "try again when fewer are open, or raise the limit\n")


async def _first_through_then_reset(host: str, port: int) -> asyncio.base_events.Server:
    """A TCP proxy to host:port that passes its first connection through and resets every later one at once."""
    accepted = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        if accepted > 1:
            writer.transport.abort()  # RST: what a pooler or a restarting server can do to a new connection
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
        await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_a_report_whose_second_connection_fails_reads_on_the_first(env):
    """A connection the report opens beside its first, refused in any way (here reset by a proxy that lets only the
    first through), leaves its read to the first: the same report, exit 0, nothing on stderr."""
    await _apply(env, synthetic_study(16, 4, seed=9, producer=producer_info(), model_run_id="flaky", paired=True))
    url = urllib.parse.urlsplit(env.settings.database_url)
    outputs = []
    for through_proxy in (False, True):
        proxy = await _first_through_then_reset(url.hostname, url.port or 5432) if through_proxy else None
        try:
            login = url.netloc.rpartition("@")[0]
            target = url if proxy is None else url._replace(
                netloc=f"{login}@127.0.0.1:{proxy.sockets[0].getsockname()[1]}" if login else
                f"127.0.0.1:{proxy.sockets[0].getsockname()[1]}")
            out = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sntrack", "report", "--run", "flaky", "--format", "json",
                env={**os.environ, "SNTRACK_DATABASE_URL": urllib.parse.urlunsplit(target)},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            stdout, stderr = await asyncio.wait_for(out.communicate(), timeout=60)
        finally:
            if proxy is not None:
                proxy.close()
        assert (out.returncode, stderr.decode()) == (0, "")
        outputs.append({k: v for k, v in json.loads(stdout).items() if k != "generated_at"})
    assert outputs[0] == outputs[1] and outputs[1]["tests"]["paired"]["n_pairs"] >= 2


def _trial(i: int, flag: bool, val: float | None, status: str = "completed") -> TrialRecord:
    return TrialRecord(f"t{i}", flag, status, val, None if val is None else val + 0.01, 1000.0, {"lr": 0.01})


def test_report_is_honest_with_too_few_or_identical_values():
    empty = build_report(ComparisonData([], None, []))
    assert shape(empty) == {p for p in GOLDEN if "[]." not in p}
    assert empty["verdict"]["text"].startswith("not enough trials") and empty["verdict"]["significant"] is None
    one_each = build_report(ComparisonData([_trial(1, True, 0.9), _trial(2, False, 0.8)], None, []))
    assert one_each["verdict"]["text"].startswith("not enough trials")
    assert one_each["difference"]["estimate"] == pytest.approx(0.1)
    same = build_report(ComparisonData([_trial(i, i % 2 == 0, 0.9) for i in range(6)], None, []))
    assert same["tests"]["welch_t"]["p_value"] is None
    assert same["verdict"]["test"] == "mann_whitney_u" and same["verdict"]["outcome"] == "equivalent"
    assert same["verdict"]["text"].startswith("equivalent within ±0.01: SN − baseline = +0.0000")
    for report in (empty, one_each, same):
        json.dumps(report, allow_nan=False)


def test_report_warns_about_pruning_and_confounding():
    trials = [TrialRecord(f"s{i}", True, "pruned" if i < 12 else "completed", 0.9 + i / 1000, 0.95, 900.0,
                          {"lr": 0.1, "hidden": 64}) for i in range(20)]
    trials += [TrialRecord(f"b{i}", False, "pruned" if i < 1 else "completed", 0.9 + i / 1000, 0.95, 800.0,
                           {"lr": 0.001 * (i + 1), "hidden": 256}) for i in range(20)]
    report = build_report(ComparisonData(trials, None, []))
    assert report["rates"]["pruned"]["differs"]
    differing = {c["hyperparam"] for c in report["confounding"] if c["differs"]}
    assert differing == {"lr", "hidden"}
    assert len(report["warnings"]) == 2
    assert report["training_time"]["overhead"] == pytest.approx(900 / 800 - 1)


def _pair(i: int, rng: random.Random, effect, sigma_sn: float = 1.0, run: str = "s", dataset: str = "digits"):
    """A complete pair sharing hyper-parameters; SN − baseline = effect(hyperparams) + noise."""
    hp = {"lr": 10 ** rng.uniform(-4, -1), "hidden": rng.choice([64, 128])}
    base = 0.9 + rng.gauss(0, 0.01)
    sn = base + effect(hp) + rng.gauss(0, 0.004)
    norms = {"layers.0": sigma_sn, "layers.1": sigma_sn}
    return [TrialRecord(f"{run}-p{i}-sn", True, "completed", sn, sn + 0.02, 1100.0, hp, f"{run}-p{i}-b", run, dataset,
                        3, norms),
            TrialRecord(f"{run}-p{i}-b", False, "completed", base, base + 0.02, 1000.0, dict(hp), None, run, dataset,
                        4, {"layers.0": 2.5, "layers.1": 3.0})]


def test_sn_that_helps_only_at_high_learning_rates_is_reported_as_such():
    rng = random.Random(3)
    trials = [t for i in range(120) for t in _pair(i, rng, lambda hp: 0.03 if hp["lr"] > 0.01 else 0.0)]
    report = build_report(ComparisonData(trials, None, []))
    where = report["where_it_helps"]
    assert where["exploratory"] and where["design"] == "paired"
    assert where["most_related"] == "lr" and where["related"] == ["lr"]
    lr = next(e for e in where["parameters"] if e["hyperparam"] == "lr")
    assert lr["test"] == "spearman" and lr["scale"] == "log10" and lr["statistic"] > 0.5
    low, *_, high = lr["buckets"]
    assert high["ci_low"] > 0.01  # the top learning-rate quartile gains clearly
    assert low["ci_low"] < 0 < low["ci_high"]  # the bottom one does not
    table = RENDERERS["table"](report)
    assert "where it helps (exploratory, paired" in table and "  lr (log10): Spearman ρ" in table


def test_a_secretly_unwrapped_spectral_norm_arm_fails_the_manipulation_check():
    rng = random.Random(4)
    honest = [t for i in range(10) for t in _pair(i, rng, lambda hp: 0.0)]
    unwrapped = [t for i in range(10) for t in _pair(i, rng, lambda hp: 0.0, sigma_sn=3.1)]
    ok = build_report(ComparisonData(honest, None, []))["manipulation"]
    assert ok["passed"] and ok["sn_trials_over_tolerance"] == 0
    assert [layer["median"] for layer in ok["spectral_norm"]["layers"]] == [1.0, 1.0]
    assert ok["baseline"]["lipschitz_bound"]["median"] == pytest.approx(7.5)
    report = build_report(ComparisonData(unwrapped, None, []))
    check = report["manipulation"]
    assert check["passed"] is False and check["sn_trials_over_tolerance"] == 10
    assert any(w.startswith("manipulation check: 10 of 10 spectral-norm trials") for w in report["warnings"])
    assert "manipulation check: FAILED" in RENDERERS["table"](report)
    assert "the arms may differ in more than the flag" in report["verdict"]["text"]
    # A baseline whose layers all sit at σ ≤ 1 looks normalized: the other half of the check.
    normalized_baseline = [TrialRecord(t.id, t.spectral_norm, t.status, t.val, t.train, t.duration_ms, t.hyperparams,
                                       t.paired_with, t.model_run_id, t.dataset, t.epochs_to_95,
                                       {"layers.0": 0.99, "layers.1": 1.0}) for t in honest]
    assert build_report(ComparisonData(normalized_baseline, None, []))["manipulation"][
        "baseline_trials_all_at_most_one"] == 10


def test_an_output_layer_left_unwrapped_on_purpose_is_not_a_failure():
    rng = random.Random(5)
    trials = []
    for t in (t for i in range(4) for t in _pair(i, rng, lambda hp: 0.0)):
        if t.spectral_norm:
            t = TrialRecord(t.id, True, t.status, t.val, t.train, t.duration_ms, {**t.hyperparams,
                            "sn_output_layer": False}, t.paired_with, t.model_run_id, t.dataset, t.epochs_to_95,
                            {"layers.0": 1.0, "layers.1": 4.0})
        trials.append(t)
    assert build_report(ComparisonData(trials, None, []))["manipulation"]["passed"]


def test_a_few_pairs_among_many_unpaired_trials_do_not_lead_and_their_disagreement_is_a_warning():
    rng = random.Random(6)
    pairs = [t for i in range(20) for t in _pair(i, rng, lambda hp: 0.02)]
    unpaired = [TrialRecord(f"u{i}", i % 2 == 0, "completed", 0.9 + rng.gauss(0, 0.02), 0.93, 1000.0,
                            {"lr": 10 ** rng.uniform(-4, -1), "hidden": 64}, None, "s", "digits")
                for i in range(3000)]
    report = build_report(ComparisonData(pairs + unpaired, None, []))
    assert report["design"]["primary"] == "independent" and report["power"]["design"] == "independent"
    assert report["primary"]["n_trials"] == 3040 and report["subset"]["design"] == "paired"
    assert report["subset"]["n_pairs"] == 20 and report["subset"]["significant"]
    assert report["difference"] == report["primary"]["difference"]
    assert report["verdict"]["n_trials"] == 3040 and "3,040 completed trials" in report["verdict"]["text"]
    assert report["verdict"]["disagreement"] and "Caution: the paired analysis over 20 complete pairs (40 trials) " \
        "disagrees" in report["verdict"]["text"]
    assert any(w.startswith("the paired analysis over 20 complete pairs") for w in report["warnings"])
    # The same pairs alone are the design, and lead.
    alone = build_report(ComparisonData(pairs, None, []))
    assert alone["design"]["primary"] == "paired" and alone["verdict"]["outcome"] == "better"
    assert alone["subset"]["design"] == "independent"


def test_three_way_verdict_and_the_minimum_effect():
    rng = random.Random(7)
    equal = [t for i in range(200) for t in _pair(i, rng, lambda hp: 0.0)]
    report = build_report(ComparisonData(equal, None, []))
    assert report["min_effect"] == 0.01 and report["verdict"]["outcome"] == "equivalent"
    assert report["equivalence"]["tost"]["p_value"] < 0.05 and report["equivalence"]["tost"]["design"] == "paired"
    assert report["equivalence"]["bayes_signed_rank"]["p_equivalent"] > 0.9
    assert "Achieved power" not in report["verdict"]["text"] and report["power"]["observed_caveat"]
    noisy = [t for i, d in enumerate((0.004, -0.003, 0.006, -0.001)) for t in _pair(i, rng, lambda hp, d=d: d)]
    small = build_report(ComparisonData(noisy, None, []), min_effect=0.002)
    assert small["verdict"]["outcome"] == "inconclusive"
    block = small["power"]["min_effect"]
    assert block["effect"] == 0.002 and small["verdict"]["additional"] == block["additional"] > 0
    assert f"About {block['additional']:,} more complete pairs" in small["verdict"]["text"]
    worse = build_report(ComparisonData([t for i in range(30) for t in _pair(i, rng, lambda hp: -0.02)], None, []))
    assert worse["verdict"]["outcome"] == "worse" and worse["verdict"]["text"].startswith("worse: ")
    assert worse["equivalence"]["aso"]["epsilon_min"] > 0.5


def test_strata_are_pooled_by_inverse_variance_and_sign_disagreement_is_a_warning():
    rng = random.Random(8)
    trials = [t for i in range(30) for t in _pair(i, rng, lambda hp: 0.02, run="a", dataset="wine")]
    trials += [t for i in range(30) for t in _pair(i, rng, lambda hp: -0.02, run="b", dataset="digits")]
    report = build_report(ComparisonData(trials, None, []))
    strata = report["strata"]
    assert [(i["model_run_id"], i["dataset"]) for i in strata["items"]] == [("a", "wine"), ("b", "digits")]
    assert strata["signs_disagree"] and strata["pooled"]["i_squared"] > 0.9 and strata["significant_strata"] == 2
    assert any("strata (search × dataset) disagree in the sign" in w for w in report["warnings"])
    assert all(i["p_holm"] >= i["p_value"] for i in strata["items"])


def test_durations_compare_twins_as_a_positive_ratio():
    rng = random.Random(9)
    trials = [t for i in range(10) for t in _pair(i, rng, lambda hp: 0.0)]
    ratio = build_report(ComparisonData(trials, None, []))["training_time"]["ratio"]
    assert ratio["design"] == "paired twins" and ratio["estimate"] == pytest.approx(1.1) and ratio["n"] == 10


def _cli(env, *args: str) -> subprocess.CompletedProcess:
    env_vars = {**os.environ, "SNTRACK_DATABASE_URL": env.settings.database_url}
    return subprocess.run([sys.executable, "-m", "sntrack", "report", *args], env=env_vars, capture_output=True,
                          text=True, timeout=60)


async def test_unknown_scope_missing_plot_folder_and_lagging_consumers_through_the_cli(env, tmp_path):
    study = synthetic_study(12, 3, seed=8, producer=producer_info(), model_run_id="wine-study", paired=True)
    await _apply(env, study)
    conn = await env.db()
    try:  # a second search whose events reached the journal only: its consumers never ran
        lagging = synthetic_study(6, 2, seed=9, producer=producer_info(), model_run_id="lagging-study")
        await apply_events(conn, PROJECTIONS["journal"], [e for trial in lagging for e in trial])
    finally:
        await conn.close()

    for args, message in (
            (("--run", "wine-stduy"),
             "sntrack: unknown search --run 'wine-stduy': did you mean wine-study, lagging-study?"),
            (("--dataset", "digts"), "sntrack: unknown dataset --dataset 'digts': did you mean digits?"),
            (("--run", "wine-study", "--plot", str(tmp_path / "missing" / "x.png")),
             f"sntrack: --plot: the folder '{tmp_path / 'missing'}' does not exist")):
        out = await asyncio.to_thread(_cli, env, *args)
        assert (out.returncode, out.stdout, out.stderr) == (2, "", message + "\n")

    out = await asyncio.to_thread(_cli, env, "--run", "lagging-study", "--format", "json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["journal_trials"] == 6 and report["verdict"]["outcome"] == "not_enough_data"
    assert report["warnings"][0].startswith("the consumers are behind or not running: the journal holds 6 trials "
                                            "for this scope, the read model 0 (6 not applied yet)")


def test_plot_bands_stay_in_range_and_the_title_names_scope_and_n(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from consumers.report import plot
    from consumers.report.snapshot import CurvePoint

    rng = random.Random(10)
    trials = [t for i in range(12) for t in _pair(i, rng, lambda hp: 0.01 if hp["lr"] > 0.01 else 0.0)]
    curves = [CurvePoint(flag, e, n, mean, 0.5, e * 2.0) for flag in (True, False)
              for e, n, mean in ((0, 2, 0.5), (1, 3, 0.97), (2, 12, 0.9))]
    data = ComparisonData(trials, None, curves, "wine-study", "wine")
    report = build_report(data)
    fig, ax = plt.subplots()
    plot._curves(ax, report, "epoch", "epoch")
    for band in ax.collections:  # one band per arm, from epochs with n ≥ 3 only, inside [0, 1]
        ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
        xs = np.concatenate([p.vertices[:, 0] for p in band.get_paths()])
        assert ys.min() >= 0 and ys.max() <= 1 and xs.min() >= 1
    assert len(ax.collections) == 2
    plt.close(fig)
    assert plot._title(report).startswith(
        "Spectral norm vs baseline — study wine-study, dataset wine; paired analysis, n = 24 trials")
    path = plot.plot_report(data, report, tmp_path / "figure.svg")
    assert path.stat().st_size > 10_000
