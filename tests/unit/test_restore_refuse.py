"""A changelog record a store cannot read stops its restore with one line naming the record (stand-in clients:
the records are what a changelog written by another process, or by hand, can hold)."""

from __future__ import annotations

import pytest

from fraudstream.consumer.state.changelog import LAYOUT_HEADER
from fraudstream.consumer.state.recovery import Recovery, RestoreProgress, _Restoring
from fraudstream.consumer.state.table import KeyedTable
from fraudstream.consumer.stateful import CARDS
from fraudstream.errors import StateError
from fraudstream.settings import Settings

TOPIC = "cards.changelog"


class Record:
    """A consumed changelog record at offset 7 of partition 0."""

    def __init__(self, key: bytes | None, value: bytes | None, headers: list | None) -> None:
        self._key, self._value, self._headers = key, value, headers

    def error(self):
        return None

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 7

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list | None:
        return self._headers


class Reading:
    """A restore consumer whose next read returns `records`."""

    def __init__(self, records: list[Record]) -> None:
        self.records = records

    def consume(self, num_messages, timeout):
        records, self.records = self.records, []
        return records


def restore_of(records: list[Record]) -> tuple[Recovery, KeyedTable]:
    restore = Recovery(Settings(), {CARDS.name: TOPIC})
    restore.consumer.close()
    restore.offsets.close()
    restore.consumer = Reading(records)
    table = KeyedTable(CARDS.dtype)
    restoring = _Restoring(CARDS, table, end=100)
    restore._by_topic_partition[(TOPIC, 0)] = restoring
    restore.restoring[0] = RestoreProgress(0, stores={CARDS.name: restoring})
    return restore, table


def test_a_tombstone_without_a_key_is_refused_not_skipped():
    restore, _ = restore_of([Record(None, None, None)])

    with pytest.raises(StateError) as refused:
        restore.step()
    assert str(refused.value) == f"cannot restore state from changelog {TOPIC}[0] at offset 7: the record has no key"


def test_a_row_with_unexpected_headers_is_refused_in_one_line():
    row = bytes(CARDS.dtype.itemsize)
    restore, table = restore_of([Record(b"card", row, [(LAYOUT_HEADER, CARDS.layout), ("extra", b"1")])])

    with pytest.raises(StateError) as refused:
        restore.step()
    assert str(refused.value).startswith(
        f"cannot restore state from changelog {TOPIC}[0] at offset 7: unexpected headers"
    )
    assert len(table) == 0
