"""Property: the columnar decider decides every batch exactly as the record-wise decider does, and
decodes in Arrow every record the record-wise decider accepts with the current schema.

Batches mix valid records with edge values (empty and non-ASCII strings, extreme longs and doubles,
the whole timestamp range, every enum symbol, null and non-null device ids) and mutated, truncated
and extended encodings of them.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from fraudstream.consumer.decide import Route
from fraudstream.records import Transaction
from tests.support.decoding import TRANSACTION_ID, comparable, decider_pair, encode, encode_v1, messages_of, mutate
from tests.support.malformed import CHANNELS, YEAR_33000_MS, field_payload, string, varint

INT64 = st.integers(-(2**63), 2**63 - 1)
texts = st.text(max_size=12) | st.sampled_from(["", "é", "日本", "😀", "\x00", "a" * 200])
# Whole milliseconds across all that a Python datetime holds (years 1 to 9999).
times = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999_000)).map(
    lambda t: t.replace(microsecond=t.microsecond // 1000 * 1000, tzinfo=UTC)
)
# Around and past the edges of that range, as raw timestamp-millis values.
MIN_MS, MAX_MS = -62_135_596_800_000, 253_402_300_799_999
millis = st.one_of(
    st.integers(MIN_MS - 2, MIN_MS + 2),
    st.integers(MAX_MS - 2, MAX_MS + 2),
    st.sampled_from([YEAR_33000_MS, -(2**63), 2**63 - 1, 0]),
    INT64,
)
amounts = st.one_of(st.integers(0, 200_000), st.sampled_from([0, 90_000, 90_001, 2**63 - 1, -1, -(2**63)]), INT64)
doubles = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 5e-324, 1.7976931348623157e308])

transactions = st.builds(
    Transaction,
    transaction_id=texts,
    account_id=texts,
    card_id=texts,
    merchant_id=texts,
    merchant_category=texts,
    terminal_id=texts,
    amount_cents=amounts,
    currency=st.sampled_from(["USD", "USD", "USD", "EUR", ""]),
    event_time=times,
    channel=st.sampled_from(CHANNELS),
    country=texts,
    city=texts,
    latitude=doubles,
    longitude=doubles,
    device_id=st.none() | texts,
)


@st.composite
def values(draw) -> bytes:
    tx = draw(transactions)
    record = tx.to_dict()
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter written by a v1 producer
        del record["device_id"]
        value = encode_v1(record)
    else:
        value = encode(record)
    change = draw(st.sampled_from(["none", "none", "mutate", "truncate", "extend", "field"]))
    if change == "field":  # well-formed bytes, a value at or past an edge: any int64 timestamp, enum or union index
        raw = draw(
            st.sampled_from(
                [
                    {"event_time": varint(draw(millis))},
                    {"channel": varint(draw(st.integers(-3, len(CHANNELS) + 2)))},
                    {"device_id": varint(draw(st.integers(-3, 3))) + string(draw(texts).encode())},
                ]
            )
        )
        value = value[:5] + field_payload(
            tx, v1="device_id" not in record, **{k: v for k, v in raw.items() if k in record}
        )
    elif change == "mutate":
        payload = value[5:]
        for _ in range(draw(st.integers(1, 3))):
            payload = mutate(payload, random.Random(draw(st.integers(0, 2**32))))
        value = value[:5] + payload
    elif change == "truncate":
        value = value[: draw(st.integers(0, len(value) - 1))]
    elif change == "extend":
        value = value + draw(st.binary(min_size=1, max_size=4))
    return value


def edge_batch() -> list[bytes]:
    """Valid records at the edges, every enum symbol once, checked on every run (not left to chance)."""
    from tests.support.decoding import make_tx

    edges = [
        make_tx(0, transaction_id="", account_id="", city="", device_id=""),
        make_tx(2**63 - 1, transaction_id="日本😀\x00", device_id="é" * 300),
        make_tx(90_000, event_time=datetime(1, 1, 1, tzinfo=UTC), latitude=float("nan"), longitude=float("-inf")),
        make_tx(
            90_001, event_time=datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC), latitude=-0.0, longitude=5e-324
        ),
        make_tx(-1),
        make_tx(5, currency=""),
    ] + [make_tx(5, channel=symbol, device_id=None) for symbol in CHANNELS]
    return [encode(tx.to_dict()) for tx in edges]


# No shrinking: a batch shrinks slowly (minutes), and the assertion already names the first value that differs.
@settings(
    max_examples=150,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(values(), min_size=1, max_size=40), st.booleans())
@example(edge_batch(), True)
def test_both_deciders_decide_every_batch_alike(batch, strict):
    record_wise, columnar = decider_pair(reject_trailing_bytes=strict)
    messages = messages_of(batch)
    expected = record_wise.decide(messages)
    actual = columnar.decide(messages)
    for value, want, got in zip(batch, expected, actual, strict=True):
        assert comparable(got) == comparable(want), (value.hex() if value is not None else None, want, got)
    current = TRANSACTION_ID.to_bytes(4, "big")
    accepted = sum(d.route is not Route.DEAD_LETTER and v[1:5] == current for d, v in zip(expected, batch, strict=True))
    assert columnar.counts["arrow_rows"] == accepted  # the columnar path really decoded them
