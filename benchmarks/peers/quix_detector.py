"""Peer detector (4): quixstreams, the library a Python team would pick for this job, written as its docs teach.

Runs in its own virtual environment (benchmarks/quix_env.py: quixstreams pins an older
confluent-kafka than ours), so it imports nothing from the product.

An `Application` with processing_guarantee="exactly-once" (Kafka transactions, read_committed),
commit_interval=1 (the default 5 s would make output readable in 5-second bursts), its
AvroDeserializer/AvroSerializer against our registry through SchemaRegistryClientConfig, and a
StreamingDataFrame split into two filtered branches, one per output topic:

    stateless  amount_cents > threshold -> fraud topic (FraudAlert), else legit (Transaction)
    velocity   the same, plus quixstreams' own state: a card's transactions counted in its session
               (group_by card_id, then session_window(gap).reduce(...).current(), on event time);
               more than --velocity-max in one session is fraud as well. Ours runs the same count
               as its `velocity` rule: a session is payments at most --velocity-gap-s apart.

The registry: Apicurio's Confluent-compatible API works as is with the confluent-kafka that
quixstreams pins (below 2.13, whose default subject-name strategy is the topic one; the
"associated" default of 2.14+ is not in it). The topic strategy is stated anyway, schemas are
registered beforehand and looked up, never registered by the contender (auto_register_schemas off).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone

from benchmarks.peers.common import detector_arguments

LARGE_AMOUNT = "large_amount"
VELOCITY = "velocity"


def main(argv: list[str] | None = None) -> int:
    parser = detector_arguments(__doc__.splitlines()[0])
    parser.add_argument("--rule", choices=("stateless", "velocity"), default="stateless")
    parser.add_argument("--velocity-gap-s", type=float, required=True, help="a session's inactivity gap")
    parser.add_argument(
        "--velocity-max", type=int, required=True, help="more transactions than this per card and session"
    )
    parser.add_argument(
        "--velocity-grace-s",
        type=float,
        default=600.0,
        help="lateness tolerated: the repartition topic interleaves input partitions",
    )
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args(argv)

    from confluent_kafka.schema_registry import SchemaRegistryClient, topic_subject_name_strategy
    from quixstreams import Application
    from quixstreams.models.serializers.avro import AvroDeserializer, AvroSerializer
    from quixstreams.models.serializers.schema_registry import (
        SchemaRegistryClientConfig,
        SchemaRegistrySerializationConfig,
    )

    registry_config = SchemaRegistryClientConfig(url=args.schema_registry_url)
    serialization = SchemaRegistrySerializationConfig(
        auto_register_schemas=False, subject_name_strategy=topic_subject_name_strategy
    )
    # The serializers need the schema itself: take the registered text, as the confluent peer does.
    registry = SchemaRegistryClient({"url": args.schema_registry_url, "timeout": 30})
    legit_schema = json.loads(registry.get_latest_version(f"{args.legit_topic}-value").schema.schema_str)
    fraud_schema = json.loads(registry.get_latest_version(f"{args.fraud_topic}-value").schema.schema_str)

    app = Application(
        broker_address=args.bootstrap_servers,
        consumer_group=args.group_id,
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        commit_interval=1,
        state_dir=args.state_dir,
        loglevel="WARNING",
    )
    input_topic = app.topic(
        args.input_topic,
        key_deserializer="str",
        value_deserializer=AvroDeserializer(schema_registry_client_config=registry_config),
        # Windows run on the transaction's own event time, not the Kafka timestamp.
        timestamp_extractor=lambda value, _headers, _timestamp, _type: int(value["event_time"].timestamp() * 1000),
    )
    legit_topic = app.topic(
        args.legit_topic,
        key_serializer="str",
        value_serializer=AvroSerializer(
            legit_schema,
            schema_registry_client_config=registry_config,
            schema_registry_serialization_config=serialization,
        ),
    )
    fraud_topic = app.topic(
        args.fraud_topic,
        key_serializer="str",
        value_serializer=AvroSerializer(
            fraud_schema,
            schema_registry_client_config=registry_config,
            schema_registry_serialization_config=serialization,
        ),
    )

    threshold = args.threshold_cents

    def alert(transaction: dict, rules: list[str]) -> dict:
        return {"transaction": transaction, "rules": rules, "detected_at": datetime.now(timezone.utc)}

    sdf = app.dataframe(input_topic)
    if args.rule == "stateless":
        fraud = sdf["amount_cents"] > threshold
        sdf[fraud].apply(lambda tx: alert(tx, [LARGE_AMOUNT])).to_topic(fraud_topic)
        sdf[~fraud].to_topic(legit_topic)
    else:
        velocity_max = args.velocity_max
        # Windows group by the message key; the input is keyed by account, so re-key by card.
        # The internal repartition topic carries plain Avro (no registry framing) with the input's schema.
        tx_schema = legit_schema
        sdf = sdf.group_by(
            "card_id",
            key_serializer="str",
            key_deserializer="str",
            value_serializer=AvroSerializer(tx_schema),
            value_deserializer=AvroDeserializer(tx_schema),
        )
        # Window state is stored as JSON, which has no datetime: carry event time as epoch milliseconds
        # (the Avro serializers take either for a timestamp-millis field).
        sdf["event_time"] = sdf["event_time"].apply(lambda t: int(t.timestamp() * 1000))
        sdf = (
            sdf.session_window(
                inactivity_gap_ms=timedelta(seconds=args.velocity_gap_s),
                grace_ms=timedelta(seconds=args.velocity_grace_s),
            )
            # Count per card and session, and carry the transaction that made the count. Sessions merge
            # when an out-of-order record bridges two: the counts add up.
            .reduce(
                reducer=lambda agg, tx: {"count": agg["count"] + 1, "tx": tx},
                initializer=lambda tx: {"count": 1, "tx": tx},
                merger=lambda earlier, later: {"count": earlier["count"] + later["count"], "tx": later["tx"]},
            )
            .current()
        )

        def rules(window: dict) -> list[str]:
            fired = []
            if window["value"]["tx"]["amount_cents"] > threshold:
                fired.append(LARGE_AMOUNT)
            if window["value"]["count"] > velocity_max:
                fired.append(VELOCITY)
            return fired

        def decide(window: dict) -> dict:
            fired = rules(window)
            return {"tx": window["value"]["tx"], "rules": fired, "fraud": bool(fired)}

        sdf = sdf.apply(decide)
        fraud = sdf["fraud"]
        sdf[fraud].apply(lambda decided: alert(decided["tx"], decided["rules"])).to_topic(fraud_topic)
        sdf[~fraud].apply(lambda decided: decided["tx"]).to_topic(legit_topic)

    print(f"consuming {args.input_topic} -> {args.legit_topic} | {args.fraud_topic} ({args.rule})", flush=True)
    app.run()  # until SIGTERM or SIGINT, which it handles itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
