"""How the detector gathers a batch (one Kafka transaction) and how large it lets the next one grow.

A batch closes as soon as the input runs dry: what the consumer has already fetched is taken at once,
and the detector waits only while nothing at all is there. So a quiet input's records are decided as
they come, with no fixed wait to fill a batch.

The transaction's size follows the backlog. The broker's cost is per transaction (a round trip to
send the offsets, one to commit), so a backlogged input is drained fastest with large transactions;
a quiet one needs small ones for latency. A batch that filled its target means more was waiting: the
next target doubles, up to `most`. A batch that ended because the input ran dry brings the target
back to `least`. A transaction that took longer than its time budget (a share of
transaction.timeout.ms) halves it: a transaction must commit well before the coordinator aborts it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

LEAST_RECORDS = 1_000  # a quiet input's transactions start this large at most
# A transaction (produce, send offsets, commit) should take at most this share of transaction.timeout.ms.
TRANSACTION_TIME_SHARE = 0.1


class BatchSizer:
    """Records the next batch takes at most: doubled while the input is backlogged, back to `least` when it
    runs dry, halved when a transaction took longer than `time_budget_s`."""

    def __init__(self, *, most: int, time_budget_s: float, least: int = LEAST_RECORDS) -> None:
        self.most = max(1, most)
        self.least = min(max(1, least), self.most)
        self.time_budget_s = time_budget_s
        self.target = self.least

    def done(self, records: int, transaction_s: float) -> None:
        """A batch of `records` (gathered with the current target) took `transaction_s` to commit."""
        if transaction_s > self.time_budget_s:
            self.target = max(self.least, self.target // 2)
        elif records >= self.target:  # it filled: more was waiting
            self.target = min(self.most, self.target * 2)
        else:  # the input ran dry before it filled
            self.target = self.least


def gather(consume: Callable[[int, float], list], target: int, *, idle_wait_s: float, max_wait_s: float) -> list:
    """Up to `target` messages: those already fetched at once; if there are none, the first to arrive
    within `idle_wait_s` and what came with it. Never waits for more once there is something: the batch
    closes when the input runs dry, or after `max_wait_s` of taking records that keep coming."""
    messages = consume(target, 0)
    if not messages:
        messages = consume(1, idle_wait_s)
        if not messages:
            return messages
    deadline = time.monotonic() + max_wait_s
    while len(messages) < target and time.monotonic() < deadline:
        more = consume(target - len(messages), 0)
        if not more:
            break
        messages += more
    return messages
