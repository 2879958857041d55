"""How the detector gathers a batch and sizes the next one (consumer/batching.py), with a scripted consumer."""

from __future__ import annotations

from fraudstream.consumer.batching import BatchSizer, gather


class Fetches:
    """A consumer's local queue: `arrivals` are the records fetched before each consume() call (one
    list per call; later calls find nothing new). Records each call's arguments."""

    def __init__(self, *arrivals: int) -> None:
        self.arrivals = list(arrivals)
        self.queued = 0
        self.next = 0
        self.calls: list[tuple[int, float]] = []

    def consume(self, num_messages: int, timeout: float) -> list:
        self.calls.append((num_messages, timeout))
        if self.arrivals:
            self.queued += self.arrivals.pop(0)
        taken = min(num_messages, self.queued)
        self.queued -= taken
        self.next += taken
        return list(range(self.next - taken, self.next))


def test_records_already_fetched_are_taken_without_waiting():
    fetches = Fetches(300, 200)
    batch = gather(fetches.consume, 1_000, idle_wait_s=5.0, max_wait_s=5.0)
    assert batch == list(range(500))
    # Every call returned at once (timeout 0); the batch closed on the first that found nothing.
    assert fetches.calls == [(1_000, 0), (700, 0), (500, 0)]


def test_a_batch_stops_at_its_target_and_leaves_the_rest_queued():
    fetches = Fetches(5_000)
    assert gather(fetches.consume, 2_000, idle_wait_s=5.0, max_wait_s=5.0) == list(range(2_000))
    assert fetches.queued == 3_000 and fetches.calls == [(2_000, 0)]


def test_an_empty_queue_waits_for_the_first_record_only():
    fetches = Fetches(0, 1, 40)  # nothing yet; one record arrives during the wait, 40 more with it
    batch = gather(fetches.consume, 1_000, idle_wait_s=0.25, max_wait_s=5.0)
    assert batch == list(range(41))
    assert fetches.calls == [(1_000, 0), (1, 0.25), (999, 0), (959, 0)]


def test_nothing_within_the_idle_wait_is_an_empty_batch():
    fetches = Fetches()
    assert gather(fetches.consume, 1_000, idle_wait_s=0.01, max_wait_s=5.0) == []
    assert fetches.calls == [(1_000, 0), (1, 0.01)]


def test_the_target_doubles_while_backlogged_up_to_the_most():
    sizer = BatchSizer(most=20_000, least=1_000, time_budget_s=1.0)
    targets = []
    for _ in range(7):
        targets.append(sizer.target)
        sizer.done(sizer.target, 0.05)  # every batch filled: more was waiting
    assert targets == [1_000, 2_000, 4_000, 8_000, 16_000, 20_000, 20_000]


def test_the_target_goes_back_to_the_least_when_the_input_runs_dry():
    sizer = BatchSizer(most=20_000, least=1_000, time_budget_s=1.0)
    for _ in range(4):
        sizer.done(sizer.target, 0.05)
    assert sizer.target == 16_000
    sizer.done(300, 0.01)  # closed before it filled: the input is quiet now
    assert sizer.target == 1_000


def test_a_transaction_over_its_time_budget_halves_the_target_even_when_backlogged():
    sizer = BatchSizer(most=20_000, least=1_000, time_budget_s=1.0)
    for _ in range(4):
        sizer.done(sizer.target, 0.05)
    sizer.done(sizer.target, 1.5)
    assert sizer.target == 8_000
    for _ in range(10):
        sizer.done(sizer.target, 1.5)
    assert sizer.target == 1_000  # never below the least


def test_a_most_below_the_least_bounds_both():
    sizer = BatchSizer(most=8, least=1_000, time_budget_s=1.0)
    assert sizer.target == 8
    sizer.done(8, 0.01)
    assert sizer.target == 8
