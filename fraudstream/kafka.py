"""librdkafka client configuration and topic administration, built in one place from Settings."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from fraudstream.client_config import redact
from fraudstream.errors import KafkaUnavailable, NotAuthorized
from fraudstream.settings import MAX_POLL_INTERVAL_S, Settings

log = logging.getLogger("fraudstream.kafka")
T = TypeVar("T")


# Defaults a user may change with client properties (-X, FRAUDSTREAM_KAFKA_CONFIG). What the code
# depends on is applied after the user's properties; Settings refuses those keys with one line.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "linger.ms": 5,
    "batch.num.messages": 10_000,
    "compression.type": "lz4",
}
TRANSACTIONAL_PRODUCER_DEFAULTS: dict[str, Any] = {
    **PRODUCER_DEFAULTS,
    "linger.ms": 2,
    # A transaction begun right after a commit usually finds the coordinator still writing the last
    # one's markers: AddOffsetsToTxn answers CONCURRENT_TRANSACTIONS and librdkafka retries after
    # retry.backoff.ms (default 100 ms, growing exponentially up to retry.backoff.max.ms on repeats).
    # At the head of a stream that wait was most of the end-to-end latency tail; the Java client
    # retries this case after 20 ms. benchmarks/latency.py measures it (docs/benchmarks).
    "retry.backoff.ms": 5,
}
CONSUMER_DEFAULTS: dict[str, Any] = {
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
    # A killed detector's partitions move to the others after this long (librdkafka default: 45 s).
    "session.timeout.ms": 10_000,
}


def client_config(
    settings: Settings, defaults: dict[str, Any], required: dict[str, Any], overrides: dict[str, Any]
) -> dict[str, Any]:
    """Our defaults, then the user's client properties, then what the code depends on, then the caller's."""
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        **defaults,
        **settings.kafka_extra,
        **required,
        **overrides,
    }


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Idempotent, acks=all, batched: what a payment producer should be."""
    # error_cb: without one, confluent-kafka raises a fatal error (an idempotent producer refused by the
    # authorizer) from inside flush() while it serves delivery reports, which then fail too; the delivery
    # reports carry the fatal error to the caller anyway.
    return client_config(
        settings,
        PRODUCER_DEFAULTS,
        {"enable.idempotence": True, "logger": _client_logger("producer"), "error_cb": _log_client_error},
        overrides,
    )


def _log_client_error(error: KafkaError) -> None:
    _client_logger("producer").debug("client error: %s", error.str())


# ---------------------------------------------------------------- authorization
# What each authorization error says was missing (the broker's code -> the permission and its resource).
_DENIED = (
    (re.compile(r"transactional id authorization failed", re.I), "Write on its transactional id"),
    (re.compile(r"group authorization failed", re.I), "Read on its consumer group"),
    (re.compile(r"cluster authorization failed", re.I), "IdempotentWrite on the cluster (or Write on a topic)"),
    (re.compile(r"topic authorization failed", re.I), "access to the topic"),
)


def principal(settings: Settings) -> str:
    """The principal this client presents, as the broker names it, as far as its properties say."""
    extra = settings.kafka_extra
    if extra.get("sasl.username"):
        return f"User:{extra['sasl.username']}"
    match = re.search(r"principal=(\S+)", str(extra.get("sasl.oauthbearer.config") or ""))
    if match:
        return f"User:{match.group(1)}"
    if extra.get("ssl.certificate.location"):
        return "the client certificate's principal"
    return "User:ANONYMOUS"


def denied(settings: Settings, permission: str) -> str:
    """One line: who lacked which permission, and where the ACLs of each role are listed."""
    return (
        f"Kafka denied {principal(settings)} {permission}: no ACL grants it "
        "(`fraudstream acl` lists what each role may do)"
    )


def explain_denial(settings: Settings, text: str, topic: str | None = None) -> str | None:
    """A broker's authorization error in `text` said as denied() does; None for any other error."""
    for pattern, permission in _DENIED:
        if pattern.search(text):
            if permission == "access to the topic" and topic:
                permission = f"access to topic {topic}"
            return denied(settings, permission)
    return None


def transactional_producer_config(settings: Settings, transactional_id: str, **overrides: Any) -> dict[str, Any]:
    return client_config(
        settings,
        TRANSACTIONAL_PRODUCER_DEFAULTS,
        {
            "enable.idempotence": True,
            "transactional.id": transactional_id,
            # An open transaction stalls read_committed readers: keep it bounded. Also how
            # long a killed detector's open transaction can hold back readers if no process
            # with its transactional id comes back to abort it.
            "transaction.timeout.ms": settings.transaction_timeout_ms,
            "logger": _client_logger("producer"),
        },
        overrides,
    )


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    return client_config(
        settings,
        CONSUMER_DEFAULTS,
        {
            "group.id": group_id,
            "isolation.level": "read_committed",  # librdkafka's default, stated anyway
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # The outage limits in Settings are checked against it.
            "max.poll.interval.ms": MAX_POLL_INTERVAL_S * 1000,
            "logger": _client_logger("consumer"),
        },
        overrides,
    )


def admin(settings: Settings, **overrides: Any) -> AdminClient:
    return AdminClient(client_config(settings, {}, {"logger": _client_logger("admin")}, overrides))


CLUSTER_WAIT_REPORT_S = 10.0  # between two "waiting for Kafka" lines of a long wait


def wait_for_cluster(
    settings: Settings, timeout_s: float = 15.0, *, on_wait: Callable[[str], None] | None = None
) -> None:
    """Fail with one clear line when the brokers do not answer within `timeout_s`, and at once when they refuse
    our credentials or TLS. Commands wait 15 s, so a wrong address is one line soon; the detector, a service that
    may start before its cluster, waits its broker outage limit and says so every CLUSTER_WAIT_REPORT_S
    (`on_wait`)."""
    refused: list[KafkaError] = []

    def on_error(error: KafkaError) -> None:
        if is_refusal(error):
            refused.append(error)

    # Its log lines would repeat the refusal in librdkafka's words; the error below says it once.
    client = admin(settings, error_cb=on_error, logger=_silent_logger())
    started = time.monotonic()
    deadline, next_report = started + timeout_s, started + CLUSTER_WAIT_REPORT_S
    last: Exception | None = None
    while time.monotonic() < deadline and not refused:
        try:
            if client.list_topics(timeout=min(1.0, max(0.5, deadline - time.monotonic()))).brokers:
                return
        except KafkaException as exc:
            last = exc
        client.poll(0)  # serves error_cb
        if on_wait is not None and time.monotonic() >= next_report:
            next_report += CLUSTER_WAIT_REPORT_S
            on_wait(
                f"waiting for Kafka at {settings.bootstrap_servers}: no broker has answered for "
                f"{time.monotonic() - started:.0f} s"
                + (f" ({last.args[0].str()})" if last else "")
                + f"; giving up after {timeout_s:.0f} s"
            )
    if refused:
        raise KafkaUnavailable(refusal_message(settings, refused[0]))
    raise KafkaUnavailable(
        f"Kafka at {settings.bootstrap_servers} did not answer within {timeout_s:.0f}s"
        + (f" ({last.args[0].str()})" if last else "")
    )


def check_secured_connection(settings: Settings) -> None:
    """With TLS or SASL configured, make sure the brokers accept this client before reading: a refused
    handshake would otherwise surface later as a bare transport failure."""
    if str(settings.kafka_extra.get("security.protocol", "plaintext")).lower() != "plaintext":
        wait_for_cluster(settings)


# librdkafka errors that no retry will cure: the broker refused our credentials or our TLS handshake.
REFUSALS = frozenset({KafkaError._AUTHENTICATION, KafkaError._SSL})
# A broker that demands a client certificate (mutual TLS) and got none it trusts ends the handshake
# with a TLS alert, which librdkafka reports as a transport failure.
CLIENT_CERTIFICATE_ALERT = re.compile(r"alert (certificate required|bad certificate|unknown ca|certificate unknown)")


def is_refusal(error: KafkaError) -> bool:
    return error.code() in REFUSALS or (
        error.code() == KafkaError._TRANSPORT and bool(CLIENT_CERTIFICATE_ALERT.search(error.str()))
    )


# One classification for every loop that waits a broker out (pitfall 21). librdkafka's retriable() is False for
# some errors that pass by themselves: a leader moving (NOT_LEADER_FOR_PARTITION from list_offsets or
# get_watermark_offsets), a coordinator loading, a partition unknown while its topic is created or its broker
# restarts. Those are waited out, with a bound; fencing, fatal errors and authorization never are.
PASSING = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.REPLICA_NOT_AVAILABLE,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.OFFSET_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.KAFKA_STORAGE_ERROR,
    }
)
NEVER_PASSING = frozenset(
    {
        KafkaError._FATAL,
        KafkaError._FENCED,
        KafkaError._STATE,
        KafkaError._DESTROY,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.FENCED_INSTANCE_ID,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
    }
)


def passes(error: KafkaError) -> bool:
    """Whether to wait this error out (retry with a bound): librdkafka's own retriable ones, a leader or
    coordinator moving, and the client's local transport errors (negative codes); never fatal errors, fencing,
    authorization or a refused handshake."""
    code = error.code()
    if error.fatal() or code in NEVER_PASSING or is_refusal(error):
        return False
    return error.retriable() or code in PASSING or code < 0


def wait_out(
    what: str,
    call: Callable[[], T],
    *,
    limit_s: float,
    interval_s: float = 0.2,
    before_retry: Callable[[KafkaError], None] = lambda error: None,
) -> T:
    """`call()`, retried while its error `passes` (a leader or coordinator moving, a broker away), for at most
    `limit_s`; anything else, or the limit, is KafkaUnavailable with one line naming `what`. `before_retry`
    runs before each wait (it may refresh metadata, or raise to end the wait)."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0]
            if not passes(error) or time.monotonic() > deadline:
                raise KafkaUnavailable(f"{what} failed: {error.str()}") from exc
            log.warning("%s failed (%s): retrying", what, error.str())
            before_retry(error)
            time.sleep(interval_s)


def refusal_message(settings: Settings, error: KafkaError) -> str:
    """One line for a refused connection, saying what to check; never a secret."""
    # librdkafka prefixes the broker's address ("sasl_ssl://127.0.0.1:9443/bootstrap: "); ours is given once.
    text = re.sub(r"^\S+://\S+?: ", "", error.str())
    mechanism = str(settings.kafka_extra.get("sasl.mechanisms") or settings.kafka_extra.get("sasl.mechanism") or "")
    if error.code() == KafkaError._AUTHENTICATION and mechanism.upper() == "OAUTHBEARER":
        hint = (
            "the broker refused the OAuth bearer token: check sasl.oauthbearer.config (principal, scope) "
            "or the sasl.oauthbearer.* settings of your identity provider"
        )
    elif error.code() == KafkaError._AUTHENTICATION:
        hint = "check sasl.username and sasl.password (and sasl.mechanisms)"
    elif CLIENT_CERTIFICATE_ALERT.search(text):
        hint = (
            "the broker wants a client certificate signed by a CA it trusts: check ssl.certificate.location "
            "and ssl.key.location"
        )
    elif "certificate verify failed" in text or "unable to get local issuer" in text:
        hint = "the broker's certificate is not signed by a CA this client trusts: set ssl.ca.location to that CA"
    else:
        hint = "check the TLS settings (ssl.*) and security.protocol"
    return f"Kafka at {settings.bootstrap_servers} refused the connection: {redact(text, settings.kafka_extra)}; {hint}"


def ensure_topics(settings: Settings, topics: tuple[str, ...] | None = None, *, partitions: int | None = None) -> None:
    """Create the pipeline's topics if they do not exist (existing ones are left as they are)."""
    topics = topics or settings.all_topics
    client = admin(settings)
    wait_for_cluster(settings)
    existing = set(client.list_topics(timeout=10).topics)
    wanted = [
        NewTopic(
            topic, num_partitions=partitions or settings.partitions, replication_factor=settings.replication_factor
        )
        if topic != settings.rules_topic
        else rules_topic_spec(settings)
        for topic in topics
        if topic not in existing
    ]
    if not wanted:
        return
    for topic, future in client.create_topics(wanted, operation_timeout=30).items():
        try:
            future.result()
        except KafkaException as exc:
            code = exc.args[0].code()
            if code == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                # The broker says this whether the topic is missing or only hidden from this principal.
                raise NotAuthorized(
                    denied(
                        settings, f"Create on topic {topic} (it is missing, or this principal may not even Describe it)"
                    )
                ) from exc
            if code != KafkaError.TOPIC_ALREADY_EXISTS:
                raise KafkaUnavailable(f"could not create topic {topic}: {exc.args[0].str()}") from exc


def rules_topic_spec(settings: Settings) -> NewTopic:
    """One partition, so every reader sees rule changes in one order (its offsets version the rule set);
    compacted, so the latest version of every rule stays however old it is; each record's time the broker's
    (LogAppendTime), so the history says when a change was made by a clock its writer does not set."""
    return NewTopic(
        settings.rules_topic,
        num_partitions=1,
        replication_factor=settings.replication_factor,
        config={"cleanup.policy": "compact", "message.timestamp.type": "LogAppendTime"},
    )


def refresh_metadata(client, topic: str, timeout_s: float) -> None:
    """Ask the cluster for a topic's partitions and leaders. The answer updates the client's metadata cache and
    moves its assigned partitions' fetches to their new leaders: a client in assign mode otherwise keeps asking
    a leader that died until its metadata ages out (metadata.max.age.ms). No broker answering is not an
    error here: the caller asks again at its next turn."""
    try:
        client.list_topics(topic, timeout=timeout_s)
    except KafkaException as exc:
        log.debug("refreshing the metadata of %s: %s", topic, exc.args[0].str())


def max_message_bytes(
    client: AdminClient, topics: tuple[str, ...], *, timeout_s: float = 10.0, outage_limit_s: float = 0.0
) -> dict[str, int]:
    """Each topic's max.message.bytes: the largest record batch (header included) its brokers accept; a broker or
    controller away is waited out for `outage_limit_s` (a detector starting while one restarts).

    `client` is long-lived and must outlive the call: a client destroyed with a request still in flight
    fails its futures, and can trip an assertion in librdkafka."""
    resources = [ConfigResource(ResourceType.TOPIC, topic) for topic in topics]

    def describe() -> dict[str, int]:
        futures = client.describe_configs(resources, request_timeout=timeout_s)
        return {resource.name: int(future.result()["max.message.bytes"].value) for resource, future in futures.items()}

    return wait_out(f"reading the configuration of topics {', '.join(topics)}", describe, limit_s=outage_limit_s)


def describe_static_members(client: AdminClient, group_id: str, instance_id: str, *, timeout_s: float = 10.0) -> list:
    """The members (MemberDescription: member_id, client_id, host) that hold `instance_id` (group.instance.id)
    in the group, as its coordinator sees it now. The detector asks it in a child process
    (fraudstream/group_probe.py): this request can abort the process that sends it."""
    future = client.describe_consumer_groups([group_id], request_timeout=timeout_s)[group_id]
    try:
        description = future.result()
    except KafkaException as exc:
        raise KafkaUnavailable(f"could not describe consumer group {group_id}: {exc.args[0].str()}") from exc
    return [m for m in description.members if m.group_instance_id == instance_id]


def _silent_logger() -> logging.Logger:
    logger = logging.getLogger("fraudstream.librdkafka.probe")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


def _client_logger(role: str) -> logging.Logger:
    """librdkafka logs through Python logging (not raw stderr), so the CLI decides what is shown."""
    logger = logging.getLogger(f"fraudstream.librdkafka.{role}")
    if not any(isinstance(f, _AuthorizationFatalFilter) for f in logger.filters):
        logger.addFilter(_AuthorizationFatalFilter())
    return logger


class _AuthorizationFatalFilter(logging.Filter):
    """Drops librdkafka's log line of a fatal authorization error: the command says it in one line (denied())."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("Fatal error" in text and "authorization failed" in text.lower())


def produce_or_wait(
    producer, topic: str, value, key=None, *, wait_s: float = 0.05, give_up: Callable[[], bool] | None = None, **kwargs
) -> bool:
    """produce(), waiting while librdkafka's local queue is full: serving delivery reports frees it.

    The one place that handles BufferError. `give_up`, asked after each wait of up to `wait_s`, ends the
    wait: False is returned and the record was not produced. Other errors (KafkaException) propagate."""
    while True:
        try:
            producer.produce(topic, value, key, **kwargs)
            return True
        except BufferError:
            producer.poll(wait_s)
            if give_up is not None and give_up():
                return False
