"""The terminal window: a set of events keyed by (partition, offset), whose query depends only on that set.

Every detector holds the window whole, fed by its own reader of every input partition; the order in which
partitions are read, and records read twice (a rewind, a reseed), must never change an answer.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fraudstream.consumer.features import TERMINAL_WINDOW_MS
from fraudstream.consumer import terminal as terminal_module
from fraudstream.consumer.terminal import RECENT_EVENTS, TerminalWindow

W = TERMINAL_WINDOW_MS

T0 = 1_767_225_600_000
# Event times on a coarse grid (tenths of a window, and the grid's neighbours): equal times and window
# edges are common, which is where an order-dependent answer would show.
times_strategy = st.integers(0, 25).flatmap(lambda k: st.sampled_from([T0 + k * W // 10 + d for d in (-1, 0, 1)]))
# (partition, offset) -> (terminal, card, event time): few terminals and cards, times within a few windows.
events_strategy = st.dictionaries(
    st.tuples(st.integers(0, 3), st.integers(0, 60)),
    st.tuples(st.integers(1, 2), st.integers(1, 6), times_strategy),
    min_size=1,
    max_size=60,
)


def brute_force(events: dict, terminal: int, card: int, t: int, recent: int = RECENT_EVENTS, ahead: int = 0) -> int:
    """The specification: distinct other cards at the terminal with event time in [t - W, t + ahead], looking
    back `recent` events at most from t + ahead (every event at the time of the last one looked at included)."""
    upper = t + ahead
    times = sorted(
        (et for (term, _c, et) in events.values() if term == terminal and t - W <= et <= upper), reverse=True
    )
    since = times[recent - 1] if len(times) > recent else t - W
    return len({c for (term, c, et) in events.values() if term == terminal and c != card and since <= et <= upper})


def add(window: TerminalWindow, items: list) -> None:
    if not items:
        return
    (partitions, offsets), values = zip(*[k for k, _ in items]), [v for _, v in items]
    terminals, cards, times = zip(*values)
    window.add(np.array(partitions), np.array(offsets), np.array(terminals), np.array(cards), np.array(times))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=events_strategy, data=st.data())
def test_answers_depend_on_the_set_of_events_only(events: dict, data) -> None:
    items = list(events.items())
    # One window fed in order, one in another order, in chunks, with some records read again.
    recent = data.draw(st.sampled_from([RECENT_EVENTS, 3]))  # 3: the cap at work on these small sets
    ordered = TerminalWindow(recent=recent)
    add(ordered, sorted(items))
    shuffled = data.draw(st.permutations(items))
    again = data.draw(st.lists(st.sampled_from(items), max_size=30))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(shuffled) + len(again)), max_size=5)))
    stream = list(shuffled) + again
    chunked = TerminalWindow(recent=recent)
    for low, high in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        add(chunked, stream[low:high])
    assert len(chunked) == len(ordered) == len(events)

    queries = data.draw(
        st.lists(st.tuples(st.integers(1, 2), st.integers(1, 6), times_strategy), min_size=1, max_size=20)
    )
    terminals, cards, times = (np.array(column) for column in zip(*queries))
    expected = [brute_force(events, *q, recent=recent) for q in queries]
    assert ordered.other_cards(terminals, cards, times).tolist() == expected
    assert chunked.other_cards(terminals, cards, times).tolist() == expected
    # With a look-ahead (offline only: consumer/quality.py measures what it would catch).
    ahead = data.draw(st.sampled_from([1, W // 3, W]))
    expected_ahead = [brute_force(events, *q, recent=recent, ahead=ahead) for q in queries]
    assert chunked.other_cards(terminals, cards, times, ahead_ms=ahead).tolist() == expected_ahead


def test_equal_event_times_count_whatever_their_partition_and_offset() -> None:
    window = TerminalWindow()
    t = 1_767_225_600_000
    window.add(
        np.array([0, 1, 2]), np.array([5, 3, 9]), np.array([7, 7, 7]), np.array([1, 2, 3]), np.array([t, t, t + 1])
    )
    # At t, the card of partition 1 sees the card of partition 0 (same time) but not the later one.
    assert window.other_cards(np.array([7, 7]), np.array([2, 1]), np.array([t, t])).tolist() == [1, 1]
    assert window.other_cards(np.array([7]), np.array([9]), np.array([t + W])).tolist() == [3]
    assert window.other_cards(np.array([7]), np.array([9]), np.array([t + W + 1])).tolist() == [1]


def test_at_the_look_back_limit_every_event_of_the_same_time_counts() -> None:
    window = TerminalWindow(recent=3)
    t = T0
    # Five cards at one time, in an order unrelated to their positions: which three would a cut keep?
    window.add(
        np.array([2, 0, 1, 0, 2]), np.array([7, 3, 5, 1, 2]), np.full(5, 7), np.array([5, 1, 4, 2, 3]), np.full(5, t)
    )
    window.add(np.array([1]), np.array([9]), np.array([7]), np.array([6]), np.array([t - 1]))
    assert window.other_cards(np.array([7]), np.array([9]), np.array([t])).tolist() == [5]


def test_expiry_drops_only_older_events_and_a_reread_of_them_is_harmless() -> None:
    window = TerminalWindow()
    t = 1_767_225_600_000
    window.add(
        np.array([0, 0, 0]),
        np.array([0, 1, 2]),
        np.array([7, 7, 7]),
        np.array([1, 2, 3]),
        np.array([t, t + W, t + 2 * W]),
    )
    assert window.expire(t + W) == 1 and len(window) == 2
    assert window.other_cards(np.array([7]), np.array([9]), np.array([t + 2 * W])).tolist() == [2]
    window.add(np.array([0]), np.array([1]), np.array([7]), np.array([2]), np.array([t + W]))  # read again
    assert len(window) == 2


def test_event_times_far_apart_are_rebased_not_confused() -> None:
    window = TerminalWindow()
    t = 1_767_225_600_000
    far = t + 200 * 24 * 3_600_000  # 200 days later: beyond the key's 32-bit range from the first base
    window.add(np.array([0, 0]), np.array([0, 1]), np.array([7, 7]), np.array([1, 2]), np.array([t, far]))
    assert window.other_cards(np.array([7, 7, 7]), np.array([9, 9, 9]), np.array([t, far, far - 2 * W])).tolist() == [
        1,
        1,
        0,
    ]


def test_short_and_long_queries_count_alike(monkeypatch) -> None:
    """Queries of at most _ROW_CAP events are counted row by row in a matrix, longer ones (many events at one
    time) by one sort of their pairs: both give the specification's answer, alone and mixed in a batch."""
    rng = np.random.default_rng(11)
    n = 400
    # Three terminals, 12 cards, times on a grid of a few values within two windows: many ties, so some
    # queries reach far more than RECENT_EVENTS events (all those at the boundary's time count).
    terminals, cards = rng.integers(1, 4, n), rng.integers(1, 13, n)
    times = T0 + rng.choice([0, 1, W // 2, W, W + 1, 2 * W], n)
    events = {(0, i): (int(terminals[i]), int(cards[i]), int(times[i])) for i in range(n)}
    window = TerminalWindow()
    window.add(np.zeros(n, np.int64), np.arange(n), terminals, cards, times)
    q_terminals, q_cards = rng.integers(1, 4, 200), rng.integers(1, 13, 200)
    q_times = T0 + rng.choice([0, 1, W // 2, W, W + 1, 2 * W, 3 * W], 200)
    expected = [
        brute_force(events, int(a), int(b), int(c)) for a, b, c in zip(q_terminals, q_cards, q_times, strict=True)
    ]
    calls = {"matrix": 0, "sorted": 0}
    for name, method in (("matrix", "_distinct_others"), ("sorted", "_distinct_others_sorted")):
        original = getattr(TerminalWindow, method)

        def spy(self, lo, *args, _name=name, _original=original):
            calls[_name] += len(lo)
            return _original(self, lo, *args)

        monkeypatch.setattr(TerminalWindow, method, spy)
    for cap in (terminal_module._ROW_CAP, 0, 20, 10_000):  # the default, all long, mixed, all short
        monkeypatch.setattr(terminal_module, "_ROW_CAP", cap)
        before = dict(calls)
        assert window.other_cards(q_terminals, q_cards, q_times).tolist() == expected, cap
        ran = {name: calls[name] - before[name] for name in calls}
        if cap == 20:
            assert ran["matrix"] and ran["sorted"], ran  # a batch mixing both ways
    assert calls["matrix"] and calls["sorted"]
