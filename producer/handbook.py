"""The Fraud Detection Handbook's transaction simulator, as arrays: pure and seeded.

A reimplementation, from its published description, of the simulator of Le Borgne et al.,
*Reproducible Machine Learning for Credit Card Fraud Detection - Practical Handbook*, chapter 3
("Transaction data simulator"), whose data the book's baselines were measured on:

- customers and terminals sit at uniform positions on a 100 x 100 grid; a customer pays only at
  terminals less than 5 grid units away;
- per customer: a mean amount ~ U(5, 100), its standard deviation mean / 2, and a mean number of
  transactions per day ~ U(0, 4); each day's count is Poisson, each time of day ~ N(noon, 20,000 s)
  (times outside the day are dropped), each amount ~ N(mean, std) (a negative draw is replaced by
  one ~ U(0, 2 * mean)), each terminal drawn uniformly from the customer's;
- fraud, in the book's order (a later scenario relabels an earlier one's transaction):
  S1, an amount above 220 is fraud; S2, each day 2 terminals are compromised for 28 days and every
  transaction on them is fraud; S3, each day 3 customers are compromised for 14 days and a third of
  their transactions are multiplied by 5 and fraud.

Differences from the book's pandas code, none of which changes a distribution: draws come from one
numpy Generator in another order (same seed, same data here, not the book's exact rows); S3 picks
each transaction of a compromised customer with probability 1/3 rather than exactly a third of
each draw's set. With the defaults (5,000 customers, 10,000 terminals, 183 days) it makes about
1.75M transactions, 0.84% of them fraud, as the book reports.

`to_pairs` maps rows onto our Transaction schema; see `HandbookSimulation` for which fields the
book cannot fill. Nothing here reads a clock: event times start at the book's 2018-04-01.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from fraudstream.errors import ConfigError
from fraudstream.records import Label, Transaction
from fraudstream.producer.generator import LEGIT, Pair, event_time, uuid4_text

DEFAULT_CUSTOMERS = 5_000
DEFAULT_TERMINALS = 10_000
DEFAULT_DAYS = 183
DEFAULT_LABEL_DELAY_DAYS = 7.0  # the book's feedback delay: chargebacks arrive a week later
START = datetime(2018, 4, 1, tzinfo=timezone.utc)  # the book's first day
DAY_S = 86_400
DAY_MS = DAY_S * 1_000

GRID = 100.0
RADIUS = 5.0
MEAN_AMOUNT = (5.0, 100.0)
TX_PER_DAY = (0.0, 4.0)
TIME_MEAN_S, TIME_STD_S = DAY_S / 2, 20_000.0
S1_AMOUNT_CENTS = 22_000  # above $220.00
S2_TERMINALS_PER_DAY, S2_DAYS = 2, 28
S3_CUSTOMERS_PER_DAY, S3_DAYS, S3_SHARE, S3_FACTOR = 3, 14, 1 / 3, 5

# Scenario names: the `scenario` of each Label, and what `fraudstream evaluate` reports on.
S1_LARGE_AMOUNT = "hb_large_amount"
S2_COMPROMISED_TERMINAL = "hb_compromised_terminal"
S3_COMPROMISED_CARD = "hb_compromised_card"
SCENARIOS: tuple[str, ...] = (LEGIT, S1_LARGE_AMOUNT, S2_COMPROMISED_TERMINAL, S3_COMPROMISED_CARD)

# Where the grid lies on Earth, so that latitude/longitude mean something: one grid unit is one
# kilometre, the grid's south-west corner near Kansas City (a 100 km square, all in the US).
ORIGIN_LAT, ORIGIN_LON = 39.0, -95.0
KM_PER_DEG_LAT = 111.32
KM_PER_DEG_LON = KM_PER_DEG_LAT * math.cos(math.radians(ORIGIN_LAT + GRID / KM_PER_DEG_LAT / 2))


@dataclass(frozen=True, slots=True, eq=False)
class HandbookSimulation:
    """Every transaction of a run, sorted by event time, as columns (row i is one transaction).

    Mapped onto Transaction (`to_pairs`): account_id and card_id are the customer (one card each:
    the book's card is its customer); terminal_id and merchant_id are the terminal (the book has no
    merchants); latitude/longitude are the terminal's grid position (one unit = 1 km, see ORIGIN_*);
    amounts are USD cents. Not modelled by the book, so constant: merchant_category "5999"
    (miscellaneous retail), channel UNKNOWN, country "US", city "Handbook grid", device_id null.
    """

    seed: int
    customers: int
    terminals: int
    days: int
    start_ms: int
    time_ms: np.ndarray  # int64, epoch milliseconds, non-decreasing
    customer: np.ndarray  # int32 customer index
    terminal: np.ndarray  # int32 terminal index
    amount_cents: np.ndarray  # int64
    scenario: np.ndarray  # int8 index into SCENARIOS (0: legit)
    customer_xy: np.ndarray  # float64 (customers, 2), grid coordinates
    terminal_xy: np.ndarray  # float64 (terminals, 2), grid coordinates
    id_bits: np.ndarray  # uint64 (n, 2): the transaction ids' random bits

    def __len__(self) -> int:
        return len(self.time_ms)

    @property
    def fraud_rate(self) -> float:
        return float(np.count_nonzero(self.scenario)) / len(self) if len(self) else 0.0

    def scenario_counts(self) -> dict[str, int]:
        counts = np.bincount(self.scenario, minlength=len(SCENARIOS))
        return {name: int(n) for name, n in zip(SCENARIOS, counts)}

    def count_until(self, sim_ms: float) -> int:
        """How many transactions have an event time at or before sim_ms."""
        return int(np.searchsorted(self.time_ms, sim_ms, side="right"))

    def to_pairs(self, start: int, stop: int) -> list[Pair]:
        """Rows [start, stop) as (Transaction, Label) pairs."""
        rows = range(start, min(stop, len(self)))
        times = self.time_ms[start:stop].tolist()
        customers = self.customer[start:stop].tolist()
        terminals = self.terminal[start:stop].tolist()
        amounts = self.amount_cents[start:stop].tolist()
        scenarios = self.scenario[start:stop].tolist()
        bits = self.id_bits[start:stop].tolist()
        latitude = (ORIGIN_LAT + self.terminal_xy[:, 1] / KM_PER_DEG_LAT).tolist()
        longitude = (ORIGIN_LON + self.terminal_xy[:, 0] / KM_PER_DEG_LON).tolist()
        pairs = []
        for i in range(len(rows)):
            c, t = customers[i], terminals[i]
            hi, lo = bits[i]
            terminal_id = f"hb-terminal-{t:05d}"
            tx = Transaction(
                transaction_id=uuid4_text(hi << 64 | lo),
                account_id=f"hb-customer-{c:05d}",
                card_id=f"hb-card-{c:05d}",
                merchant_id=terminal_id,
                merchant_category="5999",
                terminal_id=terminal_id,
                amount_cents=amounts[i],
                currency="USD",
                event_time=event_time(times[i]),
                channel="UNKNOWN",
                country="US",
                city="Handbook grid",
                latitude=latitude[t],
                longitude=longitude[t],
                device_id=None,
            )
            scenario = SCENARIOS[scenarios[i]]
            pairs.append(
                (
                    tx,
                    Label(
                        transaction_id=tx.transaction_id,
                        is_fraud=scenario != LEGIT,
                        scenario=scenario,
                        terminal_id=terminal_id,
                        event_time=tx.event_time,
                    ),
                )
            )
        return pairs


class HandbookStream:
    """Reads a simulation front to back in batches, for the produce loop."""

    def __init__(self, simulation: HandbookSimulation) -> None:
        self.simulation = simulation
        self.position = 0

    @property
    def exhausted(self) -> bool:
        return self.position >= len(self.simulation)

    def next_batch(self, n: int) -> list[Pair]:
        pairs = self.simulation.to_pairs(self.position, self.position + n)
        self.position += len(pairs)
        return pairs

    def due(self, sim_ms: float) -> int:
        """Transactions whose event time has come by simulated time sim_ms and are not yet read."""
        return max(0, self.simulation.count_until(sim_ms) - self.position)

    def next_time_ms(self) -> int | None:
        return None if self.exhausted else int(self.simulation.time_ms[self.position])


def simulate(
    *,
    customers: int = DEFAULT_CUSTOMERS,
    terminals: int = DEFAULT_TERMINALS,
    days: int = DEFAULT_DAYS,
    seed: int = 0,
    start: datetime = START,
) -> HandbookSimulation:
    """The whole simulation, labelled. Same arguments, same result."""
    for name, value in (("customers", customers), ("terminals", terminals), ("days", days)):
        if value < 1:
            raise ConfigError(f"the handbook simulation needs at least one of {name}, not {value}")
    rng = np.random.default_rng(seed)

    # Profiles (chapter 3, steps 1-3).
    customer_xy = rng.uniform(0.0, GRID, size=(customers, 2))
    mean_amount = rng.uniform(*MEAN_AMOUNT, size=customers)
    std_amount = mean_amount / 2
    tx_per_day = rng.uniform(*TX_PER_DAY, size=customers)
    terminal_xy = rng.uniform(0.0, GRID, size=(terminals, 2))
    offsets, reachable = _terminals_within_radius(customer_xy, terminal_xy)
    reachable_count = np.diff(offsets)

    # Transactions (step 4): a Poisson count per customer and day, then one row per transaction.
    counts = rng.poisson(np.repeat(tx_per_day, days)).astype(np.int64)  # customer-major: row c*days + d
    slot = np.repeat(np.arange(customers * days, dtype=np.int64), counts)
    customer = (slot // days).astype(np.int32)
    day = (slot % days).astype(np.int32)
    n = len(slot)
    second = rng.normal(TIME_MEAN_S, TIME_STD_S, size=n).astype(np.int64)  # truncated, like the book's int()
    amount = rng.normal(mean_amount[customer], std_amount[customer])
    negative = amount < 0
    amount[negative] = rng.uniform(0.0, 2 * mean_amount[customer[negative]])
    amount_cents = np.rint(amount * 100).astype(np.int64)
    pick = rng.random(n)
    # Dropped, as in the book: times outside the day, and customers with no terminal in reach.
    keep = (second > 0) & (second < DAY_S) & (reachable_count[customer] > 0)
    customer, day, second, amount_cents, pick = customer[keep], day[keep], second[keep], amount_cents[keep], pick[keep]
    terminal = reachable[offsets[customer] + (pick * reachable_count[customer]).astype(np.int64)]
    order = np.argsort(day.astype(np.int64) * DAY_S + second, kind="stable")
    customer, day, second, amount_cents, terminal = (
        customer[order],
        day[order],
        second[order],
        amount_cents[order],
        terminal[order],
    )

    # Fraud (step 5), in the book's order.
    scenario = np.zeros(len(customer), dtype=np.int8)
    scenario[amount_cents > S1_AMOUNT_CENTS] = SCENARIOS.index(S1_LARGE_AMOUNT)
    terminal_compromised = _compromised(rng, days, terminals, S2_TERMINALS_PER_DAY, S2_DAYS)
    scenario[terminal_compromised[day, terminal]] = SCENARIOS.index(S2_COMPROMISED_TERMINAL)
    customer_compromised = _compromised(rng, days, customers, S3_CUSTOMERS_PER_DAY, S3_DAYS)
    stolen = customer_compromised[day, customer] & (rng.random(len(customer)) < S3_SHARE)
    amount_cents[stolen] *= S3_FACTOR
    scenario[stolen] = SCENARIOS.index(S3_COMPROMISED_CARD)

    start_ms = int(start.timestamp()) * 1_000
    time_ms = start_ms + (day.astype(np.int64) * DAY_S + second) * 1_000
    id_bits = rng.integers(0, 2**64, size=(len(customer), 2), dtype=np.uint64)
    return HandbookSimulation(
        seed=seed,
        customers=customers,
        terminals=terminals,
        days=days,
        start_ms=start_ms,
        time_ms=time_ms,
        customer=customer,
        terminal=terminal,
        amount_cents=amount_cents,
        scenario=scenario,
        customer_xy=customer_xy,
        terminal_xy=terminal_xy,
        id_bits=id_bits,
    )


def _terminals_within_radius(
    customer_xy: np.ndarray, terminal_xy: np.ndarray, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Each customer's terminals closer than RADIUS, as CSR: offsets (customers + 1) and terminal indices."""
    found: list[np.ndarray] = []
    counts = np.zeros(len(customer_xy), dtype=np.int64)
    for begin in range(0, len(customer_xy), chunk):
        block = customer_xy[begin : begin + chunk]
        squared = ((block[:, None, :] - terminal_xy[None, :, :]) ** 2).sum(axis=2)
        rows, columns = np.nonzero(squared < RADIUS * RADIUS)  # row-major: each customer's terminals in order
        found.append(columns)
        counts[begin : begin + len(block)] = np.bincount(rows, minlength=len(block))
    offsets = np.zeros(len(customer_xy) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, (np.concatenate(found) if found else np.zeros(0, dtype=np.int64)).astype(np.int32)


def _compromised(rng: np.random.Generator, days: int, population: int, per_day: int, lasting: int) -> np.ndarray:
    """(days, population) booleans: each day, `per_day` members drawn at random are compromised for `lasting` days."""
    compromised = np.zeros((days, population), dtype=bool)
    for day in range(days):
        chosen = rng.choice(population, size=min(per_day, population), replace=False)
        compromised[day : day + lasting, chosen] = True
    return compromised
