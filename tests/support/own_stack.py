"""A Kafka (one node or a cluster) and a schema registry of a test's own, on free ports, from the distribution
the session already fetched: faults done to them disturb no one else."""

from __future__ import annotations

import random
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from fraudstream.settings import Settings
from fraudstream.stack import LocalStack


def free_port_block(size: int) -> int:
    """A base port with `size` free ports from it (a cluster's nodes use consecutive pairs), below the kernel's
    ephemeral range: while a killed broker is down, its port must not become some client's local port (seen in
    a soak: the restart failed with BindException, the port taken by an outgoing connection)."""
    rng = random.Random()
    ephemeral_low = _ephemeral_range()[0]
    for _ in range(200):
        base = rng.randrange(10_000, min(ephemeral_low, 40_000) - size, 2)
        try:
            for port in range(base, base + size):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no block of free ports found")


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux; its default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999


def shared_dist() -> Path:
    """The session's fetched Kafka and registry: nothing fetched twice."""
    return LocalStack(Settings.from_env(), log=lambda *_: None).dist


def start_kafka(
    stack_settings: Settings, folder: Path, brokers: int, broker_settings: dict[str, str] | None = None
) -> tuple[LocalStack, Settings]:
    """A started Kafka of `brokers` nodes on free ports in `folder`: (its stack, settings pointing at it).
    `broker_settings` replace the stack's own Kafka settings."""
    base = free_port_block(2 * brokers)
    settings = stack_settings.replace(stack_dir=folder, kafka_port=base, controller_port=base + 1)
    stack = LocalStack(
        settings, log=lambda *_: None, dist=shared_dist(), brokers=brokers, broker_settings=broker_settings
    )
    try:
        bootstrap = stack.up_kafka()
    except BaseException:
        stack.down(wipe=True)
        raise
    return stack, settings.replace(bootstrap_servers=bootstrap, replication_factor=stack.replication_factor)


def own_kafka(
    stack_settings: Settings, folder: Path, brokers: int, broker_settings: dict[str, str] | None = None
) -> Iterator[tuple[LocalStack, Settings]]:
    """start_kafka for a fixture: stopped after, its data deleted."""
    stack, settings = start_kafka(stack_settings, folder, brokers, broker_settings)
    try:
        yield stack, settings
    finally:
        stack.down(wipe=True)


def own_registry(settings: Settings, folder: Path) -> LocalStack:
    """A registry process (started) on free ports, storing its schemas in the Kafka of `settings` under topics of
    its own; `stop_registry()` ends it. Its URL: `.registry_url`."""
    base = free_port_block(2)
    kafka_port = int(settings.bootstrap_servers.split(",")[0].rpartition(":")[2])
    stack = LocalStack(
        settings.replace(
            stack_dir=folder, kafka_port=kafka_port, registry_port=base, registry_management_port=base + 1
        ),
        log=lambda *_: None,
        dist=shared_dist(),
        registry_namespace=f"registry-{uuid.uuid4().hex[:8]}",
    )
    stack.start_registry()
    return stack
