"""The rule set: the rules file (defaults, overrides, errors) and what each rule fires on."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fraudstream.consumer.features import (
    CARD_FEATURES,
    CHANNEL_CODE,
    MINUTE_MS,
    PROFILE_DTYPE,
    TxColumns,
    card_features,
)
from fraudstream.consumer.rules import (
    COMPROMISED_TERMINAL,
    DEFAULT_RULES,
    DEFAULT_RULES_FILE,
    LARGE_AMOUNT,
    RULE_NAMES,
    VELOCITY,
    RuleSet,
    load_rules,
)
from fraudstream.consumer.state.table import KeyedTable
from fraudstream.errors import ConfigError
from fraudstream.settings import Settings
from tests.support.rule_strategies import parameter_values


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


def test_the_shipped_rules_file_documents_exactly_the_defaults() -> None:
    assert tomllib.loads(DEFAULT_RULES_FILE.read_text()) == DEFAULT_RULES
    shipped, defaults = load_rules(DEFAULT_RULES_FILE), load_rules(None)
    enabled_by_default = tuple(name for name in RULE_NAMES if DEFAULT_RULES[name]["enabled"])
    assert shipped.names == defaults.names == enabled_by_default and shipped.version == defaults.version


def test_the_seed_threshold_comes_from_the_settings_unless_the_file_sets_it(tmp_path: Path) -> None:
    assert load_rules(None).thresholds[LARGE_AMOUNT]["threshold_cents"] == Settings().fraud_threshold_cents == 90_000
    assert (
        load_rules(None, settings=Settings(fraud_threshold_cents=50_000)).thresholds[LARGE_AMOUNT]["threshold_cents"]
        == 50_000
    )
    path = write(tmp_path, "[large_amount]\nthreshold_cents = 70000\n")
    assert load_rules(path).thresholds[LARGE_AMOUNT]["threshold_cents"] == 70_000


def test_a_file_overrides_some_values_keeps_the_rest_and_changes_the_version(tmp_path: Path) -> None:
    rules = load_rules(
        write(tmp_path, "[impossible_travel]\nmax_speed_kmh = 900\n[compromised_terminal]\nenabled = false\n")
    )

    assert rules.thresholds["impossible_travel"]["max_speed_kmh"] == 900.0
    assert rules.thresholds["impossible_travel"]["min_jump_km"] == DEFAULT_RULES["impossible_travel"]["min_jump_km"]
    assert COMPROMISED_TERMINAL not in rules.names and rules.version != load_rules(None).version


@pytest.mark.parametrize(
    "text, says",
    [
        ("[geofence]\nmax = 3\n", "unknown rule [geofence]"),
        ("[card_testing]\ntest_max = 3\n", "unknown key card_testing.test_max"),
        ("[card_testing]\ntest_max_cents = 2.5\n", "card_testing.test_max_cents must be a whole number"),
        ("[card_testing]\ntest_max_cents = -1\n", "card_testing.test_max_cents must be at least 0"),
        ("[card_testing]\nfirst_test = 1\n", "card_testing.first_test must be bool"),
        ('[card_testing]\ntest_categories = ["58"]\n', "four-digit merchant category codes"),
        ('[far_from_home]\nchannels = ["TELEPATHY"]\n', "far_from_home.channels must be a list of channels"),
        ("[far_from_home]\nwindow_s = inf\n", "far_from_home.window_s must be a finite number"),
        ("card_testing = 3\n", "card_testing must be a table"),
        ("[card_testing\n", "not valid TOML"),
    ],
)
def test_a_bad_rules_file_is_one_clear_line_naming_the_file(tmp_path: Path, text: str, says: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_rules(path)

    assert says in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_missing_rules_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rules file .*nothing.toml"):
        load_rules(tmp_path / "nothing.toml")


def columns(**values) -> TxColumns:
    n = len(values["amount_cents"])
    base = {
        "transaction_id": [f"t{i}" for i in range(n)],
        "account_id": ["a"] * n,
        "card_key": [b"c"] * n,
        "terminal_key": [b"t"] * n,
        "merchant_category": [5411] * n,
        "channel": [CHANNEL_CODE["CARD_PRESENT"]] * n,
        "device_id": [None] * n,
        "device_hash": [0] * n,
        "card_hash": [1] * n,
        "terminal_hash": [1] * n,
        "event_time_ms": [0] * n,
        "latitude": [0.0] * n,
        "longitude": [0.0] * n,
    }
    base.update(values)
    dtypes = {
        "merchant_category": np.int16,
        "channel": np.int8,
        "device_hash": np.uint32,
        "card_hash": np.uint32,
        "terminal_hash": np.uint32,
        "event_time_ms": np.int64,
        "amount_cents": np.int64,
        "latitude": np.float64,
        "longitude": np.float64,
    }
    return TxColumns(**{name: np.array(v, dtype=dtypes.get(name, object)) for name, v in base.items()})


def feats(n: int, **values) -> dict[str, np.ndarray]:
    out = {name: np.zeros(n, dtype=dtype) for name, dtype in CARD_FEATURES.items()}
    out["terminal_cards"] = np.zeros(n, dtype=np.int64)
    for name, v in values.items():
        out[name] = np.array(v, dtype=out[name].dtype)
    return out


def fired(rules: RuleSet, rule: str, tx: TxColumns, f: dict) -> list[bool]:
    return rules.evaluate(tx, f)[rules.names.index(rule)].tolist()


def test_large_amount_spares_big_ticket_merchants_up_to_a_cap_unless_the_card_knows_the_terminal() -> None:
    rules = load_rules(None)
    tx = columns(
        amount_cents=[90_000, 90_001, 120_000, 120_000, 150_000], merchant_category=[5411, 5411, 5712, 5712, 5712]
    )
    f = feats(5, known_terminal=[False, False, False, True, False])

    assert fired(rules, "large_amount", tx, f) == [False, True, False, True, True]


def test_card_testing_fires_on_a_first_test_and_on_the_rest_of_its_session() -> None:
    rules = load_rules(None)
    online = CHANNEL_CODE["ONLINE"]
    tx = columns(
        amount_cents=[120, 120, 120, 4_000, 60_000, 120],
        merchant_category=[5815, 5815, 5411, 5815, 5964, 5815],
        channel=[online] * 6,
    )
    f = feats(
        6,
        new_device=[True, False, True, True, False, False],
        session_small=[0, 0, 0, 0, 2, 1],
        session_device=[False, False, False, False, True, False],
    )

    # a first test; a known device; not a testing merchant; not tiny; cash-out on the session's device; a second test
    assert fired(rules, "card_testing", tx, f) == [True, False, False, False, True, True]


def test_travel_rules_need_a_fast_jump_away_from_home_and_leave_contactless_alone() -> None:
    rules = load_rules(None)
    contactless = CHANNEL_CODE["CONTACTLESS"]
    tx = columns(amount_cents=[1_000] * 5, channel=[1, 1, 1, contactless, 1])
    f = feats(
        5,
        dist_prev_km=[5_000, 5_000, 5_000, 5_000, 10],
        speed_kmh=[30_000, 30_000, 1_000, 30_000, 600],
        dist_home_km=[5_000, 5, 5_000, 5_000, 5_000],
        stay_kmh=[30_000, 30_000, 1_000, 30_000, 30_000],
        stay_s=[0, 0, 0, 0, 120],
    )

    assert fired(rules, "impossible_travel", tx, f) == [True, False, False, False, False]
    assert fired(rules, "far_from_home", tx, f) == [True, False, False, False, True]


def test_compromised_terminal_needs_terminal_features() -> None:
    rules = load_rules(None)
    tx = columns(amount_cents=[1_000] * 4)
    f = feats(4, terminal_cards=[2, 1, 2, 3], dist_home_km=[500, 500, 5, 5])

    # Far from home: two other cards; anywhere: three.
    assert fired(rules, "compromised_terminal", tx, f) == [True, False, False, True]
    del f["terminal_cards"]
    with pytest.raises(ConfigError, match="terminal"):
        rules.evaluate(tx, f)
    assert not rules.without(COMPROMISED_TERMINAL).evaluate(tx, f).any()


def test_velocity_is_off_by_default_and_counts_a_cards_session_once_enabled(tmp_path: Path) -> None:
    assert VELOCITY not in load_rules(None).names
    rules = load_rules(write(tmp_path, "[velocity]\nenabled = true\nmax_in_session = 3\n")).without(
        COMPROMISED_TERMINAL
    )
    # One card: four payments 5 minutes apart (a session), then one 11 minutes later (a new session);
    # another card in between, whose payments never join the first card's count.
    times = [0, 5, 10, 12, 15, 26]
    cards = [b"c", b"c", b"c", b"other", b"c", b"c"]
    tx = columns(
        amount_cents=[1_000] * 6,
        event_time_ms=[1_700_000_000_000 + m * MINUTE_MS for m in times],
        card_key=cards,
        card_hash=[1 if c == b"c" else 2 for c in cards],
    )
    f = card_features(KeyedTable(PROFILE_DTYPE, capacity=4), tx)

    assert fired(rules, VELOCITY, tx, f) == [False, False, False, False, True, False]


def test_fired_names_lists_the_rules_per_transaction() -> None:
    rules = load_rules(None)
    matrix = np.zeros((len(rules.names), 3), dtype=bool)
    matrix[0, 1] = matrix[1, 1] = matrix[2, 2] = True

    assert rules.fired_names(matrix) == [[], [rules.names[0], rules.names[1]], [rules.names[2]]]


def test_the_records_held_for_the_look_ahead_are_those_it_could_still_turn(tmp_path: Path) -> None:
    rules = load_rules(None)
    online = CHANNEL_CODE["ONLINE"]
    # 0 far from home; 1 no home known; 2 at home at a terminal with two other cards; 3 at home, one other
    # card; 4 already fraud; 5 online; 6 in person far, but with nothing held (look_ahead_s = 0)
    tx = columns(amount_cents=[1_000] * 6, channel=[CHANNEL_CODE["CARD_PRESENT"]] * 5 + [online])
    f = feats(
        6,
        dist_home_km=[500, 0, 5, 5, 500, 500],
        home_known=[True, False, True, True, True, True],
        terminal_cards=[0, 0, 2, 1, 0, 0],
    )
    is_fraud = np.array([False, False, False, False, True, False])
    assert rules.to_hold(tx, f, is_fraud).tolist() == [True, True, True, False, False, False]
    assert not rules.with_look_ahead(0).to_hold(tx, f, is_fraud).any()
    assert rules.look_ahead_ms == 120_000

    # On release the rule counts the cards up to the look-ahead: two on a far card, three anywhere.
    channel = np.full(4, CHANNEL_CODE["CARD_PRESENT"], dtype=np.int8)
    assert rules.fires_on_release(channel, np.array([500.0, 500.0, 0.0, 0.0]), np.array([2, 1, 2, 3])).tolist() == [
        True,
        False,
        False,
        True,
    ]
    assert not rules.without(COMPROMISED_TERMINAL).fires_on_release(channel, np.full(4, 500.0), np.full(4, 9)).any()


# ----- bounds: one table (PARAMETER_BOUNDS), for the rules file, `rules set` and the rules topic alike


def test_every_parameter_of_every_rule_has_a_bound_with_finite_limits() -> None:
    from fraudstream.consumer.rules import PARAMETER_BOUNDS

    assert {key for params in DEFAULT_RULES.values() for key in params} | {"threshold_cents"} == PARAMETER_BOUNDS.keys()
    for key, bound in PARAMETER_BOUNDS.items():
        if bound.type is not bool:
            assert bound.maximum is not None and np.isfinite(bound.maximum) and bound.why, key


@pytest.mark.parametrize(
    "kind, key, value, says",
    [
        (COMPROMISED_TERMINAL, "look_ahead_s", 1e300, "look_ahead_s must be at most 3,600 (an hour"),
        (COMPROMISED_TERMINAL, "look_ahead_s", float("inf"), "must be a finite number, not inf"),
        (COMPROMISED_TERMINAL, "look_ahead_s", float("nan"), "must be a finite number, not nan"),
        (COMPROMISED_TERMINAL, "look_ahead_s", 10**400, "must be a finite number"),  # not OverflowError
        (LARGE_AMOUNT, "threshold_cents", 2**63 - 1, "threshold_cents must be at most 1,000,000,000,000"),
        ("impossible_travel", "away_km", 1e9, "away_km must be at most 20,040 (half the Earth"),
        ("far_from_home", "window_s", 31 * 86_400.0, "window_s must be at most 2,592,000"),
        (VELOCITY, "max_in_session", 10**9, "max_in_session must be at most 10,000"),
        ("card_testing", "test_categories", ["5815"] * 10_001, "has 10001 entries; at most 10,000"),
        ("card_testing", "test_categories", "5815", "must be a list, not '5815'"),
        ("card_testing", "test_categories", ["²²²²"], "four-digit merchant category codes"),  # isdigit(), not int()
        (LARGE_AMOUNT, "exempt_categories", ["٥٤١١"], "four-digit merchant category codes"),  # Arabic-Indic digits
    ],
)
def test_out_of_range_and_non_finite_parameters_are_one_line_errors(kind: str, key: str, value, says: str) -> None:
    from fraudstream.consumer.rules import checked_parameters

    with pytest.raises(ConfigError) as refused:
        checked_parameters(kind, {key: value}, where="rule r v1")
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_any_parameters_the_bounds_accept_keep_the_terminal_gate_in_int64() -> None:
    """The look-ahead's largest accepted value, added to event times of this millennium, fits an int64
    (1e300 did not: OverflowError in the terminal gate, the detector's end)."""
    from fraudstream.consumer.rules import PARAMETER_BOUNDS, checked_parameters

    top = PARAMETER_BOUNDS["look_ahead_s"].maximum
    rules = RuleSet(
        (COMPROMISED_TERMINAL,),
        {COMPROMISED_TERMINAL: checked_parameters(COMPROMISED_TERMINAL, {"look_ahead_s": top}, where="r")},
        "v",
    )
    event_times = np.array([0, 32_503_680_000_000], dtype=np.int64)  # 1970 and 3000
    assert (event_times + rules.look_ahead_ms).tolist() == [3_600_000, 32_503_683_600_000]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(RULE_NAMES).flatmap(
        lambda kind: st.tuples(
            st.just(kind),
            st.fixed_dictionaries(
                {},
                optional={
                    key: parameter_values(key)
                    for key in [*DEFAULT_RULES[kind], "threshold_cents"]
                    if key != "enabled" and (key != "threshold_cents" or kind == LARGE_AMOUNT)
                },
            ),
        )
    )
)
def test_whatever_parameters_the_bounds_accept_a_rule_runs_on_without_an_exception(kind_and_parameters) -> None:
    """A rule record that passes the checks must never raise while judging a batch, holding or releasing (the
    detector would end on every batch): '²²²²' once passed str.isdigit() and failed int() at evaluation."""
    from fraudstream.consumer.rules import checked_parameters

    kind, parameters = kind_and_parameters
    try:
        thresholds = checked_parameters(kind, parameters, where="r")
    except ConfigError as refused:
        assert "\n" not in str(refused)
        return
    rules = RuleSet((kind,), {kind: thresholds}, "v")
    n = 4
    tx = columns(
        amount_cents=[0, 1, 10**12, 2**62],
        merchant_category=[-1, 0, 5411, 9999],
        channel=[CHANNEL_CODE[c] for c in ("ONLINE", "CARD_PRESENT", "ATM", "CONTACTLESS")],
        event_time_ms=[0, 1, 32_503_680_000_000, 2**53],
    )
    f = feats(n, dist_home_km=[0.0, 1e9, np.inf, 5.0], terminal_cards=[0, 1, 10**6, 3])
    fired = rules.evaluate(tx, f)
    assert fired.shape == (1, n)
    assert (
        rules.to_hold(tx, f, fired.any(axis=0)).shape
        == rules.fires_on_release(tx.channel, f["dist_home_km"], f["terminal_cards"]).shape
        == (n,)
    )
    event_times = tx.event_time_ms + rules.look_ahead_ms  # the terminal gate's arithmetic, in int64
    assert event_times.dtype == np.int64
