"""Per-card and per-terminal features: the batch path equals the one-by-one specification, and
the features mean what they say."""

from __future__ import annotations

import io

import fastavro
import numpy as np
import pyruhvro
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fraudstream.consumer.features as features
from fraudstream.consumer.features import (
    CARD_FEATURES,
    CHANNELS,
    HOUR_MS,
    MINUTE_MS,
    PROFILE_DTYPE,
    PROFILE_TTL_MS,
    TERMINAL_DTYPE,
    TERMINAL_FEATURES,
    TERMINAL_TTL_MS,
    TxColumns,
    card_features,
    card_features_one,
    expiry_horizon,
    terminal_features,
    terminal_features_one,
)
from fraudstream.consumer.state.table import KeyedTable
from fraudstream.schemas import load_schemas
from fraudstream.settings import Settings
from fraudstream.producer.generator import Generator, build_population

T0 = 1_767_600_000_000
CITIES = [(40.71, -74.01), (40.80, -73.95), (51.51, -0.13), (34.05, -118.24), (35.68, 139.69), (40.72, -74.00)]
STEPS_MS = [0, 1, 1_000, 30_000, 5 * MINUTE_MS, 11 * MINUTE_MS, 2 * HOUR_MS, PROFILE_TTL_MS + 1, -10_000]


def record(
    i: int,
    *,
    card: str,
    t: int,
    channel: str = "CARD_PRESENT",
    amount: int = 2_000,
    city: int = 0,
    device: str | None = None,
    terminal: str = "term-1",
    mcc: str = "5411",
) -> dict:
    lat, lon = CITIES[city]
    return {
        "transaction_id": f"tx-{i}",
        "account_id": "acct-1",
        "card_id": card,
        "merchant_id": "m",
        "merchant_category": mcc,
        "terminal_id": terminal,
        "amount_cents": amount,
        "currency": "USD",
        "event_time": t,
        "channel": channel,
        "country": "US",
        "city": "c",
        "latitude": lat,
        "longitude": lon,
        "device_id": device,
    }


transactions = st.lists(
    st.tuples(
        st.sampled_from(["card-a", "card-b", "card-c", "card-d"]),
        st.sampled_from(STEPS_MS),
        st.sampled_from(CHANNELS),
        st.sampled_from([50, 249, 300, 501, 2_000, 95_000]),
        st.integers(0, len(CITIES) - 1),
        st.sampled_from([None, "dev-1", "dev-2", "dev-3", "dev-4", "dev-5"]),
        st.sampled_from(["term-1", "term-2", "term-3"]),
        st.sampled_from(["5411", "5815", "7011"]),
    ),
    min_size=1,
    max_size=60,
)


def build(drawn: list) -> list[dict]:
    records, t = [], T0
    for i, (card, step, channel, amount, city, device, terminal, mcc) in enumerate(drawn):
        t += step
        records.append(
            record(
                i, card=card, t=t, channel=channel, amount=amount, city=city, device=device, terminal=terminal, mcc=mcc
            )
        )
    return records


def in_batches(records: list[dict], cuts: list[int]) -> list[list[dict]]:
    bounds = sorted({0, len(records), *[c % (len(records) + 1) for c in cuts]})
    return [records[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def batch_path(records: list[dict], cuts: list[int], kernel, dtype) -> tuple[dict, KeyedTable]:
    table, parts = KeyedTable(dtype, capacity=2), []
    for batch in in_batches(records, cuts):
        parts.append(kernel(table, TxColumns.from_records(batch)))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}, table


def scalar_path(records: list[dict], one, key: str) -> tuple[list[dict], dict]:
    profiles, out = {}, []
    for r in records:
        f, profiles[r[key]] = one(profiles.get(r[key]), r)
        out.append(f)
    return out, profiles


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transactions, st.lists(st.integers(0, 60), max_size=4))
def test_card_features_on_batches_equal_the_one_by_one_spec(drawn: list, cuts: list[int]) -> None:
    records = build(drawn)
    batch, table = batch_path(records, cuts, card_features, PROFILE_DTYPE)
    one, profiles = scalar_path(records, card_features_one, "card_id")

    for name in CARD_FEATURES:
        assert batch[name].tolist() == [f[name] for f in one], name
    for card, profile in profiles.items():
        assert table.rows[table.lookup([card.encode()])[0]].tobytes() == profile.tobytes()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transactions, st.lists(st.integers(0, 60), max_size=4))
def test_terminal_features_on_batches_equal_the_one_by_one_spec(drawn: list, cuts: list[int]) -> None:
    records = build(drawn)
    batch, table = batch_path(records, cuts, terminal_features, TERMINAL_DTYPE)
    one, profiles = scalar_path(records, terminal_features_one, "terminal_id")

    for name in TERMINAL_FEATURES:
        assert batch[name].tolist() == [f[name] for f in one], name
    for terminal, profile in profiles.items():
        assert table.rows[table.lookup([terminal.encode()])[0]].tobytes() == profile.tobytes()


def test_a_batch_takes_as_many_rounds_as_its_busiest_card_has_transactions(monkeypatch) -> None:
    rounds = []
    real = features._card_round
    monkeypatch.setattr(
        features, "_card_round", lambda p, tx, out, index: (rounds.append(len(index)), real(p, tx, out, index))
    )
    records = [record(i, card=f"card-{i}", t=T0 + i) for i in range(500)]
    records += [record(500 + i, card="card-7", t=T0 + 1_000 + i) for i in range(3)]
    card_features(KeyedTable(PROFILE_DTYPE), TxColumns.from_records(records))

    assert rounds == [500, 1, 1, 1]  # vector work per round, not per record


def test_the_arrow_decoder_and_the_record_decoder_give_the_same_columns() -> None:
    schema = load_schemas(Settings().schemas_dir)
    pairs = Generator(5, population=build_population(5, accounts=100)).next_batch(300, T0)
    dicts = [tx.to_dict() for tx, _ in pairs]
    payloads = []
    for d in dicts:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, schema.parsed["Transaction"], d)
        payloads.append(out.getvalue())
    from_arrow = TxColumns.from_arrow(pyruhvro.deserialize_array(payloads, schema.text("Transaction")))
    from_records = TxColumns.from_records(dicts)

    assert any(d["device_id"] is None for d in dicts) and any(d["device_id"] for d in dicts)
    for name in TxColumns.__dataclass_fields__:
        left, right = getattr(from_arrow, name), getattr(from_records, name)
        assert left.dtype == right.dtype and left.tolist() == right.tolist(), name


def test_concat_in_order_puts_rows_back_in_offset_order() -> None:
    records = [record(i, card="card-a", t=T0 + i) for i in range(6)]
    odd = TxColumns.from_records(records[1::2])
    even = TxColumns.from_records(records[0::2])
    joined = TxColumns.concat_in_order([([1, 3, 5], odd), ([0, 2, 4], even)])

    assert joined.transaction_id.tolist() == [f"tx-{i}" for i in range(6)]
    assert len(TxColumns.concat_in_order([])) == 0


def one_by_one(records: list[dict]) -> list[dict]:
    return scalar_path(records, card_features_one, "card_id")[0]


def test_impossible_travel_a_stay_away_and_a_home_that_a_short_trip_does_not_move() -> None:
    home = [record(0, card="c", t=T0, city=0)]  # a single vote for New York
    t = home[-1]["event_time"]
    trip = [
        record(10, card="c", t=t + 10 * MINUTE_MS, city=2),  # London, 10 minutes after New York
        record(11, card="c", t=t + 11 * MINUTE_MS, city=2),
        record(12, card="c", t=t + 3 * HOUR_MS, city=0),
    ]  # back home
    f = one_by_one(home + trip)

    london, again, back = f[1], f[2], f[3]
    assert 5_500 < london["dist_prev_km"] < 5_650 and london["speed_kmh"] == london["dist_prev_km"] * 6
    assert london["dist_home_km"] == london["dist_prev_km"] and london["stay_kmh"] == london["speed_kmh"]
    assert again["dist_prev_km"] < 1 and again["stay_kmh"] == london["speed_kmh"] and again["stay_s"] == 60.0
    assert again["dist_home_km"] > 5_500  # the home area stayed in New York
    assert back["dist_home_km"] < 1 and back["stay_kmh"] == back["speed_kmh"]


def test_online_payments_have_no_location_and_do_not_move_the_card() -> None:
    f = one_by_one(
        [
            record(0, card="c", t=T0, city=0),
            record(1, card="c", t=T0 + MINUTE_MS, city=4, channel="ONLINE", device="d"),
            record(2, card="c", t=T0 + 2 * MINUTE_MS, city=0),
        ]
    )

    assert (f[1]["dist_prev_km"], f[1]["speed_kmh"], f[1]["dist_home_km"]) == (0.0, 0.0, 0.0)
    assert f[2]["dist_prev_km"] < 1


def test_a_card_testing_session_counts_small_payments_and_follows_the_new_device() -> None:
    r = [
        record(0, card="c", t=T0, channel="ONLINE", device="own"),
        record(1, card="c", t=T0 + HOUR_MS, channel="ONLINE", amount=120, device="thief", mcc="5815"),
        record(2, card="c", t=T0 + HOUR_MS + 5_000, channel="ONLINE", amount=80, device="thief", mcc="5815"),
        record(3, card="c", t=T0 + HOUR_MS + 60_000, channel="ONLINE", amount=60_000, device="thief"),
        record(4, card="c", t=T0 + 2 * HOUR_MS, channel="ONLINE", amount=70, device="own"),
    ]
    f = one_by_one(r)

    assert [x["new_device"] for x in f] == [True, True, False, False, False]
    assert [x["session_n"] for x in f] == [0, 0, 1, 2, 0]  # the last one starts a new session
    assert [x["session_small"] for x in f] == [0, 0, 1, 2, 0]
    assert [x["session_device"] for x in f] == [False, False, True, True, False]
    assert [x["gap_s"] for x in f][:3] == [-1.0, 3_600.0, 5.0]


def test_small_payments_in_person_are_not_card_tests() -> None:
    f = one_by_one(
        [
            record(0, card="c", t=T0, channel="CONTACTLESS", amount=150),
            record(1, card="c", t=T0 + 60_000, channel="ONLINE", amount=150, device="d"),
            record(2, card="c", t=T0 + 120_000, channel="ONLINE", amount=150, device="d"),
        ]
    )

    assert [x["session_n"] for x in f] == [0, 1, 2]
    assert [x["session_small"] for x in f] == [0, 0, 1]


def test_a_profile_idle_longer_than_its_ttl_reads_as_absent() -> None:
    first = record(0, card="c", t=T0, channel="ONLINE", device="d")
    late = record(1, card="c", t=T0 + PROFILE_TTL_MS + 1, channel="ONLINE", device="d", amount=50)

    assert one_by_one([first, late])[1] == one_by_one([late])[0]
    assert one_by_one([first, {**late, "event_time": T0 + PROFILE_TTL_MS}])[1]["card_n"] == 1


def test_physical_expiry_between_batches_never_changes_a_feature() -> None:
    stream = Generator(9, population=build_population(9, accounts=300)).stream(T0, 1.0 / 3_600)  # ~1 tx/hour
    records = [tx.to_dict() for tx, _ in (next(stream) for _ in range(4_000))]
    kept, expired = KeyedTable(PROFILE_DTYPE), KeyedTable(PROFILE_DTYPE)
    kept_t, expired_t = KeyedTable(TERMINAL_DTYPE), KeyedTable(TERMINAL_DTYPE)
    dropped = 0
    for start in range(0, len(records), 250):
        tx = TxColumns.from_records(records[start : start + 250])
        a, b = card_features(kept, tx), card_features(expired, tx)
        c, d = terminal_features(kept_t, tx), terminal_features(expired_t, tx)
        for name in CARD_FEATURES:
            assert a[name].tolist() == b[name].tolist(), name
        assert c["terminal_cards"].tolist() == d["terminal_cards"].tolist()
        watermark = int(tx.event_time_ms.max())
        dropped += len(expired.expire("last_ms", expiry_horizon(watermark, ttl_ms=PROFILE_TTL_MS)))
        dropped += len(expired_t.expire("last_ms", expiry_horizon(watermark, ttl_ms=TERMINAL_TTL_MS)))

    assert dropped > 0 and len(expired) < len(kept)  # expiry really ran


def test_a_terminal_counts_other_recent_cards() -> None:
    r = [
        record(0, card="a", t=T0),
        record(1, card="b", t=T0 + 30_000),
        record(2, card="b", t=T0 + 60_000),
        record(3, card="c", t=T0 + 90_000),
        record(4, card="d", t=T0 + 90_000 + TERMINAL_TTL_MS + 1),
    ]
    f = scalar_path(r, terminal_features_one, "terminal_id")[0]

    assert [x["terminal_cards"] for x in f] == [0, 1, 1, 2, 0]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=40)), min_size=1, max_size=30), st.integers(0, 5))
def test_the_vectorized_hash_equals_the_scalar_one_on_any_text_and_any_arrow_slice(values: list, skip: int) -> None:
    import pyarrow as pa

    from fraudstream.consumer.features import hash_strings, stable_hash

    expected = [stable_hash(v) for v in values]
    assert hash_strings(values).tolist() == expected
    sliced = pa.array([None] * skip + values, type=pa.string()).slice(skip)  # an offset into shared buffers
    assert hash_strings(sliced).tolist() == expected
    assert all((h == 0) == (v is None) for h, v in zip(expected, values))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 24), st.lists(st.binary(min_size=24, max_size=24), min_size=2, max_size=40), st.integers(0, 5))
def test_the_hash_of_fixed_width_ids_equals_the_scalar_one(width: int, raw: list, skip: int) -> None:
    """Values all of one length (ids like the generator's) take the hash's matrix path; values of mixed
    lengths, nulls included, the masked one: both give the scalar hash, on any Arrow slice."""
    import pyarrow as pa

    from fraudstream.consumer.features import hash_strings, stable_hash

    fixed = [value[:width] for value in raw]
    for values in (fixed, fixed[:-1] + [fixed[-1][:-1]], [None, *fixed]):
        expected = [stable_hash(v) for v in values]
        sliced = pa.array([b"x" * (width + 3)] * skip + values, type=pa.binary()).slice(skip)
        assert hash_strings(sliced).tolist() == expected
        assert hash_strings(values).tolist() == expected


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transactions, st.lists(st.integers(0, 60), max_size=4), st.lists(st.integers(0, 2), min_size=4, max_size=4))
def test_card_features_of_several_partitions_at_once_equal_each_partition_alone(
    drawn: list, cuts: list[int], homes: list[int]
) -> None:
    """The detector runs a batch's partitions through card_features_split at once, each with its own table:
    features and profiles are those of each partition's rows run alone with its table, and the rounds are
    shared (as many as the batch's busiest card needs, not a set per partition)."""
    from collections import Counter

    from fraudstream.consumer.features import card_features_split

    records = build(drawn)
    home = dict(zip(["card-a", "card-b", "card-c", "card-d"], homes, strict=True))  # a card lives in one partition
    together = [KeyedTable(PROFILE_DTYPE, capacity=2) for _ in range(3)]
    alone = [KeyedTable(PROFILE_DTYPE, capacity=2) for _ in range(3)]
    rounds, expected_rounds = [], 0
    real = features._card_round

    def counting(*args):
        rounds.append(1)
        return real(*args)

    for batch in in_batches(records, cuts):
        tx = TxColumns.from_records(batch)
        which = np.array([home[r["card_id"]] for r in batch])
        features._card_round, rounds_before = counting, len(rounds)
        try:
            got = card_features_split(together, which, tx)
        finally:
            features._card_round = real
        expected_rounds += max(Counter(r["card_id"] for r in batch).values())
        assert len(rounds) - rounds_before == max(Counter(r["card_id"] for r in batch).values())
        for k in range(3):
            rows = np.flatnonzero(which == k)
            if not len(rows):
                continue
            want = card_features(alone[k], tx.take(rows))
            for name in CARD_FEATURES:
                assert got[name][rows].tolist() == want[name].tolist(), name
    assert len(rounds) == expected_rounds
    for k in range(3):
        assert sorted(together[k].keys()) == sorted(alone[k].keys())
        for key in alone[k].keys():
            assert (
                together[k].rows[together[k].lookup([key])[0]].tobytes()
                == alone[k].rows[alone[k].lookup([key])[0]].tobytes()
            )
        assert together[k].take_dirty()[0] == alone[k].take_dirty()[0]
