"""KeyedTable: one fixed-width row per key, held in a NumPy structured array.

The in-memory backend of a keyed store (one table per store and input partition). Pure: no Kafka.
Rows are addressed by slot so that batch code reads and writes whole columns at once
(`table.rows["last_ms"][slots]`); a dict maps each key to its slot. Freed slots are reused, and
the array doubles when full. What changed since the last `take_dirty` is what the changelog must
receive: the row bytes (`row.tobytes()` of the table's dtype) under the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeGuard

import numpy as np

from fraudstream.errors import StateError


class StateLayoutError(StateError):
    """A stored row was written with another row layout (dtype or version) than this code reads."""


def layout_tag(name: str, version: int, dtype: np.dtype) -> bytes:
    """Names a row layout, e.g. b"card_profile/v1/150": carried with each changelog record (a header),
    compared on restore, so rows written by code with another layout are refused."""
    return f"{name}/v{version}/{dtype.itemsize}".encode()


def check_layout(found: bytes | None, expected: bytes, *, where: str) -> None:
    if found != expected:
        shown = found.decode(errors="replace") if found is not None else "none"
        raise StateLayoutError(f"{where}: row layout {shown}, but this detector reads {expected.decode()}")


def check_row_bytes(value: bytes, dtype: np.dtype, *, where: str) -> np.ndarray:
    """One serialized row back as a 1-element array; a wrong size is refused, never misread."""
    if len(value) != dtype.itemsize:
        raise StateLayoutError(f"{where}: a row of {len(value)} bytes where this layout has {dtype.itemsize}")
    return np.frombuffer(value, dtype=dtype, count=1)


def row_values(rows: np.ndarray) -> list[bytes]:
    """Each row's bytes (row.tobytes()), for the changelog: one copy of the array, then slices."""
    size = rows.dtype.itemsize
    data = rows.tobytes()
    return [data[i : i + size] for i in range(0, len(data), size)]


def rows_from_values(values: list[bytes], dtype: np.dtype, *, where: str) -> np.ndarray:
    """Rows back from changelog values; a value of the wrong size is refused (StateLayoutError), never misread."""
    size = dtype.itemsize
    for value in values:
        if len(value) != size:
            raise StateLayoutError(f"{where}: a row of {len(value)} bytes where this layout has {size}")
    return np.frombuffer(b"".join(values), dtype=dtype).copy()


def _all_held(keys: list[bytes | None]) -> TypeGuard[list[bytes]]:
    """Slots' keys, none of them free (None)."""
    return None not in keys


class KeyedTable:
    """Fixed-width rows (a numpy structured dtype), one per key (bytes)."""

    __slots__ = ("dtype", "rows", "_index", "_keys", "_free", "_dirty", "_removed", "_undo")

    def __init__(self, dtype: np.dtype, *, capacity: int = 1024) -> None:
        if dtype.names is None:
            raise ValueError("KeyedTable needs a structured dtype")
        self.dtype = np.dtype(dtype)
        self.rows = np.zeros(max(1, capacity), dtype=self.dtype)
        self._index: dict[bytes, int] = {}
        self._keys: list[bytes | None] = [None] * len(self.rows)  # slot -> key, None when free
        self._free: list[int] = list(range(len(self.rows) - 1, -1, -1))  # popped from the end: low slots first
        self._dirty = np.zeros(len(self.rows), dtype=bool)
        self._removed: list[bytes] = []  # keys removed since the last take_removed: the changelog's tombstones
        # A batch's undo log (begin .. commit or rollback): what each change replaced, so that an aborted batch
        # costs the batch, not a restore from the changelog. None: not recording (the restore path).
        self._undo: list[tuple] | None = None

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def keys(self) -> list[bytes]:
        return list(self._index)

    def lookup(self, keys: Sequence[bytes] | np.ndarray) -> np.ndarray:
        """int64 slot per key, -1 if absent."""
        get = self._index.get
        return np.fromiter((get(key, -1) for key in keys), dtype=np.int64, count=len(keys))

    def slots(self, keys: Sequence[bytes] | np.ndarray) -> np.ndarray:
        """Slot per key, allocating a zeroed row for each new key (once, however often it repeats).

        Growing replaces `rows`: read `table.rows` after this call, not before."""
        index = self._index
        get = index.get
        out = np.fromiter((get(key, -1) for key in keys), dtype=np.int64, count=len(keys))
        missing = np.flatnonzero(out < 0)
        if len(missing):
            fresh = []
            for i in missing.tolist():
                key = keys[i]
                slot = get(key)  # a key new in this call may repeat
                if slot is None:
                    slot = self._allocate(key)
                    fresh.append(slot)
                out[i] = slot
            self._raw()[fresh] = 0
            if self._undo is not None:
                self._undo.append(("new", fresh))
        return out

    def _raw(self) -> np.ndarray:
        """The rows as a (capacity, itemsize) byte matrix: copying whole rows this way is a memcpy per
        row, where indexing the structured array copies field by field (several times slower)."""
        return self.rows.view(np.uint8).reshape(len(self.rows), self.dtype.itemsize)

    def gather(self, slots: np.ndarray) -> np.ndarray:
        """A copy of the rows at `slots` (what `rows[slots]` gives, faster)."""
        return self._raw()[slots].view(self.dtype).reshape(len(slots))

    def scatter(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """rows[slots] = rows (distinct slots), faster; `rows` of this table's dtype."""
        raw = self._raw()
        if self._undo is not None:
            self._undo.append(("rows", np.array(slots, dtype=np.int64), raw[slots]))  # a copy: what they held
        raw[slots] = np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), self.dtype.itemsize)

    def _allocate(self, key: bytes) -> int:
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._index[key] = slot
        self._keys[slot] = key
        return slot

    def _grow(self) -> None:
        old = len(self.rows)
        rows = np.zeros(old * 2, dtype=self.dtype)
        rows[:old] = self.rows
        self.rows = rows
        self._keys.extend([None] * old)
        self._free.extend(range(2 * old - 1, old - 1, -1))
        dirty = np.zeros(old * 2, dtype=bool)
        dirty[:old] = self._dirty
        self._dirty = dirty

    def mark_dirty(self, slots: np.ndarray) -> None:
        self._dirty[slots] = True

    def take_dirty(self) -> tuple[list[bytes], np.ndarray]:
        """(keys, copies of their rows) changed since the last call; clears the dirty marks."""
        slots = np.flatnonzero(self._dirty)
        self._dirty[slots] = False
        keys = self._keys
        dirty_keys = [keys[s] for s in slots.tolist()]
        if not _all_held(dirty_keys):  # mark_dirty was given a free slot: its row has no key to write under
            raise StateError(f"{dirty_keys.count(None)} changed row(s) in free slots, without a key")
        return dirty_keys, self.gather(slots)

    def live(self) -> tuple[list[bytes], np.ndarray]:
        """(keys, their slots) of every row held."""
        return list(self._index), np.fromiter(self._index.values(), dtype=np.int64, count=len(self._index))

    def remove(self, keys: Sequence[bytes]) -> None:
        """Processing path: drop the keys; each becomes a tombstone in the changelog (take_removed)."""
        self.delete(keys)
        self._removed.extend(keys)

    def take_removed(self) -> list[bytes]:
        removed, self._removed = self._removed, []
        return removed

    def put(self, keys: Sequence[bytes], rows: np.ndarray) -> None:
        """Restore path: set rows as given (not dirty: they came from the changelog)."""
        if rows.dtype != self.dtype:
            raise StateLayoutError(f"rows of dtype {rows.dtype} cannot be put in a table of {self.dtype}")
        if len(keys) != len(rows):
            raise ValueError("put needs one row per key")
        slots = self.slots(keys)
        self.scatter(slots, rows)
        self._dirty[slots] = False

    def delete(self, keys: Sequence[bytes]) -> None:
        """Restore path (tombstones): drop the keys; absent keys are ignored."""
        for key in keys:
            slot = self._index.pop(key, None)
            if slot is not None:
                self._forget(key, slot)

    def _forget(self, key: bytes, slot: int) -> None:
        if self._undo is not None:
            self._undo.append(("gone", key, slot, self._raw()[slot].copy()))
        self._release(slot)

    # ----- a batch's changes: kept until its checkpoint commits, undone if it aborts -----
    def begin(self) -> None:
        """Record every change from now on, until commit() or rollback()."""
        self._undo = []

    def commit(self) -> None:
        """The batch's changes are in the changelog: forget how to undo them (and stop recording)."""
        self._undo = None

    def rollback(self) -> int:
        """Undo every change since begin(), newest first: rows, keys added and keys dropped come back as they were,
        with nothing dirty or removed (those were the batch's own). Returns the changes undone."""
        undo, self._undo = self._undo or [], None
        raw = self._raw
        # Undone newest first, the free list (a stack) comes back as it was: a key dropped by the batch finds its
        # own slot on top of it again, which the batch's earlier row changes refer to.
        for entry in reversed(undo):
            if entry[0] == "rows":
                raw()[entry[1]] = entry[2]
            elif entry[0] == "new":
                for slot in reversed(entry[1]):
                    del self._index[self._keys[slot]]
                    self._release(slot)
            else:  # "gone"
                _, key, slot, row = entry
                if self._free and self._free[-1] == slot:
                    self._free.pop()
                else:  # not reached while every change goes through this log; kept correct all the same
                    self._free.remove(slot)
                self._index[key] = slot
                self._keys[slot] = key
                raw()[slot] = row
        self._dirty[:] = False
        self._removed = []
        return len(undo)

    def _release(self, slot: int) -> None:
        self._keys[slot] = None
        self._dirty[slot] = False
        self._free.append(slot)

    def expire(self, field: str, older_than: int) -> list[bytes]:
        """Drop the rows whose `field` < older_than; returns their keys (for the changelog's tombstones)."""
        live = np.fromiter(self._index.values(), dtype=np.int64, count=len(self._index))
        if not len(live):
            return []
        old = live[self.rows[field][live] < older_than]
        keys = self._keys
        expired = [keys[s] for s in old]
        for key, slot in zip(expired, old.tolist(), strict=True):
            del self._index[key]
            self._forget(key, slot)
        return expired

    def nbytes(self) -> int:
        """Memory estimate: the row array, the dirty marks and the key index (dict, key objects, slot list)."""
        import sys

        index = sys.getsizeof(self._index) + sys.getsizeof(self._keys) + sys.getsizeof(self._free) + 8 * len(self._free)
        # Per live key: its bytes object and its slot int (small ints above 256 are objects of their own).
        index += sum(sys.getsizeof(key) + 28 for key in self._index)
        return self.rows.nbytes + self._dirty.nbytes + index
