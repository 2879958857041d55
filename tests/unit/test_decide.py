"""The decide stage without Kafka: fake messages in, routing decisions out, from both deciders.

The columnar decider must decide exactly as the record-wise one does, and must really decode the
valid current-schema rows in Arrow: its `counts` say which path each row took.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pyruhvro
import pytest

from fraudstream.consumer.decide import DLQ_KIND, DLQ_OFFSET, DLQ_REASON, ColumnarDecider, Route
from fraudstream.consumer.rules import fired, large_amount, rules_from_settings
from fraudstream.serde import make_encoder
from tests.support.decoding import (
    FRAUD_ID,
    LABEL_ID,
    SCHEMAS,
    SETTINGS,
    TRANSACTION_ID,
    FakeMessage,
    FakeRegistry,
    comparable,
    decider_pair,
    disagreements,
    encode,
    encode_v1,
    make_tx,
    messages_of,
    mutated_values,
    record_wise_decider,
)
from tests.support.malformed import corpus


@pytest.fixture
def decider():
    registry = FakeRegistry()
    return record_wise_decider(registry), registry


def generated(count: int, seed: int = 3) -> list[bytes]:
    from fraudstream.producer.generator import Generator

    return [encode(tx.to_dict()) for tx, _ in Generator(seed).next_batch(count, 1_700_000_000_000)]


def legit_current(decisions, values) -> int:
    """Records the record-wise decider accepted that carry the current schema id: the Arrow path's share."""
    return sum(
        d.route is not Route.DEAD_LETTER and v[1:5] == TRANSACTION_ID.to_bytes(4, "big")
        for d, v in zip(decisions, values, strict=True)
    )


def test_threshold_rule_is_strictly_above_900_dollars():
    rule = large_amount(90_000)
    assert fired([rule], make_tx(90_000)) == []
    assert fired([rule], make_tx(90_001)) == ["large_amount"]


def test_one_decision_per_message_in_order(decider):
    decide, registry = decider
    values = [encode(make_tx(a, transaction_id=f"t{i}").to_dict()) for i, a in enumerate([5, 95_000, 7])]
    decisions = decide.decide([FakeMessage(v, offset=i) for i, v in enumerate(values)])
    assert [d.route for d in decisions] == [Route.LEGIT, Route.FRAUD, Route.LEGIT]
    assert decisions[0].value == values[0]  # current-schema records are forwarded byte for byte
    assert decisions[1].value[:5] == b"\x00" + FRAUD_ID.to_bytes(4, "big")
    assert registry.calls == 1  # once for the writer schema id, not per message


def test_schema_fetched_once_per_id(decider):
    decide, registry = decider
    value = encode(make_tx(5).to_dict())
    decide.decide([FakeMessage(value)] * 50)
    decide.decide([FakeMessage(value)] * 50)
    assert registry.calls == 1


def test_bad_records_become_dead_letters_with_reason_and_position(decider):
    decide, _ = decider
    good = encode(make_tx(5).to_dict())
    decisions = decide.decide(
        [
            FakeMessage(b"", offset=3),
            FakeMessage(b"\x00" + (99).to_bytes(4, "big") + good[5:]),
            FakeMessage(good + b"x"),
            FakeMessage(encode(make_tx(5, currency="EUR").to_dict())),
        ]
    )
    kinds = [dict(d.headers)[DLQ_KIND].decode() for d in decisions]
    assert kinds == ["empty_value", "unknown_schema_id", "trailing_bytes", "invalid_record"]
    assert all(d.route is Route.DEAD_LETTER for d in decisions)
    assert dict(decisions[0].headers)[DLQ_OFFSET] == b"3"
    assert b"EUR" in dict(decisions[3].headers)[DLQ_REASON]


@pytest.mark.parametrize("strict", [True, False], ids=["trailing-bytes-rejected", "trailing-bytes-allowed"])
def test_columnar_and_record_wise_deciders_agree(strict):
    record_wise, columnar = decider_pair(reject_trailing_bytes=strict)
    values = generated(3_000)
    good = encode(make_tx(5).to_dict())
    # Bad records spread through the batch; several of them break the Arrow batch decode.
    bad = {
        10: b"",
        500: b"{}",
        1_000: good[:20],
        1_500: good + b"\x00",
        2_000: encode(make_tx(5, currency="CAD").to_dict()),
        2_500: good[:5] + b"\x04\xff\xfe" + good[8:],
    }
    for position, value in bad.items():
        values.insert(position, value)
    messages = messages_of(values)
    expected = record_wise.decide(messages)
    actual = columnar.decide(messages)
    assert [comparable(d) for d in actual] == [comparable(d) for d in expected]
    fraud = sum(d.route is Route.FRAUD for d in actual)
    assert fraud > 10
    # Every valid current-schema record was decoded in Arrow; only the bad ones and the fraud alerts
    # (which carry the whole record) went record by record.
    assert columnar.counts["arrow_rows"] == legit_current(expected, values)
    # Record by record: the four undecodable ones, the trailing byte when it is refused, the alerts. The CAD
    # record is dead-lettered from its columns.
    assert columnar.counts["record_rows"] == 4 + strict
    assert columnar.counts["alerts_from_arrow"] == fraud  # the alerts' records were taken from the Arrow rows


def test_one_corrupt_record_does_not_send_the_batch_record_by_record():
    record_wise, columnar = decider_pair()
    values = [encode(make_tx(5, transaction_id=f"t{i}").to_dict()) for i in range(2_000)]
    values[1_234] = values[1_234][:30]
    decisions = columnar.decide(messages_of(values))
    assert [comparable(d) for d in decisions] == [comparable(d) for d in record_wise.decide(messages_of(values))]
    assert decisions[1_234].dead_letter_kind == "corrupt_avro"
    assert columnar.counts["record_rows"] == 1
    assert columnar.counts["arrow_rows"] == 1_999
    assert columnar.counts["arrow_calls"] <= 2 * (2_000).bit_length() + 1  # halving: about 2 calls per level


def test_the_decode_step_accounts_for_every_message_in_offset_order():
    _, columnar = decider_pair()
    good = [encode(make_tx(5, transaction_id=f"t{i}").to_dict()) for i in range(6)]
    v1_value = encode_v1({k: v for k, v in make_tx(5).to_dict().items() if k != "device_id"})
    values = [
        good[0],
        b"",
        good[1],
        encode(make_tx(5, currency="EUR").to_dict()),
        good[2][:-2],
        v1_value,
        good[3],
        good[4][:5] + b"\x00" * 60,
        good[5],
    ]
    decoded = columnar.decode(messages_of(values))
    assert decoded.rows == [0, 2, 6, 8]
    assert decoded.columns.column("transaction_id").to_pylist() == ["t0", "t1", "t3", "t5"]
    assert list(decoded.dead) == [3] and decoded.dead[3].kind == "invalid_record"
    assert decoded.fallback == [1, 4, 5, 7]
    assert sorted(decoded.rows + list(decoded.dead) + decoded.fallback) == list(range(len(values)))


@pytest.mark.parametrize("strict", [True, False], ids=["trailing-bytes-rejected", "trailing-bytes-allowed"])
def test_every_malformed_kind_is_dead_lettered_alike_by_both_deciders(strict):
    record_wise, columnar = decider_pair(reject_trailing_bytes=strict)
    encode_label = make_encoder(LABEL_ID, SCHEMAS.parsed["Label"])
    tx = make_tx(1_000, transaction_id="ab")
    cases = corpus(tx, encode=encode, encode_v1=encode_v1, encode_label=encode_label)
    assert len(cases) >= 30
    good = encode(tx.to_dict())
    values = [v for value, _ in cases.values() for v in (value, good)]
    messages = messages_of(values)
    expected = record_wise.decide(messages)
    actual = columnar.decide(messages)
    assert [comparable(d) for d in actual] == [comparable(d) for d in expected]
    for (name, (_, kind)), decision in zip(cases.items(), actual[::2], strict=True):
        if kind == "trailing_bytes" and not strict:
            assert decision.route is Route.LEGIT, name
        else:
            assert (decision.route, decision.dead_letter_kind) == (Route.DEAD_LETTER, kind), name
            assert dict(decision.headers)[DLQ_REASON], name
    assert columnar.counts["arrow_rows"] == legit_current(expected, values)


def test_a_short_fuzz_finds_no_disagreement():
    """The long version: python -m tests.support.decoding --records 20000."""
    values = mutated_values(2_000, seed=11)
    result = disagreements(values)
    assert result.found == []
    assert {"LEGIT", "FRAUD", "corrupt_avro", "trailing_bytes", "noncanonical_avro"} <= set(result.tally), result.tally
    assert result.columnar.counts["arrow_rows"] == result.accepted_current > 200  # the valid rows ran in Arrow


def real_panic_type() -> type[BaseException]:
    """pyo3's PanicException, from a real panic: pyruhvro 0.4 panics on a `bytes` field ("not implemented")."""
    schema = json.dumps({"type": "record", "name": "B", "fields": [{"name": "b", "type": "bytes"}]})
    try:
        pyruhvro.deserialize_array([b"\x02a"], schema)
    except BaseException as exc:  # noqa: BLE001 - captured to be re-raised by the fake below
        assert type(exc).__name__ == "PanicException", exc
        return type(exc)
    raise AssertionError("pyruhvro no longer panics on this input: find another way to make a PanicException")


def test_a_rust_panic_is_isolated_like_a_corrupt_record():
    panic = real_panic_type()
    record_wise, columnar = decider_pair()
    values = [encode(make_tx(5, transaction_id=f"t{i}").to_dict()) for i in range(100)]
    poison = values[40]
    real = columnar.deserialize

    def panicking(payloads, schema):
        if poison[5:] in payloads:
            raise panic("boom")
        return real(payloads, schema)

    columnar.deserialize = panicking
    decisions = columnar.decide(messages_of(values))
    assert [comparable(d) for d in decisions] == [comparable(d) for d in record_wise.decide(messages_of(values))]
    assert columnar.counts["panics"] >= 1
    assert columnar.counts["record_rows"] == 1 and columnar.counts["arrow_rows"] == 99


def test_a_decoder_that_always_panics_costs_a_bounded_number_of_tries():
    panic = real_panic_type()
    _, columnar = decider_pair()

    def always(payloads, schema):
        raise panic("boom")

    columnar.deserialize = always
    decisions = columnar.decide(messages_of(generated(2_000)))
    assert all(d.route is not Route.DEAD_LETTER for d in decisions)
    assert columnar.counts["panics"] == (2_000).bit_length() + 1
    assert columnar.counts["record_rows"] == 2_000


def test_keyboard_interrupt_is_not_swallowed():
    _, columnar = decider_pair()

    def interrupted(payloads, schema):
        raise KeyboardInterrupt

    columnar.deserialize = interrupted
    with pytest.raises(KeyboardInterrupt):
        columnar.decide(messages_of(generated(10)))


def test_a_schema_with_fields_the_checks_do_not_cover_is_refused():
    schema = dict(SCHEMAS.expanded["Transaction"])
    schema["fields"] = [*schema["fields"], {"name": "flags", "type": "int", "default": 0}]
    with pytest.raises(ValueError, match=r"flags \(int32\)"):
        ColumnarDecider(record_wise_decider(), reader_schema=schema)


def test_each_rule_gives_the_same_answer_on_records_and_on_columns():
    from fraudstream.producer.generator import Generator

    pairs = Generator(5).next_batch(2_000, 1_700_000_000_000)
    batch = pyruhvro.deserialize_array(
        [encode(tx.to_dict())[5:] for tx, _ in pairs], json.dumps(SCHEMAS.expanded["Transaction"])
    )
    for rule in rules_from_settings(SETTINGS):
        assert rule.fires_on_columns(batch).to_pylist() == [rule.fires(tx) for tx, _ in pairs], rule.name


def test_timestamps_at_the_edges_of_what_python_holds_are_forwarded():
    record_wise, columnar = decider_pair()
    edges = [datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)]
    values = [encode(make_tx(5, event_time=t).to_dict()) for t in edges] + generated(5)
    decisions = columnar.decide(messages_of(values))
    assert [comparable(d) for d in decisions] == [comparable(d) for d in record_wise.decide(messages_of(values))]
    assert [d.route for d in decisions[:2]] == [Route.LEGIT, Route.LEGIT]
    assert columnar.counts["arrow_rows"] == legit_current(decisions, values)


def test_a_nullable_timestamp_column_keeps_its_nulls_and_refuses_values_out_of_range():
    import copy

    from fastavro import parse_schema

    from tests.support.malformed import varint

    schema = copy.deepcopy(SCHEMAS.expanded["Transaction"])
    schema["fields"].append(
        {"name": "settled_at", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}], "default": None}
    )
    columnar = ColumnarDecider(record_wise_decider(), reader_schema=schema)
    encode_settled = make_encoder(TRANSACTION_ID, parse_schema(schema))
    values = [
        encode_settled({**make_tx(5).to_dict(), "settled_at": None}),
        encode_settled({**make_tx(5).to_dict(), "settled_at": datetime(2026, 1, 2, tzinfo=UTC)}),
    ]
    values.append(values[0][:-1] + b"\x02" + varint(253_402_300_800_000))  # one past 9999-12-31T23:59:59.999
    decoded = columnar.decode(messages_of(values))
    assert decoded.rows == [0, 1] and decoded.fallback == [2]
    assert decoded.columns.column("settled_at").null_count == 1
    assert columnar.decode(messages_of(values[:1])).rows == [0]  # a batch where the column is all null
