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
    held.hold(table, keys, event_time_ms=np.array([10, 20]), created_ms=np.array([111, 222]),
              terminal=np.array([5, 6]), card=np.array([7, 8]), dist_home_km=np.array([150.5, 0.0]),
              score=np.array([0.25, 0.0]), channel=np.array([1, 2]), record_keys=[b"acct-000042", None], values=values)

    dirty_keys, rows = table.take_dirty()
    assert sorted(dirty_keys) == sorted(keys)  # both go to the changelog with the batch
    order = [dirty_keys.index(k) for k in keys]
    rows = rows[order]
    back = held.records_of(rows, keys, "payments")
    assert [(r.partition(), r.offset(), r.key(), r.value(), r.timestamp()[1]) for r in back] == [
        (3, 1_234_567, b"acct-000042", values[0], 111), (0, 0, None, values[1], 222)]
    assert rows["dist_home_km"].tolist() == [150.5, 0.0] and rows["terminal"].tolist() == [5, 6]

    table.remove([keys[0]])
    assert table.take_removed() == [keys[0]] and len(table) == 1  # a tombstone for the released one


def test_a_record_too_large_for_a_held_row_does_not_fit() -> None:
    assert held.fits(b"k" * held.KEY_BYTES, b"v" * held.VALUE_BYTES)
    assert not held.fits(b"k", b"v" * (held.VALUE_BYTES + 1))
    assert not held.fits(b"k" * (held.KEY_BYTES + 1), b"v")
