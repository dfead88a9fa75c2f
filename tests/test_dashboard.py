"""The live dashboard in headless Chromium against the real broker, consumers and PostgreSQL (issue 13)."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
import uuid

import aiohttp
import asyncpg
import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.keys import Keys

from bench.browser import available, chromium
from bench.dashboard_bench import publish_paced
from consumers.dashboard.app import DashboardConfig, running_dashboard
from consumers.dashboard.hub import MAX_PENDING, Client
from consumers.persistence import READ_MODEL_CHANNEL, apply_events
from consumers.registry import PROJECTIONS
from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study, synthetic_trial
from sntrack.commands.dashboard import queue_reader
from tests.conftest import wait_until
from tests.test_end_to_end import cli_env

CONSUMERS = ["journal", "trials", "comparison"]
browser_needed = pytest.mark.skipif(not available(), reason="needs chromium and chromedriver: run infra/browser.sh")


@pytest.fixture(scope="module")
def browser():
    if not available():
        pytest.skip("needs chromium and chromedriver: run infra/browser.sh")
    with chromium() as driver:
        yield driver


def js(driver, script: str, *args):
    return asyncio.to_thread(driver.execute_script, script, *args)


def a_trial(spectral_norm: bool, epochs: int, model_run_id: str = "dash-study") -> list:
    """A completed synthetic trial with the given flag (synthetic_trial draws both at random)."""
    for seed in range(1000):
        events = synthetic_trial(random.Random(seed), model_run_id, producer_info(), epochs)
        if events[0].payload.spectral_norm is spectral_norm and events[-1].payload.status == "completed":
            return events
    raise AssertionError("no such synthetic trial")


async def open_page(driver, url: str) -> None:
    await asyncio.to_thread(driver.get, url)
    await wait_until(lambda: js(driver, "return document.getElementById('live').textContent === 'live'"),
                     what="the page to be live")


def row_state(driver, trial_id: str):
    return js(driver, """const tr = document.getElementById('trial-' + arguments[0]);
        return tr && {table: tr.closest('table').id, status: tr.dataset.status, epoch: tr.dataset.epoch};""", trial_id)


@browser_needed
async def test_a_published_trial_appears_under_its_constraint_and_completes_without_reload(env, browser, tmp_path):
    events = a_trial(spectral_norm=True, epochs=6)
    trial_id, last_epoch = events[0].trial_id, str(events[-2].payload.epoch)
    config = DashboardConfig(env.settings.database_url, queues=queue_reader(env.settings))
    async with running_consumers(env.settings.consumer(), CONSUMERS), running_dashboard(config) as url:
        await open_page(browser, url)
        await js(browser, "window.__sameDocument = true")
        queues = "return [...document.querySelectorAll('#queues tbody th')].map(th => th.textContent)"
        await wait_until(lambda: _contains(js(browser, queues), "sntrack.trials", "sntrack.trials.dlq"),
                         what="the queue table")
        await env.publish_events(events[:-1])
        running = await wait_until(lambda: row_state(browser, trial_id), what="the trial's row")
        assert running["table"] == "trials-spectral_norm"
        await wait_until(lambda: _has(row_state(browser, trial_id), status="running", epoch=last_epoch),
                         what="the running trial at its last epoch")
        await env.publish_events(events[-1:])
        await wait_until(lambda: _has(row_state(browser, trial_id), status="completed"), what="completed")
        assert await js(browser, "return window.__sameDocument === true"), "the page was reloaded"
        assert await js(browser, "return document.querySelectorAll('#trials-baseline tbody tr').length") == 0

        await asyncio.to_thread(_press_enter_on, browser, f"#trial-{trial_id} a.open")  # usable with the keyboard
        await wait_until(lambda: js(browser, "return document.querySelectorAll('#detail .uplot').length === 2"),
                         what="learning curve and singular value charts")
        await asyncio.to_thread(browser.set_window_size, 375, 800)  # a phone-sized window: nothing sticks out
        try:
            await wait_until(lambda: js(browser, "return document.documentElement.scrollWidth <= window.innerWidth"),
                             timeout=5, what="no horizontal scrolling at 375 px")
        except AssertionError:
            wide = await js(browser, """return [...document.querySelectorAll('body *')].filter(e =>
                !e.closest('.scroll') && e.getBoundingClientRect().right > window.innerWidth)
                .slice(0, 8).map(e => `${e.tagName}#${e.id} ${Math.round(e.getBoundingClientRect().right)}`)""")
            raise AssertionError(f"wider than the window: {wide}") from None
        finally:
            await asyncio.to_thread(browser.set_window_size, 1280, 1600)
        shot = tmp_path / "dashboard.png"
        assert await asyncio.to_thread(browser.save_screenshot, str(shot))
        assert shot.stat().st_size > 10_000
        errors = [entry for entry in await asyncio.to_thread(browser.get_log, "browser") if entry["level"] == "SEVERE"]
        assert errors == []


def _press_enter_on(driver, selector: str) -> None:
    for _ in range(5):  # a push may re-render the row between finding the link and typing
        try:
            driver.find_element("css selector", selector).send_keys(Keys.ENTER)
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"{selector} kept being re-rendered")


async def _contains(coro, *wanted: str) -> bool:
    return set(wanted) <= set(await coro)


async def _has(state_coro, **wanted) -> bool:
    state = await state_coro
    return bool(state) and all(state[k] == v for k, v in wanted.items())


def _lookup(report: dict, path: str):
    for key in path.split("."):
        report = report.get(key) if isinstance(report, dict) else None
    return report


@browser_needed
async def test_the_verdict_panel_shows_the_numbers_of_sntrack_report_json(env, browser):
    study = synthetic_study(24, 5, producer=producer_info(), seed=11, paired=True, model_run_id="dash-verdict")
    events = [e for trial in study for e in trial]
    stops = sum(e.event_type == "ml.run.stop" for e in events)
    async with running_consumers(env.settings.consumer(), CONSUMERS), \
            running_dashboard(DashboardConfig(env.settings.database_url)) as url:
        await open_page(browser, url)
        await env.publish_events(events)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM applied_events WHERE projection = "
                                              "'comparison'", stops), what="comparison caught up")
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM applied_events WHERE projection = 'trials'",
                                              len(events)), what="trials caught up")
        run = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "sntrack", "report", "--format", "json"],
                                      env=cli_env(env), capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        expected = json.loads(run.stdout)
        shown_js = """return [...document.querySelectorAll('#verdict-body [data-path]')].map(el =>
            [el.dataset.path, el.tagName === 'TD', el.tagName === 'TD' ? el.dataset.value : el.textContent]);"""

        async def mismatches():
            shown = await js(browser, shown_js)
            assert len(shown) >= 30
            return [(path, value, _lookup(expected, path)) for path, is_figure, value in shown
                    if (json.loads(value or "null") if is_figure else value) != _lookup(expected, path)]

        try:
            await wait_until(lambda: _empty(mismatches()), timeout=60, what="the verdict panel to match")
        except AssertionError:
            raise AssertionError(f"verdict panel differs from the report: {await mismatches()}") from None
        assert expected["arms"]["spectral_norm"]["trials"]["completed"] > 0


async def _empty(coro) -> bool:
    return not await coro


@browser_needed
@pytest.mark.alone  # a 1,000 ev/s publisher and 100 ms click bounds: not beside the parallel suite
async def test_a_1000_events_per_second_metric_flood_leaves_the_page_responsive(env, browser):
    trials = [synthetic_trial(random.Random(n), "dash-flood", producer_info(), 260) for n in range(20)]
    starts = [t[0] for t in trials]
    metrics = sorted((e for t in trials for e in t if e.event_type == "ml.run.metric"), key=lambda e: e.seq)[:5000]
    last = {}
    for event in metrics:
        last[event.trial_id] = str(event.payload.epoch)
    # The consumers run as their own process, as deployed: in this process they starved the publisher of its loop.
    daemon = await asyncio.create_subprocess_exec(sys.executable, "-m", "sntrack", "consume", *CONSUMERS,
                                                  env=cli_env(env), stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL)
    try:
        await _flood(env, browser, starts, metrics, last)
    finally:
        daemon.terminate()
        await asyncio.wait_for(daemon.wait(), 60)


async def _flood(env, browser, starts: list, metrics: list, last: dict) -> None:
    async with running_dashboard(DashboardConfig(env.settings.database_url)) as url:
        await open_page(browser, url)
        await env.publish_events(starts)
        await wait_until(lambda: js(browser, "return document.querySelectorAll('table.trials tbody tr').length === 20"),
                         what="20 rows", timeout=60)
        await js(browser, """window.__clicks = [];
            document.querySelector('h1').addEventListener('click',
                (e) => window.__clicks.push(performance.now() - e.timeStamp));""")
        heading = await asyncio.to_thread(browser.find_element, "css selector", "h1")

        async def click_repeatedly(stop: asyncio.Event):
            while not stop.is_set():
                await asyncio.to_thread(heading.click)
                await asyncio.sleep(0.25)

        stop = asyncio.Event()
        clicker = asyncio.create_task(click_repeatedly(stop))
        started = time.monotonic()
        await publish_paced(env.settings, metrics, rate=1000)  # confirmed, about 4.5 s
        publish_s = time.monotonic() - started
        stop.set()
        await clicker
        clicks = await js(browser, "return window.__clicks")
        print(f"flood: {len(metrics)} events in {publish_s:.2f} s; click delays ms {sorted(clicks)}")
        # Paced at 1,000/s: at least half of it, or the test did not test a flood. A WebDriver click itself takes 0.3
        # to 0.7 s here, so the flood sees about a click a second: 5 is enough to see the page answer during it.
        # Every click but the slowest within 100 ms, the slowest within 250 ms: on 2 shared cores (the browser, the
        # daemon, PostgreSQL and RabbitMQ) one click in 8 was once answered after 113 ms, the rest in 0.7 to 60 ms.
        # A page blocked by its own updates would hold most clicks back, not one.
        delays = sorted(clicks)
        assert publish_s < 2 * len(metrics) / 1000 and len(delays) >= 5, (clicks, publish_s)
        assert delays[len(delays) // 2] < 50 and delays[-2] < 100 and delays[-1] < 250, delays
        shown = "return [...document.querySelectorAll('table.trials tbody tr')].map(tr => [tr.dataset.trial, " \
                "tr.dataset.epoch])"
        await wait_until(lambda: _equal(js(browser, shown), last), timeout=60, what="the page to catch up")


async def _equal(coro, expected: dict) -> bool:
    return dict(await coro) == expected


async def test_it_reads_with_a_select_only_role_and_asks_for_the_token(env):
    role = f"sntrack_dash_ro_{uuid.uuid4().hex[:8]}"
    events = a_trial(spectral_norm=False, epochs=3)
    conn = await env.db()
    try:
        await conn.execute(f'CREATE ROLE "{role}" LOGIN')
        await conn.execute(f'GRANT CONNECT ON DATABASE "{env.database}" TO "{role}"')
        await conn.execute(f'GRANT USAGE ON SCHEMA public TO "{role}"')
        await conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
        reader_url = env.settings.database_url.replace("postgres@", f"{role}@", 1)
        assert reader_url != env.settings.database_url
        async with running_consumers(env.settings.consumer(), CONSUMERS), \
                running_dashboard(DashboardConfig(reader_url, token="s3cret")) as url, aiohttp.ClientSession() as http:
            await env.publish_events(events)
            async with http.get(url) as refused:
                assert refused.status == 401
            await wait_until(lambda: _page_lists(http, f"{url}?token=s3cret", events[0].trial_id), what="the trial")
            async with http.get(f"{url}events", headers={"Authorization": "Bearer s3cret"}) as stream:
                assert stream.status == 200
                first = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 30)
                assert first.startswith(b"retry: 1000\nevent: snapshot\n") and events[0].trial_id.encode() in first
        reader = await asyncpg.connect(reader_url)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.execute("DELETE FROM trials")
        finally:
            await reader.close()
    finally:
        await conn.execute(f'DROP OWNED BY "{role}"')
        await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
        await conn.close()


async def _page_lists(http: aiohttp.ClientSession, url: str, trial_id: str) -> bool:
    async with http.get(url) as response:
        assert response.status == 200
        assert "sntrack_dashboard_token" in response.cookies
        return f'id="trial-{trial_id}"' in await response.text()


async def test_projections_notify_only_when_their_transaction_commits(env):
    events = a_trial(spectral_norm=True, epochs=2)
    heard: list[dict] = []
    listener = await env.db()
    writer = await env.db()
    try:
        await listener.add_listener(READ_MODEL_CHANNEL, lambda *args: heard.append(json.loads(args[-1])))
        async with writer.transaction():
            assert await apply_events(writer, PROJECTIONS["trials"], events) == len(events)
            await asyncio.sleep(0.5)
            assert heard == []
        await wait_until(lambda: heard, what="the notification")
        assert heard == [{"projection": "trials", "trials": [events[0].trial_id]}]
        async with writer.transaction():  # a redelivered batch changes nothing and says nothing
            assert await apply_events(writer, PROJECTIONS["trials"], events) == 0
        await asyncio.sleep(0.5)
        assert len(heard) == 1
    finally:
        await listener.close()
        await writer.close()


async def test_the_notification_names_only_live_trials_and_none_when_they_do_not_fit(env):
    """PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more: a batch changing more trials than fit names none
    (null: reread everything). A study removed for good is left out of the list, as its events are."""
    many = [trial[0] for trial in synthetic_study(400, 1, producer=producer_info(), model_run_id="dash-many")]
    kept = a_trial(spectral_norm=True, epochs=1)[0]
    gone = a_trial(spectral_norm=False, epochs=1, model_run_id="dash-gone")[0]
    heard: list[dict] = []
    listener, writer = await env.db(), await env.db()
    try:
        await writer.execute("INSERT INTO deleted_studies (model_run_id) VALUES ('dash-gone')")
        await listener.add_listener(READ_MODEL_CHANNEL, lambda *args: heard.append(json.loads(args[-1])))
        for batch in (many, [gone, kept]):
            async with writer.transaction():
                await apply_events(writer, PROJECTIONS["trials"], batch)
        await wait_until(lambda: len(heard) == 2, what="two notifications")
        assert heard == [{"projection": "trials", "trials": None},
                         {"projection": "trials", "trials": [kept.trial_id]}]
        assert len(json.dumps([e.trial_id for e in many])) > 8000
    finally:
        await listener.close()
        await writer.close()


def test_a_browser_s_pending_changes_keep_only_the_latest_row_per_trial():
    client = Client()
    for n in range(10_000):
        client.offer_trials([{"id": f"t{n % 10}", "epoch": n}])
    trials, _, _, reset = client.take()
    assert len(trials) == 10 and not reset
    assert sorted(t["epoch"] for t in trials) == list(range(9_990, 10_000))
    client.offer_trials([{"id": f"u{n}"} for n in range(MAX_PENDING + 1)])
    trials, _, _, reset = client.take()
    assert trials == [] and reset


async def _first_event(http: aiohttp.ClientSession, url: str) -> tuple[str, dict]:
    async with http.get(f"{url}events") as stream:
        block = (await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 30)).decode()
    fields = dict(line.split(": ", 1) for line in block.strip().splitlines())
    return fields["event"], json.loads(fields["data"])


async def test_a_browser_that_comes_back_gets_a_consistent_snapshot_and_the_static_page_filters(env):
    events = a_trial(spectral_norm=True, epochs=3)
    trial_id = events[0].trial_id
    async with running_consumers(env.settings.consumer(), CONSUMERS), \
            running_dashboard(DashboardConfig(env.settings.database_url)) as url, aiohttp.ClientSession() as http:
        await env.publish_events(events[:-1])
        await wait_until(lambda: env.fetchval("SELECT count(*) FROM trial_metrics WHERE trial_id = $1", trial_id),
                         what="the running trial")
        event, snapshot = await _first_event(http, url)  # connect, read, go away
        assert event == "snapshot" and [t["status"] for t in snapshot["trials"]] == ["running"]
        await env.publish_events(events[-1:])
        await wait_until(lambda: env.fetchval("SELECT status = 'completed' FROM trials WHERE id = $1", trial_id),
                         what="completed")
        event, snapshot = await _first_event(http, url)  # back: the state as committed, not a stale push
        assert event == "snapshot" and [(t["id"], t["status"]) for t in snapshot["trials"]] == [(trial_id,
                                                                                                   "completed")]
        assert snapshot["trials"][0]["final_val_accuracy"] == events[-1].payload.measurements["final_val_accuracy"]
        async with http.get(f"{url}?status=completed") as page:  # filters work without JavaScript
            assert f'id="trial-{trial_id}"' in await page.text()
        async with http.get(f"{url}?status=failed") as page:
            assert f'id="trial-{trial_id}"' not in await page.text()
        await env.fetchval("INSERT INTO archived_studies (model_run_id, archived_by) VALUES ('dash-study', 'test')")
        event, snapshot = await _first_event(http, url)  # `sntrack studies delete` hides the study
        assert event == "snapshot" and snapshot["trials"] == []


async def test_pushes_resume_after_the_listen_connection_is_lost(env):
    events = a_trial(spectral_norm=False, epochs=2)
    async with running_consumers(env.settings.consumer(), CONSUMERS), \
            running_dashboard(DashboardConfig(env.settings.database_url)) as url, aiohttp.ClientSession() as http:
        async with http.get(f"{url}events") as stream:
            assert b"event: snapshot" in await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 30)
            killed = await env.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 "
                "AND application_name = 'sntrack-dashboard' AND query ILIKE 'LISTEN%'", env.database)
            assert killed == 1
            await env.publish_events(events)

            async def pushed_completed() -> bool:
                while True:
                    block = await stream.content.readuntil(b"\n\n")
                    if block.startswith(b"event: trials") and b'"status":"completed"' in block:
                        return events[0].trial_id.encode() in block

            assert await asyncio.wait_for(pushed_completed(), 30)


async def test_dead_letters_and_consumer_lag_are_pushed_from_the_broker(env):
    config = DashboardConfig(env.settings.database_url, queues=queue_reader(env.settings))
    async with running_consumers(env.settings.consumer(), CONSUMERS), running_dashboard(config) as url, \
            aiohttp.ClientSession() as http, http.get(f"{url}events") as stream:
        await env.publish_raw([b"not json"])

        async def dead_letter_shown() -> None:
            while True:
                block = (await stream.content.readuntil(b"\n\n")).decode()
                if block.startswith("event: queues") or block.startswith("retry:"):
                    data = json.loads(block.split("data: ", 1)[1])
                    queues = {q["name"]: q for q in (data if isinstance(data, list) else data["queues"] or [])}
                    # The broker samples each queue's statistics on its own 5 s clock: wait until all three show.
                    if (queues.get("sntrack.trials.dlq", {}).get("messages") == 1
                            and queues.get("sntrack.journal.dlq", {}).get("messages") == 1
                            and queues.get("sntrack.trials", {}).get("consumers") == 1):
                        return

        await asyncio.wait_for(dead_letter_shown(), 60)  # fails by timing out when the push never shows them
