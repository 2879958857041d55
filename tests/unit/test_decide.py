"""The decide stage without Kafka: fake messages in, routing decisions out."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from consumer.decide import DLQ_KIND, DLQ_OFFSET, DLQ_REASON, Decider, Route
from consumer.rules import fired, large_amount, rules_from_settings
from fraudstream.records import Transaction
from fraudstream.registry import UnknownSchema
from fraudstream.schemas import load_schemas
from fraudstream.serde import Decoder, make_encoder
from fraudstream.settings import Settings

SCHEMAS = load_schemas(Settings().schemas_dir)
TRANSACTION_ID, FRAUD_ID = 11, 12


class FakeMessage:
    def __init__(self, value, key=b"acc", offset=0, headers=None):
        self._value, self._key, self._offset, self._headers = value, key, offset, headers

    def value(self): return self._value
    def key(self): return self._key
    def topic(self): return "transactions"
    def partition(self): return 0
    def offset(self): return self._offset
    def headers(self): return self._headers


class FakeRegistry:
    def __init__(self, schemas: dict[int, dict]):
        self.schemas, self.calls = schemas, 0

    def schema_by_id(self, schema_id: int) -> dict:
        self.calls += 1
        if schema_id not in self.schemas:
            raise UnknownSchema(f"schema id {schema_id} is not in the registry")
        return self.schemas[schema_id]


def make_tx(amount_cents: int, **changes) -> Transaction:
    fields = dict(transaction_id="t-1", account_id="acc", card_id="c", merchant_id="m", merchant_category="5411",
                  terminal_id="term", amount_cents=amount_cents, event_time=datetime(2026, 1, 1, tzinfo=timezone.utc),
                  channel="ONLINE", country="US", city="Austin", latitude=30.2, longitude=-97.7)
    fields.update(changes)
    return Transaction(**fields)


@pytest.fixture
def decider():
    registry = FakeRegistry({TRANSACTION_ID: SCHEMAS.expanded["Transaction"]})
    decoder = Decoder(registry, SCHEMAS.expanded["Transaction"])
    return Decider(decoder, rules_from_settings(Settings()), legit_schema_id=TRANSACTION_ID,
                   legit_schema=SCHEMAS.parsed["Transaction"], fraud_schema_id=FRAUD_ID,
                   fraud_schema=SCHEMAS.parsed["FraudAlert"]), registry


encode = make_encoder(TRANSACTION_ID, SCHEMAS.parsed["Transaction"])


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
    decisions = decide.decide([FakeMessage(b"", offset=3), FakeMessage(b"\x00" + (99).to_bytes(4, "big") + good[5:]),
                               FakeMessage(good + b"x"), FakeMessage(encode(make_tx(5, currency="EUR").to_dict()))])
    kinds = [dict(d.headers)[DLQ_KIND].decode() for d in decisions]
    assert kinds == ["empty_value", "unknown_schema_id", "trailing_bytes", "invalid_record"]
    assert all(d.route is Route.DEAD_LETTER for d in decisions)
    assert dict(decisions[0].headers)[DLQ_OFFSET] == b"3"
    assert b"EUR" in dict(decisions[3].headers)[DLQ_REASON]


def comparable(decision):
    """A decision without the moment it was made (FraudAlert.detected_at differs between two runs)."""
    if decision.route is not Route.FRAUD:
        return decision.route, decision.value, decision.dead_letter_kind
    import io

    from fastavro import schemaless_reader

    alert = schemaless_reader(io.BytesIO(decision.value[5:]), SCHEMAS.parsed["FraudAlert"], None)
    return decision.route, decision.value[:5], alert["transaction"], alert["rules"]


def test_columnar_and_record_wise_deciders_agree(decider):
    from consumer.decide import ColumnarDecider
    from producer.generator import Generator

    strict, _ = decider
    record_wise = Decider(strict.decoder, strict.rules, legit_schema_id=TRANSACTION_ID,
                          legit_schema=SCHEMAS.parsed["Transaction"], fraud_schema_id=FRAUD_ID,
                          fraud_schema=SCHEMAS.parsed["FraudAlert"], reject_trailing_bytes=False)
    columnar = ColumnarDecider(record_wise, reader_schema=SCHEMAS.expanded["Transaction"])
    pairs = Generator(3).next_batch(3_000, 1_700_000_000_000)
    messages = [FakeMessage(encode(tx.to_dict()), offset=i) for i, (tx, _) in enumerate(pairs)]
    good = encode(make_tx(5).to_dict())
    # Bad records spread through the batch, including one that breaks the Arrow batch decode.
    for position, value in ((10, b""), (500, b"{}"), (1_000, good[:20]), (2_000, encode(make_tx(5, currency="CAD").to_dict()))):
        messages.insert(position, FakeMessage(value, offset=position))
    expected = record_wise.decide(messages)
    actual = columnar.decide(messages)
    assert [comparable(d) for d in actual] == [comparable(d) for d in expected]
    assert sum(d.route is Route.FRAUD for d in actual) > 10


def test_each_rule_gives_the_same_answer_on_records_and_on_columns():
    import json

    import pyruhvro

    from producer.generator import Generator

    pairs = Generator(5).next_batch(2_000, 1_700_000_000_000)
    batch = pyruhvro.deserialize_array([encode(tx.to_dict())[5:] for tx, _ in pairs],
                                       json.dumps(SCHEMAS.expanded["Transaction"]))
    for rule in rules_from_settings(Settings()):
        assert rule.fires_on_columns(batch).to_pylist() == [rule.fires(tx) for tx, _ in pairs], rule.name
