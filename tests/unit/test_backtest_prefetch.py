"""The backtest's reader thread (consumer/backtest.py, _Prefetched): chunks in order, a failure raised where the
deciding runs, and a stop that ends the thread (before the consumer it reads with is closed)."""

from __future__ import annotations

import threading

import pytest

from fraudstream.consumer.backtest import _Prefetched


def test_chunks_come_in_order_from_the_reader_thread():
    threads = []

    def chunks():
        for i in range(5):
            threads.append(threading.current_thread().name)
            yield i

    assert list(_Prefetched(chunks())) == [0, 1, 2, 3, 4]
    assert set(threads) == {"backtest-reader"}  # read on its own thread, not the caller's


def test_a_failure_while_reading_is_raised_to_the_deciding_thread_after_the_chunks_before_it():
    def chunks():
        yield 1
        raise RuntimeError("reading transactions: broker gone")

    got = []
    with pytest.raises(RuntimeError, match="broker gone"):
        for chunk in _Prefetched(chunks()):
            got.append(chunk)
    assert got == [1]


def test_stop_ends_a_reader_blocked_on_a_full_queue():
    reads = []

    def endless():
        while True:
            reads.append(1)
            yield len(reads)

    reader = _Prefetched(endless(), depth=1)
    first = next(iter(reader))
    reader.stop(timeout_s=5)
    assert first == 1 and not reader._thread.is_alive()
    assert len(reads) <= 4  # it stopped reading, not just waiting
