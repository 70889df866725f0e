"""The status page on REST_PORT, loaded in a real browser (Debian's Chromium, driven by Playwright)
while records flow, after a failure, and while the archiver is down and back."""
import json
import os
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

import oracle
from load import Producer

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# As a browser on this machine must start: no background connections to hosts it cannot reach.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: scripts/install-testbed.sh installs Debian's chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def number(text):
    """A figure as the page shows it ("1,234"), as a number."""
    return int(text.replace(",", "").strip())


def get(port, path, accept=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.headers, r.read()


def wait_page(page, what, predicate, timeout=30):
    """Waits until `predicate()` (run here, reading the page) holds."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception as e:  # a figure not drawn yet
            last = e
        time.sleep(0.25)
    raise AssertionError(f"the page did not show {what} within {timeout}s ({last}); "
                         f"it reads:\n{page.inner_text('body')[:3000]}")


def test_the_page_under_load_down_and_back(broker, run_archiver, browser, tmp_path):
    """Records flow: the page shows them archived, the chart draws, the partition table agrees with
    /status and Kafka at the end (lag 0). The archiver stops: the page says unreachable and keeps
    the last figures; it starts again: the page recovers by itself."""
    run = uuid.uuid4().hex[:8]
    topic, group, partitions = f"page.{run}", f"page-{run}", 4
    broker.create_topic(topic, partitions)
    env = dict(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=group, SPOOL_DIR=tmp_path / "spool",
               ARCHIVE_DIR=tmp_path / "data")
    a = run_archiver(**env)
    port = a.rest_port

    # `/` by negotiation: the page for a browser, Kafka Connect's worker info for everyone else.
    deadline = time.time() + 20
    while True:
        try:
            headers, body = get(port, "/")
            break
        except OSError:
            assert time.time() < deadline and a.proc.poll() is None, a.logs()
            time.sleep(0.2)
    assert set(json.loads(body)) == {"version", "commit", "kafka_cluster_id"}, body
    assert headers["Content-Type"] == "application/json" and headers["Vary"] == "Accept"
    headers, body = get(port, "/", accept=BROWSER_ACCEPT)
    assert headers["Content-Type"] == "text/html; charset=utf-8" and headers["Cache-Control"] == "no-cache"
    assert "connect-src 'self'" in headers["Content-Security-Policy"] and headers["Vary"] == "Accept"
    # Self-contained: nothing is loaded from anywhere else (an offline lab network).
    page_source = body.decode()
    assert "http://" not in page_source.replace('"http://www.w3.org/2000/svg"', "") and "https://" not in page_source

    delivered = []
    producer = Producer(broker.bootstrap, topic, partitions, rate=200, sizes=(200, 1000), delivered=delivered)
    producer.start()
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(f"http://127.0.0.1:{port}/")
    try:
        # Under load: RUNNING, a rate above zero, and the chart has points.
        wait_page(page, "RUNNING", lambda: page.inner_text("#state") == "RUNNING")
        wait_page(page, "records archived per second",
                  lambda: float(page.inner_text("#rate-records").replace(",", "")) > 0)
        wait_page(page, "a chart with points",
                  lambda: int(page.get_attribute("#chart-rate path.s0", "data-points")) >= 4)
        assert "ms" in page.inner_text("#latency"), page.inner_text("#latency")
        assert page.inner_text("#s-store").endswith(str(tmp_path / "data" / "archive")), page.inner_text("#s-store")
        assert page.inner_text("#s-topics") == topic and page.inner_text("#s-brokers") == broker.bootstrap
        # Nothing but the archiver's own endpoints is asked for (an offline network).
        origin = f"http://127.0.0.1:{port}/"
        assert {u.removeprefix(origin) for u in requested} == {"", "status", "metrics"}, set(requested)
        shot = os.environ.get("STATUS_PAGE_SCREENSHOT")
        page.screenshot(path=shot or str(tmp_path / "under-load.png"), full_page=True)
        mid = number(page.inner_text("#archived"))
        assert 0 < mid <= a.archived(), "the page shows more archived than the archiver counted"

        produced = producer.stop()
        ends = oracle.end_offsets([(p, o) for p, o, _, _ in delivered])
        assert sum(ends.values()) == produced == len(delivered)
        deadline = time.time() + 60
        while oracle.committed(broker.bootstrap, group, topic, list(range(partitions))) != ends:
            assert time.time() < deadline, a.logs()
            time.sleep(0.5)

        # At rest: the page's figures are what Kafka and /status say.
        wait_page(page, f"{produced} archived and lag 0",
                  lambda: number(page.inner_text("#archived")) == produced and page.inner_text("#lag") == "0")
        status = json.loads(get(port, "/status")[1])
        rows = page.eval_on_selector_all("#partitions tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.innerText))")
        assert len(rows) == partitions == len(status["partitions"])
        for row, p in zip(rows, status["partitions"]):
            assert row[0] == topic and int(row[1]) == p["partition"]
            assert number(row[2]) == p["committed"] == ends[p["partition"]], (row, p)
            assert number(row[3]) == p["end"] and number(row[4]) == p["lag"] == 0 and number(row[5]) == 0, (row, p)
        assert number(page.inner_text("#archived")) == a.archived()
        # The spool against its bounds, marked where the consumer waits, as /status gives them.
        sp = status["spool"]
        assert page.inner_text("#t-records") == f"0 of {sp['max_records']:,} (0 %)", page.inner_text("#t-records")
        meter = page.eval_on_selector("#m-records", "m => [m.max, m.high]")
        assert meter == [sp["max_records"], sp["max_records"] * sp["wait_above_percent"] / 100], (meter, sp)
        note = page.inner_text("#spool-note")
        assert f"Above {sp['wait_above_percent']} % of a bound" in note and f"at {sp['pause_at_percent']} %" in note, note
        # And what is in the archive: a payload and a timestamp object per record.
        objects = [f for f in (tmp_path / "data" / "archive" / "topics" / topic).rglob("*") if f.is_file()]
        assert len(objects) == 2 * produced, (len(objects), produced)

        # Sorting and filtering, as a user clicks and types.
        page.click("#partitions th[data-key=partition] button")
        page.click("#partitions th[data-key=partition] button")
        assert page.get_attribute("#partitions th[data-key=partition]", "aria-sort") == "descending"
        order = page.eval_on_selector_all("#partitions tbody tr", "rs => rs.map(r => r.cells[1].innerText)")
        assert order == [str(p) for p in reversed(range(partitions))], order
        page.fill("#filter", f"{topic}/2")
        wait_page(page, "one partition filtered", lambda: page.locator("#partitions tbody tr").count() == 1)
        assert page.inner_text("#partition-count").startswith("1 of 4")
        page.fill("#filter", "")

        # At phone width: nothing wider than the screen but the table, which scrolls in its box.
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate("document.documentElement.scrollWidth") <= 390

        # Stopped: the page says so and keeps the last figures.
        assert a.stop() == 0, a.logs()
        wait_page(page, "UNREACHABLE", lambda: page.inner_text("#state") == "UNREACHABLE", timeout=15)
        assert "unreachable since" in page.inner_text("#connection")
        assert number(page.inner_text("#archived")) == produced

        # Started again on the same port: the page recovers; the new run's counters start at 0.
        env["REST_PORT"] = port
        b = run_archiver(**env)
        wait_page(page, "RUNNING again", lambda: page.inner_text("#state") == "RUNNING", timeout=30)
        assert page.inner_text("#connection").startswith("Live")
        wait_page(page, "lag 0 after the restart", lambda: page.inner_text("#lag") == "0", timeout=30)
        assert number(page.inner_text("#archived")) == b.archived() == 0
        # Rates are taken within one run: the old run's counters do not make a rate of the new one.
        assert page.inner_text("#rate-records") in ("—", "0"), page.inner_text("#rate-records")
        assert b.stop() == 0, b.logs()
    finally:
        if producer.is_alive():
            producer.stop()
        context.close()


def test_a_failed_archiver_shows_its_failure(broker, run_archiver, browser, tmp_path):
    """UNDECODABLE=stop on a record that is not a SINETStream message: the page shows FAILED, the
    failure, and the error in the list of last errors."""
    from test_archive import produce_raw
    from load import v3_message
    run = uuid.uuid4().hex[:8]
    topic = f"page-failed.{run}"
    broker.create_topic(topic, 1)
    produce_raw(broker.bootstrap, topic, [(0, v3_message(1650250000123456, b'{"ok": 1}'), 1795545116000),
                                          (0, b'{"no": "envelope"}', 1795545116001)])
    a = run_archiver(BROKER_HOSTNAME=broker.bootstrap, KAFKA_TOPIC=topic, GROUP_ID=f"page-failed-{run}",
                     UNDECODABLE="stop", SPOOL_DIR=tmp_path / "spool", ARCHIVE_DIR=tmp_path / "data")
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    deadline = time.time() + 20
    while True:
        try:
            page.goto(f"http://127.0.0.1:{a.rest_port}/")
            break
        except Exception:
            assert time.time() < deadline and a.proc.poll() is None, a.logs()
            time.sleep(0.3)
    try:
        wait_page(page, "FAILED", lambda: page.inner_text("#state") == "FAILED", timeout=60)
        failure = page.inner_text("#failure")
        assert page.is_visible("#failure") and "UNDECODABLE=stop" in failure and f"{topic} partition 0 offset 1" in failure
        assert page.inner_text("#readiness").startswith("Not ready: archiving stopped")
        sources = page.eval_on_selector_all("#errors .meta", "ms => ms.map(m => m.innerText.split(' · ')[1])")
        assert "archiving" in sources, sources
        assert "UNDECODABLE=stop" in page.inner_text("#errors")
    finally:
        context.close()
    assert a.stop() == 1, a.logs()
