"""The analyst console in a real headless browser (the system's Chromium, driven by Playwright), against the
real broker, registry and detector, on topics of its own.

An alert produced during the test appears in the queue without a reload (and leaves a colleague's open queue
once it has a verdict); "not fraud" on it puts a Label with the analyst's name on the labels topic (read back
here with a consumer of the test's own); a rule change made in the editor reaches the detector and the next
alert names the new rule-set version; an analyst without rule rights cannot change a rule. Screenshots of the
queue, an alert and the dashboard go to the test's folder, or to CONSOLE_SCREENSHOTS when set
(`CONSOLE_SCREENSHOTS=docs/console` refreshes the README's; those were taken from a demo run with the same
pages).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from fraudstream.console import start_in_thread
from fraudstream.console.auth import hash_password
from fraudstream.consumer.rules import LARGE_AMOUNT, SCORE_BANDS
from fraudstream.consumer.rules_topic import RulesCodec, read_changes
from fraudstream.settings import Settings
from tests.integration.test_detector import decode, encoder_for
from tests.support.detector_process import DetectorProcess
from tests.support.kafka_io import produce_raw, read_topic, transaction, wait_until

ANALYST, ANALYST_PASSWORD = "alice", "alice-has-a-long-password"
ADMIN, ADMIN_PASSWORD = "rita", "rita-changes-the-rules"
LOWERED_CENTS = 50_000
WAIT_S = 60


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Chromium is not installed: `make` installs it (apt-get install chromium)"
    return path


@pytest.fixture
def console(pipeline: Settings, tmp_path):
    users = tmp_path / "users.toml"
    users.write_text(
        f'[users.{ANALYST}]\npassword = "{hash_password(ANALYST_PASSWORD)}"\nroles = ["analyst"]\n\n'
        f'[users.{ADMIN}]\npassword = "{hash_password(ADMIN_PASSWORD)}"\nroles = ["analyst", "rules_admin"]\n'
    )
    running = start_in_thread(pipeline, port=0, users_file=users, index_file=tmp_path / "index.sqlite")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def detector(pipeline: Settings, tmp_path):
    process = DetectorProcess(pipeline, tmp_path / "detector.log")
    try:
        yield process
    finally:
        process.ensure_ended()


@pytest.fixture
def browser():
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path())
        try:
            yield launched
        finally:
            launched.close()


def produce(settings: Settings, cents: int, **fields) -> str:
    tx = transaction(cents, **fields)
    produce_raw(
        settings,
        settings.transactions_topic,
        [(tx.account_id.encode(), encoder_for(settings, settings.transactions_topic)(tx.to_dict()))],
    )
    return tx.transaction_id


def labels_for(settings: Settings, transaction_id: str) -> list[dict]:
    """The labels topic read back with a consumer of the test's own, decoded by writer schema."""
    labels = [decode(settings, m.value()) for m in read_topic(settings, settings.labels_topic)]
    return [label for label in labels if label["transaction_id"] == transaction_id]


def alert_on_topic(settings: Settings, transaction_id: str) -> dict | None:
    for message in read_topic(settings, settings.fraud_topic):
        alert = decode(settings, message.value())
        if alert["transaction"]["transaction_id"] == transaction_id:
            return alert
    return None


def with_threshold(text: str, cents: int) -> str:
    """The editor's text with large_amount's threshold set to `cents`."""
    table = re.search(rf"^\[{LARGE_AMOUNT}\]\n(?:[^\[].*\n?)*", text, re.M)
    assert table, text
    body = re.sub(r"^threshold_cents = .*\n", "", table.group(0), flags=re.M)
    body = body.replace(f"[{LARGE_AMOUNT}]\n", f"[{LARGE_AMOUNT}]\nthreshold_cents = {cents}\n")
    return text[: table.start()] + body + text[table.end() :]


def rules_records(settings: Settings) -> int:
    return len(read_changes(settings, RulesCodec(settings))[1])


def test_an_alert_reaches_the_queue_live_and_a_verdict_becomes_a_label(pipeline, console, detector, browser, tmp_path):
    screenshots = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path)
    # A few alerts and payments before the page opens, so that the screenshots show a queue and a card's history.
    for i, cents in enumerate((4_500, 12_000, 8_800)):
        produce(pipeline, cents, account="acc-console", merchant_id=f"m-{i}")
    for i, cents in enumerate((125_000, 99_000, 310_000)):
        produce(pipeline, cents, account=f"acc-{i}", merchant_id=f"m-{i + 4}")
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(console.url + "/")
    page.wait_for_selector("text=Live: new alerts appear on top", timeout=WAIT_S * 1000)  # the stream is open
    wait_until(lambda: console.state.reader.state.caught_up, timeout_s=WAIT_S, what="the console's index rebuilt")
    page.evaluate("window.notReloaded = true")

    tid = produce(pipeline, 95_000, account="acc-console")
    page.wait_for_selector(f'tr[data-transaction="{tid}"]', timeout=WAIT_S * 1000)
    assert page.evaluate("window.notReloaded === true"), "the page was reloaded"
    assert "95,000" not in page.inner_text(f'tr[data-transaction="{tid}"]')  # cents shown as dollars
    assert "950.00 USD" in page.inner_text(f'tr[data-transaction="{tid}"]')
    screenshots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=screenshots / "queue.png")

    # A colleague's queue, open in another tab: the alert leaves it once anyone gives a verdict.
    colleague = browser.new_page()
    colleague.goto(console.url + "/")
    colleague.wait_for_selector("text=Live: new alerts appear on top", timeout=WAIT_S * 1000)
    colleague.wait_for_selector(f'tr[data-transaction="{tid}"]')
    colleague.evaluate("window.notReloaded = true")

    page.click(f'tr[data-transaction="{tid}"] a')
    page.wait_for_selector("text=Rules that fired")
    assert LARGE_AMOUNT in page.inner_text("table.rules")
    page.fill("input[name=analyst]", "Ann Analyst")
    page.click("button[value=not_fraud]")
    page.wait_for_selector("#message")
    assert "written by Ann Analyst" in page.inner_text("#message")

    colleague.wait_for_selector(f'tr[data-transaction="{tid}"]', state="detached", timeout=WAIT_S * 1000)
    assert colleague.evaluate("window.notReloaded === true"), "the colleague's queue was reloaded"

    labels = wait_until(lambda: labels_for(pipeline, tid), timeout_s=30, what="the verdict's label on the topic")
    assert len(labels) == 1
    label = labels[0]
    assert (label["is_fraud"], label["source"], label["labelled_by"]) == (False, "analyst", "Ann Analyst")
    assert label["terminal_id"] == "t-acc-console" and label["event_time"] is not None
    assert label["labelled_at"] is not None

    def verdict_shown() -> bool:
        page.reload()
        return "not fraud" in page.inner_text("#verdict-now")

    wait_until(verdict_shown, timeout_s=30, what="the verdict on the alert page")
    page.screenshot(path=screenshots / "alert.png", full_page=True)

    # The detectors' lag and throughput: sampled every 5 s from their consumer group.
    wait_until(lambda: len(console.state.reader.state.samples) >= 2, timeout_s=30, what="two samples of the detectors")
    page.goto(console.url + "/dashboard")
    page.wait_for_selector("svg.chart")
    assert page.locator('svg[aria-label="detectors\' consumer lag (records)"] circle').count() >= 2
    page.screenshot(path=screenshots / "dashboard.png", full_page=True)


def test_a_rule_changed_in_the_editor_reaches_the_detector_and_an_analyst_cannot_change_one(
    pipeline, console, detector, browser
):
    # The detector seeds the rules topic from its rules file: wait for that (and for it to route something).
    first = produce(pipeline, 95_000, account="acc-before")
    wait_until(lambda: alert_on_topic(pipeline, first), timeout_s=WAIT_S, what="the first alert")

    analyst = browser.new_context(http_credentials={"username": ANALYST, "password": ANALYST_PASSWORD})
    page = analyst.new_page()
    page.goto(console.url + "/login")  # the challenge makes the browser send the credentials from now on
    page.goto(console.url + "/rules")
    assert "does not have it" in page.inner_text("main")
    before = rules_records(pipeline)
    page.fill("textarea[name=rules]", with_threshold(page.input_value("textarea[name=rules]"), LOWERED_CENTS))
    page.click("text=Write the rules")
    page.wait_for_selector("#message")
    assert f"{ANALYST} may not change rules" in page.inner_text("#message")
    assert rules_records(pipeline) == before, "an analyst's change reached the rules topic"

    admin = browser.new_context(http_credentials={"username": ADMIN, "password": ADMIN_PASSWORD})
    page = admin.new_page()
    page.goto(console.url + "/login")
    page.goto(console.url + "/rules")
    page.fill("textarea[name=rules]", with_threshold(page.input_value("textarea[name=rules]"), LOWERED_CENTS))
    page.fill("input[name=comment]", "lower the amount threshold")
    page.click("text=Write the rules")
    page.wait_for_selector("#message")
    assert f"(by {ADMIN})" in page.inner_text("#message")
    _, changes = read_changes(pipeline, RulesCodec(pipeline))
    record = [c.record for c in changes if c.message.key() == LARGE_AMOUNT.encode()][-1]
    assert (record.parameters["threshold_cents"], record.author) == (LOWERED_CENTS, ADMIN)
    new_version = str(changes[-1].message.offset() + 1)

    # $600: under the default threshold, over the lowered one. Probes go until one is alerted: only the new
    # rule set can alert one, and the first that is must name it.
    probes: list[str] = []

    def probe_alerted() -> dict | None:
        probes.append(produce(pipeline, 60_000, account=f"acc-after-{len(probes)}"))
        alerts = [a for a in map(lambda t: alert_on_topic(pipeline, t), probes) if a is not None]
        return alerts[0] if alerts else None

    alert = wait_until(probe_alerted, timeout_s=WAIT_S, what="an alert under the new rule")
    assert alert["rule_set_version"] == new_version
    assert [(f["id"], f["version"]) for f in alert["fired"]] == [(LARGE_AMOUNT, record.version)]
    probe = alert["transaction"]["transaction_id"]
    wait_until(
        lambda: page.goto(console.url + f"/alerts/{probe}").status == 200,
        timeout_s=30,
        what="the alert indexed by the console",
    )
    assert page.inner_text("#rule-set-version") == new_version
    assert f'"threshold_cents": {LOWERED_CENTS}' in page.inner_text("table.rules")

    # The score bands are a rule as well: changed in the same editor, attributed on the topic, and the
    # console's bands (rules page, queue, alert page) follow the rule in force.
    page.goto(console.url + "/rules")
    assert "review from 0.5," in page.inner_text("#bands + p")
    text = page.input_value("textarea[name=rules]")
    assert re.search(r"^review = 0\.5$", text, flags=re.M), text
    page.fill("textarea[name=rules]", re.sub(r"^review = 0\.5$", "review = 0.25", text, flags=re.M))
    page.fill("input[name=comment]", "a wider review band")
    page.click("text=Write the rules")
    page.wait_for_selector("#message")
    assert f"{SCORE_BANDS} v2 (by {ADMIN})" in page.inner_text("#message")
    _, changes = read_changes(pipeline, RulesCodec(pipeline))
    bands = [c.record for c in changes if c.message.key() == SCORE_BANDS.encode()][-1]
    assert (bands.parameters["review"], bands.author, bands.version) == (0.25, ADMIN, 2)
    wait_until(
        lambda: "review from 0.25," in (page.goto(console.url + "/rules") and page.inner_text("#bands + p")),
        timeout_s=30,
        what="the console's bands from the rule in force",
    )
