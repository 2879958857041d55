"""Client properties for Kafka (librdkafka) and the schema registry, as the ecosystem writes them.

Both come from Java-style properties files (the `client.properties` of Kafka's tools and
confluent-kafka's examples: `key=value`, `#` comments, `\\` continuations) and from repeatable
`KEY=VALUE` flags. Keys are checked by the clients themselves (a librdkafka producer and
confluent-kafka's SchemaRegistryClient are built from them and thrown away), so an unknown or
misspelt key fails with one line that names it. Secret values never reach a message: errors,
reprs and logs show them as `***`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import javaproperties

from fraudstream.errors import ConfigError

REDACTED = "***"
# Keys whose values are secrets: passwords, passphrases, secrets, tokens, key material, basic-auth user info, JAAS text.
_SECRET_KEY = re.compile(
    r"password|passphrase|secret|token|user\.info|jaas|oauthbearer\.config|\.pem$|^ssl_key$", re.IGNORECASE
)

# librdkafka properties the code depends on for exactly-once and for its own group handling: a user
# value would silently change delivery guarantees, so it is refused with the flag to use instead.
OWNED_KAFKA_KEYS: dict[str, str] = {
    "group.id": "set it with --group-id or FRAUDSTREAM_GROUP_ID",
    "transactional.id": "set it with --transactional-id or FRAUDSTREAM_TRANSACTIONAL_ID",
    "group.instance.id": "the detector derives it from its transactional id",
    "isolation.level": "readers are read_committed (exactly-once)",
    "enable.auto.commit": "offsets are committed inside Kafka transactions",
    "enable.auto.offset.store": "offsets are committed inside Kafka transactions",
    "enable.idempotence": "producers are idempotent (exactly-once)",
    "transaction.timeout.ms": "set it with FRAUDSTREAM_TRANSACTION_TIMEOUT_MS (the detector bounds its batches by it)",
    "max.poll.interval.ms": "the detector's outage limits are checked against it",
}
# Kafka properties that are settings of ours: taken out of the properties and used as the setting.
BOOTSTRAP_KEYS = ("bootstrap.servers", "metadata.broker.list")
# Java clients prefix registry properties with this (schema.registry.url, ...); the Python client does not.
REGISTRY_PREFIX = "schema.registry."
# The registry client's numeric properties (it checks their type, and properties files hold text).
_REGISTRY_NUMBERS = frozenset(
    {"timeout", "cache.capacity", "cache.latest.ttl.sec", "max.retries", "retries.wait.ms", "retries.max.wait.ms"}
)


def is_secret(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


class Properties(Mapping[str, str]):
    """Read-only client properties whose repr never shows a secret value."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    __hash__ = None  # type: ignore[assignment]

    def redacted(self) -> dict[str, str]:
        return {key: REDACTED if is_secret(key) else value for key, value in self._items.items()}

    def __repr__(self) -> str:
        return f"Properties({self.redacted()!r})"


def redact_url(url: str) -> str:
    """The URL with the password of any user info replaced."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{parts.username}:{REDACTED}@{host}"))
    except ValueError:
        return url


def redact(text: str, *property_sets: Mapping[str, str]) -> str:
    """`text` with every secret value of the given properties, and URL passwords, replaced."""
    for properties in property_sets:
        for key, value in properties.items():
            if is_secret(key) and value:
                text = text.replace(str(value), REDACTED)
                # basic.auth.user.info is user:password; the password alone must not show either.
                if key.endswith("user.info") and ":" in str(value):
                    password = str(value).split(":", 1)[1]
                    if password:
                        text = text.replace(password, REDACTED)
    return re.sub(r"(\w+://[^/\s:@]*:)[^/\s@]*@", rf"\1{REDACTED}@", text)


def read_properties_file(path: Path, what: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            return dict(javaproperties.load(f))
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{what} file {path} could not be read: {exc.__class__.__name__}") from None


def parse_pairs(pairs: Iterable[str], flag: str) -> dict[str, str]:
    """`KEY=VALUE` items of a repeatable flag (argparse has checked the `=`)."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} wants KEY=VALUE, got an item without '=' or without a key")
        result[key.strip()] = value
    return result


# ---------------------------------------------------------------- Kafka (librdkafka)
def split_kafka(properties: Mapping[str, str]) -> tuple[str | None, dict[str, str]]:
    """(bootstrap servers if given, the other properties)."""
    rest = dict(properties)
    bootstrap = None
    for key in BOOTSTRAP_KEYS:
        if key in rest:
            bootstrap = rest.pop(key)
    return bootstrap, rest


def check_kafka(properties: Mapping[str, str]) -> None:
    """Refuse keys the code owns, then let librdkafka judge every key and value.

    A producer is built from the properties alone (no bootstrap servers, so it connects nowhere) and
    destroyed: librdkafka refuses unknown keys and invalid values, and checks files such as
    ssl.ca.location at once. Consumer-only keys are accepted by a producer (with a warning we drop)."""
    for key in properties:
        if key in OWNED_KAFKA_KEYS:
            raise ConfigError(f"Kafka property {key} cannot be set: {OWNED_KAFKA_KEYS[key]}")
    if not properties:
        return
    _check_files(properties, "Kafka property")
    from confluent_kafka import KafkaException, Producer

    try:
        Producer({**properties, "logger": _silent_logger()})
    except KafkaException as exc:
        raise ConfigError(f"Kafka client configuration: {redact(_kafka_message(exc), properties)}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Kafka client configuration: {redact(str(exc), properties)}") from None


def _check_files(properties: Mapping[str, str], what: str) -> None:
    """A named file that is not there, said plainly (the TLS libraries' own words are cryptic)."""
    for key, value in properties.items():
        # librdkafka's ssl.ca.location may also be "probe": look in the system's usual places.
        if key.endswith(".location") and value and value != "probe" and not Path(value).exists():
            raise ConfigError(f"{what} {key}: no such file {value}")


def _kafka_message(exc: Exception) -> str:
    from confluent_kafka import KafkaError

    error = exc.args[0] if exc.args else None
    text = error.str() if isinstance(error, KafkaError) else str(exc)
    return text.removeprefix("Failed to create producer: ")


def _silent_logger() -> logging.Logger:
    logger = logging.getLogger("fraudstream.client_config.check")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


# ---------------------------------------------------------------- schema registry
def normalize_registry(properties: Mapping[str, str]) -> dict[str, str]:
    """Java-style names to the Python client's: `schema.registry.` prefixes dropped; the Java
    `basic.auth.credentials.source=USER_INFO` dropped, since basic.auth.user.info says it already."""
    result = {}
    for key, value in properties.items():
        name = key.removeprefix(REGISTRY_PREFIX)
        if name == "basic.auth.credentials.source":
            if str(value).strip().upper() != "USER_INFO":
                raise ConfigError(
                    f"registry property {key}={value} is not supported: use basic.auth.user.info, "
                    "or bearer.auth.credentials.source for tokens"
                )
            continue
        result[name] = value
    return result


def split_registry(properties: Mapping[str, str]) -> tuple[str | None, dict[str, str]]:
    """(the registry URL if given, the other properties)."""
    rest = dict(properties)
    return rest.pop("url", None), rest


def registry_client_conf(url: str, properties: Mapping[str, str]) -> dict[str, object]:
    """SchemaRegistryClient configuration: the URL and the properties, numbers converted from text."""
    conf: dict[str, object] = {"url": url}
    for key, value in properties.items():
        if key in _REGISTRY_NUMBERS and isinstance(value, str):
            try:
                conf[key] = float(value) if key in ("timeout", "cache.latest.ttl.sec") else int(value)
            except ValueError:
                raise ConfigError(f"registry property {key} must be a number, not {value!r}") from None
        else:
            conf[key] = value
    return conf


def check_registry(url: str, properties: Mapping[str, str]) -> None:
    """Build a SchemaRegistryClient (it connects nowhere until asked): it refuses unknown keys and
    bad combinations, and loads the CA and client certificate files."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    _check_files(properties, "registry property")
    try:
        SchemaRegistryClient(registry_client_conf(url, properties))
    except ConfigError:
        raise
    except (ValueError, TypeError, OSError) as exc:
        message = str(exc)
        if message.startswith("Unrecognized properties: "):
            message = f"unknown registry property {message.removeprefix('Unrecognized properties: ')}"
        raise ConfigError(f"schema registry client configuration: {redact(message, properties)}") from None
