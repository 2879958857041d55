"""Held records: the compromised-terminal rule's look-ahead, decided later (Kafka Streams' `suppress`).

The first victim of a tampered terminal looks like any traveller's (or local's) payment: only the next cards
the terminal takes give it away. So the records the look-ahead could still turn to fraud
(`RuleSet.to_hold`: decided legit, in person, far from home, no home known yet, or at a terminal that
already took another card; about 10% of the stream) are not routed with their batch. They go to a keyed store of their own,
`held`, partitioned like the input and keyed by their input position, whose changes reach its compacted
changelog inside the batch's transaction, with the batch's input offsets. Every other record is decided
at once, as before.

A held record is released in a later batch's transaction (its output, and a tombstone for its row) once the
terminal window answers for [t - window, t + look-ahead]:

- every input partition has been read past t + look-ahead + the window's tolerance (the event-time gate's
  rule, further ahead); or
- a partition that has not is at its end (asked of its leader, read_committed), and its newest record was
  created `terminal_hold_idle_ms` or more before that ask and after the held record: a quiet partition
  (the end of a demo's stream, a lull) does not hold decisions forever. A partition that stopped short of
  the others (they have records created after its newest) is stalled, not quiet, until `terminal_stall_ms`
  has passed since its newest record (TerminalReader._stopped_short). Like the gate's idle time, this is a
  stated trade: a record created on that partition after the lull, with an event time inside the
  look-ahead, is not counted.

A record released the second way carries the `fraudstream.released_early` header (RELEASED_EARLY_HEADER),
naming the partitions its look-ahead was cut short on: where a run that saw those partitions' later records
(a replay, a run without the lull) decides otherwise, the difference is named, not guessed.

Then the rule is asked again with the look-ahead (`RuleSet.fires_on_release`): fraud gets a FraudAlert
naming compromised_terminal, legit is forwarded byte for byte. A crash between hold and release loses
nothing: the held rows come back from the changelog with the partition, and are released by whichever
detector owns it then; an aborted transaction restores them too. The row is fixed-width (the state
store's layout), so a record whose key or value does not fit is decided at once, and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from confluent_kafka import TIMESTAMP_CREATE_TIME

from fraudstream.consumer.state.stores import StoreSpec
from fraudstream.consumer.state.table import KeyedTable, layout_tag

RELEASED_EARLY_HEADER = "fraudstream.released_early"  # value: the quiet partitions, comma-separated
KEY_BYTES = 64
VALUE_BYTES = 512  # a transaction's Avro value is about 150 bytes
RULE_SET_BYTES = 32  # a rule set's version: 12 hex digits from a file, a number from the rules topic
_V1_FIELDS = [
    ("event_time_ms", "<i8"),
    ("created_ms", "<i8"),  # event time; the input record's Kafka timestamp
    ("terminal", "<u4"),
    ("card", "<u4"),  # the terminal window's hashes
    ("dist_home_km", "<f4"),
    ("score", "<f8"),
    ("channel", "i1"),  # score: the model's, as the alert carries it
    ("rule_set", f"S{RULE_SET_BYTES}"),  # the version of the rule set that held it, which its output names
    ("key_len", "<i2"),
    ("value_len", "<i2"),  # -1: no key
    ("key", f"V{KEY_BYTES}"),
    ("value", f"V{VALUE_BYTES}"),  # the bytes forwarded if it stays legit
]
HELD_DTYPE_V1 = np.dtype(_V1_FIELDS)
# v2: the shadow rule set's verdict when the row was held (consumer/stateful.py, "Shadow rules"): its rules
# that fired then, one bit per rule in the shadow set's order (bit 63: the 64th rule or a later one), and
# the shadow set's version (empty: no shadow set then). The release compares it with the live verdict.
SHADOW_ALL_BITS = 64
HELD_DTYPE = np.dtype([*_V1_FIELDS, ("shadow_fired", "<u8"), ("shadow_set", f"S{RULE_SET_BYTES}")])


def _byte_offset(dtype: np.dtype, name: str) -> int:
    """Where field `name` starts in a row of the structured `dtype`."""
    if dtype.fields is None or name not in dtype.fields:
        raise TypeError(f"{dtype} has no field {name!r}")
    return dtype.fields[name][1]


_KEY_AT, _VALUE_AT = _byte_offset(HELD_DTYPE, "key"), _byte_offset(HELD_DTYPE, "value")  # the bytes' offsets in a row
# Held rows are deleted on release only, with their output in the same transaction: never by age, whatever the
# stream time says (a row expired without its output is a record lost).
HELD = StoreSpec(
    name="held",
    dtype=HELD_DTYPE,
    layout=layout_tag("held_record", 2, HELD_DTYPE),
    expiry_field="event_time_ms",
    ttl_ms=None,
    # Rows held by a detector of the previous layout are read on restore, with no shadow verdict.
    older_layouts=((layout_tag("held_record", 1, HELD_DTYPE_V1), HELD_DTYPE_V1),),
)


def position_key(partition: int, offset: int) -> bytes:
    """A held row's key: its input position (unique, and the same whichever detector holds it)."""
    return (partition << 40 | offset).to_bytes(8, "big")


def shadow_bits(fired: np.ndarray) -> np.ndarray:
    """A (rules, rows) matrix of fired rules as one uint64 per row: bit k for rule k, bit 63 for rule 63 and later."""
    bits = np.zeros(fired.shape[1], dtype=np.uint64)
    for k in range(fired.shape[0]):
        bits |= fired[k].astype(np.uint64) << np.uint64(min(k, SHADOW_ALL_BITS - 1))
    return bits


def fired_names(bits: int, names: tuple[str, ...] | list[str]) -> list[str]:
    """The rule names of shadow_bits' `bits` (rules past the 63rd are not told apart: all of them are named)."""
    last = SHADOW_ALL_BITS - 1
    named = [name for k, name in enumerate(names[:last]) if bits >> k & 1]
    return named + (list(names[last:]) if bits >> last & 1 else [])


def fits(key: bytes | None, value: bytes, rule_set: bytes) -> bool:
    return len(value) <= VALUE_BYTES and (key is None or len(key) <= KEY_BYTES) and len(rule_set) <= RULE_SET_BYTES


def hold(
    table: KeyedTable,
    keys: list[bytes],
    *,
    event_time_ms: np.ndarray,
    created_ms: np.ndarray,
    terminal: np.ndarray,
    card: np.ndarray,
    dist_home_km: np.ndarray,
    score: np.ndarray,
    channel: np.ndarray,
    record_keys: list[bytes | None],
    values: list[bytes],
    rule_set: bytes,
    shadow_fired: np.ndarray | None = None,
    shadow_set: bytes = b"",
) -> None:
    """Put records in the held table (dirty: written to the changelog with the batch). `shadow_fired`: each
    row's shadow rules that fired (shadow_bits), under the shadow set `shadow_set`."""
    rows = np.zeros(len(keys), dtype=HELD_DTYPE)
    rows["rule_set"] = rule_set
    if shadow_fired is not None:
        rows["shadow_fired"], rows["shadow_set"] = shadow_fired, shadow_set
    rows["event_time_ms"], rows["created_ms"] = event_time_ms, created_ms
    rows["terminal"], rows["card"] = terminal, card
    rows["dist_home_km"], rows["score"], rows["channel"] = dist_home_km, score, channel
    rows["key_len"] = [-1 if k is None else len(k) for k in record_keys]
    rows["value_len"] = [len(v) for v in values]
    # The key and value bytes, each padded to its field's width, written into the rows' byte matrix at once.
    raw = rows.view(np.uint8).reshape(len(rows), HELD_DTYPE.itemsize)
    raw[:, _KEY_AT : _KEY_AT + KEY_BYTES] = np.frombuffer(
        b"".join((k or b"").ljust(KEY_BYTES, b"\0") for k in record_keys), np.uint8
    ).reshape(len(rows), KEY_BYTES)
    raw[:, _VALUE_AT : _VALUE_AT + VALUE_BYTES] = np.frombuffer(
        b"".join(v.ljust(VALUE_BYTES, b"\0") for v in values), np.uint8
    ).reshape(len(rows), VALUE_BYTES)
    slots = table.slots(keys)
    table.scatter(slots, rows)
    table.mark_dirty(slots)


@dataclass(frozen=True, slots=True)
class HeldRecord:
    """A released row's input record, shaped like a consumed message for the decide and produce code."""

    partition_: int
    offset_: int
    key_: bytes | None
    value_: bytes
    created_ms: int
    topic_: str

    def key(self) -> bytes | None:
        return self.key_

    def value(self) -> bytes:
        return self.value_

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def topic(self) -> str:
        return self.topic_

    def headers(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (TIMESTAMP_CREATE_TIME, self.created_ms)

    def error(self) -> None:
        return None


def records_of(rows: np.ndarray, keys: list[bytes], topic: str) -> list[HeldRecord]:
    """The input records of held rows (their stored key and value bytes): slices of the rows' bytes, columns
    read once (indexing a structured row field by field costs several times more)."""
    size, data = HELD_DTYPE.itemsize, rows.tobytes()
    key_at, value_at = _KEY_AT, _VALUE_AT  # locals: read once per record below
    out = []
    for i, (position, key_len, value_len, created) in enumerate(
        zip(keys, rows["key_len"].tolist(), rows["value_len"].tolist(), rows["created_ms"].tolist(), strict=True)
    ):
        where, base = int.from_bytes(position, "big"), i * size
        key = None if key_len < 0 else data[base + key_at : base + key_at + key_len]
        out.append(
            HeldRecord(
                where >> 40,
                where & ((1 << 40) - 1),
                key,
                data[base + value_at : base + value_at + value_len],
                created,
                topic,
            )
        )
    return out
