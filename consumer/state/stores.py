"""What a state store is: a name, a fixed-width row layout, and when its keys expire."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """One keyed store, kept per input partition and backed by its own compacted changelog topic.

    `version` names the row layout: every changelog record carries it, and a restore refuses a record
    written with another layout instead of misreading its bytes. `expiry_field` is the event-time field
    (epoch ms) that says when a key was last touched; keys idle for longer than `ttl_ms` of event time
    are dropped and tombstoned. Rules must treat a row older than `ttl_ms` as absent, so that when the
    physical expiry runs never changes a decision.
    """

    name: str
    dtype: np.dtype
    version: int
    expiry_field: str
    ttl_ms: int

    @property
    def layout(self) -> bytes:
        return f"{self.name}/v{self.version}/{np.dtype(self.dtype).itemsize}".encode()
