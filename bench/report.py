"""Render bench results (the JSON of bench/__main__.py) as the markdown table the README links."""

from __future__ import annotations


def _ms(d: dict) -> str:
    return f"{d['p50']:.1f} / {d['p95']:.1f} / {d.get('p99', float('nan')):.1f}" if d.get("p50") is not None else "–"


def _signed(value: float) -> str:
    return f"+ {value}" if value >= 0 else f"− {-value}"


def _delta(d: dict) -> str:
    return f"p95 {_signed(d['p95'])} ms, p99 {_signed(d['p99'])} ms"


def _pipeline(r: dict) -> list[str]:
    lines = ["## Pipeline (`sntrack consume` daemons)", "",
             "Latency: publish → `trials` row committed, with the journal and trials consumers as two daemons (one "
             "per consumer), and beside them as one daemon running both (its own vhost and database), each measured "
             "in alternating turns with the baseline. Throughput: journal, trials and comparison consumers, until "
             "all three applied everything. The durable floor, in the same turns: the raw consume, and per consumer "
             "each batch of what has arrived written in one INSERT, its own transaction (one round trip, one durable "
             "commit), then acked; what any consumer that keeps what it acks pays.", "",
             "| figure | sntrack | baseline: raw aio-pika publish→consume | difference | target |",
             "|---|---|---|---|---|"]
    for rate, row in r["latency"].items():
        target = "p95 ≤ raw + 3 ms, p99 ≤ raw + 6 ms" if rate == "500" else ""
        load = " / ".join(map(str, row["load_avg_1m"]))
        lines += [f"| e2e latency at {rate} events/s, p50 / p95 / p99 ms, one daemon per consumer (1-minute load "
                  f"{load}) | {_ms(row['pipeline_ms'])} | {_ms(row['raw_ms'])} | {_delta(row['pipeline_delta_ms'])} "
                  f"| {target} |",
                  f"| the same, one daemon for both | {_ms(row['one_process_ms'])} | (same turns) | "
                  f"{_delta(row['one_process_delta_ms'])} | |"]
        if "floor_ms" in row:  # from this benchmark's runs since 2026-12-08
            lines.append(f"| the durable floor at {rate} events/s: one INSERT and commit per batch | "
                         f"{_ms(row['floor_ms'])} | (same turns) | {_delta(row['floor_delta_ms'])} | |")
    tp = r["throughput"]
    consumers = "+".join(tp["consumers"])
    lines += [f"| sustained events/s ({tp['events']} events; {consumers}, one daemon per consumer; 1-minute load "
              f"{' / '.join(map(str, tp['load_avg_1m']))}) | {tp['pipeline_events_per_s']:,} | "
              f"{tp['raw_events_per_s']:,} | {tp['pipeline_ratio']:.0%} | ≥ 90% |",
              f"| the same, one daemon for all three | {tp['one_process_events_per_s']:,} | (same run) | "
              f"{tp['one_process_ratio']:.0%} | |"]
    if "floor_events_per_s" in tp:
        lines.append(f"| the durable floor, three consumers: one INSERT and commit per batch each | "
                     f"{tp['floor_events_per_s']:,} | (same run) | {tp['floor_ratio']:.0%} | |")
    rp = r["replay"]
    lines.append(f"| replay of `trials`, events/s ({rp['events']} events) | {rp['events_per_s']:,} "
                 "| – | – | ≥ 50,000 |")
    floors = [(rate, row) for rate, row in r["latency"].items() if "floor_ms" in row]
    if floors:
        lines += ["", "sntrack above the durable floor, same turns: " + "; ".join(
            f"at {rate} events/s one daemon per consumer {_delta(row['pipeline_over_floor_ms'])}, one daemon for "
            f"both {_delta(row['one_process_over_floor_ms'])}" for rate, row in floors)
            + f". Throughput: {tp['pipeline_of_floor']:.0%} of the floor as one daemon per consumer, "
            f"{tp['one_process_of_floor']:.0%} as one daemon for all."]
    lines += ["", f"CPU the consumer daemons used per event during the throughput runs, on {r['cpus']} CPUs: "
              f"{tp['pipeline_cpu_ms_per_event']} ms as one daemon per consumer, {tp['one_process_cpu_ms_per_event']} "
              "ms as one daemon for all" + (f"; the durable floor's daemon {tp['floor_cpu_ms_per_event']} ms."
                                            if "floor_cpu_ms_per_event" in tp else ".")]
    if "one_process_profile" in tp:
        lines += _profile(tp["one_process_profile"])
    for rate, row in r["latency"].items():
        b = row["breakdown"]
        lines += ["", f"Where an event's time goes at {rate} events/s, one daemon per consumer (the trials daemon's "
                  f"stage stamps, SNTRACK_STAGE_LOG; batches of {b['batch_size']['mean']} events on average, at most "
                  f"{b['batch_size']['max']}; the means add up, the percentiles do not):", "",
                  "| stage | mean ms | p50 / p95 / p99 ms |", "|---|---|---|"]
        lines += [f"| {label} | {part['mean']:.3f} | {_ms(part)} |" for label, part in b["stages"].items()]
    return lines


def _profile(p: dict) -> list[str]:
    lines = ["", f"Where the one daemon's CPU goes while it applies {p['events']:,} events as fast as they come "
             f"(py-spy, {p['rate_hz']} samples/s of its running threads, {p['samples']:,} samples; a pass of its "
             "own, after the measured ones):", "", "| running, by the innermost frame | % of samples |", "|---|---|"]
    lines += [f"| {name} | {pct} |" for name, pct in p["parts_pct"].items()]
    lines += ["", "| sntrack's step anywhere on the stack (they nest) | % of samples |", "|---|---|"]
    lines += [f"| {name} | {pct} |" for name, pct in p["steps_pct"].items()]
    lines += ["", "| innermost function | % of samples |", "|---|---|"]
    lines += [f"| `{leaf}` | {pct} |" for leaf, pct in p["top_pct"]]
    return lines


def _comparison(r: dict) -> list[str]:
    return ["## Comparison query", "",
            "| figure | sn_comparison | baseline: GROUP BY over trials | target |", "|---|---|---|---|",
            f"| {r['trials']:,} trials, p50 / p95 ms | {r['sn_comparison_ms']['p50']:.2f} / "
            f"{r['sn_comparison_ms']['p95']:.2f} | {r['group_by_trials_ms']['p50']:.2f} / "
            f"{r['group_by_trials_ms']['p95']:.2f} | p95 ≤ {r['target_p95_ms']} ms |"]


def _mlflow(r: dict) -> list[str]:
    startup = f" (temporary server, healthy after {r['server_startup_s']} s)" if r.get("server_startup_s") else ""
    lines = [f"## MLflow sync{startup}", "",
             "| figure | sntrack | baseline: the same REST calls, bare, same client and server | ratio | target |",
             "|---|---|---|---|---|",
             f"| stop published → tags, metrics, status in MLflow, p50 / p95 / p99 ms (baseline: log-batch and "
             f"runs/update together) | {_ms(r['sync_ms'])} | {_ms(r.get('bare_stop_ms', {}))} | "
             f"p95 × {r['p95_ratio']:.2f} | p95 ≤ 2× and < 500 ms |"]
    if b := r.get("backlog"):
        lines.append(f"| backlog of {b['trials']:,} trials without run ids ({b['events']:,} events), trials/s "
                     f"(baseline: search, create, log-batch ∥ update per trial, {b['concurrency']} trials at a time) "
                     f"| {b['consumer_trials_per_s']:,} ({b['consumer_s']} s) | {b['bare_trials_per_s']:,} "
                     f"({b['bare_s']} s) | {b['ratio']:.0%} | ≥ 70% |")
    if s := r.get("stop"):
        lines.append(f"| graceful stop: SIGTERM → exit of `sntrack consume mlflow` with a {s['trials']:,}-trial "
                     f"backlog, s ({s['left_unsynced']:,} events left unacked, then synced by a restart) | "
                     f"{s['stop_s']} | – | – | ≤ 5 s |")
    if c := r.get("curves"):
        lines.append(f"| curves: {c['trials']} trials × up to {c['epochs']} epochs ({c['events']:,} events) published "
                     f"at once → synced, s (baseline: one bare log-batch per trial) | {c['consumer_s']} | "
                     f"{c['bare_log_batch_s']} | × {c['ratio_to_bare']} | |")
    if "load_avg_1m" in r:
        lines += ["", f"1-minute load average before / after: {' / '.join(map(str, r['load_avg_1m']))} on "
                  f"{r['cpus']} CPUs."]
    return lines


def _training(r: dict) -> list[str]:
    if "per_epoch_us" not in r:  # a result of the earlier method, kept by --only
        return ["## Training overhead", "", "A result of the earlier method: rerun `python -m bench --only training`."]
    trial, load, b = r["trial"], r["load_avg_1m"], r["per_epoch_us"]

    def ci(arm: dict, key: str) -> str:
        low, high = arm[f"{key}_pct_ci95"]
        return f"{arm[f'{key}_pct']:+.1f}% ({low:+.1f}% … {high:+.1f}%)"

    lines = [f"## Training overhead ({trial['epochs']}-epoch {trial['dataset']} MLP, same seed, "
             f"{r['repetitions']} interleaved paired repetitions)", "",
             "| arm | median ms | wall vs no tracking: median paired ratio (95% CI) | training thread CPU ms | "
             "its CPU vs no tracking (95% CI) | tracking threads' CPU ms per trial |", "|---|---|---|---|---|---|"]
    sn = r["spectral_norm_vs_baseline"]
    for name, arm in [*r["arms"].items(), ("spectral-norm arm, no tracking (finding, not a target)", sn)]:
        lines.append(f"| {name} | {arm['median_ms']} | {ci(arm, 'overhead')} | {arm['train_cpu_ms']} | "
                     f"{ci(arm, 'train_cpu_overhead')} | {arm['tracking_cpu_ms_per_trial']} |")
    pub = r["publisher_thread"]
    lines += ["", f"Training-thread CPU per epoch ({b['trials']} instrumented trials of the "
              f"{'events + MLflow' if b['mlflow'] else 'events'} arm), µs: singular-value meter "
              f"{b['singular_value_meter_us']}, event build {b['event_build_us']}, publish hand-off "
              f"{b['publish_hand_off_us']}, rest of the recorder (MLflow hand-off) {b['rest_of_recorder_us']}; "
              f"the epoch itself (no tracking) {b['epoch_cpu_ms']} ms.",
              f"Publisher thread: {pub['cpu_us_per_event']} µs of CPU per event ({pub['events']:,} events).",
              f"Target: events + MLflow as shipped ≤ {r['target_overhead_pct']}% over no tracking. 1-minute load "
              f"average before / after: {' / '.join(map(str, load))} on {r['cpus']} CPUs."]
    if "mlflow" in r:
        lines.append(f"MLflow arms: {r['mlflow']}.")
    return lines


def _report(r: dict) -> list[str]:
    q = r["query_ms"]
    return [f"## `sntrack report` ({r['trials']:,} trials, {r['curve_rows']:,} curve rows, {r['design']} design, "
            f"{r['pairs']:,} pairs)", "",
            "| figure | seconds | target |", "|---|---|---|",
            f"| `sntrack report`, a fresh process, end to end (median of {len(r['cli_samples_s'])}: "
            f"{', '.join(map(str, r['cli_samples_s']))}) | {r['cli_s']} | ≤ {r['target_s']} s |",
            f"| of which interpreter start and the command's imports (`python -c 'import …'`) | "
            f"{r['interpreter_and_cli_imports_s']} | |",
            f"| then the statistics' imports (numpy, scipy.special's compiled functions, the report's modules; in a "
            f"thread, beside the read) | {r['statistics_imports_s']} | |",
            f"| what scipy.stats would add to scipy.special (not imported over more than 50 pairs) | "
            f"{r['scipy_stats_over_special_s']} | |",
            f"| in process: connect, load, build, render | {r['in_process_s']} | |",
            f"| load: the trials (rows of arrays, their curve summaries included; hyper-parameters and σ on "
            f"{r['helpers']} side connection), the comparison rows, in one snapshot | {r['load_s']} | |",
            f"| `sntrack report --format json`, a fresh process (it adds the mean learning curves, a scan of every "
            f"epoch; median of {len(r['cli_json_samples_s'])}: {', '.join(map(str, r['cli_json_samples_s']))}) | "
            f"{r['cli_json_s']} | |",
            f"| its load, the curves read on {r['curve_helpers']} more side connection | "
            f"{r['load_with_curves_s']} | |",
            f"| the same load on one connection, the queries in turn | {r['load_one_connection_s']} | |",
            f"| build_report after load, in this benchmark's process | {r['build_s']} | |",
            *([f"| build_report after load in a fresh interpreter, in one process / with its forked child, as the "
               f"command builds it (median of {r['build_fresh_runs']}) | {r['build_fresh_s']} / "
               f"{r['build_forked_s']} | |"] if "build_forked_s" in r else []),
            f"| baseline: build_report from data already in memory | {r['in_memory_build_s']} | |",
            "", "Queries alone, one after the other, ms: " + ", ".join(f"{k} {v}" for k, v in q.items()) + ".",
            *([f"1-minute load average before / after: {r['load_avg_1m'][0]} / {r['load_avg_1m'][1]} on {r['cpus']} "
               "CPUs."] if "load_avg_1m" in r else [])]


def _gateway(r: dict) -> list[str]:
    lat, tp, split = r["latency"], r["throughput"], r["latency"]["split_ms"]
    met = {True: "met", False: "missed"}

    def row(label: str, part: dict) -> str:
        return f"| {label} | {part['mean']:.2f} | {part['p50']:.2f} / {part['p95']:.2f} / {part['p99']:.2f} |"

    return ["## Gateway (HTTP ingest, `sntrack gateway` as its own process)", "",
            "| figure | gateway | baseline | difference | target |", "|---|---|---|---|---|",
            f"| latency at {lat['rate']} events/s, one event a request, p50 / p95 / p99 ms: POST → 202 vs direct "
            f"AMQP publish-with-confirm, in turns of {lat['turn']} events | {_ms(lat['gateway_ms'])} | "
            f"{_ms(lat['direct_ms'])} | "
            f"p95 + {lat['p95_delta_ms']} ms | p95 ≤ direct + 2 ms ({met[lat['target_met']]}) |",
            f"| throughput, NDJSON {tp['batch']} events a request ({tp['events']:,} events, {tp['in_flight']} in "
            f"flight) vs the direct publisher, events/s | {tp['gateway_events_per_s']:,} | "
            f"{tp['publisher_events_per_s']:,} | {tp['ratio']:.0%} | ≥ 80% ({met[tp['target_met']]}) |",
            "", "Where a POST's time goes (each request's Server-Timing header; the means add up, the percentiles "
            "do not):", "",
            "| ms | mean | p50 / p95 / p99 |", "|---|---|---|",
            row("POST → 202, as the client measured it", split["post_to_202"]),
            row("in the gateway: the gate (split, validate, stamp)", split["gate"]),
            row("in the gateway: awaiting the broker's confirm", split["confirm"]),
            row("the rest: HTTP both ways, uvicorn, Starlette, the token check, the client, waits for a CPU",
                split["rest"]),
            row("baseline: direct publish-with-confirm, the other turns", split["direct"]),
            "", f"The gateway process used {lat['gateway_cpu_ms_per_request']} ms of CPU per request "
            f"({lat['gateway_cpu_ms_per_request'] * lat['rate'] / 1000:.2f} of a CPU at {lat['rate']} requests/s); "
            f"1-minute load average before / after: {' / '.join(map(str, lat['load_avg_1m']))} on {lat['cpus']} "
            "CPUs. When the CPU the gateway gets falls toward what it needs, requests queue before the gateway "
            "reads them (the rest grows) and its confirms come back later (the confirm stage includes the event "
            "loop's lag)."]


def _dashboard(r: dict) -> list[str]:
    return [f"## Dashboard update lag (headless Chromium {r['chromium']}, {r['events']:,} metric events at "
            f"{r['rate']:.0f} events/s over {r['trials']} trials)", "",
            "| figure | p50 / p95 / p99 ms | target |", "|---|---|---|",
            f"| published → visible in the DOM ({r['dom_lag_ms']['n']:,} events observed) | {_ms(r['dom_lag_ms'])} | "
            f"p95 ≤ {r['target_p95_ms']:.0f} ms |",
            f"| of which published → projection committed (NOTIFY heard) | {_ms(r['commit_ms'])} | |",
            f"| of which published → push received by a plain SSE client | {_ms(r['pushed_ms'])} | |"
            if "pushed_ms" in r else "",
            f"| baseline: raw aio-pika publish → consume, same rate | {_ms(r['raw_ms'])} | |",
            "", f"DOM p95 = {r['p95_ratio']} × raw p95; browser console errors: {len(r['console_errors'])}; "
            f"1-minute load average before / after: {' / '.join(map(str, r.get('load_avg_1m', [])))} on "
            f"{r.get('cpus')} CPUs.",
            f"NOTIFY on the consumer path: a {r['notify_cost']['batch']}-event `trials` batch takes "
            f"{r['notify_cost']['batch_ms']['p50']:.2f} ms (p50) as shipped, of which the NOTIFY, sent by the "
            f"bookkeeping statement, {r['notify_cost']['notify_ms_p50']:.3f} ms (the same batch without it, "
            "interleaved)."]


def _rebuild(r: dict) -> list[str]:
    during, base = r["rebuild_ms"], r["baseline_ms"]
    return [f"## Reader stall during a rebuild ({r['trials']:,} trials, {r['journal_events']:,} journal events, "
            f"under a live stream of {r['stream_rate']:.0f} events/s)", "",
            "The reader loops the dashboard's trial list (newest 200 trials with their latest epoch) back to back "
            "while `sntrack replay trials` rebuilds and swaps; the stream runs through `sntrack consume journal` and "
            "`sntrack consume trials`.", "",
            "| figure | during the rebuild | baseline: same stream, no rebuild |", "|---|---|---|",
            f"| longest reader stall, ms | {during['max']:.1f} | {base['max']:.1f} |",
            f"| reads, p50 / p95 / p99 ms | {_ms(during)} | {_ms(base)} |",
            f"| reads | {during['n']:,} | {base['n']:,} ({r['baseline_s']:g} s) |",
            "", f"The swap held its locks {r['swap_locks_ms']} ms. `sntrack replay`: {r['replay']}. "
            f"{r['rebuilt_trials']:,} trials rebuilt; {r['streamed_events']:,} events streamed meanwhile. "
            f"1-minute load average before / after: {' / '.join(f'{x:.1f}' for x in r['load_avg_1m'])} on "
            f"{r['cpus']} CPUs."]


def _catchup(r: dict) -> list[str]:
    sub, rp = r["subscriber"], r["replay"]
    return [f"## Catch-up of a new subscriber ({r['journal_events']:,} journal events)", "",
            "| figure | events | seconds | events/s |", "|---|---|---|---|",
            f"| `sntrack subscribe NAME --from-start --jsonl FILE`: bind, read the journal, deliver each event as a "
            f"flushed JSON line, until live | {sub['events']:,} | {sub['seconds']} | {sub['events_per_s']:,} |",
            f"| baseline: `sntrack replay trials` over the same journal | {rp['events']:,} | {rp['seconds']} | "
            f"{rp['events_per_s']:,} |",
            "", f"Catch-up / replay = {r['ratio']} on {r['cpus']} CPUs; 1-minute load average before / after: "
            f"{' / '.join(map(str, r['load_avg_1m']))}."]


def _replay(r: dict) -> list[str]:
    copy = r["copy"]
    lines = [f"## Replay throughput ({r['journal_events']:,} journal events)", "",
             "| projection | set-based (as shipped), events/s | baseline: event by event through `project`, events/s "
             "| speed-up | target |", "|---|---|---|---|---|"]
    for name, p in r["projections"].items():
        fast, slow = p["set_based"], p["project"]
        lines.append(f"| `sntrack replay {name}` | {fast['events_per_s']:,} ({fast['seconds']} s, swap "
                     f"{fast['swap_ms']} ms) | {slow['events_per_s']:,} ({slow['seconds']} s) | {p['speedup']}× | "
                     f"≥ {r['target_events_per_s']:,} |")
    return lines + ["", f"Baseline, same rows: COPY into the journal moved {copy['rows_per_s']:,} rows/s "
                        f"({copy['rows']:,} rows in {copy['seconds']} s). 1-minute load average before / after each "
                        f"projection: {' / '.join(map(str, r['load_avg_1m']))} on {r['cpus']} CPUs."]


SECTIONS = {"pipeline": _pipeline, "comparison": _comparison, "mlflow": _mlflow, "training": _training,
            "report": _report, "gateway": _gateway, "dashboard": _dashboard, "rebuild": _rebuild, "catchup": _catchup,
            "replay": _replay}


LOOP_STEPS = 5_000_000  # bench/__main__.py times this loop before each benchmark: runs on days of a slower host differ


def render_markdown(results: dict) -> str:
    lines = [f"# Benchmark results — {results['started_at']} on {results['host']}"
             + (" (quick)" if results.get("quick") else ""), "",
             "Every figure is printed beside a baseline measured in the same run on the same machine.", ""]
    for name, result in results["benchmarks"].items():
        if "error" in result:
            lines += [f"## {name}", "", f"failed: `{result['error']}`"]
        else:
            try:
                lines += SECTIONS[name](result)
            except KeyError:
                if not result.get("from_run"):
                    raise
                # kept from a run (--only) of an earlier version of this benchmark, whose figures it no longer reads
                lines += [f"## {name}", "", "Kept from a run of an earlier version of this benchmark, in a form this "
                          f"version does not read: rerun `python -m bench --only {name}`."]
        origin = f", from the run of {result['from_run']}" if result.get("from_run") else ""
        speed = (f"; a {LOOP_STEPS:,}-step Python loop took {result['loop_s']} s just before it"
                 if "loop_s" in result else "")
        lines += ["", f"({name}: {result['wall_s']} s{origin}{speed})", ""]
    return "\n".join(lines)
