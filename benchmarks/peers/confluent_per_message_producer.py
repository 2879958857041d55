"""Peer producer: the way confluent-kafka-python's examples/avro_producer.py writes one.

Per record: AvroSerializer(obj, SerializationContext) with a to_dict hook, Producer.produce,
poll(0). It does the same job as ours: the same generated transactions (our seeded generator,
stamped with the wall clock in the same batches) to the input topic keyed by account, and each
label to the labels topic keyed by transaction id. Schemas are registered beforehand and looked
up once (auto.register.schemas off, topic subject-name strategy); librdkafka batches as ours does.
Prints one line for the harness: BENCH-REPORT {"sent", "delivered", "failed", "elapsed_s"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient, topic_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from fraudstream.kafka import produce_or_wait  # the full-queue wait only, the same for every contender
from fraudstream.producer.generator import (
    Generator,
)  # the data source only, so that both producers send the same records

GENERATOR_BATCH = 500  # as ours generates when unthrottled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--schema-registry-url", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--labels-topic", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    registry = SchemaRegistryClient({"url": args.schema_registry_url, "timeout": 30})  # fail, never hang
    conf = {"auto.register.schemas": False, "subject.name.strategy": topic_subject_name_strategy}
    serialize_tx = AvroSerializer(
        registry,
        registry.get_latest_version(f"{args.topic}-value").schema.schema_str,
        lambda tx, ctx: tx.to_dict(),
        conf,
    )
    serialize_label = AvroSerializer(
        registry,
        registry.get_latest_version(f"{args.labels_topic}-value").schema.schema_str,
        lambda label, ctx: label.to_dict(),
        conf,
    )
    tx_ctx = SerializationContext(args.topic, MessageField.VALUE)
    label_ctx = SerializationContext(args.labels_topic, MessageField.VALUE)
    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
        }
    )
    outcome = {"delivered": 0, "failed": 0}

    def delivery_report(err, msg) -> None:
        outcome["failed" if err is not None else "delivered"] += 1

    def produce(topic: str, key: bytes, value: bytes) -> None:
        produce_or_wait(producer, topic, value, key, wait_s=0.1, on_delivery=delivery_report)

    generator = Generator(args.seed)
    sent = 0
    started = time.perf_counter()
    while sent < args.count:
        now_ms = int(time.time() * 1000)
        for transaction, label in generator.next_batch(min(GENERATOR_BATCH, args.count - sent), now_ms):
            produce(args.topic, transaction.account_id.encode(), serialize_tx(transaction, tx_ctx))
            produce(args.labels_topic, label.transaction_id.encode(), serialize_label(label, label_ctx))
            producer.poll(0)
            sent += 1
    sending_s = time.perf_counter() - started
    producer.flush(60)
    elapsed = time.perf_counter() - started
    # Each transaction counts as delivered when both it and its label are.
    delivered = min(sent, outcome["delivered"] // 2)
    print(
        "BENCH-REPORT "
        + json.dumps(
            {
                "sent": sent,
                "delivered": delivered,
                "failed": sent - delivered,
                "sending_s": sending_s,
                "elapsed_s": elapsed,
            }
        ),
        flush=True,
    )
    return 0 if delivered == sent else 1


if __name__ == "__main__":
    sys.exit(main())
