"""Stand-ins for the stateful decider's state and terminal window (consumer/stateful.py), for unit tests that
hold and release records with no Kafka."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from fraudstream.consumer import held
from fraudstream.consumer.features import PROFILE_DTYPE
from fraudstream.consumer.rules import RuleSet, load_rules
from fraudstream.consumer.state.table import KeyedTable
from fraudstream.consumer.stateful import CARDS, StatefulDecider, decode_batch
from tests.support.decoding import SCHEMAS, SETTINGS, decider_pair, make_tx


class State:
    """One partition's tables, as the TaskManager gives them."""

    def __init__(self):
        self.cards, self.held = KeyedTable(PROFILE_DTYPE), KeyedTable(held.HELD_DTYPE)

    def tables(self, partition):
        return {CARDS.name: self.cards, held.HELD.name: self.held}

    def ready_tables(self, store):
        return {0: self.tables(0)[store]}


class Window:
    """The terminal window's reader: no other card before any payment; `due` and `ahead` say what the
    window answers for held records (counted, to prove the release asked it)."""

    def __init__(self):
        self.due, self.ahead, self.asked = False, 0, []
        self.readied: list[bool] = []  # each ready(): for a batch (True) or between batches
        self.short = ""  # what cut_short names: the quiet partitions a release did not wait for

    def ready(self, batch, *, oldest_held_ms, holding, idle_ms):
        self.readied.append(batch is not None)

    def features(self, tx, partitions, offsets, created_ms):
        return {"terminal_cards": np.zeros(len(tx), np.int64)}

    def releasable(self, times, created_ms, ahead_ms, idle_ms):
        self.asked.append((len(times), ahead_ms))
        return np.full(len(times), self.due)

    def cut_short(self, times, ahead_ms):
        return [self.short] * len(times)

    def other_cards_held(self, terminals, cards, times, ahead_ms):
        return np.full(len(times), self.ahead)


class Message:
    def __init__(self, value, offset):
        self._value, self._offset = value, offset

    def value(self):
        return self._value

    def key(self):
        return b"acct-1"

    def topic(self):
        return "transactions"

    def partition(self):
        return 0

    def offset(self):
        return self._offset

    def headers(self):
        return None

    def timestamp(self):
        return (1, 1_000 + self._offset)


def stateful_decider(window: Window, state: State, rules: RuleSet | None = None) -> StatefulDecider:
    record_wise, columnar = decider_pair()
    return StatefulDecider(
        lambda messages: decode_batch(columnar, columnar.record_wise, messages),
        rules or load_rules(None, settings=SETTINGS),
        state,
        encode_legit=record_wise.encode_legit,
        encode_fraud=record_wise.encode_fraud,
        terminal_features=window.features,
        terminal=window,
        input_topic="transactions",
        encode_shadow=shadow_encoder(),
    )


def in_person(i: int, **changes):
    return make_tx(
        2_500,
        transaction_id=f"t{i}",
        card_id=f"card-{i}",
        channel="CARD_PRESENT",
        event_time=datetime(2026, 1, 1, 0, i, tzinfo=UTC),
        **changes,
    ).to_dict()


def shadow_encoder():
    """The ShadowDifference encoder a detector builds (schema id 9 stands in for the registry's)."""
    from fraudstream.serde import make_encoder

    return make_encoder(9, SCHEMAS.parsed["ShadowDifference"])
