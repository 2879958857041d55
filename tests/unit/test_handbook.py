"""The handbook simulator: the book's statistics at the book's size, its rules on every row, our schema."""

from __future__ import annotations

import numpy as np
import pytest
from fastavro.validation import validate

from fraudstream.schemas import load_schemas
from fraudstream.settings import Settings
from fraudstream.producer import handbook
from fraudstream.producer.handbook import (
    DAY_S,
    LEGIT,
    RADIUS,
    S1_LARGE_AMOUNT,
    S2_COMPROMISED_TERMINAL,
    S3_COMPROMISED_CARD,
    SCENARIOS,
    simulate,
)

# What the book reports for its simulation (chapter 3, 5,000 customers, 10,000 terminals, 183 days):
# 1,754,155 transactions, 14,681 of them fraud (0.84%): 978 from S1, 9,099 from S2, 4,604 from S3.
BOOK_TRANSACTIONS = 1_754_155
BOOK_FRAUD_RATE = 14_681 / 1_754_155
BOOK_SHARES = {
    S1_LARGE_AMOUNT: 978 / 14_681,
    S2_COMPROMISED_TERMINAL: 9_099 / 14_681,
    S3_COMPROMISED_CARD: 4_604 / 14_681,
}


@pytest.fixture(scope="module")
def book_size() -> handbook.HandbookSimulation:
    # The book's size: a smaller population changes the statistics (2 compromised terminals a day
    # among fewer terminals is a larger share), and numpy draws all 1.75M rows in a few seconds.
    return simulate(seed=7)


def test_the_book_size_reproduces_the_books_statistics(book_size):
    sim = book_size
    assert abs(len(sim) - BOOK_TRANSACTIONS) / BOOK_TRANSACTIONS < 0.03
    assert sim.fraud_rate == pytest.approx(BOOK_FRAUD_RATE, abs=0.0004)
    counts = sim.scenario_counts()
    frauds = len(sim) - counts[LEGIT]
    for name, share in BOOK_SHARES.items():
        assert counts[name] / frauds == pytest.approx(share, abs=0.03), (name, counts)
    # About 2 transactions per customer and day, as the U(0, 4) mean rate makes.
    assert len(sim) / (sim.customers * sim.days) == pytest.approx(2 * 0.969, rel=0.03)  # 3.1% fall outside the day


def test_every_row_follows_the_books_rules():
    sim = simulate(customers=400, terminals=800, days=40, seed=3)
    assert len(sim) > 10_000
    # Terminals within the radius of their customer.
    distance = np.hypot(*(sim.customer_xy[sim.customer] - sim.terminal_xy[sim.terminal]).T)
    assert distance.max() < RADIUS
    # Event-time order, every time inside its day.
    assert np.all(np.diff(sim.time_ms) >= 0)
    second_of_day = (sim.time_ms - sim.start_ms) // 1000 % DAY_S
    assert second_of_day.min() > 0 and second_of_day.max() < DAY_S
    # S1: above $220 is fraud; a legit transaction never is above it.
    scenario = np.asarray(SCENARIOS, dtype=object)[sim.scenario]
    assert np.all(sim.amount_cents[scenario == LEGIT] <= handbook.S1_AMOUNT_CENTS)
    assert np.all(sim.amount_cents[scenario == S1_LARGE_AMOUNT] > handbook.S1_AMOUNT_CENTS)
    # S2 and S3 come from a few compromised terminals and customers a day.
    assert set(np.unique(scenario)) == set(SCENARIOS)
    assert len(np.unique(sim.terminal[scenario == S2_COMPROMISED_TERMINAL])) <= handbook.S2_TERMINALS_PER_DAY * sim.days
    assert len(np.unique(sim.customer[scenario == S3_COMPROMISED_CARD])) <= handbook.S3_CUSTOMERS_PER_DAY * sim.days
    # A compromised terminal takes every card in its window: on its busiest fraud day, all of it is fraud.
    s2 = scenario == S2_COMPROMISED_TERMINAL
    day = (sim.time_ms - sim.start_ms) // (DAY_S * 1000)
    terminal, busiest = np.unique(sim.terminal[s2] * 1000 + day[s2], return_counts=True)
    that = terminal[np.argmax(busiest)]
    same = (sim.terminal * 1000 + day) == that
    assert np.isin(scenario[same], [S2_COMPROMISED_TERMINAL, S3_COMPROMISED_CARD]).all()
    # S3: the stolen third is multiplied by 5 (a whole number of 5-cent steps).
    assert np.all(sim.amount_cents[scenario == S3_COMPROMISED_CARD] % 5 == 0)


def test_same_seed_same_simulation_other_seed_other_one():
    one, again, other = (simulate(customers=200, terminals=400, days=10, seed=s) for s in (5, 5, 6))
    for name in ("time_ms", "customer", "terminal", "amount_cents", "scenario", "id_bits"):
        assert np.array_equal(getattr(one, name), getattr(again, name)), name
    assert not np.array_equal(one.amount_cents[:100], other.amount_cents[:100])


def test_rows_map_onto_our_schema_with_their_labels():
    sim = simulate(customers=200, terminals=400, days=10, seed=1)
    schemas = load_schemas(Settings().schemas_dir)
    pairs = sim.to_pairs(0, len(sim))
    assert len(pairs) == len(sim)
    ids = set()
    for (tx, label), minute_ms, amount, scenario in zip(
        pairs, sim.time_ms.tolist(), sim.amount_cents.tolist(), sim.scenario.tolist()
    ):
        assert validate(tx.to_dict(), schemas.parsed["Transaction"], raise_errors=False)
        assert int(tx.event_time.timestamp() * 1000) == minute_ms
        assert tx.amount_cents == amount and tx.currency == "USD"
        assert label.transaction_id == tx.transaction_id
        assert label.scenario == SCENARIOS[scenario] and label.is_fraud == (scenario != 0)
        assert tx.card_id.removeprefix("hb-card-") == tx.account_id.removeprefix("hb-customer-")
        assert 39.0 <= tx.latitude <= 40.0 and -95.0 <= tx.longitude <= -93.8  # a 100 km square
        ids.add(tx.transaction_id)
    assert len(ids) == len(pairs)
    assert pairs[0][0].event_time >= handbook.START


def test_a_stream_reads_the_simulation_once_in_order_and_knows_what_is_due():
    sim = simulate(customers=100, terminals=200, days=5, seed=2)
    stream = handbook.HandbookStream(sim)
    first_day_end = sim.start_ms + handbook.DAY_MS
    due = stream.due(first_day_end)
    assert 0 < due < len(sim)
    seen = []
    while not stream.exhausted:
        seen += stream.next_batch(97)
    assert [tx.transaction_id for tx, _ in seen] == [tx.transaction_id for tx, _ in sim.to_pairs(0, len(sim))]
    assert stream.due(first_day_end) == 0
