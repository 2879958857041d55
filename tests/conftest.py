"""Shared fixtures.

Integration tests use an existing Kafka and Schema Registry when KAFKA_BOOTSTRAP_SERVERS and
SCHEMA_REGISTRY_URL are both set; otherwise they start the local stack once per test session
(and stop it at the end if they started it). Each test gets its own topic names.
"""

from __future__ import annotations

import os
import uuid

import pytest

from fraudstream.settings import Settings


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack_settings() -> Settings:
    """Settings pointing at a running broker and registry."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("SCHEMA_REGISTRY_URL"):
        yield Settings.from_env()
        return
    from fraudstream.stack import LocalStack

    base = Settings.from_env()
    stack = LocalStack(base)
    was_running = stack.status().running
    status = stack.up()
    yield base.replace(bootstrap_servers=status.bootstrap_servers, schema_registry_url=status.registry_url)
    if not was_running:
        stack.down()


@pytest.fixture
def pipeline(stack_settings: Settings) -> Settings:
    """Settings with a fresh input topic (and its derived topics) created and its schemas registered."""
    from fraudstream.kafka import ensure_topics
    from fraudstream.registry import register_all

    settings = stack_settings.replace(
        transactions_topic=f"test-{uuid.uuid4().hex[:10]}",
        group_id=f"test-detector-{uuid.uuid4().hex[:8]}",
        partitions=3,
    )
    ensure_topics(settings)
    register_all(settings)
    return settings
