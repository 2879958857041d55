"""KeyedTable: fixed-width rows per key, dirty tracking for the changelog, restore and expiry."""

from __future__ import annotations

import numpy as np
import pytest

from fraudstream.errors import StateError
from fraudstream.consumer.state.table import (
    KeyedTable,
    StateLayoutError,
    check_layout,
    check_row_bytes,
    layout_tag,
    row_values,
    rows_from_values,
)

DTYPE = np.dtype([("last_ms", "<i8"), ("count", "<u4"), ("ring", "<u4", (2,))])


def table(capacity: int = 4) -> KeyedTable:
    return KeyedTable(DTYPE, capacity=capacity)


def test_slots_allocate_one_zeroed_row_per_key_and_lookup_finds_only_known_keys() -> None:
    t = table()
    t.rows["count"][:] = 7  # garbage in free rows must not leak into new keys
    slots = t.slots([b"a", b"b", b"a"])

    assert slots[0] == slots[2] != slots[1]
    assert len(t) == 2 and t.rows["count"][slots].tolist() == [0, 0, 0]
    assert t.lookup([b"b", b"zz", b"a"]).tolist() == [slots[1], -1, slots[0]]
    assert t.lookup([]).dtype == np.int64


def test_the_table_grows_past_its_capacity_and_keeps_every_row() -> None:
    t = table(capacity=2)
    keys = [f"k{i}".encode() for i in range(50)]
    for key in keys:
        slot = t.slots([key])[0]  # first: growing replaces t.rows
        t.rows["last_ms"][slot] = int(key[1:])

    assert len(t) == 50 and len(t.rows) >= 50
    assert t.rows["last_ms"][t.lookup(keys)].tolist() == list(range(50))


def test_take_dirty_returns_copies_of_changed_rows_once() -> None:
    t = table()
    slots = t.slots([b"a", b"b", b"c"])
    t.rows["count"][slots] = [1, 2, 3]
    t.mark_dirty(slots[[0, 2]])
    keys, rows = t.take_dirty()
    t.rows["count"][slots[0]] = 99  # the copies taken must not change

    assert dict(zip(keys, rows["count"].tolist())) == {b"a": 1, b"c": 3}
    assert rows.dtype == DTYPE
    assert t.take_dirty()[0] == []


def test_put_restores_rows_without_marking_them_dirty_and_refuses_another_layout() -> None:
    t = table()
    rows = np.zeros(2, dtype=DTYPE)
    rows["count"] = [5, 6]
    t.put([b"x", b"y"], rows)

    assert t.rows["count"][t.lookup([b"x", b"y"])].tolist() == [5, 6]
    assert t.take_dirty()[0] == []
    with pytest.raises(StateLayoutError):
        t.put([b"z"], np.zeros(1, dtype=[("last_ms", "<i8")]))


def test_delete_drops_keys_ignores_absent_ones_and_frees_slots_for_reuse() -> None:
    t = table(capacity=2)
    a, b = t.slots([b"a", b"b"])
    t.mark_dirty(np.array([a]))
    t.delete([b"a", b"never"])

    assert len(t) == 1 and t.lookup([b"a"]).tolist() == [-1]
    assert t.take_dirty()[0] == []  # a deleted key is not written back
    assert t.slots([b"c"]).tolist() == [a] and len(t.rows) == 2  # reused, no growth


def test_expire_drops_rows_older_than_the_horizon_and_returns_their_keys() -> None:
    t = table()
    slots = t.slots([b"old", b"new", b"older"])
    t.rows["last_ms"][slots] = [100, 500, 50]
    expired = t.expire("last_ms", older_than=200)

    assert sorted(expired) == [b"old", b"older"]
    assert t.keys() == [b"new"] and t.lookup([b"old"]).tolist() == [-1]
    assert table().expire("last_ms", 10) == []


def test_a_row_round_trips_through_bytes_and_a_wrong_size_is_refused() -> None:
    t = table()
    slot = t.slots([b"a"])[0]
    t.rows[slot] = (123, 4, [5, 6])
    value = t.rows[slot].tobytes()
    back = check_row_bytes(value, DTYPE, where="changelog p0 @7")

    assert back[0] == t.rows[slot]
    with pytest.raises(StateLayoutError, match="changelog p0 @7"):
        check_row_bytes(value[:-1], DTYPE, where="changelog p0 @7")


def test_a_changelog_written_with_another_layout_version_is_refused() -> None:
    ours = layout_tag("card_profile", 2, DTYPE)
    check_layout(ours, ours, where="t")
    for other in (layout_tag("card_profile", 1, DTYPE), None):
        with pytest.raises(StateLayoutError, match="card_profile/v2"):
            check_layout(other, ours, where="t")


def test_nbytes_counts_rows_and_index_and_grows_with_keys() -> None:
    t = table(capacity=1024)
    empty = t.nbytes()
    t.slots([f"card-{i:012x}".encode() for i in range(1000)])

    assert empty >= t.rows.nbytes
    assert t.nbytes() - empty >= 1000 * 40  # at least the key bytes objects


def test_many_rows_round_trip_through_changelog_values() -> None:
    t = table()
    slots = t.slots([b"a", b"b", b"c"])
    t.rows[slots] = [(1, 2, [3, 4]), (5, 6, [7, 8]), (9, 10, [11, 12])]
    t.mark_dirty(slots)
    keys, rows = t.take_dirty()
    values = row_values(rows)

    assert values == [row.tobytes() for row in rows]
    restored = table()
    restored.put(keys, rows_from_values(values, DTYPE, where="c p1"))
    assert restored.rows[restored.lookup(keys)].tobytes() == t.rows[slots].tobytes()
    with pytest.raises(StateLayoutError, match="c p1"):
        rows_from_values([values[0], values[1][:-2]], DTYPE, where="c p1")


def test_gather_and_scatter_are_rows_indexing_by_slots() -> None:
    t = table(capacity=2)
    slots = t.slots([f"k{i}".encode() for i in range(9)])  # grown past its capacity
    t.rows["last_ms"][slots] = np.arange(9) * 10
    t.rows["ring"][slots] = np.arange(18).reshape(9, 2)
    picked = slots[[7, 2, 5]]
    rows = t.gather(picked)

    assert rows.dtype == DTYPE and rows.tobytes() == t.rows[picked].tobytes()
    rows["count"] = [1, 2, 3]
    assert t.rows["count"][picked].tolist() == [0, 0, 0]  # a copy
    t.scatter(picked, rows)
    assert t.rows["count"][slots].tolist() == [0, 0, 2, 0, 0, 3, 0, 1, 0]
    assert t.rows["last_ms"][slots].tolist() == list(range(0, 90, 10))


# ----- a batch's changes are undone by rollback(): an aborted batch costs the batch, not a restore -----
from hypothesis import given, settings as hypothesis_settings
from hypothesis import strategies as st

UNDO_ROW = np.dtype([("last_ms", "<i8"), ("n", "<i4")])
KEYS = [b"k%d" % i for i in range(12)]
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"),
            st.lists(st.sampled_from(KEYS), min_size=1, max_size=6, unique=True),
            st.integers(0, 10**6),
        ),
        st.tuples(st.just("remove"), st.lists(st.sampled_from(KEYS), max_size=4, unique=True), st.just(0)),
        st.tuples(st.just("expire"), st.just([]), st.integers(0, 10**6)),
    ),
    max_size=12,
)


def contents(table: KeyedTable) -> dict[bytes, tuple]:
    keys, slots = table.live()
    return {key: tuple(row) for key, row in zip(keys, table.rows[slots].tolist(), strict=True)}


def apply(table: KeyedTable, operations) -> None:
    for kind, keys, value in operations:
        if kind == "write":
            slots = table.slots(keys)
            rows = table.gather(slots)
            rows["last_ms"] += value
            rows["n"] += 1
            table.scatter(slots, rows)
            table.mark_dirty(slots)
        elif kind == "remove":
            table.remove([k for k in keys if k in table])
        else:
            table.expire("last_ms", value)


@hypothesis_settings(max_examples=200, deadline=None)
@given(before=OPERATIONS, batch=OPERATIONS)
def test_rollback_gives_back_the_table_as_it_was_before_the_batch(before, batch):
    table = KeyedTable(UNDO_ROW, capacity=2)  # small: the batch grows it
    apply(table, before)
    table.take_dirty(), table.take_removed()  # committed: what the changelog holds
    was = contents(table)
    table.begin()
    apply(table, batch)
    undone = table.rollback()
    assert contents(table) == was
    assert table.take_dirty()[0] == [] and table.take_removed() == []
    assert undone >= sum(1 for kind, keys, _ in batch if kind == "write")  # the batch's writes were recorded
    apply(table, batch)  # and the table still works: the same batch again gives the same rows as without the abort
    again = KeyedTable(UNDO_ROW)
    apply(again, before)
    apply(again, batch)
    assert contents(table) == contents(again)


def test_a_table_not_in_a_batch_records_nothing():
    table = KeyedTable(UNDO_ROW)
    apply(table, [("write", KEYS[:3], 5)])
    assert table.rollback() == 0 and len(table) == 3  # nothing recorded, nothing undone


def test_a_changed_row_in_a_free_slot_is_refused_not_written_under_no_key() -> None:
    t = table()
    slot = t.slots([b"a"])[0]
    t.mark_dirty(np.array([slot, slot + 1]))  # slot + 1 holds no key

    with pytest.raises(StateError, match="1 changed row"):
        t.take_dirty()
