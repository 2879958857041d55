"""The soak's independent checker: reads every topic of a run from the start (read_committed) and says what
was lost, duplicated or unreadable, which held rows are still live, and which decisions differ from an
uninterrupted run of the same input.

It imports nothing of fraudstream, on purpose: what it checks must not be judged by the code under test.
Only the Confluent wire format (magic byte 0, 4-byte schema id, Avro), the registry's REST API, the topic
names a deployment sees (<input>.legit, .fraud, .dlq; <group>.<input>.held.changelog) and one documented header
are assumed.

A decision that differs from the uninterrupted run's is counted apart when either run's output carries the
`fraudstream.released_early` header: a held record released on a partition found quiet before its look-ahead
was read (the detector's stated trade, docs: held records). A fault that stalls one partition's producer for
longer than the hold idle time makes that happen; every other difference is a failure.

    python tests/support/soak_checker.py --bootstrap HOST:PORT --registry URL --input T --group G \
        [--baseline-input T2 --baseline-group G2] [--out report.json]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import urllib.request
import uuid
from collections import Counter
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from fastavro import parse_schema, schemaless_reader

EXAMPLES = 20  # of each kind of finding, in the report
RELEASED_EARLY = "fraudstream.released_early"


class Schemas:
    """Writer schemas by id, from the registry's REST API."""

    def __init__(self, url: str) -> None:
        self.url, self.by_id = url.rstrip("/"), {}

    def get(self, schema_id: int):
        if schema_id not in self.by_id:
            with urllib.request.urlopen(f"{self.url}/schemas/ids/{schema_id}", timeout=30) as answer:
                body = json.load(answer)
            self.by_id[schema_id] = parse_schema(json.loads(body["schema"]))
        return self.by_id[schema_id]

    def decode(self, value: bytes | None) -> dict[str, Any]:
        """The record, or ValueError saying why it cannot be read as Confluent Avro."""
        if not value or len(value) < 5 or value[0] != 0:
            raise ValueError("not Confluent-framed Avro")
        stream = io.BytesIO(value[5:])
        try:
            record = schemaless_reader(stream, self.get(int.from_bytes(value[1:5], "big")), None)
        except Exception as exc:  # noqa: BLE001 - any reader failure is a finding
            raise ValueError(f"{type(exc).__name__}: {exc}") from None
        if stream.tell() != len(value) - 5:
            raise ValueError("bytes after the record")
        return record


def read_all(bootstrap: str, topic: str, *, timeout_s: float = 300.0) -> list:
    """Every committed record of the topic, from each partition's start to its end when the read began."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"soak-checker-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=30).topics[topic]
        if metadata.error is not None:
            return []
        partitions = [TopicPartition(topic, p, 0) for p in sorted(metadata.partitions)]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=30)[1] for tp in partitions}
        consumer.assign(partitions)
        records, deadline = [], time.monotonic() + timeout_s
        while True:
            positions = {tp.partition: tp.offset for tp in consumer.position(partitions)}
            if all(end == 0 or positions[p] >= end for p, end in ends.items()):
                return records
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: read to {positions}, ends {ends}")
            records += [m for m in consumer.consume(10_000, 1.0) if m.error() is None]
    finally:
        consumer.close()


def routed(
    bootstrap: str, schemas: Schemas, input_topic: str
) -> tuple[dict[str, list[tuple]], list[dict], dict[str, str]]:
    """transaction id -> its outputs [(route, rules)], the outputs no reader can read, and transaction id -> the
    partitions named by its output's released-early header."""
    outputs: dict[str, list[tuple]] = {}
    unreadable = []
    early: dict[str, str] = {}
    for route in ("legit", "fraud"):
        for message in read_all(bootstrap, f"{input_topic}.{route}"):
            try:
                record = schemas.decode(message.value())
                tx = record["transaction"] if route == "fraud" else record
                rules = tuple(sorted(record["rules"])) if route == "fraud" else ()
                outputs.setdefault(tx["transaction_id"], []).append((route, rules))
                quiet = dict(message.headers() or ()).get(RELEASED_EARLY)
                if quiet is not None:
                    early[tx["transaction_id"]] = quiet.decode()
            except (ValueError, KeyError, TypeError) as exc:
                unreadable.append(
                    {
                        "topic": message.topic(),
                        "partition": message.partition(),
                        "offset": message.offset(),
                        "reason": str(exc),
                    }
                )
    for message in read_all(bootstrap, f"{input_topic}.dlq"):
        outputs.setdefault(f"dlq:{(message.key() or b'').hex()}:{(message.value() or b'').hex()[:64]}", []).append(
            ("dlq", ())
        )
    return outputs, unreadable, early


def inputs(bootstrap: str, schemas: Schemas, topic: str) -> tuple[Counter, dict[str, tuple[int, int]]]:
    """How often each input transaction id was written, and where (partition, offset); an undecodable input
    record is known by its key and bytes, as its dead letter carries them."""
    count, where = Counter(), {}
    for message in read_all(bootstrap, topic):
        try:
            tid = schemas.decode(message.value())["transaction_id"]
        except (ValueError, KeyError, TypeError):
            tid = f"dlq:{(message.key() or b'').hex()}:{(message.value() or b'').hex()[:64]}"
        count[tid] += 1
        where.setdefault(tid, (message.partition(), message.offset()))
    return count, where


def live_held_rows(bootstrap: str, changelog: str) -> list[str]:
    """Keys whose last record in the held store's changelog is a row, not a tombstone: records still owed."""
    last: dict[bytes, bool] = {}
    for message in read_all(bootstrap, changelog):
        last[message.key()] = message.value() is not None
    return sorted(key.hex() for key, live in last.items() if live)


def check(
    bootstrap: str,
    registry: str,
    input_topic: str,
    group: str,
    *,
    baseline_input: str | None = None,
    baseline_group: str | None = None,
) -> dict[str, Any]:
    schemas = Schemas(registry)
    sent, where = inputs(bootstrap, schemas, input_topic)
    outputs, unreadable, early = routed(bootstrap, schemas, input_topic)
    lost = [tid for tid in sent if len(outputs.get(tid, ())) < sent[tid]]
    duplicated = [tid for tid, out in outputs.items() if len(out) > sent.get(tid, 0)]
    held = live_held_rows(bootstrap, f"{group}.{input_topic}.held.changelog")
    report: dict[str, Any] = {
        "input_records": sum(sent.values()),
        "routed": sum(len(o) for o in outputs.values()),
        "routes": dict(Counter(route for out in outputs.values() for route, _ in out)),
        "lost": len(lost),
        "duplicated": len(duplicated),
        "unreadable": len(unreadable),
        "held_live": len(held),
        "examples": {
            "lost": [{"id": t, "input": where.get(t)} for t in lost[:EXAMPLES]],
            "duplicated": [{"id": t, "outputs": outputs[t]} for t in duplicated[:EXAMPLES]],
            "unreadable": unreadable[:EXAMPLES],
            "held_live": held[:EXAMPLES],
        },
    }
    if baseline_input is not None:
        baseline, baseline_unreadable, baseline_early = routed(bootstrap, schemas, baseline_input)
        every_difference = [tid for tid in sent if sorted(outputs.get(tid, ())) != sorted(baseline.get(tid, ()))]
        released_early = [t for t in every_difference if t in early or t in baseline_early]
        differ = [t for t in every_difference if not (t in early or t in baseline_early)]
        report["baseline"] = {
            "routed": sum(len(o) for o in baseline.values()),
            "unreadable": len(baseline_unreadable),
            "held_live": len(live_held_rows(bootstrap, f"{baseline_group}.{baseline_input}.held.changelog")),
        }
        report["decisions_differ"] = len(differ)
        report["examples"]["decisions_differ"] = [
            {"id": t, "input": where.get(t), "soak": outputs.get(t), "uninterrupted": baseline.get(t)}
            for t in differ[:EXAMPLES]
        ]
        report["decisions_differ_released_early"] = len(released_early)
        report["examples"]["decisions_differ_released_early"] = [
            {
                "id": t,
                "input": where.get(t),
                "soak": outputs.get(t),
                "uninterrupted": baseline.get(t),
                "quiet_partitions": {"soak": early.get(t), "uninterrupted": baseline_early.get(t)},
            }
            for t in released_early[:EXAMPLES]
        ]
    report["ok"] = not (lost or duplicated or unreadable or held or report.get("decisions_differ"))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--baseline-input")
    parser.add_argument("--baseline-group")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    report = check(
        args.bootstrap,
        args.registry,
        args.input,
        args.group,
        baseline_input=args.baseline_input,
        baseline_group=args.baseline_group,
    )
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text)
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
