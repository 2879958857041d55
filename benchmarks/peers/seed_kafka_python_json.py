"""Peer detector (3): the seed's way (kafka-fraud-detector's detector/app.py), kafka-python with JSON.

`for message in consumer`, json.loads per message, the rule, producer.send per message to the
legit or fraud topic, JSON values. Offsets are auto-committed (kafka-python's default).
The only changes from the seed: topics and group from flags, the seed's rule on integer cents,
linger_ms=5 (kafka-python's docs: >0 batches sends and raises throughput), a clean stop on SIGTERM.
"""

from __future__ import annotations

import json
import sys

from kafka import KafkaConsumer, KafkaProducer

from benchmarks.peers.common import detector_arguments, stop_requested


def main(argv: list[str] | None = None) -> int:
    args = detector_arguments(__doc__.splitlines()[0], registry=False).parse_args(argv)
    stopping = stop_requested()

    def is_suspicious(transaction: dict) -> bool:
        return transaction["amount_cents"] > args.threshold_cents

    consumer = KafkaConsumer(
        args.input_topic,
        bootstrap_servers=args.bootstrap_servers,
        group_id=args.group_id,
        auto_offset_reset="earliest",
        value_deserializer=lambda value: json.loads(value),
        consumer_timeout_ms=500,  # so the loop can notice SIGTERM when the topic is idle
    )
    producer = KafkaProducer(
        bootstrap_servers=args.bootstrap_servers,
        value_serializer=lambda value: json.dumps(value).encode(),
        linger_ms=5,
    )
    print(f"consuming {args.input_topic} -> {args.legit_topic} | {args.fraud_topic}", flush=True)
    try:
        while not stopping:
            for message in consumer:
                transaction = message.value
                topic = args.fraud_topic if is_suspicious(transaction) else args.legit_topic
                producer.send(topic, key=message.key, value=transaction)
                if stopping:
                    break
    finally:
        producer.flush(30)
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
