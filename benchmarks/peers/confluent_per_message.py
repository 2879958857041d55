"""Peer detector (2): the way confluent-kafka-python's examples write one.

As in examples/avro_consumer.py and examples/avro_producer.py: Consumer.poll(1.0) returns one
message at a time, AvroDeserializer decodes it, AvroSerializer encodes each output, then
Producer.produce + poll(0). At-least-once as the client's docs describe it: offsets are stored
after the output is produced and auto-committed in the background.

Written fairly: schemas are looked up once (auto.register.schemas off, as the client requires with
use.latest.version; the topic subject-name strategy set explicitly, since the client's default asks
the registry's /associations endpoint first), serialization contexts are built once, records stay
plain dicts (no extra object layer), and the producer batches like ours does.
Same rule as ours: amount_cents > threshold -> fraud topic (FraudAlert), else legit (Transaction).
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone

from confluent_kafka import Consumer, Producer
from confluent_kafka.error import SerializationError
from confluent_kafka.schema_registry import SchemaRegistryClient, topic_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from benchmarks.peers.common import detector_arguments, stop_requested
from fraudstream.kafka import produce_or_wait  # the full-queue wait only, the same for every contender

RULE_NAME = "large_amount"


def main(argv: list[str] | None = None) -> int:
    args = detector_arguments(__doc__.splitlines()[0], dlq=True).parse_args(argv)
    stopping = stop_requested()

    # A timeout, so that a registry that stops answering ends the run with an error instead of a hang.
    registry = SchemaRegistryClient({"url": args.schema_registry_url, "timeout": 30})
    # The examples hard-code the schema string; ours live in the registry, so take the registered text.
    reader_schema = registry.get_latest_version(f"{args.input_topic}-value").schema.schema_str
    legit_schema = registry.get_latest_version(f"{args.legit_topic}-value").schema.schema_str
    fraud_schema = registry.get_latest_version(f"{args.fraud_topic}-value").schema.schema_str
    # The topic strategy, stated: the client's default ("associated") asks the registry's
    # /associations endpoint first (Apicurio answers it with 404 before the client falls back).
    deserialize = AvroDeserializer(registry, reader_schema, conf={"subject.name.strategy": topic_subject_name_strategy})
    serializer_conf = {"auto.register.schemas": False, "subject.name.strategy": topic_subject_name_strategy}
    serialize_legit = AvroSerializer(registry, legit_schema, conf=serializer_conf)
    serialize_fraud = AvroSerializer(registry, fraud_schema, conf=serializer_conf)
    input_ctx = SerializationContext(args.input_topic, MessageField.VALUE)
    legit_ctx = SerializationContext(args.legit_topic, MessageField.VALUE)
    fraud_ctx = SerializationContext(args.fraud_topic, MessageField.VALUE)

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap_servers,
            "group.id": args.group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.offset.store": False,  # at-least-once: store an offset only once its output is produced
        }
    )
    # librdkafka's defaults already batch (linger.ms=5, batch.num.messages=10000); lz4 and acks=all as ours.
    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
        }
    )
    consumer.subscribe([args.input_topic])
    print(f"consuming {args.input_topic} -> {args.legit_topic} | {args.fraud_topic}", flush=True)

    def produce(topic: str, key, value, headers=None) -> None:
        produce_or_wait(producer, topic, value, key, wait_s=0.1, headers=headers)

    threshold = args.threshold_cents
    try:
        while not stopping:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error():
                print(f"consumer error: {msg.error()}", file=sys.stderr)
                continue
            try:
                transaction = deserialize(msg.value(), input_ctx)
            except SerializationError as exc:
                produce(args.dlq_topic, msg.key(), msg.value(), [("error.reason", str(exc).encode())])
            else:
                if transaction["amount_cents"] > threshold:
                    detected_at = datetime.now(timezone.utc)
                    alert = {"transaction": transaction, "rules": [RULE_NAME], "detected_at": detected_at}
                    produce(args.fraud_topic, msg.key(), serialize_fraud(alert, fraud_ctx))
                else:
                    produce(args.legit_topic, msg.key(), serialize_legit(transaction, legit_ctx))
            producer.poll(0)
            consumer.store_offsets(msg)
    finally:
        producer.flush(30)
        consumer.close()  # commits the stored offsets
    return 0


if __name__ == "__main__":
    sys.exit(main())
