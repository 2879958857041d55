"""The malformed records the demo slips into the input topic, to show the dead-letter path."""

from __future__ import annotations

from confluent_kafka import Producer

from fraudstream.demo.watcher import METADATA_TIMEOUT_S
from fraudstream.errors import KafkaUnavailable
from fraudstream.kafka import producer_config
from fraudstream.registry import Registry, current_ids
from fraudstream.serde import frame as confluent_frame
from fraudstream.settings import Settings

BAD_RECORD_EVERY_S = 10.0  # with --duration 0 there is no end to spread them over
UNREGISTERED_SCHEMA_ID = 2_000_000_000  # far above any id a registry hands out


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
            raise KafkaUnavailable(
                f"the demo's malformed records were not delivered to {self.settings.transactions_topic}"
            )
