"""`fraudstream demo`: the whole pipeline in one command, with a live view.

Starts the local stack unless the environment (or flags) point at a cluster, creates the topics,
registers the schemas, then runs `fraudstream produce` and N `fraudstream detect` processes side
by side as child processes. A read_committed consumer of its own follows every topic from where
it was when the demo began and builds the live view: throughput, legit / fraud / dead-letter
counts, detection against the generator's labels, the latest fraud alerts with the rules that
fired. On a terminal the view redraws in place (plain ANSI codes); otherwise it prints one plain
line every few seconds.

Stopping (after --duration, or at Ctrl-C / SIGTERM): stop the producer, wait (bounded) until the
detectors have routed every record produced, then SIGTERM the detectors, which commit or abort
their open batch and exit. The summary ends with one `summary: key=value ...` line for scripts,
and the `fraudstream inspect` commands to look further. The local stack is left running (the
inspect commands need it) unless --stop-stack is given and the demo started it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TextIO

from confluent_kafka import Consumer, IsolationLevel, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import OffsetSpec

from fraudstream import argtypes
from fraudstream.errors import ConfigError, FraudstreamError, KafkaUnavailable
from fraudstream.kafka import admin, consumer_config, ensure_topics, producer_config, wait_for_cluster
from fraudstream.records import FraudAlert, Label, Rule, Transaction
from fraudstream.registry import Registry, current_ids, register_all
from fraudstream.schemas import load_schemas
from fraudstream.serde import DecodeError, Decoder
from fraudstream.serde import frame as confluent_frame
from fraudstream.settings import ENV, Settings
from fraudstream.signals import stop_requests

DEFAULT_DURATION_S = 60.0
DEFAULT_RATE = 1_000
# Event time runs this many times faster than the wall clock (`produce --speedup`): an hour of event
# time per second. At 1,000/s over 5,000 accounts, each account pays every ~5 s of wall time, so
# every few hours of event time, as cards do; card-testing bursts and cloned-card sprees (seconds
# to minutes of event time) stay intact, and a 60 s demo covers 2.5 days with every scenario in it.
DEFAULT_SPEEDUP = 3_600.0
DEFAULT_DRAIN_TIMEOUT_S = 60.0
DEFAULT_PLAIN_INTERVAL_S = 5.0
DEFAULT_BAD_RECORDS = 3
BAD_RECORD_EVERY_S = 10.0  # with --duration 0 there is no end to spread them over
UNREGISTERED_SCHEMA_ID = 2_000_000_000  # far above any id a registry hands out
TTY_REDRAW_S = 0.5
CHILD_STOP_TIMEOUT_S = 30.0
FINAL_READ_TIMEOUT_S = 20.0
POLL_S = 0.2
LATEST_ALERTS = 5
RULE_CHANGES_SHOWN = 3  # the latest rules-topic records in the live view
RATE_WINDOW_S = 3.0
METADATA_TIMEOUT_S = 10.0
LIBRDKAFKA_LOGGER = "fraudstream.librdkafka"  # parent of the loggers fraudstream.kafka gives every client
VIEW_GROUP_ID = "fraudstream-demo-view"  # never joined nor committed: the view uses assign()

# Runs a fraudstream subcommand in a child that dies with the demo: PR_SET_PDEATHSIG (Linux) sends it
# SIGTERM if the demo itself is killed without cleaning up, so no detector is ever left orphaned.
CHILD_LAUNCHER = """\
import ctypes, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
from fraudstream.cli import main
sys.exit(main(sys.argv[1:]))
"""


class DemoFailed(FraudstreamError):
    """The demo ran but did not end the way it should (a child failed, or the counts do not add up)."""


# ---------------------------------------------------------------- options
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fraudstream.cli import add_connection_arguments
    from fraudstream.producer.cli import speedup

    parser.add_argument("--duration", type=argtypes.seconds, default=DEFAULT_DURATION_S, metavar="S",
                        help=f"seconds of traffic (default {DEFAULT_DURATION_S:.0f}; 0: until Ctrl-C)")
    parser.add_argument("--rate", type=argtypes.positive_int, default=DEFAULT_RATE, metavar="R",
                        help=f"transactions per second from the generator (default {DEFAULT_RATE})")
    parser.add_argument("--speedup", type=speedup, default=DEFAULT_SPEEDUP, metavar="N",
                        help=f"event time runs N times faster than the wall clock (default {DEFAULT_SPEEDUP:g}: "
                             "an hour per second, so each card pays every few hours)")
    parser.add_argument("--detectors", type=argtypes.positive_int, default=1, metavar="N",
                        help="detector processes in one consumer group, to show scaling out (default 1)")
    parser.add_argument("--seed", type=int, help="generator seed, for a repeatable run")
    parser.add_argument("--partitions", dest="partitions", type=argtypes.positive_int,
                        help="partitions of the topics when the demo creates them [FRAUDSTREAM_PARTITIONS, default 6]")
    parser.add_argument("--group-id", dest="group_id", help="the detectors' consumer group [FRAUDSTREAM_GROUP_ID]")
    parser.add_argument("--drain-timeout", type=argtypes.seconds, default=DEFAULT_DRAIN_TIMEOUT_S, metavar="S",
                        help="after the producer stops, wait at most this long for the detectors to route "
                             f"everything (default {DEFAULT_DRAIN_TIMEOUT_S:.0f})")
    parser.add_argument("--interval", type=argtypes.seconds, default=DEFAULT_PLAIN_INTERVAL_S, metavar="S",
                        help="seconds between progress lines when the output is not a terminal "
                             f"(default {DEFAULT_PLAIN_INTERVAL_S:.0f})")
    parser.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    parser.add_argument("--bad-records", type=argtypes.count, default=DEFAULT_BAD_RECORDS, metavar="N",
                        help="malformed records the demo slips into the input topic during the run, to show the "
                             f"dead-letter path (default {DEFAULT_BAD_RECORDS}; 0: none)")
    parser.add_argument("--log-dir", type=Path, metavar="DIR",
                        help="where the producer's and detectors' logs go (default: a new temporary folder)")
    parser.add_argument("--stop-stack", action="store_true",
                        help="stop the local stack at the end if the demo started it (default: leave it running "
                             "for the inspect commands)")
    add_connection_arguments(parser)


# ---------------------------------------------------------------- what the view knows (pure)
@dataclass(slots=True)
class PipelineCounts:
    produced: int = 0  # records appended to the input topic since the demo began
    backlog: int = 0  # input records the detectors' group had not processed when the demo began
    legit: int = 0
    fraud: int = 0
    dead_letter: int = 0

    @property
    def routed(self) -> int:
        return self.legit + self.fraud + self.dead_letter

    @property
    def expected(self) -> int:
        return self.backlog + self.produced

    @property
    def in_flight(self) -> int:
        return self.expected - self.routed

    @property
    def add_up(self) -> bool:
        return self.routed == self.expected


@dataclass(slots=True)
class DetectionScore:
    """The detectors' decisions joined with the generator's labels by transaction id.

    Either side may come first; a pair is scored once both are in, then forgotten.
    """

    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0
    true_negatives: int = 0
    caught_by_scenario: Counter[str] = field(default_factory=Counter)
    missed_by_scenario: Counter[str] = field(default_factory=Counter)
    # Which rule caught what: rule -> scenario of the transactions it fired on ("legit": false positives).
    by_rule: dict[str, Counter[str]] = field(default_factory=dict)
    _decisions: dict[str, tuple[str, ...]] = field(default_factory=dict)  # rules fired (empty: legit), awaiting a label
    _labels: dict[str, tuple[bool, str]] = field(default_factory=dict)  # (is_fraud, scenario), awaiting a decision
    _recent_verdicts: OrderedDict[str, bool] = field(default_factory=OrderedDict)  # flagged id -> truly fraud

    def decided(self, transaction_id: str, flagged: bool, rules: tuple[str, ...] = ()) -> None:
        """A routing decision; `rules`: the FraudAlert's rules (a flagged record without any counts as one rule, "?")."""
        fired = (tuple(rules) or ("?",)) if flagged else ()
        label = self._labels.pop(transaction_id, None)
        if label is None:
            self._decisions[transaction_id] = fired
        else:
            self._score(transaction_id, fired, *label)

    def labelled(self, transaction_id: str, is_fraud: bool, scenario: str) -> None:
        fired = self._decisions.pop(transaction_id, None)
        if fired is None:
            self._labels[transaction_id] = (is_fraud, scenario)
        else:
            self._score(transaction_id, fired, is_fraud, scenario)

    def _score(self, transaction_id: str, fired: tuple[str, ...], is_fraud: bool, scenario: str) -> None:
        for rule in fired:
            self.by_rule.setdefault(rule, Counter())[scenario] += 1
        if fired:
            if is_fraud:
                self.true_positives += 1
                self.caught_by_scenario[scenario] += 1
            else:
                self.false_positives += 1
            self._recent_verdicts[transaction_id] = is_fraud
            if len(self._recent_verdicts) > 100:  # only the latest alerts on screen need one
                self._recent_verdicts.popitem(last=False)
        elif is_fraud:
            self.false_negatives += 1
            self.missed_by_scenario[scenario] += 1
        else:
            self.true_negatives += 1

    def recall_by_scenario(self) -> dict[str, tuple[int, int]]:
        """Scenario -> (caught, frauds labelled), most frauds first."""
        totals = self.caught_by_scenario + self.missed_by_scenario
        return {name: (self.caught_by_scenario[name], total) for name, total in totals.most_common()}

    def verdict(self, transaction_id: str) -> bool | None:
        """For a recent alert: True if it really was fraud, False for a false positive, None: no label yet."""
        return self._recent_verdicts.get(transaction_id)

    @property
    def awaiting_labels(self) -> int:
        return len(self._decisions)

    @property
    def precision(self) -> float | None:
        flagged = self.true_positives + self.false_positives
        return self.true_positives / flagged if flagged else None

    @property
    def recall(self) -> float | None:
        frauds = self.true_positives + self.false_negatives
        return self.true_positives / frauds if frauds else None


@dataclass(frozen=True, slots=True)
class AlertLine:
    transaction_id: str
    account_id: str
    amount_cents: int
    currency: str
    channel: str
    country: str
    rules: tuple[str, ...]
    detected_at: datetime


class RateMeter:
    """Records per second over the last few seconds, from (time, total) samples."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, total: int) -> None:
        self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def per_second(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass(slots=True)
class DemoState:
    counts: PipelineCounts = field(default_factory=PipelineCounts)
    score: DetectionScore = field(default_factory=DetectionScore)
    latest_alerts: deque[AlertLine] = field(default_factory=lambda: deque(maxlen=LATEST_ALERTS))
    rules_fired: Counter[str] = field(default_factory=Counter)
    rule_changes: deque[str] = field(default_factory=lambda: deque(maxlen=RULE_CHANGES_SHOWN))
    undecodable_outputs: int = 0  # records on legit/fraud/labels the view could not read (should stay 0)
    traffic_started_at: float | None = None  # clock time of the first input record seen
    traffic_last_at: float | None = None

    def on_input(self, now: float) -> None:
        self.counts.produced += 1
        if self.traffic_started_at is None:
            self.traffic_started_at = now
        self.traffic_last_at = now

    @property
    def traffic_s(self) -> float:
        """From the first input record seen to the last: how long the generator really ran."""
        if self.traffic_started_at is None or self.traffic_last_at is None:
            return 0.0
        return self.traffic_last_at - self.traffic_started_at

    def on_legit(self, transaction: Transaction) -> None:
        self.counts.legit += 1
        self.score.decided(transaction.transaction_id, flagged=False)

    def on_fraud(self, alert: FraudAlert) -> None:
        self.counts.fraud += 1
        self.rules_fired.update(alert.rules)
        tx = alert.transaction
        self.latest_alerts.appendleft(AlertLine(tx.transaction_id, tx.account_id, tx.amount_cents, tx.currency,
                                                tx.channel, tx.country, alert.rules, alert.detected_at))
        self.score.decided(tx.transaction_id, flagged=True, rules=alert.rules)

    def on_dead_letter(self) -> None:
        self.counts.dead_letter += 1

    def on_label(self, label: Label) -> None:
        self.score.labelled(label.transaction_id, label.is_fraud, label.scenario)

    def on_rule(self, line: str) -> None:
        """A record on the rules topic: a rule changed (or was refused; detectors dead-letter those)."""
        self.rule_changes.appendleft(f"{datetime.now():%H:%M:%S}  {line}")


def malformed_record(index: int, transaction_schema_id: int) -> tuple[bytes, bytes]:
    """(key, value) of the index-th bad record: each kind of damage the detector must dead-letter."""
    key = f"demo-malformed-{index}".encode()
    kind = index % 3
    if kind == 0:  # JSON where Avro was expected: no Confluent magic byte
        return key, b'{"transaction_id": "demo-malformed", "amount_cents": 125000}'
    if kind == 1:  # framed, but with a schema id the registry does not know
        return key, confluent_frame(UNREGISTERED_SCHEMA_ID) + b"\x02\x04"
    return key, confluent_frame(transaction_schema_id) + b"\x48truncated"  # the right schema, a cut-off body


def bad_record_times(count: int, duration_s: float) -> list[float]:
    """Seconds into the run at which to write each bad record: spread over the traffic."""
    if duration_s > 0:
        return [duration_s * (i + 1) / (count + 1) for i in range(count)]
    return [BAD_RECORD_EVERY_S * (i + 1) for i in range(count)]


# ---------------------------------------------------------------- rendering (pure)
@dataclass(frozen=True, slots=True)
class Frame:
    """Everything one view refresh shows."""

    topic: str
    detectors: int
    rate: int
    duration_s: float
    elapsed_s: float
    phase: str
    state: DemoState
    in_per_s: float
    out_per_s: float


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _money(cents: int, currency: str) -> str:
    return f"{cents / 100:,.2f} {currency}"


def plain_line(frame: Frame) -> str:
    """One self-contained progress line (not a terminal: logs, CI, pipes)."""
    c, s = frame.state.counts, frame.state.score
    return (f"[{frame.elapsed_s:6.1f}s] {frame.phase}: produced={c.produced} ({frame.in_per_s:.0f}/s) "
            f"legit={c.legit} fraud={c.fraud} dead_letter={c.dead_letter} in_flight={c.in_flight} "
            f"true_positives={s.true_positives} false_positives={s.false_positives} "
            f"false_negatives={s.false_negatives}")


def panel_lines(frame: Frame) -> list[str]:
    """The live panel, one string per screen line (no colour; the view adds it)."""
    c, s = frame.state.counts, frame.state.score
    traffic = "until Ctrl-C" if frame.duration_s == 0 else f"for {frame.duration_s:g}s"
    until = f"{frame.elapsed_s:5.1f}s (traffic {traffic})"
    detectors = f"{frame.detectors} detector{'s' if frame.detectors > 1 else ''}"
    lines = [
        f"fraudstream demo  topic {frame.topic}  {detectors}  {frame.rate}/s  {until}  [{frame.phase}]",
        f"  transactions  produced {c.produced:,}  in {frame.in_per_s:,.0f}/s   routed {c.routed:,}  "
        f"out {frame.out_per_s:,.0f}/s   in flight {c.in_flight:,}"
        + (f" (incl. {c.backlog:,} from before)" if c.backlog else ""),
        f"  routed        legit {c.legit:,} ({_pct(c.legit, c.routed)})   fraud {c.fraud:,} ({_pct(c.fraud, c.routed)})   "
        f"dead-letter {c.dead_letter:,} ({_pct(c.dead_letter, c.routed)})",
        f"  vs labels     true positives {s.true_positives:,}   false positives {s.false_positives:,}   "
        f"missed frauds {s.false_negatives:,}   precision {_ratio(s.precision)}   recall {_ratio(s.recall)}"
        + (f"   (awaiting labels {s.awaiting_labels:,})" if s.awaiting_labels else ""),
        "  latest fraud alerts" + ("" if frame.state.latest_alerts else "  (none yet)"),
    ]
    for alert in frame.state.latest_alerts:
        verdict = s.verdict(alert.transaction_id)
        truth = "label pending" if verdict is None else "fraud (labelled)" if verdict else "FALSE POSITIVE"
        lines.append(f"    {alert.detected_at:%H:%M:%S}  {alert.account_id:<14} {_money(alert.amount_cents, alert.currency):>14}  "
                     f"{alert.channel:<12} {alert.country:<3} rules: {', '.join(alert.rules):<28} {truth}")
    if frame.state.rule_changes:
        lines.append("  rule changes (fraudstream rules)")
        lines += [f"    {line}" for line in frame.state.rule_changes]
    if frame.phase == "producing":
        lines.append("  Ctrl-C: stop the producer, let the detectors finish, print a summary")
    return lines


class LiveView:
    """A panel redrawn in place on a terminal; one plain line every `interval_s` anywhere else."""

    def __init__(self, out: TextIO, *, interactive: bool, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.interactive = interactive
        self.interval_s = interval_s if not interactive else TTY_REDRAW_S
        self.clock = clock
        self._last_draw: float | None = None
        self._drawn_lines = 0

    @staticmethod
    def is_terminal(out: TextIO) -> bool:
        return out.isatty() and os.environ.get("TERM", "") != "dumb"

    def update(self, frame: Frame, *, force: bool = False) -> None:
        now = self.clock()
        if not force and self._last_draw is not None and now - self._last_draw < self.interval_s:
            return
        self._last_draw = now
        if self.interactive:
            self._redraw(panel_lines(frame))
        else:
            self.out.write(plain_line(frame) + "\n")
        self.out.flush()

    def _redraw(self, lines: list[str]) -> None:
        width = max(20, shutil.get_terminal_size((120, 24)).columns - 1)
        parts = []
        if self._drawn_lines:
            parts.append(f"\x1b[{self._drawn_lines}F")  # back to the first line of the previous panel
        else:
            parts.append("\x1b[?25l")  # hide the cursor while redrawing
        for index, line in enumerate(lines):
            text = line[:width]  # a wrapped line would break the cursor arithmetic
            parts.append(f"\x1b[1m{text}\x1b[0m" if index == 0 else text)
            parts.append("\x1b[K\n")
        parts.append("\x1b[J")  # clear what a longer previous panel left below
        self.out.write("".join(parts))
        self._drawn_lines = len(lines)

    def close(self) -> None:
        if self.interactive and self._drawn_lines:
            self.out.write("\x1b[?25h")
            self.out.flush()


# ---------------------------------------------------------------- the view's consumer
Position = tuple[str, int]


def rule_line(decoder: Decoder, value: bytes | None) -> str:
    """One rules-topic record for the view (detectors judge its validity; the view only shows it)."""
    if value is None:
        return "a rule was removed"
    try:
        rule = Rule.from_dict(decoder.decode(value))
    except DecodeError as error:
        return f"unreadable rule record ({error.reason})"
    parameters = " ".join(f"{k}={v}" for k, v in sorted(rule.parameters.items()) if not isinstance(v, tuple))
    return (f"{rule.id} v{rule.version} {'enabled' if rule.enabled else 'disabled'} {parameters}".rstrip()
            + f"  by {rule.author}" + (f": {rule.comment}" if rule.comment else ""))


class PipelineWatcher:
    """Follows the input, output and label topics from their ends at start, feeding a DemoState."""

    def __init__(self, settings: Settings, state: DemoState) -> None:
        self.settings = settings
        self.state = state
        schemas = load_schemas(settings.schemas_dir)
        registry = Registry(settings)
        transactions = Decoder(registry, schemas.expanded["Transaction"])
        alerts = Decoder(registry, schemas.expanded["FraudAlert"])
        labels = Decoder(registry, schemas.expanded["Label"])
        rules = Decoder(registry, schemas.expanded["Rule"])
        self.handlers: dict[str, Callable[[bytes | None], None]] = {
            settings.transactions_topic: lambda value: state.on_input(time.monotonic()),
            settings.legit_topic: lambda value: state.on_legit(Transaction.from_dict(transactions.decode(value))),
            settings.fraud_topic: lambda value: state.on_fraud(FraudAlert.from_dict(alerts.decode(value))),
            settings.dlq_topic: lambda value: state.on_dead_letter(),
            settings.labels_topic: lambda value: state.on_label(Label.from_dict(labels.decode(value))),
            settings.rules_topic: lambda value: state.on_rule(rule_line(rules, value)),
        }
        self.admin = admin(settings)
        self.consumer = Consumer(consumer_config(settings, VIEW_GROUP_ID, **{
            "isolation.level": "read_committed",
            "enable.partition.eof": True,  # tells when a partition is read up to its last stable offset
        }))
        self.partitions = self._partitions()
        self.start = self.end_offsets()
        self.position: dict[Position, int] = dict(self.start)
        self.consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in self.start.items()])

    def _partitions(self) -> list[Position]:
        try:
            metadata = self.consumer.list_topics(timeout=METADATA_TIMEOUT_S)
        except KafkaException as exc:
            raise KafkaUnavailable(f"Kafka did not answer a metadata request: {exc.args[0].str()}") from exc
        missing = [topic for topic in self.handlers if topic not in metadata.topics]
        if missing:
            raise KafkaUnavailable(f"topic {missing[0]} is not in the cluster's metadata")
        return [(topic, p) for topic in self.handlers for p in sorted(metadata.topics[topic].partitions)]

    def end_offsets(self, topics: Sequence[str] | None = None) -> dict[Position, int]:
        """Last stable offsets: where a read_committed reader's partitions end now."""
        return self._list_offsets([(t, p) for t, p in self.partitions if topics is None or t in topics],
                                  OffsetSpec.latest())

    def _list_offsets(self, partitions: list[Position], spec: OffsetSpec) -> dict[Position, int]:
        # The admin client, in one request, not the view's consumer: its broker connection is busy with
        # fetch long-polls, which would delay each watermark query by up to fetch.wait.max.ms.
        try:
            futures = self.admin.list_offsets({TopicPartition(t, p): spec for t, p in partitions},
                                              isolation_level=IsolationLevel.READ_COMMITTED,
                                              request_timeout=METADATA_TIMEOUT_S)
            return {(tp.topic, tp.partition): future.result().offset for tp, future in futures.items()}
        except KafkaException as exc:
            raise KafkaUnavailable(f"could not list the offsets of {len(partitions)} partitions: "
                                   f"{exc.args[0].str()}") from exc

    def backlog(self, group_id: str) -> int:
        """Input records the group has not processed yet: the detectors will route them too."""
        topic = self.settings.transactions_topic
        inputs = [(t, p) for t, p in self.partitions if t == topic]
        earliest = self._list_offsets(inputs, OffsetSpec.earliest())
        group = Consumer(consumer_config(self.settings, group_id))
        try:
            committed = group.committed([TopicPartition(t, p) for t, p in inputs], timeout=METADATA_TIMEOUT_S)
        except KafkaException as exc:
            raise KafkaUnavailable(f"could not read the committed offsets of group {group_id}: "
                                   f"{exc.args[0].str()}") from exc
        finally:
            group.close()
        backlog = 0
        for tp in committed:
            where = (tp.topic, tp.partition)
            start = tp.offset if tp.offset >= 0 else earliest[where]  # no commit yet: the group starts at the earliest
            backlog += max(0, self.start[where] - start)
        return backlog

    def poll(self, timeout_s: float) -> None:
        for message in self.consumer.consume(num_messages=2_000, timeout=timeout_s):
            error = message.error()
            where = (message.topic(), message.partition())
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self.position[where] = max(self.position[where], message.offset())
                elif error.fatal():
                    raise KafkaUnavailable(f"the view's consumer failed: {error.str()}")
                continue
            self.position[where] = message.offset() + 1
            try:
                self.handlers[message.topic()](message.value())
            except DecodeError:
                self.state.undecodable_outputs += 1

    def caught_up(self, ends: dict[Position, int]) -> bool:
        return all(self.position[where] >= end for where, end in ends.items())

    def close(self) -> None:
        self.consumer.close()


class BadRecordWriter:
    """Writes the demo's malformed records into the input topic on schedule (plain idempotent producer)."""

    def __init__(self, settings: Settings, count: int, duration_s: float) -> None:
        self.settings = settings
        self.due = bad_record_times(count, duration_s)
        self.written = 0
        self.producer: Producer | None = None
        self.transaction_schema_id = 0
        if count > 0:
            ids = current_ids(settings, Registry(settings))
            self.transaction_schema_id = ids[settings.transactions_topic]
            self.producer = Producer(producer_config(settings))

    def write_due(self, elapsed_s: float) -> None:
        while self.producer is not None and self.written < len(self.due) and self.due[self.written] <= elapsed_s:
            key, value = malformed_record(self.written, self.transaction_schema_id)
            self.producer.produce(self.settings.transactions_topic, value, key)
            self.producer.poll(0)
            self.written += 1

    def close(self) -> None:
        if self.producer is not None and self.producer.flush(METADATA_TIMEOUT_S):
            raise KafkaUnavailable(f"the demo's malformed records were not delivered to {self.settings.transactions_topic}")


# ---------------------------------------------------------------- child processes
@dataclass(slots=True)
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stop_sent_at: float | None = None

    @property
    def exit_code(self) -> int | None:
        return self.process.poll()

    def stop(self) -> None:
        """SIGTERM once: the commands stop cleanly on it (flush, commit or abort the open batch)."""
        if self.stop_sent_at is None and self.exit_code is None:
            self.process.send_signal(signal.SIGTERM)
            self.stop_sent_at = time.monotonic()

    def kill_if_overdue(self, timeout_s: float) -> bool:
        if self.exit_code is None and self.stop_sent_at is not None and time.monotonic() - self.stop_sent_at > timeout_s:
            self.process.kill()
            self.process.wait()
            return True
        return False

    def stopped_cleanly(self) -> bool:
        """Exit 0, or killed by the SIGTERM we sent (a command without its own handler)."""
        return self.exit_code == 0 or (self.stop_sent_at is not None and self.exit_code == -signal.SIGTERM)

    def last_log_line(self) -> str:
        try:
            lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "(no log)"
        errors = [ln for ln in lines if "error" in ln.lower()]
        return (errors or lines or ["(empty log)"])[-1][:300]

    def failure(self) -> str:
        return f"{self.name} exited with status {self.exit_code}: {self.last_log_line()} (log: {self.log_path})"


def start_child(name: str, command: list[str], log_dir: Path) -> Child:
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD_LAUNCHER, *command], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Own process group: the terminal's Ctrl-C reaches the demo only, which stops children in order.
            process_group=0)
    return Child(name, process, log_path)


# ---------------------------------------------------------------- the run
@dataclass(frozen=True, slots=True)
class Cluster:
    settings: Settings
    started_stack: bool


def connect(settings: Settings, args: argparse.Namespace, log: Callable[[str], None]) -> Cluster:
    """The cluster the environment or flags name; else the local stack, started if needed."""
    defaults = Settings()
    given = (args.bootstrap_servers or args.schema_registry_url
             or os.environ.get(ENV["bootstrap_servers"]) or os.environ.get(ENV["schema_registry_url"])
             # named by a client properties file or flag
             or settings.bootstrap_servers != defaults.bootstrap_servers
             or settings.schema_registry_url != defaults.schema_registry_url)
    if given:
        wait_for_cluster(settings)
        return Cluster(settings, started_stack=False)
    from fraudstream.stack import LocalStack

    stack = LocalStack(settings, log=log)
    was_running = stack.status().running
    status = stack.up()
    return Cluster(settings.replace(bootstrap_servers=status.bootstrap_servers, schema_registry_url=status.registry_url),
                   started_stack=not was_running)


def connection_flags(settings: Settings) -> list[str]:
    from fraudstream.cli import client_flags

    return ["--bootstrap-servers", settings.bootstrap_servers, "--schema-registry-url", settings.schema_registry_url,
            *client_flags(settings)]


def detector_command(settings: Settings, index: int) -> list[str]:
    # One transactional id per detector process: a shared one would fence the others (KIP-447 still
    # needs ids to be unique among live producers). Stable across runs, so a restart aborts what a
    # killed predecessor left open.
    return ["detect", "--topic", settings.transactions_topic, "--group-id", settings.group_id,
            "--transactional-id", f"{settings.group_id}.{settings.transactions_topic}.demo-{index}",
            *connection_flags(settings)]


def producer_command(settings: Settings, args: argparse.Namespace) -> list[str]:
    command = ["produce", "--topic", settings.transactions_topic, "--rate", str(args.rate),
               "--speedup", f"{args.speedup:g}", "--quiet", *connection_flags(settings)]
    if args.duration > 0:
        command += ["--duration", f"{args.duration:g}"]
    if args.seed is not None:
        command += ["--seed", str(args.seed)]
    return command


class Demo:
    def __init__(self, settings: Settings, args: argparse.Namespace, out: TextIO) -> None:
        self.settings = settings
        self.args = args
        self.out = out
        self.state = DemoState()
        interactive = not args.plain and LiveView.is_terminal(out)
        self.view = LiveView(out, interactive=interactive, interval_s=args.interval)
        self.in_rate = RateMeter()
        self.out_rate = RateMeter()
        self.began = time.monotonic()
        self.phase = "starting"
        self.problems: list[str] = []
        self.bad_records_written = 0

    def frame(self) -> Frame:
        now = time.monotonic()
        counts = self.state.counts
        self.in_rate.add(now, counts.produced)
        self.out_rate.add(now, counts.routed)
        return Frame(topic=self.settings.transactions_topic, detectors=self.args.detectors, rate=self.args.rate,
                     duration_s=self.args.duration, elapsed_s=now - self.began, phase=self.phase, state=self.state,
                     in_per_s=self.in_rate.per_second(), out_per_s=self.out_rate.per_second())

    def run(self, watcher: PipelineWatcher, log_dir: Path) -> None:
        detectors = [start_child(f"detector-{i}", detector_command(self.settings, i), log_dir)
                     for i in range(self.args.detectors)]
        producer = start_child("producer", producer_command(self.settings, self.args), log_dir)
        children = [producer, *detectors]
        for child in children:
            print(f"started {child.name} (pid {child.process.pid}), log {child.log_path}", file=self.out)
        self.out.flush()
        try:
            with stop_requests() as (stop, now):
                self._produce(watcher, producer, detectors, stop, now)
                if not self.problems:
                    self._drain(watcher, detectors, now)
                self._stop_all(watcher, detectors, now)
        finally:
            for child in children:  # whatever happened above, nothing we started outlives the demo
                if child.exit_code is None:
                    child.process.kill()
                    child.process.wait()
        self._final_read(watcher)
        for child in children:
            if not child.stopped_cleanly() and child.failure() not in self.problems:
                self.problems.append(child.failure())

    def _tick(self, watcher: PipelineWatcher) -> None:
        watcher.poll(POLL_S)
        self.view.update(self.frame())

    def _produce(self, watcher: PipelineWatcher, producer: Child, detectors: list[Child], stop: threading.Event,
                 now: threading.Event) -> None:
        self.phase = "producing"
        saboteur = BadRecordWriter(self.settings, self.args.bad_records, self.args.duration)
        try:
            self._produce_until_done(watcher, producer, detectors, stop, now, saboteur)
            if not stop.is_set() and not self.problems:
                saboteur.write_due(float("inf"))  # the generator finished early: the rest go now
        finally:
            saboteur.close()
            self.bad_records_written = saboteur.written

    def _produce_until_done(self, watcher: PipelineWatcher, producer: Child, detectors: list[Child],
                            stop: threading.Event, now: threading.Event, saboteur: BadRecordWriter) -> None:
        while producer.exit_code is None:
            self._tick(watcher)
            started = self.state.traffic_started_at
            if started is not None and not stop.is_set():  # spread over the traffic, once the generator is up
                saboteur.write_due(time.monotonic() - started)
            if stop.is_set():
                self.phase = "stopping the producer"
                producer.stop()
                if now.is_set():
                    producer.process.kill()
                producer.kill_if_overdue(CHILD_STOP_TIMEOUT_S)
            dead = [d for d in detectors if d.exit_code is not None]
            if dead:
                self.problems.append(dead[0].failure())
                producer.stop()
                return
        if not producer.stopped_cleanly():
            self.problems.append(producer.failure())

    def _drain(self, watcher: PipelineWatcher, detectors: list[Child], now: threading.Event) -> None:
        """Wait until every record produced is routed: then the counts add up when the detectors stop."""
        input_end = watcher.end_offsets([self.settings.transactions_topic])  # the producer is done: final
        deadline = time.monotonic() + self.args.drain_timeout
        counts = self.state.counts
        while True:
            self.phase = f"draining: {max(counts.in_flight, 0):,} records still in flight"
            self._tick(watcher)
            if watcher.caught_up(input_end) and counts.routed >= counts.expected:
                return
            if now.is_set():
                self.problems.append(f"stopped at once by a second Ctrl-C with {counts.in_flight:,} records in flight")
                return
            dead = [d for d in detectors if d.exit_code is not None]
            if dead:
                self.problems.append(dead[0].failure())
                return
            if time.monotonic() > deadline:
                self.problems.append(f"the detectors did not route {counts.in_flight:,} records within "
                                     f"{self.args.drain_timeout:.0f}s (see their logs)")
                return

    def _stop_all(self, watcher: PipelineWatcher, detectors: list[Child], now: threading.Event) -> None:
        self.phase = "stopping the detectors"
        for detector in detectors:
            detector.stop()
        while any(d.exit_code is None for d in detectors):
            self._tick(watcher)
            for detector in detectors:
                if now.is_set():
                    detector.process.kill()
                elif detector.kill_if_overdue(CHILD_STOP_TIMEOUT_S):
                    self.problems.append(f"{detector.name} did not stop within {CHILD_STOP_TIMEOUT_S:.0f}s of "
                                         "SIGTERM and was killed")

    def _final_read(self, watcher: PipelineWatcher) -> None:
        """Everything the children committed is in the counts before the summary."""
        self.phase = "done"
        ends = watcher.end_offsets()
        deadline = time.monotonic() + FINAL_READ_TIMEOUT_S
        while not watcher.caught_up(ends) and time.monotonic() < deadline:
            watcher.poll(POLL_S)
        self.view.update(self.frame(), force=True)
        self.view.close()


# ---------------------------------------------------------------- summary
def summary_lines(frame: Frame, settings: Settings, *, extra_flags: list[str], log_dir: Path,
                  stack_left_running: bool, bad_records: int = 0) -> list[str]:
    c, s = frame.state.counts, frame.state.score
    topic = settings.transactions_topic
    traffic_s = frame.state.traffic_s
    per_s = f" ({c.produced / traffic_s:,.0f}/s)" if traffic_s > 0 else ""
    detectors = f"{frame.detectors} detector{'s' if frame.detectors > 1 else ''}"
    malformed = f", {bad_records} of them malformed on purpose" if bad_records else ""
    lines = [
        "",
        f"fraudstream demo: {c.produced:,} records in {traffic_s:.1f}s of traffic{per_s}{malformed}, "
        f"{frame.elapsed_s:.1f}s in all; topic {topic}, {detectors}",
        f"  legit        {c.legit:>10,}   -> {settings.legit_topic}",
        f"  fraud        {c.fraud:>10,}   -> {settings.fraud_topic}",
        f"  dead-letter  {c.dead_letter:>10,}   -> {settings.dlq_topic}",
    ]
    before = f" + {c.backlog:,} left from earlier runs" if c.backlog else ""
    relation = "=" if c.add_up else "!="
    lines.append(f"  produced {c.produced:,}{before} {relation} legit {c.legit:,} + fraud {c.fraud:,} "
                 f"+ dead-letter {c.dead_letter:,}" + ("" if c.add_up else "   <- counts do NOT add up"))
    lines.append(f"  detection vs labels: {s.true_positives:,} true positives, {s.false_positives:,} false positives, "
                 f"{s.false_negatives:,} missed frauds, {s.true_negatives:,} true negatives; "
                 f"precision {_ratio(s.precision)}, recall {_ratio(s.recall)}")
    if s.missed_by_scenario:
        missed = ", ".join(f"{name} {n:,}" for name, n in s.missed_by_scenario.most_common())
        lines.append(f"  missed frauds by scenario: {missed}")
    lines += scenario_lines(s)
    if frame.state.undecodable_outputs:
        lines.append(f"  {frame.state.undecodable_outputs:,} output or label records could not be decoded by the view")
    if frame.state.rules_fired:
        lines.append("  rules fired: " + ", ".join(f"{name} {n:,}" for name, n in frame.state.rules_fired.most_common()))
    flags = (" " + " ".join(extra_flags)) if extra_flags else ""
    lines += [
        "",
        "look further (read_committed, like kafka-avro-console-consumer; add --follow to keep watching):",
        f"  fraudstream inspect {settings.fraud_topic} --from-beginning --max-messages 5{flags}",
        f"  fraudstream inspect {settings.dlq_topic} --from-beginning --max-messages 5{flags}",
        f"  fraudstream inspect {settings.legit_topic} --from-beginning --max-messages 5 --print-key --print-metadata{flags}",
        f"  fraudstream inspect {settings.labels_topic} --from-beginning --max-messages 5{flags}",
        f"  fraudstream inspect {settings.fraud_topic} --from-beginning{flags} | jq -r '.rules[]' | sort | uniq -c",
        f"producer and detector logs: {log_dir}",
    ]
    if stack_left_running:
        lines.append("the local stack is still running: `fraudstream stack down` stops it")
    lines.append(" ".join([
        "summary:", f"topic={topic}", f"produced={c.produced}", f"backlog={c.backlog}", f"legit={c.legit}",
        f"fraud={c.fraud}", f"dead_letter={c.dead_letter}", f"in_flight={c.in_flight}",
        f"true_positives={s.true_positives}", f"false_positives={s.false_positives}",
        f"false_negatives={s.false_negatives}", f"true_negatives={s.true_negatives}",
        f"bad_records={bad_records}", f"traffic_s={traffic_s:.1f}", f"elapsed_s={frame.elapsed_s:.1f}",
        f"counts_add_up={'yes' if c.add_up else 'no'}",
        *(f"recall_{name}={caught / total:.4f}" for name, (caught, total) in sorted(s.recall_by_scenario().items())),
    ]))
    return lines


def scenario_lines(score: DetectionScore) -> list[str]:
    """Recall per fraud scenario, and which rule caught what (from the labels and FraudAlert.rules)."""
    recalls = score.recall_by_scenario()
    if not recalls and not score.by_rule:
        return []
    lines = ["  recall by scenario:"]
    for name, (caught, total) in recalls.items():
        lines.append(f"    {name:<22} {_pct(caught, total):>6}  ({caught:,} of {total:,} caught)")
    if score.by_rule:
        lines.append("  which rule caught what (a transaction may fire several rules):")
        for rule, counts in sorted(score.by_rule.items()):
            caught = ", ".join(f"{name} {n:,}" for name, n in counts.most_common() if name != "legit") or "no fraud"
            lines.append(f"    {rule:<22} {caught}; false positives {counts['legit']:,}")
    return lines


def _inspect_flags(settings: Settings) -> list[str]:
    """Connection flags the printed inspect commands need: none when the environment already gives the same."""
    plain = Settings.from_env()
    flags = []
    if settings.bootstrap_servers != plain.bootstrap_servers:
        flags += ["--bootstrap-servers", settings.bootstrap_servers]
    if settings.schema_registry_url != plain.schema_registry_url:
        flags += ["--schema-registry-url", settings.registry_url_display]
    from fraudstream.cli import client_flags
    from fraudstream.client_config import REDACTED, is_secret

    given = client_flags(settings)
    if given != client_flags(plain):  # client properties from flags: the printed commands need them too
        flags += [f"{item.split('=', 1)[0]}={REDACTED}" if "=" in item and is_secret(item.split("=", 1)[0]) else item
                  for item in given]
    return flags


def run(args: argparse.Namespace, settings: Settings, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    # librdkafka logs every reconnect attempt; a lost broker shows as our own one-line error instead.
    logging.getLogger(LIBRDKAFKA_LOGGER).setLevel(logging.CRITICAL)
    def log(line: str) -> None:
        print(line, file=out, flush=True)

    cluster = connect(settings, args, log)
    settings = cluster.settings
    ensure_topics(settings)
    for subject, schema_id in register_all(settings).items():
        log(f"schema {subject} registered (id {schema_id})")
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="fraudstream-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    demo = Demo(settings, args, out)
    watcher = PipelineWatcher(settings, demo.state)
    try:
        partitions = sum(1 for topic, _ in watcher.partitions if topic == settings.transactions_topic)
        if args.detectors > partitions:  # checked against the topic as it is: it may predate --partitions
            raise ConfigError(f"--detectors {args.detectors} is more than the {partitions} partitions of "
                              f"{settings.transactions_topic}: the extra detectors would sit idle")
        demo.state.counts.backlog = watcher.backlog(settings.group_id)
        demo.run(watcher, log_dir)
    finally:
        watcher.close()
    frame = demo.frame()
    stop_stack = args.stop_stack and cluster.started_stack
    for line in summary_lines(frame, settings, extra_flags=_inspect_flags(settings), log_dir=log_dir,
                              stack_left_running=cluster.started_stack and not stop_stack,
                              bad_records=demo.bad_records_written):
        print(line, file=out)
    out.flush()
    if stop_stack:
        from fraudstream.stack import LocalStack

        LocalStack(settings, log=log).down()
    counts = frame.state.counts
    if demo.problems:
        raise DemoFailed("; ".join(demo.problems))
    if not counts.add_up:
        raise DemoFailed(f"counts do not add up: {counts.expected:,} to route, {counts.routed:,} routed")
    return 0
