"""Held records' rows (consumer/held.py): what goes in comes back, byte for byte, and what does not fit is
refused before it is held."""

from __future__ import annotations

import numpy as np

from fraudstream.consumer import held
from fraudstream.consumer.state.table import KeyedTable


def test_a_held_row_gives_back_its_input_record_and_its_features() -> None:
    table = KeyedTable(held.HELD_DTYPE)
    keys = [held.position_key(3, 1_234_567), held.position_key(0, 0)]
    values = [b"\x00\x00\x00\x00\x07" + bytes(range(200)), b"\x00\x00\x00\x00\x07"]
    held.hold(
        table,
        keys,
        event_time_ms=np.array([10, 20]),
        created_ms=np.array([111, 222]),
        terminal=np.array([5, 6]),
        card=np.array([7, 8]),
        dist_home_km=np.array([150.5, 0.0]),
        score=np.array([0.25, 0.0]),
        channel=np.array([1, 2]),
        record_keys=[b"acct-000042", None],
        values=values,
        rule_set=b"7a1da86cf7bd",
    )

    dirty_keys, rows = table.take_dirty()
    assert sorted(dirty_keys) == sorted(keys)  # both go to the changelog with the batch
    order = [dirty_keys.index(k) for k in keys]
    rows = rows[order]
    back = held.records_of(rows, keys, "payments")
    assert [(r.partition(), r.offset(), r.key(), r.value(), r.timestamp()[1]) for r in back] == [
        (3, 1_234_567, b"acct-000042", values[0], 111),
        (0, 0, None, values[1], 222),
    ]
    assert rows["dist_home_km"].tolist() == [150.5, 0.0] and rows["terminal"].tolist() == [5, 6]
    assert rows["rule_set"].tolist() == [b"7a1da86cf7bd"] * 2

    table.remove([keys[0]])
    assert table.take_removed() == [keys[0]] and len(table) == 1  # a tombstone for the released one


def test_a_record_too_large_for_a_held_row_does_not_fit() -> None:
    assert held.fits(b"k" * held.KEY_BYTES, b"v" * held.VALUE_BYTES, b"r" * held.RULE_SET_BYTES)
    assert not held.fits(b"k", b"v" * (held.VALUE_BYTES + 1), b"7")
    assert not held.fits(b"k" * (held.KEY_BYTES + 1), b"v", b"7")
    assert not held.fits(b"k", b"v", b"r" * (held.RULE_SET_BYTES + 1))


# ----- the stateful decider holds and releases (stand-ins for the state and the terminal window) -----
import io

from fastavro import schemaless_reader

from fraudstream.consumer.decide import Route
from fraudstream.consumer.rules import load_rules
from fraudstream.consumer.rules_topic import RULE_SET_HEADER
from fraudstream.evaluate import parse_score
from tests.support.decoding import SCHEMAS, SETTINGS, encode, make_tx
from tests.support.stateful_standins import Message as _Message
from tests.support.stateful_standins import State as _State
from tests.support.stateful_standins import Window as _Window
from tests.support.stateful_standins import in_person as _in_person
from tests.support.stateful_standins import stateful_decider as _decider


def test_a_card_s_first_payment_in_person_is_held_then_released_as_fraud_when_more_cards_follow() -> None:
    window, state = _Window(), _State()
    decider = _decider(window, state)
    first = [_Message(encode(_in_person(0)), 0)]
    batch = decider.decide_batch(first)
    assert batch.outputs[0].route is Route.HELD and batch.held == 1 and not batch.released
    assert len(state.held) == 1 and state.held.take_dirty()[0] == [held.position_key(0, 0)]
    assert window.asked == [(1, 120_000)]  # asked whether it is due yet: not yet

    window.due, window.ahead = True, 3  # the window now reaches 2 minutes past it: 3 other cards came
    later = decider.decide_batch([_Message(encode(make_tx(100, transaction_id="t9").to_dict()), 1)])
    assert [(r.offset(), d.route, d.rules) for r, d in later.released] == [(0, Route.FRAUD, ("compromised_terminal",))]
    alert = schemaless_reader(io.BytesIO(later.released[0][1].value[5:]), SCHEMAS.parsed["FraudAlert"], None)
    assert alert["transaction"]["transaction_id"] == "t0"
    assert len(state.held) == 0 and state.held.take_removed() == [held.position_key(0, 0)]
    assert later.state_partitions == {0}


def test_a_held_record_no_card_followed_is_forwarded_byte_for_byte_under_the_rule_set_that_held_it() -> None:
    window, state = _Window(), _State()
    decider = _decider(window, state)
    held_under = decider.rules.version
    value = encode(_in_person(0))
    decider.decide_batch([_Message(value, 0)])
    decider.rules = load_rules(None, settings=SETTINGS.replace(fraud_threshold_cents=1_000))  # a change meanwhile
    assert decider.rules.version != held_under
    window.due, window.ahead = True, 0
    released = decider.release_due()  # the input is quiet: a batch of no input records
    assert released is not None and released.size == 0
    [(record, decision)] = released.released
    assert decision.route is Route.LEGIT and decision.value == value and decision.key == b"acct-1"
    # Its $25 was judged by the rule set that held it: the output names that one, not the new one (under
    # which $25 would be a large amount).
    assert dict(decision.headers)[RULE_SET_HEADER] == held_under.encode()
    assert held.RELEASED_EARLY_HEADER not in dict(decision.headers)  # its whole look-ahead was read


def test_a_record_released_before_its_look_ahead_was_read_names_the_quiet_partitions() -> None:
    """The quiet-partition release is a stated trade (held.py); the output says it was made, and where."""
    window, state = _Window(), _State()
    decider = _decider(window, state)
    decider.decide_batch([_Message(encode(_in_person(0)), 0), _Message(encode(_in_person(1)), 1)])
    window.due, window.ahead, window.short = True, 0, "1,2"
    released = decider.release_due()
    assert released is not None and len(released.released) == 2
    assert [dict(d.headers or ())[held.RELEASED_EARLY_HEADER] for _, d in released.released] == [b"1,2", b"1,2"]
    window.due, window.short = False, "2"
    decider.decide_batch([_Message(encode(_in_person(2)), 2)])
    window.due, window.ahead = True, 3  # fraud this time: the alert carries it too
    [(_, alert)] = decider.release_due().released
    assert alert.route is Route.FRAUD and dict(alert.headers or ())[held.RELEASED_EARLY_HEADER] == b"2"


def test_a_record_too_large_for_a_held_row_is_decided_at_once() -> None:
    window, state = _Window(), _State()
    decider = _decider(window, state)
    batch = decider.decide_batch([_Message(encode(_in_person(0, merchant_id="m" * held.VALUE_BYTES)), 0)])
    assert batch.outputs[0].route is Route.LEGIT and len(state.held) == 0 and decider.too_large_to_hold == 1


def test_a_registry_outage_after_the_batch_changed_state_asks_for_the_state_to_be_rebuilt() -> None:
    """The release decodes held records again; if the registry stops answering there, the batch's card state has
    already changed, and retrying it as it stands would count its payments twice."""
    import pytest

    from fraudstream.consumer.stateful import StateTouchedError
    from fraudstream.errors import RegistryError

    window, state = _Window(), _State()
    decider = _decider(window, state)
    decider.decide_batch([_Message(encode(_in_person(0)), 0)])  # held
    window.due, window.ahead = True, 3  # released as fraud: decoded again
    decode, calls = decider.decode, []

    def decode_then_fail(messages):
        calls.append(len(messages))
        if len(calls) > 1:  # the batch's own decode passes; the release's does not
            raise RegistryError("schema registry at http://registry unreachable")
        return decode(messages)

    decider.decode = decode_then_fail
    with pytest.raises(StateTouchedError) as touched:
        decider.decide_batch([_Message(encode(_in_person(1)), 1)])
    assert touched.value.partitions == {0} and calls == [1, 2]  # the batch, then its release (both held)
    assert len(state.cards) == 2  # card-1's payment was counted: hence the rebuild
    with pytest.raises(StateTouchedError):  # and while the input is quiet
        decider.release_due()


def test_a_row_held_by_the_previous_layout_is_restored_with_no_shadow_verdict() -> None:
    """Held rows in a changelog written before shadow rules (layout v1) are read, not refused: upgrading a
    detector must not strand the records it held."""
    import pytest

    from fraudstream.consumer.state.changelog import LAYOUT_HEADER
    from fraudstream.consumer.state.recovery import _upgraded
    from fraudstream.consumer.state.table import StateLayoutError, layout_tag

    old = np.zeros(1, dtype=held.HELD_DTYPE_V1)
    old["event_time_ms"], old["rule_set"], old["value_len"] = 42, b"17", 3

    class Record:
        def __init__(self, value, layout):
            self._value, self._layout = value, layout

        def value(self):
            return self._value

        def key(self):
            return held.position_key(0, 5)

        def headers(self):
            return [(LAYOUT_HEADER, self._layout)]

        def topic(self):
            return "g.t.held.changelog"

        def partition(self):
            return 0

        def offset(self):
            return 9

    v1 = layout_tag("held_record", 1, held.HELD_DTYPE_V1)
    row = np.frombuffer(_upgraded(Record(old.tobytes(), v1), held.HELD), dtype=held.HELD_DTYPE)
    assert row["event_time_ms"].tolist() == [42] and row["rule_set"].tolist() == [b"17"]
    assert row["value_len"].tolist() == [3] and row["shadow_set"].tolist() == [b""]
    with pytest.raises(StateLayoutError, match="held_record/v0"):
        _upgraded(Record(old.tobytes(), b"held_record/v0/" + str(old.itemsize).encode()), held.HELD)


def test_a_decider_that_makes_no_outputs_decides_every_record_as_the_one_that_does() -> None:
    """A backtest's deciders (make_outputs off) skip the output bytes, not the deciding: the same routes, rules
    and scores, for the batch's own records and for the held ones released later (as arrays)."""

    def score_of(decision) -> float | None:
        return decision.score if decision.route is Route.FRAUD else parse_score(decision.headers)

    def decide(make_outputs: bool) -> list[tuple]:
        window, state = _Window(), _State()
        decider = _decider(window, state)
        decider.make_outputs = make_outputs
        decider.encode_shadow = None  # a replay has no shadow topic
        first = [_Message(encode(_in_person(i)), i) for i in range(3)]  # three cards' first payments: held
        first.append(_Message(encode(make_tx(95_000, transaction_id="big").to_dict()), 3))  # over $900: fraud
        second = [_Message(encode(make_tx(100, transaction_id="t9").to_dict()), 4)]
        found = []
        for messages in (first, second):
            batch = decider.decide_batch(messages)
            found.append(("routes", sorted(batch.routes().items())))  # released ones counted either way
            window.due, window.ahead = True, 3  # after the first batch: three other cards came to the terminal
            for index, decision in batch.outputs.items():
                score = None if decision.route is Route.HELD else score_of(decision)
                found.append((messages[index].offset(), decision.route.name, decision.rules, score))
            for record, decision in batch.released:
                found.append((record.offset(), "released " + decision.route.name, decision.rules, score_of(decision)))
            for rows in batch.released_rows:
                for position, fraud, score in zip(rows.positions.tolist(), rows.fraud, rows.score, strict=True):
                    route, rules = ("FRAUD", ("compromised_terminal",)) if fraud else ("LEGIT", ())
                    found.append((position & (2**40 - 1), "released " + route, rules, float(score)))
        return sorted(found, key=repr)

    with_outputs, without = decide(True), decide(False)
    # The paths under test ran: three records held, then released as fraud; one large amount.
    assert [route for _, route, *_ in with_outputs].count("released FRAUD") == 3
    assert [route for _, route, *_ in with_outputs].count("FRAUD") == 1
    assert with_outputs == without


def test_the_rules_that_fired_are_named_per_row_in_rule_order() -> None:
    from fraudstream.consumer.stateful import fired_names

    names = ("large_amount", "card_testing", "far_from_home")
    fired = np.array([[1, 0, 1, 0, 1], [0, 0, 1, 1, 1], [1, 0, 1, 0, 0]], dtype=bool)  # rules x rows
    assert fired_names(names, fired, np.array([0, 2, 3, 1, 4])) == [
        ("large_amount", "far_from_home"),
        ("large_amount", "card_testing", "far_from_home"),
        ("card_testing",),
        (),
        ("large_amount", "card_testing"),
    ]
    many = tuple(f"r{k}" for k in range(70))  # past the codes' 63 bits: the per-row search gives the same names
    wide = np.zeros((70, 2), dtype=bool)
    wide[[0, 64, 69], 1] = True
    assert fired_names(many, wide, np.array([1, 0])) == [("r0", "r64", "r69"), ()]
