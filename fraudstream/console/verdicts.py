"""An analyst's verdict as a Label on the labels topic, written with the project's own serializer.

The label names the alert's transaction, terminal and event time (so that the detector's per-terminal
features and `fraudstream train` use it exactly as they use the generator's labels, behind the same
event-time gate), the analyst (`labelled_by`), when (`labelled_at`) and `source = "analyst"`. It is keyed by
transaction id like every label, so all labels of a transaction are in one partition, in order: the latest
wins, the earlier ones stay on the topic (the history).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaException, Producer

from fraudstream.errors import FraudstreamError
from fraudstream.kafka import producer_config
from fraudstream.records import Label
from fraudstream.registry import Registry, current_ids
from fraudstream.schemas import load_schemas
from fraudstream.serde import make_encoder
from fraudstream.settings import Settings

ANALYST_SOURCE = "analyst"
FRAUD_SCENARIO = "analyst_fraud"  # the scenario of a "fraud" verdict: no generator scenario is known to an analyst
LEGIT_SCENARIO = "legit"  # as the generator names normal traffic
WRITE_TIMEOUT_S = 10.0


class VerdictNotWritten(FraudstreamError):
    """The label could not be written (Kafka unreachable): nothing was written."""


def verdict_label(alert: dict[str, Any], *, is_fraud: bool, analyst: str, at: datetime | None = None) -> Label:
    tx = alert["transaction"]
    return Label(
        transaction_id=tx["transaction_id"],
        is_fraud=is_fraud,
        scenario=FRAUD_SCENARIO if is_fraud else LEGIT_SCENARIO,
        terminal_id=tx["terminal_id"],
        event_time=datetime.fromtimestamp(tx["event_time"] / 1000, UTC),
        source=ANALYST_SOURCE,
        labelled_by=analyst,
        labelled_at=at or datetime.now(UTC),
    )


class VerdictWriter:
    def __init__(
        self, settings: Settings, registry: Registry | None = None, *, timeout_s: float = WRITE_TIMEOUT_S
    ) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._registry = registry or Registry(settings)
        self._encode: Callable[[dict[str, Any]], bytes] | None = None
        self._producer: Producer | None = None
        self.written = 0

    def write(self, label: Label) -> None:
        """Write one label and wait until the broker has it; VerdictNotWritten (nothing written) otherwise."""
        if self._encode is None:
            ids = current_ids(self.settings, self._registry)  # one clear line when the schemas are not registered
            self._encode = make_encoder(
                ids[self.settings.labels_topic], load_schemas(self.settings.schemas_dir).parsed["Label"]
            )
        if self._producer is None:
            self._producer = Producer(
                producer_config(
                    self.settings, **{"enable.idempotence": True, "message.timeout.ms": int(self.timeout_s * 1000)}
                )
            )
        failures: list[str] = []

        def delivered(error, _message) -> None:
            if error is not None:
                failures.append(error.str())

        try:
            self._producer.produce(
                self.settings.labels_topic,
                self._encode(label.to_dict()),
                label.transaction_id.encode(),
                on_delivery=delivered,
            )
        except (KafkaException, BufferError) as exc:
            raise VerdictNotWritten(f"the verdict was not written: {exc}") from exc
        left = self._producer.flush(self.timeout_s + 1)
        if left or failures:
            # message.timeout.ms has expired it (or will): the record is not on the topic and will not be.
            self._producer.purge()
            self._producer.flush(0)
            raise VerdictNotWritten(
                "the verdict was not written: Kafka did not take it within "
                f"{self.timeout_s:g} s ({failures[0] if failures else 'no answer'})"
            )
        self.written += 1

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(5)
