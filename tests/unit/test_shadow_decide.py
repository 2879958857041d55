"""Shadow rules in the stateful decider (consumer/stateful.py): a candidate rule set decided beside the live one,
never routing anything; where it decides otherwise, a ShadowDifference and a header on the routed record."""

from __future__ import annotations

import io

import numpy as np
from fastavro import schemaless_reader

from fraudstream.consumer import held
from fraudstream.consumer.decide import Route
from fraudstream.consumer.rules import load_rules
from fraudstream.consumer.stateful import SHADOW_HEADER
from tests.support.decoding import SCHEMAS, SETTINGS, encode, make_tx
from tests.support.stateful_standins import Message, State, Window, in_person, stateful_decider

LIVE = load_rules(None, settings=SETTINGS)  # large_amount over $900
LOWER = load_rules(None, settings=SETTINGS.replace(fraud_threshold_cents=2_000))  # over $20: one rule differs


def difference(value: bytes) -> dict:
    return schemaless_reader(io.BytesIO(value[5:]), SCHEMAS.parsed["ShadowDifference"], None)


def online(i: int, amount_cents: int) -> Message:
    return Message(encode(make_tx(amount_cents, transaction_id=f"t{i}", card_id=f"card-{i}").to_dict()), i)


def routed(batch, messages) -> list[tuple]:
    """Each message's route, key, value and headers without the shadow's: what the output topics get."""
    return [
        (d.route, d.key, d.value, [h for h in d.headers or () if h[0] != SHADOW_HEADER])
        for d in batch.decisions(messages)
    ]


def test_a_shadow_set_differing_in_one_rule_names_exactly_the_records_it_decides_otherwise() -> None:
    messages = [online(0, 1_000), online(1, 2_500), online(2, 95_000), online(3, 1_999), online(4, 3_000)]
    without = stateful_decider(Window(), State()).decide_batch(messages)

    decider = stateful_decider(Window(), State())
    decider.shadow_rules = LOWER
    batch = decider.decide_batch(messages)

    # Routed as without a shadow set: same routes, keys, value bytes (fraud alerts aside: detected_at differs).
    assert [r[:2] for r in routed(batch, messages)] == [r[:2] for r in routed(without, messages)]
    assert [r for r in routed(batch, messages) if r[0] is Route.LEGIT] == [
        r for r in routed(without, messages) if r[0] is Route.LEGIT
    ]
    # $25 and $30 are over the shadow's $20 and not over $900: exactly those two, keyed by transaction id.
    assert [key for key, _ in batch.shadow] == [b"t1", b"t4"]
    found = difference(batch.shadow[0][1])
    assert (found["transaction_id"], found["source_offset"], found["live_fraud"], found["shadow_fraud"]) == (
        "t1",
        1,
        False,
        True,
    )
    assert found["shadow_rules"] == ["large_amount"] and found["live_rules"] == []
    assert (found["live_rule_set_version"], found["shadow_rule_set_version"]) == (LIVE.version, LOWER.version)
    headers = {i: dict(d.headers or ()) for i, d in enumerate(batch.decisions(messages))}
    assert [i for i, h in headers.items() if SHADOW_HEADER in h] == [1, 4]
    assert headers[1][SHADOW_HEADER] == b"fraud" and decider.shadow_differences == 2


def test_without_a_shadow_set_nothing_is_compared() -> None:
    messages = [online(0, 2_500)]
    batch = stateful_decider(Window(), State()).decide_batch(messages)
    assert batch.shadow == [] and all(SHADOW_HEADER not in dict(d.headers or ()) for d in batch.decisions(messages))


def test_a_held_record_is_compared_at_its_release_with_the_verdict_the_shadow_gave_when_it_was_held() -> None:
    window, state = Window(), State()
    decider = stateful_decider(window, state)
    decider.shadow_rules = LOWER
    first = decider.decide_batch([Message(encode(in_person(0)), 0)])  # $25 in person, a new card: held by live
    assert first.outputs[0].route is Route.HELD and first.shadow == []  # nothing to compare yet
    row = state.held.gather(state.held.live()[1])
    assert row["shadow_set"].tolist() == [LOWER.version.encode()] and row["shadow_fired"].tolist() == [1]

    decider.shadow_rules = None  # cleared meanwhile: the row still carries the verdict it was held with
    window.due, window.ahead = True, 0  # no other card came: live releases it as legit
    released = decider.release_due()
    assert released is not None
    [(record, decision)] = released.released
    assert decision.route is Route.LEGIT and dict(decision.headers)[SHADOW_HEADER] == b"fraud"
    [(key, value)] = released.shadow
    found = difference(value)
    assert key == b"t0" and (found["live_fraud"], found["shadow_fraud"], found["shadow_rules"]) == (
        False,
        True,
        ["large_amount"],
    )


def test_a_held_record_both_sets_call_fraud_at_release_is_no_difference() -> None:
    window, state = Window(), State()
    decider = stateful_decider(window, state)
    decider.shadow_rules = LIVE  # the same rules: the terminal rule fires for both
    decider.decide_batch([Message(encode(in_person(0)), 0)])
    window.due, window.ahead = True, 3
    released = decider.release_due()
    assert released is not None and [d.route for _, d in released.released] == [Route.FRAUD]
    assert released.shadow == []


def test_shadow_bits_name_the_rules_that_fired_past_the_sixty_third_together() -> None:
    names = [f"r{k}" for k in range(70)]
    fired = np.zeros((70, 3), dtype=bool)
    fired[2, 0] = True
    fired[65, 1] = True
    bits = held.shadow_bits(fired)
    assert bits.tolist() == [4, 1 << 63, 0]
    assert held.fired_names(int(bits[0]), names) == ["r2"]
    assert held.fired_names(int(bits[1]), names) == names[63:]  # told apart no further
    assert held.fired_names(int(bits[2]), names) == []
