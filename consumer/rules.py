"""Fraud rules: pure functions over transactions and their features, all in this module.

Two layers:

- `RuleSet` (the detector's rules): each rule is a named, vectorized predicate over a batch's
  columns (TxColumns) and its per-card and per-terminal features (fraudstream.consumer.features), with
  thresholds from a TOML rules file (`load_rules`; defaults in DEFAULT_RULES, documented in
  rules/default.toml). `evaluate` returns one boolean row per rule; a transaction is fraud when
  any rule fires, and its FraudAlert names them. The features carry the state; the rules keep
  none, so changing a threshold never invalidates stored state.
- `Rule` (stateless, per transaction): the seed's large_amount rule as a predicate over one
  Transaction and over Arrow columns, used by the stateless decide stage
  (tests/unit/test_decide.py checks that the two agree).
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fraudstream.consumer.features import CHANNEL_CODE, CHANNELS, PROFILE_TTL_MS
from fraudstream.errors import ConfigError
from fraudstream.records import Transaction
from fraudstream.resources import resource_dir
from fraudstream.settings import Settings

DEFAULT_RULES_FILE = resource_dir("rules") / "default.toml"
LARGE_AMOUNT = "large_amount"
CARD_TESTING = "card_testing"
IMPOSSIBLE_TRAVEL = "impossible_travel"
FAR_FROM_HOME = "far_from_home"
COMPROMISED_TERMINAL = "compromised_terminal"
VELOCITY = "velocity"
# Not a predicate: the analyst console's score bands (decline at or above `decline`, review from `review`,
# approve below), carried on the rules topic so they change at runtime, attributed, like any rule. It never
# fires and never holds: the detector accepts it, versions it and decides as if it were absent.
SCORE_BANDS = "score_bands"
RULE_NAMES: tuple[str, ...] = (
    LARGE_AMOUNT,
    CARD_TESTING,
    IMPOSSIBLE_TRAVEL,
    FAR_FROM_HOME,
    COMPROMISED_TERMINAL,
    VELOCITY,
    SCORE_BANDS,
)

# Big-ticket merchant categories (ISO 18245): where a genuine purchase above the threshold is common.
BIG_TICKET_CATEGORIES = ("5311", "5712", "5732", "5944", "7011", "4511")

# In-person channels a cloned card (a magstripe copy) can use: a contactless payment needs the real
# chip or phone, so the location rules leave it out.
CLONABLE_CHANNELS = ("CARD_PRESENT", "ATM")

# The documented defaults; rules/default.toml repeats them with their reasons (a test keeps the two equal).
# large_amount.threshold_cents is absent here: it defaults to Settings.fraud_threshold_cents.
DEFAULT_RULES: dict[str, dict[str, Any]] = {
    LARGE_AMOUNT: {
        "enabled": True,
        "exempt_categories": list(BIG_TICKET_CATEGORIES),
        "exempt_below_cents": 140_000,
        "exempt_unless_known_terminal": True,
    },
    CARD_TESTING: {
        "enabled": True,
        "test_max_cents": 250,
        "test_categories": ["5815"],
        "first_test": True,
        "min_session_small": 1,
    },
    IMPOSSIBLE_TRAVEL: {
        "enabled": True,
        "max_speed_kmh": 20_000.0,
        "min_jump_km": 300.0,
        "away_km": 300.0,
        "channels": list(CLONABLE_CHANNELS),
    },
    FAR_FROM_HOME: {
        "enabled": True,
        "max_speed_kmh": 20_000.0,
        "away_km": 300.0,
        "window_s": 3_600.0,
        "channels": list(CLONABLE_CHANNELS),
    },
    COMPROMISED_TERMINAL: {
        "enabled": True,
        "min_other_cards": 2,
        "min_home_km": 100.0,
        "min_other_cards_anywhere": 3,
        "look_ahead_s": 120.0,
        "hold_near_home_from": 2,
    },
    VELOCITY: {"enabled": False, "max_in_session": 3},
    SCORE_BANDS: {"enabled": True, "review": 0.5, "decline": 0.9},
}


@dataclass(frozen=True)
class Bound:
    """What a parameter may be: its type, and for numbers the closed range [minimum, maximum] (finite
    always); for lists, at most `maximum` entries. `why` says where the maximum comes from."""

    type: type
    minimum: float | None = None
    maximum: float | None = None
    why: str = ""


# Amounts (integer cents), counts, distances (km), speeds (km/h) and durations (s). Past each maximum a
# rule fires on everything or on nothing, or a computation leaves its type (look_ahead_s in ms must fit an
# int64 next to event times): a rule record beyond one is refused, in the rules file, `fraudstream rules
# set` and on the rules topic alike (docs/how-to/rules.md).
_CENTS = Bound(int, 0, 10**12, "$10 billion: past any payment")
_COUNT = Bound(int, 1, 10_000, "payments or cards of one card or terminal: past what a window holds")
_KM = Bound(float, 0.0, 20_040.0, "half the Earth's circumference: no two places are farther apart")
_KMH = Bound(float, 0.0, 1_000_000.0, "1,000,000 km/h: far past any aircraft")
PARAMETER_BOUNDS: dict[str, Bound] = {
    "enabled": Bound(bool),
    "exempt_unless_known_terminal": Bound(bool),
    "first_test": Bound(bool),
    "threshold_cents": _CENTS,
    "exempt_below_cents": _CENTS,
    "test_max_cents": _CENTS,
    "exempt_categories": Bound(list, maximum=10_000, why="every merchant category code"),
    "test_categories": Bound(list, maximum=10_000, why="every merchant category code"),
    "channels": Bound(list, maximum=len(CHANNELS), why="every channel"),
    "min_session_small": _COUNT,
    "min_other_cards": _COUNT,
    "min_other_cards_anywhere": _COUNT,
    "max_in_session": _COUNT,
    "hold_near_home_from": _COUNT,
    "max_speed_kmh": _KMH,
    "min_jump_km": _KM,
    "away_km": _KM,
    "min_home_km": _KM,
    "window_s": Bound(float, 0.0, PROFILE_TTL_MS / 1000, "30 days: what a card profile keeps (PROFILE_TTL_MS)"),
    "look_ahead_s": Bound(float, 0.0, 3_600.0, "an hour: held payments wait this much event time for their output"),
    "review": Bound(float, 0.0, 1.0, "a score is a probability"),
    "decline": Bound(float, 0.0, 1.0, "a score is a probability"),
}


ONLINE_CODE = CHANNEL_CODE["ONLINE"]


def _in_channels(channel: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """channel (int8 codes) in the named channels: a table lookup (np.isin sorts, per call)."""
    lut = np.zeros(len(CHANNELS), dtype=bool)
    lut[[CHANNEL_CODE[name] for name in names]] = True
    return lut[channel]


def _in_categories(mcc: np.ndarray, codes: Sequence[str]) -> np.ndarray:
    """mcc (int16, -1 for none) in the four-digit codes: a table lookup."""
    lut = np.zeros(10_001, dtype=bool)
    lut[[int(code) + 1 for code in codes]] = True
    return lut[mcc.astype(np.int64) + 1]


_IN_PERSON = ("CARD_PRESENT", "CONTACTLESS", "ATM")


@dataclass(frozen=True)
class _Held:
    """The one column of a transaction the terminal rule reads, for held records (stored without the rest)."""

    channel: np.ndarray


@dataclass(frozen=True)
class RuleSet:
    """Named rules with their thresholds; `version` identifies the rules file's content."""

    names: tuple[str, ...]
    thresholds: Mapping[str, Mapping[str, Any]]
    version: str

    def evaluate(self, tx: Any, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """bool (len(names), n): which rule fires for which transaction. `tx` is a TxColumns; features
        are card_features' output, plus terminal_features' when the terminal rule is in the set."""
        n = len(tx.amount_cents)
        fired = np.zeros((len(self.names), n), dtype=bool)
        for row, name in enumerate(self.names):
            fired[row] = _PREDICATES[name](self.thresholds[name], tx, features)
        return fired

    def fired_names(self, fired: np.ndarray) -> list[list[str]]:
        """Per transaction, the names of the rules that fired (the FraudAlert's `rules`)."""
        names = self.names
        return [[names[r] for r in np.flatnonzero(column)] for column in fired.T]

    @property
    def look_ahead_ms(self) -> int:
        """How far past a held record's event time the terminal rule looks (0: no record is held)."""
        t = self.thresholds.get(COMPROMISED_TERMINAL)
        return int(t["look_ahead_s"] * 1000) if t else 0

    def to_hold(self, tx: Any, features: Mapping[str, np.ndarray], is_fraud: np.ndarray) -> np.ndarray:
        """Which records to hold for the terminal rule's look-ahead: decided legit, in person, and on a card far
        from its home or with no home known yet (its first in-person payment), or at a terminal that already
        took `hold_near_home_from` other cards. Only the next cards at its terminal can still show such a
        payment to be fraud (the first victim of a tampered terminal looks like any traveller's payment, or
        like a local's); a payment at home at a terminal that took no other card would need
        min_other_cards_anywhere of them within the look-ahead, rare enough not to hold every payment for."""
        if not self.look_ahead_ms:
            return np.zeros(len(is_fraud), dtype=bool)
        t = self.thresholds[COMPROMISED_TERMINAL]
        return (
            ~is_fraud
            & _in_channels(tx.channel, _IN_PERSON)
            & (
                (features["dist_home_km"] >= t["min_home_km"])
                | ~features["home_known"]
                | (features["terminal_cards"] >= t["hold_near_home_from"])
            )
        )

    def fires_on_release(self, channel: np.ndarray, dist_home_km: np.ndarray, other_cards: np.ndarray) -> np.ndarray:
        """The terminal rule on held records, counting the other cards at their terminal up to the look-ahead."""
        if COMPROMISED_TERMINAL not in self.thresholds:
            return np.zeros(len(channel), dtype=bool)
        held = _Held(channel)
        return _compromised_terminal(
            self.thresholds[COMPROMISED_TERMINAL], held, {"terminal_cards": other_cards, "dist_home_km": dist_home_km}
        )

    def with_look_ahead(self, seconds: float) -> RuleSet:
        """The same rules with another terminal look-ahead (offline measurements)."""
        if COMPROMISED_TERMINAL not in self.thresholds:
            return self
        thresholds = {
            **self.thresholds,
            COMPROMISED_TERMINAL: {**self.thresholds[COMPROMISED_TERMINAL], "look_ahead_s": seconds},
        }
        return RuleSet(self.names, thresholds, self.version)

    def without(self, *names: str) -> RuleSet:
        keep = tuple(n for n in self.names if n not in names)
        return RuleSet(keep, {n: self.thresholds[n] for n in keep}, self.version)


def _large_amount(t: Mapping[str, Any], tx: Any, f: Mapping[str, np.ndarray]) -> np.ndarray:
    """More than the threshold in one payment, except where such payments are ordinary (big-ticket
    merchants) and below `exempt_below_cents` — unless the card already knows the terminal."""
    large = tx.amount_cents > t["threshold_cents"]
    exempt = _in_categories(tx.merchant_category, t["exempt_categories"]) & (tx.amount_cents <= t["exempt_below_cents"])
    if t["exempt_unless_known_terminal"]:
        exempt &= ~f["known_terminal"]
    return large & ~exempt


def _card_testing(t: Mapping[str, Any], tx: Any, f: Mapping[str, np.ndarray]) -> np.ndarray:
    """A tiny online payment from a device new to the card at a merchant where cards are tested; then,
    in the same session, more tiny online payments or any payment from the device that came with them."""
    online = tx.channel == ONLINE_CODE
    tiny = tx.amount_cents <= t["test_max_cents"]
    burst = (f["session_small"] >= t["min_session_small"]) & ((online & tiny) | f["session_device"])
    if not t["first_test"]:
        return burst
    first = online & tiny & f["new_device"] & _in_categories(tx.merchant_category, t["test_categories"])
    return first | burst


def _impossible_travel(t: Mapping[str, Any], tx: Any, f: Mapping[str, np.ndarray]) -> np.ndarray:
    """In person, far from the previous in-person payment, faster than a plane, and away from home
    (a jump back home is tolerated: home is where the card is known)."""
    return (
        _in_channels(tx.channel, t["channels"])
        & (f["dist_prev_km"] >= t["min_jump_km"])
        & (f["speed_kmh"] > t["max_speed_kmh"])
        & (f["dist_home_km"] >= t["away_km"])
    )


def _far_from_home(t: Mapping[str, Any], tx: Any, f: Mapping[str, np.ndarray]) -> np.ndarray:
    """In person, away from home, in a stay that began with an impossible jump less than window_s ago."""
    return (
        _in_channels(tx.channel, t["channels"])
        & (f["dist_home_km"] >= t["away_km"])
        & (f["stay_kmh"] > t["max_speed_kmh"])
        & (f["stay_s"] <= t["window_s"])
    )


def _compromised_terminal(t: Mapping[str, Any], tx: Any, f: Mapping[str, np.ndarray]) -> np.ndarray:
    """In person, at a terminal that took other cards within its window: a few on a card far from its
    home (victims are anyone's cards, locals are not), or many on any card."""
    if "terminal_cards" not in f:
        raise ConfigError(
            "the compromised_terminal rule needs terminal features (the terminal window, consumer/terminal.py)"
        )
    cards = f["terminal_cards"]
    return _in_channels(tx.channel, _IN_PERSON) & (
        ((cards >= t["min_other_cards"]) & (f["dist_home_km"] >= t["min_home_km"]))
        | (cards >= t["min_other_cards_anywhere"])
    )


def _velocity(t: Mapping[str, Any], tx: Any, f: Mapping[str, np.ndarray]) -> np.ndarray:
    """More than max_in_session payments of one card in its session (payments at most
    features.SESSION_GAP_MS apart), this one included: the plain velocity count."""
    return f["session_n"] >= t["max_in_session"]


def _score_bands(t: Mapping[str, Any], tx: Any, f: Mapping[str, np.ndarray]) -> np.ndarray:
    """Never fires: the bands are the console's (see SCORE_BANDS)."""
    return np.zeros(len(tx.amount_cents), dtype=bool)


_PREDICATES: dict[str, Callable[[Mapping[str, Any], Any, Mapping[str, np.ndarray]], np.ndarray]] = {
    LARGE_AMOUNT: _large_amount,
    CARD_TESTING: _card_testing,
    IMPOSSIBLE_TRAVEL: _impossible_travel,
    FAR_FROM_HOME: _far_from_home,
    COMPROMISED_TERMINAL: _compromised_terminal,
    VELOCITY: _velocity,
    SCORE_BANDS: _score_bands,
}
# Rules whose features need per-terminal state (the terminal window every stateful detector holds).
TERMINAL_RULES = frozenset({COMPROMISED_TERMINAL})


def load_rules(path: Path | None = None, *, settings: Settings | None = None) -> RuleSet:
    """The rules of a TOML file over the documented defaults (None: the defaults alone).

    A table per rule, e.g. `[impossible_travel]` with `max_speed_kmh = 900.0`; a missing table or
    key keeps its default, `enabled = false` drops the rule. Unknown rules or keys, wrong types and
    out-of-range values are a ConfigError with one line naming the file and the key.
    """
    settings = settings or Settings()
    merged = copy.deepcopy(DEFAULT_RULES)  # a rule set never shares a list with the defaults
    merged[LARGE_AMOUNT]["threshold_cents"] = settings.fraud_threshold_cents
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"rules file {path}: {exc.strerror or exc}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"rules file {path}: not valid TOML: {exc}") from exc
        for name, params in data.items():
            if name not in merged:
                raise ConfigError(f"rules file {path}: unknown rule [{name}]; known: {', '.join(RULE_NAMES)}")
            if not isinstance(params, dict):
                raise ConfigError(f"rules file {path}: {name} must be a table ([{name}])")
            for key, value in params.items():
                if key not in merged[name]:
                    raise ConfigError(
                        f"rules file {path}: unknown key {name}.{key}; known: {', '.join(sorted(merged[name]))}"
                    )
                merged[name][key] = _checked(path, f"{name}.{key}", key, value)
        for name in data:
            _check_together(f"rules file {path}", name, merged[name])
    names = tuple(name for name in RULE_NAMES if merged[name]["enabled"])
    version = hashlib.sha256(repr(sorted((n, sorted(merged[n].items())) for n in names)).encode()).hexdigest()[:12]
    return RuleSet(names, {name: merged[name] for name in names}, version)


def _checked(path: Path, where: str, key: str, value: Any) -> Any:
    """`value` checked against PARAMETER_BOUNDS[key]; ConfigError (one line, values shown as repr) otherwise."""
    bound = PARAMETER_BOUNDS[key]
    kind = bound.type
    if kind is list:
        if not isinstance(value, list):
            raise ConfigError(f"rules file {path}: {where} must be a list, not {_shown(value)}")
        if bound.maximum is not None and len(value) > bound.maximum:
            raise ConfigError(
                f"rules file {path}: {where} has {len(value)} entries; at most {_number(bound.maximum)} ({bound.why})"
            )
        if key == "channels" and not all(v in CHANNELS for v in value):
            raise ConfigError(f"rules file {path}: {where} must be a list of channels among {', '.join(CHANNELS)}")
        if key != "channels" and not all(isinstance(v, str) and _MCC.fullmatch(v) for v in value):
            raise ConfigError(f"rules file {path}: {where} must be a list of four-digit merchant category codes")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**63 else math.inf  # a TOML or Avro whole number fits; Python's may not
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"rules file {path}: {where} must be {'a whole number' if kind is int else kind.__name__}, "
            f"not {_shown(value)}"
        )
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value  # a flag: no range (lists are checked above)
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"rules file {path}: {where} must be a finite number, not {value!r}")
    if bound.minimum is not None and value < bound.minimum:
        raise ConfigError(f"rules file {path}: {where} must be at least {_number(bound.minimum)}, not {value!r}")
    if bound.maximum is not None and value > bound.maximum:
        raise ConfigError(
            f"rules file {path}: {where} must be at most {_number(bound.maximum)} ({bound.why}), not {value!r}"
        )
    return value


def _check_together(where: str, kind: str, params: Mapping[str, Any]) -> None:
    """The checks of a kind that tie its parameters together (each is already within its bounds)."""
    if kind == SCORE_BANDS and params["review"] > params["decline"]:
        raise ConfigError(
            f"{where}: {kind}.review ({params['review']:g}) must be at most {kind}.decline ({params['decline']:g})"
        )


_MCC = re.compile(r"[0-9]{4}")  # ASCII digits: str.isdigit() also takes '²', which int() refuses at evaluation


def _number(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:g}"


def _shown(value: Any) -> str:
    """A value in an error line: its repr (control characters escaped), cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def checked_parameters(
    kind: str, parameters: Mapping[str, Any], *, where: str, settings: Settings | None = None
) -> dict[str, Any]:
    """One rule's parameters over its kind's defaults, by the very checks load_rules applies to a rules
    file (the rules topic's records go through here). A ConfigError's one line starts with `where`."""
    if kind not in DEFAULT_RULES:
        raise ConfigError(f"{where}: unknown kind {kind!r}; known: {', '.join(RULE_NAMES)}")
    merged = dict(DEFAULT_RULES[kind])
    merged.pop("enabled")
    if kind == LARGE_AMOUNT:
        merged["threshold_cents"] = (settings or Settings()).fraud_threshold_cents
    for key, value in parameters.items():
        if key not in merged:
            raise ConfigError(f"{where}: unknown parameter {key!r} for kind {kind}; known: {', '.join(sorted(merged))}")
        try:
            merged[key] = _checked(Path(where), f"{kind}.{key}", key, value)
        except ConfigError as exc:  # _checked names a rules file; the same check, said of this rule
            raise ConfigError(str(exc).replace(f"rules file {where}: ", f"{where}: ", 1)) from None
    _check_together(where, kind, merged)
    return merged


# ---------------------------------------------------------------------------------------------
# Stateless per-transaction rules (the stateless decide stage).


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    fires: Callable[[Transaction], bool]
    fires_on_columns: Callable[[pa.RecordBatch], pa.BooleanArray]


def large_amount(threshold_cents: int) -> Rule:
    """The seed's rule: more than the threshold (default $900.00) in one transaction."""
    return Rule(
        "large_amount",
        lambda tx: tx.amount_cents > threshold_cents,
        lambda batch: pc.greater(batch.column("amount_cents"), threshold_cents),
    )


def rules_from_settings(settings: Settings) -> tuple[Rule, ...]:
    return (large_amount(settings.fraud_threshold_cents),)


def fired(rules: Sequence[Rule], transaction: Transaction) -> list[str]:
    """Names of the rules that fire for this transaction (empty: legit)."""
    return [rule.name for rule in rules if rule.fires(transaction)]
