"""One exception root. Library errors are wrapped (`raise X(...) from exc`) so the CLI
can print one line for every expected failure and a traceback for nothing else."""


class FraudstreamError(Exception):
    """Base of every expected failure; its message is the one line the CLI prints."""

    exit_code = 1


class ConfigError(FraudstreamError):
    """A setting or flag is missing or invalid."""

    exit_code = 2


class StackError(FraudstreamError):
    """The local Kafka/registry stack could not be fetched, started or stopped."""


class RegistryError(FraudstreamError):
    """The Schema Registry is unreachable or refused a request."""


class RegistryUnavailable(RegistryError):
    """The Schema Registry did not answer (a transport error or a timeout): worth waiting for, unlike a refusal."""


class SchemaError(FraudstreamError):
    """A schema file is invalid, unregistered, or incompatible."""


class KafkaUnavailable(FraudstreamError):
    """The Kafka cluster could not be reached within the allowed time."""


class Fenced(FraudstreamError):
    """Another process took over this detector's transactional id (or the producer hit a fatal error)."""


class StateError(FraudstreamError):
    """Keyed state cannot be kept or restored: a changelog that does not match the input, or cannot be read."""


class NotAuthorized(FraudstreamError):
    """The broker's authorizer refused an operation: an ACL is missing (not worth retrying)."""
