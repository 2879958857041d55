"""Everyday traffic drawn as arrays: the generator's hot path, vectorised with NumPy and Arrow.

Everyday purchases are about 96% of the generator's records. `PopulationArrays` holds the population
as flat arrays (variable-length lists such as an account's cards as offsets into one flat array), so
that a whole batch of everyday purchases is drawn with a handful of NumPy calls and its string
columns are taken from Arrow dictionaries, with no Python object per record. The draws follow
Generator._everyday's rules exactly (who pays at this hour, a favourite terminal nine times in ten,
the account's card, an amount near its typical one, the channel for the terminal's kind, a device
online); only the random numbers come from a NumPy generator seeded like the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa

from fraudstream.producer.generator import AMOUNT_SPREAD, ATM_NOTE_CENTS, LEGIT_MAX_CENTS, Population

KIND_CODES = {"pos": 0, "atm": 1, "web": 2}
CHANNELS = pa.array(["CONTACTLESS", "CARD_PRESENT", "ATM", "ONLINE"], pa.string())
CONTACTLESS, CARD_PRESENT, ATM, ONLINE = range(4)
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_UUID_LENGTH = 36


def _csr(lists) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) of variable-length lists laid end to end."""
    lengths = np.fromiter((len(found) for found in lists), np.int64, len(lists))
    offsets = np.zeros(len(lists), np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    return offsets, lengths


def _pick(offsets: np.ndarray, lengths: np.ndarray, owners: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """For each owner, the position in the flat array of a uniformly drawn element of its list."""
    return offsets[owners] + (draws * lengths[owners]).astype(np.int64)


class PopulationArrays:
    """A population as arrays, built once per population."""

    def __init__(self, population: Population) -> None:
        accounts, terminals = population.accounts, population.terminals
        self.account_ids = pa.array([a.account_id for a in accounts], pa.string())
        self.home = np.array([a.home for a in accounts], np.int64)
        self.typical = np.array([a.typical_amount_cents for a in accounts], np.float64)
        self.card_offsets, self.card_counts = _csr([a.cards for a in accounts])
        self.cards = pa.array([c for a in accounts for c in a.cards], pa.string())
        self.device_offsets, self.device_counts = _csr([a.devices for a in accounts])
        self.devices = pa.array([d for a in accounts for d in a.devices], pa.string())
        self.favourite_offsets, self.favourite_counts = _csr([a.favourite_terminals for a in accounts])
        self.favourites = np.array([t for a in accounts for t in a.favourite_terminals], np.int64)
        self.local_offsets, self.local_counts = _csr(population.in_person_terminals_at)
        self.local = np.array([t for found in population.in_person_terminals_at for t in found], np.int64)
        self.active_by_utc_hour = [np.array(bucket, np.int64) for bucket in population.active_by_utc_hour]
        self.amount_factor = np.array([t.amount_factor for t in terminals], np.float64)
        self.kind = np.array([KIND_CODES[t.kind] for t in terminals], np.int8)
        self.terminal_strings = {
            name: pa.array([getattr(t, name) for t in terminals], pa.string())
            for name in ("terminal_id", "merchant_id", "merchant_category", "country", "city")
        }
        self.latitude = np.array([t.latitude for t in terminals], np.float64)
        self.longitude = np.array([t.longitude for t in terminals], np.float64)
        self.spread = np.array(AMOUNT_SPREAD, np.float64)


@dataclass(frozen=True)
class Everyday:
    """A batch of everyday purchases as arrays (indices into the population's arrays)."""

    arrays: PopulationArrays
    uuid_bytes: np.ndarray  # (n, 16) uint8: version-4 UUIDs
    account: np.ndarray
    card: np.ndarray  # positions in arrays.cards
    terminal: np.ndarray
    amount_cents: np.ndarray
    channel: np.ndarray  # indices into CHANNELS
    device: np.ndarray  # positions in arrays.devices, -1 for none

    def __len__(self) -> int:
        return len(self.account)

    @cached_property
    def transaction_ids(self) -> pa.StringArray:
        return uuid_strings(self.uuid_bytes)

    def columns(self, now_ms: int) -> dict[str, pa.Array]:
        """The Transaction columns (Arrow), every row at event time now_ms."""
        a, n = self.arrays, len(self)
        terminal = pa.array(self.terminal)
        has_device = self.device >= 0
        device = a.devices.take(pa.array(np.where(has_device, self.device, 0), mask=~has_device))
        strings = {name: values.take(terminal) for name, values in a.terminal_strings.items()}
        return {
            "transaction_id": self.transaction_ids,
            "account_id": a.account_ids.take(pa.array(self.account)),
            "card_id": a.cards.take(pa.array(self.card)),
            "merchant_id": strings["merchant_id"],
            "merchant_category": strings["merchant_category"],
            "terminal_id": strings["terminal_id"],
            "amount_cents": pa.array(self.amount_cents, pa.int64()),
            "currency": pa.repeat(pa.scalar("USD", pa.string()), n),
            "event_time": pa.repeat(pa.scalar(now_ms, pa.timestamp("ms")), n),
            "channel": CHANNELS.take(pa.array(self.channel)),
            "country": strings["country"],
            "city": strings["city"],
            "latitude": pa.array(a.latitude[self.terminal], pa.float64()),
            "longitude": pa.array(a.longitude[self.terminal], pa.float64()),
            "device_id": device,
        }


def draw_everyday(arrays: PopulationArrays, rng: np.random.Generator, n: int, now_ms: int) -> Everyday:
    """n everyday purchases at now_ms: Generator._everyday's rules, drawn for the whole batch at once."""
    a = arrays
    bucket = a.active_by_utc_hour[(now_ms // 3_600_000) % 24]
    draws = rng.random((8, n))
    account = bucket[(draws[0] * len(bucket)).astype(np.int64)]
    favourite = draws[1] < 0.9
    home_local = a.home[account]
    terminal = np.where(
        favourite,
        a.favourites[
            np.minimum(_pick(a.favourite_offsets, a.favourite_counts, account, draws[2]), len(a.favourites) - 1)
        ],
        a.local[np.minimum(_pick(a.local_offsets, a.local_counts, home_local, draws[2]), max(len(a.local) - 1, 0))],
    )
    card = _pick(a.card_offsets, a.card_counts, account, draws[3])
    kind = a.kind[terminal]
    # The account's typical amount, scaled by the terminal's category and spread around it.
    amount = (a.typical[account] * a.amount_factor[terminal] * a.spread[(draws[4] * 1024).astype(np.int64)]).astype(
        np.int64
    )
    over = amount > LEGIT_MAX_CENTS  # rare: everyday spending stays under the seed's threshold
    amount = np.where(over, LEGIT_MAX_CENTS // 2 + (draws[5] * (LEGIT_MAX_CENTS // 2)).astype(np.int64), amount)
    amount = np.where(
        kind == KIND_CODES["atm"],
        np.maximum(ATM_NOTE_CENTS, amount // ATM_NOTE_CENTS * ATM_NOTE_CENTS),
        np.maximum(50, amount),
    )
    channel = np.select(
        [kind == KIND_CODES["pos"], kind == KIND_CODES["atm"]],
        [np.where(draws[6] < 0.55, CONTACTLESS, CARD_PRESENT), ATM],
        ONLINE,
    ).astype(np.int64)
    device = np.where(kind == KIND_CODES["web"], _pick(a.device_offsets, a.device_counts, account, draws[7]), -1)
    uuid_bytes = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    uuid_bytes[:, 6] = (uuid_bytes[:, 6] & 0x0F) | 0x40  # version 4
    uuid_bytes[:, 8] = (uuid_bytes[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    return Everyday(a, uuid_bytes, account, card, terminal, amount, channel, device)


def uuid_strings(uuid_bytes: np.ndarray) -> pa.StringArray:
    """The canonical text (8-4-4-4-12 lowercase hex) of each row's 16 bytes, built as one buffer."""
    n = len(uuid_bytes)
    hex_digits = np.empty((n, 32), np.uint8)
    hex_digits[:, 0::2] = _HEX[uuid_bytes >> 4]
    hex_digits[:, 1::2] = _HEX[uuid_bytes & 0x0F]
    text = np.full((n, _UUID_LENGTH), ord("-"), np.uint8)
    for start, stop, at in ((0, 8, 0), (8, 12, 9), (12, 16, 14), (16, 20, 19), (20, 32, 24)):
        text[:, at : at + stop - start] = hex_digits[:, start:stop]
    offsets = np.arange(0, (n + 1) * _UUID_LENGTH, _UUID_LENGTH, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text.tobytes()))
