"""The limit: a bare exactly-once passthrough, the least any transactional detector can do.

Consume a batch, produce each record unchanged (no decode, no rule) to one output topic, send the
offsets, commit; repeat. Same librdkafka settings as our detector (fraudstream.kafka's builders:
read_committed, idempotent, lz4, linger), so what separates ours from this line is deciding and
routing, not client configuration. Its throughput is what the broker's transactional path and
the client allow on this machine; its CPU per record is the floor of a Python process doing EOS.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.peers.common import stop_requested


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--output-topic", required=True)
    parser.add_argument("--group-id", required=True)
    parser.add_argument("--batch", type=int, required=True, help="records per transaction at most")
    parser.add_argument(
        "--produce-batch",
        action="store_true",
        help="one Producer.produce_batch call per transaction instead of produce per record "
        "(no headers in that API): what the per-record produce calls cost",
    )
    args = parser.parse_args(argv)

    from confluent_kafka import Consumer, Producer

    from fraudstream.kafka import consumer_config, produce_or_wait, transactional_producer_config
    from fraudstream.settings import Settings

    stopping = stop_requested()

    settings = Settings.from_env(bootstrap_servers=args.bootstrap_servers)
    transactional_id = f"{args.group_id}-passthrough"
    producer = Producer(
        transactional_producer_config(
            settings,
            transactional_id,
            **{
                # A 50,000-record transaction must fit the local queue (default 100,000 messages).
                "queue.buffering.max.messages": max(100_000, 2 * args.batch),
            },
        )
    )
    consumer = Consumer(consumer_config(settings, args.group_id))
    producer.init_transactions(30)
    consumer.subscribe([args.input_topic])
    output, batch = args.output_topic, args.batch
    wait_s = settings.batch_max_ms / 1000  # as long as our detector waits for a batch to fill
    print(f"passthrough {args.input_topic} -> {output}, {batch:,} records per transaction", flush=True)

    def produce_all(messages: list) -> None:
        pending = [{"value": m.value(), "key": m.key()} for m in messages if m.error() is None]
        queued = producer.produce_batch(output, pending)
        if queued != len(pending):  # the local queue holds two batches: this is a bug, never a silent loss
            raise RuntimeError(f"produce_batch queued {queued} of {len(pending)} records")

    try:
        while not stopping:
            messages = consumer.consume(batch, wait_s)
            if not messages:
                producer.poll(0)
                continue
            producer.begin_transaction()
            if args.produce_batch:
                produce_all(messages)
            else:
                for message in messages:
                    if message.error() is None:
                        produce_or_wait(producer, output, message.value(), message.key())
            producer.send_offsets_to_transaction(
                consumer.position(consumer.assignment()), consumer.consumer_group_metadata()
            )
            producer.commit_transaction()
    finally:
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
