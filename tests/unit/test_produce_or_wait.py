"""The one full-queue wait (fraudstream.kafka.produce_or_wait) that the detector, the produce loop, the
changelog writer and the benchmarks share: it serves delivery reports until the record fits, or gives up."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from fraudstream.kafka import produce_or_wait


class FullQueue:
    """A producer whose local queue is full for the first `full_for` produce() calls."""

    def __init__(self, full_for: int, error: KafkaException | None = None) -> None:
        self.full_for, self.error = full_for, error
        self.produced: list[tuple] = []
        self.polls: list[float] = []
        self.attempts = 0

    def produce(self, topic, value, key=None, **kwargs) -> None:
        self.attempts += 1
        if self.error is not None:
            raise self.error
        if self.attempts <= self.full_for:
            raise BufferError("Local: Queue full")
        self.produced.append((topic, value, key, kwargs))

    def poll(self, timeout: float) -> int:
        self.polls.append(timeout)
        return 0


def test_a_full_queue_is_served_then_the_record_is_produced_once_with_its_options():
    producer = FullQueue(full_for=3)
    assert produce_or_wait(producer, "t", b"v", b"k", wait_s=0.2, headers=[("h", b"1")]) is True
    assert producer.produced == [("t", b"v", b"k", {"headers": [("h", b"1")]})]
    assert producer.polls == [0.2, 0.2, 0.2]  # one wait per refusal, serving delivery reports


def test_giving_up_stops_waiting_and_produces_nothing():
    producer = FullQueue(full_for=10**9)
    asked = []
    assert produce_or_wait(producer, "t", b"v", give_up=lambda: asked.append(1) or len(asked) == 4) is False
    assert producer.produced == [] and len(asked) == 4 and len(producer.polls) == 4


def test_other_producer_errors_propagate():
    error = KafkaException(KafkaError(KafkaError._STATE))
    with pytest.raises(KafkaException):
        produce_or_wait(FullQueue(full_for=0, error=error), "t", b"v")


def test_changelog_rows_written_while_the_queue_fills_are_all_written_in_order() -> None:
    """The changelog writer calls produce() directly and falls back to the wait only on a full queue: a
    queue full on the second row's first tries still gives every row once, in order, each with its layout."""
    import numpy as np

    from fraudstream.consumer.state.changelog import LAYOUT_HEADER, write_rows
    from fraudstream.consumer.state.stores import StoreSpec

    dtype = np.dtype([("last_ms", "<i8"), ("n", "<i4")])
    spec = StoreSpec(name="cards", dtype=dtype, layout=b"cards/1/12", expiry_field="last_ms", ttl_ms=1)
    rows = np.array([(1, 10), (2, 20), (3, 30)], dtype=dtype)

    class FullAtSecond(FullQueue):
        def produce(self, topic, value, key=None, **kwargs) -> None:
            self.attempts += 1
            if 2 <= self.attempts <= 4:  # the second row: refused three times, then taken
                raise BufferError("Local: Queue full")
            self.produced.append((topic, value, key, kwargs))

    producer = FullAtSecond(0)
    assert write_rows(producer, "changelog", 4, spec, [b"a", b"b", b"c"], rows) == 3
    assert [(key, value) for _topic, value, key, _kw in producer.produced] == [
        (b"a", rows[0].tobytes()),
        (b"b", rows[1].tobytes()),
        (b"c", rows[2].tobytes()),
    ]
    assert all(kw == {"partition": 4, "headers": [(LAYOUT_HEADER, b"cards/1/12")]} for *_rest, kw in producer.produced)
    assert len(producer.polls) == 2  # after the direct call, the wait served the full queue twice
