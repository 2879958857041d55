"""The detector loop's error handling, with scripted Kafka clients: which call fails, and how, decides
what the loop must do (retry, abort and rewind, or recreate the producer: consumer/detector.py says
when). The real broker's side is in tests/integration."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import MemberDescription

import fraudstream.consumer.checkpoint as checkpoint_module
import fraudstream.consumer.detector as detector_module
from fraudstream.consumer.batching import BatchSizer
from fraudstream.evaluate import SCORE_HEADER
from fraudstream.consumer.decide import DLQ_KIND, DecidedBatch, Decision, Route, dead_letter
from fraudstream.consumer.collector import OUTPUT_TOO_LARGE
from fraudstream.consumer.detector import FAILURES_IN_A_ROW_LIMIT, Detector
from fraudstream.consumer.tasks import TaskManager
from fraudstream.errors import Fenced, KafkaUnavailable
from fraudstream.serde import DecodeError
from fraudstream.settings import PROJECT_ROOT, Settings

TOPIC = "tx"


class Message:
    def __init__(self, partition: int, offset: int) -> None:
        self._partition, self._offset = partition, offset

    def topic(self):
        return TOPIC

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset

    def key(self):
        return b"k"

    def value(self):
        return f"{self._partition}:{self._offset}".encode()

    def headers(self):
        return None

    def error(self):
        return None


class ErrorEvent(Message):
    def __init__(self, error: KafkaError) -> None:
        super().__init__(0, -1)
        self._error = error

    def error(self):
        return self._error


class Log:
    """A partitioned input log the fake consumer reads from, honouring seeks and commits."""

    def __init__(self, partitions: int, records: int) -> None:
        self.records = {p: [Message(p, o) for o in range(records)] for p in range(partitions)}
        self.committed = {p: -1001 for p in range(partitions)}  # OFFSET_INVALID: nothing committed yet


class FakeConsumer:
    def __init__(self, log: Log, detector: Detector, batch: int = 4) -> None:
        self.log, self.detector, self.batch = log, detector, batch
        self.positions = dict.fromkeys(log.records, 0)
        self.seeks: list[tuple[int, int]] = []
        self.on_consume = None  # called inside consume(), where librdkafka runs rebalance callbacks

    def consume(self, num_messages, timeout):
        if self.on_consume:
            hook, self.on_consume = self.on_consume, None
            messages = hook()
        else:  # what one fetch brings: up to `batch` records of each partition
            messages = []
            for p in sorted(self.positions):
                if p in self.detector.tasks.partitions:
                    chunk = self.log.records[p][
                        self.positions[p] : self.positions[p] + min(self.batch, num_messages - len(messages))
                    ]
                    self.positions[p] += len(chunk)
                    messages += chunk
        if not messages and timeout > 0:
            self.detector.stop.set()  # the log is drained and the detector would wait: end the run
        return messages

    def position(self, partitions):
        return [TopicPartition(TOPIC, tp.partition, self.positions[tp.partition]) for tp in partitions]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.partition, tp.offset))
        self.positions[tp.partition] = 0 if tp.offset == OFFSET_BEGINNING else tp.offset

    def committed(self, partitions, timeout=None):
        return [TopicPartition(TOPIC, tp.partition, self.log.committed[tp.partition]) for tp in partitions]

    def consumer_group_metadata(self):
        return "group-metadata"

    def memberid(self):
        return "member-ours"

    def close(self):
        pass


class FakeProducer:
    """Records what each transaction produced; `fail` scripts errors as (call name, n-th call) -> KafkaError."""

    def __init__(self, log: Log, fail: dict | None = None) -> None:
        self.log, self.fail = log, dict(fail or {})
        self.calls: dict[str, int] = {}
        self.open: list | None = None
        self.offsets: list | None = None
        self.committed_outputs: list[bytes] = []
        self.commits: list[int] = []  # records per committed transaction
        self.produce_calls: list[bytes] = []
        self.produced: list[tuple[str, bytes, list | None]] = []  # (topic, value, headers) of every call
        self.aborts = 0

    def _maybe_fail(self, name: str) -> None:
        n = self.calls[name] = self.calls.get(name, 0) + 1
        error = self.fail.get((name, n)) or self.fail.get((name, "*"))
        if error is not None:
            raise KafkaException(error)

    def begin_transaction(self):
        self._maybe_fail("begin")
        self.open, self.offsets = [], None

    def produce(self, topic, value, key=None, headers=None):
        self.produce_calls.append(value)
        self.produced.append((topic, value, headers))
        self._maybe_fail("produce")
        self.open.append(value)

    def send_offsets_to_transaction(self, offsets, metadata, timeout):
        self._maybe_fail("send_offsets")
        self.offsets = offsets

    def commit_transaction(self, timeout):
        self._maybe_fail("commit")
        self.committed_outputs += self.open
        self.commits.append(len(self.open))
        for tp in self.offsets:
            self.log.committed[tp.partition] = tp.offset
        self.open = None

    def abort_transaction(self, timeout):
        self._maybe_fail("abort")
        self.aborts += 1
        self.open = None

    def poll(self, timeout=0):
        return 0

    def flush(self, timeout=0):
        return 0


class FakeAdmin:
    def list_topics(self, timeout=None):
        return type("Metadata", (), {"brokers": {1: "broker"}})()


class PassThrough:
    """Every record forwarded as it came: the detector's fast path (no Decision per record)."""

    def decide_batch(self, messages):
        return DecidedBatch(len(messages), {})


def make_detector(
    monkeypatch, *, partitions=2, records=8, fail=None, successors=(), transaction_timeout_ms=10_000, decider=None
) -> tuple[Detector, Log, list[FakeProducer]]:
    # Batches of 8 records at most: the scripted failures hit the first or a later transaction.
    settings = Settings(transactions_topic=TOPIC, transaction_timeout_ms=transaction_timeout_ms, batch_max_records=8)
    detector = Detector(settings, log_interval_s=3600, on_log=lambda line: logs.append(line))
    logs: list[str] = []
    detector.logs = logs
    log = Log(partitions, records)
    producers: list[FakeProducer] = [FakeProducer(log, fail)]  # the first one fails as scripted, later ones never

    def new_producer():
        producers.append(FakeProducer(log))
        return producers[-1]

    def start():
        detector.collector.limits = dict.fromkeys(detector.routes.values(), 1_000_000)
        detector._admin = FakeAdmin()
        detector.consumer = FakeConsumer(log, detector)
        detector._on_assign(None, [TopicPartition(TOPIC, p) for p in range(partitions)])
        detector.producer = producers[0]
        return decider or PassThrough(), []

    monkeypatch.setattr(detector, "_start", start)
    monkeypatch.setattr(detector, "_new_producer", new_producer)

    def new_consumer():  # joins the group at once and starts from the committed offsets
        consumer = FakeConsumer(log, detector)
        consumer.positions = {p: max(0, offset) for p, offset in log.committed.items()}
        detector._on_assign(None, [TopicPartition(TOPIC, p) for p in range(partitions)])
        return consumer

    monkeypatch.setattr(detector, "_new_consumer", new_consumer)
    detector._successor_wait_s = 0.5
    answers = []  # the group's answers, for the test to read

    def static_members(settings, group, instance, timeout_s):
        # Kafka keeps the replaced member's client id and host: only the member id differs.
        members = successors(len(answers)) if callable(successors) else successors
        answers.append(members)
        return [MemberDescription(m, "rdkafka", "/127.0.0.1", None, instance) for m in ("member-ours", *members)]

    detector.group_answers = answers
    monkeypatch.setattr(detector_module, "static_members", static_members)
    return detector, log, producers


def every_input(log: Log) -> list[bytes]:
    return sorted(m.value() for records in log.records.values() for m in records)


def test_produce_in_a_failed_transaction_aborts_rewinds_and_retries(monkeypatch):
    # After a delivery failure librdkafka refuses produce() with _STATE: neither retriable nor abortable.
    detector, log, [producer] = make_detector(monkeypatch, fail={("produce", 3): KafkaError(KafkaError._STATE)})
    metrics = detector.run()
    assert producer.aborts == 1 and metrics.aborts == 1
    assert sorted(producer.committed_outputs) == every_input(log)  # each exactly once, nothing lost
    assert (0, 0) in detector.consumer.seeks and (1, 0) in detector.consumer.seeks  # rewound to the batch start
    assert log.committed == {0: 8, 1: 8}


def test_a_retriable_produce_error_retries_that_record_alone(monkeypatch):
    retriable = KafkaError(KafkaError._TRANSPORT, retriable=True)
    detector, log, [producer] = make_detector(monkeypatch, fail={("produce", 3): retriable})
    detector.run()
    assert producer.aborts == 0
    first_batch = [b"0:0", b"0:1", b"0:2", b"0:3", b"1:0", b"1:1", b"1:2", b"1:3"]
    assert producer.produce_calls[:9] == first_batch[:3] + [b"0:2"] + first_batch[3:]  # only the failed one again
    assert sorted(producer.committed_outputs) == every_input(log)


def test_abort_and_retry_is_bounded_with_backoff_on_the_stop_event(monkeypatch):
    abortable = KafkaError(KafkaError._INCONSISTENT, txn_requires_abort=True)
    detector, log, [producer] = make_detector(monkeypatch, fail={("commit", "*"): abortable})
    waits = []
    real_wait = detector.stop.wait
    monkeypatch.setattr(detector.stop, "wait", lambda timeout=None: waits.append(timeout) or real_wait(0))
    with pytest.raises(KafkaUnavailable, match=f"{FAILURES_IN_A_ROW_LIMIT} transactions in a row failed"):
        detector.run()
    assert producer.aborts == FAILURES_IN_A_ROW_LIMIT
    assert waits == sorted(waits) and waits[0] < waits[-1]  # growing backoff, waited on the stop event
    assert producer.committed_outputs == [] and log.committed == {0: -1001, 1: -1001}


def test_a_stop_request_ends_the_retries_promptly(monkeypatch):
    retriable = KafkaError(KafkaError._TIMED_OUT, retriable=True)
    detector, log, [producer] = make_detector(
        monkeypatch, fail={("commit", "*"): retriable}, transaction_timeout_ms=120_000
    )
    threading.Timer(0.5, detector.stop.set).start()
    started = time.monotonic()
    detector.run()
    assert time.monotonic() - started < 3  # not the transaction's 96 s of retries
    assert any("stop requested while committing" in line for line in detector.logs), detector.logs
    assert producer.committed_outputs == []


def test_a_commit_retried_past_the_transaction_timeout_recovers_instead_of_reporting_fencing(monkeypatch):
    retriable = KafkaError(KafkaError._TIMED_OUT, retriable=True)
    detector, log, producers = make_detector(
        monkeypatch,
        fail={("commit", 1): retriable, ("commit", 2): retriable, ("commit", "*"): retriable},
        transaction_timeout_ms=1_000,
    )
    metrics = detector.run()
    assert len(producers) == 2 and metrics.recoveries == 1  # a new producer under the same transactional id
    recovery = next(line for line in detector.logs if "recreating the transactional producer" in line)
    assert "about to time out" in recovery and "no other detector holds" in recovery
    assert (0, OFFSET_BEGINNING) in detector.consumer.seeks  # rewound to the committed offsets (none yet)
    assert sorted(producers[1].committed_outputs) == every_input(log)


@pytest.mark.parametrize("code", [KafkaError._FENCED, KafkaError.INVALID_PRODUCER_EPOCH])
def test_an_epoch_ended_by_the_broker_recreates_the_producer(monkeypatch, code):
    detector, log, producers = make_detector(monkeypatch, fail={("send_offsets", 2): KafkaError(code, fatal=True)})
    metrics = detector.run()
    assert metrics.recoveries == 1 and len(producers) == 2
    # The first batch was committed: the rewind goes to its end, so nothing is produced twice.
    outputs = producers[0].committed_outputs + producers[1].committed_outputs
    assert sorted(outputs) == every_input(log)


def test_committed_offsets_the_consumer_cannot_get_are_asked_with_a_fresh_client_of_the_group(monkeypatch):
    """After a broker restart the consumer's own coordinator requests can keep timing out."""
    detector, log, producers = make_detector(
        monkeypatch, fail={("send_offsets", 2): KafkaError(KafkaError._FENCED, fatal=True)}
    )
    detector.settings = detector.settings.replace(broker_outage_limit_s=3)  # a failure here fails in seconds
    stuck = KafkaException(KafkaError(KafkaError._TIMED_OUT))
    monkeypatch.setattr(FakeConsumer, "committed", lambda self, partitions, timeout=None: (_ for _ in ()).throw(stuck))
    askers = []

    class FreshAsker:
        def __init__(self, config):
            assert config["group.id"] == detector.settings.group_id
            askers.append(self)
            self.closed = False

        def committed(self, partitions, timeout=None):
            return [TopicPartition(TOPIC, tp.partition, log.committed[tp.partition]) for tp in partitions]

        def close(self):
            self.closed = True

    monkeypatch.setattr(detector_module, "Consumer", FreshAsker)
    metrics = detector.run()
    assert metrics.recoveries == 1 and len(askers) == 1 and askers[0].closed
    outputs = producers[0].committed_outputs + producers[1].committed_outputs
    assert sorted(outputs) == every_input(log)  # rewound to the first batch's end: nothing twice, nothing lost


def test_a_newer_detector_holding_our_instance_id_stops_us_with_that_reason(monkeypatch):
    detector, log, producers = make_detector(
        monkeypatch, fail={("commit", 1): KafkaError(KafkaError._FENCED, fatal=True)}, successors=("member-newer",)
    )
    with pytest.raises(
        Fenced,
        match="another detector with the same transactional id joined group .* as member member-newer and took over",
    ):
        detector.run()
    assert len(producers) == 1


FENCED_INSTANCE = KafkaError(
    KafkaError.FENCED_INSTANCE_ID, "Static consumer fenced by other consumer with same group.instance.id", fatal=True
)


def fence_consumer_after_first_batch(detector: Detector, log: Log) -> None:
    original_start = detector._start

    def start():
        result = original_start()

        def first_batch_then_fenced():
            detector.consumer.on_consume = lambda: [ErrorEvent(FENCED_INSTANCE)]
            detector.consumer.positions.update({0: 4, 1: 4})
            return log.records[0][:4] + log.records[1][:4]

        detector.consumer.on_consume = first_batch_then_fenced
        return result

    detector._start = start


def test_a_consumer_fenced_by_its_own_rejoin_is_recreated(monkeypatch):
    # After a broker restart the coordinator can fence a static member's own rejoin: no other detector exists.
    detector, log, [producer] = make_detector(monkeypatch)
    fence_consumer_after_first_batch(detector, log)
    first = detector.consumer
    metrics = detector.run()
    assert metrics.recoveries == 1 and detector.consumer is not first
    assert any("recreating the consumer" in line for line in detector.logs), detector.logs
    assert sorted(producer.committed_outputs) == every_input(log)


def test_a_member_left_by_our_own_rejoin_expires_and_does_not_stop_us(monkeypatch):
    # Our consumer's lost rejoin left a member under our group.instance.id that nobody heartbeats:
    # it is gone after the session timeout, unlike a newer detector's.
    detector, log, [producer] = make_detector(
        monkeypatch, successors=lambda asked: ["member-phantom"] if asked < 2 else []
    )
    fence_consumer_after_first_batch(detector, log)
    metrics = detector.run()
    assert metrics.recoveries == 1 and len(detector.group_answers) == 3
    assert sorted(producer.committed_outputs) == every_input(log)


def test_a_consumer_fenced_by_a_newer_detector_stops(monkeypatch):
    detector, log, [producer] = make_detector(monkeypatch, successors=("member-newer",))
    fence_consumer_after_first_batch(detector, log)
    with pytest.raises(Fenced, match="as member member-newer and took over .*Static consumer fenced"):
        detector.run()
    assert len(producer.committed_outputs) == 8  # the first batch, then nothing more


def test_records_of_a_partition_revoked_during_consume_are_neither_produced_nor_committed(monkeypatch):
    detector, log, [producer] = make_detector(monkeypatch)

    def consume_then_revoke():
        messages = log.records[0][:4] + log.records[1][:4]
        detector.consumer.positions.update({0: 4, 1: 4})
        detector._on_revoke(None, [TopicPartition(TOPIC, 1)])  # partition 1 moved away in this consume() call
        return messages

    original_start = detector._start

    def start():
        result = original_start()
        detector.consumer.on_consume = consume_then_revoke
        return result

    monkeypatch.setattr(detector, "_start", start)
    detector.run()
    assert producer.committed_outputs and all(value.startswith(b"0:") for value in producer.committed_outputs)
    assert log.committed[1] == -1001  # its new owner starts where the last commit left it


class FraudAtOneDeadAtFive:
    """Per batch: the record at index 1 is fraud, the one at index 5 a dead letter; the rest are forwarded
    with the batch's legit headers."""

    headers = [("rule.set.version", b"7")]

    def decide_batch(self, messages):
        outputs = {1: Decision(Route.FRAUD, b"k", b"alert:" + messages[1].value(), rules=("big",))}
        if len(messages) > 5:
            outputs[5] = dead_letter(messages[5], DecodeError("invalid_record", "test"))
        return DecidedBatch(len(messages), outputs, self.headers)


def test_forwarded_records_and_their_own_outputs_are_produced_in_input_order(monkeypatch):
    detector, log, [producer] = make_detector(monkeypatch, partitions=1, records=8, decider=FraudAtOneDeadAtFive())
    metrics = detector.run()
    settings = detector.settings
    expected = []
    for index, message in enumerate(log.records[0]):
        if index == 1:
            expected.append((settings.fraud_topic, b"alert:" + message.value(), None))
        elif index == 5:
            expected.append((settings.dlq_topic, message.value(), "invalid_record"))
        else:  # the input's own bytes, the batch's legit headers
            expected.append((settings.legit_topic, message.value(), FraudAtOneDeadAtFive.headers))
    produced = [
        (topic, value, dict(headers or {}).get(DLQ_KIND, b"").decode() if topic == settings.dlq_topic else headers)
        for topic, value, headers in producer.produced
    ]
    assert produced == expected
    assert (metrics.legit, metrics.fraud, metrics.dead_lettered) == (6, 1, 1)


class ScoredByAModel(FraudAtOneDeadAtFive):
    """The same batch, with a model's score per record: each forwarded record carries its own."""

    def decide_batch(self, messages):
        batch = super().decide_batch(messages)
        batch.legit_scores = [b"0.%d" % index for index in range(len(messages))]
        return batch


def test_a_forwarded_record_carries_its_own_score_when_a_model_scores_the_batch(monkeypatch):
    detector, log, [producer] = make_detector(monkeypatch, partitions=1, records=8, decider=ScoredByAModel())
    detector.run()
    forwarded = [headers for topic, _, headers in producer.produced if topic == detector.settings.legit_topic]
    assert forwarded == [[*ScoredByAModel.headers, (SCORE_HEADER, b"0.%d" % index)] for index in (0, 2, 3, 4, 6, 7)]


def test_a_forwarded_record_over_the_legit_topics_limit_is_dead_lettered(monkeypatch):
    detector, log, [producer] = make_detector(monkeypatch, partitions=1, records=8)
    big = log.records[0][3]
    big.value = lambda: b"x" * 5_000
    original_start = detector._start

    def start():
        result = original_start()
        detector.collector.limits[detector.settings.legit_topic] = 4_500  # the others keep 1,000,000
        return result

    monkeypatch.setattr(detector, "_start", start)
    metrics = detector.run()
    topics = [topic for topic, _, _ in producer.produced]
    assert topics[3] == detector.settings.dlq_topic and topics.count(detector.settings.legit_topic) == 7
    assert dict(producer.produced[3][2])[DLQ_KIND] == OUTPUT_TOO_LARGE.encode()
    assert (metrics.legit, metrics.dead_lettered) == (7, 1)


def test_a_backlogged_input_gets_ever_larger_transactions(monkeypatch):
    detector, log, [producer] = make_detector(monkeypatch, partitions=2, records=200)
    detector.sizer = BatchSizer(most=64, least=8, time_budget_s=60.0)
    detector.run()
    # 400 records waiting from the start: each batch fills, so the next one doubles, up to the most.
    assert producer.commits[:5] == [8, 16, 32, 64, 64] and sum(producer.commits) == 400
    assert sorted(producer.committed_outputs) == every_input(log)


def test_first_signal_stops_cleanly_and_a_second_exits_at_once():
    # The main thread sits in a librdkafka call that blocks in C (no broker answers): a Python-level
    # handler would only run once it returns, after its 30 s timeout.
    script = textwrap.dedent("""
        import threading
        from confluent_kafka import KafkaException, Producer
        from fraudstream.signals import stop_requests
        stop = threading.Event()
        threading.Thread(target=lambda: (stop.wait(), print("stopping", flush=True)), daemon=True).start()
        producer = Producer({"bootstrap.servers": "127.0.0.1:1", "transactional.id": "t", "log_level": 0})
        with stop_requests(stop, exit_on_second="detector"):
            print("ready", flush=True)
            try:
                producer.init_transactions(30)
            except KafkaException:
                pass
            print("returned", flush=True)
    """)
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGINT)
        assert process.stdout.readline().strip() == "stopping"  # seen while the call still blocks
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 130
        assert "returned" not in process.stdout.read()  # it ended inside the blocking call
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)


@pytest.mark.parametrize("call_s, stuck", [(3.0, True), (0.0, False)])
def test_a_kafka_call_blocked_long_past_its_timeout_ends_the_process_with_its_stacks(call_s, stuck):
    """A call that never returns (librdkafka after broker restarts) must not hang the detector for good."""
    code = textwrap.dedent(f"""
        import time
        import fraudstream.consumer.detector as detector
        detector.STUCK_CALL_GRACE_S = 0.5
        with detector.exit_if_stuck(0.2):
            time.sleep({call_s})  # the blocked call
        time.sleep(1.5)  # after a call that returned in time, the timer is gone
        print("still running", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    if stuck:
        assert (
            done.returncode == 1 and "Timeout (0:00:00.700000)!" in done.stdout and "still running" not in done.stdout
        )
        assert "in <module>" in done.stdout  # the stack of the blocked call
    else:
        assert done.returncode == 0 and done.stdout.strip() == "still running", done.stdout + done.stderr


def assigned_tasks(detector: Detector, *partitions: int) -> None:
    """The detector's tasks for these input partitions, as its rebalance callback makes them (without stores)."""
    detector._on_assign(None, [TopicPartition(TOPIC, p) for p in partitions])


@pytest.mark.parametrize("restoring", [set(), {1}])
def test_records_of_a_partition_still_restoring_are_read_again_later(monkeypatch, restoring):
    """Every task ready (the usual case): the batch goes through whole, with no check per record. A task whose
    state is being restored: its partition's records are left out and rewound, to be read again once it
    resumes; the others' are kept, in order."""
    d = Detector(Settings(transactions_topic=TOPIC))
    assigned_tasks(d, 0, 1)
    for partition in restoring:
        d.tasks.tasks[partition].restoring = True
    asked = []
    ready = d.tasks.ready
    monkeypatch.setattr(d.tasks, "ready", lambda partition: asked.append(partition) or ready(partition))
    rewound = []
    monkeypatch.setattr(d, "_rewind", lambda messages, rebuild_state=True: rewound.append((messages, rebuild_state)))
    messages = [Message(p, o) for p, o in [(0, 5), (1, 7), (0, 6), (1, 8)]]
    kept = d._with_state_ready(messages)
    if not restoring:
        assert kept == messages and not rewound
        assert asked == []  # no task restoring: no check per record
    else:
        assert [(m.partition(), m.offset()) for m in kept] == [(0, 5), (0, 6)]
        assert [[(m.partition(), m.offset()) for m in batch] for batch, _ in rewound] == [[(1, 7), (1, 8)]]
        assert rewound[0][1] is False  # the state is already being rebuilt: only the consumer is rewound


def test_the_offsets_sent_are_each_partitions_last_record_of_the_batch_plus_one():
    # Partitions interleaved as fetch responses come, one of them with a single record.
    batch = [Message(0, 10), Message(0, 11), Message(2, 5), Message(1, 7), Message(0, 12), Message(2, 6), Message(2, 7)]

    sent = detector_module._next_offsets(batch)

    assert sorted((tp.topic, tp.partition, tp.offset) for tp in sent) == [(TOPIC, 0, 13), (TOPIC, 1, 8), (TOPIC, 2, 8)]
    assert detector_module._next_offsets([]) == []


def test_an_aborted_batch_is_undone_in_memory_and_only_its_own_partitions_are_sought_back():
    """The abort undoes the batch's state changes, the held records it released from partition 1 included, without
    a restore from the changelog: nothing is paused, so partition 1 (none of its records in the batch) keeps its
    position."""
    log = Log(partitions=2, records=20)
    d = Detector(Settings(transactions_topic=TOPIC))
    d.consumer = FakeConsumer(log, d)
    d.consumer.positions = {0: 4, 1: 9}
    assigned_tasks(d, 0, 1)
    d._rewind([Message(0, 2), Message(0, 3)])
    assert d.tasks.rollbacks == 1
    assert sorted(d.consumer.seeks) == [(0, 2)]


class CommittedOffset:
    """A committed() answer for one partition, as librdkafka gives it, with its own error."""

    def __init__(self, partition: int, offset: int, error: KafkaError | None = None) -> None:
        self.topic, self.partition, self.offset, self.error = TOPIC, partition, offset, error


def test_a_partition_whose_committed_offset_came_back_with_an_error_is_asked_again_not_read_from_the_start(monkeypatch):
    """librdkafka reports a per-partition error inside committed()'s answer, with OFFSET_INVALID as the offset:
    taken as "nothing committed", the partition was read again from its beginning (duplicates)."""
    detector, log, producers = make_detector(
        monkeypatch, fail={("send_offsets", 2): KafkaError(KafkaError._FENCED, fatal=True)}
    )
    detector.settings = detector.settings.replace(broker_outage_limit_s=5)
    answers = []

    def answer(self, partitions, timeout=None):
        error = KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS) if not answers else None
        answers.append(error)
        return [
            CommittedOffset(tp.partition, -1001 if error else log.committed[tp.partition], error) for tp in partitions
        ]

    monkeypatch.setattr(FakeConsumer, "committed", answer)

    class FreshAsker:  # the second attempt's client of the group
        def __init__(self, config):
            pass

        committed = answer

        def close(self):
            pass

    monkeypatch.setattr(detector_module, "Consumer", FreshAsker)
    metrics = detector.run()
    assert metrics.recoveries == 1 and len(answers) == 2 and answers[0] is not None  # the error was asked again
    outputs = producers[0].committed_outputs + producers[1].committed_outputs
    assert sorted(outputs) == every_input(log)  # nothing read twice from the start


class ReleasingDecider:
    """The first batch holds nothing back; then, with the input quiet, held records of partition 1 fall due."""

    def __init__(self) -> None:
        self.released = False

    def decide_batch(self, messages):
        return DecidedBatch(len(messages), {})

    def release_due(self):
        if self.released:
            return None
        self.released = True
        held_input = Message(1, 3)
        batch = DecidedBatch(0, {})
        batch.released = [(held_input, Decision(Route.LEGIT, b"k", b"released", None))]
        batch.state_partitions = {1}
        return batch


def start_with(monkeypatch, detector: Detector, tasks: TaskManager) -> None:
    """The stand-in detector's start gives it these tasks (for the partitions its start assigned)."""
    start = detector._start

    def start_with_tasks():
        started = start()
        tasks.assign(None, [TopicPartition(TOPIC, p) for p in detector.tasks.partitions])
        detector.tasks = tasks
        return started

    monkeypatch.setattr(detector, "_start", start_with_tasks)


class QuietState(TaskManager):
    """Tasks without stores that count the checkpoints committed (rollbacks: TaskManager's own count)."""

    def __init__(self) -> None:
        super().__init__(Settings(transactions_topic=TOPIC), ())
        self.commits = 0

    def commit(self):
        self.commits += 1
        super().commit()


class StateWriteInFailedTransaction(QuietState):
    """The first write of state changes meets a transaction librdkafka already failed (in CI: a broker restart's
    OUT_OF_ORDER_SEQUENCE_NUMBER, which needs the abort's epoch bump): produce() raises _STATE."""

    writes = 0

    def write_changes(self, producer, partitions):
        self.writes += 1
        if self.writes == 1:
            raise KafkaException(KafkaError(KafkaError._STATE, "Erroneous state"))
        return super().write_changes(producer, partitions)


def test_state_changes_refused_by_a_failed_transaction_abort_the_batch_not_the_detector(monkeypatch):
    detector, log, [producer] = make_detector(monkeypatch)
    state = StateWriteInFailedTransaction()
    start_with(monkeypatch, detector, state)
    metrics = detector.run()
    assert state.writes > 1 and state.rollbacks == 1  # the refused write ran, was undone, then written again
    assert producer.aborts == 1 and metrics.aborts == 1
    assert sorted(producer.committed_outputs) == every_input(log)  # each record once, nothing lost


def test_a_transaction_that_only_releases_held_records_sends_its_partitions_offsets(monkeypatch):
    """Without offsets, the group coordinator never checks such a transaction against the group's generation: a
    detector whose partitions were given away could still release rows their new owner restored (duplicates)."""
    decider = ReleasingDecider()
    detector, log, producers = make_detector(monkeypatch, records=2, decider=decider)
    start_with(monkeypatch, detector, QuietState())
    sent = []
    original = FakeProducer.send_offsets_to_transaction
    monkeypatch.setattr(
        FakeProducer,
        "send_offsets_to_transaction",
        lambda self, offsets, metadata, timeout: (sent.append(offsets), original(self, offsets, metadata, timeout)),
    )
    consume = FakeConsumer.consume
    monkeypatch.setattr(
        FakeConsumer,
        "consume",
        lambda self, n, timeout: (
            []
            if decider.released is False and log.committed[0] >= 2 and log.committed[1] >= 2
            else consume(self, n, timeout)
        ),
    )
    detector.run()
    assert decider.released and b"released" in producers[0].committed_outputs
    release_offsets = sent[-1]
    assert [(tp.partition, tp.offset) for tp in release_offsets] == [(1, 2)]  # as committed: the group checks it


def test_a_transactional_id_from_a_containers_host_name_is_warned_about(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    marker = tmp_path / ".dockerenv"
    plain = Settings(transactions_topic=TOPIC)
    assert detector_module.unstable_id_warning(plain, markers=(marker,)) is None  # not in a container
    marker.touch()
    warning = detector_module.unstable_id_warning(plain, markers=(marker,))
    assert warning is not None and "FRAUDSTREAM_TRANSACTIONAL_ID" in warning
    assert detector_module.unstable_id_warning(plain.replace(transactional_id="slot-0"), markers=(marker,)) is None


class OutageAfterStateDecider:
    """Fails the first batch as the stateful decider does when the registry stops answering after the batch
    changed state; then forwards everything."""

    def __init__(self) -> None:
        self.failed = False

    def decide_batch(self, messages):
        from fraudstream.consumer.stateful import StateTouchedError
        from fraudstream.errors import RegistryError

        if not self.failed:
            self.failed = True
            raise StateTouchedError(RegistryError("registry unreachable"), {0, 1})
        return DecidedBatch(len(messages), {})

    def release_due(self):
        return None


def test_a_batch_that_changed_state_before_a_registry_outage_is_undone_then_decided_again(monkeypatch):
    decider = OutageAfterStateDecider()
    detector, log, producers = make_detector(monkeypatch, decider=decider)
    state = QuietState()
    start_with(monkeypatch, detector, state)
    metrics = detector.run()
    assert decider.failed and state.rollbacks == 1  # undone in memory, then decided again as it stood
    assert metrics.registry_retries == 1 and state.commits >= 1
    assert sorted(producers[0].committed_outputs) == every_input(log)  # each record once


def test_a_transactional_call_stuck_for_good_is_recovered_in_the_process_with_a_new_producer(monkeypatch):
    """librdkafka after broker restarts: commit_transaction blocked minutes past its timeout. The producer is
    abandoned (never destroyed while its call is pending) and a new one under the same id fences it; the batch
    is read again from the committed offsets: nothing lost, nothing twice."""
    monkeypatch.setattr(checkpoint_module, "STUCK_CALL_GRACE_S", 0.3)
    detector, log, producers = make_detector(monkeypatch)
    release = threading.Event()
    commit = FakeProducer.commit_transaction
    calls = []

    def stuck_second_commit(self, timeout):
        calls.append(self)
        if self is producers[0] and len(calls) == 2:
            release.wait(30)  # blocked, as the real call was, until the test ends
            raise KafkaException(KafkaError(KafkaError._FENCED, fatal=True))
        return commit(self, timeout)

    monkeypatch.setattr(FakeProducer, "commit_transaction", stuck_second_commit)
    try:
        metrics = detector.run()
    finally:
        release.set()
    assert metrics.recoveries == 1 and len(producers) == 2 and len(detector.calls.abandoned) == 1
    # The stuck call's thread is a daemon: it never keeps the process from ending (an executor's would).
    call_threads = [t for t in threading.enumerate() if t.name.startswith("transactional-calls")]
    assert call_threads and all(t.daemon for t in call_threads)
    assert any("abandoning this producer" in line for line in detector.logs)
    outputs = producers[0].committed_outputs + producers[1].committed_outputs
    assert sorted(outputs) == every_input(log)  # the stuck batch read again, each record once


def test_offsets_refused_because_the_group_moved_on_are_waited_out_not_counted_as_failures(monkeypatch):
    """A member the group dropped (its membership expired while the process was stopped) gets ILLEGAL_GENERATION,
    then UNKNOWN_MEMBER_ID, for its offsets until the consumer rejoins: more refusals than the failures-in-a-row
    limit ended a detector in a soak. They are waited out (up to the outage limit), and everything lands once."""
    moved = {
        ("send_offsets", n): KafkaError(code, txn_requires_abort=True)
        for n, code in enumerate(
            [KafkaError.ILLEGAL_GENERATION] * FAILURES_IN_A_ROW_LIMIT + [KafkaError.UNKNOWN_MEMBER_ID] * 3, start=1
        )
    }
    detector, log, [producer] = make_detector(monkeypatch, fail=moved)
    real_wait = detector.stop.wait
    monkeypatch.setattr(detector.stop, "wait", lambda timeout=None: real_wait(0))
    metrics = detector.run()
    assert producer.aborts == FAILURES_IN_A_ROW_LIMIT + 3 and metrics.aborts == producer.aborts
    assert sorted(producer.committed_outputs) == every_input(log)  # each exactly once, nothing lost


def test_a_group_that_never_takes_the_member_back_ends_at_the_outage_limit(monkeypatch):
    moved = KafkaError(KafkaError.ILLEGAL_GENERATION, txn_requires_abort=True)
    detector, log, [producer] = make_detector(monkeypatch, fail={("send_offsets", "*"): moved})
    detector.settings = detector.settings.replace(broker_outage_limit_s=2.5)  # backoffs 0.2, 0.4, 0.8, 1.6 s
    with pytest.raises(KafkaUnavailable, match="did not rejoin its group within 2.5 s"):
        detector.run()
    assert producer.committed_outputs == [] and producer.aborts >= FAILURES_IN_A_ROW_LIMIT


def test_the_rules_topic_is_read_at_start_for_as_long_as_a_registry_outage_is_waited_out(monkeypatch):
    """Soak 3018: a detector starting during a registry kill read the rules topic (each record needs its writer
    schema) for 30 s, gave up, and was restarted from outside; the registry's outage limit is 240 s."""
    from fraudstream.consumer.rules_topic import RulesTopic

    asked = []
    monkeypatch.setattr(RulesTopic, "start", lambda self, *, seed_from=None, timeout_s=30.0: asked.append(timeout_s))
    for limit in (240, 5):
        Detector(Settings(transactions_topic=TOPIC, registry_outage_limit_s=limit))._rules_from_topic()
    assert asked == [240, detector_module.RULES_START_S]
