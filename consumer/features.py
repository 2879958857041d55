"""Per-card and per-terminal features: one definition, used online by the detector and for training.

A card's profile is one fixed-width row (PROFILE_DTYPE) in a KeyedTable keyed by card id. For a
batch of transactions in offset order, `card_features` reads each card's profile, computes the
features of each transaction from the profile as it stood just before it, and updates the
profile: exactly what processing the transactions one by one gives (`card_features_one` is that
one-by-one specification, and a property test holds the two together).

The batch path works in rounds: the k-th transaction of every card in the batch is processed in
round k, so a round touches each card at most once and is a handful of NumPy column operations.
Rounds are as many as the busiest card's transactions in the batch (a few), not as many as the
batch's records.

Only event time is used (the `event_time` field), never the wall clock, and a card's profile
depends only on that card's earlier records: cards live in their account's partition, so a replay
from the changelog computes the same features. A profile idle for longer than PROFILE_TTL_MS is
read as absent (lazy expiry), so dropping it from the store never changes a feature.
Out-of-order records are tolerated: a negative time gap counts as 0 (a jump "at once").

Terminal profiles (TERMINAL_DTYPE, `terminal_features`) follow the same scheme, keyed by terminal
id, for a stage keyed by terminal. Terminals take cards of every account, so that state cannot live in
the account-keyed input's partitions: the detector holds it whole instead, in a window of every input
partition (consumer/terminal.py), whose `terminal_cards` gives the same feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fraudstream.consumer.state.table import KeyedTable, layout_tag

# Symbols of the Channel enum in schemas/transaction.avsc, in order: the int8 codes of TxColumns.channel.
CHANNELS: tuple[str, ...] = ("UNKNOWN", "CARD_PRESENT", "CONTACTLESS", "ONLINE", "ATM")
CHANNEL_CODE = {name: code for code, name in enumerate(CHANNELS)}
ONLINE = CHANNEL_CODE["ONLINE"]
IN_PERSON = np.array([CHANNEL_CODE[c] for c in ("CARD_PRESENT", "CONTACTLESS", "ATM")], dtype=np.int8)
IN_PERSON_LUT = np.isin(np.arange(len(CHANNELS)), IN_PERSON)  # channel code -> in person (a lookup, not isin)

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

# Feature definition constants. Changing one changes what a stored profile means: bump the version.
SESSION_GAP_MS = 10 * MINUTE_MS  # transactions of a card closer than this belong to one session
SMALL_CENTS = 500  # a "small" online payment (card tests are a few dollars or less, card-not-present)
HOME_KM = 100.0  # in-person payments this close to the card's home area count as at home
STAY_KM = 100.0  # an in-person payment this far from where the card's current stay began starts a new stay
HOME_VOTE_MS = HOUR_MS  # a stay away votes against the home area only once it has lasted this long
HOME_WEIGHT_CAP = 20  # the home area is a majority vote over in-person payments, capped
AMOUNT_ALPHA = 0.2  # weight of the newest payment in the card's running mean of ln(amount)
MIN_GAP_S = 1.0  # speeds are computed over at least this long (same-millisecond records)
EARTH_RADIUS_KM = 6_371.0
N_DEVICES = 4  # devices remembered per card
N_TERMINALS = 8  # terminals remembered per card
# Out-of-order tolerance: how far behind the latest event time a record may arrive and still find
# every profile it could read (physical expiry waits this much longer than the TTL).
LATE_GRACE_MS = HOUR_MS
# The longest memory of a profile: the home area and known devices/terminals. Idle longer: forgotten.
PROFILE_TTL_MS = 30 * DAY_MS

# The card's spending over recent windows, as the Fraud Detection Handbook's customer features (count and
# mean amount over 1, 7 and 30 days), kept as exponentially decayed sums with these time constants: a
# fixed-width row, updated per transaction, with no list of past payments to keep or expire.
SPEND_WINDOWS_DAYS: tuple[int, ...] = (1, 7, 30)
_SPEND_TAU_MS = np.array([d * DAY_MS for d in SPEND_WINDOWS_DAYS], dtype=np.float64)

PROFILE_VERSION = (
    3  # 2: FNV-1a hashes of devices and terminals; session_small counts online payments only; 3: spend windows
)
PROFILE_DTYPE = np.dtype(
    [
        ("last_ms", "<i8"),  # event time of the card's latest transaction (0: none)
        ("n", "<u4"),  # transactions seen
        ("amount_log_mean", "<f8"),  # running mean of ln(1 + amount_cents)
        ("loc_ms", "<i8"),  # event time of the latest in-person transaction (0: none)
        ("loc_lat", "<f8"),
        ("loc_lon", "<f8"),
        ("home_lat", "<f8"),
        ("home_lon", "<f8"),
        ("home_w", "<i2"),  # votes for the home area (0: none yet)
        ("stay_ms", "<i8"),  # when the card's current stay (in-person payments in one area) began (0: none)
        ("stay_kmh", "<f8"),  # speed of the jump that began it
        ("stay_lat", "<f8"),  # where it began
        ("stay_lon", "<f8"),
        ("session_n", "<u2"),  # transactions in the current session
        ("session_small", "<u2"),  # small online payments in the current session
        ("session_dev", "<u4"),  # first device new to the card in the current session (0: none)
        ("devices", "<u4", (N_DEVICES,)),  # ring of known device hashes (0: empty)
        ("dev_next", "u1"),
        ("terminals", "<u4", (N_TERMINALS,)),  # ring of known terminal hashes
        ("term_next", "u1"),
        ("spend_n", "<f8", (len(SPEND_WINDOWS_DAYS),)),  # decayed count of payments, per window (at last_ms)
        ("spend_cents", "<f8", (len(SPEND_WINDOWS_DAYS),)),  # decayed sum of their amounts, per window
    ]
)
PROFILE_LAYOUT = layout_tag("card_profile", PROFILE_VERSION, PROFILE_DTYPE)

TERMINAL_WINDOW_MS = 10 * MINUTE_MS  # distinct cards a terminal took within this window
N_TERMINAL_CARDS = 8  # (card, time) pairs remembered per terminal
TERMINAL_TTL_MS = TERMINAL_WINDOW_MS
TERMINAL_VERSION = 2  # 2: FNV-1a hashes of cards
TERMINAL_DTYPE = np.dtype(
    [
        ("last_ms", "<i8"),
        ("cards", "<u4", (N_TERMINAL_CARDS,)),  # ring of card hashes
        ("card_ms", "<i8", (N_TERMINAL_CARDS,)),  # when each was seen
        ("next", "u1"),
    ]
)
TERMINAL_LAYOUT = layout_tag("terminal_profile", TERMINAL_VERSION, TERMINAL_DTYPE)

# Feature names and dtypes, in one place for the batch path, the scalar spec and training.
CARD_FEATURES: dict[str, np.dtype] = {
    "card_n": np.dtype(np.int64),  # earlier transactions of the card (within the TTL)
    "gap_s": np.dtype(np.float64),  # seconds since the card's previous transaction (-1: none)
    "dist_prev_km": np.dtype(np.float64),  # in person: distance from the previous in-person payment
    "speed_kmh": np.dtype(np.float64),  # in person: that distance over the time since it
    "dist_home_km": np.dtype(np.float64),  # in person: distance from the card's home area (0: unknown)
    "home_known": np.dtype(bool),  # in person, and the card has a home area (its first in-person payment has none)
    "stay_kmh": np.dtype(np.float64),  # in person: speed of the jump that began the card's current stay
    "stay_s": np.dtype(np.float64),  # in person: seconds since the current stay began
    "new_device": np.dtype(bool),  # a device the card has not used before
    "session_device": np.dtype(bool),  # the device first seen new on the card earlier in this session
    "session_n": np.dtype(np.int64),  # earlier transactions in this session
    "session_small": np.dtype(np.int64),  # earlier small online payments in this session
    "known_terminal": np.dtype(bool),  # a terminal the card has used before
    "amount_ratio": np.dtype(np.float64),  # amount over the card's typical amount (0: no history)
    # The card's payments over the last 1/7/30 days, this one included: decayed count and mean amount (cents).
    **{f"spend_n_{d}d": np.dtype(np.float64) for d in SPEND_WINDOWS_DAYS},
    **{f"spend_mean_{d}d": np.dtype(np.float64) for d in SPEND_WINDOWS_DAYS},
}
TERMINAL_FEATURES: dict[str, np.dtype] = {
    "terminal_cards": np.dtype(np.int64),  # other distinct cards at this terminal within TERMINAL_WINDOW_MS
}


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def hash_strings(values: pa.Array | pa.ChunkedArray | Sequence[str | bytes | None]) -> np.ndarray:
    """uint32 hash of each value (FNV-1a over its UTF-8 bytes, folded), the same in every process
    (Python's hash() is salted); 0 for a null, never 0 otherwise. Vectorized over the column's bytes."""
    if not isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pa.array([v.encode() if isinstance(v, str) else v for v in values], type=pa.binary())
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    values = values.cast(pa.large_binary())
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    buffers = values.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64, count=n + 1, offset=values.offset * 8)
    data = (
        np.frombuffer(buffers[2], dtype=np.uint8)
        if buffers[2] is not None and len(buffers[2])
        else np.zeros(1, np.uint8)
    )
    lengths = offsets[1:] - offsets[:-1]
    width = int(lengths.max())
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    if width and int(lengths.min()) == width:
        # Every value as long as the longest (fixed-width ids, the usual case): the bytes are one
        # (n, width) matrix, with no gather and no mask.
        start = int(offsets[0])
        chars = data[start : start + n * width].reshape(n, width).astype(np.uint64)
        for j in range(width):
            h = (h ^ chars[:, j]) * _FNV_PRIME
    elif width:
        at = offsets[:-1, None] + np.arange(width)
        live = np.arange(width) < lengths[:, None]
        chars = data[np.minimum(at, len(data) - 1)].astype(np.uint64)
        for j in range(width):
            h = np.where(live[:, j], (h ^ chars[:, j]) * _FNV_PRIME, h)
    folded = ((h >> np.uint64(32)) ^ h).astype(np.uint32)
    folded[folded == 0] = 1
    if values.null_count:
        folded[np.asarray(values.is_null())] = 0
    return folded


def stable_hash(text: str | bytes | None) -> int:
    """hash_strings of one value, in plain Python (the scalar specifications use it)."""
    if text is None:
        return 0
    h = 0xCBF29CE484222325
    for byte in text.encode() if isinstance(text, str) else text:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFF_FFFF_FFFF_FFFF
    return ((h >> 32) ^ h) & 0xFFFF_FFFF or 1


def mcc_code(text: str) -> int:
    return int(text) if len(text) == 4 and text.isdigit() else -1


def _event_ms(value: Any) -> int:
    if isinstance(value, datetime):
        delta = value.astimezone(timezone.utc) - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000 + delta.microseconds // 1_000
    return int(value)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class TxColumns:
    """NumPy columns of n decoded transactions, in offset order."""

    transaction_id: np.ndarray  # object (str)
    account_id: np.ndarray  # object (str)
    card_key: np.ndarray  # object (bytes): the card id, UTF-8
    terminal_key: np.ndarray  # object (bytes): the terminal id, UTF-8
    merchant_category: np.ndarray  # int16 (-1: not a four-digit code)
    channel: np.ndarray  # int8, index into CHANNELS
    device_id: np.ndarray  # object (str or None)
    device_hash: np.ndarray  # uint32, hash_strings(device_id): 0 for none
    card_hash: np.ndarray  # uint32, hash_strings(card id)
    terminal_hash: np.ndarray  # uint32, hash_strings(terminal id)
    event_time_ms: np.ndarray  # int64
    amount_cents: np.ndarray  # int64
    latitude: np.ndarray  # float64
    longitude: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.event_time_ms)

    @classmethod
    def from_arrow(cls, batch: pa.RecordBatch) -> TxColumns:
        """From the columnar decoder's output (a Transaction RecordBatch)."""

        def strings(name: str) -> np.ndarray:
            return batch.column(name).to_numpy(zero_copy_only=False)

        card_ids, terminal_ids = batch.column("card_id"), batch.column("terminal_id")
        cards = card_ids.cast(pa.binary()).to_pylist()
        terminals = terminal_ids.cast(pa.binary()).to_pylist()
        # A detector whose Transaction schema predates device_id (v1) reads every device as unknown.
        device_ids = (
            batch.column("device_id") if "device_id" in batch.schema.names else pa.nulls(batch.num_rows, pa.string())
        )
        devices = device_ids.to_numpy(zero_copy_only=False)
        mcc = (
            pc.cast(batch.column("merchant_category"), pa.int16(), safe=False)
            if pc.all(pc.match_substring_regex(batch.column("merchant_category"), r"^\d{4}$")).as_py()
            else None
        )
        channel_index = pc.index_in(batch.column("channel"), value_set=pa.array(CHANNELS))
        return cls(
            transaction_id=strings("transaction_id"),
            account_id=strings("account_id"),
            card_key=_objects(cards),
            terminal_key=_objects(terminals),
            merchant_category=(
                mcc.to_numpy(zero_copy_only=False).astype(np.int16)
                if mcc is not None
                else np.array([mcc_code(m) for m in batch.column("merchant_category").to_pylist()], dtype=np.int16)
            ),
            channel=pc.fill_null(channel_index, 0).to_numpy(zero_copy_only=False).astype(np.int8),
            device_id=devices,
            device_hash=hash_strings(device_ids),
            card_hash=hash_strings(card_ids),
            terminal_hash=hash_strings(terminal_ids),
            event_time_ms=batch.column("event_time").cast(pa.int64()).to_numpy(zero_copy_only=False),
            amount_cents=batch.column("amount_cents").to_numpy(zero_copy_only=False).astype(np.int64),
            latitude=batch.column("latitude").to_numpy(zero_copy_only=False).astype(np.float64),
            longitude=batch.column("longitude").to_numpy(zero_copy_only=False).astype(np.float64),
        )

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> TxColumns:
        """From decoded records (fastavro dicts, or Transaction.to_dict()); event_time a datetime or epoch ms."""
        n = len(records)
        devices = _objects([r.get("device_id") for r in records])
        cards = [r["card_id"].encode() for r in records]
        terminals = [r["terminal_id"].encode() for r in records]
        return cls(
            transaction_id=_objects([r["transaction_id"] for r in records]),
            account_id=_objects([r["account_id"] for r in records]),
            card_key=_objects(cards),
            terminal_key=_objects(terminals),
            merchant_category=np.fromiter((mcc_code(r["merchant_category"]) for r in records), np.int16, n),
            channel=np.fromiter((CHANNEL_CODE.get(r["channel"], 0) for r in records), np.int8, n),
            device_id=devices,
            device_hash=hash_strings(devices),
            card_hash=hash_strings(cards),
            terminal_hash=hash_strings(terminals),
            event_time_ms=np.fromiter((_event_ms(r["event_time"]) for r in records), np.int64, n),
            amount_cents=np.fromiter((r["amount_cents"] for r in records), np.int64, n),
            latitude=np.fromiter((r["latitude"] for r in records), np.float64, n),
            longitude=np.fromiter((r["longitude"] for r in records), np.float64, n),
        )

    @classmethod
    def concat_in_order(cls, parts: Sequence[tuple[Sequence[int], TxColumns]]) -> TxColumns:
        """One TxColumns from several (positions, columns) parts, rows sorted by position (e.g. the
        batch's columnar and record-wise records back in offset order)."""
        positions = (
            np.concatenate([np.asarray(p, dtype=np.int64) for p, _ in parts]) if parts else np.empty(0, np.int64)
        )
        order = np.argsort(positions, kind="stable")
        names = [f.name for f in fields(cls)]
        if not parts:
            return cls(**{name: np.empty(0, dtype=_EMPTY_DTYPES[name]) for name in names})
        return cls(**{name: np.concatenate([getattr(c, name) for _, c in parts])[order] for name in names})

    def take(self, index: np.ndarray) -> TxColumns:
        return TxColumns(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def record(self, i: int) -> dict[str, Any]:
        """Row i as the dict the scalar specifications take."""
        return {
            "card_id": self.card_key[i].decode(),
            "terminal_id": self.terminal_key[i].decode(),
            "merchant_category": f"{int(self.merchant_category[i]):04d}",
            "channel": CHANNELS[int(self.channel[i])],
            "device_id": self.device_id[i],
            "event_time": int(self.event_time_ms[i]),
            "amount_cents": int(self.amount_cents[i]),
            "latitude": float(self.latitude[i]),
            "longitude": float(self.longitude[i]),
        }


_EMPTY_DTYPES = {
    "transaction_id": object,
    "account_id": object,
    "card_key": object,
    "terminal_key": object,
    "merchant_category": np.int16,
    "channel": np.int8,
    "device_id": object,
    "device_hash": np.uint32,
    "card_hash": np.uint32,
    "terminal_hash": np.uint32,
    "event_time_ms": np.int64,
    "amount_cents": np.int64,
    "latitude": np.float64,
    "longitude": np.float64,
}


def _objects(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def haversine_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Great-circle distance, element-wise (the one implementation both paths use)."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(a, dtype=np.float64)) for a in (lat1, lon1, lat2, lon2))
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.minimum(h, 1.0)))


def _rounds(slots: np.ndarray) -> list[np.ndarray]:
    """Positions grouped by occurrence: round k holds the k-th transaction of each card, in batch order."""
    n = len(slots)
    if n == 0:
        return []
    order = np.argsort(slots, kind="stable")
    sorted_slots = slots[order]
    starts = np.flatnonzero(np.r_[True, sorted_slots[1:] != sorted_slots[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - group_start
    by_rank = np.argsort(rank, kind="stable")  # stable: batch order within a round
    bounds = np.flatnonzero(np.r_[True, np.diff(rank[by_rank]) != 0, True])
    return [by_rank[bounds[k] : bounds[k + 1]] for k in range(len(bounds) - 1)]


def _empty_features(spec: dict[str, np.dtype], n: int) -> dict[str, np.ndarray]:
    return {name: np.zeros(n, dtype=dtype) for name, dtype in spec.items()}


_U32_MAX = 2**32 - 1
_U16_MAX = 2**16 - 1


class _Inputs(NamedTuple):
    """The columns the card kernel reads, computed once per batch and sliced per round."""

    t: np.ndarray
    in_person: np.ndarray
    online: np.ndarray
    amount: np.ndarray
    log_amount: np.ndarray
    dev: np.ndarray
    term: np.ndarray
    lat: np.ndarray
    lon: np.ndarray

    def take(self, index: np.ndarray) -> _Inputs:
        return _Inputs(*(column[index] for column in self))


def card_features(table: KeyedTable, tx: TxColumns) -> dict[str, np.ndarray]:
    """Features of each transaction (CARD_FEATURES), updating the card profiles in offset order."""
    return card_features_split([table], np.zeros(len(tx), dtype=np.int64), tx)


def card_features_split(tables: Sequence[KeyedTable], which: np.ndarray, tx: TxColumns) -> dict[str, np.ndarray]:
    """card_features over several tables at once (one per input partition): row i's card lives in
    tables[which[i]]. The same as card_features(tables[k], the rows of table k) for each k, but each round
    runs once for all tables (its few dozen column operations cost the same for a few rows as for many)."""
    out = _empty_features(CARD_FEATURES, len(tx))
    which = np.asarray(which, dtype=np.int64)
    slots = np.zeros(len(tx), dtype=np.int64)
    members = {}  # table index -> its rows
    for k in np.unique(which).tolist():
        rows = np.flatnonzero(which == k)
        members[k] = rows
        slots[rows] = tables[k].slots(tx.card_key[rows])
    inputs = _Inputs(
        tx.event_time_ms,
        IN_PERSON_LUT[tx.channel],
        tx.channel == ONLINE,
        tx.amount_cents,
        np.log1p(tx.amount_cents.astype(np.float64)),
        tx.device_hash,
        tx.terminal_hash,
        tx.latitude,
        tx.longitude,
    )
    # A card is (table, slot): rounds hold each such card once.
    for index in _rounds((which << 40) | slots):
        s, w = slots[index], which[index]
        if len(members) == 1:
            profile = tables[w[0]].gather(s)  # a copy: this round's cards, each once
            _card_round(profile, inputs.take(index), out, index)
            tables[w[0]].scatter(s, profile)
            continue
        profile = np.empty(len(index), dtype=PROFILE_DTYPE)
        raw = profile.view(np.uint8).reshape(len(index), PROFILE_DTYPE.itemsize)  # whole rows, not field by field
        parts = [(k, np.flatnonzero(w == k)) for k in np.unique(w).tolist()]
        for k, at in parts:
            raw[at] = tables[k].gather(s[at]).view(np.uint8).reshape(len(at), PROFILE_DTYPE.itemsize)
        _card_round(profile, inputs.take(index), out, index)
        for k, at in parts:
            tables[k].scatter(s[at], raw[at].view(PROFILE_DTYPE).reshape(len(at)))
    for k, rows in members.items():
        tables[k].mark_dirty(slots[rows])
    return out


def _card_round(p: np.ndarray, x: _Inputs, out: dict[str, np.ndarray], index: np.ndarray) -> None:
    """Features of one transaction per card (distinct cards), and their profiles updated in place."""
    m = len(p)
    t = x.t
    rows = np.arange(m)
    stale = (p["last_ms"] != 0) & (t - p["last_ms"] > PROFILE_TTL_MS)  # lazy expiry: as if absent
    if stale.any():
        p[stale] = np.zeros((), dtype=PROFILE_DTYPE)
    seen = p["last_ms"] != 0
    in_person = x.in_person
    amount = x.amount
    log_amount = x.log_amount

    out["card_n"][index] = p["n"]
    gap_ms = np.maximum(t - p["last_ms"], 0)
    out["gap_s"][index] = np.where(seen, gap_ms / 1000.0, -1.0)
    out["amount_ratio"][index] = np.where(seen, np.exp(log_amount - p["amount_log_mean"]), 0.0)

    # Session: transactions of a card no more than SESSION_GAP_MS apart.
    in_session = seen & (gap_ms <= SESSION_GAP_MS)
    session_n = np.where(in_session, p["session_n"], 0)
    session_small = np.where(in_session, p["session_small"], 0)
    session_dev = np.where(in_session, p["session_dev"], 0)
    out["session_n"][index] = session_n
    out["session_small"][index] = session_small

    spend_n, spend_cents = spend_update(p["spend_n"], p["spend_cents"], gap_ms, seen, amount)
    for k, days in enumerate(SPEND_WINDOWS_DAYS):
        out[f"spend_n_{days}d"][index] = spend_n[:, k]
        out[f"spend_mean_{days}d"][index] = spend_cents[:, k] / spend_n[:, k]

    # Devices and terminals the card has used.
    dev = x.dev
    has_dev = dev != 0
    new_device = has_dev & ~(p["devices"] == dev[:, None]).any(axis=1)
    out["new_device"][index] = new_device
    out["session_device"][index] = has_dev & (dev == session_dev)
    term = x.term
    out["known_terminal"][index] = (p["terminals"] == term[:, None]).any(axis=1)

    # Location (in-person payments only: an online payment's coordinates are the merchant's).
    has_loc = in_person & (p["loc_ms"] != 0)
    dist_prev = np.where(has_loc, haversine_km(p["loc_lat"], p["loc_lon"], x.lat, x.lon), 0.0)
    hours = np.maximum(np.maximum(t - p["loc_ms"], 0) / 1000.0, MIN_GAP_S) / 3600.0
    speed = np.where(has_loc, dist_prev / hours, 0.0)
    has_home = in_person & (p["home_w"] > 0)
    dist_home = np.where(has_home, haversine_km(p["home_lat"], p["home_lon"], x.lat, x.lon), 0.0)
    has_stay = in_person & (p["stay_ms"] != 0)
    dist_stay = np.where(has_stay, haversine_km(p["stay_lat"], p["stay_lon"], x.lat, x.lon), 0.0)
    new_stay = in_person & (~has_stay | (dist_stay >= STAY_KM))
    stay_ms = np.where(new_stay, t, p["stay_ms"])
    stay_kmh = np.where(new_stay, speed, p["stay_kmh"])
    stay_s = np.where(in_person, np.maximum(t - stay_ms, 0) / 1000.0, 0.0)
    out["dist_prev_km"][index] = dist_prev
    out["speed_kmh"][index] = speed
    out["dist_home_km"][index] = dist_home
    out["home_known"][index] = has_home
    out["stay_kmh"][index] = np.where(in_person, stay_kmh, 0.0)
    out["stay_s"][index] = stay_s

    # Update the profiles.
    p["spend_n"] = spend_n
    p["spend_cents"] = spend_cents
    p["last_ms"] = t
    p["n"] = np.minimum(p["n"].astype(np.int64) + 1, _U32_MAX)
    p["amount_log_mean"] = np.where(
        seen, p["amount_log_mean"] + AMOUNT_ALPHA * (log_amount - p["amount_log_mean"]), log_amount
    )
    p["session_n"] = np.minimum(session_n + 1, _U16_MAX)
    p["session_small"] = np.minimum(session_small + ((amount <= SMALL_CENTS) & x.online), _U16_MAX)
    p["session_dev"] = np.where((session_dev == 0) & new_device, dev, session_dev)
    if new_device.any():
        r = rows[new_device]
        p["devices"][r, p["dev_next"][r]] = dev[r]
        p["dev_next"][r] = (p["dev_next"][r] + 1) % N_DEVICES
    new_terminal = ~out["known_terminal"][index]
    if new_terminal.any():
        r = rows[new_terminal]
        p["terminals"][r, p["term_next"][r]] = term[r]
        p["term_next"][r] = (p["term_next"][r] + 1) % N_TERMINALS
    # Home area: a vote over in-person payments. At home: a vote for; away, in a stay that has lasted
    # HOME_VOTE_MS: a vote against. A trip of a few minutes (a cloned card's spree) never moves it.
    at_home = has_home & (dist_home < HOME_KM)
    votes_away = has_home & ~at_home & (stay_s * 1000.0 >= HOME_VOTE_MS)
    w = p["home_w"].astype(np.int64)
    votes = np.where(at_home, np.minimum(w + 1, HOME_WEIGHT_CAP), np.where(votes_away, w - 1, w))
    moves = in_person & ((w == 0) | (votes_away & (votes <= 0)))
    p["home_w"] = np.where(moves, 1, votes)
    p["home_lat"] = np.where(moves, x.lat, p["home_lat"])
    p["home_lon"] = np.where(moves, x.lon, p["home_lon"])
    p["stay_ms"] = stay_ms
    p["stay_kmh"] = stay_kmh
    p["stay_lat"] = np.where(new_stay, x.lat, p["stay_lat"])
    p["stay_lon"] = np.where(new_stay, x.lon, p["stay_lon"])
    p["loc_ms"] = np.where(in_person, t, p["loc_ms"])
    p["loc_lat"] = np.where(in_person, x.lat, p["loc_lat"])
    p["loc_lon"] = np.where(in_person, x.lon, p["loc_lon"])


def card_features_one(profile: np.void | None, tx: dict) -> tuple[dict, np.void]:
    """The specification, one transaction at a time: (features, new profile). `profile` None: a new card."""
    p = _zero_row(PROFILE_DTYPE) if profile is None else profile.copy()
    t = _event_ms(tx["event_time"])
    if p["last_ms"] != 0 and t - int(p["last_ms"]) > PROFILE_TTL_MS:
        p = _zero_row(PROFILE_DTYPE)
    seen = int(p["last_ms"]) != 0
    channel = CHANNEL_CODE.get(tx["channel"], 0)
    in_person = channel in IN_PERSON
    amount = int(tx["amount_cents"])
    log_amount = float(np.log1p(np.float64(amount)))
    f: dict[str, Any] = {}

    f["card_n"] = int(p["n"])
    gap_ms = max(t - int(p["last_ms"]), 0)
    f["gap_s"] = gap_ms / 1000.0 if seen else -1.0
    f["amount_ratio"] = float(np.exp(np.float64(log_amount - float(p["amount_log_mean"])))) if seen else 0.0

    in_session = seen and gap_ms <= SESSION_GAP_MS
    session_n = int(p["session_n"]) if in_session else 0
    session_small = int(p["session_small"]) if in_session else 0
    session_dev = int(p["session_dev"]) if in_session else 0
    f["session_n"], f["session_small"] = session_n, session_small

    spend_n, spend_cents = spend_update(
        p["spend_n"][None, :], p["spend_cents"][None, :], np.array([gap_ms]), np.array([seen]), np.array([amount])
    )
    for k, days in enumerate(SPEND_WINDOWS_DAYS):
        f[f"spend_n_{days}d"] = float(spend_n[0, k])
        f[f"spend_mean_{days}d"] = float(spend_cents[0, k] / spend_n[0, k])

    dev = stable_hash(tx.get("device_id"))
    known_devices = [int(d) for d in p["devices"]]
    new_device = dev != 0 and dev not in known_devices
    f["new_device"] = new_device
    f["session_device"] = dev != 0 and dev == session_dev
    term = stable_hash(tx["terminal_id"])
    known_terminal = term in [int(x) for x in p["terminals"]]
    f["known_terminal"] = known_terminal

    dist_prev = speed = dist_home = stay_kmh = stay_s = 0.0
    f["home_known"] = bool(in_person and int(p["home_w"]) > 0)
    if in_person:
        lat, lon = float(tx["latitude"]), float(tx["longitude"])
        if int(p["loc_ms"]) != 0:
            dist_prev = _distance(float(p["loc_lat"]), float(p["loc_lon"]), lat, lon)
            speed = dist_prev / (max(max(t - int(p["loc_ms"]), 0) / 1000.0, MIN_GAP_S) / 3600.0)
        home_w = int(p["home_w"])
        if home_w > 0:
            dist_home = _distance(float(p["home_lat"]), float(p["home_lon"]), lat, lon)
        if int(p["stay_ms"]) == 0 or _distance(float(p["stay_lat"]), float(p["stay_lon"]), lat, lon) >= STAY_KM:
            p["stay_ms"], p["stay_kmh"], p["stay_lat"], p["stay_lon"] = t, speed, lat, lon
        stay_kmh = float(p["stay_kmh"])
        stay_s = max(t - int(p["stay_ms"]), 0) / 1000.0
    f.update(dist_prev_km=dist_prev, speed_kmh=speed, dist_home_km=dist_home, stay_kmh=stay_kmh, stay_s=stay_s)

    p["spend_n"], p["spend_cents"] = spend_n[0], spend_cents[0]
    p["last_ms"] = t
    p["n"] = min(int(p["n"]) + 1, 2**32 - 1)
    p["amount_log_mean"] = (
        float(p["amount_log_mean"]) + AMOUNT_ALPHA * (log_amount - float(p["amount_log_mean"])) if seen else log_amount
    )
    p["session_n"] = min(session_n + 1, 2**16 - 1)
    p["session_small"] = min(session_small + (amount <= SMALL_CENTS and channel == ONLINE), 2**16 - 1)
    p["session_dev"] = dev if session_dev == 0 and new_device else session_dev
    if new_device:
        p["devices"][int(p["dev_next"])] = dev
        p["dev_next"] = (int(p["dev_next"]) + 1) % N_DEVICES
    if not known_terminal:
        p["terminals"][int(p["term_next"])] = term
        p["term_next"] = (int(p["term_next"]) + 1) % N_TERMINALS
    if in_person:
        at_home = home_w > 0 and dist_home < HOME_KM
        votes_away = home_w > 0 and not at_home and stay_s * 1000.0 >= HOME_VOTE_MS
        if home_w == 0 or (votes_away and home_w - 1 <= 0):
            p["home_w"], p["home_lat"], p["home_lon"] = 1, lat, lon
        elif at_home:
            p["home_w"] = min(home_w + 1, HOME_WEIGHT_CAP)
        elif votes_away:
            p["home_w"] = home_w - 1
        p["loc_ms"], p["loc_lat"], p["loc_lon"] = t, lat, lon
    return f, p


def spend_update(
    n: np.ndarray, cents: np.ndarray, gap_ms: np.ndarray, seen: np.ndarray, amount: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The spend windows after one more payment per row: the sums decayed over the gap since the card's
    previous payment, plus this one (weight 1). (rows, windows) arrays; one implementation for both paths."""
    decay = np.where(seen[:, None], np.exp(-gap_ms[:, None] / _SPEND_TAU_MS), 0.0)
    return n * decay + 1.0, cents * decay + amount[:, None]


def _zero_row(dtype: np.dtype) -> np.void:
    """A new all-zero row of `dtype`: a structured scalar, writable field by field."""
    row = np.zeros((), dtype=dtype)[()]
    if not isinstance(row, np.void):  # what a 0-d array's [()] gives; numpy's stubs say an array
        raise TypeError(f"a row of {dtype} is {type(row).__name__}, not a structured scalar")
    return row


def _distance(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    return float(haversine_km(np.array([lat1]), np.array([lon1]), np.array([lat2]), np.array([lon2]))[0])


# ---------------------------------------------------------------------------------------------
# Per-terminal state: for a stage keyed by terminal.


def terminal_features(table: KeyedTable, tx: TxColumns) -> dict[str, np.ndarray]:
    """TERMINAL_FEATURES of each transaction, updating the terminal profiles in offset order."""
    out = _empty_features(TERMINAL_FEATURES, len(tx))
    slots = table.slots(tx.terminal_key)
    cards = tx.card_hash
    for index in _rounds(slots):
        s = slots[index]
        p = table.gather(s)
        t = tx.event_time_ms[index]
        card = cards[index]
        stale = (p["last_ms"] != 0) & (t - p["last_ms"] > TERMINAL_TTL_MS)
        if stale.any():
            p[stale] = np.zeros((), dtype=TERMINAL_DTYPE)
        recent = (p["card_ms"] != 0) & (t[:, None] - p["card_ms"] <= TERMINAL_WINDOW_MS) & (p["cards"] != card[:, None])
        values = np.sort(np.where(recent, p["cards"], 0), axis=1)
        distinct = (values[:, :1] != 0).sum(axis=1) + ((values[:, 1:] != values[:, :-1]) & (values[:, 1:] != 0)).sum(
            axis=1
        )
        out["terminal_cards"][index] = distinct
        rows = np.arange(len(p))
        p["cards"][rows, p["next"]] = card
        p["card_ms"][rows, p["next"]] = t
        p["next"] = (p["next"] + 1) % N_TERMINAL_CARDS
        p["last_ms"] = t
        table.scatter(s, p)
    table.mark_dirty(slots)
    return out


def terminal_features_one(profile: np.void | None, tx: dict) -> tuple[dict, np.void]:
    """The specification of terminal_features, one transaction at a time."""
    p = _zero_row(TERMINAL_DTYPE) if profile is None else profile.copy()
    t = _event_ms(tx["event_time"])
    if p["last_ms"] != 0 and t - int(p["last_ms"]) > TERMINAL_TTL_MS:
        p = _zero_row(TERMINAL_DTYPE)
    card = stable_hash(tx["card_id"])
    others = {
        int(c)
        for c, ms in zip(p["cards"], p["card_ms"], strict=True)
        if ms != 0 and t - int(ms) <= TERMINAL_WINDOW_MS and int(c) != card
    }
    slot = int(p["next"])
    p["cards"][slot], p["card_ms"][slot] = card, t
    p["next"] = (slot + 1) % N_TERMINAL_CARDS
    p["last_ms"] = t
    return {"terminal_cards": len(others)}, p


def expiry_horizon(watermark_ms: int, *, ttl_ms: int = PROFILE_TTL_MS, grace_ms: int = LATE_GRACE_MS) -> int:
    """`older_than` for KeyedTable.expire("last_ms", ...) once records up to event time `watermark_ms`
    (the latest seen) are processed. A record may still arrive up to grace_ms older than the watermark;
    it reads a profile as absent only when its own time is more than ttl_ms past it, so rows are
    dropped only when no such record can still read them: physical expiry never changes a feature."""
    return watermark_ms - grace_ms - ttl_ms
