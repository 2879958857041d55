"""Placeholder KeyedTable (replaced by the real one): rows of a numpy structured dtype, one per key."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class KeyedTable:
    def __init__(self, dtype: np.dtype, *, capacity: int = 1024) -> None:
        self.dtype = np.dtype(dtype)
        self.rows = np.zeros(capacity, dtype=self.dtype)
        self._index: dict[bytes, int] = {}
        self._free: list[int] = []
        self._dirty: set[int] = set()

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, keys: Sequence[bytes]) -> np.ndarray:
        get = self._index.get
        return np.array([get(k, -1) for k in keys], dtype=np.int64)

    def slots(self, keys: Sequence[bytes]) -> np.ndarray:
        out = np.empty(len(keys), dtype=np.int64)
        for i, key in enumerate(keys):
            slot = self._index.get(key)
            if slot is None:
                slot = self._allocate(key)
            out[i] = slot
        return out

    def _allocate(self, key: bytes) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self._index)
            if slot >= len(self.rows):
                grown = np.zeros(len(self.rows) * 2, dtype=self.dtype)
                grown[: len(self.rows)] = self.rows
                self.rows = grown
        self.rows[slot] = np.zeros((), dtype=self.dtype)
        self._index[key] = slot
        return slot

    def mark_dirty(self, slots: np.ndarray) -> None:
        self._dirty.update(int(s) for s in slots)

    def take_dirty(self) -> tuple[list[bytes], np.ndarray]:
        by_slot = {slot: key for key, slot in self._index.items() if slot in self._dirty}
        self._dirty.clear()
        slots = sorted(by_slot)
        return [by_slot[s] for s in slots], self.rows[np.array(slots, dtype=np.int64)].copy()

    def put(self, keys: Sequence[bytes], rows: np.ndarray) -> None:
        self.rows[self.slots(keys)] = rows

    def delete(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            slot = self._index.pop(key, None)
            if slot is not None:
                self._free.append(slot)
                self._dirty.discard(slot)

    def expire(self, field: str, older_than: int) -> list[bytes]:
        old = [key for key, slot in self._index.items() if self.rows[slot][field] < older_than]
        self.delete(old)
        return old

    def nbytes(self) -> int:
        return self.rows.nbytes + len(self._index) * 100
