"""Stateful rules on the real broker: state-dependent fraud is caught, state lives in the changelog, and a
restarted detector restores it before judging the next records of its partitions."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from fraudstream.consumer.stateful import CARDS
from tests.integration.test_detector import RunningDetector, decode, encoder_for, routed_total
from tests.support.kafka_io import produce_raw, read_topic, transaction, wait_until

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
NEW_YORK = dict(country="US", city="New York", latitude=40.71, longitude=-74.01)
LONDON = dict(country="GB", city="London", latitude=51.51, longitude=-0.13)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def send(settings, txs) -> None:
    encode = encoder_for(settings, settings.transactions_topic)
    produce_raw(settings, settings.transactions_topic, ((t.account_id.encode(), encode(t.to_dict())) for t in txs))


def run_until_routed(settings, total: int) -> RunningDetector:
    detector = RunningDetector(settings)
    wait_until(lambda: routed_total(settings) >= total, timeout_s=120, what=f"{total} transactions routed")
    detector.stop()
    assert detector.error is None, detector.error
    return detector


def alerts(settings) -> dict[str, list[str]]:
    return {
        a["transaction"]["transaction_id"]: a["rules"]
        for a in (decode(settings, m.value()) for m in read_topic(settings, settings.fraud_topic))
    }


def home_history(account: str, *, until: float) -> list:
    """A card's everyday in-person payments at home, every 10 minutes: its home area."""
    return [
        transaction(2_500, account=account, event_time=at(minute), **NEW_YORK, transaction_id=f"{account}-h{minute}")
        for minute in range(0, int(until), 10)
    ]


def test_card_testing_and_a_cloned_card_are_caught_from_state(pipeline):
    testing = [
        transaction(
            amount,
            account="acct-tested",
            event_time=at(60 + i * 0.1),
            channel="ONLINE",
            merchant_category="5815",
            device_id="dev-fraudster",
            transaction_id=f"test-{i}",
        )
        for i, amount in enumerate((120, 99, 180))
    ]
    cloned = home_history("acct-cloned", until=60) + [
        transaction(
            4_000, account="acct-cloned", event_time=at(62), channel="CARD_PRESENT", **LONDON, transaction_id="london"
        )
    ]
    everyday = home_history("acct-everyday", until=70)
    send(pipeline, testing + cloned + everyday)
    run_until_routed(pipeline, len(testing) + len(cloned) + len(everyday))

    fraud = alerts(pipeline)
    assert {tid for tid in fraud} == {"test-0", "test-1", "test-2", "london"}, fraud
    assert all(fraud[f"test-{i}"] == ["card_testing"] for i in range(3))
    assert "impossible_travel" in fraud["london"]
    changelog = read_topic(pipeline, pipeline.changelog_topic(CARDS.name))
    assert {m.key() for m in changelog} >= {b"card-acct-tested", b"card-acct-cloned", b"card-acct-everyday"}


def test_a_restarted_detector_restores_state_before_judging(pipeline):
    history = home_history("acct-1", until=60)
    send(pipeline, history)
    first = run_until_routed(pipeline, len(history))
    assert first.detector.metrics.restored_records == 0

    send(
        pipeline,
        [
            transaction(
                4_000, account="acct-1", event_time=at(62), channel="CARD_PRESENT", **LONDON, transaction_id="london"
            )
        ],
    )
    second = run_until_routed(pipeline, len(history) + 1)
    # Only a detector that knew the card was in New York two minutes earlier can call this impossible.
    assert "impossible_travel" in alerts(pipeline)["london"]
    assert second.detector.metrics.restored_records >= 1


def test_a_terminal_taking_cards_of_accounts_in_every_partition_is_caught(pipeline):
    """Per-terminal state that every detector holds whole: the terminal's cards come from accounts of every
    input partition, and the rule counts them all (no home known: it takes three other cards). Victims 0 to 2
    come before the third other card: held (no home known for the card; a terminal that already took one),
    then released once the input went quiet, counting the cards up to their look-ahead. Victims 3 to 5 are
    caught at once."""
    victims = [
        transaction(
            3_000,
            account=f"acct-victim-{i}",
            event_time=at(61 + i * 0.5),
            terminal_id="term-skimmer",
            transaction_id=f"victim-{i}",
        )
        for i in range(6)
    ]
    send(pipeline, victims)
    detector = run_until_routed(pipeline, len(victims))

    partitions = {m.partition() for m in read_topic(pipeline, pipeline.transactions_topic)}
    assert len(partitions) >= 2, "the victims' accounts should span input partitions"
    fraud = alerts(pipeline)
    assert fraud == {f"victim-{i}": ["compromised_terminal"] for i in range(6)}, fraud
    assert detector.detector.tasks.tombstones == 3  # the three held rows, removed from the changelog on release
    reader = detector.detector.terminal
    assert reader is not None and reader.stats.events_read == len(victims)


def test_a_payment_dated_40_days_ahead_loses_none_of_the_records_held_on_its_partition(pipeline, monkeypatch):
    """Reproduced on the default detector before the fix: the first in-person payments of 50 new cards (held for
    the terminal rule's look-ahead) on one partition, then one payment dated 40 days ahead on it, while another
    partition keeps the look-ahead from releasing anything. The expiry took the partition's stream time from that
    payment and tombstoned the 50 held rows with no output: none of them ever came out, and nothing said so."""
    import fraudstream.consumer.tasks as tasks_module

    monkeypatch.setattr(tasks_module, "EXPIRE_EVERY_S", 0.0)  # expire at every batch, as every 10 s would
    encode = encoder_for(pipeline, pipeline.transactions_topic)

    def to_partition(partition: int, txs) -> None:
        produce_raw(
            pipeline,
            pipeline.transactions_topic,
            ((t.account_id.encode(), encode(t.to_dict())) for t in txs),
            partition=partition,
        )

    firsts = [
        transaction(2_500, account=f"new-{i}", event_time=at(i * 0.01), **NEW_YORK, transaction_id=f"first-{i}")
        for i in range(50)
    ]
    ahead = transaction(
        2_500, account="clock-ahead", event_time=at(0) + timedelta(days=40), **NEW_YORK, transaction_id="ahead"
    )
    busy, stop_busy = [], threading.Event()

    def keep_partition_1_busy() -> None:  # payments dated at the start: nothing can be released while they come
        while not stop_busy.is_set():
            busy.append(
                transaction(
                    2_500, account=f"busy-{len(busy)}", event_time=at(0), **NEW_YORK, transaction_id=f"busy-{len(busy)}"
                )
            )
            to_partition(1, busy[-1:])
            stop_busy.wait(0.2)

    detector = RunningDetector(pipeline)
    feeder = threading.Thread(target=keep_partition_1_busy, daemon=True)
    feeder.start()
    try:
        to_partition(0, firsts)
        wait_until(
            lambda: detector.detector.metrics.consumed >= len(firsts) + len(busy),
            timeout_s=60,
            what="the first payments read",
        )
        to_partition(0, [ahead])
        wait_until(
            lambda: detector.detector.metrics.consumed >= len(firsts) + 1 + len(busy) > len(firsts) + 3,
            timeout_s=60,
            what="the payment dated ahead read, and the busy partition after it",
        )
        held_on_0 = len(detector.detector.tasks.tables(0)["held"])
    finally:
        stop_busy.set()
        feeder.join(10)
    assert held_on_0 == len(firsts) + 1  # the 50 first payments and the one dated ahead, all still owed
    total = len(firsts) + 1 + len(busy)
    wait_until(
        lambda: routed_total(pipeline) >= total or not detector.thread.is_alive(),
        timeout_s=90,
        what=f"all {total} records routed, the held ones released",
    )
    detector.stop()
    assert detector.error is None, detector.error
    routed = [
        decode(pipeline, m.value())
        for topic in (pipeline.legit_topic, pipeline.fraud_topic)
        for m in read_topic(pipeline, topic)
    ]
    ids = [r.get("transaction_id") or r["transaction"]["transaction_id"] for r in routed]
    assert sorted(ids) == sorted(t.transaction_id for t in [*firsts, ahead, *busy])  # each once, none lost
