"""One classification of Kafka errors for every loop that waits a broker out (fraudstream.kafka.passes)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from fraudstream.consumer.terminal import TerminalReader
from fraudstream.errors import KafkaUnavailable
from fraudstream.kafka import passes
from fraudstream.settings import Settings


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.NOT_LEADER_FOR_PARTITION,  # list_offsets after a leader moved: librdkafka says not retriable
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._UNKNOWN_PARTITION,
    ],
)
def test_a_broker_or_leader_moving_is_waited_out(code):
    assert passes(KafkaError(code))


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.PRODUCER_FENCED,
        KafkaError._FENCED,
        KafkaError._FATAL,
        KafkaError._AUTHENTICATION,
        KafkaError._SSL,
        KafkaError.INVALID_CONFIG,
    ],
)
def test_fencing_authorization_and_configuration_are_not(code):
    assert not passes(KafkaError(code))


def test_a_fatal_error_is_never_waited_out_whatever_its_code():
    assert not passes(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION, fatal=True))


def test_the_terminal_reader_waits_out_a_leader_change_instead_of_ending_the_detector():
    """A soak under load once ended with 'terminal reader: reading the input's offsets failed: ... Broker: Not
    leader for partition': its retry loop trusted retriable(), which is False for that error."""
    reader = TerminalReader(Settings(broker_outage_limit_s=30), decode=lambda messages: None)
    calls = []

    def offsets():
        calls.append(1)
        if len(calls) < 3:
            raise KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))
        return "offsets"

    assert reader.call("reading the input's offsets", offsets) == "offsets" and len(calls) == 3
    with pytest.raises(KafkaUnavailable, match="Topic authorization failed"):
        reader.call(
            "reading", lambda: (_ for _ in ()).throw(KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)))
        )


def test_wait_out_retries_what_passes_and_names_what_failed_otherwise():
    from fraudstream.kafka import wait_out

    answers = [KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION), KafkaError(KafkaError._TRANSPORT), 42]

    def call():
        answer = answers.pop(0)
        if isinstance(answer, KafkaError):
            raise KafkaException(answer)
        return answer

    assert wait_out("reading the labels' end", call, limit_s=10, interval_s=0) == 42 and not answers
    with pytest.raises(KafkaUnavailable, match="^reading the labels' end failed: .*authorization"):
        wait_out(
            "reading the labels' end",
            lambda: (_ for _ in ()).throw(KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))),
            limit_s=10,
            interval_s=0,
        )


def test_reading_the_output_topics_limits_waits_out_a_controller_away():
    """Seen in the soak: a detector starting while a broker was frozen ended with 'could not read the
    configuration of topic ...: Failed while waiting for controller: Local: Timed out'."""
    from concurrent.futures import Future

    from fraudstream.kafka import max_message_bytes

    class Entry:
        value = "1048588"

    class Admin:
        asked = 0

        def describe_configs(self, resources, request_timeout):
            self.asked += 1
            futures = {}
            for resource in resources:
                future = Future()
                if self.asked < 3:
                    future.set_exception(KafkaException(KafkaError(KafkaError._TIMED_OUT, "waiting for controller")))
                else:
                    future.set_result({"max.message.bytes": Entry()})
                futures[resource] = future
            return futures

    admin = Admin()
    assert max_message_bytes(admin, ("t.legit", "t.fraud"), outage_limit_s=30) == {
        "t.legit": 1048588,
        "t.fraud": 1048588,
    }
    assert admin.asked == 3
    with pytest.raises(KafkaUnavailable):  # without an outage limit, the first failure is the answer
        max_message_bytes(Admin(), ("t.legit",))


def test_a_detector_starting_while_the_registry_restarts_waits_for_it_but_not_for_a_refusal():
    from fraudstream.consumer.detector import Detector
    from fraudstream.errors import RegistryError, RegistryUnavailable

    detector = Detector(Settings(registry_outage_limit_s=30))
    answers = [RegistryUnavailable("unreachable"), RegistryUnavailable("unreachable"), {"t": 7}]

    def lookup():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert detector._until_registry_answers(lookup) == {"t": 7} and not answers
    with pytest.raises(RegistryError, match="refused"):
        detector._until_registry_answers(lambda: (_ for _ in ()).throw(RegistryError("refused the credentials")))
