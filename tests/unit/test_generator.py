"""The generator: pure, seeded, labelled, and each scenario looks like what its name says."""

from __future__ import annotations

import random
import statistics
import uuid
from collections import Counter, defaultdict
from itertools import islice

import pytest
from fastavro.validation import validate

from fraudstream.errors import ConfigError
from fraudstream.records import Transaction
from fraudstream.schemas import load_schemas
from fraudstream.settings import Settings
from fraudstream.producer.generator import (
    CARD_TESTING,
    CARD_TESTS,
    COMPROMISED_TERMINAL,
    DEFAULT_LARGE_LEGIT_SHARE,
    DEFAULT_SHARES,
    FAR_FROM_HOME,
    FAR_KM,
    FRAUD_SCENARIOS,
    LARGE_AMOUNT,
    LEGIT,
    SCENARIOS,
    SEED_THRESHOLD_CENTS,
    Generator,
    Pair,
    build_population,
    distance_km,
    resolve_shares,
    uuid4_text,
)

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
# A slow simulated clock keeps multi-minute episodes short in transactions, so that few are cut off
# at the end of a sample and shares can be compared with their targets.
SIM_RATE = 50.0
HIGH_SHARES = {name: 0.04 for name in FRAUD_SCENARIOS}  # enough fraud for tight statistics


def sample(n: int, *, seed: int = 7, **options) -> list[Pair]:
    return list(islice(Generator(seed, **options).stream(START_MS, SIM_RATE), n))


@pytest.fixture(scope="module")
def default_sample() -> list[Pair]:
    return sample(150_000)


@pytest.fixture(scope="module")
def fraud_heavy_sample() -> list[Pair]:
    return sample(150_000, shares=HIGH_SHARES)


def test_same_seed_and_clock_give_the_same_records():
    first, second = Generator(3), Generator(3)
    for step in range(50):
        now_ms = START_MS + step * 37
        assert first.next_batch(200, now_ms) == second.next_batch(200, now_ms)
    simulated = [list(islice(Generator(3).stream(START_MS, 500), 5_000)) for _ in range(2)]
    assert simulated[0] == simulated[1]


def test_another_seed_gives_other_records():
    assert Generator(3).next_batch(100, START_MS) != Generator(4).next_batch(100, START_MS)


def test_population_is_built_once_per_seed_and_is_the_same_for_a_seed():
    assert Generator(11).population is Generator(11).population
    assert build_population(12, accounts=50) == build_population(12, accounts=50)
    assert build_population(12, accounts=50).accounts != build_population(13, accounts=50).accounts


def test_fraud_shares_hold_over_a_large_sample(fraud_heavy_sample):
    counts = Counter(label.scenario for _, label in fraud_heavy_sample)
    for name, share in HIGH_SHARES.items():
        assert counts[name] / len(fraud_heavy_sample) == pytest.approx(share, rel=0.12), name


def test_default_shares_hold_over_a_large_sample(default_sample):
    n = len(default_sample)
    counts = Counter(label.scenario for _, label in default_sample)
    assert counts[LARGE_AMOUNT] / n == pytest.approx(DEFAULT_SHARES[LARGE_AMOUNT], rel=0.1)
    fraud = sum(counts[name] for name in FRAUD_SCENARIOS)
    assert fraud / n == pytest.approx(sum(DEFAULT_SHARES.values()), rel=0.1)
    assert set(counts) == set(SCENARIOS)


def test_a_zero_share_turns_a_scenario_off():
    pairs = sample(20_000, shares={CARD_TESTING: 0.0})
    assert CARD_TESTING not in {label.scenario for _, label in pairs}


def test_large_legit_purchases_make_false_positives_for_the_threshold(default_sample):
    above = Counter(label.scenario for tx, label in default_sample if tx.amount_cents > SEED_THRESHOLD_CENTS)
    assert above[LEGIT] / len(default_sample) == pytest.approx(DEFAULT_LARGE_LEGIT_SHARE, rel=0.25)
    assert set(above) == {LEGIT, LARGE_AMOUNT}  # the other scenarios stay under the threshold


def test_every_label_matches_its_transaction(default_sample, fraud_heavy_sample):
    for pairs in (default_sample, fraud_heavy_sample):
        for tx, label in pairs:
            assert label.transaction_id == tx.transaction_id
            assert label.scenario in SCENARIOS
            assert label.is_fraud == (label.scenario != LEGIT)
        assert len({tx.transaction_id for tx, _ in pairs}) == len(pairs)


def test_records_validate_against_the_avro_schemas(fraud_heavy_sample):
    schemas = load_schemas(Settings().schemas_dir)
    seen = set()
    for tx, label in fraud_heavy_sample[:20_000]:
        assert validate(tx.to_dict(), schemas.parsed["Transaction"], raise_errors=True)
        assert validate(label.to_dict(), schemas.parsed["Label"], raise_errors=True)
        seen.add((label.scenario, tx.channel))
    assert {scenario for scenario, _ in seen} == set(SCENARIOS)
    assert {channel for _, channel in seen} == {"CARD_PRESENT", "CONTACTLESS", "ONLINE", "ATM"}


def test_transaction_ids_are_version_4_uuids():
    rng = random.Random(1)
    for _ in range(1_000):
        bits = rng.getrandbits(128)
        assert uuid4_text(bits) == str(uuid.UUID(int=bits, version=4))


def test_event_times_follow_the_clock():
    generator = Generator(5)
    batch = generator.next_batch(300, START_MS + 1_234)
    assert {int(tx.event_time.timestamp() * 1000) for tx, _ in batch} == {START_MS + 1_234}
    times = [tx.event_time for tx, _ in islice(Generator(5).stream(START_MS, 1_000), 20_000)]
    assert times == sorted(times)
    assert int(times[-1].timestamp() * 1000) == START_MS + 19_999


def test_episodes_play_out_in_event_time_not_in_transaction_counts():
    """Follow-up steps of an episode wait for their event time, however many transactions are made meanwhile."""
    generator = Generator(5, shares={CARD_TESTING: 0.05})
    generator.next_batch(2_000, START_MS)  # a frozen clock: no follow-up step is due yet
    waiting = generator.pending
    assert waiting > 50
    later = generator.next_batch(waiting, START_MS + 3_600_000)  # an hour later, every one of them is
    assert all(label.is_fraud for _, label in later)
    assert generator.pending == 0


# -- each scenario looks like its name ------------------------------------------------------------


def test_large_amount_is_the_seeds_scenario(fraud_heavy_sample):
    amounts = [tx.amount_cents for tx, label in fraud_heavy_sample if label.scenario == LARGE_AMOUNT]
    assert amounts and min(amounts) > SEED_THRESHOLD_CENTS


def test_card_testing_is_a_burst_of_tiny_online_payments_then_a_large_one(fraud_heavy_sample):
    episodes: dict[tuple[str, str | None], list] = defaultdict(list)  # the fraudster's device marks an episode
    for tx, label in fraud_heavy_sample:
        if label.scenario == CARD_TESTING:
            assert tx.channel == "ONLINE" and tx.device_id
            episodes[tx.card_id, tx.device_id].append(tx)
    complete = 0
    for card, txs in episodes.items():
        tiny = [tx for tx in txs if tx.amount_cents < 300]
        large = [tx for tx in txs if tx.amount_cents >= 30_000]
        assert len(tiny) + len(large) == len(txs), card
        if large:
            complete += 1
            assert len(large) == 1 and CARD_TESTS[0] <= len(tiny) <= CARD_TESTS[1], card
            assert (max(tx.event_time for tx in tiny) - min(tx.event_time for tx in tiny)).total_seconds() <= 90
            assert max(tx.event_time for tx in tiny) <= min(tx.event_time for tx in large), card
            assert all(tx.amount_cents <= SEED_THRESHOLD_CENTS for tx in large)
    assert complete > 0.9 * len(episodes)


def test_far_from_home_follows_a_genuine_purchase_at_home_within_minutes(fraud_heavy_sample):
    population = Generator(7).population
    home_of = {account.account_id: population.places[account.home] for account in population.accounts}
    place_of = {terminal.terminal_id: population.places[terminal.place] for terminal in population.terminals}
    last_used_at_home: dict[str, Transaction] = {}  # card -> its latest genuine in-person use at home
    checked = 0
    for tx, label in fraud_heavy_sample:
        home = home_of[tx.account_id]
        if label.scenario == LEGIT and tx.channel != "ONLINE" and place_of[tx.terminal_id] == home:
            last_used_at_home[tx.card_id] = tx
        elif label.scenario == FAR_FROM_HOME:
            assert distance_km(home, place_of[tx.terminal_id]) > FAR_KM
            assert tx.channel in ("CARD_PRESENT", "ATM")
            at_home = last_used_at_home.get(tx.card_id)
            assert at_home is not None and (tx.event_time - at_home.event_time).total_seconds() < 10 * 60
            checked += 1
    assert checked > 1_000


def test_compromised_terminal_takes_many_cards_at_one_terminal(fraud_heavy_sample):
    by_terminal: dict[str, set[str]] = defaultdict(set)
    for tx, label in fraud_heavy_sample:
        if label.scenario == COMPROMISED_TERMINAL:
            assert tx.channel in ("CARD_PRESENT", "CONTACTLESS", "ATM")
            assert tx.amount_cents <= SEED_THRESHOLD_CENTS
            by_terminal[tx.terminal_id].add(tx.card_id)
    assert statistics.mean(len(cards) for cards in by_terminal.values()) >= 4


# -- a portfolio, not noise ---------------------------------------------------------------------


def test_accounts_pay_during_their_active_hours(default_sample):
    population = Generator(7).population
    accounts = {account.account_id: account for account in population.accounts}
    for tx, label in default_sample:
        if label.scenario == COMPROMISED_TERMINAL:  # victims are whoever the terminal skims
            continue
        account = accounts[tx.account_id]
        local = (tx.event_time.hour + population.places[account.home].utc_offset_h) % 24
        assert account.active_from_h <= local < account.active_to_h or local < account.active_to_h - 24


def test_legit_traffic_stays_near_home_or_online(default_sample):
    population = Generator(7).population
    home_city = {a.account_id: population.places[a.home].city for a in population.accounts}
    legit = [tx for tx, label in default_sample if label.scenario == LEGIT]
    near = sum(tx.city == home_city[tx.account_id] or tx.channel == "ONLINE" for tx in legit)
    assert near / len(legit) > 0.98


def test_heavy_spenders_spend_more_than_light_ones(default_sample):
    population = Generator(7).population
    ranked = sorted(population.accounts, key=lambda a: a.typical_amount_cents)
    light = {a.account_id for a in ranked[: len(ranked) // 10]}
    heavy = {a.account_id for a in ranked[-len(ranked) // 10 :]}
    legit = [(tx.account_id, tx.amount_cents) for tx, label in default_sample if label.scenario == LEGIT]
    light_median = statistics.median(amount for account, amount in legit if account in light)
    heavy_median = statistics.median(amount for account, amount in legit if account in heavy)
    assert heavy_median > 3 * light_median


# -- configuration ----------------------------------------------------------------------------


def test_unknown_or_invalid_shares_are_rejected():
    with pytest.raises(ConfigError, match="unknown fraud scenario"):
        resolve_shares({"phishing": 0.1})
    with pytest.raises(ConfigError, match="fraction"):
        resolve_shares({CARD_TESTING: 1.5})
    with pytest.raises(ConfigError, match="too large"):
        Generator(1, shares={CARD_TESTING: 0.6})
    assert resolve_shares({CARD_TESTING: 0.02}) == {**DEFAULT_SHARES, CARD_TESTING: 0.02}
