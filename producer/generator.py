"""Synthetic card payments that know the truth: a pure, seeded generator.

A population (accounts with cards and habits, merchants with terminals in real cities) is built
once with faker; the hot path then draws only from random.Random, so faker costs nothing per
transaction. Fraud comes from named scenarios. A scenario is an episode of one or more
transactions scheduled in event time (a burst of card tests, a card used abroad minutes after a
purchase at home); every transaction comes with a Label naming the scenario that made it,
"legit" for normal traffic. Labels are never part of the Transaction itself.

The generator never reads a clock: callers pass the event time (`now_ms`), the produce loop the
wall clock, tests a simulated one (`stream`). Same seed and same clock values, same records.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cache
from itertools import count
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from fraudstream.errors import ConfigError
from fraudstream.records import Label, Transaction

if TYPE_CHECKING:
    from faker import Faker

    from fraudstream.producer.columns import Everyday, PopulationArrays

# Scenario names: a contract with the detector's quality report.
LEGIT = "legit"
LARGE_AMOUNT = "large_amount"  # the seed's scenario: one transaction above $900
CARD_TESTING = "card_testing"  # a burst of tiny online payments on a stolen card, then a large one
FAR_FROM_HOME = "far_from_home"  # a cloned card used far from home minutes after a purchase at home
COMPROMISED_TERMINAL = "compromised_terminal"  # one tampered terminal takes many cards in a short window
FRAUD_SCENARIOS: tuple[str, ...] = (LARGE_AMOUNT, CARD_TESTING, FAR_FROM_HOME, COMPROMISED_TERMINAL)
SCENARIOS: tuple[str, ...] = (LEGIT, *FRAUD_SCENARIOS)

# Fraction of all transactions that each fraud scenario makes (about 3.5% fraud in all).
DEFAULT_SHARES: dict[str, float] = {
    LARGE_AMOUNT: 0.015,
    CARD_TESTING: 0.010,
    FAR_FROM_HOME: 0.005,
    COMPROMISED_TERMINAL: 0.005,
}
# Genuine purchases above $900 (labelled legit): the false positives of the seed's threshold rule.
DEFAULT_LARGE_LEGIT_SHARE = 0.003
LARGE_LEGIT = "large_legit"  # an episode kind, not a label: its transactions are labelled legit
# Genuine purchases away from home (travel), so that location alone does not prove fraud.
TRAVEL_SHARE = 0.004
TRAVEL = "travel"  # an episode kind, labelled legit

SEED_THRESHOLD_CENTS = 90_000  # the seed's rule flags amount_cents above this
LEGIT_MAX_CENTS = SEED_THRESHOLD_CENTS - 1  # everyday spending stays under it; large legit is deliberate
FAR_KM = 1_500.0
ATM_NOTE_CENTS = 2_000  # ATMs dispense $20 notes

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

Pair = tuple[Transaction, Label]

# ISO 18245 merchant category codes: (code, weight among merchants, amount factor, terminal kind).
# The amount factor scales an account's typical amount: fast food is cheap, hotels are not.
CATEGORIES: tuple[tuple[str, int, float, str], ...] = (
    ("5411", 22, 1.0, "pos"),  # grocery stores, supermarkets
    ("5812", 14, 0.9, "pos"),  # eating places, restaurants
    ("5814", 12, 0.35, "pos"),  # fast food
    ("5541", 9, 1.1, "pos"),  # service stations
    ("5912", 6, 0.6, "pos"),  # drug stores, pharmacies
    ("5311", 5, 1.8, "pos"),  # department stores
    ("5691", 5, 1.5, "pos"),  # clothing stores
    ("5732", 3, 3.0, "pos"),  # electronics stores
    ("5944", 1, 3.0, "pos"),  # jewelry stores
    ("5712", 1, 4.0, "pos"),  # furniture stores
    ("4121", 4, 0.6, "pos"),  # taxicabs, rideshare
    ("7011", 2, 4.0, "pos"),  # hotels
    ("6011", 5, 2.0, "atm"),  # automated cash disbursements
    ("5815", 5, 0.3, "web"),  # digital goods
    ("5964", 6, 1.3, "web"),  # direct marketing, online retail
    ("4511", 1, 6.0, "web"),  # airlines
    ("4814", 2, 1.2, "web"),  # telecommunication services
)
BIG_TICKET_CATEGORIES = frozenset({"5311", "5732", "5944", "5712", "7011", "4511"})
TINY_TICKET_CATEGORIES = frozenset({"5815"})  # where stolen cards are tested
RESALE_CATEGORIES = frozenset({"5964"})  # where a tested card is then cashed out


# ---------------------------------------------------------------------------------------------
# Population: built once per (seed, sizes) with faker, then read-only.


@dataclass(frozen=True, slots=True)
class Place:
    city: str
    country: str  # ISO 3166-1 alpha-2
    latitude: float
    longitude: float
    utc_offset_h: int  # solar offset from the longitude: good enough for active hours


@dataclass(frozen=True, slots=True)
class Terminal:
    """Where a payment is captured, with its merchant's static fields denormalised for the hot path."""

    terminal_id: str
    merchant_id: str
    merchant_name: str
    merchant_category: str
    kind: str  # "pos", "atm" or "web"
    place: int  # index into Population.places
    country: str
    city: str
    latitude: float
    longitude: float
    amount_factor: float


@dataclass(frozen=True, slots=True)
class Account:
    account_id: str
    holder: str
    home: int  # index into Population.places
    cards: tuple[str, ...]
    devices: tuple[str, ...]
    typical_amount_cents: int
    active_from_h: int  # local hours [from, to); `to` may pass midnight (up to 39)
    active_to_h: int
    activity: int  # relative transaction frequency, 1..3
    favourite_terminals: tuple[int, ...]  # indices into Population.terminals


@dataclass(frozen=True, slots=True)
class Population:
    places: tuple[Place, ...]
    home_places: tuple[int, ...]
    terminals: tuple[Terminal, ...]
    accounts: tuple[Account, ...]
    # Indexes for the hot path (indices into the tuples above).
    active_by_utc_hour: tuple[tuple[int, ...], ...]  # 24 account lists, weighted by activity
    in_person_terminals_at: tuple[tuple[int, ...], ...]  # per place: pos and atm terminals
    pos_terminals_at: tuple[tuple[int, ...], ...]  # per place: pos terminals only
    big_ticket_terminals_at: tuple[tuple[int, ...], ...]  # per place: where a genuine $900+ purchase happens
    far_places: tuple[tuple[int, ...], ...]  # per place: places with terminals more than FAR_KM away
    places_with_terminals: tuple[int, ...]
    tiny_ticket_terminals: tuple[int, ...]
    resale_terminals: tuple[int, ...]


@cache
def build_population(
    seed: int,
    *,
    accounts: int = 5_000,
    home_places: int = 40,
    foreign_places: int = 60,
    merchants_per_home_place: int = 25,
    merchants_per_foreign_place: int = 4,
    online_merchants: int = 60,
) -> Population:
    """Accounts, merchants and terminals in real cities (faker's geo data), the same for the same arguments."""
    from faker import Faker  # only here: the hot path never touches faker

    if accounts < 1 or home_places < 1 or merchants_per_home_place < 1:
        raise ConfigError("the population needs at least one account, one home city and one merchant per city")
    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(f"fraudstream-population:{seed}")

    places: list[Place] = []
    seen: set[str] = set()

    def add_places(draw: Callable[[], tuple[str, ...]], wanted: int) -> list[int]:
        added: list[int] = []
        for _ in range(wanted * 50):  # faker draws with replacement; give up on exhausting its list
            if len(added) == wanted:
                break
            lat, lon, city, country, _tz = draw()
            if (key := f"{city}/{country}") in seen:
                continue
            seen.add(key)
            added.append(len(places))
            places.append(Place(city, country, float(lat), float(lon), round(float(lon) / 15)))
        return added

    homes = add_places(_home_draw(fake), home_places)
    abroad = add_places(_foreign_draw(fake), foreign_places)

    terminals: list[Terminal] = []
    in_person = [pos for pos, (_, _, _, kind) in enumerate(CATEGORIES) if kind != "web"]
    web = [pos for pos, (_, _, _, kind) in enumerate(CATEGORIES) if kind == "web"]
    merchant_count = count()

    def add_merchant(place_index: int, category_choices: list[int]) -> None:
        code, _, factor, kind = CATEGORIES[
            rng.choices(category_choices, weights=[CATEGORIES[c][1] for c in category_choices])[0]
        ]
        merchant_id = f"merch-{next(merchant_count):05d}"
        name = fake.company()
        place = places[place_index]
        for _ in range(1 if kind != "pos" else rng.randint(1, 3)):
            # Terminals sit within ~10 km of the city centre; a web gateway at the merchant's address.
            jitter = 0.0 if kind == "web" else 0.09
            terminals.append(
                Terminal(
                    terminal_id=f"term-{len(terminals):06d}",
                    merchant_id=merchant_id,
                    merchant_name=name,
                    merchant_category=code,
                    kind=kind,
                    place=place_index,
                    country=place.country,
                    city=place.city,
                    latitude=round(place.latitude + rng.uniform(-jitter, jitter), 5),
                    longitude=round(place.longitude + rng.uniform(-jitter, jitter), 5),
                    amount_factor=factor,
                )
            )

    for place_index in homes:
        for _ in range(merchants_per_home_place):
            add_merchant(place_index, in_person)
    for place_index in abroad:
        for _ in range(merchants_per_foreign_place):
            add_merchant(place_index, in_person)
    for _ in range(online_merchants):
        add_merchant(rng.choice(homes), web)
    # Every card-testing and resale path needs at least one such merchant.
    for needed in (TINY_TICKET_CATEGORIES, RESALE_CATEGORIES):
        if not any(t.merchant_category in needed for t in terminals):
            add_merchant(homes[0], [c for c in web if CATEGORIES[c][0] in needed])

    def per_place(keep: Callable[[Terminal], bool]) -> tuple[tuple[int, ...], ...]:
        lists: list[list[int]] = [[] for _ in places]
        for index, terminal in enumerate(terminals):
            if keep(terminal):
                lists[terminal.place].append(index)
        return tuple(tuple(found) for found in lists)

    in_person_at = per_place(lambda t: t.kind != "web")
    pos_at = per_place(lambda t: t.kind == "pos")
    big_ticket_at = per_place(lambda t: t.merchant_category in BIG_TICKET_CATEGORIES)
    airline_terminals = tuple(i for i, t in enumerate(terminals) if t.merchant_category == "4511")
    big_ticket_at = tuple(found or airline_terminals or pos_at[p] for p, found in enumerate(big_ticket_at))
    web_terminals = [i for i, t in enumerate(terminals) if t.kind == "web"]
    with_terminals = tuple(p for p in range(len(places)) if in_person_at[p])
    far = tuple(
        tuple(q for q in with_terminals if distance_km(places[p], places[q]) > FAR_KM) for p in range(len(places))
    )

    first_names = [fake.first_name() for _ in range(200)]
    last_names = [fake.last_name() for _ in range(200)]
    home_weights = [rng.uniform(1, 10) for _ in homes]  # some cities are bigger than others
    people: list[Account] = []
    for index in range(accounts):
        home = rng.choices(homes, weights=home_weights)[0]
        if rng.random() < 0.1:  # night shifts and insomniacs: someone is awake at every hour
            active_from, active_hours = rng.randint(0, 23), rng.randint(10, 16)
        else:
            active_from, active_hours = rng.randint(6, 10), rng.randint(12, 16)
        local = list(in_person_at[home])
        favourites = rng.sample(local, min(len(local), rng.randint(6, 15)))
        if web_terminals:
            favourites += rng.sample(web_terminals, min(len(web_terminals), rng.randint(1, 4)))
        people.append(
            Account(
                account_id=f"acct-{index:06d}",
                holder=f"{rng.choice(first_names)} {rng.choice(last_names)}",
                home=home,
                cards=tuple(f"card-{rng.getrandbits(48):012x}" for _ in range(rng.randint(1, 2))),
                devices=tuple(f"dev-{rng.getrandbits(48):012x}" for _ in range(rng.randint(1, 2))),
                # Median $35, most between $10 and $120: a portfolio of light and heavy spenders.
                typical_amount_cents=max(300, int(math.exp(rng.gauss(math.log(3_500), 0.6)))),
                active_from_h=active_from,
                active_to_h=active_from + active_hours,
                activity=rng.choice((1, 1, 2, 3)),
                favourite_terminals=tuple(favourites),
            )
        )

    active_by_hour = []
    everyone = tuple(range(len(people)))
    for utc_hour in range(24):
        bucket: list[int] = []
        for index, person in enumerate(people):
            local_hour = (utc_hour + places[person.home].utc_offset_h) % 24
            if person.active_from_h <= local_hour < person.active_to_h or local_hour < person.active_to_h - 24:
                bucket.extend([index] * person.activity)
        active_by_hour.append(tuple(bucket) or everyone)

    return Population(
        places=tuple(places),
        home_places=tuple(homes),
        terminals=tuple(terminals),
        accounts=tuple(people),
        active_by_utc_hour=tuple(active_by_hour),
        in_person_terminals_at=in_person_at,
        pos_terminals_at=pos_at,
        big_ticket_terminals_at=big_ticket_at,
        far_places=far,
        places_with_terminals=with_terminals,
        tiny_ticket_terminals=tuple(
            i for i in web_terminals if terminals[i].merchant_category in TINY_TICKET_CATEGORIES
        ),
        resale_terminals=tuple(i for i in web_terminals if terminals[i].merchant_category in RESALE_CATEGORIES),
    )


def _home_draw(fake: Faker) -> Callable[[], tuple[str, ...]]:
    """Faker's places in the US."""

    def draw() -> tuple[str, ...]:
        found = fake.local_latlng(country_code="US", coords_only=False)
        if found is None:  # faker answers None for a country its geo data has no place in
            raise ConfigError("faker's geo data has no place in the US: the population needs home cities there")
        return found

    return draw


def _foreign_draw(fake: Faker) -> Callable[[], tuple[str, ...]]:
    """Faker's places outside the US (its location_on_land has no country filter)."""

    def draw() -> tuple[str, ...]:
        while True:
            found = fake.location_on_land()
            if found[3] != "US":
                return found

    return draw


def distance_km(a: Place, b: Place) -> float:
    """Great-circle (haversine) distance between two places."""
    lat1, lon1, lat2, lon2 = map(math.radians, (a.latitude, a.longitude, b.latitude, b.longitude))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6_371.0 * math.asin(math.sqrt(h))


# ---------------------------------------------------------------------------------------------
# Scenario shape: how many transactions an episode has, to turn shares into start probabilities.


@dataclass(frozen=True, slots=True)
class EpisodeShape:
    mean_length: float  # transactions per episode, all labels
    mean_counted: float  # of which carry the scenario's label (the rest are legit)


CARD_TESTS = (3, 10)  # tiny tests, then one large payment
FAR_FRAUDS = (1, 4)  # payments abroad, after one genuine purchase at home
TERMINAL_FRAUDS = (4, 12)  # cards taken by one terminal


def _mean(bounds: tuple[int, int]) -> float:
    return sum(bounds) / 2


EPISODE_SHAPES: dict[str, EpisodeShape] = {
    LARGE_AMOUNT: EpisodeShape(1.0, 1.0),
    CARD_TESTING: EpisodeShape(_mean(CARD_TESTS) + 1, _mean(CARD_TESTS) + 1),
    FAR_FROM_HOME: EpisodeShape(_mean(FAR_FRAUDS) + 1, _mean(FAR_FRAUDS)),
    COMPROMISED_TERMINAL: EpisodeShape(_mean(TERMINAL_FRAUDS), _mean(TERMINAL_FRAUDS)),
}


def start_probabilities(shares: Mapping[str, float], large_legit_share: float) -> dict[str, float]:
    """Probability of starting each episode on a free slot, so that each scenario makes its share of all
    transactions in the long run. Follow-up steps take slots of their own: with f the fraction of free
    slots, f = 1 - sum(share * (length - 1) / counted) and p = share / (counted * f)."""
    follow_ups = sum(
        share * (EPISODE_SHAPES[name].mean_length - 1) / EPISODE_SHAPES[name].mean_counted
        for name, share in shares.items()
    )
    free = 1.0 - follow_ups
    probabilities = {name: share / (EPISODE_SHAPES[name].mean_counted * free) for name, share in shares.items()}
    probabilities[LARGE_LEGIT] = large_legit_share / free
    if free <= 0.5 or sum(probabilities.values()) + TRAVEL_SHARE > 0.9:
        raise ConfigError("fraud and large-legit shares are too large: at most about half of traffic can be fraud")
    return probabilities


def resolve_shares(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """DEFAULT_SHARES with overrides applied and checked."""
    shares = dict(DEFAULT_SHARES)
    for name, share in (overrides or {}).items():
        if name not in DEFAULT_SHARES:
            raise ConfigError(f"unknown fraud scenario {name!r}; known: {', '.join(FRAUD_SCENARIOS)}")
        if not 0.0 <= share < 1.0 or math.isnan(share):
            raise ConfigError(f"share of {name} must be a fraction in [0, 1), not {share}")
        shares[name] = float(share)
    return shares


def event_time(now_ms: int) -> datetime:
    """Exact UTC datetime for epoch milliseconds (no float rounding)."""
    return _EPOCH + timedelta(milliseconds=now_ms)


def uuid4_text(bits: int) -> str:
    """The text of uuid.UUID(int=bits, version=4) (version and variant bits forced), without the object."""
    return "%08x-%04x-4%03x-%04x-%012x" % (
        bits >> 96,
        (bits >> 80) & 0xFFFF,
        (bits >> 64) & 0xFFF,
        0x8000 | (bits >> 48) & 0x3FFF,
        bits & 0xFFFF_FFFF_FFFF,
    )


# Spread of one account's everyday amounts around its typical amount: lognormal(0, 0.55) as a table
# of quantiles, so the hot path draws one random() instead of a gauss() and an exp().
AMOUNT_SPREAD: tuple[float, ...] = tuple(math.exp(NormalDist(0.0, 0.55).inv_cdf((i + 0.5) / 1024)) for i in range(1024))


# ---------------------------------------------------------------------------------------------
# The generator.

# A scheduled step of an episode: (due_ms, tie-breaker, build(event_time) -> pair)
_Step = tuple[int, int, Callable[[datetime], Pair]]


class Generator:
    """Labelled transactions over a fixed population; deterministic for a seed and a clock.

    `next_batch(n, now_ms)` stamps all n with the caller's clock (the produce loop's wall clock);
    `stream(start_ms, tx_per_second)` runs on a simulated clock. Episode steps fall due in event time
    and take the next free slots, so a card-testing burst lasts seconds whatever the rate.
    """

    def __init__(
        self,
        seed: int = 42,
        *,
        shares: Mapping[str, float] | None = None,
        large_legit_share: float = DEFAULT_LARGE_LEGIT_SHARE,
        population: Population | None = None,
    ) -> None:
        if not 0.0 <= large_legit_share < 1.0:
            raise ConfigError(f"large legit share must be a fraction in [0, 1), not {large_legit_share}")
        self.seed = seed
        self.shares = resolve_shares(shares)
        self.large_legit_share = large_legit_share
        self.population = population or build_population(seed)
        rng = random.Random(f"fraudstream-traffic:{seed}")
        self._rng = rng
        # Bound methods looked up once: the everyday path runs ~97% of the time.
        self._random = rng.random
        self._getrandbits = rng.getrandbits
        self._pending: list[_Step] = []
        self._tie = count()
        self._last_ms: int | None = None
        self._last_time = _EPOCH
        probabilities = start_probabilities(self.shares, large_legit_share)
        starts = {
            LARGE_AMOUNT: self._large_amount,
            CARD_TESTING: self._card_testing,
            FAR_FROM_HOME: self._far_from_home,
            COMPROMISED_TERMINAL: self._compromised_terminal,
            LARGE_LEGIT: self._large_legit,
            TRAVEL: self._travel,
        }
        probabilities[TRAVEL] = TRAVEL_SHARE
        # Cumulative thresholds for one random() draw per free slot; above them all: everyday traffic.
        self._starts: list[tuple[float, Callable[[int, datetime], Pair]]] = []
        total = 0.0
        for name, probability in probabilities.items():
            if probability > 0:
                total += probability
                self._starts.append((total, starts[name]))
        self._everyday_from = total
        self._arrays: PopulationArrays | None = None  # the population as arrays, for next_columns
        self._numpy: np.random.Generator | None = None

    @property
    def pending(self) -> int:
        """Episode steps scheduled but not yet due."""
        return len(self._pending)

    def next_batch(self, n: int, now_ms: int) -> list[Pair]:
        """n labelled transactions, all at event time now_ms (epoch milliseconds, non-decreasing): the
        records of next_columns(n, now_ms), as objects."""
        return self.next_columns(n, now_ms).pairs()

    def next_columns(self, n: int, now_ms: int) -> GeneratedBatch:
        """n labelled transactions at event time now_ms, the everyday ones drawn as arrays (see
        producer/columns.py): what the produce loop encodes in one call. The slots are filled as
        `stream` fills them: episode steps that fell due first, then one draw per slot that starts an
        episode (its first transaction in that slot) or makes an everyday purchase."""
        from fraudstream.producer.columns import PopulationArrays, draw_everyday

        if self._arrays is None:
            self._arrays = PopulationArrays(self.population)
            self._numpy = np.random.default_rng([self.seed, 1])  # its own stream: the episodes keep self._rng
        assert self._numpy is not None  # made with the arrays
        when = self._time(now_ms)
        pending = self._pending
        own: list[Pair] = []
        while pending and pending[0][0] <= now_ms and len(own) < n:
            own.append(heapq.heappop(pending)[2](when))
        free = n - len(own)
        draws = self._numpy.random(free)
        starts = np.flatnonzero(draws < self._everyday_from)
        for draw in draws[starts].tolist():
            start = next(start for below, start in self._starts if draw < below)
            own.append(start(now_ms, when))
        # Slot order: the due steps, then the drawn slots; episode starts sit among the everyday ones.
        own_slots = list(range(n - free)) + (starts + (n - free)).tolist()
        everyday = draw_everyday(self._arrays, self._numpy, free - len(starts), now_ms)
        return GeneratedBatch(now_ms, when, n, own_slots, own, everyday)

    def stream(self, start_ms: int, tx_per_second: float) -> Iterator[Pair]:
        """Endless labelled transactions on a simulated clock: tx_per_second of event time each second."""
        if tx_per_second <= 0:
            raise ConfigError("the simulated rate must be positive")
        step_ms = 1_000.0 / tx_per_second
        one, time_of = self._one, self._time
        for slot in count():
            now_ms = start_ms + int(slot * step_ms)
            yield one(now_ms, time_of(now_ms))

    # -- one slot ---------------------------------------------------------------------------

    def _time(self, now_ms: int) -> datetime:
        if now_ms != self._last_ms:
            self._last_ms, self._last_time = now_ms, event_time(now_ms)
        return self._last_time

    def _one(self, now_ms: int, when: datetime) -> Pair:
        pending = self._pending
        if pending and pending[0][0] <= now_ms:
            return heapq.heappop(pending)[2](when)
        draw = self._random()
        if draw >= self._everyday_from:
            return self._everyday(now_ms, when)
        for below, start in self._starts:
            if draw < below:
                return start(now_ms, when)
        return self._everyday(now_ms, when)  # not reached: the last threshold is _everyday_from

    def _schedule(self, due_ms: int, build: Callable[[datetime], Pair]) -> None:
        heapq.heappush(self._pending, (due_ms, next(self._tie), build))

    # -- building blocks ----------------------------------------------------------------------

    def _active_account(self, now_ms: int) -> Account:
        population = self.population
        bucket = population.active_by_utc_hour[(now_ms // HOUR_MS) % 24]
        return population.accounts[bucket[int(self._random() * len(bucket))]]

    def _pick(self, indices: tuple[int, ...]) -> int:
        return indices[int(self._random() * len(indices))]

    def _card(self, account: Account) -> str:
        cards = account.cards
        return cards[int(self._random() * len(cards))]

    def _typical_amount(self, account: Account, terminal: Terminal) -> int:
        random = self._random
        amount = int(account.typical_amount_cents * terminal.amount_factor * AMOUNT_SPREAD[int(random() * 1024)])
        if amount > LEGIT_MAX_CENTS:  # rare: keep everyday spending under the seed's threshold
            amount = LEGIT_MAX_CENTS // 2 + int(random() * (LEGIT_MAX_CENTS // 2))
        if terminal.kind == "atm":  # ATMs dispense $20 notes
            return max(ATM_NOTE_CENTS, amount // ATM_NOTE_CENTS * ATM_NOTE_CENTS)
        return max(50, amount)

    def _transaction(
        self,
        when: datetime,
        account: Account,
        card_id: str,
        terminal: Terminal,
        amount_cents: int,
        *,
        device_id: str | None = None,
        channel: str | None = None,
    ) -> Transaction:
        random = self._random
        kind = terminal.kind
        if channel is None:
            if kind == "pos":
                channel = "CONTACTLESS" if random() < 0.55 else "CARD_PRESENT"
            else:
                channel = "ATM" if kind == "atm" else "ONLINE"
        if kind == "web" and device_id is None:
            devices = account.devices
            device_id = devices[int(random() * len(devices))]
        return Transaction(
            transaction_id=uuid4_text(self._getrandbits(128)),
            account_id=account.account_id,
            card_id=card_id,
            merchant_id=terminal.merchant_id,
            merchant_category=terminal.merchant_category,
            terminal_id=terminal.terminal_id,
            amount_cents=amount_cents,
            event_time=when,
            channel=channel,
            country=terminal.country,
            city=terminal.city,
            latitude=terminal.latitude,
            longitude=terminal.longitude,
            device_id=device_id,
        )

    @staticmethod
    def _labelled(tx: Transaction, scenario: str) -> Pair:
        return tx, Label(
            transaction_id=tx.transaction_id,
            is_fraud=scenario != LEGIT,
            scenario=scenario,
            terminal_id=tx.terminal_id,
            event_time=tx.event_time,
        )

    # -- legit traffic ------------------------------------------------------------------------

    def _everyday(self, now_ms: int, when: datetime) -> Pair:
        """An active account buys something in its home town or online, near its typical amount."""
        population = self.population
        account = self._active_account(now_ms)
        if self._random() < 0.9:
            terminal = population.terminals[self._pick(account.favourite_terminals)]
        else:  # somewhere new in town
            terminal = population.terminals[self._pick(population.in_person_terminals_at[account.home])]
        tx = self._transaction(when, account, self._card(account), terminal, self._typical_amount(account, terminal))
        return tx, Label(
            transaction_id=tx.transaction_id,
            is_fraud=False,
            scenario=LEGIT,
            terminal_id=tx.terminal_id,
            event_time=tx.event_time,
        )

    def _travel(self, now_ms: int, when: datetime) -> Pair:
        """The account's owner away from home: legit, and a false positive for naive location rules."""
        population = self.population
        account = self._active_account(now_ms)
        place = self._pick(population.places_with_terminals)
        terminal = population.terminals[self._pick(population.in_person_terminals_at[place])]
        tx = self._transaction(when, account, self._card(account), terminal, self._typical_amount(account, terminal))
        return self._labelled(tx, LEGIT)

    def _large_legit(self, now_ms: int, when: datetime) -> Pair:
        """A genuine purchase above $900 (a sofa, a flight): what the threshold rule gets wrong."""
        population = self.population
        account = self._active_account(now_ms)
        terminal = population.terminals[self._pick(population.big_ticket_terminals_at[account.home])]
        amount = min(SEED_THRESHOLD_CENTS + 1 + int(self._rng.expovariate(1 / 40_000)), 600_000)
        return self._labelled(self._transaction(when, account, self._card(account), terminal, amount), LEGIT)

    # -- fraud scenarios ----------------------------------------------------------------------

    def _large_amount(self, now_ms: int, when: datetime) -> Pair:
        """The seed's fraud: one transaction above $900, otherwise an ordinary purchase of the account."""
        population = self.population
        account = self._active_account(now_ms)
        terminal = population.terminals[self._pick(account.favourite_terminals)]
        amount = min(SEED_THRESHOLD_CENTS + 1 + int(self._rng.expovariate(1 / 60_000)), 1_000_000)
        return self._labelled(self._transaction(when, account, self._card(account), terminal, amount), LARGE_AMOUNT)

    def _card_testing(self, now_ms: int, when: datetime) -> Pair:
        """Tiny online payments seconds apart from one fraudster device, then a large one under $900."""
        population = self.population
        rng = self._rng
        account = self._active_account(now_ms)
        card_id = self._card(account)
        device_id = f"dev-{rng.getrandbits(48):012x}"
        tester = population.terminals[self._pick(population.tiny_ticket_terminals)]

        def test(at: datetime) -> Pair:
            tx = self._transaction(at, account, card_id, tester, rng.randint(50, 299), device_id=device_id)
            return self._labelled(tx, CARD_TESTING)

        def cash_out(at: datetime) -> Pair:
            resale = population.terminals[self._pick(population.resale_terminals)]
            tx = self._transaction(
                at, account, card_id, resale, rng.randint(30_000, LEGIT_MAX_CENTS), device_id=device_id
            )
            return self._labelled(tx, CARD_TESTING)

        due = now_ms
        for _ in range(rng.randint(*CARD_TESTS) - 1):
            due += rng.randint(1 * SECOND_MS, 10 * SECOND_MS)
            self._schedule(due, test)
        self._schedule(due + rng.randint(5 * SECOND_MS, 60 * SECOND_MS), cash_out)
        return test(when)

    def _far_from_home(self, now_ms: int, when: datetime) -> Pair:
        """A genuine purchase at home, then the cloned card in a far city within minutes (impossible travel)."""
        population = self.population
        rng = self._rng
        account = self._active_account(now_ms)
        card_id = self._card(account)
        place = self._pick(population.far_places[account.home] or population.places_with_terminals)
        in_person = population.in_person_terminals_at[place]

        def far_away(at: datetime) -> Pair:
            terminal = population.terminals[self._pick(in_person)]
            amount = min(int(account.typical_amount_cents * rng.uniform(2.0, 6.0)), LEGIT_MAX_CENTS)
            if terminal.kind == "atm":
                amount = max(ATM_NOTE_CENTS, amount // ATM_NOTE_CENTS * ATM_NOTE_CENTS)
            channel = None if terminal.kind == "atm" else "CARD_PRESENT"  # a cloned magstripe cannot tap
            return self._labelled(
                self._transaction(at, account, card_id, terminal, amount, channel=channel), FAR_FROM_HOME
            )

        due = now_ms + rng.randint(30 * SECOND_MS, 3 * MINUTE_MS)
        for _ in range(rng.randint(*FAR_FRAUDS)):
            self._schedule(due, far_away)
            due += rng.randint(10 * SECOND_MS, 60 * SECOND_MS)
        # The genuine card-present purchase at home that the cloned card's use abroad contradicts.
        home = population.terminals[self._pick(population.in_person_terminals_at[account.home])]
        tx = self._transaction(when, account, card_id, home, self._typical_amount(account, home))
        return self._labelled(tx, LEGIT)

    def _compromised_terminal(self, now_ms: int, when: datetime) -> Pair:
        """One tampered card-present terminal takes many different cards within minutes."""
        population = self.population
        rng = self._rng
        place = self._pick(population.home_places)
        terminal = population.terminals[
            self._pick(population.pos_terminals_at[place] or population.in_person_terminals_at[place])
        ]

        def victim(at: datetime) -> Pair:
            account = population.accounts[int(self._random() * len(population.accounts))]
            amount = min(int(self._typical_amount(account, terminal) * rng.uniform(1.0, 3.0)), LEGIT_MAX_CENTS)
            return self._labelled(
                self._transaction(at, account, self._card(account), terminal, amount), COMPROMISED_TERMINAL
            )

        due = now_ms
        for _ in range(rng.randint(*TERMINAL_FRAUDS) - 1):
            due += rng.randint(5 * SECOND_MS, 60 * SECOND_MS)
            self._schedule(due, victim)
        return victim(when)


@dataclass(frozen=True, slots=True)
class GeneratedBatch:
    """A batch from Generator.next_columns: the everyday purchases as arrays, the rest (episode steps) as
    pairs, each at its slot. `transactions()` and `labels()` give Arrow record batches in slot order
    (for an encoder of whole batches), `pairs()` the same records as objects."""

    now_ms: int
    when: datetime
    size: int
    own_slots: list[int]  # slot of each of `own`, ascending
    own: list[Pair]
    everyday: Everyday

    def _order(self) -> np.ndarray | None:
        """Row of the concatenation (everyday rows, then own rows) that goes in each slot; None: already in order."""
        if not self.own:
            return None
        is_own = np.zeros(self.size, bool)
        is_own[self.own_slots] = True
        order = np.empty(self.size, np.int64)
        order[~is_own] = np.arange(self.size - len(self.own))
        order[is_own] = np.arange(self.size - len(self.own), self.size)
        return order

    def transactions(self, schema: pa.Schema) -> pa.RecordBatch:
        columns = self.everyday.columns(self.now_ms)
        batch = pa.RecordBatch.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)
        return self._in_order(batch, [tx.to_dict() for tx, _ in self.own], schema)

    def labels(self, schema: pa.Schema) -> pa.RecordBatch:
        n = len(self.everyday)
        columns = self.everyday.columns(self.now_ms)  # the label names its transaction's terminal and time
        values = {
            "transaction_id": self.everyday.transaction_ids,
            "is_fraud": pa.repeat(pa.scalar(False), n),
            "scenario": pa.repeat(pa.scalar(LEGIT), n),
            "terminal_id": columns["terminal_id"],
            "event_time": columns["event_time"],
            "source": pa.repeat(pa.scalar("generator"), n),
            "labelled_by": pa.nulls(n, pa.string()),
            "labelled_at": pa.nulls(n, pa.timestamp("ms", "UTC")),
        }
        batch = pa.RecordBatch.from_arrays([values[f.name].cast(f.type) for f in schema], schema=schema)
        return self._in_order(batch, [label.to_dict() for _, label in self.own], schema)

    def _in_order(self, batch: pa.RecordBatch, own_rows: list[dict], schema: pa.Schema) -> pa.RecordBatch:
        order = self._order()
        if order is None:
            return batch
        own = pa.RecordBatch.from_pylist(own_rows, schema=schema)
        return pa.Table.from_batches([batch, own]).combine_chunks().to_batches()[0].take(pa.array(order))

    def pairs(self) -> list[Pair]:
        everyday, when = self.everyday, self.when
        rows = everyday.columns(self.now_ms)
        names = [name for name in rows if name != "event_time"]
        values = [rows[name].to_pylist() for name in names]
        made = []
        for fields in zip(*values, strict=True):
            record = dict(zip(names, fields, strict=True))
            tx = Transaction(event_time=when, **record)
            made.append(
                (
                    tx,
                    Label(
                        transaction_id=tx.transaction_id,
                        is_fraud=False,
                        scenario=LEGIT,
                        terminal_id=tx.terminal_id,
                        event_time=tx.event_time,
                    ),
                )
            )
        order = self._order()
        if order is None:
            return made
        combined = made + self.own
        return [combined[row] for row in order.tolist()]
