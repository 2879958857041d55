"""What a state store is: a name, a fixed-width row layout, and when its keys expire."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

# Expiry never trusts an event time further ahead of the wall clock than this: one record from a terminal whose
# clock is 40 days fast must not age out every row of its partition. Expiring less never changes a decision
# (rules read a row older than its TTL as absent), so the clamp only costs memory where event time legitimately
# runs ahead (a simulation with --speedup).
EXPIRY_MAX_AHEAD_MS = 24 * 60 * 60 * 1000


def expiry_stream_time(newest_event_ms: int, *, now_ms: int | None = None) -> int:
    """The stream time an expiry may go by: the newest event time, at most EXPIRY_MAX_AHEAD_MS past the wall clock."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return min(newest_event_ms, now_ms + EXPIRY_MAX_AHEAD_MS)


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """One keyed store, kept per input partition and backed by its own compacted changelog topic.

    `layout` names the row layout (`table.layout_tag`: name, version, row size): every changelog record
    carries it, and a restore refuses a record written with another layout instead of misreading its bytes. `expiry_field` is the event-time field
    (epoch ms) that says when a key was last touched; keys idle for longer than `ttl_ms` of event time
    are dropped and tombstoned. Rules must treat a row older than `ttl_ms` as absent, so that when the
    physical expiry runs never changes a decision. `ttl_ms=None`: rows are never expired, only deleted by
    the code that owns them (a held record's row goes with its output, never by age).
    """

    name: str
    dtype: np.dtype
    layout: bytes
    expiry_field: str
    ttl_ms: int | None
    # Earlier layouts of this store's rows that a restore still reads: (layout tag, dtype); a row is read
    # into the current dtype field by field, and the fields it lacks are zero (each store says what zero means).
    older_layouts: tuple[tuple[bytes, np.dtype], ...] = ()
