"""End-to-end latency of ours at fixed rates.

Our detector runs (exactly-once); our producer sends at a fixed rate, stamping each transaction's
event_time with the wall clock when it creates it; a read_committed consumer on the legit and
fraud topics takes now - event_time for every record as it becomes readable. One machine, one
clock. Before the timed phases, a warm-up proves the detector has joined its group and routes.

Each total is split in two by the output record's Kafka timestamp (CreateTime, stamped by the
detector's producer when it produces the record): creation -> the detector produces it (producer
batching, broker, the detector's batching and decoding), then produced -> readable (the rest of the
batch, the transaction's commit, the reader's fetch).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.harness import Contender, OutputCounter, RunFailed, unique
from benchmarks.producers import producer_argv, read_report
from fraudstream.registry import Registry
from fraudstream.schemas import load_schemas
from fraudstream.serde import Decoder
from fraudstream.settings import Settings

WARMUP_RATE = 500
WARMUP_COUNT = 500
ARRIVAL_TIMEOUT_S = 60.0


# Where the CDF is sampled for the chart: every percent, then the tail more finely.
CDF_FRACTIONS = tuple(i / 100 for i in range(100)) + (0.995, 0.999, 1.0)


@dataclass(frozen=True, slots=True)
class LatencyRun:
    rate_tps: int
    round: int
    achieved_tps: float
    records: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    created_to_produced_p50_ms: float
    created_to_produced_p99_ms: float
    produced_to_readable_p50_ms: float
    produced_to_readable_p99_ms: float
    cdf_ms: list[float]  # latency at each of CDF_FRACTIONS

    def to_json(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[max(0, math.ceil(fraction * len(sorted_values)) - 1)]


@dataclass(slots=True)
class Samples:
    """Per record: creation -> readable, and the split at the detector's produce."""

    total: list[float]
    to_produced: list[float]
    to_readable: list[float]

    def summary(self, rate: int, achieved: float, round_number: int) -> LatencyRun:
        total, first, second = sorted(self.total), sorted(self.to_produced), sorted(self.to_readable)
        return LatencyRun(
            rate_tps=rate,
            round=round_number,
            achieved_tps=round(achieved, 1),
            records=len(total),
            p50_ms=round(percentile(total, 0.50), 1),
            p99_ms=round(percentile(total, 0.99), 1),
            max_ms=round(total[-1], 1),
            created_to_produced_p50_ms=round(percentile(first, 0.50), 1),
            created_to_produced_p99_ms=round(percentile(first, 0.99), 1),
            produced_to_readable_p50_ms=round(percentile(second, 0.50), 1),
            produced_to_readable_p99_ms=round(percentile(second, 0.99), 1),
            cdf_ms=[round(percentile(total, f), 1) for f in CDF_FRACTIONS],
        )


class LatencyReader:
    """Reads the legit and fraud topics (read_committed) as records become readable."""

    def __init__(self, settings: Settings) -> None:
        self.counter = OutputCounter(settings, [settings.legit_topic, settings.fraud_topic])
        registry, schemas = Registry(settings), load_schemas(settings.schemas_dir)
        self.fraud_topic = settings.fraud_topic
        self.decode_legit = Decoder(registry, schemas.expanded["Transaction"]).decode
        self.decode_fraud = Decoder(registry, schemas.expanded["FraudAlert"]).decode

    def read_into(self, samples: Samples, since_ms: float) -> None:
        """Add the records readable now whose event_time is at or after since_ms."""
        messages = self.counter.poll(timeout_s=0.05)
        arrival_ms = time.time() * 1000
        for message in messages:
            if message.topic() == self.fraud_topic:
                event_time = self.decode_fraud(message.value())["transaction"]["event_time"]
            else:
                event_time = self.decode_legit(message.value())["event_time"]
            event_ms = event_time.timestamp() * 1000
            if event_ms < since_ms:
                continue
            produced_ms = message.timestamp()[1]
            samples.total.append(arrival_ms - event_ms)
            samples.to_produced.append(produced_ms - event_ms)
            samples.to_readable.append(arrival_ms - produced_ms)

    def close(self) -> None:
        self.counter.close()


def measure_latency(
    settings: Settings,
    *,
    rates: list[int],
    seconds: float,
    seed: int,
    log_dir: Path,
    rounds: int = 1,
    batch_max_records: int | None = None,
    batch_max_ms: int | None = None,
    profile_to: Path | None = None,
) -> tuple[list[LatencyRun], float]:
    """Latency runs at each rate, `rounds` times (rates alternating, so that background noise is
    shared), and the detector's peak RSS (MiB) over the whole time.

    profile_to: run the detector under pyinstrument and write its text report there (figures
    then include the profiler's overhead: not results).
    """
    from benchmarks.detectors import DetectorSpec, Topics

    spec = DetectorSpec("ours", "ours", "exactly-once", Topics.derived(settings))
    argv = spec.argv(settings, unique("bench-latency"), batch_max_records=batch_max_records, batch_max_ms=batch_max_ms)
    if profile_to is not None:
        argv[1:1] = ["-m", "pyinstrument", "--renderer", "text", "--no-color", "--outfile", str(profile_to)]
    reader = LatencyReader(settings)
    detector = Contender("latency-detector" + ("-profile" if profile_to else ""), argv, log_dir)
    try:
        _send_and_collect(
            reader,
            detector,
            producer_argv("ours", settings, count=WARMUP_COUNT, rate=WARMUP_RATE, seed=seed),
            log_dir=log_dir,
            name="latency-warmup",
        )
        runs = []
        for round_number in range(rounds):
            for rate in rates:
                argv = producer_argv("ours", settings, duration=seconds, rate=rate, seed=seed + rate + round_number)
                samples, report = _send_and_collect(
                    reader, detector, argv, log_dir=log_dir, name=f"latency-{rate}-round{round_number}"
                )
                runs.append(samples.summary(rate, report["sent"] / report["sending_s"], round_number))
    finally:
        reader.close()
        exited = detector.stop()
    return runs, round(exited.peak_rss_kib / 1024, 1)


def _send_and_collect(
    reader: LatencyReader, detector: Contender, producer_argv: list[str], *, log_dir: Path, name: str
) -> tuple[Samples, dict]:
    """Run our producer; collect the latency of each of its records until all have arrived."""
    since_ms = time.time() * 1000  # the producer process starts after this: every record it makes is newer
    producer = Contender(name, producer_argv, log_dir)
    samples = Samples([], [], [])
    report = None
    deadline = None
    while report is None or len(samples.total) < report["delivered"]:
        reader.read_into(samples, since_ms)
        if detector.poll() is not None:
            raise RunFailed(f"the detector exited with {detector.exited.exit_code}: {detector.log_tail(3)}")
        if report is None and producer.poll() is not None:
            if producer.exited.exit_code != 0:
                raise RunFailed(f"{name} producer exited with {producer.exited.exit_code}: {producer.log_tail(3)}")
            report = read_report(producer)
            deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
        if deadline is not None and time.monotonic() > deadline:
            raise RunFailed(
                f"{name}: {len(samples.total)} of {report['delivered']} records arrived "
                f"within {ARRIVAL_TIMEOUT_S:.0f}s of the producer's end"
            )
    return samples, report
