"""Generated framed values (hypothesis) thrown at a running detector, on the real broker and registry: the schema
id of a PROTOBUF or a JSON schema of the same registry, unknown ids, foreign magic bytes, schema GUIDs in headers
and prefixes, valid payloads cut, extended and bit-flipped, random bytes. The detector stays up; every record
comes out exactly once (legit, fraud or dead letter, with a reason); whatever leaves for legit or fraud is
readable by a plain Avro reader of the registry's schema."""

from __future__ import annotations

import uuid

from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from fraudstream.consumer.decide import DLQ_KIND, DLQ_REASON
from fraudstream.settings import Settings
from tests.integration.test_detector import (
    RunningDetector,
    decode,
    encoder_for,
    register_foreign_schemas,
    register_transaction_v1,
    routed_total,
)
from tests.support.kafka_io import produce_raw, read_topic, transaction, wait_until

HEADER = "__value_schema_id"


def test_generated_framed_values_never_stop_the_detector_and_each_comes_out_once(pipeline: Settings):
    encode = encoder_for(pipeline, pipeline.transactions_topic)
    ids = {
        "current": int.from_bytes(encode(transaction(1).to_dict())[1:5], "big"),
        "v1": register_transaction_v1(pipeline)[0],
        **register_foreign_schemas(pipeline),
    }
    payloads = [encode(transaction(amount, account=f"acc-{amount}").to_dict())[5:] for amount in (500, 95_000)]
    schema_ids = st.one_of(st.sampled_from(sorted(ids.values())), st.integers(0, 2**32 - 1))
    payload = st.one_of(
        st.sampled_from(payloads),
        st.builds(lambda p, cut: p[:cut], st.sampled_from(payloads), st.integers(0, 60)),  # truncated
        st.builds(lambda p, extra: p + extra, st.sampled_from(payloads), st.binary(min_size=1, max_size=8)),
        st.builds(
            lambda p, at, bit: p[: at % len(p)] + bytes([p[at % len(p)] ^ (1 << bit)]) + p[at % len(p) + 1 :],
            st.sampled_from(payloads),
            st.integers(0, 200),
            st.integers(0, 7),
        ),  # one bit flipped
        st.binary(max_size=80),
    )
    framed = st.one_of(
        st.builds(lambda i, p: (b"\x00" + i.to_bytes(4, "big") + p, None), schema_ids, payload),
        st.builds(lambda m, p: (bytes([m]) + p, None), st.integers(1, 255), payload),  # other magic bytes
        st.builds(lambda p: (p, [(HEADER, b"\x01" + uuid.uuid4().bytes)]), payload),  # a GUID nobody knows
        st.builds(lambda h, p: (p, [(HEADER, h)]), st.binary(max_size=20), payload),  # a header of any bytes
        st.just((None, None)),
        st.just((b"", None)),
    )
    sent: list[bytes] = []
    detector = RunningDetector(pipeline)

    def example(records) -> None:
        for value, headers in records:
            key = f"h-{len(sent)}".encode()
            produce_raw(pipeline, pipeline.transactions_topic, [(key, value)], headers=headers)
            sent.append(key)
        assert detector.thread.is_alive(), detector.error

    try:
        # Every known id framed at least once, whatever hypothesis draws; then its examples.
        example([(b"\x00" + schema_id.to_bytes(4, "big") + payloads[0], None) for schema_id in ids.values()])
        settings = hypothesis_settings(
            max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
        )
        settings(given(st.lists(framed, min_size=1, max_size=8))(example))()
        wait_until(
            lambda: routed_total(pipeline) >= len(sent) or not detector.thread.is_alive(),
            timeout_s=120,
            what=f"all {len(sent)} generated records routed",
        )
    finally:
        detector.stop()
    assert detector.error is None, detector.error
    out: dict[bytes, list[str]] = {}
    for topic in (pipeline.legit_topic, pipeline.fraud_topic, pipeline.dlq_topic):
        for message in read_topic(pipeline, topic):
            out.setdefault(message.key(), []).append(topic)
            if topic == pipeline.dlq_topic:
                headers = dict(message.headers())
                assert headers[DLQ_KIND] and headers[DLQ_REASON], headers
            else:
                decode(pipeline, message.value())  # readable by a plain Avro reader of the registry's schema
    assert sorted(out) == sorted(sent), "a generated record was lost"
    assert all(len(topics) == 1 for topics in out.values()), "a generated record came out twice"
    dead = sum(topics == [pipeline.dlq_topic] for topics in out.values())
    assert dead > len(sent) // 3, f"only {dead} of {len(sent)} dead-lettered: the generator made too few bad ones"
