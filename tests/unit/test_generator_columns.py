"""The generator's vectorised batches (next_columns, producer/columns.py) and the produce loop that encodes
them whole: the same rules as the record-by-record path, the same bytes as fastavro's encoding."""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import pytest

from fraudstream.producer.generator import (
    ATM_NOTE_CENTS,
    FRAUD_SCENARIOS,
    LARGE_AMOUNT,
    LEGIT,
    SEED_THRESHOLD_CENTS,
    Generator,
    build_population,
)
from fraudstream.producer.loop import _Run
from fraudstream.schemas import load_schemas
from fraudstream.serde import BatchEncoder, make_encoder
from fraudstream.settings import Settings

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
STEP_MS = 19 * 60_000  # each batch 19 minutes after the last: every hour of the day, episode steps falling due
HIGH_SHARES = {name: 0.04 for name in FRAUD_SCENARIOS}


def batches(generator: Generator, count: int, size: int = 500):
    for number in range(count):
        yield generator.next_columns(size, START_MS + number * STEP_MS)


@pytest.fixture(scope="module")
def sample():
    return [pair for batch in batches(Generator(7), 80) for pair in batch.pairs()]


def test_the_same_seed_and_clock_give_the_same_batches_and_another_seed_others():
    schemas = load_schemas(Settings().schemas_dir)
    encode = BatchEncoder(1, schemas.expanded["Transaction"])
    first, second, other = (
        [encode(b.transactions(encode.arrow_schema)) for b in batches(Generator(seed), 6)] for seed in (3, 3, 4)
    )
    assert first == second and first != other


def test_whole_batch_encoding_gives_fastavros_bytes_in_slot_order():
    # Many episodes: their steps fall due between the batches and their starts sit among everyday rows.
    schemas = load_schemas(Settings().schemas_dir)
    encode_tx, encode_label = (
        BatchEncoder(11, schemas.expanded["Transaction"]),
        BatchEncoder(12, schemas.expanded["Label"]),
    )
    one_by_one_tx = make_encoder(11, schemas.parsed["Transaction"])
    one_by_one_label = make_encoder(12, schemas.parsed["Label"])
    columns, objects = Generator(5, shares=HIGH_SHARES), Generator(5, shares=HIGH_SHARES)
    own_rows = 0
    for number in range(12):
        now_ms = START_MS + number * STEP_MS
        batch = columns.next_columns(400, now_ms)
        own_rows += len(batch.own)
        pairs = objects.next_batch(400, now_ms)
        assert encode_tx(batch.transactions(encode_tx.arrow_schema)) == [one_by_one_tx(tx.to_dict()) for tx, _ in pairs]
        assert encode_label(batch.labels(encode_label.arrow_schema)) == [
            one_by_one_label(label.to_dict()) for _, label in pairs
        ]
    assert own_rows > 12 * 400 * 0.1  # the episode rows were really merged in


def test_everyday_purchases_follow_the_generators_rules(sample):
    population = Generator(7).population
    accounts = {a.account_id: a for a in population.accounts}
    terminals = {t.terminal_id: t for t in population.terminals}
    position = {t.terminal_id: index for index, t in enumerate(population.terminals)}
    everyday = favourite = 0
    for tx, label in sample:
        account, terminal = accounts[tx.account_id], terminals[tx.terminal_id]
        assert tx.card_id in account.cards
        assert str(uuid.UUID(tx.transaction_id)) == tx.transaction_id and uuid.UUID(tx.transaction_id).version == 4
        assert tx.channel == {"atm": "ATM", "web": "ONLINE"}.get(terminal.kind, tx.channel)
        assert terminal.kind != "pos" or tx.channel in ("CONTACTLESS", "CARD_PRESENT")
        assert (tx.device_id is not None) == (terminal.kind == "web")
        assert (tx.merchant_id, tx.country, tx.city, tx.latitude) == (
            terminal.merchant_id,
            terminal.country,
            terminal.city,
            terminal.latitude,
        )
        if label.scenario == LEGIT and tx.amount_cents <= SEED_THRESHOLD_CENTS:
            everyday += 1
            if terminal.kind == "atm":
                assert tx.amount_cents % ATM_NOTE_CENTS == 0 and tx.amount_cents >= ATM_NOTE_CENTS
            favourite += position[tx.terminal_id] in account.favourite_terminals
            assert tx.amount_cents >= 50
            if terminal.kind == "web":
                assert tx.device_id in account.devices
            # Episode steps fall due minutes later, possibly past the account's hours: everyday ones only.
            local = (tx.event_time.hour + population.places[account.home].utc_offset_h) % 24
            assert account.active_from_h <= local < account.active_to_h or local < account.active_to_h - 24
    assert 0.85 < favourite / everyday < 0.95  # nine in ten at a favourite terminal


def test_scenarios_keep_their_shares_in_batches(sample):
    counts = Counter(label.scenario for _, label in sample)
    assert counts[LARGE_AMOUNT] / len(sample) == pytest.approx(0.015, rel=0.2)
    assert counts[LEGIT] / len(sample) > 0.95


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str]] = []
        self._pending: list = []

    def produce(self, topic, value, key=None, on_delivery=None):
        self.sent.append((topic, value, key))
        self._pending.append(on_delivery)

    def poll(self, timeout: float = 0.0) -> int:
        pending, self._pending = self._pending, []
        for on_delivery in pending:
            on_delivery(None, None)
        return len(pending)

    def flush(self, timeout: float = 0.0) -> int:
        return self.poll()

    def __len__(self) -> int:
        return len(self._pending)


def test_the_produce_loop_sends_whole_encoded_batches_with_the_same_bytes_as_record_by_record(monkeypatch):
    settings = Settings(transactions_topic="tx-columns")
    schemas = load_schemas(settings.schemas_dir)
    population = build_population(3, accounts=300)
    generator = Generator(3, population=population, shares=HIGH_SHARES)
    calls = []
    real_next_columns = generator.next_columns
    monkeypatch.setattr(
        generator, "next_columns", lambda n, now_ms: calls.append((n, now_ms)) or real_next_columns(n, now_ms)
    )
    monkeypatch.setattr(generator, "next_batch", lambda *_: pytest.fail("the record-by-record path ran"))
    fake = FakeProducer()
    encoders = (BatchEncoder(21, schemas.expanded["Transaction"]), BatchEncoder(22, schemas.expanded["Label"]))
    report = _Run(
        fake,
        generator,
        settings,
        None,
        None,
        labels=True,
        rate=None,
        count=3_000,
        duration=None,
        stop=threading.Event(),
        progress=None,
        flush_timeout_s=1.0,
        batch_encoders=encoders,
    ).run()
    assert report.sent == report.delivered == 3_000 and report.labels_delivered == 3_000 and calls

    # The same calls on a generator of the same seed, record by record: the same messages, in the same order.
    replay = Generator(3, population=population, shares=HIGH_SHARES)
    encode_tx, encode_label = make_encoder(21, schemas.parsed["Transaction"]), make_encoder(22, schemas.parsed["Label"])
    expected = []
    for n, now_ms in calls:
        for tx, label in replay.next_batch(n, now_ms):
            expected.append((settings.transactions_topic, encode_tx(tx.to_dict()), tx.account_id))
            expected.append((settings.labels_topic, encode_label(label.to_dict()), label.transaction_id))
    assert fake.sent == expected


def test_episode_rows_sit_at_their_slots_among_everyday_ones():
    schemas = load_schemas(Settings().schemas_dir)
    encode = BatchEncoder(1, schemas.expanded["Transaction"])
    generator = Generator(5, shares=HIGH_SHARES)
    generator.next_columns(400, START_MS)  # starts episodes whose next steps fall due by the next batch
    batch = generator.next_columns(400, START_MS + STEP_MS)
    # The steps that fell due take the first slots; the episodes started in this batch sit among the
    # everyday rows, not after them.
    due = next((i for i, slot in enumerate(batch.own_slots) if slot != i), len(batch.own_slots))
    starts = batch.own_slots[due:]
    assert due > 0 and starts and starts[0] < 400 - len(starts)
    ids = batch.transactions(encode.arrow_schema).column("transaction_id").to_pylist()
    assert [ids[slot] for slot in batch.own_slots] == [tx.transaction_id for tx, _ in batch.own]
    pairs = batch.pairs()
    assert [pairs[slot] for slot in batch.own_slots] == batch.own
